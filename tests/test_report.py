"""Reports from results stores built by hand: layout, significance, formats, references."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from helpers import concurrently, run_cli
from scipy import stats
from stored import make_cell, store_run

from fewbench.errors import FewbenchError
from fewbench.reports.references import all_references
from fewbench.reports.stats import mean_ci95
from fewbench.reports.table import Options, render

SMALL = [
    (make_cell("maml"), [0.8, 0.9, 1.0, 0.9, 0.9]),
    (make_cell("maml", shots=5), [1.0, 1.0, 0.9, 1.0, 1.0]),
    (make_cell("finetune"), [0.6, 0.7, 0.8, 0.7, 0.7]),
    (make_cell("finetune", shots=5), [1.0, 0.9, 1.0, 1.0, 1.0]),
]
CAPTION = (
    "Accuracy (%) on 5 fixed test episodes per setting, shared by all methods; mean ± 95% "
    "confidence interval (Student t over the episodes). Bold: best (highest) in its column. †: "
    "not significantly different from the best (paired t-test on the per-episode results, paired "
    "by episode; Holm correction over the column's comparisons; level 0.05)."
)


def test_markdown_exact(tmp_path):
    # maml 1-shot: mean 0.9, sd sqrt(0.005), CI t(.975, 4) * sd / sqrt(5) = 8.78 points.
    # finetune 1-shot is 0.2 lower on every episode: significantly worse.
    # 5-shot: equal means, differences +-0.1 that cancel: not significantly different.
    expected = (
        "| learner | backbone | toy 5-way 1-shot | toy 5-way 5-shot |\n"
        "|---|---|---|---|\n"
        "| MAML | conv4 | **90.00 ± 8.78** | **98.00 ± 5.55** |\n"
        "| Baseline | conv4 | 70.00 ± 8.78 | 98.00 ± 5.55 † |\n"
        "\n" + CAPTION + "\n"
    )
    assert render(store_run(tmp_path, SMALL), "markdown") == expected


def test_latex_exact(tmp_path):
    caption = CAPTION.replace("%", r"\%").replace("±", r"$\pm$").replace("†", r"$^\dagger$")
    expected = "\n".join(
        [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{caption}}}",
            r"\label{tab:fewbench}",
            r"\begin{tabular}{llcc}",
            r"\toprule",
            r"Learner & Backbone & toy 5-way 1-shot & toy 5-way 5-shot \\",
            r"\midrule",
            r"MAML & conv4 & \textbf{90.00 $\pm$ 8.78} & \textbf{98.00 $\pm$ 5.55} \\",
            r"Baseline & conv4 & 70.00 $\pm$ 8.78 & 98.00 $\pm$ 5.55$^\dagger$ \\",
            r"\bottomrule",
            r"\end{tabular}",
            r"\end{table}",
        ]
    )
    assert render(store_run(tmp_path, SMALL), "latex") == expected + "\n"


def paired_margin(episodes: int = 200, margin: float = 0.03):
    """Episodes of very different difficulty; B is A minus a small margin on each episode."""
    rng = np.random.default_rng(7)
    a = rng.uniform(0.2, 1.0, episodes)
    b = np.clip(a - margin + rng.normal(0, 0.01, episodes), 0, 1)
    return a, b


def test_pairing_finds_a_margin_that_an_unpaired_test_cannot(tmp_path):
    a, b = paired_margin()
    assert stats.ttest_rel(a, b).pvalue < 1e-10
    assert stats.ttest_ind(a, b, equal_var=False).pvalue > 0.05  # not significant unpaired
    path = store_run(tmp_path / "paired", [(make_cell("a"), a), (make_cell("b"), b)])
    rows = {r["learner"]: r for r in json.loads(render(path, "json"))["entries"]}
    assert rows["a"]["best"] and not rows["b"]["not_worse_than_best"]
    assert rows["b"]["paired"] and rows["b"]["p_vs_best"] < 1e-10
    # The same numbers on different episodes (another eval seed) cannot be paired: Welch's
    # test is used, says so, and cannot separate them.
    unpaired = store_run(
        tmp_path / "unpaired", [(make_cell("a"), a), (make_cell("b", eval_seed=1), b)]
    )
    rows = {r["learner"]: r for r in json.loads(render(unpaired, "json"))["entries"]}
    assert not rows["b"]["paired"] and rows["b"]["not_worse_than_best"]
    assert "Welch's t-test where the episodes differ" in render(unpaired, "markdown")


def test_wilcoxon_and_corrections_are_selectable(tmp_path):
    a, b = paired_margin()
    path = store_run(tmp_path, [(make_cell("a"), a), (make_cell("b"), b)])
    text = render(path, "markdown", Options(test="wilcoxon", correction="bonferroni", alpha=0.01))
    assert "Wilcoxon signed-rank test" in text and "Bonferroni correction" in text
    assert "level 0.01" in text
    entries = json.loads(render(path, "json", Options(test="wilcoxon")))["entries"]
    expected = stats.wilcoxon(b, a).pvalue
    assert entries[1]["p_vs_best"] == pytest.approx(expected)


def test_seeds_are_merged_and_unfinished_cells_shown(tmp_path):
    rng = np.random.default_rng(0)
    s0, s1 = rng.uniform(0.5, 1, 8).round(3), rng.uniform(0.5, 1, 8).round(3)
    path = store_run(
        tmp_path,
        [
            (make_cell("maml", 0), s0),
            (make_cell("maml", 1), s1),
            (make_cell("finetune", 0), s0),
            (make_cell("finetune", 1), "failed"),
            (make_cell("maml", 0, shots=5), "pending"),
        ],
    )
    rows = {(r["learner"], r["shots"]): r for r in csv.DictReader(io.StringIO(render(path, "csv")))}
    estimate = mean_ci95(np.stack([s0, s1]))
    maml = rows[("maml", "1")]
    assert (maml["seeds"], maml["episodes"], maml["status"]) == ("2", "8", "done")
    assert float(maml["mean"]) == pytest.approx(100 * estimate.mean, abs=1e-3)
    assert float(maml["ci95"]) == pytest.approx(100 * estimate.ci95, abs=1e-3)
    assert maml["engine"] == "test engine"
    assert (
        rows[("finetune", "1")]["seeds"] == "1" and "1 failed" in rows[("finetune", "1")]["status"]
    )
    assert rows[("maml", "5")]["mean"] == "" and rows[("maml", "5")]["status"] == "1 pending"
    table = render(path, "table")
    assert "1 pending" in table and "(1 done, 1 failed)" in table
    assert "2 training seeds averaged" in table and "Satterthwaite" in table


def test_runs_merge_and_pair_across_directories(tmp_path):
    a, b = paired_margin()
    baseline = store_run(tmp_path / "baseline", [(make_cell("a"), a)])
    later = store_run(tmp_path / "later", [(make_cell("b"), b), (make_cell("a"), a)])
    entries = json.loads(render([baseline, later], "json"))["entries"]
    assert [e["learner"] for e in entries] == ["a", "b"]  # the repeated cell counts once
    assert entries[1]["paired"] and entries[1]["p_vs_best"] < 1e-10


def test_layout_is_chosen_and_checked(tmp_path):
    path = store_run(
        tmp_path,
        [(make_cell("maml"), [1.0, 0.5]), (make_cell("maml", backbone="resnet"), [0.5, 0.5])],
    )
    text = render(path, "markdown", Options(rows=("shots",), cols=("learner", "backbone")))
    assert text.startswith("| shots | MAML conv4 | MAML resnet |\n")
    with pytest.raises(FewbenchError, match="2 values of 'backbone'.*add it to one of them"):
        render(path, "markdown", Options(rows=("learner",)))
    with pytest.raises(FewbenchError, match="unknown dimension 'seed'"):
        render(path, "markdown", Options(rows=("seed",)))


FINN_OMNIGLOT = {"split": "finn", "image_size": 28}
FINN_CONV4 = {"hidden": 64, "pool": "stride", "batch_norm": "batch"}


def test_published_numbers_beside_the_measured_ones(tmp_path):
    values = [1.0] * 5 + [0.9] * 5
    path = store_run(
        tmp_path,
        [
            (
                make_cell(
                    "maml",
                    dataset="omniglot",
                    dataset_params=FINN_OMNIGLOT,
                    backbone_params=FINN_CONV4,
                ),
                values,
            ),
            (
                make_cell(
                    "finetune",
                    dataset="cub",
                    params={"head": "cosine"},
                    backbone_params={"hidden": 64, "pool": "max"},
                    eval_query=16,
                ),
                [0.6, 0.62],
            ),
        ],
    )
    text = render(
        path,
        "markdown",
        Options(
            rows=("learner",), cols=("dataset", "ways", "shots", "backbone"), with_reference=True
        ),
    )
    measured = mean_ci95(values)
    delta = 100 * measured.mean - 98.7
    overlap = abs(delta) <= 100 * measured.ci95 + 0.4
    assert (
        f"| MAML (published: Finn et al. 2017, Table 1) | 98.70 ± 0.40 (Δ {delta:+.2f}, {'CIs overlap' if overlap else 'no overlap'}) |"
        in text
    )
    assert "Baseline++[head=cosine] (published: Chen et al. 2019, Table 3)" in text
    assert (
        "Model-Agnostic Meta-Learning" in text
        and "A Closer Look at Few-shot Classification" in text
    )
    assert "another protocol" not in text
    record = next(
        e
        for e in json.loads(
            render(
                path,
                "json",
                Options(
                    rows=("learner",),
                    cols=("dataset", "ways", "shots", "backbone"),
                    with_reference=True,
                ),
            )
        )["entries"]
        if e["learner"] == "maml"
    )
    assert record["published"][0]["mean"] == 98.7
    assert record["published"][0]["difference"] == pytest.approx(delta)
    assert record["published_under_another_protocol"] == []


def test_a_published_number_is_not_shown_beside_a_cell_of_another_protocol(tmp_path):
    """Finn et al.'s Omniglot rows were measured on their own random split with the
    stride-2 Conv-4: a Vinyals-split cell, or one on a max-pooling Conv-4, does not get
    them beside it; the caption and the JSON say what differs instead."""
    path = store_run(
        tmp_path,
        [
            (
                make_cell(
                    "maml",
                    dataset="omniglot",
                    dataset_params={**FINN_OMNIGLOT, "split": "vinyals"},
                    backbone_params={**FINN_CONV4, "pool": "max"},
                ),
                [1.0, 0.9, 1.0],
            )
        ],
    )
    options = Options(
        rows=("learner",), cols=("dataset", "ways", "shots", "backbone"), with_reference=True
    )
    text = render(path, "markdown", options)
    assert "published: Finn et al. 2017" not in text
    assert (
        "Not shown, published under another protocol: Finn et al. 2017, Table 1, 5-way 1-shot "
        "MAML (dataset.split: published finn, this cell vinyals; backbone.pool: published "
        "stride, this cell max)." in text
    )
    (record,) = json.loads(render(path, "json", options))["entries"]
    assert record["published"] == []
    (refused,) = record["published_under_another_protocol"]
    assert refused["mean"] == 98.7
    assert refused["differs"] == [
        "dataset.split: published finn, this cell vinyals",
        "backbone.pool: published stride, this cell max",
    ]


def test_every_shipped_reference_is_complete(registry):
    from test_references import returns_of

    references = all_references()
    assert len(references) >= 20
    for r in references:
        assert r.citation and r.table and r.protocol
        assert returns_of(registry, r.dataset) or 0 < r.mean <= 100  # returns: any sign
        assert r.pm is None if r.pm_means == "none" else r.pm > 0
    names = {(r.paper, r.dataset, r.learner, r.method) for r in references}
    for dataset in ("omniglot", "miniimagenet"):
        for learner in ("maml", "fomaml"):
            assert any(n[1:3] == (dataset, learner) for n in names)
    for dataset in ("miniimagenet", "cub"):
        for method in ("Baseline", "Baseline++"):
            assert ("Chen et al. 2019", dataset, "finetune", method) in names


def test_compare_prints_paired_differences(tmp_path):
    a, b = paired_margin()
    path = store_run(
        tmp_path, [(make_cell("a"), a), (make_cell("b"), b), (make_cell("c"), "failed")]
    )
    result, table, bad = concurrently(
        lambda: run_cli("compare", str(path), "--baseline", "a", "--format", "json"),
        lambda: run_cli("compare", str(path), "--baseline", "a"),
        lambda: run_cli("compare", str(path), "--baseline", "aa"),
    )
    assert result.returncode == 0, result.stderr
    records = {r["learner"]: r for r in json.loads(result.stdout)}
    diff = b - a
    ci = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
    assert records["b"]["difference"] == pytest.approx(100 * diff.mean())
    assert records["b"]["ci95"] == pytest.approx(100 * ci)
    assert records["b"]["p_t"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
    assert records["b"]["p_wilcoxon"] == pytest.approx(stats.wilcoxon(b, a).pvalue)
    assert records["b"]["paired"] and records["c"]["status"] == "c: 1 failed"
    table = table.stdout
    assert "minus a" in table and "<1e-4" in table and "c: 1 failed" in table
    assert (
        bad.returncode == 2
        and "no such learner" in bad.stderr
        and "learners: a, b, c" in bad.stderr
    )


def test_report_command_writes_files(tmp_path):
    path = store_run(tmp_path / "run", SMALL)
    out = tmp_path / "tables" / "table.tex"
    result, missing = concurrently(
        lambda: run_cli(
            "report", str(path), "--format", "latex", "--out", str(out), "--decimals", "1"
        ),
        lambda: run_cli("report", str(tmp_path / "nothing")),
    )
    assert result.returncode == 0, result.stderr
    assert r"\textbf{90.0 $\pm$ 8.8}" in out.read_text()
    assert missing.returncode == 2 and "nothing" in missing.stderr


def test_a_capped_cell_beside_a_published_number_says_it_is_capped(tmp_path):
    cell = make_cell(
        "maml", dataset="omniglot", dataset_params=FINN_OMNIGLOT, backbone_params=FINN_CONV4
    )
    config = {**cell.config, "train": {"iterations": 60000, "max_iterations": 30}}
    capped = type(cell).from_config(config, cell.label, id=cell.id)
    options = Options(
        rows=("learner",), cols=("dataset", "ways", "shots", "backbone"), with_reference=True
    )
    text = render(store_run(tmp_path / "capped", [(capped, [1.0, 0.9])]), "markdown", options)
    assert "published: Finn et al. 2017" in text  # the number is shown, never compared
    assert "(capped: 30 of 60,000 iterations)" in text
    assert "not compared: ours trained 30 of 60,000 iterations" in text and "Δ -" not in text
    assert "Capped: a smoke run (fewbench run --max-iterations)" in text
    text = render(store_run(tmp_path / "full", [(cell, [1.0, 0.9])]), "markdown", options)
    assert "capped" not in text.lower()


def test_status_escapes_terminal_control_characters_of_labels(tmp_path):
    from fewbench.reports.status import render_status

    cell = make_cell("maml")
    hostile = type(cell).from_config(cell.config, "\x1b[2Jcell\x07", id=cell.id)
    text = render_status(store_run(tmp_path / "run", [(hostile, [1.0, 0.5])]))
    assert "\x1b" not in text and "\x07" not in text and "\\x1b[2Jcell\\x07" in text


def test_status_shows_a_running_cell_s_validation_in_its_own_unit(tmp_path):
    """A running reinforcement-learning cell's validation return printed as -1536.42%:
    the worker records the cell's metric when it starts."""
    from fewbench.reports.status import render_status
    from fewbench.storage.store import ResultsStore, StoreSink

    cell = make_cell("maml_trpo", dataset="navigation2d")
    run = store_run(tmp_path / "run", [(cell, "pending")])
    store = ResultsStore.open_run(run)
    sink = StoreSink(store, cell.id, "test-worker")
    sink.started("test engine", metric="return")
    sink.save_curve([(10, 1.0, -15.3642)])
    store.close()
    text = render_status(run)
    assert "-15.36 (it 10)" in text and "%" not in text
