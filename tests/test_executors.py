"""The local executor: several worker processes on one run directory, and one of them killed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

from grid_runs import cells, results, sequential, write_suite
from helpers import REPO, concurrently, run_cli

# The driver checks on its workers every progress_every seconds (10 by default): once they
# are done it would sleep out the rest of that wait.
FAST_POLL = ["--executor-set", "progress_every=0.5"]


def test_two_local_workers_run_every_cell_once_with_the_sequential_results(
    tmp_path, data_root, cache_dir
):
    suite = write_suite(tmp_path, 8)
    out = tmp_path / "parallel"
    result = run_cli(
        "run", str(suite), "--out", str(out), "--data-root", str(data_root), "--workers", "2",
        *FAST_POLL, env={"FEWBENCH_CACHE": str(cache_dir)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 workers on this machine" in result.stderr and "4 done" in result.stderr
    rows = cells(out)
    assert len(rows) == 4 and all(r["status"] == "done" and r["completions"] == 1 for r in rows)
    assert len({r["worker"] for r in rows}) == 2  # both workers took cells
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["worker-0.log", "worker-1.log"]
    assert results(out) == sequential(8, tmp_path, data_root, cache_dir)
    status = run_cli("status", str(out))
    assert status.returncode == 0 and "4 done, 0 running, 0 pending, 0 failed" in status.stdout


def test_a_killed_worker_s_cell_is_resumed_and_the_suite_completes(tmp_path, data_root, cache_dir):
    suite = write_suite(tmp_path, 60)
    out = tmp_path / "killed"
    env = {**os.environ, "FEWBENCH_CACHE": str(cache_dir)}
    driver = subprocess.Popen(
        [sys.executable, "-m", "fewbench", "run", str(suite), "--out", str(out),
         "--data-root", str(data_root), "--workers", "2", "--stale-after", "600", *FAST_POLL],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    victim = None
    deadline = time.time() + 240
    while victim is None and time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
        if not (out / "results.sqlite").exists():
            continue
        try:
            for row in cells(out):
                progress = (
                    sqlite3.connect(out / "results.sqlite")
                    .execute("SELECT MAX(iteration) FROM curve WHERE cell_id = ?", (row["id"],))
                    .fetchone()[0]
                )
                if row["status"] == "running" and row["learner"] == "maml" and (progress or 0) >= 4:
                    victim = row
                    break
        except sqlite3.OperationalError:
            continue
    assert victim is not None, "no MAML cell got far enough to kill its worker"
    pid = int(victim["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr
    rows = {r["id"]: r for r in cells(out)}
    assert all(r["status"] == "done" and r["completions"] == 1 for r in rows.values())
    assert rows[victim["id"]]["attempts"] >= 2  # taken over after the kill
    assert rows[victim["id"]]["worker"] != victim["worker"]
    assert "exited with code -9" in stderr
    # Resumed from its checkpoint, the cell ends exactly where an uninterrupted run does.
    assert results(out) == sequential(60, tmp_path, data_root, cache_dir)


def test_bad_executor_options_are_one_line_errors(tmp_path, data_root):
    cases = (
        (["--executor", "rya"], "unknown executor 'rya' (did you mean 'ray'?)"),
        (["--executor", "ray", "--partition", "gpu"], "--partition: not an option of the ray"),
        (["--executor", "slurm", "--time-min", "0"], "--time-min: must be at least 1, got 0"),
        (["--executor-set", "bogus=1"], "--executor-set 'bogus=1': expected KEY=VALUE with KEY"),
        (["--executor", "ray", "--address", "127.0.0.1:1"], "no Ray cluster answers there"),
        (["--executor", "slurm"], "needs SLURM's commands on PATH (sbatch, srun not found)"),
        (["--gpus", "0,x"], "expected indices like 0,1,2,3"),
        (["--workers", "0"], "--workers: must be at least 1"),
    )

    def refused(case: int):
        out = tmp_path / f"x{case}"
        return out, run_cli("run", "suites/sinusoid.yaml", "--out", str(out), *cases[case][0])

    # Separate processes, each with its own --out: two at a time (each only starts and refuses).
    results = concurrently(*(lambda case=case: refused(case) for case in range(len(cases))))
    for (argv, message), (out, result) in zip(cases, results, strict=True):
        assert result.returncode == 2 and message in result.stderr, (argv, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (argv, result.stderr)
        assert not out.exists()  # refused before the run directory was written


def test_an_unreaped_worker_counts_as_dead():
    """A killed worker stays a zombie until its parent polls it; it must still read as dead."""
    import socket

    from fewbench.running.worker import worker_is_dead

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while not worker_is_dead(f"{socket.gethostname()}:{child.pid}") and time.time() < deadline:
        time.sleep(0.05)
    assert worker_is_dead(f"{socket.gethostname()}:{child.pid}")  # exited, not yet reaped
    assert child.poll() == 0
    assert not worker_is_dead(f"{socket.gethostname()}:{os.getpid()}")


def test_workers_are_bounded_by_the_cores_and_by_the_cells_to_run(tmp_path):
    """workers: 100000 in a suite file started 266 processes before it was killed: more
    workers than cores is refused in one line before anything starts, and a run never starts
    more workers than it has cells to run."""
    cores = os.cpu_count() or 1
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        (REPO / "suites/sinusoid.yaml").read_text()
        + "\nexecution: {executor: local, workers: 100000}\n"
    )
    out = tmp_path / "refused"
    result = run_cli("run", str(suite), "--out", str(out), "--max-iterations", "2")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "fewbench: error: local executor: workers 100000 asks for 100,000 worker processes; "
        f"this machine has {cores} cores, so at most {cores}"
    ]
    assert not out.exists()
    out = tmp_path / "clamped"
    result = run_cli(
        "run", "suites/sinusoid.yaml", "--out", str(out), "--workers", str(min(2, cores)),
        "--set", "learners=[{name: maml}]", "--max-iterations", "2", "--max-episodes", "2",
        *FAST_POLL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    if cores >= 2:
        assert "2 workers asked for 1 cells to run: starting 1" in result.stderr
        assert sorted(p.name for p in (out / "logs").iterdir()) == ["worker-0.log"]


def test_a_failure_with_cpp_frames_is_one_line():
    """PyTorch errors carry C++ frames after their first line; a failed cell printed all 30."""
    from fewbench.running.worker import failure_reason

    frames = "\n".join(f"frame #{i}: 0x7f00 in libtorch_cpu.so" for i in range(28))
    error = RuntimeError(
        f"shape '[5, -1]' is invalid\nException raised from view at x.cpp\n{frames}"
    )
    reason = failure_reason(error)
    assert "\n" not in reason and "frame #" not in reason
    assert reason == (
        "RuntimeError: shape '[5, -1]' is invalid (and 29 more lines in the cell's stored error)"
    )
