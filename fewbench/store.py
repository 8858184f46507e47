"""The results store: one SQLite database per run directory.

Tables: ``meta`` (suite text, environment), ``cells`` (configuration, status and
summary of each cell), ``episodes`` (per-episode test metric, so that methods can
be paired episode by episode) and ``curve`` (training loss and validation metric
by iteration). A cell's completion is written in one transaction, so a crash
leaves either the whole result or none of it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fewbench.grid import Cell

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
    updated_at REAL
);
CREATE TABLE IF NOT EXISTS episodes (
    cell_id TEXT NOT NULL REFERENCES cells(id),
    episode INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (cell_id, episode)
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


class ResultsStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    @classmethod
    def open_run(cls, run_dir: Path, *, must_exist: bool = False) -> ResultsStore:
        path = Path(run_dir) / DB_NAME
        if must_exist and not path.is_file():
            from fewbench.errors import FewbenchError

            raise FewbenchError(f"{run_dir}: no {DB_NAME} here; is this a fewbench run directory?")
        return cls(path)

    def close(self) -> None:
        self.db.close()

    def set_meta(self, key: str, value: Any) -> None:
        text = value if isinstance(value, str) else json.dumps(value, indent=2, sort_keys=True)
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, text))

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def add_cells(self, cells: Iterable[Cell]) -> None:
        """Register cells as pending; cells already known (same id) keep their state."""
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO cells (id, label, config, dataset, ways, shots, backbone, learner, seed,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        self, cell_id: str, status: str, error: str | None = None, engine: str | None = None
    ) -> None:
        with self.db:
            self.db.execute(
                "UPDATE cells SET status = ?, error = ?, engine = COALESCE(?, engine), updated_at = ? WHERE id = ?",
                (status, error, engine, time.time(), cell_id),
            )

    def save_curve(
        self, cell_id: str, points: list[tuple[int, float | None, float | None]]
    ) -> None:
        with self.db:
            self._write_curve(cell_id, points)

    def _write_curve(
        self, cell_id: str, points: list[tuple[int, float | None, float | None]]
    ) -> None:
        self.db.execute("DELETE FROM curve WHERE cell_id = ?", (cell_id,))
        self.db.executemany(
            "INSERT INTO curve (cell_id, iteration, loss, val_metric) VALUES (?, ?, ?, ?)",
            [(cell_id, *point) for point in points],
        )

    def complete(
        self,
        cell_id: str,
        *,
        metric: str,
        values: list[float],
        mean: float,
        ci95: float,
        curve: list[tuple[int, float | None, float | None]],
        iterations: int,
        best_iteration: int | None,
        best_val: float | None,
        engine: str,
        train_seconds: float,
        eval_seconds: float,
    ) -> None:
        """Write a finished cell's results and status in one transaction."""
        with self.db:
            self.db.execute("DELETE FROM episodes WHERE cell_id = ?", (cell_id,))
            self.db.executemany(
                "INSERT INTO episodes (cell_id, episode, value) VALUES (?, ?, ?)",
                [(cell_id, i, float(v)) for i, v in enumerate(values)],
            )
            self._write_curve(cell_id, curve)
            self.db.execute(
                "UPDATE cells SET status = 'done', error = NULL, metric = ?, mean = ?, ci95 = ?, iterations = ?,"
                " best_iteration = ?, best_val = ?, engine = ?, train_seconds = ?, eval_seconds = ?,"
                " updated_at = ? WHERE id = ?",
                (
                    metric,
                    mean,
                    ci95,
                    iterations,
                    best_iteration,
                    best_val,
                    engine,
                    train_seconds,
                    eval_seconds,
                    time.time(),
                    cell_id,
                ),
            )

    def cells(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM cells ORDER BY rowid").fetchall()

    def episode_values(self, cell_id: str) -> list[float]:
        rows = self.db.execute(
            "SELECT value FROM episodes WHERE cell_id = ? ORDER BY episode", (cell_id,)
        )
        return [row[0] for row in rows]

    def curve(self, cell_id: str) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT iteration, loss, val_metric FROM curve WHERE cell_id = ? ORDER BY iteration",
            (cell_id,),
        ).fetchall()
