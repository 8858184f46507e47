"""The results store: one SQLite database per run directory.

Tables: ``meta`` (suite text, environment), ``cells`` (configuration, status and
summary of each cell), ``episodes`` (per-episode test metric, so that methods can
be paired episode by episode), ``curve`` (training loss and validation metric
by iteration), ``protocols`` (each finished cell's protocol card, JSON:
:mod:`fewbench.running.protocol`) and ``costs`` (each finished cell's cost record, JSON:
:mod:`fewbench.running.cost`); the last two are tables of their own, added later, so a store
written before them opens read-only without them. A cell's completion is written in one
transaction, so a crash leaves either the whole result or none of it.

Units: metrics are stored as the task type computes them, unscaled: accuracy as a
fraction (0.9633, in ``mean``, ``ci95``, ``best_val``, ``episodes.value`` and
``curve.val_metric``; ``metric`` names it), mean squared error as is. Everything a
person reads (progress, logs, reports) shows accuracy in percent
(:meth:`fewbench.plugin.task_types.TaskType.format`).

Several workers may share one run directory: each claims a cell in an
``IMMEDIATE`` transaction (one writer at a time), keeps it with a heartbeat, and a
cell whose worker stopped beating is claimed again. A cell completes at most once:
a late second completion finds it done and writes nothing. SQLite's locking needs
a local file system; do not share a run directory's database over NFS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from fewbench.errors import FewbenchError
from fewbench.running.heartbeat import Heartbeat
from fewbench.storage.faults import crash_point
from fewbench.storage.sink import CellResult, CurvePoint, ResultSink
from fewbench.suite.cell import Cell

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    config TEXT NOT NULL,
    dataset TEXT NOT NULL,
    ways INTEGER NOT NULL,
    shots INTEGER NOT NULL,
    backbone TEXT NOT NULL,
    learner TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    error TEXT,
    metric TEXT,
    mean REAL,
    ci95 REAL,
    iterations INTEGER,
    best_iteration INTEGER,
    best_val REAL,
    engine TEXT,
    train_seconds REAL,
    eval_seconds REAL,
    worker TEXT,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    completions INTEGER NOT NULL DEFAULT 0,
    updated_at REAL
);
CREATE TABLE IF NOT EXISTS suite_versions (
    digest TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    first_run REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS episodes (
    cell_id TEXT NOT NULL REFERENCES cells(id),
    episode INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (cell_id, episode)
);
CREATE TABLE IF NOT EXISTS episode_extras (
    cell_id TEXT NOT NULL REFERENCES cells(id),
    name TEXT NOT NULL,
    episode INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (cell_id, name, episode)
);
CREATE TABLE IF NOT EXISTS protocols (
    cell_id TEXT PRIMARY KEY REFERENCES cells(id),
    card TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS costs (
    cell_id TEXT PRIMARY KEY REFERENCES cells(id),
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS curve (
    cell_id TEXT NOT NULL REFERENCES cells(id),
    iteration INTEGER NOT NULL,
    loss REAL,
    val_metric REAL,
    PRIMARY KEY (cell_id, iteration)
);
"""

DB_NAME = "results.sqlite"


READ_TABLES = ("meta", "cells", "episodes", "curve")  # what readers need of a store
SQLITE_READONLY, SQLITE_CANTOPEN = 8, 14  # primary result codes (sqlite3 names them from 3.11)


def damaged(path: Path, reason: str) -> FewbenchError:
    """The one-line error for a store SQLite cannot read, saying what survives it."""
    run_dir = Path(path).parent
    return FewbenchError(
        f"{path} is damaged ({reason}); what can be recovered: the checkpoints under "
        f"{run_dir}/checkpoints and, for cluster runs, {run_dir}/cells/*/result.json"
    )


def _is_damage(exc: sqlite3.Error) -> bool:
    """Corruption (SQLITE_CORRUPT, SQLITE_NOTADB) is a bare DatabaseError; locks, missing
    files and permissions are OperationalErrors."""
    return type(exc) is sqlite3.DatabaseError


