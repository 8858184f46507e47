"""Issue 30 (4, 5, 7 in part): learners by their papers' names in reports, smoke runs marked as
smoke runs in every format, ``± n/a`` for one episode, the best entry not "worse than best",
and ``compare`` without ``--baseline`` comparing every pair (Holm).

Stores are written by hand (``tests/stored.py``): nothing trains here. Names and modules are
imported inside the tests, so that each test fails on its own on the code before this change.
"""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
from helpers import concurrently, run_cli
from stored import make_cell, store_run

from fewbench.errors import FewbenchError, SuiteError
from fewbench.reports.table import Options, render
from fewbench.storage.store import ResultsStore
from fewbench.suite.cell import Cell

FINN_OMNIGLOT = {"split": "finn", "image_size": 28}
FINN_CONV4 = {"hidden": 64, "pool": "stride", "batch_norm": "batch"}
BY_LEARNER = Options(rows=("learner",), cols=("dataset", "ways", "shots", "backbone"))
WITH_REFERENCE = Options(
    rows=("learner",), cols=("dataset", "ways", "shots", "backbone"), with_reference=True
)


def labelled(cell: Cell, learner: str) -> Cell:
    """``cell`` under the learner label ``learner`` (a suite's one finetune entry with
    head: cosine is labelled ``finetune``, with no suffix)."""
    return Cell.from_config(cell.config, cell.label, {**cell.labels, "learner": learner}, cell.id)


def capped(cell: Cell, iterations: int = 60000, cap: int = 30) -> Cell:
    """``cell`` as ``fewbench run --max-iterations CAP`` stores it (Cell.capped)."""
    config = {**cell.config, "train": {**cell.config["train"], "iterations": iterations}}
    return Cell.from_config(config, cell.label, cell.labels, cell.id).capped(cap)


def with_suite(path, text: str):
    store = ResultsStore.open_run(path)
    store.set_meta("suite", textwrap.dedent(text))
    store.close()
    return path


def _layout() -> dict:
    return {"rows": BY_LEARNER.rows, "cols": BY_LEARNER.cols}


def rows_of(markdown: str) -> list[str]:
    """The first cell of each body row of a Markdown table."""
    lines = markdown.split("\n\n")[0].splitlines()[2:]
    return [line.split(" | ")[0].removeprefix("| ") for line in lines]


# -- item 5: display names ----------------------------------------------------------------------


def test_built_in_learners_show_their_papers_names_and_ids_show_the_plugins(tmp_path):
    values = [1.0, 0.9, 0.8, 1.0]
    path = store_run(
        tmp_path,
        [
            (make_cell("maml"), values),
            (make_cell("fomaml"), values),
            (make_cell("finetune"), values),
            (labelled(make_cell("finetune", params={"head": "cosine"}), "finetune++"), values),
            (make_cell("protonet"), values),
            (make_cell("meta_baseline", params={"meta_iterations": 0}), values),
            (make_cell("plugin_not_installed"), values),
        ],
    )
    assert rows_of(render(path, "markdown", BY_LEARNER)) == [
        "MAML", "FO-MAML", "Baseline", "finetune++", "Prototypical Networks",
        "Classifier-Baseline[meta_iterations=0]", "plugin_not_installed",
    ]  # fmt: skip
    assert rows_of(render(path, "markdown", Options(ids=True, **_layout()))) == [
        "maml", "fomaml", "finetune", "finetune++", "protonet", "meta_baseline[meta_iterations=0]",
        "plugin_not_installed",
    ]  # fmt: skip
    # The JSON keeps the label a script keys on, and gives the name beside it.
    entries = json.loads(render(path, "json", BY_LEARNER))["entries"]
    assert [(e["learner"], e["learner_name"]) for e in entries[:3]] == [
        ("maml", "MAML"), ("fomaml", "FO-MAML"), ("finetune", "Baseline"),
    ]  # fmt: skip


