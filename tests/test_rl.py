"""Reinforcement learning through the whole core (issue 15): an environment as a dataset of
the grid, the four learners of Finn et al. 2017 section 5.3, fixed test tasks, returns after
0..S steps stored per task, reports and plots, determinism, and exact resume after SIGKILL.

The environment is 2-D navigation with a short horizon and a small policy, so each run
takes seconds; the mathematics is tested in test_policy_gradient.py and the environments in
test_navigation2d.py and test_halfcheetah.py."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_cli, run_fewbench

import fewbench
from fewbench.errors import FewbenchError
from fewbench.plugin.task_types import REINFORCEMENT

LEARNER = {"meta_batch_size": 4, "trajectories": 3, "eval_trajectories": 4, "eval_steps": 2}
SUITE = {
    "name": "rl-tiny",
    "seeds": [0],
    "datasets": [{"name": "navigation2d", "reward": "distance", "horizon": 10}],
    "tasks": {"ways": 1, "shots": 1, "query": 1},
    "backbones": [{"name": "mlp", "hidden": [16, 16]}],
    "learners": [
        {"name": "maml_trpo", "hvp": "exact", **LEARNER},
        {"name": "pretrain_rl", "hvp": "exact", **LEARNER},
        {"name": "random_init", **{k: v for k, v in LEARNER.items() if k != "trajectories"}},
        {"name": "oracle", "hvp": "exact", **LEARNER},
    ],
    "train": {
        "iterations": 4,
        "validate_every": 2,
        "val_episodes": 3,
        "log_every": 1,
        "checkpoint_every": 1,
    },
    "eval": {"episodes": 6, "seed": 0, "chunk": 4},
}


def write_suite(path: Path, suite: dict) -> Path:
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def stored(out: Path) -> dict[str, tuple]:
    """Per cell label: the per-task returns (the metric) and every extra, as stored."""
    db = sqlite3.connect(out / "results.sqlite")
    cells = dict(db.execute("SELECT id, label FROM cells WHERE status = 'done'"))
    result = {}
    for cell_id, label in cells.items():
        values = [
            v
            for (v,) in db.execute(
                "SELECT value FROM episodes WHERE cell_id = ? ORDER BY episode", (cell_id,)
            )
        ]
        extras = db.execute(
            "SELECT name, episode, value FROM episode_extras WHERE cell_id = ? "
            "ORDER BY name, episode", (cell_id,)).fetchall()  # fmt: skip
        result[label] = (values, extras)
    db.close()
    return result


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[Path, dict[str, tuple]]:
    """One uninterrupted run of the tiny suite."""
    folder = tmp_path_factory.mktemp("rl")
    suite = write_suite(folder / "rl.yaml", SUITE)
    out = folder / "run"
    fewbench.run(suite, out=out, progress=False)
    return out, stored(out)


def test_the_four_learners_run_and_store_returns_after_each_step(baseline):
    out, results = baseline
    assert sorted(results) == [
        f"navigation2d/mlp/{learner}/seed0"
        for learner in ("maml_trpo", "oracle", "pretrain_rl", "random_init")
    ]  # an environment's cells have no ways or shots in their labels
    frames = fewbench.load_results(out)
    cells = frames.cells.set_index("learner")
    assert set(cells["metric"]) == {"return"}
    assert cells.loc["random_init", "iterations"] == 0  # adapted at test time only
    for label, (values, extras) in results.items():
        by_step: dict[str, list[float]] = {}
        for name, _, value in extras:
            by_step.setdefault(name, []).append(value)
        assert sorted(by_step) == [f"return_after_{k}_steps" for k in range(3)]
        assert all(len(v) == 6 for v in by_step.values())  # the 6 fixed test tasks
        # The cell's metric is the return after one step, task by task.
        assert values == by_step["return_after_1_steps"]
        assert all(v <= 0 for v in values)  # minus a distance at every step
        if "oracle" in label:  # evaluated without adaptation: a flat line
            assert by_step["return_after_0_steps"] == by_step["return_after_2_steps"]
        else:
            assert by_step["return_after_0_steps"] != by_step["return_after_1_steps"]


def test_report_shows_returns_higher_better_and_plot_draws_return_against_steps(baseline):
    out, _ = baseline
    report = run_cli("report", str(out))
    assert report.returncode == 0, report.stderr
    assert "Average return on 6 fixed test tasks" in report.stdout
    assert "best (highest)" in report.stdout
    assert "1-way" not in report.stdout
    plots = run_cli("plot", str(out))
    assert plots.returncode == 0, plots.stderr
    assert (out / "plots" / "return-vs-steps-navigation2d.png").is_file()


def test_same_seed_same_returns_and_chunking_changes_nothing(baseline, tmp_path):
    _, first = baseline
    suite = dict(SUITE, learners=SUITE["learners"][:2], eval={**SUITE["eval"], "chunk": 6})
    out = tmp_path / "again"
    fewbench.run(write_suite(tmp_path / "again.yaml", suite), out=out, progress=False)
    again = stored(out)
    for label, result in again.items():
        assert result == first[label], label


def test_killed_in_the_middle_of_a_maml_rl_cell_resumes_to_identical_results(baseline, tmp_path):
    _, first = baseline
    suite = write_suite(tmp_path / "kill.yaml", dict(SUITE, learners=SUITE["learners"][:1]))
    out = tmp_path / "run"
    args = ("run", str(suite), "--out", str(out), "--no-progress")
    killed = run_fewbench(*args, cache_dir=tmp_path / "cache", crash="checkpoint-write:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (last,) = out.glob("checkpoints/*/last.pt")  # the first checkpoint, whole
    assert torch.load(last, weights_only=True)["loop"]["iteration"] == 1
    resumed = run_fewbench(*args, cache_dir=tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr
    db = sqlite3.connect(out / "results.sqlite")
    assert db.execute("SELECT attempts FROM cells").fetchall() == [(2,)]
    db.close()
    label = "navigation2d/mlp/maml_trpo/seed0"
    assert stored(out)[label] == first[label]


def test_a_learner_and_an_environment_of_other_task_types_are_refused(tmp_path):
    for learners, datasets, words in (
        ([{"name": "maml"}], SUITE["datasets"], "learner 'maml' learns classification or "
         "regression tasks, but dataset 'navigation2d' gives reinforcement tasks"),
        ([{"name": "maml_trpo"}], ["sinusoid"], "learner 'maml_trpo' learns reinforcement "
         "tasks, but dataset 'sinusoid' gives regression tasks"),
    ):  # fmt: skip
        suite = write_suite(
            tmp_path / "bad.yaml", dict(SUITE, learners=learners, datasets=datasets)
        )
        done = run_cli("run", str(suite), "--out", str(tmp_path / "bad"), "--dry-run")
        assert done.returncode == 2
        assert done.stderr.strip().count("\n") == 0, done.stderr  # one line, no traceback
        assert words in done.stderr


def test_a_policy_learner_needs_the_mlp_backbone(tmp_path):
    suite = dict(SUITE, learners=SUITE["learners"][:1], backbones=[{"name": "conv4"}])
    with pytest.raises(FewbenchError, match="from the mlp backbone, not 'conv4'"):
        fewbench.run(write_suite(tmp_path / "conv.yaml", suite), out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # refused before anything ran


def test_the_reinforcement_task_type():
    assert REINFORCEMENT.metric == "return" and REINFORCEMENT.direction == "highest"


def test_the_published_returns_match_only_the_protocol_they_were_measured_with():
    from fewbench.reports import references

    def cell(dataset: dict, learner: str) -> dict:
        return {
            "dataset": dataset,
            "backbone": {"name": "mlp"},
            "learner": {"name": learner},
            "tasks": {"ways": 1, "shots": 1},
        }

    code_reward = {"name": "navigation2d", "reward": "distance", "horizon": 100}
    (table4,) = references.matching(cell(code_reward, "maml_trpo"))
    assert table4.mean == -11.68 and table4.verified and table4.pm_means == "none"
    # The paper's text reward (squared distance) gives returns on another scale.
    squared = {**code_reward, "reward": "squared"}
    assert references.matching(cell(squared, "maml_trpo")) == []
    assert references.matching(cell(code_reward, "pretrain_rl")) == []
    # Another horizon is another protocol: the number is a candidate, but not shown.
    longer = {**code_reward, "horizon": 200}
    assert references.matching(cell(longer, "maml_trpo")) == []
    ((refused, differs),) = references.refused(cell(longer, "maml_trpo"))
    assert refused is table4 and differs == ["dataset.horizon: published 100, this cell 200"]
    cheetah = {"name": "halfcheetah_vel", "horizon": 200}
    (figure,) = references.matching(cell(cheetah, "maml_trpo"))
    assert not figure.verified and "read from the figure" in figure.table


def test_a_cheetah_suite_without_the_extra_stops_with_one_line_naming_it(tmp_path):
    """gymnasium made unimportable for the command (a package of that name that fails)."""
    fake = tmp_path / "site" / "gymnasium"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named gymnasium", name="gymnasium")\n'
    )
    env = {"PYTHONPATH": str(fake.parent), "FEWBENCH_NO_PLUGIN_INDEX": "1"}
    out = tmp_path / "run"
    done = run_cli("run", "suites/halfcheetah-cpu.yaml", "--out", str(out), env=env)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr  # one line, no traceback
    assert "pip install 'fewbench[rl]'" in done.stderr
    assert not out.exists()  # nothing was written or trained