@contextlib.contextmanager
def damage_reported(path: Path) -> Iterator[None]:
    """Turn corruption found while reading (past the pages that opening reads) into
    :func:`damaged`."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if not _is_damage(exc):
            raise
        raise damaged(path, str(exc)) from None


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that never writes the store.

    Where the folder is writable, a ``query_only`` connection: a plain WAL reader that
    removes the ``-wal``/``-shm`` files it made when it closes (``mode=ro`` leaves them).
    Elsewhere ``mode=ro``, and ``immutable=1`` when SQLite cannot make the ``-shm`` file
    beside a WAL store (nobody can write such a folder, so nothing changes under us).
    """
    uri = path.resolve().as_uri()  # percent-encodes any byte of the name
    if os.access(path.parent, os.W_OK) and os.access(path, os.W_OK):
        db = sqlite3.connect(f"{uri}?mode=rw", uri=True, timeout=60, isolation_level=None)
        db.execute("PRAGMA query_only=ON")
        return db
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60, isolation_level=None)
    try:
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError:
        db.close()
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None)


def _refuse_empty(path: Path, readonly: bool) -> None:
    """An empty store in a run directory (one with suite.yaml) lost its contents: opening
    it as new would make ``run`` train every cell again."""
    empty = path.is_file() and path.stat().st_size == 0
    if empty and (readonly or (path.parent / "suite.yaml").is_file()):
        raise damaged(path, "the file is empty")


def _open_error(path: Path, exc: sqlite3.Error, readonly: bool) -> FewbenchError | None:
    """The one-line error for a store that cannot be opened; None: not the user's to fix."""
    if _is_damage(exc):
        return damaged(path, str(exc))
    if readonly:
        return FewbenchError(f"cannot read {path}: {exc}")
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # Python 3.11+
    if code in (SQLITE_READONLY, SQLITE_CANTOPEN):
        return FewbenchError(f"cannot write {path}: {exc}")
    return None


