"""Smoke runs that are what they say: ``--max-iterations`` and ``--max-episodes`` cap every
cell after the suite's overrides and the learners' own counts, capped cells are other cells,
and ``--dry-run`` shows what each cell will really do."""

from __future__ import annotations

import sqlite3

from helpers import run_cli

from fewbench.suite.cell import cell_id

# An override and a learner's own count (finetune's iterations) both set the steps.
SUITE = """\
name: smoke
seeds: [0]
datasets: [{name: sinusoid}]
tasks: {ways: 1, shots: 5, query: 5}
backbones: [{name: mlp, hidden: [8]}]
learners:
  - {name: maml, inner_lr: 0.01, meta_batch_size: 2}
  - {name: finetune, head: linear, batch_size: 10, iterations: 400}
train: {iterations: 200, validate_every: 100, val_episodes: 20}
eval: {episodes: 30, query: 5, seed: 0}
overrides:
  - when: {learner: maml}
    set: {train.iterations: 300}
"""


def write_suite(tmp_path):
    path = tmp_path / "smoke.yaml"
    path.write_text(SUITE)
    return path


def lines_of(done) -> dict[str, str]:
    """Dry-run lines by learner name."""
    return {
        name: line
        for line in done.stdout.splitlines()
        for name in ("maml", "finetune")
        if f"/{name}/" in line
    }


def test_dry_run_shows_the_steps_each_cell_really_takes(tmp_path):
    done = run_cli("run", str(write_suite(tmp_path)), "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = lines_of(done)
    assert "300 steps, 20 validation / 30 test episodes" in lines["maml"]
    assert "400 steps (the learner's own count; train.iterations is 200)" in lines["finetune"]


def test_the_caps_win_over_overrides_and_learners_and_make_other_cells(tmp_path):
    suite = write_suite(tmp_path)
    plain = lines_of(run_cli("run", str(suite), "--dry-run"))
    capped_run = run_cli(
        "run", str(suite), "--dry-run", "--max-iterations", "7", "--max-episodes", "4"
    )
    capped = lines_of(capped_run)
    assert "7 steps (capped from 300), 4 validation / 4 test episodes" in capped["maml"]
    assert (
        "7 steps (the learner's own count; train.iterations is 200; capped from 400)"
        in (capped["finetune"])
    )
    for name in ("maml", "finetune"):  # a capped cell never stands in for the full one
        assert plain[name].split()[0] != capped[name].split()[0]


def test_a_capped_run_trains_and_evaluates_only_that_much(tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        "run", str(write_suite(tmp_path)), "--out", str(out), "--no-progress",
        "--max-iterations", "5", "--max-episodes", "6", "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    db = sqlite3.connect(out / "results.sqlite")
    rows = db.execute("SELECT id, iterations FROM cells ORDER BY label").fetchall()
    assert [iterations for _, iterations in rows] == [5, 5]
    for cell, _ in rows:
        (episodes,) = db.execute(
            "SELECT COUNT(*) FROM episodes WHERE cell_id = ?", (cell,)
        ).fetchone()
        assert episodes == 6
    # The run records the cap with each cell; --dry-run against it sees them done.
    again = run_cli(
        "run", str(write_suite(tmp_path)), "--dry-run", "--out", str(out),
        "--max-iterations", "5", "--max-episodes", "6",
    )  # fmt: skip
    assert again.stdout.count(f"[done in {out}]") == 2, again.stdout


def test_an_unset_cap_leaves_ids_as_they_were():
    config = {
        "dataset": {"name": "d"}, "backbone": {"name": "b"}, "learner": {"name": "l"}, "seed": 0,
        "tasks": {"ways": 5, "shots": 1, "query": 1}, "eval": {"episodes": 600},
        "train": {"iterations": 10},
    }  # fmt: skip
    unset = {**config, "train": {"iterations": 10, "max_iterations": None}}
    assert cell_id(unset) == cell_id(config)
    assert cell_id({**config, "train": {"iterations": 10, "max_iterations": 5}}) != cell_id(config)


def test_a_cap_below_one_is_refused_in_one_line(tmp_path):
    done = run_cli("run", str(write_suite(tmp_path)), "--dry-run", "--max-iterations", "0")
    assert done.returncode == 2
    assert done.stderr.strip() == "fewbench: error: --max-iterations 0: must be at least 1"


def test_a_set_that_an_override_or_a_learner_replaces_is_named_in_a_warning(tmp_path):
    done = run_cli("run", str(write_suite(tmp_path)), "--dry-run", "--set", "train.iterations=50")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: --set")]
    assert len(warnings) == 2, done.stderr
    assert (
        "overrides[0] sets train.iterations again for sinusoid/1w5s/mlp/maml/seed0" in (warnings[0])
    )
    assert "finetune trains 400 steps, its own count, in 1 cell(s)" in warnings[1]
    # A learner parameter set by name warns only where that learner's override sets it.
    quiet = run_cli(
        "run", str(write_suite(tmp_path)), "--dry-run", "--set", "learners.finetune.lr=0.1"
    )
    assert "warning: --set" not in quiet.stderr


def test_a_set_into_an_override_sets_its_dotted_key(tmp_path):
    done = run_cli(
        "run",
        str(write_suite(tmp_path)),
        "--dry-run",
        "--set",
        "overrides[0].set.train.iterations=50",
    )
    assert done.returncode == 0, done.stderr
    assert "50 steps, 20 validation" in lines_of(done)["maml"]
