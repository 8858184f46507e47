"""``fewbench run``: from a suite file (or a run directory) to stored results.

The driver's steps, each once: read and check the suite, expand its grid, fetch
missing data, check the data against every cell, write the run directory (the
resolved suite, the environment, every cell's configuration in the results
store), then hand the cells to workers: this process
(:func:`fewbench.running.worker.work_through`), torchrun's ranks, or an executor plugin.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import yaml

from fewbench.data.check import check_data, download_missing
from fewbench.errors import FewbenchError, SuiteError
from fewbench.plugin.executor import RunDir
from fewbench.plugin.logger import choose_loggers
from fewbench.registry import Registry
from fewbench.reports.table import render
from fewbench.reports.wording import counted
from fewbench.running import provenance as environment
from fewbench.running.durations import in_words
from fewbench.running.executor_setup import EXECUTION_FILE, ExecutorRequest, build_executor
from fewbench.running.interrupts import Stopping, exit_code_for, first_interrupt_stops
from fewbench.running.worker import WorkerSettings, follow, resolve_device, work_through
from fewbench.storage.atomic import write_text_atomically
from fewbench.storage.journal import collect
from fewbench.storage.paths import (
    check_cache_dir,
    default_cache_dir,
    default_run_dir,
    make_run_dir,
)
from fewbench.storage.store import DB_NAME, ResultsStore
from fewbench.suite.cell import Cell
from fewbench.suite.check import check_suite
from fewbench.suite.grid import Suite, expand_grid
from fewbench.suite.loading import (
    SuiteSource,
    apply_set,
    load_suite_file,
    parse_yaml,
    set_targets,
)

EXIT_FAILED_CELLS = 1
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = exit_code_for(signal.SIGTERM)  # 143: timeout, kill, a scheduler's SIGTERM


@dataclass(frozen=True)
class RunRequest:
    """Everything ``fewbench run`` was asked to do."""

    suite: Path  # a suite file, or a run directory to resume
    data_root: Path
    cache_dir: Path | None = None  # None: each worker's default ($FEWBENCH_CACHE)
    sets: tuple[str, ...] = ()
    out: Path | None = None
    device: str = "auto"
    dry_run: bool = False
    max_iterations: int | None = None  # smoke-run caps (Cell.capped)
    max_episodes: int | None = None
    progress: bool = True
    download: bool = True
    retry_failed: bool = False
    worker: str | None = None
    stale_after: float = 120.0
    threads: int | None = None
    executor: ExecutorRequest = field(default_factory=ExecutorRequest)
    estimate: bool = True  # time the cells first (fewbench.running.estimate); --no-estimate
    # Loggers added to the suite's ``log:`` (``--log NAME``): names or {name: ..., params}.
    log: tuple[str | dict, ...] = ()
    # Set by ``fewbench tune`` (fewbench.running.tuning): this run is that trial. Its cells' learner
    # labels end in ``[trial=N]`` (labels are not part of ids), and no table is printed.
    tune_trial: int | None = None


def load(
    request: RunRequest, registry: Registry, log: TextIO | None = None
) -> tuple[Suite, Path | None]:
    """The expanded suite, and the run directory when ``request.suite`` is one."""
    log = log or sys.stderr
    suite_path, resuming = Path(request.suite), None
    if suite_path.is_dir():  # a run directory: resume it with the suite it was run with
        if not (suite_path / "suite.yaml").is_file():
            raise FewbenchError(
                f"{suite_path}: a directory without suite.yaml is not a fewbench run directory"
            )
        if request.out is not None and request.out.resolve() != suite_path.resolve():
            raise FewbenchError(
                f"--out {request.out}: resuming {suite_path} writes into that directory"
            )
        resuming, suite_path = suite_path, suite_path / "suite.yaml"
    try:
        source = load_suite_file(suite_path, list(request.sets))
    except SuiteError as exc:
        if resuming is None or exc.file == "--set":
            raise
        source = stored_suite(resuming, list(request.sets), exc, log)
    checked = check_suite(source, registry)
    suite = expand_grid(checked)
    if request.tune_trial is not None:
        suite = replace(suite, cells=[trial_cell(c, request.tune_trial) for c in suite.cells])
    elif checked.search is not None:
        suite.warnings.append(
            f"{source.file}: its search: section is for fewbench tune; fewbench run ignores it "
            "and trains the values the suite sets (tune with: fewbench tune SUITE --trials N)"
        )
    suite.warnings.extend(own_counts_over_set(suite, registry, source.sets))
    if request.max_iterations is not None or request.max_episodes is not None:
        suite = replace(
            suite,
            cells=[c.capped(request.max_iterations, request.max_episodes) for c in suite.cells],
        )
    if request.log:  # checked here, before anything trains; never part of a cell
        suite = replace(suite, log=choose_loggers(suite.log, request.log, registry))
    return suite, resuming


def trial_cell(cell: Cell, trial: int) -> Cell:
    """``cell`` as trial ``trial`` of ``fewbench tune`` labels it: ``maml[trial=3]`` (or
    ``maml[inner_lr=0.1,trial=3]``), so that reports keep trials apart; same id."""
    learner = cell.labels["learner"]
    tagged = (
        f"{learner[:-1]},trial={trial}]" if learner.endswith("]") else f"{learner}[trial={trial}]"
    )
    tail = f"/{learner}/seed{cell.seed}"
    if cell.label.endswith(tail):
        label = cell.label[: -len(tail)] + f"/{tagged}/seed{cell.seed}"
    else:  # a label of another form: the tag at its end
        label = f"{cell.label}[trial={trial}]"
    return Cell.from_config(cell.config, label, {**cell.labels, "learner": tagged}, cell.id)


def stored_suite(run_dir: Path, sets: list[str], problem: SuiteError, log: TextIO) -> SuiteSource:
    """The suite a run directory's store keeps, for a ``suite.yaml`` cut short or emptied
    (by a kill or a full disk while it was written); rewritten when the run goes on."""
    store_file = run_dir / DB_NAME
    text = None
    if store_file.is_file():
        store = ResultsStore.open_run(run_dir, must_exist=True)
        try:
            text = store.meta("suite")
        finally:
            store.close()
    if not text:
        raise problem
    print(
        f"warning: {problem}; using the suite kept in {store_file} (suite.yaml is rewritten)",
        file=log,
    )
    source = parse_yaml(text, f"{store_file} (the stored suite)")
    for assignment in sets:
        apply_set(source, assignment)
    return source


def own_steps(cell: Cell, registry: Registry) -> int:
    """The training steps the cell's learner takes before any cap: ``train.iterations``, or
    the learner's own count (``Learner.iterations``, finetune's ``iterations`` for example)."""
    learner = registry.get("learner", cell.learner.name).build(**cell.learner.params)
    return learner.iterations(cell.train.iterations)


def own_counts_over_set(suite: Suite, registry: Registry, sets: list[str]) -> list[str]:
    """Warnings for a ``--set train.iterations`` that a learner's own count replaces
    (finetune's ``iterations``, for example)."""
    assignment = set_targets(sets).get("train.iterations", (None, None))[0]
    if assignment is None:
        return []
    replaced: dict[str, list[str]] = {}
    for cell in suite.cells:
        own = own_steps(cell, registry)
        if own != cell.train.iterations:
            replaced.setdefault(f"{cell.learner.name} trains {own} steps", []).append(cell.label)
    return [
        f"--set {assignment}: {what}, its own count, in {len(labels)} cell(s) ({labels[0]}"
        f"{', ...' if len(labels) > 1 else ''}); set the learner's parameter, or cap every cell "
        "with --max-iterations"
        for what, labels in replaced.items()
    ]


def stored_states(run_dir: Path | None) -> dict[str, str]:
    """Each stored cell's status, when ``run_dir`` holds a results store."""
    if run_dir is None or not (Path(run_dir) / DB_NAME).is_file():
        return {}
    store = ResultsStore.open_run(Path(run_dir), must_exist=True, readonly=True)
    try:
        return {row["id"]: row["status"] for row in store.cells()}
    finally:
        store.close()


def print_estimate(
    suite: Suite, registry: Registry, request: RunRequest, run_dir: Path | None, log: TextIO
) -> dict[str, float]:
    """Time the cells still to run on this device and print how long the run will take
    (:mod:`fewbench.running.estimate`); each cell's estimate, by id. Nothing for a short
    run, ``--no-estimate``, or cells that run on other machines (Ray, SLURM)."""
    from fewbench.running import estimate as estimating
    from fewbench.running.worker import CellRunner, WorkerSettings

    executor = request.executor.name or suite.execution.get("executor")
    states = stored_states(run_dir)
    cells = [cell for cell in suite.cells if states.get(cell.id) != "done"]
    if (
        not request.estimate
        or estimating.environment_disabled()
        or executor not in (None, "local")
        or not cells
    ):
        return {}
    counts = {cell.id: estimating.steps_by_kind(cell, registry) for cell in cells}
    if estimating.is_short(cells, counts):
        return {}
    cache_dir = Path(request.cache_dir) if request.cache_dir else default_cache_dir()
    settings = WorkerSettings(
        data_root=str(Path(request.data_root).resolve()),
        cache_dir=str(cache_dir),
        device=request.device,
        threads=request.threads,
    )
    runner = CellRunner(settings, registry)
    print(f"fewbench: timing {counted(len(cells), 'cell')} on {runner.device} first ...", file=log)
    result = estimating.estimate(cells, registry, runner, cache_dir, counts)
    suite_file = None if run_dir is not None and run_dir == Path(request.suite) else request.suite
    for line in estimating.describe(result, len(cells), suite_file):
        print(line, file=log)
    return result.seconds


def print_plan(
    suite: Suite,
    registry: Registry,
    run_dir: Path | None,
    estimates: dict[str, float] | None = None,
) -> None:
    """``--dry-run``: each cell with what it will really do (its training steps after the
    learner's own count and any cap, its validation and test episodes, its estimated time)
    and, when the run directory exists, its state there (a done cell is not trained again)."""
    states = stored_states(run_dir)
    estimates = estimates or {}
    for cell in suite.cells:
        own = own_steps(cell, registry)
        steps = own if cell.train.max_iterations is None else min(own, cell.train.max_iterations)
        why = []
        if own != cell.train.iterations:
            why.append(f"the learner's own count; train.iterations is {cell.train.iterations}")
        if steps != own:
            why.append(f"capped from {own}")
        note = f" ({'; '.join(why)})" if why else ""
        state = f"  [{states.get(cell.id, 'new')} in {run_dir}]" if states else ""
        took = f", about {in_words(estimates[cell.id])}" if cell.id in estimates else ""
        print(
            f"{cell.id}  {cell.label}: {steps} steps{note}, "
            f"{cell.train.val_episodes} validation / {cell.eval.episodes} test episodes"
            f"{took}{state}"
        )
    print(counted(len(suite.cells), "cell"))


def suite_text_of(suite: Suite) -> str:
    """The suite as resolved (after --set), for the run directory."""
    return yaml.safe_dump(suite.data, sort_keys=False)


def prepare_run_dir(run_dir: Path, suite: Suite, registry: Registry, device) -> None:
    """Write the run directory: the suite, the environment and every cell, stored once.

    Workers take their cells from here by id; cells already known (same id) keep
    their state, so a rerun resumes.
    """
    make_run_dir(run_dir)
    store = ResultsStore.open_run(run_dir)  # first: a damaged store stops us before any write
    try:
        suite_text = suite_text_of(suite)
        write_text_atomically(run_dir / "suite.yaml", suite_text)
        env = environment.collect(device, registry)
        write_text_atomically(
            run_dir / "environment.json", json.dumps(env, indent=2, sort_keys=True) + "\n"
        )
        store.set_meta("suite", suite_text)
        store.set_meta("suite_name", suite.name)
        store.set_meta("environment", env)
        store.add_suite_version(suite_text)  # every version of the suite run into this directory
        store.add_cells(suite.cells)
        store.set_current_cells([cell.id for cell in suite.cells])
        collect(run_dir, store)  # what cluster workers finished since the last driver looked
    finally:
        store.close()


def run(request: RunRequest, registry: Registry, log: TextIO | None = None) -> int:
    """``fewbench run``; returns the exit code."""
    log = log or sys.stderr
    suite, resuming = load(request, registry, log)
    if not request.dry_run and request.download:
        # The whole suite was checked first, so a typo is reported before any download.
        names = {cell.dataset.name for cell in suite.cells}
        names |= {cell.eval.dataset["name"] for cell in suite.cells if cell.eval.dataset}
        download_missing(names, registry, request.data_root, request.progress, log)
    warnings = suite.warnings + check_data(
        suite, registry, request.data_root, require_data=not request.dry_run
    )
    for warning in warnings:
        print(f"warning: {warning}", file=log)
    estimates = print_estimate(suite, registry, request, resuming or request.out, log)
    if request.dry_run:
        print_plan(suite, registry, resuming or request.out, estimates)
        return 0
    if request.threads:
        import torch

        torch.set_num_threads(request.threads)  # before environment.json records it
    device = resolve_device(request.device)
    run_dir = resuming or request.out or default_run_dir(suite.name)
    check_run_dir(run_dir, "--out" if request.out else "the run directory")
    executor, execution = build_executor(request.executor, registry, suite.execution, run_dir)
    if request.cache_dir or executor.in_process():  # a cluster node has its own default
        given = request.cache_dir is not None
        check_cache_dir(
            Path(request.cache_dir) if given else default_cache_dir(),
            "--cache-dir" if given else "the cache folder",
        )
    settings = WorkerSettings(
        data_root=str(Path(request.data_root).resolve()),
        cache_dir=str(Path(request.cache_dir).resolve()) if request.cache_dir else None,
        device=request.device,
        threads=request.threads,
        stale_after=request.stale_after,
        progress=request.progress,
        loggers=list(suite.log),
    )
    from fewbench.running.torchrun import from_environment, leave

    ranks = from_environment(device)
    if ranks is not None and not executor.in_process():
        raise FewbenchError(
            "under torchrun each rank is part of one worker: run the cells in this process (drop the executor options)"
        )
    if not executor.in_process():
        return run_with_executor(
            executor, execution, request, suite, registry, run_dir, settings, device, log
        )
    if ranks is not None:
        device = ranks.device
        run_dir = Path(ranks.share(str(run_dir)))  # rank 0's: the default name has a timestamp
        if not ranks.leader:
            follow(ranks.share, run_dir, settings, device, log, ranks.rank)
            leave()
            return 0
    where = f"{ranks.world} ranks ({device.type})" if ranks else str(device)
    print(
        f"fewbench: {counted(len(suite.cells), 'cell')} on {where}, results in {run_dir}", file=log
    )
    stop = threading.Event()
    with first_interrupt_stops(stop) as stopping:
        try:
            created = not run_dir.exists()
            try:
                prepare_run_dir(run_dir, suite, registry, device)
            except BaseException:
                if created:
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
            report_skipped(run_dir, request.retry_failed, log)
            summary = work_through(
                run_dir,
                settings,
                log=log,
                worker=request.worker,
                stop=stop,
                announce=ranks.share if ranks else None,
                registry=registry,
                device=device,
            )
            if ranks:
                leave()
            table = render(run_dir, "table") if request.tune_trial is None else None
        except KeyboardInterrupt:
            print(
                f"fewbench: stopped at once; the last checkpoint holds. Resume with: fewbench run {run_dir}",
                file=log,
            )
            return interrupted_code(stopping, request)
    if table is not None:
        print(table)
    if summary.interrupted:
        stopped = "interrupted" if stopping.by == "Ctrl-C" else f"stopped by {stopping.by}"
        print(
            f"fewbench: {stopped} {summary.interrupted} (checkpoint written). "
            f"Resume with: fewbench run {run_dir}",
            file=log,
        )
        return interrupted_code(stopping, request)
    if summary.failed:
        print(
            f"{len(summary.failed)} of {len(suite.cells)} cells failed (rerun them with: "
            f"fewbench run --retry-failed {run_dir}):",
            file=log,
        )
        for label, reason in summary.failed:
            print(f"  {label}: {reason}", file=log)
        return EXIT_FAILED_CELLS
    return 0


def interrupted_code(stopping: Stopping, request: RunRequest) -> int:
    """The exit code of a run that a signal stopped: 128 + that signal (130 for Ctrl-C, 143
    for SIGTERM), as a shell or a scheduler expects of a process stopped by it (a trial of
    ``fewbench tune`` too: tune passes it on)."""
    return stopping.exit_code


def check_run_dir(run_dir: Path, what: str) -> None:
    """A run directory must be a directory, or not exist yet: not a file, a device, a
    dangling symlink or a symlink loop."""
    try:
        run_dir.resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # a symlink loop
        raise FewbenchError(f"{what} {run_dir}: cannot be resolved ({exc})") from None
    if run_dir.is_symlink() and not run_dir.exists():
        raise FewbenchError(f"{what} {run_dir}: a symbolic link to nothing (or a link loop)")
    if run_dir.exists() and not run_dir.is_dir():
        raise FewbenchError(f"{what} {run_dir}: exists and is not a directory")


def report_skipped(run_dir: Path, retry_failed: bool, log: TextIO) -> None:
    """Put failed cells back (``--retry-failed``) and say which cells an earlier run did."""
    store = ResultsStore.open_run(run_dir, must_exist=True)
    try:
        if retry_failed:
            store.retry_failed()
        order = store.current_cells()
        for number, cell_id in enumerate(order, start=1):
            if store.status(cell_id) == "done":
                label = store.cell(cell_id).label
                print(
                    f"[{number}/{len(order)}] {label} ({cell_id}): done in an earlier run, skipped",
                    file=log,
                    flush=True,
                )
    finally:
        store.close()


def run_with_executor(
    executor, execution, request, suite, registry, run_dir: Path, settings, device, log
) -> int:
    run_dir = run_dir.resolve()  # workers elsewhere find it by this path (shared file system)
    prepare_run_dir(run_dir, suite, registry, device)
    if request.retry_failed:
        store = ResultsStore.open_run(run_dir, must_exist=True)
        try:
            store.retry_failed()
        finally:
            store.close()
    write_text_atomically(run_dir / EXECUTION_FILE, json.dumps(execution, indent=2) + "\n")
    with RunDir(run_dir, settings.replace(progress=False)) as run_directory:
        code = executor.run(run_directory, log)
    if request.tune_trial is None:
        print(render(run_dir, "table"))
    if code == EXIT_TERMINATED:  # the local executor passed a SIGTERM on to its workers
        print(
            f"fewbench: stopped by SIGTERM (each worker checkpointed its cell). "
            f"Resume with: fewbench run {run_dir}",
            file=log,
        )
        return interrupted_code(Stopping(signal.SIGTERM), request)
    return code
