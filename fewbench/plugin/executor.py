"""The public API of executor plugins: how the cells of a run directory are worked through.

An executor plugin imports from the core only this module (and ``hookspecs``,
``params``, ``errors``). The driver has expanded the suite and stored every cell
in the run directory; the executor gets a :class:`RunDir` and starts workers:

- processes on this machine, each running :meth:`RunDir.worker_command` (they
  claim cells in the run directory's store, see :func:`fewbench.running.worker.work_through`);
- or one scheduler task per cell, each calling :func:`run_cell_task` with the run
  directory, the cell id and :attr:`RunDir.task_settings` (the task reports
  through its cell's folder; :meth:`RunDir.collect` brings finished cells into the
  store, whose only writer is the driver).

Executors declare their own command-line options with the
``fewbench_add_executor_options`` hook, and a task may leave a ``note`` (its job id,
its node) that ``fewbench status`` shows beside the cell.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

from fewbench.plugin.base import Plugin
from fewbench.reports.status import cell_table, summary
from fewbench.running.heartbeat import STALE_AFTER_META
from fewbench.running.interrupts import Stopping, terminate_passes_on
from fewbench.running.worker import WorkerSettings, default_worker_name, run_cell_task
from fewbench.storage.journal import CellJournal, collect, read_json, write_cell, write_json
from fewbench.storage.store import ResultsStore

__all__ = [
    "CellRow",
    "Executor",
    "ExecutorOption",
    "RunDir",
    "SchedulerExecutor",
    "WorkerSettings",
    "mark_task_interrupted",
    "run_cell_task",
]


@dataclass(frozen=True)
class ExecutorOption:
    """A command-line option that sets an executor parameter (``--partition P`` sets
    ``partition``). ``convert`` turns the text into the parameter's value, raising
    ValueError with what was expected; ``flag_only`` options take no value."""

    flag: str
    param: str
    help: str = ""
    convert: Callable[[str], Any] | None = None
    flag_only: bool = False


@dataclass(frozen=True)
class CellRow:
    """A cell as an executor sees it."""

    id: str
    label: str
    status: str  # pending, queued, running, interrupted, done, failed
    where: str  # the worker, or where a queued cell was sent (a job id)


class RunDir:
    """A prepared run directory: its cells and their states, for an executor."""

    def __init__(self, path: Path, settings: WorkerSettings):
        self.path = Path(path)
        self.settings = settings
        self._store = ResultsStore.open_run(self.path, must_exist=True)
        # For fewbench status: a task silent for longer than this is stale (cluster tasks
        # never open the store to record it themselves).
        self._store.set_meta(STALE_AFTER_META, settings.stale_after)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def suite_name(self) -> str:
        return self._store.meta("suite_name") or "suite"

    def cells(self) -> list[CellRow]:
        """The cells of the suite as last run here, in suite order."""
        rows = {row["id"]: row for row in self._store.cells()}
        return [
            CellRow(c, rows[c]["label"], rows[c]["status"], rows[c]["worker"] or "")
            for c in self._store.current_cells()
            if c in rows
        ]

    def status(self, cell_id: str) -> str | None:
        return self._store.status(cell_id)

    def to_submit(self, in_flight: Callable[[CellRow], bool] = lambda row: False) -> list[str]:
        """Cells, in suite order, that are neither done nor failed nor still in a
        scheduler's hands (``in_flight``)."""
        return [
            row.id
            for row in self.cells()
            if row.status not in ("done", "failed") and not in_flight(row)
        ]

    def queue(self, cell_ids: Iterable[str], where: str) -> None:
        """Hand cells to a scheduler (``where``: e.g. "ray task"): each cell's configuration
        goes to its folder for the task, and the store says the cell is queued."""
        for cell_id in cell_ids:
            write_cell(self.path, self._store.cell(cell_id))
            self._store.queue(cell_id, where)

    def note_job(self, cell_id: str, where: str) -> None:
        """Record the job a queued cell went to, leaving a task's newer word on it alone."""
        self._store.queue(cell_id, where, refresh_time=False)

    def unqueue(self, cell_ids: list[str]) -> None:
        """The submission failed: the cells are pending again."""
        self._store.unqueue(cell_ids)

    def fail(self, cell_id: str, reason: str) -> None:
        self._store.mark(cell_id, "failed", error=reason)

    def collect(self) -> dict[str, int]:
        """Bring cells finished or failed by tasks into the store."""
        return collect(self.path, self._store)

    def progress(self, workers: int | None = None) -> str:
        """One line: cells per state and the time left."""
        return summary(cell_table(self.path), workers=workers)

    def exit_code(self) -> int:
        """1 when a cell failed, else 0 when every cell is done, else 130 (unfinished)."""
        table = cell_table(self.path)
        if (table["status"] == "failed").any():
            return 1
        return 0 if (table["status"] == "done").all() else 130

    def passing_sigterm_on(
        self, workers: Sequence[subprocess.Popen], log: TextIO
    ) -> AbstractContextManager[Stopping]:
        """While the driver waits for its worker processes: a SIGTERM sent to it reaches them
        (each checkpoints its cell, marks it interrupted and exits 143), and the
        :class:`~fewbench.running.interrupts.Stopping` it yields says whether one came
        (``requested``) and the exit code to return (``exit_code``).

        A SIGTERM to the driver alone (``kill``, a container stopping its first process)
        would otherwise end it and leave its workers training with nobody waiting for them.
        ``workers`` is read when the signal comes: append each process as it starts.
        """
        return terminate_passes_on(workers, log)

    def task_settings(self, **changes: Any) -> dict[str, Any]:
        """The settings a task gets, as a plain dict (picklable, JSON-able)."""
        return self.settings.replace(**changes).to_dict()

    def worker_command(self, **changes: Any) -> list[str]:
        """The command line of a worker process on this machine."""
        import json

        return [
            sys.executable,
            "-m",
            "fewbench.running.worker",
            str(self.path),
            json.dumps(self.task_settings(**changes)),
        ]

    def save_json(self, relative: str, payload: Any) -> None:
        """An executor's own file in the run directory, written atomically."""
        write_json(self.path / relative, payload)

    def load_json(self, relative: str) -> Any | None:
        return read_json(self.path / relative)


