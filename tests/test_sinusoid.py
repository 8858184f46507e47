"""Sinusoid regression end to end: generated tasks, MSE as loss and metric, lower is better."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from fewbench.running.evaluation import EpisodeSpec, fixed_episodes
from fewbench_plugins.datasets.sinusoid import Sinusoid


def sources():
    return Sinusoid(**{k: p.default for k, p in Sinusoid.params.items()}).load(None, None)


def test_episodes_are_points_of_one_sine_wave_each():
    batch = sources()["train"].sample_episodes(64, 1, 10, 5, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (64, 10, 1) and batch.query_y.shape == (64, 5, 1)
    x = torch.cat([batch.support_x, batch.query_x], 1)[..., 0]
    y = torch.cat([batch.support_y, batch.query_y], 1)[..., 0]
    assert x.min() >= -5 and x.max() <= 5
    for t in range(64):  # recover A and phase from two points, check every other point fits
        a, b = torch.linalg.lstsq(
            torch.stack([torch.sin(x[t]), -torch.cos(x[t])], 1), y[t, :, None]
        ).solution[:, 0]
        amplitude, phase = math.hypot(a, b), math.atan2(b, a)
        assert 0.1 - 1e-4 <= amplitude <= 5.0 + 1e-4 and -1e-4 <= phase <= math.pi + 1e-4
        torch.testing.assert_close(y[t], amplitude * torch.sin(x[t] - phase), atol=1e-4, rtol=0)


def test_fixed_episodes_are_reproducible_and_one_way():
    spec = EpisodeSpec(("sinusoid",), "test", 1, 10, 100, 0)
    first = fixed_episodes(sources()["test"], spec, 0, 5)
    again = fixed_episodes(sources()["test"], spec, 3, 2)
    assert torch.equal(first.query_y[3:], again.query_y)
    with pytest.raises(ValueError, match="1-way"):
        sources()["train"].sample_episodes(2, 5, 10, 5, torch.Generator())


def test_suite_runs_regression_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "run", "suites/sinusoid.yaml", "--out", str(out), "--no-progress",
        "--set", "train={iterations: 60, validate_every: 30, val_episodes: 10}",
        "--set", "eval.episodes=40", "--data-root", str(tmp_path / "no-data"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "MSE" in result.stderr and "Mean squared error" in result.stdout
    db = sqlite3.connect(out / "results.sqlite")
    rows = db.execute("SELECT learner, metric, mean, best_val FROM cells").fetchall()
    assert {r[0] for r in rows} == {"maml", "finetune"} and {r[1] for r in rows} == {"mse"}
    assert all(r[2] > 0 and r[3] > 0 for r in rows)
    report = json.loads(run_cli("report", str(out), "--format", "json").stdout)
    best = [e for e in report["entries"] if e["best"]]
    assert len(best) == 1 and best[0]["mean"] == min(e["mean"] for e in report["entries"])
    assert "lowest" in report["caption"]


def test_shipped_suites_validate(tmp_path):
    result = run_cli("run", "suites/sinusoid.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("2 cells")


def test_non_finite_predictions_fail_the_evaluation_not_score_as_chance():
    """finetune_lr: .nan once stored cells as done at exactly chance: predictions that are
    not finite fail the cell with one line."""
    from fewbench.errors import FewbenchError
    from fewbench.plugin.task_types import REGRESSION
    from fewbench.running.evaluation import evaluate

    class Broken:
        def predict(self, batch):
            out = torch.zeros(batch.query_y.shape)
            out[0, 0] = float("nan")
            return out

    spec = EpisodeSpec(("sinusoid",), "test", 1, 10, 100, 0)
    with pytest.raises(FewbenchError, match=r"predictions on test episodes 0 to 3 are not finite"):
        evaluate(
            Broken(), sources()["test"], spec, episodes=4, chunk=4, device=torch.device("cpu"),
            task_type=REGRESSION,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "where"),
    [("learners.finetune.finetune_lr=.nan", "finetune_lr"),
     ("learners.finetune.finetune_weight_decay=.inf", "finetune_weight_decay"),
     ("train.checkpoint_minutes=.nan", "train.checkpoint_minutes")],
)  # fmt: skip
def test_non_finite_settings_are_refused_in_one_line(tmp_path, setting, where):
    from helpers import run_cli

    suite = Path(__file__).resolve().parents[1] / "suites" / "sinusoid.yaml"
    result = run_cli("run", str(suite), "--out", str(tmp_path / "o"), "--set", setting, "--dry-run")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert where in line and "must be a finite number" in line


@pytest.mark.parametrize("command", ["run", "tune"])
def test_an_out_folder_under_a_file_is_one_line(tmp_path, command):
    from helpers import run_cli

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    suite = "suites/sinusoid.yaml" if command == "run" else "suites/tune-sinusoid.yaml"
    extra = ["--trials", "1"] if command == "tune" else []
    result = run_cli(command, suite, "--out", str(blocker / "run"), "--max-iterations", "2", *extra)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"fewbench: error: --out {blocker / 'run'}: cannot create the run directory "
        "(Not a directory)"
    )
    assert "Traceback" not in result.stderr
