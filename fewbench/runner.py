"""Runs every cell of a suite into a run directory, containing each cell's failures."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml

from fewbench import environment
from fewbench.cache import save_atomically
from fewbench.data import EpisodeSource, derive_seed
from fewbench.errors import FewbenchError
from fewbench.evaluation import EpisodeSpec, dataset_identity, evaluate
from fewbench.faults import crash_point
from fewbench.grid import Cell, Suite
from fewbench.heartbeat import Heartbeat, interval_for
from fewbench.journal import collect
from fewbench.learner import LearnerContext
from fewbench.registry import Registry
from fewbench.stats import mean_ci95
from fewbench.store import ResultsStore
from fewbench.training import Interrupted, train


@dataclass
class RunSummary:
    run_dir: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    interrupted: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FewbenchError(
            f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise FewbenchError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None


class DatasetCache:
    """Loads each distinct dataset configuration once per run and keeps it on the device."""

    def __init__(self, registry: Registry, data_root: Path, cache_dir: Path, device: torch.device):
        self.registry, self.data_root, self.cache_dir, self.device = (
            registry,
            data_root,
            cache_dir,
            device,
        )
        self._loaded: dict[str, tuple[Any, dict[str, EpisodeSource]]] = {}

    def get(self, config: dict[str, Any]) -> tuple[Any, dict[str, EpisodeSource]]:
        key = json.dumps(config, sort_keys=True)
        if key not in self._loaded:
            params = {k: v for k, v in config.items() if k != "name"}
            dataset = self.registry.get("dataset", config["name"]).build(**params)
            sources = dataset.load(self.data_root, self.cache_dir)
            self._loaded[key] = (
                dataset,
                {split: s.to(self.device) for split, s in sources.items()},
            )
        return self._loaded[key]


def prepare_run_dir(
    run_dir: Path, suite: Suite, suite_text: str, registry: Registry, device: torch.device
) -> ResultsStore:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "suite.yaml").write_text(suite_text, encoding="utf-8")
    env = environment.collect(device, registry)
    (run_dir / "environment.json").write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
    store = ResultsStore.open_run(run_dir)
    store.set_meta("suite", suite_text)
    store.set_meta("suite_name", suite.name)
    store.set_meta("environment", env)
    store.add_suite_version(suite_text)  # every version of the suite run into this directory
    store.add_cells(suite.cells)
    collect(run_dir, store)  # what cluster workers finished since the last driver looked
    return store


@dataclass
class CellSetup:
    """A cell's learner, set up and seeded, with its data: what training starts from."""

    learner: Any
    sources: dict[str, EpisodeSource]
    task_type: str
    identity: tuple


def set_up_cell(
    cell: Cell, registry: Registry, datasets: DatasetCache, device: torch.device
) -> CellSetup:
    config = cell.config
    dataset, sources = datasets.get(config["dataset"])
    task_type = getattr(dataset, "task_type", "classification")
    identity = dataset_identity(config["dataset"], getattr(dataset, "episode_identity", None))
    backbone_cfg = {k: v for k, v in config["backbone"].items() if k != "name"}
    learner_cfg = {k: v for k, v in config["learner"].items() if k != "name"}
    backbone = registry.get("backbone", config["backbone"]["name"]).build(**backbone_cfg)
    learner = registry.get("learner", config["learner"]["name"]).build(**learner_cfg)
    torch.manual_seed(derive_seed("init", config["seed"]))
    tasks = config["tasks"]
    learner.setup(
        LearnerContext(
            backbone=backbone,
            input_shape=sources["train"].input_shape,
            ways=tasks["ways"],
            shots=tasks["shots"],
            query=tasks["query"],
            num_train_classes=sources["train"].num_classes,
            device=device,
            task_type=task_type,
        )
    )
    return CellSetup(learner, sources, task_type, identity)


