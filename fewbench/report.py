"""Tables from the results store (never reruns anything)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from fewbench.stats import mean_ci95
from fewbench.store import ResultsStore

SETTING = ["dataset", "ways", "shots", "backbone", "learner"]
FORMATS = ("table", "csv", "markdown", "json")


def settings_frame(store: ResultsStore) -> pd.DataFrame:
    """One row per setting (seeds merged): mean and 95% CI in percent, plus cell status."""
    cells = pd.DataFrame([dict(row) for row in store.cells()])
    if cells.empty:
        return pd.DataFrame(
            columns=[
                *SETTING,
                "seeds",
                "episodes",
                "metric",
                "accuracy",
                "ci95",
                "status",
                "engine",
            ]
        )
    rows = []
    for key, group in cells.groupby(SETTING, sort=False):
        done = group[group["status"] == "done"]
        values = [store.episode_values(cell_id) for cell_id in done["id"]]
        metric = done["metric"].iloc[0] if len(done) else "accuracy"
        row = dict(zip(SETTING, key, strict=True))
        # How the numbers were computed (for MAML: the engine and why), so each is traceable.
        row["engine"] = " | ".join(sorted(set(done["engine"].dropna()))) if len(done) else ""
        counts = group["status"].value_counts()
        status = (
            "done" if len(done) == len(group) else ", ".join(f"{n} {s}" for s, n in counts.items())
        )
        if values:
            episodes = min(len(v) for v in values)
            estimate = mean_ci95(np.array([v[:episodes] for v in values]))
            scale = 100.0 if metric == "accuracy" else 1.0
            row.update(
                seeds=len(values),
                episodes=episodes,
                metric=metric,
                accuracy=scale * estimate.mean,
                ci95=scale * estimate.ci95,
                status=status,
            )
        else:
            row.update(
                seeds=0, episodes=0, metric=metric, accuracy=math.nan, ci95=math.nan, status=status
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _entry(row: pd.Series, decimals: int) -> str:
    if math.isnan(row["accuracy"]):
        return row["status"]
    text = f"{row['accuracy']:.{decimals}f} ± {row['ci95']:.{decimals}f}"
    return text if row["status"] == "done" else f"{text} ({row['status']})"


def pivot(frame: pd.DataFrame, decimals: int = 2) -> pd.DataFrame:
    """Learners (and backbones) as rows, dataset / ways / shots as columns."""
    frame = frame.assign(
        entry=[_entry(row, decimals) for _, row in frame.iterrows()],
        setting=[f"{r.dataset} {r.ways}-way {r.shots}-shot" for r in frame.itertuples()],
    )
    table = frame.pivot_table(
        index=["learner", "backbone"],
        columns="setting",
        values="entry",
        aggfunc="first",
        sort=False,
    )
    table.columns.name = None
    return table.fillna("")


def markdown(table: pd.DataFrame) -> str:
    header = [*table.index.names, *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for index, row in table.iterrows():
        keys = index if isinstance(index, tuple) else (index,)
        lines.append("| " + " | ".join([*map(str, keys), *map(str, row.tolist())]) + " |")
    return "\n".join(lines) + "\n"


def render(run_dir: Path, fmt: str = "table", decimals: int = 2) -> str:
    store = ResultsStore.open_run(run_dir, must_exist=True)
    try:
        frame = settings_frame(store)
    finally:
        store.close()
    columns = [*SETTING, "seeds", "episodes", "accuracy", "ci95", "status"]
    if fmt == "csv":
        return frame[[*columns, "engine"]].to_csv(index=False, float_format=f"%.{decimals + 2}f")
    if fmt == "json":
        records = json.loads(frame[[*columns, "metric", "engine"]].to_json(orient="records"))
        return json.dumps(records, indent=2) + "\n"
    if frame.empty:
        return "no cells in this run\n"
    table = pivot(frame, decimals)
    if fmt == "markdown":
        return markdown(table)
    return table.to_string() + "\n"