def test_a_learner_named_by_its_parameters_baseline_plus_plus(tmp_path):
    """finetune is Baseline with a linear head and Baseline++ with a cosine head (Chen et al.
    2019): one suite entry is labelled finetune either way, so the name reads the head."""
    cosine = labelled(make_cell("finetune", params={"head": "cosine"}), "finetune")
    text = render(store_run(tmp_path, [(cosine, [1.0, 0.5])]), "markdown", BY_LEARNER)
    assert rows_of(text) == ["Baseline++"]


def test_every_built_in_learner_declares_its_name_and_the_index_reads_the_same(registry):
    learners = registry.names("learner")
    undeclared = [
        n for n in learners if not vars(registry.get("learner", n).cls).get("display_name")
    ]
    assert not undeclared

    from fewbench.reports import names

    from_classes = names._from_classes(learners)
    assert all(from_classes.values()), [k for k, v in from_classes.items() if not v]
    # Read from the plugins' source through the plugin index (no plugin imported): the same.
    assert names._from_source(set(learners)) == from_classes
    shown = {k: names.resolve(v, {}) for k, v in from_classes.items()}
    assert shown["maml"] == "MAML" and shown["fomaml"] == "FO-MAML"
    assert shown["mamlpp"] == "MAML++" and shown["r2d2"] == "R2-D2"
    assert names.resolve(from_classes["reptile"], {"transductive": True}) == (
        "Reptile + Transduction"
    )
    # Only the class that declares a name has it: a subclass under another name is not
    # taken for its parent's method.
    maml = registry.get("learner", "maml").cls
    subclass = type("MyMAML", (maml,), {"name": "mymaml"})
    assert "display_name" not in vars(subclass) and vars(maml)["display_name"] == "MAML"


def test_variants_keep_their_suffix_and_suite_and_command_line_names_win(tmp_path):
    path = store_run(
        tmp_path,
        [
            (make_cell("maml", params={"inner_lr": 0.1}), [1.0, 0.5]),
            (make_cell("maml", params={"inner_lr": 0.4}), [1.0, 0.6]),
            (make_cell("finetune"), [0.5, 0.5]),
        ],
    )
    assert rows_of(render(path, "markdown", BY_LEARNER)) == [
        "MAML[inner_lr=0.1]", "MAML[inner_lr=0.4]", "Baseline",
    ]  # fmt: skip
    with_suite(path, "name: toy\nnames: {maml: MAML (ours), finetune: Fine-tuning}\n")
    assert rows_of(render(path, "markdown", BY_LEARNER)) == [
        "MAML (ours)[inner_lr=0.1]", "MAML (ours)[inner_lr=0.4]", "Fine-tuning",
    ]  # fmt: skip
    given = (("finetune", "Baseline++"), ("maml[inner_lr=0.4]", "MAML, tuned"))
    assert rows_of(render(path, "markdown", Options(names=given, **_layout()))) == [
        "MAML (ours)[inner_lr=0.1]", "MAML, tuned", "Baseline++",
    ]  # fmt: skip
    with pytest.raises(FewbenchError, match=r"--names: no learner 'mmal' in these runs \(did you"):
        render(path, "markdown", Options(names=(("mmal", "MAML"),), **_layout()))


def test_two_learners_never_share_a_name(tmp_path):
    path = store_run(tmp_path, [(make_cell("a"), [1.0, 0.5]), (make_cell("b"), [0.5, 0.5])])
    options = Options(names=(("a", "Same"), ("b", "Same")), **_layout())
    assert rows_of(render(path, "markdown", options)) == ["Same (a)", "Same (b)"]


