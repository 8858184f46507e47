"""The one path from a stored cell to a stored result.

The driver expands the suite once and stores every cell's configuration in the
run directory. Every worker, whether this process, a local worker process, a
torchrun rank, a Ray task or a SLURM array task, then does the same thing: take a
stored cell by id, run it with :class:`CellRunner`, and report through a
:class:`~fewbench.storage.sink.ResultSink`. No worker reads or expands the suite file.

- :func:`work_through` claims the run directory's cells one at a time in the
  SQLite store (this process, the ``local`` executor's workers, torchrun's rank 0);
- :func:`run_cell_task` runs one cell whose configuration the driver wrote to its
  cell folder, and reports there (cluster tasks: SQLite is unsafe over NFS);
- :func:`follow` trains each cell rank 0 announces, reporting nowhere (the other
  torchrun ranks).

A local worker process is ``python -m fewbench.running.worker RUN_DIR SETTINGS_JSON``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import torch

from fewbench.data.cache import save_atomically
from fewbench.data.feature_cache import FeatureCache
from fewbench.errors import DiskFull, FewbenchError, one_line
from fewbench.plugin.dataset import EpisodeSource, LabelledBatch, derive_seed
from fewbench.plugin.learner import Learner, LearnerContext
from fewbench.plugin.logger import CellLogging
from fewbench.plugin.task_types import TaskType, by_metric, task_type_of
from fewbench.registry import Registry
from fewbench.reports.stats import mean_ci95
from fewbench.running import cpu_heap
from fewbench.running.cost import PeakMemory, cost_record
from fewbench.running.durations import in_words
from fewbench.running.evaluation import EpisodeSpec, dataset_identity, evaluate_with_extras
from fewbench.running.heartbeat import STALE_AFTER_META, interval_for
from fewbench.running.interrupts import Stopping, first_interrupt_stops
from fewbench.running.provenance import plugin_version
from fewbench.running.training import Interrupted, TrainingFailed, train
from fewbench.storage.atomic import write_json_atomically
from fewbench.storage.faults import crash_point
from fewbench.storage.journal import CellJournal, read_cell
from fewbench.storage.model_file import model_record
from fewbench.storage.paths import default_cache_dir
from fewbench.storage.sink import CellResult, NullSink, ResultSink
from fewbench.storage.store import ResultsStore, StoreSink
from fewbench.suite.cell import Cell


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs besides the run directory: plain values, so that a driver can
    hand them to a process, a Ray task or a SLURM job (as a dict or JSON)."""

    data_root: str
    cache_dir: str | None = None
    device: str = "auto"
    threads: int | None = None
    stale_after: float = 120.0
    progress: bool = False
    # The run's experiment trackers, [{"name": logger, **params}] (fewbench.plugin.logger): chosen
    # per run, not per cell, so they travel with the settings to wherever a cell runs.
    loggers: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WorkerSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> WorkerSettings:
        return WorkerSettings(**{**self.to_dict(), **changes})


