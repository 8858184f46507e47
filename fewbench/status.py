"""``fewbench status RUN_DIR``: where every cell of a run stands, from the store alone."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from fewbench.store import ResultsStore

STATES = ("done", "running", "pending", "interrupted", "failed")


def cell_table(run_dir: Path) -> pd.DataFrame:
    store = ResultsStore.open_run(run_dir, must_exist=True)
    try:
        rows = []
        now = time.time()
        for cell in store.cells():
            latest = store.db.execute(
                "SELECT iteration, val_metric FROM curve WHERE cell_id = ? AND val_metric IS NOT NULL"
                " ORDER BY iteration DESC LIMIT 1",
                (cell["id"],),
            ).fetchone()
            if cell["status"] == "done":
                elapsed = (cell["train_seconds"] or 0) + (cell["eval_seconds"] or 0)
            elif cell["status"] == "running" and cell["updated_at"]:
                elapsed = now - cell["updated_at"]
            else:
                elapsed = None
            rows.append(
                {
                    "cell": cell["label"],
                    "status": cell["status"],
                    "worker": cell["worker"] or "",
                    "elapsed_s": elapsed,
                    "latest_val": None if latest is None else latest["val_metric"],
                    "at_iteration": None if latest is None else latest["iteration"],
                    "metric": cell["metric"],
                    "mean": cell["mean"],
                }
            )
        return pd.DataFrame(rows)
    finally:
        store.close()


def summary(table: pd.DataFrame, workers: int | None = None) -> str:
    """One line: counts per state and, once something is done, an estimate of the time left."""
    counts = table["status"].value_counts() if len(table) else pd.Series(dtype=int)
    parts = [
        f"{int(counts.get(s, 0))} {s}" for s in STATES if counts.get(s, 0) or s != "interrupted"
    ]
    done = table[table["status"] == "done"]
    left = len(table) - len(done) - int(counts.get("failed", 0))
    if len(done) and left:
        per_cell = done["elapsed_s"].mean()
        parallel = workers or max(1, int(counts.get("running", 0)))
        parts.append(f"about {per_cell * left / parallel / 60:.0f} min left")
    return ", ".join(parts)


def render_status(run_dir: Path) -> str:
    table = cell_table(run_dir)
    if table.empty:
        return "no cells in this run\n"
    shown = pd.DataFrame(
        {
            "cell": table["cell"],
            "status": table["status"],
            "worker": table["worker"],
            "elapsed": [_duration(v) for v in table["elapsed_s"]],
            "latest validation": [
                "" if v is None or pd.isna(v) else f"{_value(v, m)} (it {int(i)})"
                for v, i, m in zip(
                    table["latest_val"], table["at_iteration"], table["metric"], strict=True
                )
            ],
        }
    )
    return shown.to_string(index=False) + "\n\n" + summary(table) + "\n"


def _duration(seconds: float | None) -> str:
    if seconds is None or pd.isna(seconds):
        return ""
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _value(value: float, metric: str | None) -> str:
    return f"{value:.4f}" if metric == "mse" else f"{100 * value:.2f}%"