def test_names_on_the_command_line_pairs_or_a_yaml_file(tmp_path):
    from fewbench.reports.names import parse_names

    assert parse_names("maml=MAML,finetune=Baseline++") == {
        "maml": "MAML",
        "finetune": "Baseline++",
    }
    names_file = tmp_path / "names.yaml"
    names_file.write_text("maml: MAML (ours)\nfinetune: 'Baseline, fine-tuned'\n")
    assert parse_names(str(names_file)) == {
        "maml": "MAML (ours)",
        "finetune": "Baseline, fine-tuned",
    }
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\nnames: {maml: M}\nlearners: [maml]\n")
    assert parse_names(str(suite)) == {"maml": "M"}  # a suite file: its names
    for bad in ("maml", "maml=", "=MAML", "maml=MAML,,"):
        with pytest.raises(FewbenchError, match="expected LEARNER=NAME pairs"):
            parse_names(bad)
    with pytest.raises(FewbenchError, match="no such file"):
        parse_names(str(tmp_path / "missing.yaml"))


def test_report_names_and_ids_on_the_command_line(tmp_path):
    path = store_run(tmp_path / "run", [(make_cell("maml"), [1.0, 0.5]), (make_cell("finetune"), [0.5, 0.5])])  # fmt: skip
    named, ids, both, bad = concurrently(
        lambda: run_cli("report", str(path), "--format", "markdown", "--names", "finetune=B++"),
        lambda: run_cli("report", str(path), "--format", "markdown", "--ids"),
        lambda: run_cli("report", str(path), "--ids", "--names", "maml=M"),
        lambda: run_cli("report", str(path), "--names", "maml"),
    )
    assert named.returncode == 0, named.stderr
    assert rows_of(named.stdout) == ["MAML", "B++"]
    assert ids.returncode == 0 and rows_of(ids.stdout) == ["maml", "finetune"]
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert bad.returncode == 2 and "expected LEARNER=NAME pairs" in bad.stderr


SUITE = """\
name: named
datasets: [{name: sinusoid}]
tasks: {ways: 1, shots: 5}
backbones: [{name: mlp}]
learners:
  - {name: maml, inner_lr: [0.1, 0.4]}
  - {name: finetune}
"""


def test_a_suite_names_its_learners_and_a_typo_is_refused_in_one_line(registry):
    from fewbench.suite.check import check_suite
    from fewbench.suite.loading import parse_yaml

    good = SUITE + "names: {maml: MAML (ours), 'maml[inner_lr=0.4]': MAML fast, finetune: FT}\n"
    checked = check_suite(parse_yaml(good, "named.yaml"), registry)
    assert checked.names == {"maml": "MAML (ours)", "maml[inner_lr=0.4]": "MAML fast", "finetune": "FT"}  # fmt: skip
    with pytest.raises(SuiteError) as error:
        check_suite(parse_yaml(SUITE + "names: {mmal: MAML}\n", "named.yaml"), registry)
    message = str(error.value)
    assert message.startswith("named.yaml:8: names.mmal: no learner 'mmal' in this suite")
    assert "did you mean 'maml'?" in message and "\n" not in message
    assert "its learners: maml, finetune, maml[inner_lr=0.1], maml[inner_lr=0.4]" in message
    for value in ("{maml: ''}", "{maml: [1]}", "[maml]"):
        with pytest.raises(SuiteError, match="names"):
            check_suite(parse_yaml(SUITE + f"names: {value}\n", "named.yaml"), registry)


# -- item 4: smoke runs -------------------------------------------------------------------------


def test_a_capped_cell_is_marked_in_every_format(tmp_path):
    path = store_run(
        tmp_path,
        [(capped(make_cell("maml")), [1.0, 0.9, 0.8]), (make_cell("fomaml"), [0.9, 0.9, 0.8])],
    )
    mark = "(capped: 30 of 60,000 iterations)"
    for fmt in ("table", "markdown", "latex", "html"):
        text = render(path, fmt, BY_LEARNER)
        assert mark in text, fmt
        assert text.count("capped: 30 of 60,000") >= 1 and "FO-MAML" in text, fmt
        assert "Capped: a smoke run (fewbench run --max-iterations)" in text, fmt
    markdown = render(path, "markdown", BY_LEARNER)
    assert f"| MAML | **90.00 ± 24.84 {mark}** |" in markdown
    assert "| FO-MAML | 86.67 ± 14.34 † |" in markdown  # a full cell is not marked
    (maml, fomaml) = json.loads(render(path, "json", BY_LEARNER))["entries"]
    assert (maml["capped"], maml["iterations"], maml["planned_iterations"]) == (True, 30, 60000)
    assert (fomaml["capped"], fomaml["iterations"]) == (False, 2)
    csv_text = render(path, "csv", BY_LEARNER)
    assert "capped" in csv_text.splitlines()[0] and ",True," in csv_text
    ranks = render(path, "markdown", Options(ranks=True, **_layout()))
    assert (
        "Ranked on capped results" in ranks
        and "MAML conv4 in toy 5-way 1-shot (30 of 60,000" in ranks
    )