def run_cell(
    cell: Cell,
    store: ResultsStore,
    registry: Registry,
    datasets: DatasetCache,
    run_dir: Path,
    device: torch.device,
    progress: bool,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    config = cell.config
    setup = set_up_cell(cell, registry, datasets, device)
    learner, sources, task_type, identity = (
        setup.learner,
        setup.sources,
        setup.task_type,
        setup.identity,
    )
    engine = learner.describe_engine()
    store.mark(cell.id, "running", engine=engine)
    checkpoint_dir = run_dir / "checkpoints" / cell.id
    try:
        outcome = train(
            learner,
            sources,
            cell,
            identity=identity,
            device=device,
            checkpoint_dir=checkpoint_dir,
            task_type=task_type,
            progress=progress,
            on_validate=lambda curve: store.save_curve(cell.id, curve),
            on_resume=getattr(store, "resumed", None),  # cell folders record it; the store not
            stop=stop,
        )
    except Exception as exc:  # keep the curve so far of a cell that fails in training
        if hasattr(exc, "fewbench_curve"):
            store.save_curve(cell.id, exc.fewbench_curve)
        raise
    started = time.perf_counter()
    crash_point("evaluation")
    values = evaluate(
        learner,
        sources["test"],
        EpisodeSpec.of(config, identity, "test"),
        episodes=config["eval"]["episodes"],
        chunk=config["eval"]["chunk"],
        device=device,
        task_type=task_type,
    )
    eval_seconds = time.perf_counter() - started
    estimate = mean_ci95(values)
    keep = config["train"]["keep_checkpoints"]
    if keep != "none":
        save_atomically(learner.state_dict(), checkpoint_dir / "best.pt")
    completed = store.complete(
        cell.id,
        metric="accuracy" if task_type == "classification" else "mse",
        values=values.tolist(),
        mean=estimate.mean,
        ci95=estimate.ci95,
        curve=outcome.curve,
        iterations=outcome.iterations,
        best_iteration=outcome.best_iteration,
        best_val=outcome.best_val,
        engine=learner.describe_engine(),  # now with the choices made at the first batches
        train_seconds=outcome.seconds,
        eval_seconds=eval_seconds,
    )
    if keep == "none":
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    elif keep == "best":
        (checkpoint_dir / "last.pt").unlink(missing_ok=True)
    return {
        "mean": estimate.mean,
        "ci95": estimate.ci95,
        "metric": "accuracy" if task_type == "classification" else "mse",
        "train_seconds": outcome.seconds,
        "eval_seconds": eval_seconds,
        "completed": completed,
    }


@contextlib.contextmanager
def store_beat(db_path: Path, cell_id: str, worker: str) -> Iterator[Callable[[], None]]:
    """The beat of a cell claimed in the results store, on the heartbeat thread's own connection."""
    store = ResultsStore(db_path)
    try:
        yield lambda: store.beat(cell_id, worker)
    finally:
        store.close()


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_is_dead(name: str) -> bool:
    """True for a default-named worker of this host whose process no longer exists,
    so that rerunning after a crash need not wait for its heartbeat to go stale."""
    host, _, pid = name.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    """A process that has exited but not been reaped by its parent is dead too."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def run_suite(
    suite: Suite,
    suite_text: str,
    registry: Registry,
    *,
    run_dir: Path,
    data_root: Path,
    cache_dir: Path,
    device: torch.device,
    log: TextIO,
    progress: bool = True,
    worker: str | None = None,
    stale_after: float = 120.0,
    retry_failed: bool = False,
    stop: threading.Event | None = None,
    announce: Callable[[str | None], object] | None = None,
) -> RunSummary:
    """Run every cell of ``suite`` not already done; a failing cell is recorded and the suite goes on.

    Cells are claimed one at a time in the results store, so several processes on
    one run directory share the work; a cell whose worker stopped beating for
    ``stale_after`` seconds is claimed again and resumes from its checkpoint.
    ``announce`` hears each cell's id before it runs, and None at the end (for the
    other ranks of a data-parallel run, :mod:`fewbench.ranks`).
    """
    created = not run_dir.exists()
    try:
        store = prepare_run_dir(run_dir, suite, suite_text, registry, device)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    worker = worker or default_worker_name()
    stop = stop or threading.Event()
    if retry_failed:
        store.retry_failed()
    datasets = DatasetCache(registry, data_root, cache_dir, device)
    summary = RunSummary(run_dir)
    number_of = {cell.id: number for number, cell in enumerate(suite.cells, start=1)}
    by_id = {cell.id: cell for cell in suite.cells}
    for cell in suite.cells:
        if store.status(cell.id) == "done":
            summary.skipped.append(cell.id)
            print(
                f"[{number_of[cell.id]}/{len(suite.cells)}] {cell.label} ({cell.id}): done in an "
                "earlier run, skipped",
                file=log,
                flush=True,
            )
    try:
        while not stop.is_set():
            claimed = store.claim(worker, list(by_id), stale_after, worker_is_dead)
            if claimed is None:
                # Cells running elsewhere either finish or go stale; stay to take over the latter.
                if store.busy_elsewhere(list(by_id), worker) and not stop.is_set():
                    time.sleep(min(5.0, max(0.2, stale_after / 4)))
                    continue
                break
            cell = by_id[claimed]
            prefix = f"[{number_of[cell.id]}/{len(suite.cells)}] {cell.label} ({cell.id})"
            if announce is not None:
                announce(cell.id)
            try:
                beat = functools.partial(store_beat, store.path, cell.id, worker)
                with Heartbeat(beat, interval_for(stale_after)):
                    result = run_cell(
                        cell, store, registry, datasets, run_dir, device, progress, stop
                    )
            except (KeyboardInterrupt, Interrupted) as exc:
                store.mark(cell.id, "interrupted", error=str(exc) or "interrupted")
                summary.interrupted = f"in {cell.label}"
                if isinstance(exc, KeyboardInterrupt):
                    raise
                break
            except FewbenchError as exc:
                store.mark(cell.id, "failed", error=str(exc))
                summary.failed.append((cell.label, str(exc)))
                print(f"{prefix}: FAILED: {exc}", file=log, flush=True)
                continue
            except Exception as exc:  # a bug in a plugin must not take the suite down
                reason = failure_reason(exc)
                store.mark(cell.id, "failed", error=reason + "\n" + traceback.format_exc())
                summary.failed.append((cell.label, reason))
                print(f"{prefix}: FAILED: {reason}", file=log, flush=True)
                continue
            summary.done.append(cell.id)
            note = "" if result["completed"] else " (another worker had finished it; not stored)"
            scale, unit = (100, "% accuracy") if result["metric"] == "accuracy" else (1, " MSE")
            print(
                f"{prefix}: {scale * result['mean']:.2f} ± {scale * result['ci95']:.2f}{unit} "
                f"(train {result['train_seconds']:.0f}s, eval {result['eval_seconds']:.0f}s){note}",
                file=log,
                flush=True,
            )
        if stop.is_set() and summary.interrupted is None:
            left = [c for c in suite.cells if store.status(c.id) not in ("done", "failed")]
            if left:
                summary.interrupted = f"before {left[0].label}"
    finally:
        store.close()
        if announce is not None:
            announce(None)
    return summary


def failure_reason(exc: Exception) -> str:
    """One line on why a cell failed, for the log and the results store."""
    if isinstance(exc, FewbenchError):
        return str(exc)
    reason = f"{type(exc).__name__}: {exc}"
    if hasattr(exc, "fewbench_iteration"):
        reason += f" (at iteration {exc.fewbench_iteration})"
    if isinstance(exc, torch.OutOfMemoryError):
        reason += " (lower meta_batch_size or use first_order: true)"
    return reason


def suite_text_of(suite: Suite) -> str:
    """The suite as resolved (after --set), for the run directory."""
    return yaml.safe_dump(suite.data, sort_keys=False)
