"""Crash safety: kills at chosen and random points, resume, several workers, Ctrl-C."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli

SUITE = """\
name: crash
seeds: [0, 1]
datasets: [{name: omniglot}]
tasks: {ways: 5, shots: 1, query: 2}
backbones: [{name: conv4, hidden: 16}]
learners:
  - {name: maml, meta_batch_size: 2}
  - {name: finetune, batch_size: 16}
train: {iterations: 12, validate_every: 4, val_episodes: 4, log_every: 1, checkpoint_every: 3}
eval: {episodes: 10, query: 3}
"""


def start(
    suite: Path,
    out: Path,
    data_root: Path,
    cache_dir: Path,
    *extra: str,
    crash: str | None = None,
) -> subprocess.Popen:
    env = {**os.environ, "FEWBENCH_CACHE": str(cache_dir)}
    env.pop("FEWBENCH_CRASH_AT", None)
    if crash:
        env["FEWBENCH_CRASH_AT"] = crash
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fewbench",
            "run",
            str(suite),
            "--out",
            str(out),
            "--data-root",
            str(data_root),
            "--no-progress",
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def episodes_by_cell(out: Path) -> dict[str, list[float]]:
    db = sqlite3.connect(out / "results.sqlite")
    rows = db.execute(
        "SELECT cell_id, episode, value FROM episodes ORDER BY cell_id, episode"
    ).fetchall()
    result: dict[str, list[float]] = {}
    for cell_id, episode, value in rows:
        assert episode == len(result.setdefault(cell_id, []))  # no duplicate or missing rows
        result[cell_id].append(value)
    return result


def cells(out: Path) -> dict[str, tuple[str, int, int]]:
    db = sqlite3.connect(out / "results.sqlite")
    return {
        row[0]: row[1:] for row in db.execute("SELECT id, status, completions, attempts FROM cells")
    }


def assert_every_cell_done_once(out: Path) -> None:
    state = cells(out)
    assert all(
        status == "done" and completions == 1 for status, completions, _ in state.values()
    ), state


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "crash.yaml"
    path.write_text(SUITE)
    return path


@pytest.fixture(scope="module")
def baseline(suite_file, tmp_path_factory, data_root, cache_dir) -> dict[str, list[float]]:
    """Per-episode results of an uninterrupted run (and, as ``.seconds``, its wall time)."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    started = time.monotonic()
    process = start(suite_file, out, data_root, cache_dir)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    result = Results(episodes_by_cell(out))
    result.seconds = time.monotonic() - started
    result.out = out
    assert len(result) == 4 and all(len(v) == 10 for v in result.values())
    return result


class Results(dict):
    seconds: float = 0.0
    out: Path  # the run directory (tests copy it, never change it)