def test_the_html_shows_what_ran_and_the_curves_of_one_point_have_markers(tmp_path, monkeypatch):
    smoke = capped(make_cell("maml"))
    path = store_run(
        tmp_path,
        [(smoke, [1.0, 0.9]), (make_cell("fomaml"), [0.9, 0.8])],
        curves={smoke.id: [(30, 1.2, 0.5)]},
    )
    page = render(path, "html", BY_LEARNER)
    assert "<h2>Settings that ran</h2>" in page
    assert "<td>30 of 60,000 (capped)</td>" in page  # the suite below says 60,000
    assert 'class="capped"' in page
    # The figures' captions say what they show, not a file name.
    assert (
        "<figcaption>Training loss and validation accuracy (%) against training iteration, "
        "toy 5-way 1-shot: one line per method.</figcaption>" in page
    )
    assert "<figcaption>curves toy 5 way 1 shot</figcaption>" not in page

    from fewbench.reports import plots
    from fewbench.reports.names import learner_names
    from fewbench.reports.results import load_runs

    markers = {}

    def keep(fig, out_dir, name, *args, **kwargs):
        for line in fig.axes[1].get_lines():
            markers[line.get_label()] = (len(line.get_xdata()), line.get_marker())
        plots.plt.close(fig)
        return []

    monkeypatch.setattr(plots, "_save", keep)
    results = load_runs([path])
    plots.training_curves(results, tmp_path / "figures", names=learner_names(results))
    assert markers["MAML (capped: 30 of 60,000 it.)"] == (1, "o")  # one point: a marker
    assert markers["FO-MAML"][0] == 2 and markers["FO-MAML"][1] in ("None", "", None)


def test_a_capped_cell_is_not_set_against_a_published_number(tmp_path):
    """Finn et al.'s 98.70 beside a 30-iteration MAML printed 'Δ -23.83, no overlap'."""
    cell = make_cell(
        "maml", dataset="omniglot", dataset_params=FINN_OMNIGLOT, backbone_params=FINN_CONV4
    )
    path = store_run(tmp_path, [(capped(cell), [0.8, 0.7, 0.75])])
    markdown = render(path, "markdown", WITH_REFERENCE)
    assert (
        "| MAML (published: Finn et al. 2017, Table 1) | 98.70 ± 0.40 (not compared: ours "
        "trained 30 of 60,000 iterations) |" in markdown
    )
    assert "Δ -" not in markdown and "no overlap" not in markdown.split("\n\n")[0]
    assert "A published number beside a capped entry is not compared with it" in markdown
    (entry,) = json.loads(render(path, "json", WITH_REFERENCE))["entries"]
    (published,) = entry["published"]
    assert published["mean"] == 98.7 and published["compared"] is False
    assert published["difference"] is None and published["overlap"] is None
    assert published["not_compared_because"] == "capped: 30 of 60,000 iterations"


def test_a_cap_is_counted_against_the_learner_s_own_count(tmp_path):
    """finetune trains its own ``iterations`` (5,000 here), not train.iterations; a cap at or
    above what a cell trains cut nothing, and is not a smoke run."""
    own = make_cell("finetune", params={"iterations": 5000})
    path = store_run(
        tmp_path,
        [
            (capped(own), [1.0, 0.5]),
            (capped(make_cell("maml"), iterations=100, cap=200), [1.0, 0.5]),
        ],
    )
    text = render(path, "markdown", BY_LEARNER)
    assert "(capped: 30 of 5,000 iterations)" in text
    assert text.count("capped:") == 1


