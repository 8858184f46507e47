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
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fewbench.errors import FewbenchError
from fewbench.running.heartbeat import Heartbeat
from fewbench.storage.atomic import write_json_atomically
from fewbench.storage.sink import CellResult, CurvePoint, ResultSink
from fewbench.storage.store import ResultsStore, damage_reported
from fewbench.suite.cell import Cell

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

    def started(self, engine: str, metric: str | None = None) -> None:
        self._write_state(status="running", error=None, engine=engine, metric=metric)

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


NUMBER = (int, float)
NONE = type(None)
# What result.json and state.json must hold: they come from tasks on other machines and
# may be cut short or edited, and SQLite would store a value of the wrong type as it is.
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "metric": (str,),
    "engine": (str,),
    "mean": NUMBER,
    "ci95": NUMBER,
    "train_seconds": NUMBER,
    "eval_seconds": NUMBER,
    "iterations": (int,),
    "best_iteration": (int, NONE),
    "best_val": (*NUMBER, NONE),
    "worker": (str, NONE),
    "attempts": (int,),
    "protocol": (dict, NONE),
    "cost": (dict, NONE),
}
STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "status": (str,),
    "updated_at": NUMBER,
    "worker": (str, NONE),
    "attempts": (int,),
    "started": NUMBER,
    "heartbeat": NUMBER,
    "resumed_from": (int, NONE),
    "error": (str, NONE),
    "engine": (str, NONE),
    "metric": (str, NONE),
}
STATE_REQUIRED = ("status", "updated_at")
_warned: set[Path] = set()  # executors collect at every poll: warn of a file once


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def _check_fields(
    payload: Any, fields: dict[str, tuple[type, ...]], required: Iterable[str]
) -> None:
    """Raise KeyError or TypeError where ``payload`` is not what ``fields`` say."""
    if not isinstance(payload, dict):
        raise TypeError(f"not a JSON object but {type(payload).__name__}")
    for key in required:
        if key not in payload:
            raise KeyError(key)
    for key, kinds in fields.items():
        if key in payload and not _is(payload[key], kinds):
            raise TypeError(
                f"'{key}' has a value of the wrong type ({type(payload[key]).__name__})"
            )


def _check_curve(curve: Any, name: str) -> None:
    points = isinstance(curve, list) and all(
        isinstance(p, list)
        and len(p) == 3
        and _is(p[0], (int,))
        and all(_is(v, (*NUMBER, NONE)) for v in p[1:])
        for p in curve
    )
    if not points:
        raise TypeError(f"'{name}' is not a list of [iteration, loss, validation] points")


def checked_result(payload: Any) -> CellResult:
    """A ``result.json`` as a :class:`CellResult`; KeyError, TypeError or ValueError where
    it is not one."""
    _check_fields(payload, RESULT_FIELDS, [*RESULT_FIELDS, "values", "curve"])
    values = payload["values"]
    if not isinstance(values, list) or not values or not all(_is(v, NUMBER) for v in values):
        raise TypeError("'values' is not a non-empty list of numbers")
    _check_curve(payload["curve"], "curve")
    return CellResult.from_json(payload)


def _read_checked(path: Path, check: Callable[[Any], object]) -> tuple[Any | None, str | None]:
    """A cell folder's file and, when it exists but is unusable, why (else None)."""
    if not path.exists():
        return None, None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        check(payload)
    except OSError as exc:
        return None, exc.strerror or str(exc)
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc})"
    except KeyError as exc:
        return None, f"no key {exc}"
    except (TypeError, ValueError) as exc:
        return None, str(exc)
    return payload, None


def journal_states(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every cell folder's view: ``state``, ``result`` (dicts or None), ``curve`` (list or
    None), and ``errors``: file name -> why that file, present, cannot be used."""
    root = Path(run_dir) / CELLS_DIR
    if not root.is_dir():
        return {}
    checks: dict[str, Callable[[Any], object]] = {
        "state": lambda payload: _check_fields(payload, STATE_FIELDS, STATE_REQUIRED),
        "result": checked_result,
        "curve": lambda payload: _check_curve(payload, "curve.json"),
    }
    views = {}
    for folder in sorted(root.iterdir()):
        if folder.is_dir():
            view: dict[str, Any] = {"errors": {}}
            for name, check in checks.items():
                view[name], error = _read_checked(folder / f"{name}.json", check)
                if error is not None:
                    view["errors"][f"{name}.json"] = error
            views[folder.name] = view
    return views


def _warn_once(path: Path, reason: str) -> None:
    if path not in _warned:
        _warned.add(path)
        print(f"fewbench: warning: {path}: {reason}; not collected", file=sys.stderr)


def collect(run_dir: Path, store: ResultsStore | None = None) -> dict[str, int]:
    """Copy finished and failed cells from the cell folders into the results store.

    Idempotent: a cell already done in the store is left alone, so running it twice,
    or after the driver already collected, changes nothing. A cell whose result.json
    cannot be read is left out, with a warning. Returns counts.
    """
    own = store is None
    store = store or ResultsStore.open_run(run_dir, must_exist=True)
    counts = {"done": 0, "failed": 0}
    try:
        with damage_reported(store.path):
            _collect_into(store, run_dir, counts)
    finally:
        if own:
            store.close()
    return counts


def _collect_into(store: ResultsStore, run_dir: Path, counts: dict[str, int]) -> None:
    """:func:`collect`'s work: each cell folder newer than the store's word on its cell."""
    known = {row["id"]: row for row in store.cells()}
    for cell_id, view in journal_states(run_dir).items():
        row = known.get(cell_id)
        if row is None or row["status"] == "done":
            continue
        if "result.json" in view["errors"]:
            path = cell_dir(run_dir, cell_id) / "result.json"
            _warn_once(path, view["errors"]["result.json"])
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