def resolve_device(name: str) -> torch.device:
    """The device to train on; refused before anything trains when this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise FewbenchError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FewbenchError(
            f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise FewbenchError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FewbenchError(f"--device {name}: MPS (Apple GPU) is not available on this machine")
    return device


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


class CellFailed(Exception):
    """A cell failed for a reason of its own (recorded in its sink); others can go on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _first_line(message: str) -> str:
    """The message's first line: PyTorch appends C++ frames (``Exception raised from ...``,
    ``frame #0: ...``) that made a failed cell print 30 lines; the stored error keeps all."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return one_line(message.strip())
    return (
        one_line(lines[0].strip())
        + f" (and {len(lines) - 1} more lines in the cell's stored error)"
    )


def failure_reason(exc: BaseException, learner: type[Learner] | None = None) -> str:
    """One line on why a cell failed, for the log and the results."""
    iteration = None
    if isinstance(exc, TrainingFailed):
        exc, iteration = exc.cause, exc.iteration
    if isinstance(exc, FewbenchError):
        return one_line(str(exc))
    reason = f"{type(exc).__name__}: {_first_line(str(exc))}"
    if iteration is not None:
        reason += f" (at iteration {iteration})"
    if isinstance(exc, torch.OutOfMemoryError):
        hint = getattr(learner, "out_of_memory_hint", "") or "lower the batch size"
        reason += f" ({hint})"
    return reason


class DatasetCache:
    """Loads each distinct dataset configuration once per worker and keeps it on the device."""

    def __init__(self, registry: Registry, data_root: Path, cache_dir: Path, device: torch.device):
        self.registry, self.data_root, self.cache_dir, self.device = (
            registry,
            data_root,
            cache_dir,
            device,
        )
        self._loaded: dict[str, tuple[Any, dict[str, EpisodeSource]]] = {}

    def get(self, cell: Cell) -> tuple[Any, dict[str, EpisodeSource]]:
        return self.get_config(cell.dataset.config())

    def get_config(self, config: dict[str, Any]) -> tuple[Any, dict[str, EpisodeSource]]:
        """The dataset of a configuration ``{name, params}``, and its sources on the device."""
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


def source_of_test_episodes(
    cell: Cell,
    datasets: DatasetCache,
    sources: dict[str, EpisodeSource],
    identity: tuple,
    task_type: TaskType,
) -> tuple[EpisodeSource, tuple]:
    """Where a cell's test episodes come from: its own dataset's test split, or, for a
    cross-domain cell (``eval.dataset``), the other dataset's, which must give examples of
    the same shape and task type as the training dataset."""
    if not cell.eval.dataset:
        return sources["test"], identity
    other, other_sources = datasets.get_config(cell.eval.dataset)
    name, tested = cell.dataset.name, cell.eval.dataset["name"]
    trained_shape, tested_shape = sources["train"].input_shape, other_sources["test"].input_shape
    if tuple(tested_shape) != tuple(trained_shape):
        raise FewbenchError(
            f"eval.dataset {tested}: its examples are {'x'.join(map(str, tested_shape))} "
            f"(channels x height x width), {name}'s are {'x'.join(map(str, trained_shape))}; "
            f"give both the same image size and channels"
        )
    if task_type_of(other.task_type) != task_type:
        raise FewbenchError(
            f"eval.dataset {tested}: a {task_type_of(other.task_type).name} dataset cannot test "
            f"a model trained on {name} ({task_type.name})"
        )
    return other_sources["test"], dataset_identity(
        cell.eval.dataset, getattr(other, "episode_identity", None)
    )


@dataclass
class CellSetup:
    """A cell's learner, set up and seeded, with its data: what training starts from."""

    learner: Learner
    sources: dict[str, EpisodeSource]
    task_type: TaskType
    identity: tuple
    context: LearnerContext | None = None
    plugins: dict[str, str] = field(default_factory=dict)  # kind:name -> provider and version
    # The test episodes' source and identity: the cell's own dataset, or eval.dataset's.
    test_source: EpisodeSource | None = None
    test_identity: tuple = ()


def ordered_examples(source: EpisodeSource) -> Callable[[int], Iterator[LabelledBatch]] | None:
    """The split's examples in order (:attr:`LearnerContext.base_examples`), or None where the
    source cannot give them."""
    if type(source).labelled_in_order is EpisodeSource.labelled_in_order:
        return None
    return source.labelled_in_order


