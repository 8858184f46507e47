"""Reports from a results store built by hand: seeds merged, failed cells shown."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from fewbench.grid import Cell
from fewbench.report import render
from fewbench.stats import mean_ci95
from fewbench.store import ResultsStore


def cell(learner: str, seed: int, shots: int = 1) -> Cell:
    config = {
        "dataset": {"name": "toy"},
        "backbone": {"name": "conv4"},
        "learner": {"name": learner},
        "tasks": {"ways": 5, "shots": shots, "query": 1},
        "train": {},
        "eval": {},
        "seed": seed,
    }
    return Cell(
        f"{learner}-{seed}-{shots}",
        f"toy/5w{shots}s/conv4/{learner}/seed{seed}",
        config,
        {"dataset": "toy", "backbone": "conv4", "learner": learner},
    )


@pytest.fixture
def run_dir(tmp_path):
    store = ResultsStore.open_run(tmp_path)
    cells = [
        cell("maml", 0),
        cell("maml", 1),
        cell("finetune", 0),
        cell("finetune", 1),
        cell("maml", 0, 5),
    ]
    store.add_cells(cells)
    rng = np.random.default_rng(0)
    values = {}
    for c in cells[:3]:
        values[c.id] = rng.uniform(0.5, 1.0, size=8).round(3)
        store.complete(
            c.id,
            metric="accuracy",
            values=values[c.id].tolist(),
            mean=float(values[c.id].mean()),
            ci95=0.0,
            curve=[(1, 1.0, 0.5)],
            iterations=1,
            best_iteration=1,
            best_val=0.5,
            engine="test",
            train_seconds=1.0,
            eval_seconds=1.0,
        )
    store.mark(cells[3].id, "failed", error="training loss became nan at iteration 3")
    store.close()
    return tmp_path, values


def test_csv_merges_seeds_with_the_crossed_interval(run_dir):
    path, values = run_dir
    rows = {(r["learner"], r["shots"]): r for r in csv.DictReader(io.StringIO(render(path, "csv")))}
    maml = rows[("maml", "1")]
    estimate = mean_ci95(np.stack([values["maml-0-1"], values["maml-1-1"]]))
    assert (maml["seeds"], maml["episodes"], maml["status"]) == ("2", "8", "done")
    assert maml["engine"] == "test"
    assert float(maml["accuracy"]) == pytest.approx(100 * estimate.mean, abs=1e-3)
    assert float(maml["ci95"]) == pytest.approx(100 * estimate.ci95, abs=1e-3)
    # One seed done, one failed: the done seed is reported and the failure is visible.
    finetune = rows[("finetune", "1")]
    assert finetune["seeds"] == "1" and "1 failed" in finetune["status"]
    # Nothing done yet: shown as pending, never dropped.
    pending = rows[("maml", "5")]
    assert (
        pending["seeds"] == "0" and pending["accuracy"] == "" and pending["status"] == "1 pending"
    )


def test_table_pivots_learners_against_settings(run_dir):
    path, _ = run_dir
    table = render(path, "table", decimals=1)
    header = table.splitlines()[0]
    assert "toy 5-way 1-shot" in header and "toy 5-way 5-shot" in header
    assert "1 pending" in table and "failed" in table and " ± " in table