# -- item 7 (parts) -----------------------------------------------------------------------------


def test_one_episode_prints_n_a_not_nan(tmp_path):
    path = store_run(tmp_path, [(make_cell("maml"), [0.5733]), (make_cell("fomaml"), [0.4])])
    for fmt in ("table", "markdown", "latex", "html"):
        text = render(path, fmt, BY_LEARNER)
        assert "nan" not in text, fmt
        assert "57.33" in text and "n/a" in text, fmt
    assert "| MAML | **57.33 ± n/a** |" in render(path, "markdown", BY_LEARNER)


def test_the_best_entry_is_not_worse_than_the_best(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.uniform(0.5, 1.0, 30)
    path = store_run(
        tmp_path,
        [(make_cell("a"), a), (make_cell("b"), a - 0.001), (make_cell("c"), a - 0.3)],
    )
    rows = {e["learner"]: e for e in json.loads(render(path, "json", BY_LEARNER))["entries"]}
    assert rows["a"]["best"] and rows["a"]["not_worse_than_best"] is True
    assert rows["c"]["not_worse_than_best"] is False


def test_compare_without_a_baseline_compares_every_pair_with_holm(tmp_path):
    from scipy import stats

    rng = np.random.default_rng(2)
    a = rng.uniform(0.3, 1.0, 40)
    b, c = np.clip(a - 0.05 + rng.normal(0, 0.02, 40), 0, 1), a + rng.normal(0, 0.1, 40)
    path = store_run(
        tmp_path / "run",
        [(make_cell("maml"), a), (make_cell("fomaml"), b), (make_cell("finetune"), c)],
    )
    cli, baseline = concurrently(
        lambda: run_cli("compare", str(path), "--format", "json"),
        lambda: run_cli("compare", str(path), "--baseline", "Baseline"),  # by its name
    )
    assert cli.returncode == 0, cli.stderr  # it refused: --baseline was required
    assert len(json.loads(cli.stdout)) == 3
    assert baseline.returncode == 0, baseline.stderr
    assert "minus Baseline" in baseline.stdout and "not corrected" in baseline.stdout

    from fewbench.reports.compare import compare_all_pairs, render_comparison
    from fewbench.reports.names import learner_names
    from fewbench.reports.results import load_runs
    from fewbench.reports.significance import adjust

    results = load_runs([path])
    records = compare_all_pairs(results, learner_names(results))
    pairs = [(r["learner"], r["baseline"]) for r in records]
    assert pairs == [("maml", "fomaml"), ("maml", "finetune"), ("fomaml", "finetune")]
    raw = [stats.ttest_rel(x, y).pvalue for x, y in ((a, b), (a, c), (b, c))]
    assert [r["p_t"] for r in records] == pytest.approx(raw)
    assert [r["p_t_holm"] for r in records] == pytest.approx(adjust(raw, "holm"))
    assert records[0]["difference"] == pytest.approx(100 * (a - b).mean())
    text = render_comparison(records, "table")
    assert "p (t, Holm)" in text and "FO-MAML" in text and "Holm's method" in text


def test_compare_says_a_capped_learner_and_one_episode_is_n_a(tmp_path):
    from fewbench.reports.compare import compare_to_baseline, render_comparison
    from fewbench.reports.results import load_runs

    path = store_run(
        tmp_path,
        [(capped(make_cell("maml")), [1.0, 0.5]), (make_cell("fomaml", eval_seed=1), [0.5])],
    )
    records = compare_to_baseline(load_runs([path]), "maml")  # no names given: the labels
    (record,) = records
    text = render_comparison(records, "table")
    assert "minus maml (capped)" in text and "± n/a" in text and "nan" not in text
    assert record["capped"] == ["maml"] and math.isnan(record["ci95"])
    assert "a smoke run (fewbench run --max-iterations)" in text