class CellRunner:
    """Runs cells in this process: set up, train (resuming from the cell's checkpoint),
    evaluate on the fixed test episodes, report to a sink."""

    def __init__(
        self,
        settings: WorkerSettings,
        registry: Registry | None = None,
        device: torch.device | None = None,
    ):
        if settings.threads:
            torch.set_num_threads(int(settings.threads))
        self.settings = settings
        self.stored = False  # whether the last cell's result was stored (or already done)
        self.registry = registry or Registry()
        self.device = device or resolve_device(settings.device)
        cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
        self.datasets = DatasetCache(
            self.registry, Path(settings.data_root), cache_dir, self.device
        )
        self.feature_cache = FeatureCache(cache_dir / "features")

    def set_up(self, cell: Cell) -> CellSetup:
        dataset, sources = self.datasets.get(cell)
        task_type = task_type_of(dataset.task_type)
        identity = dataset_identity(
            cell.dataset.config(), getattr(dataset, "episode_identity", None)
        )
        backbone = self.registry.get("backbone", cell.backbone.name).build(**cell.backbone.params)
        learner = self.registry.get("learner", cell.learner.name).build(**cell.learner.params)
        torch.manual_seed(derive_seed("init", cell.seed))
        context = LearnerContext(
            backbone=backbone,
            input_shape=sources["train"].input_shape,
            ways=cell.ways,
            shots=cell.shots,
            query=cell.tasks.query,
            num_train_classes=sources["train"].num_classes,
            device=self.device,
            task_type=task_type,
            train_ways=cell.tasks.training[0],
            train_shots=cell.tasks.training[1],
            train_query=cell.tasks.training[2],
            environment=getattr(sources["train"], "environment", None),
            base_examples=ordered_examples(sources["train"]),
            feature_cache=self.feature_cache,
        )
        learner.setup(context)
        plugins = {}
        for kind, choice in (
            ("dataset", cell.dataset),
            ("backbone", cell.backbone),
            ("learner", cell.learner),
        ):
            provider = self.registry.get(kind, choice.name).provider
            plugins[f"{kind}:{choice.name}"] = (
                f"{provider} {plugin_version(provider) or '(not installed)'}"
            )
        test_source, test_identity = source_of_test_episodes(
            cell, self.datasets, sources, identity, task_type
        )
        return CellSetup(
            learner, sources, task_type, identity, context, plugins, test_source, test_identity
        )

    def run(
        self,
        cell: Cell,
        sink: ResultSink,
        run_dir: Path,
        *,
        stop: threading.Event | None = None,
        follower: bool = False,
    ) -> CellResult | None:
        """Run ``cell`` to its result, or record why not and raise.

        A failure of the cell's own (a plugin's bug, divergence, out of memory) is
        recorded in ``sink`` and raised as :class:`CellFailed`; an interruption is
        recorded and re-raised. A ``follower`` (a torchrun rank but 0) trains in step
        with rank 0, reading its checkpoints and writing nothing, and does not evaluate.
        """
        learner_class = None
        # The ranks that follow rank 0 log nothing: rank 0 logs the cell.
        trackers = CellLogging(
            [] if follower else self.settings.loggers, self.registry, cell, Path(run_dir)
        )
        outcome = "failed"
        try:
            learner_class = self.registry.get("learner", cell.learner.name).cls
            result = self._run(cell, sink, Path(run_dir), stop, follower, trackers)
            outcome = "done"
            return result
        except (KeyboardInterrupt, Interrupted) as exc:
            outcome = "interrupted"
            sink.interrupted(str(exc) or "interrupted")
            raise
        except DiskFull as exc:  # stops the run: every other cell would fail the same way
            outcome = "interrupted"
            with contextlib.suppress(Exception):  # the store may be on the full disk too
                sink.interrupted(str(exc))
            raise
        except Exception as exc:  # a bug in a plugin must not take the other cells down
            if isinstance(exc, TrainingFailed):
                sink.save_curve(exc.curve)  # the partial curve of a cell that failed in training
                trackers.curve(exc.curve)
            reason = failure_reason(exc, learner_class)
            cause = exc.cause if isinstance(exc, TrainingFailed) else exc
            detail = "" if isinstance(cause, FewbenchError) else "\n" + traceback.format_exc()
            sink.failed(reason + detail)
            raise CellFailed(reason) from exc
        finally:
            trackers.close(outcome)

    def _run(
        self,
        cell: Cell,
        sink: ResultSink,
        run_dir: Path,
        stop: threading.Event | None,
        follower: bool,
        trackers: CellLogging,
    ) -> CellResult | None:
        checkpoint_dir = run_dir / "checkpoints" / cell.id
        if follower:
            return self._train_and_evaluate(cell, sink, checkpoint_dir, stop, follower, trackers)
        with pinned_threads(checkpoint_dir):
            return self._train_and_evaluate(cell, sink, checkpoint_dir, stop, follower, trackers)

    def _train_and_evaluate(
        self,
        cell: Cell,
        sink: ResultSink,
        checkpoint_dir: Path,
        stop: threading.Event | None,
        follower: bool,
        trackers: CellLogging,
    ) -> CellResult | None:
        peak = PeakMemory(self.device).start()
        setup = self.set_up(cell)
        learner = setup.learner
        sink.started(learner.describe_engine(), metric=setup.task_type.metric)
        trackers.start(setup.task_type)
        outcome = train(
            learner,
            setup.sources,
            cell,
            identity=setup.identity,
            device=self.device,
            checkpoint_dir=checkpoint_dir,
            task_type=setup.task_type,
            progress=self.settings.progress,
            on_validate=trackers.following(sink.save_curve),
            on_resume=sink.resumed,
            stop=stop,
            write_checkpoints=not follower,
        )
        if follower:
            return None
        started = time.perf_counter()
        crash_point("evaluation")
        values, extras = evaluate_with_extras(
            learner,
            setup.test_source,
            EpisodeSpec.of(cell, setup.test_identity, "test"),
            episodes=cell.eval.episodes,
            chunk=cell.eval.chunk,
            device=self.device,
            task_type=setup.task_type,
        )
        eval_seconds = time.perf_counter() - started
        estimate = mean_ci95(values)
        card = protocol_card(cell, setup, outcome)
        keep = cell.train.keep_checkpoints
        if keep != "none":
            # Self-describing: fewbench.load_learner sets the learner up again from it alone.
            record = model_record(learner, cell, setup.context, setup.plugins, protocol=card)
            save_atomically(record, checkpoint_dir / "best.pt")
        result = CellResult(
            metric=setup.task_type.metric,
            values=values.tolist(),
            mean=estimate.mean,
            ci95=estimate.ci95,
            curve=outcome.curve,
            iterations=outcome.iterations,
            best_iteration=outcome.best_iteration,
            best_val=outcome.best_val,
            # Now with the choices made at the first batches, and whether a CUDA graph ran.
            engine="; ".join(filter(None, (learner.describe_engine(), outcome.graph))),
            train_seconds=outcome.seconds,
            eval_seconds=eval_seconds,
            extras={name: value.tolist() for name, value in extras.items()},
            protocol=card,
            cost=cell_cost(learner, self.device, peak, outcome.seconds, eval_seconds, len(values)),
        )
        self.stored = sink.complete(result)
        trackers.finish(result)  # after the store: a tracker never holds what the store lacks
        if keep == "none":
            import shutil

            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        elif keep == "best":
            (checkpoint_dir / "last.pt").unlink(missing_ok=True)
        return result


