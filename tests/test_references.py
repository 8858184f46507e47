"""The shipped published numbers: schema, validation, and what a report calls their ±."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest
import yaml
from stored import make_cell, store_run

from fewbench.errors import FewbenchError
from fewbench.plugin.task_types import REINFORCEMENT, task_type_of
from fewbench.registry import Registry
from fewbench.reports import references as refs
from fewbench.reports.table import Options, render

HEADER = """
papers:
  p2020: {citation: "Author, A Paper, 2020", short: "Author 2020"}
protocols:
  proto: "Conv-4, 84x84, 600 test episodes"
results:
"""


def parse_one(entry: str) -> refs.Reference:
    (reference,) = refs.parse(HEADER + "  - " + entry + "\n")
    return reference


BASE = "{paper: p2020, table: T1, protocol: proto, dataset: toy, ways: 5, shots: 1, learner: maml, mean: 90.0"


def test_pm_means_read_and_old_ci95_entries_still_load():
    new = parse_one(BASE + ", pm: 1.5, pm_means: std, episodes: 600, verified: true}")
    assert (new.pm, new.pm_means, new.episodes, new.verified) == (1.5, "std", 600, True)
    assert new.ci95 is None  # a standard deviation is not a confidence interval
    old = parse_one(BASE + ", ci95: 0.4}")
    assert (old.pm, old.pm_means, old.ci95, old.episodes, old.verified) == (
        0.4,
        "ci95",
        0.4,
        None,
        False,
    )
    none = parse_one(BASE + ", pm_means: none, episodes: 1000, verified: true}")
    assert none.pm is None and none.ci95 is None
    # A standard error over known episodes becomes a 95% interval with Student's t.
    sem = parse_one(BASE + ", pm: 1.0, pm_means: sem, episodes: 600}")
    assert sem.ci95 == pytest.approx(1.9640, abs=1e-3)


def test_unknown_pm_means_is_a_clear_error():
    with pytest.raises(FewbenchError) as error:
        parse_one(BASE + ", pm: 0.4, pm_means: sd}")
    message = str(error.value)
    assert "results[0] (p2020 toy maml 5-way 1-shot)" in message
    assert "unknown pm_means 'sd'" in message
    assert "ci95, std, sem, none" in message


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (BASE + ", pm: 0.4}", "'pm_means' is missing"),
        (BASE + ", pm_means: ci95}", "'pm' must be a positive number"),
        (BASE + ", pm: 0.4, pm_means: none}", "pm_means is 'none' but 'pm' is 0.4"),
        (BASE + ", ci95: 0.4, pm_means: ci95}", "either 'ci95' or 'pm'"),
        (BASE + ", pm_means: none, episodes: 0}", "'episodes' must be a positive integer"),
        (BASE + ", pm_means: none, verified: yes please}", "'verified' must be true or false"),
        (BASE + ", pm_means: none, pm_mean: std}", "unknown key 'pm_mean'"),
        (
            "{paper: p2021, table: T1, protocol: proto, dataset: toy, ways: 5, shots: 1, "
            "learner: maml, mean: 90.0, pm_means: none}",
            "paper 'p2021' is not under 'papers'",
        ),
    ],
)
def test_malformed_entries_are_named(entry, message):
    with pytest.raises(FewbenchError, match=re.escape(message)):
        parse_one(entry)


def with_references(monkeypatch, *entries: str) -> None:
    """Make the report see these references instead of the shipped ones."""
    shipped = refs.parse(HEADER + "".join(f"  - {e}\n" for e in entries))
    monkeypatch.setattr(refs, "all_references", lambda: shipped)


OPTIONS = Options(
    rows=("learner",), cols=("dataset", "ways", "shots", "backbone"), with_reference=True
)


def test_a_standard_deviation_is_never_called_a_confidence_interval(tmp_path, monkeypatch):
    with_references(
        monkeypatch,
        BASE + ", pm: 0.4, pm_means: std, episodes: 600, verified: true}",
    )
    path = store_run(tmp_path, [(make_cell("maml"), [0.9] * 5 + [0.8] * 5)])
    for fmt in ("table", "markdown", "latex", "html"):
        text = render(path, fmt, OPTIONS)
        assert "CIs overlap" not in text and "no overlap" not in text, fmt
        assert "two 95% intervals overlap" not in text, fmt
        assert "a standard deviation" in text and "not a confidence interval" in text, fmt
        assert "confidence interval (Student t" in text, fmt  # the measured entries' CI
    markdown = render(path, "markdown", OPTIONS)
    assert "| MAML (published: Author 2020, T1) | 90.00 ± 0.40 std (Δ -5.00, outside our CI) |" in (
        markdown
    )
    latex = render(path, "latex", OPTIONS)
    assert r"90.00 $\pm$ 0.40 std ($\Delta$ -5.00, outside our CI)" in latex
    record = json.loads(render(path, "json", OPTIONS))["entries"][0]["published"][0]
    assert record["pm"] == 0.4 and record["pm_means"] == "std"
    assert record["ci95"] is None and record["overlap"] is None and record["inside_ci"] is False


def test_no_pm_shows_no_pm_and_unverified_is_said(tmp_path, monkeypatch):
    with_references(
        monkeypatch,
        BASE + ", pm_means: none, episodes: 1000, verified: true}",
        "{paper: p2020, table: T2, protocol: proto, dataset: toy, ways: 5, shots: 1, "
        "learner: maml, mean: 80.0, pm: 1.0, pm_means: ci95, episodes: 600, verified: false, "
        "source: quoted by others}",
    )
    path = store_run(tmp_path, [(make_cell("maml"), [0.9] * 5 + [0.8] * 5)])
    markdown = render(path, "markdown", OPTIONS)
    assert "| MAML (published: Author 2020, T1) | 90.00 (Δ -5.00, outside our CI) |" in markdown
    assert "| MAML (published: Author 2020, T2) | 80.00 ± 1.00 (unverified, Δ +5.00, " in markdown
    caption = markdown.rsplit("\n\n", 1)[1]
    assert "± with no mark: the paper's 95% confidence interval" in caption
    assert "no ±: none published or none confirmed" in caption
    assert "unverified: not confirmed in the paper itself" in caption
    assert "standard deviation" not in caption


def known_learner(name: str) -> bool:
    """A fewbench learner name: lowercase words joined by underscores."""
    return re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", name) is not None


def test_every_shipped_entry_says_what_it_is():
    text = (
        resources.files("fewbench.reports").joinpath("references.yaml").read_text(encoding="utf-8")
    )
    data = yaml.safe_load(text)
    registry = Registry()
    datasets = set(registry.names("dataset"))
    for i, raw in enumerate(data["results"]):
        where = f"results[{i}] {raw.get('paper')} {raw.get('dataset')} {raw.get('learner')}"
        for key in ("paper", "table", "protocol", "episodes", "pm_means", "verified"):
            assert key in raw, f"{where}: no '{key}'"
        assert "ci95" not in raw, f"{where}: write pm with pm_means, not the old ci95"
        assert raw["dataset"] in datasets, f"{where}: unknown dataset"
        assert known_learner(raw["learner"]), f"{where}: not a learner name"
        if registry.has("learner", raw["learner"]):
            known = registry.get("learner", raw["learner"]).params.params
            assert set(raw.get("params", {})) <= set(known), f"{where}: unknown learner params"
        if not raw["verified"]:
            assert raw.get("source"), f"{where}: an unverified number needs a source note"
        if raw["episodes"] is None:
            assert raw.get("source"), f"{where}: say why the episode count is unknown"
    references = refs.all_references()  # the loader's own checks pass as well
    assert len(references) == len(data["results"])
    for r in references:
        assert r.citation and r.table and r.protocol
        if returns_of(registry, r.dataset):  # an average return: any sign
            assert r.mean == r.mean and r.ways == r.shots == 1
        else:  # accuracy in percent
            assert 0 < r.mean <= 100
        assert r.pm_means in refs.PM_MEANS
        assert (r.pm is None) == (r.pm_means == "none")
    papers = {r.paper for r in references}
    assert {"Snell et al. 2017", "Lee et al. 2019"} <= papers


def test_shipped_numbers_for_the_method_zoo():
    by_key = {(r.paper, r.learner, r.dataset, r.ways, r.shots): r for r in refs.all_references()}
    protonet = by_key[("Snell et al. 2017", "protonet", "omniglot", 20, 1)]
    assert (protonet.mean, protonet.pm, protonet.pm_means, protonet.episodes) == (
        96.0,
        None,
        "none",
        1000,
    )
    mini = by_key[("Snell et al. 2017", "protonet", "miniimagenet", 5, 5)]
    assert (mini.mean, mini.pm, mini.pm_means, mini.episodes) == (68.20, 0.66, "ci95", 600)
    svm = by_key[("Lee et al. 2019", "metaoptnet_svm", "cifar_fs", 5, 1)]
    assert (svm.mean, svm.pm, svm.table, svm.verified) == (72.0, 0.7, "Table 2", True)
    matching = by_key[("Snell et al. 2017", "matchingnet", "omniglot", 5, 1)]
    assert "Vinyals" in matching.method and matching.pm is None


def returns_of(registry, dataset: str) -> bool:
    """Whether a dataset is an environment (its results are returns, not accuracies)."""
    return task_type_of(registry.get("dataset", dataset).cls.task_type) is REINFORCEMENT


def test_every_shipped_protocol_names_keys_a_cell_has():
    """A misspelt requirement ("backbone.pooling") would refuse every cell silently: each key
    must be a parameter of the plugin the reference names, or a field of tasks/train/eval."""
    from dataclasses import fields

    from fewbench.suite.cell import EvalSettings, Tasks, TrainSettings

    registry = Registry()
    sections = {
        "tasks": {f.name for f in fields(Tasks)},
        "train": {f.name for f in fields(TrainSettings)},
        "eval": {f.name for f in fields(EvalSettings)},
    }
    for r in refs.all_references():
        assert r.requires, f"{r.source}: protocol {r.protocol_name} requires nothing"
        backbone = r.requires.get("backbone.name")
        for key in r.requires:
            section, name = key.split(".", 1)
            if section in sections:
                assert name in sections[section], f"{r.protocol_name}: {key}"
                continue
            plugin = {"dataset": r.dataset, "learner": r.learner, "backbone": backbone}[section]
            if name == "name":
                continue
            assert plugin, f"{r.protocol_name}: {key} without backbone.name"
            params = registry.get(section, plugin).params.params
            assert name in params, f"{r.protocol_name}: {key} is not a {plugin} parameter"


def test_a_requirement_outside_a_cell_configuration_is_refused():
    text = HEADER.replace(
        'proto: "Conv-4, 84x84, 600 test episodes"',
        'proto: {text: "Conv-4", requires: {pooling: max}}',
    )
    with pytest.raises(FewbenchError, match="requires 'pooling': name a key .* as section.key"):
        refs.parse(text + "  - " + BASE + "}\n")
    reference = refs.parse(
        HEADER.replace(
            'proto: "Conv-4, 84x84, 600 test episodes"',
            'proto: {text: "Conv-4", requires: {backbone.pool: max}}',
        )
        + "  - "
        + BASE
        + ", pm_means: none, requires: {eval.query: 15}}\n"
    )[0]
    assert reference.requires == {"backbone.pool": "max", "eval.query": 15}
    assert reference.protocol == "Conv-4" and reference.protocol_name == "proto"
