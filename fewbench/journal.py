"""Per-cell files: how cluster workers report, so that SQLite never has concurrent writers.

SQLite's locking is not safe on a network file system, and a cluster's run
directory lies on one. So workers started by a cluster executor (``ray``,
``slurm``) never open the results store. Each writes only its own cell's folder,
``RUN_DIR/cells/<cell id>/``, every file by an atomic rename:

- ``state.json``: running / failed / interrupted, the worker (host:pid), the
  attempt number, when the attempt started and its latest heartbeat;
- ``curve.json``: the training curve so far (the latest validation for ``status``);
- ``cell.json``: the cell itself (its configuration), written by the driver when it
  queues the cell, so that the task needs neither the suite file nor the store;
- ``result.json``: the finished cell. Its rename is the commit: a cell with a
  ``result.json`` is done, whatever else happened.

The scheduler runs one task per cell (a retry or requeue starts after the
previous attempt ended), so each folder has one writer at a time. The driver,
or ``fewbench collect RUN_DIR``, is the only writer of the results store: it
copies finished and failed cells from these files into it (:func:`collect`).
``fewbench status`` reads both, so it shows cells that are still running.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from fewbench.atomic import write_json_atomically
from fewbench.cell import Cell
from fewbench.errors import FewbenchError
from fewbench.heartbeat import Heartbeat
from fewbench.sink import CellResult, CurvePoint, ResultSink
from fewbench.store import ResultsStore

CELLS_DIR = "cells"


def cell_dir(run_dir: Path, cell_id: str) -> Path:
    return Path(run_dir) / CELLS_DIR / cell_id


def write_json(path: Path, payload: Any) -> None:
    """Write JSON by an atomic rename (also on NFS)."""
    write_json_atomically(path, payload)


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_cell(run_dir: Path, cell: Cell) -> None:
    """The cell's configuration, for the task that will run it."""
    write_json(cell_dir(run_dir, cell.id) / "cell.json", cell.to_record())


def read_cell(run_dir: Path, cell_id: str) -> Cell:
    record = read_json(cell_dir(run_dir, cell_id) / "cell.json")
    if record is None:
        raise FewbenchError(
            f"{cell_dir(run_dir, cell_id)}/cell.json is missing or unreadable: "
            "the driver writes it when it queues the cell"
        )
    return Cell.from_record(record)


class CellJournal(ResultSink):
    """A cell's results sink in its own folder instead of the shared database."""

    def __init__(self, run_dir: Path, cell_id: str, worker: str):
        self.folder = cell_dir(run_dir, cell_id)
        self.cell_id, self.worker = cell_id, worker
        self.state: dict[str, Any] = read_json(self.folder / "state.json") or {}
        self._lock = threading.RLock()  # the heartbeat thread and signal handlers write too

    @property
    def done(self) -> bool:
        return (self.folder / "result.json").is_file()

    def start(self, **details: Any) -> int:
        """Begin an attempt; returns its number (1 for the first, 2 after a retry or requeue).
        ``details`` (an executor's ``note``, its node or job) are kept in the state file."""
        now = time.time()
        attempts = int(self.state.get("attempts", 0)) + 1
        self._write_state(
            status="running",
            worker=self.worker,
            attempts=attempts,
            started=now,
            heartbeat=now,
            error=None,
            resumed_from=None,
            **details,
        )
        return attempts

    def _write_state(self, **changes: Any) -> None:
        with self._lock:
            self.state = {**self.state, **changes, "updated_at": time.time()}
            write_json(self.folder / "state.json", self.state)

    def started(self, engine: str) -> None:
        self._write_state(status="running", error=None, engine=engine)

    def failed(self, reason: str) -> None:
        self._write_state(status="failed", error=reason)

    def interrupted(self, reason: str) -> None:
        self._write_state(status="interrupted", error=reason)

    def resumed(self, iteration: int) -> None:
        self._write_state(resumed_from=iteration)

    def beat(self) -> None:
        self._write_state(heartbeat=time.time())

    def heartbeat(self, interval: float) -> Heartbeat:
        return Heartbeat.calling(self.beat, interval)

    def save_curve(self, curve: list[CurvePoint]) -> None:
        write_json(self.folder / "curve.json", [list(p) for p in curve])

    def complete(self, result: CellResult) -> bool:
        if self.done:
            return False
        write_json(
            self.folder / "result.json",
            {
                **result.to_json(),
                "worker": self.worker,
                "attempts": self.state.get("attempts", 1),
                "finished": time.time(),
            },
        )
        self._write_state(status="done", error=None)
        return True


def journal_states(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every cell folder's view: ``state`` (dict or None), ``result`` (dict or None), ``curve``."""
    root = Path(run_dir) / CELLS_DIR
    if not root.is_dir():
        return {}
    views = {}
    for folder in sorted(root.iterdir()):
        if folder.is_dir():
            views[folder.name] = {
                "state": read_json(folder / "state.json"),
                "result": read_json(folder / "result.json"),
                "curve": read_json(folder / "curve.json"),
            }
    return views


def collect(run_dir: Path, store: ResultsStore | None = None) -> dict[str, int]:
    """Copy finished and failed cells from the cell folders into the results store.

    Idempotent: a cell already done in the store is left alone, so running it twice,
    or after the driver already collected, changes nothing. Returns counts.
    """
    own = store is None
    store = store or ResultsStore.open_run(run_dir, must_exist=True)
    counts = {"done": 0, "failed": 0}
    try:
        known = {row["id"]: row for row in store.cells()}
        for cell_id, view in journal_states(run_dir).items():
            row = known.get(cell_id)
            if row is None or row["status"] == "done":
                continue
            result, state = view["result"], view["state"] or {}
            if result is not None:
                if store.complete(cell_id, CellResult.from_json(result)):
                    store.record_worker(cell_id, result["worker"], result["attempts"])
                    counts["done"] += 1
            elif state.get("status") == "failed" and (row["updated_at"] or 0) < state["updated_at"]:
                if view["curve"]:
                    store.save_curve(cell_id, [tuple(p) for p in view["curve"]])
                store.mark(cell_id, "failed", error=state.get("error"), engine=state.get("engine"))
                store.record_worker(cell_id, state.get("worker"), state.get("attempts", 1))
                counts["failed"] += 1
    finally:
        if own:
            store.close()
    return counts
