"""Protocol cards (issue 27, items 1 and 2): the setting of every number, derived from what ran.

A card says how a cell's number was measured: above all whether a query's prediction depends
on the other queries of its episode (transductive) or not (inductive), which depends on the
networks' batch norms and on which examples share a forward pass with a query. These tests
check the cards against the predictions themselves (perturb one query, see whether the others
move), MAML's new ``eval_batch_norm: inductive``, that cards are stored, shown and exported,
and that reports keep inductive and transductive numbers apart. New modules are imported
inside the tests, so that each test fails on its own on code without cards.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import REPO
from stored import make_cell

from fewbench.plugin import EpisodeBatch, FewbenchError, LearnerContext
from fewbench.plugin.task_types import CLASSIFICATION
from fewbench.registry import Registry
from fewbench.storage.sink import CellResult
from fewbench.storage.store import ResultsStore
from fewbench.suite.cell import Cell

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (1, 8, 8)  # Conv-4 with stride-2 blocks: 8 -> 4 -> 2 -> 1 -> 1


# -- helpers -------------------------------------------------------------------------------------
def set_up(
    registry: Registry,
    learner: str,
    params: dict[str, Any] | None = None,
    batch_norm: str = "batch",
    hidden: int = 2,
) -> tuple[Any, LearnerContext]:
    """A learner set up on a ``hidden``-filter Conv-4 for 3-way episodes of 8x8 images
    (untrained: what its predictions depend on does not need training)."""
    torch.manual_seed(0)
    backbone = registry.get("backbone", "conv4").build(hidden=hidden, batch_norm=batch_norm)
    built = registry.get("learner", learner).build(**(params or {}))
    context = LearnerContext(
        backbone=backbone, input_shape=SHAPE, ways=3, shots=2, query=3, num_train_classes=6,
        device=torch.device("cpu"), task_type=CLASSIFICATION,
    )  # fmt: skip
    built.setup(context)
    built.iterations(10)  # fixes a staged learner's stages, as the training loop does
    return built, context


def episodes(perturbed: bool = False) -> EpisodeBatch:
    """Two 3-way 2-shot episodes with 3 queries per class; ``perturbed``: the first query of
    each episode changed, nothing else."""
    g = torch.Generator().manual_seed(1)
    support_x, query_x = (
        torch.rand(2, 6, *SHAPE, generator=g),
        torch.rand(2, 9, *SHAPE, generator=g),
    )
    if perturbed:
        query_x[:, 0] = 3 * query_x[:, 0] + 1
    support_y = torch.arange(3).repeat_interleave(2).expand(2, -1).clone()
    query_y = torch.arange(3).repeat_interleave(3).expand(2, -1).clone()
    return EpisodeBatch(support_x, support_y, query_x, query_y, 3)


def calibrate(features: torch.nn.Module) -> None:
    """Running statistics from a few random batches: with the initial ones (mean 0, variance 1)
    an untrained Conv-4 gives every image the same features, and nothing could move."""
    features.train()
    with torch.no_grad():
        for seed in range(3):
            features(torch.rand(32, *SHAPE, generator=torch.Generator().manual_seed(seed)))
    features.eval()


def depends_on_other_queries(learner: Any) -> bool:
    """Whether changing one query changes the predictions of the others: the definition of a
    transductive test, measured. Inductive predictions stay exactly equal."""
    before = learner.predict(episodes()).detach()
    after = learner.predict(episodes(perturbed=True)).detach()
    again = learner.predict(episodes()).detach()
    torch.testing.assert_close(before, again)  # predicting leaves the learner as it was
    change = (before[:, 1:] - after[:, 1:]).abs().max() / before.abs().max()
    return bool(change > 1e-6)


def card(
    registry: Registry,
    learner: str,
    params: dict[str, Any] | None = None,
    batch_norm: str = "batch",
    built: Any = None,
) -> dict[str, Any]:
    """The card the worker stores for such a cell, from the set-up learner and networks."""
    from fewbench.running.protocol import card_of_run

    if built is None:
        built, context = set_up(registry, learner, params, batch_norm)
    else:
        built, context = built
    hidden = context.backbone.config["hidden"]
    cell = make_cell(
        learner, params=params, backbone_params={"hidden": hidden, "batch_norm": batch_norm}
    )
    setup = SimpleNamespace(learner=built, context=context, task_type=CLASSIFICATION)
    return card_of_run(cell, setup, SimpleNamespace(iterations=4, best_iteration=2))


# -- items 1: the card, derived -----------------------------------------------------------------
def test_maml_with_batch_statistics_is_transductive_and_with_inductive_is_not(registry):
    """Finn et al.'s MAML (the default) normalises the query set with its own statistics:
    transductive, and measured so; ``eval_batch_norm: inductive`` normalises each query with
    the support set's: inductive, and a query's prediction no longer moves with the others."""
    for engine in ("batched", "loop"):
        transductive = set_up(registry, "maml", {"engine": engine})
        inductive = set_up(registry, "maml", {"engine": engine, "eval_batch_norm": "inductive"})
        assert depends_on_other_queries(transductive[0])
        assert not depends_on_other_queries(inductive[0])
    default = card(registry, "maml")
    assert default["transductive"] is True
    assert default["batch_norm_at_test"] == "batch statistics of the query set"
    assert "other queries included" in default["why"]
    chosen = card(registry, "maml", {"eval_batch_norm": "inductive"})
    assert chosen["transductive"] is False
    assert chosen["batch_norm_at_test"] == "batch statistics of the support set only"


def test_maml_inductive_trains_alike_on_both_engines_and_unlike_transductive(registry):
    """The option holds in meta-training too (the query loss is computed as the test computes
    the query outputs): the batched and loop engines give the same meta-gradient, second and
    first order (in float64, to rounding), and it is not the transductive one."""
    from fewbench.methods.adaptation import Adapter

    model = set_up(registry, "maml")[0].model.double()
    e = episodes()
    batch = EpisodeBatch(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y, 3)

    def meta_gradient(engine: str, statistics: str, first_order: bool) -> list[torch.Tensor]:
        adapter = Adapter(
            model, torch.nn.functional.cross_entropy, step_size=0.4, engine=engine, threads=1,
            first_order=first_order, query_statistics=statistics,
        )  # fmt: skip
        for p in adapter.parameters():
            p.grad = None
        adapter.meta_gradient(batch, steps=2)
        return [p.grad.clone() for p in model.parameters()]

    for first_order in (False, True):
        batched = meta_gradient("batched", "support", first_order)
        loop = meta_gradient("loop", "support", first_order)
        scale = max(g.abs().max() for g in loop)
        for a, b in zip(batched, loop, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)
        transductive = meta_gradient("loop", "query", first_order)
        assert (
            max((a - b).abs().max() for a, b in zip(loop, transductive, strict=True)) > 1e-3 * scale
        )


def test_protonet_embedding_support_and_query_in_one_batch_is_transductive(registry):
    """ProtoNet embeds an episode's support and query in one forward pass: with batch
    statistics each query's embedding depends on the other queries (transductive, measured);
    with running statistics it does not (inductive)."""
    batch = set_up(registry, "protonet")
    assert depends_on_other_queries(batch[0])
    batch_card = card(registry, "protonet", built=batch)
    assert batch_card["transductive"] is True
    assert batch_card["batch_norm_at_test"] == "batch statistics of support and query together"
    running = set_up(registry, "protonet", batch_norm="running")
    assert not depends_on_other_queries(running[0])
    running_card = card(registry, "protonet", batch_norm="running", built=running)
    assert running_card["transductive"] is False
    assert running_card["batch_norm_at_test"] == "running statistics (eval mode)"


# The other built-in classifiers (maml and protonet above), and whether each is transductive on
# a backbone normalising with batch statistics: everything that embeds support and query in
# one pass, or forwards the query set as one batch, is.
CLASSIFIERS = [
    ("fomaml", {}, True), ("anil", {}, True), ("boil", {}, True), ("metasgd", {}, True),
    ("mamlpp", {}, True), ("protomaml", {}, True),
    ("protomaml", {"eval_batch_norm": "inductive"}, False),
    ("reptile", {"eval_inner_steps": 2}, False),
    ("reptile", {"eval_inner_steps": 2, "transductive": True}, True),
    ("matchingnet", {"fce": True}, True), ("relationnet", {}, True), ("r2d2", {}, True),
    ("finetune", {"finetune_steps": 3}, True), ("meta_baseline", {}, True), ("rfs", {}, True),
    # Frozen features (no training data here: transforms that need no base-class mean).
    ("simpleshot", {"transform": "L2N"}, True), ("logistic_probe", {}, True),
    ("knn", {"transform": "L2N", "k": 3}, True), ("finetune_pmf", {"steps": 2}, True),
    ("tim", {"tim_iterations": 5}, True), ("pt_map", {"epochs": 3}, True),
    ("laplacianshot", {"transform": "L2N"}, True), ("bd_cspn", {}, True),
    ("feat", {}, True), ("metaoptnet_svm", {"solver_iterations": 5}, True),
]  # fmt: skip
# Transductive by their algorithm: with running statistics too.
ALGORITHMIC = {"tim", "pt_map", "laplacianshot", "bd_cspn"}
# Inductive with running statistics: each query predicted from the support set and itself.
RUNNING_INDUCTIVE = {
    "simpleshot",
    "logistic_probe",
    "knn",
    "finetune_pmf",
    "feat",
    "metaoptnet_svm",
}


@pytest.mark.parametrize(("learner", "params", "transductive"), CLASSIFIERS)
def test_every_builtin_learner_s_card_is_what_its_predictions_do(
    registry, learner, params, transductive
):
    """Each built-in classifier's card says transductive exactly when perturbing one query
    moves the other queries' predictions: with batch statistics, and with running statistics
    where the learner stays transductive even so (Relation Networks' relation module keeps
    no running statistics; Reptile predicts in training mode)."""
    if learner == "rfs":
        pytest.importorskip("sklearn")
    modes = {"batch": transductive}
    if learner == "relationnet" or params.get("transductive") or learner in ALGORITHMIC:
        modes["running"] = True
    elif learner in RUNNING_INDUCTIVE:
        modes["running"] = False
    for mode, expected in modes.items():
        # 4 filters: with 2, the untrained relation network's running-statistics features are
        # all zero (dead ReLUs) and nothing could move.
        frozen = mode == "running" and learner in ALGORITHMIC | RUNNING_INDUCTIVE
        # 16 filters for frozen features: with 4, most are dead and the rest point one way.
        built = set_up(registry, learner, params, mode, hidden=16 if frozen else 4)
        if frozen:
            calibrate(built[0].features)
        assert depends_on_other_queries(built[0]) is expected, mode
        assert card(registry, learner, params, mode, built=built)["transductive"] is expected


def test_a_changed_test_time_step_count_changes_the_card(registry):
    """The test-time steps are part of the setting: 3 and 5 give two cards, and what differs
    between them is said in words."""
    from fewbench.reports.protocol import differences

    three = card(registry, "maml", {"eval_inner_steps": 3})
    five = card(registry, "maml", {"eval_inner_steps": 5})
    assert three["adaptation"]["steps"] == 3 and five["adaptation"]["steps"] == 5
    assert differences(three, five) == ["test-time adaptation steps: 3 vs 5"]
    assert card(registry, "finetune", {"finetune_steps": 7})["adaptation"]["steps"] == 7
    assert card(registry, "protonet")["adaptation"]["steps"] is None


def test_the_card_holds_the_setting_s_other_fields(registry):
    """Dataset parameters and augmentation, backbone size (without a head), parameters
    trained, training seen, test episodes and queries, model selection, external data,
    ensembling: each from what ran."""
    maml = card(registry, "maml", {"meta_batch_size": 4})
    assert maml["dataset"] == {"name": "toy", "augmentation": "none"}
    assert maml["backbone"]["name"] == "conv4" and maml["backbone"]["hidden"] == 2
    # Conv-4 with 2 filters on one channel: (1*9+1)*2 + 2*2, then three of (2*9+1)*2 + 2*2.
    assert maml["backbone"]["parameters"] == 24 + 3 * 42
    assert maml["learner"]["parameters"] == 24 + 3 * 42 + 2 * 3 + 3  # the head, 2 -> 3
    assert maml["training"] == {"steps": 4, "episodes": 16}
    assert maml["test"] == {"episodes": 600, "ways": 5, "shots": 1, "queries_per_class": 15}
    assert maml["model_selection"] == {
        "by": "the validation split of toy", "episodes": 100, "every": 500, "kept_step": 2,
    }  # fmt: skip
    assert (maml["external_data"], maml["ensemble"]) == ("none", "none")
    finetune = card(registry, "finetune", {"batch_size": 8})
    assert finetune["training"] == {"steps": 4, "examples": 32}


def test_every_builtin_learner_and_dataset_gives_a_card_from_a_configuration(registry):
    """Cards for results stored before cards (the ledger's exports) come from the stored
    configuration: every built-in learner gives one, transductive or not, on every built-in
    dataset of its task type; the RL learners are inductive with their test-time steps."""
    from fewbench.plugin.task_types import task_type_of
    from fewbench.running.protocol import DERIVED, card_of_config

    for dataset in registry.items("dataset"):
        task_type = task_type_of(dataset.cls.task_type).name
        backbone = {"name": "conv4"} if task_type == "classification" else {"name": "mlp"}
        for learner in registry.items("learner"):
            if task_type not in learner.cls.task_types:
                continue
            if learner.name == "relationnet" and backbone["name"] != "conv4":
                continue
            config = {
                "dataset": {"name": dataset.name}, "backbone": backbone,
                "learner": {"name": learner.name}, "tasks": {"ways": 5, "shots": 1},
                "train": {"val_episodes": 10}, "eval": {"episodes": 40, "query": 15}, "seed": 0,
            }  # fmt: skip
            derived = card_of_config(config, iterations=100, registry=registry)
            assert derived is not None, (dataset.name, learner.name)
            assert derived["recorded"] == DERIVED
            assert isinstance(derived["transductive"], bool), (dataset.name, learner.name)
            assert derived["dataset"]["name"] == dataset.name
            if task_type == "reinforcement":
                assert derived["transductive"] is False and derived["test"] == {"tasks": 40}
                assert derived["adaptation"]["steps"] == 3


# -- stored, shown, exported ----------------------------------------------------------------------
SINUSOID = """\
name: cards
seeds: [0]
datasets: [{name: sinusoid}]
tasks: {ways: 1, shots: 5, query: 5}
backbones: [{name: mlp, hidden: [8]}]
learners:
  - {name: maml, inner_lr: 0.01, meta_batch_size: 2}
train: {iterations: 4, validate_every: 2, val_episodes: 2}
eval: {episodes: 3, query: 5, seed: 0}
"""


def test_a_finished_cell_stores_its_card_and_status_report_and_exports_show_it(tmp_path, capsys):
    """The worker derives the card when the cell finishes and stores it with the result;
    ``status`` shows the setting (and ``--protocol`` the card), ``report --protocol`` prints
    it, CSV and JSON carry it, and so does the model file that ``fewbench export`` copies."""
    import fewbench
    from fewbench.cli.parser import main

    suite = tmp_path / "cards.yaml"
    suite.write_text(SINUSOID)
    run = fewbench.run(suite, out=tmp_path / "run", data_root=tmp_path, device="cpu", quiet=True)
    store = ResultsStore.open_run(run, readonly=True)
    (cell,) = store.cells()
    stored = store.protocol(cell["id"])
    store.close()
    assert stored["transductive"] is False and stored["training"] == {"steps": 4, "episodes": 8}
    assert stored["backbone"]["parameters"] == 16 and stored["adaptation"]["steps"] == 3
    assert torch.load(run / "checkpoints" / cell["id"] / "best.pt")["protocol"] == stored

    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert status.splitlines()[0].split()[-1] == "protocol" and "inductive" in status
    assert main(["status", str(run), "--protocol"]) == 0
    assert "batch norm at test: none (the networks have no batch norm)" in capsys.readouterr().out
    assert main(["report", str(run), "--protocol"]) == 0
    report = capsys.readouterr().out
    assert "Protocol cards:" in report and "test-time adaptation: every parameter" in report
    assert "Every entry is inductive" in report
    assert main(["report", str(run), "--format", "json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["entries"]
    assert entry["protocol"] == stored and entry["transductive"] is False
    assert main(["report", str(run), "--format", "csv"]) == 0
    assert "transductive,protocol" in capsys.readouterr().out.splitlines()[0]


def test_a_cluster_task_s_card_reaches_the_store(tmp_path):
    """A cluster task reports to its cell folder: its card travels in result.json and is
    collected into the store with the result."""
    from fewbench.storage.journal import CellJournal, collect, write_cell

    cell = make_cell("maml")
    store = ResultsStore.open_run(tmp_path)
    store.add_cells([cell])
    store.close()
    write_cell(tmp_path, cell)
    journal = CellJournal(tmp_path, cell.id, "node:1")
    journal.start(host="node")
    journal.complete(result(cell, [0.5, 0.6], {"format": 1, "transductive": True}))
    collect(tmp_path)
    store = ResultsStore.open_run(tmp_path, readonly=True)
    assert store.protocol(cell.id) == {"format": 1, "transductive": True}
    store.close()


def test_a_store_written_before_cards_still_reads(tmp_path):
    """A read-only store without the protocols table (written before it existed): reports
    and status read it, and its cells' cards are "not recorded", never an error."""
    from fewbench.reports.protocol import kind
    from fewbench.reports.results import load_runs
    from fewbench.reports.status import render_status
    from fewbench.reports.table import render

    run = stored_run(tmp_path / "old", [(make_cell("maml"), [0.5, 0.7], None)])
    db = sqlite3.connect(run / "results.sqlite")
    db.execute("DROP TABLE protocols")
    db.commit()
    db.close()
    (run / "results.sqlite").chmod(0o444)
    run.chmod(0o555)
    try:
        store = ResultsStore.open_run(run, readonly=True)
        assert store.protocol(make_cell("maml").id) is None
        store.close()
        (setting,) = load_runs([run]).settings
        assert setting.protocol is None and kind(setting.protocol) == "not recorded"
        text = render([run])
        assert "protocol" not in text.splitlines()[0] and "Every entry" not in text
        assert "protocol" not in render_status(run).splitlines()[0]
    finally:
        run.chmod(0o755)


# -- item 2: reports keep settings apart -----------------------------------------------------------
def result(cell: Cell, values: list[float], protocol: dict[str, Any] | None) -> CellResult:
    return CellResult(
        metric="accuracy", values=values, mean=sum(values) / len(values), ci95=0.0,
        curve=[(1, 1.0, 0.5)], iterations=2, best_iteration=2, best_val=0.5,
        engine="test engine", train_seconds=1.0, eval_seconds=1.0, protocol=protocol,
    )  # fmt: skip


def stored_run(path: Path, cells: list[tuple[Cell, list[float], dict | None]]) -> Path:
    """A run directory whose cells finished with ``values`` and ``card`` (None: none)."""
    path.mkdir(parents=True)
    store = ResultsStore.open_run(path)
    store.set_meta("suite", "name: toy\n")
    store.set_meta("environment", {"torch": "test", "device": "cpu"})
    store.add_cells([c for c, _, _ in cells])
    for c, values, protocol in cells:
        store.complete(c.id, result(c, values, protocol))
    store.close()
    return path


def mixed_run(registry: Registry, path: Path) -> Path:
    """MAML transductive (best by far), MAML inductive, ProtoNet with running statistics
    (inductive) and a cell stored without a card, on the same 40 episodes."""
    g = torch.Generator().manual_seed(0)

    def values(mean: float) -> list[float]:
        return (mean + 0.05 * torch.randn(40, generator=g)).clamp(0, 1).tolist()

    inductive = {"eval_batch_norm": "inductive"}
    return stored_run(
        path,
        [
            (make_cell("maml"), values(0.9), card(registry, "maml")),
            (make_cell("maml", params=inductive), values(0.7), card(registry, "maml", inductive)),
            (make_cell("protonet"), values(0.6), card(registry, "protonet", batch_norm="running")),
            (make_cell("matchingnet"), values(0.5), None),
        ],
    )


def test_a_table_mixing_inductive_and_transductive_keeps_them_in_blocks(registry, tmp_path):
    """Inductive entries first, then transductive, then those without a card, each row
    marked in a protocol column; the best is judged within a block, so the inductive block
    has its own best though the transductive MAML is higher. Every format keeps the marks."""
    from fewbench.reports.table import Options, render

    run = mixed_run(registry, tmp_path / "run")
    lines = render([run], "table", Options(ids=True)).splitlines()
    assert lines[0].split()[:3] == ["protocol", "learner", "backbone"]
    rows = [line.split() for line in lines[1:5]]
    assert [(r[0], r[1]) for r in rows] == [
        ("inductive", "maml[eval_batch_norm=inductive]"),
        ("inductive", "protonet"),
        ("transductive", "maml"),
        ("not", "recorded"),
    ]
    assert rows[0][-1] == "*" and rows[2][-1] == "*" and lines[4].endswith("*")
    assert "kept apart, a block each" in "\n".join(lines)
    records = json.loads(render([run], "json", Options(ids=True)))["entries"]
    shown = {r["learner"]: (r["transductive"], r["best"]) for r in records}
    assert shown == {
        "maml": (True, True),
        "maml[eval_batch_norm=inductive]": (False, True),
        "protonet": (False, False),
        "matchingnet": (None, True),
    }
    assert render([run], "markdown").splitlines()[0].startswith("| protocol | learner |")
    assert r"Protocol & Learner & Backbone" in render([run], "latex")


def test_compare_says_what_differs_before_the_p_values(registry, tmp_path):
    """Every pair of cells with different cards is named with what differs, above the table
    of p-values, and marked in a protocol column; CSV and JSON list the differences."""
    from fewbench.reports.compare import compare_all_pairs, render_comparison
    from fewbench.reports.results import load_runs

    run = mixed_run(registry, tmp_path / "run")
    records = compare_all_pairs(load_runs([run]))
    text = render_comparison(records, "table")
    before = text[: text.index("p (paired t)")]
    assert before.startswith("Protocols differ")
    assert "maml minus maml[eval_batch_norm=inductive] (toy 5-way 1-shot conv4):" in before
    assert "transductive: yes vs no" in before
    assert "batch norm at test: batch statistics of the query set vs batch statistics of the " \
        "support set only" in before  # fmt: skip
    assert "no protocol card recorded for matchingnet" in before
    header = next(line for line in text.splitlines() if "p (paired t)" in line)
    assert header.index("protocol") < header.index("p (paired t)")
    pair = next(r for r in records if r["baseline"] == "protonet" and r["learner"] == "maml")
    assert "transductive: yes vs no" in pair["protocol_differs"]
    csv = render_comparison(records, "csv").splitlines()
    assert "protocol_differs" in csv[0] and "transductive: yes vs no" in csv[1]


def test_compare_of_cells_with_the_same_card_says_so(registry, tmp_path):
    """Two seeds-apart runs of one protocol: nothing differs, the column says same."""
    from fewbench.reports.compare import compare_all_pairs, render_comparison
    from fewbench.reports.results import load_runs

    same = card(registry, "maml")
    run = stored_run(
        tmp_path / "run",
        [
            (make_cell("maml"), [0.5, 0.6, 0.7], same),
            (make_cell("maml", params={"inner_lr": 0.1}), [0.4, 0.6, 0.6], dict(same)),
            (
                make_cell("fomaml"),
                [0.4, 0.5, 0.6],
                card(registry, "fomaml", {"eval_inner_steps": 1}),
            ),
        ],
    )
    records = compare_all_pairs(load_runs([run]))
    assert records[0]["protocol_differs"] == []
    assert records[1]["protocol_differs"] == ["test-time adaptation steps: 3 vs 1"]
    text = render_comparison(records, "table")
    assert " same " in text and " differs " in text


# -- the reproduction ledger -----------------------------------------------------------------------
def test_the_ledger_shows_each_row_s_setting(tmp_path, registry):
    """The committed exports have no card: theirs is derived from their stored configuration
    and says so (ProtoNet with running statistics inductive; Relation and Matching Networks
    with batch statistics transductive). A new export carries the card stored with its cell."""
    from fewbench.reports import ledger
    from fewbench.running.protocol import DERIVED, RECORDED

    measured = ledger.load(REPO / "reproduction")
    kinds = {m.config["learner"]["name"]: m.protocol["transductive"] for m in measured}
    assert kinds == {
        "maml_trpo": False,
        "protonet": False,
        "relationnet": True,
        "matchingnet": True,
    }
    # Exports written before cells stored cards derive theirs; a later export carries its own.
    recorded = {m.path.name: m.protocol["recorded"] for m in measured}
    assert recorded["omniglot_5w1s_conv4_protonet_seed0.json"] == DERIVED
    assert recorded["omniglot_20w1s_conv4_matchingnet_seed0.json"] == RECORDED
    assert set(recorded.values()) == {DERIVED, RECORDED}
    page = ledger.render(measured, "reproduction")
    assert "| Method | Paper, table | Setting | Protocol |" in page
    assert "| inductive; batch norm at test: running statistics (eval mode); derived |" in page

    export = json.loads(
        next((REPO / "reproduction" / "snell2017-omniglot").glob("*.json")).read_text()
    )
    cell = Cell.from_config(export["cell"]["config"], export["cell"]["label"])
    stored = {**card(registry, "protonet", batch_norm="running"), "note": "stored"}
    run = stored_run(tmp_path / "run", [(cell, [0.9, 1.0, 0.8], stored)])
    store = ResultsStore.open_run(run)
    store.set_meta("suite", (REPO / "suites/reproduce/snell2017-omniglot.yaml").read_text())
    store.close()
    (written,) = ledger.export_run(run, tmp_path / "ledger")
    assert json.loads(written.read_text())["protocol"] == stored
    (again,) = ledger.load(tmp_path / "ledger")
    assert again.protocol == stored


def test_the_maml_option_keeps_cell_ids_and_refuses_the_higher_reference(registry):
    """``eval_batch_norm`` was added later: a MAML cell that leaves it at its default keeps its
    id (its configuration does not record it); ``inductive`` is recorded, and refused with
    ``engine: higher``, the reference of Finn et al.'s transductive MAML."""
    from fewbench.plugin.params import ParamSet

    maml = registry.get("learner", "maml").cls
    assert "eval_batch_norm" not in ParamSet.of(maml).defaults_in_cells()
    assert maml.params["eval_batch_norm"].default == "transductive"
    with pytest.raises(FewbenchError, match="engine: higher"):
        maml(engine="higher", eval_batch_norm="inductive").check()
    maml(engine="loop", eval_batch_norm="inductive").check()


def test_entries_differing_only_in_a_parameter_added_later_get_labels_of_their_own(
    registry, tmp_path
):
    """Two MAML entries differing only in ``eval_batch_norm`` (and two Conv-4s differing only
    in ``batch_norm``, also added later) are two settings: each gets its own label, so the
    reports never merge an inductive and a transductive cell as if they were seeds."""
    from fewbench.data.check import expand_and_check
    from fewbench.suite.loading import load_suite_file

    suite = tmp_path / "labels.yaml"
    suite.write_text(
        "name: labels\nseeds: [0]\ndatasets: [{name: omniglot}]\ntasks: {ways: 5, shots: 1}\n"
        "backbones: [{name: conv4}, {name: conv4, batch_norm: running}]\n"
        "learners: [{name: maml}, {name: maml, eval_batch_norm: inductive}]\n"
    )
    cells = expand_and_check(load_suite_file(suite), registry, tmp_path, require_data=False).cells
    assert sorted({c.labels["learner"] for c in cells}) == [
        "maml[eval_batch_norm=inductive]",
        "maml[eval_batch_norm=transductive]",
    ]
    assert sorted({c.labels["backbone"] for c in cells}) == [
        "conv4[batch_norm=batch]",
        "conv4[batch_norm=running]",
    ]
    default = next(c for c in cells if c.labels["learner"].endswith("transductive]"))
    assert "eval_batch_norm" not in default.config["learner"]  # its id is as before