def copy_of_baseline(baseline: Results, tmp_path: Path) -> Path:
    """A copy of the uninterrupted run's directory: four done cells, one suite version."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(baseline.out, out)
    return out


def test_killed_at_many_points_and_resumed_gives_identical_results(
    suite_file, baseline, tmp_path, data_root, cache_dir
):
    out = tmp_path / "run"
    # SIGKILL at random moments (None) interleaved with kills at chosen points.
    plan = [
        "checkpoint-write:1",
        None,
        "results-commit:1",
        None,
        "evaluation:1",
        "checkpoint-write:2",
        None,
    ]
    planned = [p for p in plan if p]
    rng = random.Random(7)
    kills = random_kills = 0
    for attempt in range(len(plan) + 10):
        crash = plan[attempt] if attempt < len(plan) else None
        process = start(suite_file, out, data_root, cache_dir, crash=crash)
        if crash is None and attempt < len(plan):
            time.sleep(rng.uniform(0.3, 0.8) * baseline.seconds)
            process.kill()
        _, stderr = process.communicate(timeout=600)
        if process.returncode == -signal.SIGKILL:
            kills += 1
            random_kills += crash is None
            for last in out.glob("checkpoints/*/last.pt"):  # the previous checkpoint stays whole
                assert torch.load(last, weights_only=False)["loop"]["iteration"] > 0
            continue
        assert process.returncode == 0, stderr
        break
    print(f"killed {kills} times ({random_kills} at random moments), resumed each time")
    assert kills - random_kills == len(
        planned
    )  # every planned point was reached and killed the run
    assert random_kills >= 1
    assert not list(out.glob("checkpoints/*/*.tmp"))  # leftovers of cut writes were cleaned up
    assert_every_cell_done_once(out)
    assert episodes_by_cell(out) == baseline


def test_two_workers_share_the_work_and_take_over_a_dead_one(
    suite_file, baseline, tmp_path, data_root, cache_dir
):
    out = tmp_path / "run"
    # Worker a dies (SIGKILL) while evaluating its first cell; worker b finishes everything.
    a = start(
        suite_file,
        out,
        data_root,
        cache_dir,
        "--worker",
        "a",
        "--stale-after",
        "3",
        crash="evaluation:1",
    )
    time.sleep(1.0)
    b = start(suite_file, out, data_root, cache_dir, "--worker", "b", "--stale-after", "3")
    a.communicate(timeout=600)
    _, stderr = b.communicate(timeout=600)
    assert a.returncode == -signal.SIGKILL
    assert b.returncode == 0, stderr
    assert_every_cell_done_once(out)
    state = cells(out)
    assert sum(attempts for *_, attempts in state.values()) == len(state) + 1  # one cell taken over
    assert episodes_by_cell(out) == baseline


# Long enough that the signal, sent within 0.1 s of the first checkpoint (iteration 1), always
# lands while the first (MAML) cell still trains: its 59 other iterations, each with a
# checkpoint, take seconds. The resumed run trains what is left of both cells.
SLOW = SUITE.replace("seeds: [0, 1]", "seeds: [0]").replace("iterations: 12,", "iterations: 60,")


def start_and_wait_for_training(tmp_path: Path, data_root: Path, cache_dir: Path) -> tuple:
    """Start a suite long enough to interrupt; return once the first checkpoint exists."""
    suite, out = tmp_path / "slow.yaml", tmp_path / "run"
    suite.write_text(SLOW.replace("checkpoint_every: 3", "checkpoint_every: 1"))
    process = start(suite, out, data_root, cache_dir)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("checkpoints/*/last.pt")):
        time.sleep(0.1)
    return process, out


def test_ctrl_c_checkpoints_then_resume_completes(tmp_path, data_root, cache_dir):
    process, out = start_and_wait_for_training(tmp_path, data_root, cache_dir)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert f"Resume with: fewbench run {out}" in stderr and "(checkpoint written)" in stderr
    assert "Traceback" not in stderr
    statuses = {s for s, *_ in cells(out).values()}
    assert "interrupted" in statuses and "done" not in statuses
    assert (
        torch.load(next(out.glob("checkpoints/*/last.pt")), weights_only=False)["loop"]["iteration"]
        > 0
    )
    resumed = run_cli(
        "resume",
        str(out),
        "--data-root",
        str(data_root),
        "--no-progress",
        env={"FEWBENCH_CACHE": str(cache_dir)},
    )
    assert resumed.returncode == 0, resumed.stderr
    assert_every_cell_done_once(out)


def test_changed_suite_reuses_unchanged_cells_and_records_both_versions(
    suite_file, baseline, tmp_path, data_root, cache_dir
):
    out = copy_of_baseline(baseline, tmp_path)  # the suite as first run: its four cells done
    changed = start(suite_file, out, data_root, cache_dir, "--set", "learners.maml.inner_lr=0.3")
    _, stderr = changed.communicate(timeout=600)
    assert changed.returncode == 0, stderr
    assert stderr.count("done in an earlier run, skipped") == 2  # the two finetune cells
    db = sqlite3.connect(out / "results.sqlite")
    assert db.execute("SELECT COUNT(*) FROM suite_versions").fetchone()[0] == 2
    assert "inner_lr: 0.3" in (out / "suite.yaml").read_text()


def test_retry_failed_runs_failed_cells_again(suite_file, baseline, tmp_path, data_root, cache_dir):
    out = copy_of_baseline(baseline, tmp_path)
    db = sqlite3.connect(out / "results.sqlite")
    db.execute(
        "UPDATE cells SET status = 'failed', error = 'simulated' WHERE learner = 'maml' AND seed = 0"
    )
    db.commit()
    db.close()
    retried = run_cli(
        "run",
        "--retry-failed",
        str(out),
        "--data-root",
        str(data_root),
        "--no-progress",
        env={"FEWBENCH_CACHE": str(cache_dir)},
    )
    assert retried.returncode == 0, retried.stderr
    assert {status for status, *_ in cells(out).values()} == {"done"}


def test_corrupt_dataset_cache_is_rebuilt(tmp_path, data_root, cache_dir, registry):
    import shutil

    import torch

    local = tmp_path / "cache"
    shutil.copytree(cache_dir, local)
    cache_file = local / "omniglot" / "images-28.pt"
    good = cache_file.read_bytes()
    cache_file.write_bytes(good[: len(good) // 3])  # truncated
    dataset = registry.get("dataset", "omniglot").build(split="vinyals", image_size=28)
    sources = dataset.load(data_root, local)
    assert sources["train"].num_classes == 4112
    assert torch.load(cache_file, weights_only=True)["images"].shape == (1623, 20, 28, 28)


KEPT = {"none": [], "best": ["best.pt"], "all": ["best.pt", "last.pt"]}


def test_keep_checkpoints(suite_file, tmp_path, data_root, cache_dir):
    """One run, one finetune cell per setting (a cell's own train.keep_checkpoints)."""
    seeds = dict(enumerate(KEPT))
    overrides = ", ".join(
        f"{{when: {{seed: {seed}}}, set: {{train.keep_checkpoints: {keep}}}}}"
        for seed, keep in seeds.items()
    )
    out = tmp_path / "run"
    process = start(
        suite_file,
        out,
        data_root,
        cache_dir,
        "--set",
        f"seeds={list(seeds)}",
        "--set",
        "learners=[{name: finetune, batch_size: 16}]",
        "--set",
        f"overrides=[{overrides}]",
    )
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    db = sqlite3.connect(out / "results.sqlite")
    ids = dict(db.execute("SELECT seed, id FROM cells").fetchall())
    assert sorted(ids) == list(seeds)
    for seed, keep in seeds.items():
        kept = sorted(p.name for p in (out / "checkpoints" / ids[seed]).glob("*.pt"))
        assert kept == KEPT[keep], (keep, kept)
    assert len(list(out.glob("checkpoints/*/*.pt"))) == 3  # nothing kept elsewhere


def test_second_ctrl_c_stops_at_once(tmp_path, data_root, cache_dir):
    process, out = start_and_wait_for_training(tmp_path, data_root, cache_dir)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Resume with: fewbench run" in stderr and "Traceback" not in stderr
    for last in out.glob("checkpoints/*/last.pt"):
        assert torch.load(last, weights_only=False)["loop"]["iteration"] > 0


def test_a_cell_resumed_under_another_layout_keeps_its_thread_count(
    suite_file, baseline, tmp_path, data_root, cache_dir
):
    """Killed while running sequentially (all cores), resumed by two one-thread workers: each
    cell goes on with the thread count it started with, so the results are the uninterrupted
    run's, and the count is recorded beside the cell's checkpoints."""
    out = tmp_path / "run"
    first = start(suite_file, out, data_root, cache_dir, crash="checkpoint-write:2")
    first.communicate(timeout=600)
    assert first.returncode == -signal.SIGKILL
    (started,) = [p.parent.name for p in out.glob("checkpoints/*/last.pt")]
    recorded = json.loads((out / "checkpoints" / started / "numerics.json").read_text())
    fresh = subprocess.run(  # what a fresh process uses (this one's may have been changed)
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert recorded["threads"] == int(fresh.stdout)
    resumed = run_cli(
        "run", str(out), "--data-root", str(data_root), "--workers", "2", "--no-progress",
        "--executor-set", "progress_every=0.5",
        env={"FEWBENCH_CACHE": str(cache_dir)},
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert_every_cell_done_once(out)
    # The other cells started under the workers (one thread each): only the resumed one is
    # held to the sequential run's numbers.
    assert episodes_by_cell(out)[started] == baseline[started]
    assert json.loads((out / "checkpoints" / started / "numerics.json").read_text()) == recorded


def test_pinned_threads_keep_the_first_attempts_count(tmp_path):
    from fewbench.running.worker import pinned_threads

    saved = torch.get_num_threads()
    with pinned_threads(tmp_path / "a") as threads:
        assert threads == saved == torch.get_num_threads()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "numerics.json").write_text('{"threads": 1}')
    with pinned_threads(tmp_path / "b") as threads:
        assert threads == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == saved
