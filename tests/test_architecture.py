"""The architecture's promises: one worker path from a stored cell to a stored result,
a sealed plugin boundary, typed cells and task types."""

from __future__ import annotations

import ast
import json
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import REPO, run_cli

from fewbench.plugin.task_types import (
    CLASSIFICATION,
    REGRESSION,
    REINFORCEMENT,
    by_metric,
    task_type_of,
)
from fewbench.registry import Registry
from fewbench.suite.cell import EvalSettings, Tasks, TrainSettings, cell_id
from fewbench.suite.check import check_suite
from fewbench.suite.grid import expand_grid
from fewbench.suite.loading import EVAL, TASKS, TRAIN, parse_yaml

HERE = Path(__file__).resolve().parent

# What a plugin may import from the core (docs/plugins.md): the one namespace of contracts,
# and the mathematics learners share.
PLUGIN_NAMESPACE = "fewbench.plugin"
SHARED_MATHEMATICS = {
    "fewbench.methods.adaptation", "fewbench.methods.cuda_graphs", "fewbench.methods.policy_gradient",
    "fewbench.methods.feature_heads", "fewbench.methods.transductive", "fewbench.methods.svm",
    "fewbench.methods.finetuning",
}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports in functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def plugin_files() -> list[Path]:
    return sorted((REPO / "fewbench_plugins").rglob("*.py")) + [
        HERE / "thirdparty" / "fewbench_demo_plugin.py",
        HERE / "thirdparty" / "fewbench_counting_plugin.py",
        *sorted((REPO / "examples").glob("*/**/*.py")),  # example packages, not scripts
    ]


def test_plugins_import_only_the_plugin_namespace_and_the_shared_mathematics():
    files = plugin_files()
    assert len(files) > 15
    for path in files:
        core = {name for name in imported_modules(path) if name.split(".")[0] == "fewbench"}
        allowed = {PLUGIN_NAMESPACE} | SHARED_MATHEMATICS
        assert core <= allowed, f"{path}: imports {sorted(core - allowed)}"


def test_a_mutant_plugin_import_is_caught(tmp_path):
    """The check above sees a deep import, lazy or not (so it can fail)."""
    mutant = tmp_path / "mutant.py"
    mutant.write_text("def f():\n    from fewbench.running.worker import follow\n")
    assert "fewbench.running.worker" in imported_modules(mutant)


def module_graph(root: Path) -> dict[str, set[str]]:
    """fewbench's modules and the fewbench modules each imports, at any depth (function-level
    imports included), leaving out imports under ``if TYPE_CHECKING:`` (they never run) and
    in a module's ``__getattr__`` (they run when a name is asked for, not while importing)."""
    paths = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in paths.items():
        found = imports_in(ast.parse(path.read_text()), set(paths))
        # Importing fewbench.a.b runs fewbench/__init__ and fewbench/a/__init__ first.
        found |= {parent for module in found for parent in parents(module)}
        graph[name] = {module for module in found if module in paths and module != name}
    return graph


def parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def imports_in(node: ast.AST, modules: set[str]) -> set[str]:
    found: set[str] = set()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef) and child.name == "__getattr__":
            continue  # a package's names loaded on first use (PEP 562), never while importing
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            found |= imports_in(ast.Module(body=child.orelse, type_ignores=[]), modules)
        elif isinstance(child, ast.Import):
            found.update(alias.name for alias in child.names)
        elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
            # `from fewbench.x import y` depends on fewbench.x.y when that is a module
            subs = [f"{child.module}.{alias.name}" for alias in child.names]
            found.update(sub for sub in subs if sub in modules)
            if not all(sub in modules for sub in subs):
                found.add(child.module)
        else:
            found |= imports_in(child, modules)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def test_no_import_cycle_among_fewbench_modules():
    graph = module_graph(REPO / "fewbench")
    assert len(graph) > 60
    assert import_cycles(graph) == []


