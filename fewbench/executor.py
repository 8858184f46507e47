"""Executors: how the cells of a run directory are worked through.

The run directory is the meeting point. The driver writes the suite and the
results store there; workers (processes, possibly on other machines) each run
``fewbench run RUN_DIR``, claim free cells one at a time in the store, and
heartbeat while they work, so a worker that dies loses at most its cell's
progress since the last checkpoint: another worker takes the cell over.
An executor decides where those workers run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class WorkerCommand:
    """What the workers need: the run directory and the driver's settings, both as
    ``fewbench run`` options (``options``) and as values (``settings``, see
    :data:`fewbench.celltask.SETTING_KEYS`)."""

    run_dir: Path
    options: list[str] = field(default_factory=list)  # --data-root, --cache-dir, ...
    settings: dict[str, Any] = field(default_factory=dict)


class Executor:
    """Base class of executor plugins: ``run`` works the run directory's cells through."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any):
        self.config = params

    def check(self) -> None:
        """Fail, with one line, on settings that cannot work (a missing library, an address
        nobody answers at), before the run directory is written."""

    def run(self, command: WorkerCommand, log) -> int:
        """Run workers until no cell is left to do; return the exit code (:meth:`exit_code`)."""
        raise NotImplementedError

    @staticmethod
    def exit_code(run_dir: Path) -> int:
        """1 when a cell failed, else 0 when every cell is done, else 130 (unfinished)."""
        from fewbench.status import cell_table

        table = cell_table(run_dir)
        if (table["status"] == "failed").any():
            return 1
        return 0 if (table["status"] == "done").all() else 130


class SchedulerExecutor(Executor):
    """Base of executors that hand each cell to a cluster scheduler as its own task.

    The scheduler places, retries and requeues the tasks; fewbench does no
    scheduling of its own. The tasks report through the cells' folders
    (:mod:`fewbench.journal`), and this driver, the results store's only writer,
    collects what they finish.
    """

    def cells_to_submit(self, store) -> list[str]:
        """Cells of the store, in suite order, that are neither done nor failed nor
        still in the scheduler's hands (:meth:`in_flight`)."""
        return [
            row["id"]
            for row in store.cells()
            if row["status"] not in ("done", "failed") and not self.in_flight(row)
        ]

    def task_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The driver's settings as each task gets them: with ``device: auto`` a cell runs on
        CUDA when it asked for GPUs (``gpus_per_cell``), and its torch threads are the CPUs
        it asked for (``cpus_per_cell``), so cells sharing a node do not oversubscribe it."""
        settings = dict(settings)
        if settings.get("device", "auto") == "auto":
            settings["device"] = "cuda" if self.config["gpus_per_cell"] > 0 else "cpu"
        settings["threads"] = max(1, math.floor(self.config["cpus_per_cell"]))
        return settings

    def in_flight(self, row) -> bool:
        """Whether a cell queued by an earlier driver is still the scheduler's to run."""
        return False

    def report_progress(self, run_dir: Path, store, log, last: str) -> str:
        from fewbench.journal import collect
        from fewbench.status import cell_table, summary

        collect(run_dir, store)
        line = summary(cell_table(run_dir))
        if line != last:
            print(f"fewbench: {line}", file=log, flush=True)
        return line