def mark_task_interrupted(run_dir: str | Path, cell_id: str, reason: str) -> None:
    """A task about to be stopped and requeued (preemption) says so in its cell's folder."""
    CellJournal(Path(run_dir), cell_id, default_worker_name()).interrupted(reason)


class Executor(Plugin):
    """Base class of executor plugins: ``run`` works the run directory's cells through."""

    kind: ClassVar[str] = "executor"

    def check(self) -> None:
        """Fail, with one line, on settings that cannot work (a missing library, an address
        nobody answers at), before the run directory is written."""

    def in_process(self) -> bool:
        """True when the driver should run the cells itself (one local worker)."""
        return False

    def run(self, run: RunDir, log: TextIO) -> int:
        """Run workers until no cell is left to do; return the exit code (:meth:`RunDir.exit_code`)."""
        self.not_implemented("run")


class SchedulerExecutor(Executor):
    """Base of executors that hand each cell to a cluster scheduler as its own task.

    The scheduler places, retries and requeues the tasks; fewbench does no
    scheduling of its own. The tasks report through the cells' folders and this
    driver, the results store's only writer, collects what they finish.
    """

    def task_settings(self, run: RunDir) -> dict[str, Any]:
        """The driver's settings as each task gets them: with ``device: auto`` a cell runs on
        CUDA when it asked for GPUs (``gpus_per_cell``), and its torch threads are the CPUs
        it asked for (``cpus_per_cell``), so cells sharing a node do not oversubscribe it."""
        import math

        changes: dict[str, Any] = {"threads": max(1, math.floor(self.config["cpus_per_cell"]))}
        if run.settings.device == "auto":
            changes["device"] = "cuda" if self.config["gpus_per_cell"] > 0 else "cpu"
        return run.task_settings(**changes)

    def report_progress(self, run: RunDir, log: TextIO, last: str) -> str:
        """Collect, and print the progress line when it changed."""
        run.collect()
        line = run.progress()
        if line != last:
            print(f"fewbench: {line}", file=log, flush=True)
        return line