class ResultsStore:
    def __init__(self, path: Path, *, readonly: bool = False):
        """``readonly``: for readers (reports, status), which must work on a run directory
        they cannot write and must not change it."""
        self.path, self.readonly = Path(path), readonly
        _refuse_empty(self.path, readonly)
        try:
            self.db = self._connect()
        except sqlite3.Error as exc:
            raise (_open_error(self.path, exc, readonly) or exc) from None

    def _connect(self) -> sqlite3.Connection:
        """Connect and read the schema: the cheap query that finds a damaged file."""
        if self.readonly:
            db = _connect_readonly(self.path)
        else:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            if self.readonly:
                missing = [name for name in READ_TABLES if name not in tables]
                if missing:
                    raise sqlite3.DatabaseError(f"no table {missing[0]}: not a results store")
            else:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction; IMMEDIATE takes the write lock up front, so two
        workers never both read a cell as free and then both claim it."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "full" not in str(exc):
                raise
            from fewbench.errors import DiskFull

            raise DiskFull(
                f"no space left for {self.path} ({exc}); free some space and run the same "
                "command again: what was stored before is kept"
            ) from None

    @classmethod
    def open_run(
        cls, run_dir: Path, *, must_exist: bool = False, readonly: bool = False
    ) -> ResultsStore:
        """The store of ``run_dir``; ``readonly`` implies ``must_exist``."""
        path = Path(run_dir) / DB_NAME
        if (must_exist or readonly) and not path.is_file():
            raise FewbenchError(f"{run_dir}: no {DB_NAME} here; is this a fewbench run directory?")
        return cls(path, readonly=readonly)

    def close(self) -> None:
        self.db.close()

    def set_meta(self, key: str, value: Any) -> None:
        text = value if isinstance(value, str) else json.dumps(value, indent=2, sort_keys=True)
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, text))

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def add_cells(self, cells: Iterable[Cell]) -> None:
        """Register cells as pending; cells already known (same id) keep their state, and take
        the new configuration (settings left out of the id, such as ``eval.chunk``, may change:
        workers run the stored configuration)."""
        with self.transaction():
            self.db.executemany(
                "INSERT INTO cells (id, label, config, dataset, ways, shots, backbone, learner, seed,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET config = excluded.config",
                [
                    (
                        c.id,
                        c.label,
                        json.dumps(c.config, sort_keys=True),
                        c.labels["dataset"],
                        c.ways,
                        c.shots,
                        c.labels["backbone"],
                        c.labels["learner"],
                        c.config["seed"],
                        time.time(),
                    )
                    for c in cells
                ],
            )

    def status(self, cell_id: str) -> str | None:
        row = self.db.execute("SELECT status FROM cells WHERE id = ?", (cell_id,)).fetchone()
        return row[0] if row else None

    def mark(
        self,
        cell_id: str,
        status: str,
        error: str | None = None,
        engine: str | None = None,
        metric: str | None = None,
    ) -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE cells SET status = ?, error = ?, engine = COALESCE(?, engine),"
                " metric = COALESCE(?, metric), updated_at = ? WHERE id = ? AND status != 'done'",
                (status, error, engine, metric, time.time(), cell_id),
            )

    def save_curve(self, cell_id: str, points: list[CurvePoint]) -> None:
        with self.transaction():
            self._write_curve(cell_id, points)

    def _write_curve(
        self, cell_id: str, points: list[tuple[int, float | None, float | None]]
    ) -> None:
        self.db.execute("DELETE FROM curve WHERE cell_id = ?", (cell_id,))
        self.db.executemany(
            "INSERT INTO curve (cell_id, iteration, loss, val_metric) VALUES (?, ?, ?, ?)",
            [(cell_id, *point) for point in points],
        )

    def complete(self, cell_id: str, result: CellResult) -> bool:
        """Write a finished cell's results and status in one transaction.

        Returns False (and writes nothing) when the cell is already done, for
        example finished by another worker that took it over.
        """
        with self.transaction():
            if self.status(cell_id) == "done":
                return False
            self.db.execute("DELETE FROM episodes WHERE cell_id = ?", (cell_id,))
            self.db.executemany(
                "INSERT INTO episodes (cell_id, episode, value) VALUES (?, ?, ?)",
                [(cell_id, i, float(v)) for i, v in enumerate(result.values)],
            )
            self.db.execute("DELETE FROM episode_extras WHERE cell_id = ?", (cell_id,))
            self.db.executemany(
                "INSERT INTO episode_extras (cell_id, name, episode, value) VALUES (?, ?, ?, ?)",
                [
                    (cell_id, name, i, float(v))
                    for name, values in result.extras.items()
                    for i, v in enumerate(values)
                ],
            )
            self._write_curve(cell_id, result.curve)
            self.db.execute("DELETE FROM protocols WHERE cell_id = ?", (cell_id,))
            if result.protocol is not None:
                self.db.execute(
                    "INSERT INTO protocols (cell_id, card) VALUES (?, ?)",
                    (cell_id, json.dumps(result.protocol, sort_keys=True)),
                )
            self.db.execute("DELETE FROM costs WHERE cell_id = ?", (cell_id,))
            if result.cost is not None:
                self.db.execute(
                    "INSERT INTO costs (cell_id, record) VALUES (?, ?)",
                    (cell_id, json.dumps(result.cost, sort_keys=True)),
                )
            crash_point("results-commit")
            self.db.execute(
                "UPDATE cells SET status = 'done', error = NULL, metric = ?, mean = ?, ci95 = ?, iterations = ?,"
                " best_iteration = ?, best_val = ?, engine = ?, train_seconds = ?, eval_seconds = ?,"
                " completions = completions + 1, heartbeat = NULL, updated_at = ? WHERE id = ?",
                (
                    result.metric,
                    result.mean,
                    result.ci95,
                    result.iterations,
                    result.best_iteration,
                    result.best_val,
                    result.engine,
                    result.train_seconds,
                    result.eval_seconds,
                    time.time(),
                    cell_id,
                ),
            )
        return True

    def claim(
        self,
        worker: str,
        cell_ids: list[str],
        stale_after: float,
        is_dead: Callable[[str], bool] = lambda worker: False,
    ) -> str | None:
        """Take the first cell (in suite order) that is free: pending, interrupted, or
        running under a worker whose heartbeat is older than ``stale_after`` seconds or
        which ``is_dead`` knows to be gone."""
        now = time.time()
        with self.transaction():
            rows = self.db.execute(
                "SELECT id, status, heartbeat, worker FROM cells"
                " WHERE status IN ('pending', 'interrupted', 'running')"
            ).fetchall()
            free = {
                row["id"]
                for row in rows
                if row["status"] != "running"
                or (row["heartbeat"] or 0) < now - stale_after
                or is_dead(row["worker"] or "")
            }
            for cell_id in cell_ids:
                if cell_id in free:
                    self.db.execute(
                        "UPDATE cells SET status = 'running', worker = ?, heartbeat = ?, attempts = attempts + 1,"
                        " updated_at = ? WHERE id = ?",
                        (worker, now, now, cell_id),
                    )
                    return cell_id
        return None

    def busy_elsewhere(self, cell_ids: list[str], worker: str) -> int:
        """How many of ``cell_ids`` other workers are running now."""
        marks = ",".join("?" * len(cell_ids))
        row = self.db.execute(
            f"SELECT COUNT(*) FROM cells WHERE status = 'running' AND worker != ? AND id IN ({marks})",
            (worker, *cell_ids),
        ).fetchone()
        return row[0]

    def beat(self, cell_id: str, worker: str) -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE cells SET heartbeat = ? WHERE id = ? AND worker = ? AND status = 'running'",
                (time.time(), cell_id, worker),
            )

    def record_worker(self, cell_id: str, worker: str | None, attempts: int) -> None:
        """Record who ran a cell reported through its cell folder, and in how many attempts."""
        with self.transaction():
            self.db.execute(
                "UPDATE cells SET worker = ?, attempts = ? WHERE id = ?",
                (worker, attempts, cell_id),
            )

    def queue(self, cell_id: str, where: str, *, refresh_time: bool = True) -> None:
        """A cluster executor handed the cell to its scheduler (``where``: e.g. the job id).

        ``refresh_time=False`` only adds the job id: a task that started meanwhile and
        reported through its cell folder stays the newer word on the cell.
        """
        with self.transaction():
            self.db.execute(
                "UPDATE cells SET status = 'queued', worker = ?, error = NULL,"
                " updated_at = CASE WHEN ? THEN ? ELSE updated_at END"
                " WHERE id = ? AND status != 'done'",
                (where, refresh_time, time.time(), cell_id),
            )

    def unqueue(self, cell_ids: list[str]) -> None:
        """The submission failed: the cells are pending again."""
        with self.transaction():
            self.db.executemany(
                "UPDATE cells SET status = 'pending', worker = NULL, updated_at = ?"
                " WHERE id = ? AND status = 'queued'",
                [(time.time(), cell_id) for cell_id in cell_ids],
            )

    def retry_failed(self) -> int:
        """Put failed cells back to pending; returns how many."""
        with self.transaction():
            return self.db.execute(
                "UPDATE cells SET status = 'pending', updated_at = ? WHERE status = 'failed'",
                (time.time(),),
            ).rowcount

    def add_suite_version(self, text: str) -> str:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        with self.transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO suite_versions (digest, text, first_run) VALUES (?, ?, ?)",
                (digest, text, time.time()),
            )
        return digest

    def set_current_cells(self, cell_ids: list[str]) -> None:
        """The cells of the suite as last run into this directory, in suite order: what
        workers work through (cells of an earlier version of the suite stay stored)."""
        self.set_meta("current_cells", json.dumps(cell_ids))

    def current_cells(self) -> list[str]:
        text = self.meta("current_cells")
        return json.loads(text) if text else [row["id"] for row in self.cells()]

    def cell(self, cell_id: str) -> Cell:
        """A stored cell, as the driver expanded it."""
        row = self.db.execute(
            "SELECT id, label, config, dataset, backbone, learner FROM cells WHERE id = ?",
            (cell_id,),
        ).fetchone()
        if row is None:
            from fewbench.errors import FewbenchError

            raise FewbenchError(f"{self.path}: no cell {cell_id}")
        labels = {"dataset": row["dataset"], "backbone": row["backbone"], "learner": row["learner"]}
        return Cell.from_config(json.loads(row["config"]), row["label"], labels, row["id"])

    def cells(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM cells ORDER BY rowid").fetchall()

    def episode_values(self, cell_id: str) -> list[float]:
        rows = self.db.execute(
            "SELECT value FROM episodes WHERE cell_id = ? ORDER BY episode", (cell_id,)
        )
        return [row[0] for row in rows]

    def episode_extras(self, cell_id: str) -> dict[str, list[float]]:
        """The cell's further per-episode values by name (empty in a store from before
        they existed)."""
        try:
            rows = self.db.execute(
                "SELECT name, value FROM episode_extras WHERE cell_id = ? ORDER BY name, episode",
                (cell_id,),
            ).fetchall()
        except sqlite3.OperationalError:  # a read-only store written before the table existed
            return {}
        extras: dict[str, list[float]] = {}
        for name, value in rows:
            extras.setdefault(name, []).append(value)
        return extras

    def protocol(self, cell_id: str) -> dict[str, Any] | None:
        """The cell's protocol card; None when none was stored (a cell of before cards, a
        read-only store written before the table existed, or a card that is not JSON)."""
        return self._json_record("SELECT card FROM protocols WHERE cell_id = ?", cell_id)

    def cost(self, cell_id: str) -> dict[str, Any] | None:
        """The cell's cost record; None when none was stored (as :meth:`protocol`)."""
        return self._json_record("SELECT record FROM costs WHERE cell_id = ?", cell_id)

    def _json_record(self, query: str, cell_id: str) -> dict[str, Any] | None:
        try:
            row = self.db.execute(query, (cell_id,)).fetchone()
        except sqlite3.OperationalError:  # a read-only store written before the table existed
            return None
        try:
            record = json.loads(row[0]) if row is not None else None
        except (TypeError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def curve(self, cell_id: str) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT iteration, loss, val_metric FROM curve WHERE cell_id = ? ORDER BY iteration",
            (cell_id,),
        ).fetchall()


@contextlib.contextmanager
def _beat_connection(path: Path, cell_id: str, worker: str) -> Iterator[Callable[[], None]]:
    """The beat of a claimed cell, on the heartbeat thread's own connection (SQLite
    connections stay in the thread that opened them)."""
    store = ResultsStore(path)
    try:
        yield lambda: store.beat(cell_id, worker)
    finally:
        store.close()


class StoreSink(ResultSink):
    """A cell claimed in the results store by ``worker`` reports there."""

    def __init__(self, store: ResultsStore, cell_id: str, worker: str):
        self.store, self.cell_id, self.worker = store, cell_id, worker

    def started(self, engine: str, metric: str | None = None) -> None:
        self.store.mark(self.cell_id, "running", engine=engine, metric=metric)

    def save_curve(self, curve: list[CurvePoint]) -> None:
        self.store.save_curve(self.cell_id, curve)

    def complete(self, result: CellResult) -> bool:
        return self.store.complete(self.cell_id, result)

    def failed(self, reason: str) -> None:
        self.store.mark(self.cell_id, "failed", error=reason)

    def interrupted(self, reason: str) -> None:
        self.store.mark(self.cell_id, "interrupted", error=reason)

    def heartbeat(self, interval: float) -> Heartbeat:
        return Heartbeat(
            lambda: _beat_connection(self.store.path, self.cell_id, self.worker), interval
        )
