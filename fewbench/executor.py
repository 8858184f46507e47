"""Executors: how the cells of a run directory are worked through.

The run directory is the meeting point. The driver writes the suite and the
results store there; workers (processes, possibly on other machines) each run
``fewbench run RUN_DIR``, claim free cells one at a time in the store, and
heartbeat while they work, so a worker that dies loses at most its cell's
progress since the last checkpoint: another worker takes the cell over.
An executor decides where those workers run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class WorkerCommand:
    """What every worker runs: ``fewbench run RUN_DIR`` with the driver's options."""

    run_dir: Path
    options: list[str] = field(default_factory=list)  # --data-root, --cache-dir, ...


class Executor:
    """Base class of executor plugins: ``run`` works the run directory's cells through."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any):
        self.config = params

    def run(self, command: WorkerCommand, log) -> int:
        """Run workers until no cell is left to do; return the exit code (0, 1 or 130)."""
        raise NotImplementedError