def protocol_card(cell: Cell, setup: CellSetup, outcome: Any) -> dict[str, Any]:
    """The cell's protocol card (:mod:`fewbench.running.protocol`), from the learner and
    networks that ran; a card that cannot be derived (a plugin's declaration that raises)
    is recorded as such, never at the cost of the finished cell's result."""
    from fewbench.running.protocol import card_of_run, failed_card

    try:
        return card_of_run(cell, setup, outcome)
    except Exception as exc:
        return failed_card(exc)


def cell_cost(
    learner: Any,
    device: torch.device,
    peak: PeakMemory,
    train_seconds: float,
    eval_seconds: float,
    episodes: int,
) -> dict[str, Any] | None:
    """The cell's cost record (:mod:`fewbench.running.cost`); None, never a lost result, when
    it cannot be taken."""
    from fewbench.running.protocol import learner_modules, parameter_count

    try:
        parameters = parameter_count(learner_modules(learner))
    except Exception:  # noqa: BLE001 - a plugin's modules that cannot be listed
        parameters = None
    try:
        return cost_record(
            device=device,
            peak=peak,
            train_seconds=train_seconds,
            eval_seconds=eval_seconds,
            test_episodes=episodes,
            parameters=parameters,
        )
    except Exception:  # noqa: BLE001 - the result matters more than its cost
        return None


NUMERICS_FILE = "numerics.json"