def test_no_cycle_through_a_package_that_loads_its_modules_up_front(tmp_path):
    """A package whose __init__ imports a module that imports back into the package is a
    cycle at run time (Python runs a package's __init__ before any of its modules)."""
    package = tmp_path / "fewbench" / "plugin"
    package.mkdir(parents=True)
    (tmp_path / "fewbench" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from fewbench.methods import graphs\n")
    (package / "dataset.py").write_text("")
    (tmp_path / "fewbench" / "methods.py").write_text("")
    (tmp_path / "fewbench" / "graphs.py").write_text("from fewbench.plugin.dataset import x\n")
    (package / "__init__.py").write_text("from fewbench.graphs import y\n")
    assert import_cycles(module_graph(tmp_path / "fewbench")) == [
        ["fewbench.graphs", "fewbench.plugin"]
    ]


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_the_worst_old_edges_stay_cut():
    """The edges that held the old 15-module loop together (issue 28)."""
    graph = module_graph(REPO / "fewbench")
    assert "fewbench.api" not in graph["fewbench.running.worker"]
    assert "fewbench.data.check" not in graph["fewbench.suite.grid"]
    assert not any(m.startswith("fewbench.running") for m in graph["fewbench.reports.table"])
    assert "fewbench.suite.loading" not in graph["fewbench.suite.search"]
    assert "fewbench.plugin.executor" not in graph["fewbench.plugin.hookspecs"]


def code_without_docstrings(path: Path) -> str:
    """A module's code as Python reads it: no comments, no docstrings (examples in prose
    may name a plugin's parameters)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def test_the_core_names_no_executor_or_learner_parameter():
    """The core's parser, status and failure messages know no plugin's parameters."""
    for path in (REPO / "fewbench").rglob("*.py"):
        assert "fewbench_plugins" not in path.read_text(), path
        text = code_without_docstrings(path)
        for word in ("--partition", "--gpus-per-cell", "slurm_job", "ray_node", "meta_batch_size"):
            assert word not in text, f"{path} names {word}"


def test_plugin_folders_show_their_kinds():
    kinds = {
        p.name
        for p in (REPO / "fewbench_plugins").iterdir()
        if p.is_dir() and p.name != "__pycache__"
    }
    assert kinds == {"datasets", "backbones", "learners", "executors", "loggers", "environments"}
    entry_points = (REPO / "pyproject.toml").read_text()
    for kind in kinds:
        for module in (REPO / "fewbench_plugins" / kind).glob("*.py"):
            text = module.read_text()
            if "@hookimpl" in text:
                assert f'"fewbench_plugins.{kind}.{module.stem}"' in entry_points, module


def test_cell_sections_are_the_suite_schema_and_cells_round_trip(registry):
    assert list(TASKS) == list(Tasks.__dataclass_fields__)
    assert list(TRAIN) == list(TrainSettings.__dataclass_fields__)
    assert list(EVAL) == list(EvalSettings.__dataclass_fields__)
    source = parse_yaml(
        "name: t\ndatasets: [sinusoid]\ntasks: {ways: 1, shots: [5, 10]}\n"
        "backbones: [{name: mlp, hidden: [8]}]\nlearners: [maml, finetune]\n",
        "t.yaml",
    )
    cells = expand_grid(check_suite(source, registry)).cells
    assert len(cells) == 4
    for cell in cells:
        again = type(cell).from_record(json.loads(json.dumps(cell.to_record())))
        assert again == cell and again.id == cell.id == cell_id(cell.config)
        assert isinstance(cell.train, TrainSettings) and cell.tasks.shots in (5, 10)
        assert cell.learner.label == cell.labels["learner"]


def test_task_types_decide_loss_metric_direction_and_format():
    import torch

    assert (
        task_type_of("regression") is REGRESSION and task_type_of(CLASSIFICATION) is CLASSIFICATION
    )
    assert CLASSIFICATION.better(0.9, 0.8) and not REGRESSION.better(0.9, 0.8)
    assert by_metric("mse") is REGRESSION and by_metric(None) is CLASSIFICATION
    assert CLASSIFICATION.format(0.96634) == "96.63%" and REGRESSION.format(0.13251) == "0.1325"
    assert CLASSIFICATION.describe(0.5, 0.01) == "50.00 ± 1.00% accuracy"
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])  # one episode, 3 queries
    labels = torch.tensor([[0, 1, 1]])
    assert CLASSIFICATION.episode_metric(logits, labels).tolist() == pytest.approx([2 / 3])
    values = torch.tensor([[[1.0], [3.0]]])
    assert REGRESSION.episode_metric(values, torch.zeros(1, 2, 1)).tolist() == [5.0]
    assert REGRESSION.loss(values, torch.zeros(1, 2, 1)).item() == 5.0
    # Reinforcement learning: outputs are returns after 0..S steps; the metric is after one.
    returns = torch.tensor([[-40.0, -12.0, -3.0, -3.5], [-30.0, -10.0, -4.0, -2.0]])
    assert task_type_of("reinforcement") is REINFORCEMENT and REINFORCEMENT.higher_is_better
    assert REINFORCEMENT.episode_metric(returns, None).tolist() == [-12.0, -10.0]
    assert REINFORCEMENT.episode_metric(returns[:, :1], None).tolist() == [-40.0, -30.0]
    extras = REINFORCEMENT.episode_extras(returns)
    assert list(extras) == [f"return_after_{k}_steps" for k in range(4)]
    assert extras["return_after_3_steps"].tolist() == [-3.5, -2.0]
    assert REINFORCEMENT.format(-11.684) == "-11.68" and not REINFORCEMENT.has_ways
    with pytest.raises(Exception, match="unknown task type 'ranking'"):
        task_type_of("ranking")


SINUSOID = """\
name: worker-path
datasets: [sinusoid]
tasks: {ways: 1, shots: 5, query: 5}
backbones: [{name: mlp, hidden: [8]}]
learners:
  - {name: maml, inner_lr: 0.01, meta_batch_size: 2}
  - {name: finetune, batch_size: 20}
train: {iterations: 6, validate_every: 3, val_episodes: 2, log_every: 2}
eval: {episodes: 4, query: 5}
"""


def stored_cells(run_dir: Path) -> list[tuple[str, str, int]]:
    db = sqlite3.connect(run_dir / "results.sqlite")
    rows = db.execute("SELECT id, status, completions FROM cells ORDER BY rowid").fetchall()
    db.close()
    return rows


def test_a_worker_runs_stored_cells_by_id_without_the_suite_file(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SINUSOID)
    out = tmp_path / "run"
    # The driver's steps up to the hand-off: expand once, store every cell.
    from fewbench.registry import Registry
    from fewbench.running.runner import RunRequest, load, prepare_run_dir

    registry = Registry()
    grid, _ = load(RunRequest(suite=suite, data_root=tmp_path, cache_dir=tmp_path), registry)
    import torch

    prepare_run_dir(out, grid, registry, torch.device("cpu"))
    suite.unlink()
    (out / "suite.yaml").unlink()  # no suite anywhere: the worker reads the stored cells
    settings = {"data_root": str(tmp_path), "cache_dir": str(tmp_path / "cache"),
                "device": "cpu", "threads": 1}  # fmt: skip
    first, second = [cell.id for cell in grid.cells]

    # A cluster task: the driver wrote the cell to its folder when it queued it.
    from fewbench.plugin.executor import RunDir, run_cell_task
    from fewbench.running.worker import WorkerSettings

    with RunDir(out, WorkerSettings.from_dict(settings)) as run:
        run.queue([second], "test task")
    assert run_cell_task(str(out), second, settings)["status"] == "done"
    assert json.loads((out / "cells" / second / "result.json").read_text())["metric"] == "mse"

    # A local worker process: claims what is left in the store.
    worker = subprocess.run(
        [sys.executable, "-m", "fewbench.running.worker", str(out), json.dumps(settings)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr
    assert "sinusoid/1w5s/mlp/maml/seed0" in worker.stderr and "MSE" in worker.stderr
    rows = dict((i, (s, c)) for i, s, c in stored_cells(out))
    assert rows[first] == ("done", 1)
    assert rows[second][0] == "queued"  # the task reported to its folder, not the store
    assert "collected 1 finished" in run_cli("collect", str(out)).stdout
    assert dict((i, s) for i, s, _ in stored_cells(out)) == {first: "done", second: "done"}


def install_counting_plugin(site: Path) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "thirdparty" / "fewbench_counting_plugin.py", site)
    info = site / "fewbench_counting_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: counting\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fewbench]\ncounting = fewbench_counting_plugin\n")
    return site


def test_local_executor_workers_do_not_expand_the_grid(tmp_path):
    """The driver checks the data once per dataset configuration; each worker process only
    loads the data of the cells it runs, and none of them checks or expands the suite."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: counted\ndatasets: [{name: counted, variant: [0, 1]}]\n"
        "tasks: {ways: 2, shots: 1, query: 1}\nbackbones: [{name: mlp, hidden: [4]}]\n"
        "learners: [{name: finetune, batch_size: 8}]\nseeds: [0, 1]\n"
        "train: {iterations: 2, validate_every: 2, val_episodes: 1}\neval: {episodes: 2, query: 1}\n"
    )
    counts = tmp_path / "counts.txt"
    env = {
        "PYTHONPATH": str(install_counting_plugin(tmp_path / "site")),
        "FEWBENCH_COUNT_FILE": str(counts),
        "FEWBENCH_CACHE": str(tmp_path / "cache"),
    }
    result = run_cli(
        "run", str(suite), "--out", str(tmp_path / "run"), "--data-root", str(tmp_path),
        "--workers", "2", "--executor-set", "progress_every=0.5", "--no-progress",
        "--device", "cpu", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [s for _, s, _ in stored_cells(tmp_path / "run")] == ["done"] * 4
    events = [line.split() for line in counts.read_text().splitlines()]
    checks = Counter(pid for pid, event in events if event == "split_sizes")
    loads = Counter(pid for pid, event in events if event == "load")
    assert len(checks) == 1 and sum(checks.values()) == 2  # the driver: once per variant
    (driver,) = checks
    assert driver not in loads  # the driver trains nothing
    assert 1 <= len(loads) <= 2  # the worker processes
    assert all(n <= 2 for n in loads.values())  # at most one load per variant per worker


def test_registry_collects_executor_options_and_refuses_a_conflict():
    from fewbench.plugin.executor import ExecutorOption
    from fewbench.plugin.hookspecs import hookimpl

    registry = Registry()
    assert registry.executor_options["--gpus-per-cell"].param == "gpus_per_cell"
    assert {"--workers", "--partition", "--address", "--wait"} <= set(registry.executor_options)

    class Clash:
        @hookimpl
        def fewbench_add_executor_options(self, add_option):
            add_option(ExecutorOption("--workers", "processes"))

    with pytest.raises(Exception, match="--workers for the executor parameter 'processes'"):
        Registry([Clash()])
