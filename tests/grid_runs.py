"""A small real Omniglot grid, run by the executor tests, and its sequential reference."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO, run_cli

SUITE = """\
name: workers
seeds: [0, 1]
datasets: [{name: omniglot}]
tasks: {ways: 5, shots: 1, query: 2}
backbones: [{name: conv4, hidden: 16}]
learners:
  - {name: maml, meta_batch_size: 2, threads: 1}
  - {name: finetune, batch_size: 16}
train: {iterations: ITERATIONS, validate_every: 4, val_episodes: 4, log_every: 1, checkpoint_every: 2}
eval: {episodes: 10, query: 3}
"""

_sequential: dict[int, dict[str, list[float]]] = {}


def write_suite(tmp_path: Path, iterations: int, extra: str = "") -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE.replace("ITERATIONS", str(iterations)) + extra)
    return path


def results(run_dir: Path) -> dict[str, list[float]]:
    """Per-episode test results of every done cell, from the results store."""
    db = sqlite3.connect(run_dir / "results.sqlite")
    out: dict[str, list[float]] = {}
    for cell_id, value in db.execute(
        "SELECT cell_id, value FROM episodes ORDER BY cell_id, episode"
    ):
        out.setdefault(cell_id, []).append(value)
    return out


def cells(run_dir: Path) -> list[sqlite3.Row]:
    db = sqlite3.connect(run_dir / "results.sqlite")
    db.row_factory = sqlite3.Row
    return db.execute("SELECT * FROM cells").fetchall()


def sequential(iterations: int, tmp_path: Path, data_root: Path, cache_dir: Path) -> dict:
    """The grid run cell after cell in one process (computed once per session)."""
    if iterations not in _sequential:
        folder = tmp_path / f"sequential-{iterations}"
        folder.mkdir(parents=True, exist_ok=True)
        suite = write_suite(folder, iterations)
        done = run_cli(
            "run", str(suite), "--out", str(folder / "run"), "--data-root", str(data_root),
            "--threads", "1", env={"FEWBENCH_CACHE": str(cache_dir)},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        _sequential[iterations] = results(folder / "run")
    return _sequential[iterations]


def assert_every_cell_ran_once(run_dir: Path, attempts: int = 1) -> list[sqlite3.Row]:
    """All 4 cells done, each completed once and (but for a killed one) in one attempt."""
    rows = cells(run_dir)
    assert len(rows) == 4, rows
    assert all(r["status"] == "done" and r["completions"] == 1 for r in rows), [
        dict(r) for r in rows
    ]
    assert sum(r["attempts"] for r in rows) == 4 + attempts - 1, [dict(r) for r in rows]
    return rows


def start_driver(argv: list[str], cache_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "FEWBENCH_CACHE": str(cache_dir)}
    return subprocess.Popen(
        [sys.executable, "-m", "fewbench", "run", *argv],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_running_maml_cell(
    run_dir: Path, driver: subprocess.Popen, seconds: float = 240
) -> tuple[str, dict]:
    """Poll the cell folders of a cluster run until a MAML cell is running its first attempt
    past its second validation (iteration 8); returns its id and state."""
    deadline = time.time() + seconds
    maml: set[str] = set()
    while time.time() < deadline and driver.poll() is None:
        time.sleep(0.3)
        if not maml and (run_dir / "results.sqlite").exists():
            try:
                maml = {row["id"] for row in cells(run_dir) if row["learner"] == "maml"}
            except sqlite3.OperationalError:
                continue
        for cell_id in sorted(maml):
            folder = run_dir / "cells" / cell_id
            try:
                state = json.loads((folder / "state.json").read_text())
                curve = json.loads((folder / "curve.json").read_text())
            except (OSError, ValueError):
                continue
            running = state.get("status") == "running" and state.get("attempts") == 1
            # The curve is saved at each validation (every 4 iterations), just before that
            # iteration's checkpoint (every 2): once it reaches 8, the checkpoint of iteration
            # 6 is on disk for sure, so a resumed attempt starts at iteration 6 or later.
            if running and any(point[0] >= 8 for point in curve):
                return cell_id, state
    _, stderr = driver.communicate(timeout=60) if driver.poll() is not None else ("", "")
    raise AssertionError(f"no MAML cell got far enough in time; the driver said: {stderr[-3000:]}")