@contextlib.contextmanager
def pinned_threads(checkpoint_dir: Path) -> Iterator[int]:
    """Run a cell with the CPU thread count of its first attempt.

    How many threads compute a cell changes its floating-point sums (MAML's shares of a
    meta-batch, the kernels' reductions), so a cell keeps the count it started with,
    recorded beside its checkpoints: resumed by another worker, another executor or
    another machine, it goes on exactly as it began instead of mixing numerics.
    """
    record = checkpoint_dir / NUMERICS_FILE
    saved = torch.get_num_threads()
    try:
        threads = int(json.loads(record.read_text())["threads"])
    except (OSError, ValueError, KeyError, TypeError):
        threads = saved
        write_json_atomically(record, {"threads": threads})
    torch.set_num_threads(max(1, threads))
    try:
        yield threads
    finally:
        torch.set_num_threads(saved)


@dataclass
class WorkSummary:
    """What one worker did in a run directory."""

    done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # label, reason
    interrupted: str | None = None
    seconds: list[float] = field(default_factory=list)  # wall time of each cell it ran


def work_through(
    run_dir: Path,
    settings: WorkerSettings,
    *,
    log: TextIO,
    worker: str | None = None,
    stop: threading.Event | None = None,
    announce: Callable[[Cell | None], object] | None = None,
    registry: Registry | None = None,
    device: torch.device | None = None,
) -> WorkSummary:
    """Claim the run directory's current cells one at a time in its store and run them.

    Several workers may share a run directory: a cell whose worker stopped beating
    for ``settings.stale_after`` seconds, or whose process on this host is gone, is
    claimed again and resumes from its checkpoint. A worker with nothing to claim
    waits while others run cells, to take over any that go stale. ``announce`` hears
    each cell before it runs, and None at the end (the other torchrun ranks).
    """
    store = ResultsStore.open_run(run_dir, must_exist=True)
    worker = worker or default_worker_name()
    stop = stop or threading.Event()
    summary = WorkSummary()
    try:
        # For fewbench status: a running cell whose heartbeat is older than this is stale.
        store.set_meta(STALE_AFTER_META, settings.stale_after)
        order = store.current_cells()
        number_of = {cell_id: number for number, cell_id in enumerate(order, start=1)}
        runner = CellRunner(settings, registry, device)
        while not stop.is_set():
            claimed = store.claim(worker, order, settings.stale_after, worker_is_dead)
            if claimed is None:
                # Cells running elsewhere either finish or go stale; stay to take over the latter.
                if store.busy_elsewhere(order, worker) and not stop.is_set():
                    time.sleep(min(5.0, max(0.2, settings.stale_after / 4)))
                    continue
                break
            cell = store.cell(claimed)
            prefix = f"[{number_of[cell.id]}/{len(order)}] {cell.label} ({cell.id})"
            if announce is not None:
                announce(cell)
            sink = StoreSink(store, cell.id, worker)
            started = time.monotonic()
            try:
                with sink.heartbeat(interval_for(settings.stale_after)):
                    result = runner.run(cell, sink, run_dir, stop=stop)
            except Interrupted:
                summary.interrupted = f"in {cell.label}"
                break
            except CellFailed as failure:
                summary.failed.append((cell.label, failure.reason))
                print(f"{prefix}: FAILED: {failure.reason}", file=log, flush=True)
                continue
            finally:
                summary.seconds.append(time.monotonic() - started)
            summary.done.append(cell.id)
            overall = run_progress([store.status(c) for c in order], summary.seconds)
            print(f"{prefix}: {describe(result, runner.stored)} | {overall}", file=log, flush=True)
        if stop.is_set() and summary.interrupted is None:
            left = [c for c in order if store.status(c) not in ("done", "failed")]
            if left:
                summary.interrupted = f"before {store.cell(left[0]).label}"
    finally:
        store.close()
        if announce is not None:
            announce(None)
    return summary


def run_progress(statuses: list[str | None], seconds: list[float]) -> str:
    """The whole run in a few words: cells done, failed, running (any worker) and left, and the
    time left at this worker's pace so far (the mean of its cells' wall times)."""
    done = sum(s == "done" for s in statuses)
    failed = sum(s == "failed" for s in statuses)
    running = sum(s == "running" for s in statuses)
    left = len(statuses) - done - failed - running
    text = f"run: {done}/{len(statuses)} done"
    text += f", {failed} failed" if failed else ""
    text += f", {running} running" if running else ""
    if left:
        estimate = sum(seconds) / len(seconds) * left if seconds else None
        text += f", {left} left" + (f", about {in_words(estimate)} to go" if estimate else "")
    return text


def describe(result: CellResult, stored: bool) -> str:
    """A finished cell in one line of the log."""
    note = "" if stored else " (another worker had finished it; not stored)"
    return (
        f"{by_metric(result.metric).describe(result.mean, result.ci95)} "
        f"(train {result.train_seconds:.0f}s, eval {result.eval_seconds:.0f}s){note}"
    )


def run_cell_task(
    run_dir: str, cell_id: str, settings: dict[str, Any], details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A cluster task: run one cell whose configuration the driver wrote to its folder,
    reporting there; returns a small summary for the driver.

    ``details`` (the executor's ``note`` for ``fewbench status``, its node or job id)
    are kept in the cell's state file. A cell that fails for a reason of its own is
    recorded as failed and the task returns normally: retrying it would fail the same
    way. Retries are for the worker dying, which the scheduler sees.
    """
    folder = Path(run_dir)
    journal = CellJournal(folder, cell_id, default_worker_name())
    if journal.done:
        return {"cell": cell_id, "status": "done", "skipped": True}
    attempt = journal.start(host=socket.gethostname(), **(details or {}))
    worker_settings = WorkerSettings.from_dict(settings)
    try:
        cpu_heap.keep_large_blocks_on_heap()  # the scheduler's process may have threads already
        cell = read_cell(folder, cell_id)
        runner = CellRunner(worker_settings)
        with journal.heartbeat(interval_for(worker_settings.stale_after)):
            result = runner.run(cell, journal, folder)
    except CellFailed as failure:
        return {"cell": cell_id, "status": "failed", "error": failure.reason, "attempt": attempt}
    except Exception as exc:  # the cell could not even be read, or the worker set up
        reason = failure_reason(exc)
        detail = "" if isinstance(exc, FewbenchError) else "\n" + traceback.format_exc()
        journal.failed(reason + detail)
        return {"cell": cell_id, "status": "failed", "error": reason, "attempt": attempt}
    summary = {"cell": cell_id, "status": "done", "attempt": attempt}
    if result is not None:
        summary.update(mean=result.mean, ci95=result.ci95)
    return summary


def follow(
    receive: Callable[[], Cell | None],
    run_dir: Path,
    settings: WorkerSettings,
    device: torch.device,
    log: TextIO,
    rank: int,
) -> None:
    """The loop of every torchrun rank but 0: train each cell rank 0 announces, in step
    with it; rank 0 records results and failures (it meets the same ones)."""
    runner = CellRunner(settings, device=device)
    while (cell := receive()) is not None:
        try:
            runner.run(cell, NullSink(), run_dir, follower=True)
        except CellFailed as failure:
            print(f"rank {rank}: {cell.label}: {failure.reason}", file=log, flush=True)


def main(argv: list[str] | None = None) -> int:
    """A local worker process: ``python -m fewbench.running.worker RUN_DIR SETTINGS_JSON``."""
    run_dir, settings_json = argv if argv is not None else sys.argv[1:]
    settings = WorkerSettings.from_dict(json.loads(settings_json))
    stop = threading.Event()
    stopping = Stopping()
    try:
        cpu_heap.keep_large_blocks_on_heap()  # first: before any thread allocates
        # SIGTERM as Ctrl-C: from the process group (timeout, a scheduler) or passed on by
        # the local executor's driver; exits 128 + the signal, 143 for SIGTERM.
        with first_interrupt_stops(stop) as stopping:
            summary = work_through(Path(run_dir), settings, log=sys.stderr, stop=stop)
    except FewbenchError as exc:
        print(f"fewbench worker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return stopping.exit_code
    if summary.interrupted:
        return stopping.exit_code
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
