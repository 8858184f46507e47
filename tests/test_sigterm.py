"""SIGTERM, what ``timeout``, ``kill`` and a cluster's scheduler send before they kill a job, is
handled as the first Ctrl-C: the running cell checkpoints, is marked interrupted, the process
exits 143 and a later run resumes from the checkpoint. ``fewbench status`` shows a cell whose
worker stopped beating as stale, with when it was last seen (issue 30, item 2).

The runs are sinusoid suites (no data files) of tiny networks; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import REPO
from stored import make_cell, store_run

from fewbench.reports.status import render_status
from fewbench.running import interrupts
from fewbench.running.interrupts import first_interrupt_stops
from fewbench.storage.journal import CELLS_DIR

# Never finishes on its own: it is always still training when the signal comes.
LONG = """\
name: long
seeds: [0]
datasets: [sinusoid]
tasks: {ways: 1, shots: 5, query: 5}
backbones: [{name: mlp, hidden: [8]}]
learners: [{name: finetune, batch_size: 10}]
train: {iterations: 1000000, validate_every: 20, val_episodes: 1, log_every: 20, checkpoint_every: 20}
eval: {episodes: 2, query: 5}
"""
LABEL = "sinusoid/1w5s/mlp/finetune/seed0"
SENTINEL = 12345.5  # a loss no training gives: written into a checkpoint to recognise it
WAIT_S = 90  # the most any step may take, on a busy machine


class Run:
    """A ``fewbench run`` process and the file its standard error goes to."""

    def __init__(self, process: subprocess.Popen, stderr: Path):
        self.process, self.stderr_file = process, stderr
        self.pid = process.pid

    def stderr(self) -> str:
        return self.stderr_file.read_text()


STARTED: list[Run] = []


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """Whatever a test leaves running (a driver's workers, when a test fails) is killed: each
    run has its own process group, its workers' too."""
    yield
    while STARTED:
        run = STARTED.pop()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGKILL)
        run.process.wait()


def start(suite: Path, out: Path, *extra: str) -> Run:
    """``fewbench run SUITE --out OUT`` in its own session (so that it has its own process
    group, as under ``timeout``); its output goes to files beside ``out``."""
    env = {**os.environ, "FEWBENCH_CACHE": str(out.parent / "cache"), "FEWBENCH_NO_ESTIMATE": "1"}
    name = out.parent / f"{out.name}-{len(list(out.parent.glob(f'{out.name}-*.err')))}"
    with open(f"{name}.out", "w") as stdout, open(f"{name}.err", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "fewbench", "run", str(suite), "--out", str(out),
             "--data-root", str(out.parent / "data"), "--no-progress", *extra],
            cwd=REPO, env=env, start_new_session=True, stdout=stdout, stderr=stderr,
        )  # fmt: skip
    STARTED.append(Run(process, Path(f"{name}.err")))
    return STARTED[-1]


def wait_for(what: str, ready: Callable[[], bool], run: Run) -> None:
    """Poll until ``ready()``; fail (killing the run) if it ends first or takes too long."""
    deadline = time.monotonic() + WAIT_S
    while not ready():
        if run.process.poll() is not None or time.monotonic() > deadline:
            run.process.kill()
            pytest.fail(f"no {what} (exit code {run.process.wait()}): {run.stderr()[-2000:]}")
        time.sleep(0.05)


def finish(run: Run) -> tuple[int, str]:
    """The exit code and standard error of a run that was sent a stop signal."""
    try:
        code = run.process.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        run.process.kill()
        run.process.wait()
        pytest.fail(f"still running {WAIT_S} s after SIGTERM: {run.stderr()[-2000:]}")
    return code, run.stderr()


def checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoints/*/last.pt"))


def iteration_of(checkpoint: Path) -> int:
    try:
        return torch.load(checkpoint, weights_only=True)["loop"]["iteration"]
    except (OSError, RuntimeError, EOFError):  # not there yet
        return 0


def cells(out: Path) -> list[tuple[str, str | None]]:
    db = sqlite3.connect(out / "results.sqlite", timeout=30)
    try:
        return db.execute("SELECT status, error FROM cells ORDER BY rowid").fetchall()
    finally:
        db.close()


def curve(out: Path) -> list[tuple[int, float, float]]:
    db = sqlite3.connect(out / "results.sqlite", timeout=30)
    try:
        return db.execute(
            "SELECT iteration, loss, val_metric FROM curve ORDER BY iteration"
        ).fetchall()
    finally:
        db.close()


def stored_meta(out: Path, key: str) -> str | None:
    db = sqlite3.connect(out / "results.sqlite", timeout=30)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    finally:
        db.close()
    return row[0] if row else None


def interrupted_at(error: str | None) -> int:
    """The iteration of ``interrupted at iteration N of M``: the reason a cell gets when it
    stopped after writing its checkpoint (a stop at once leaves a bare ``interrupted``)."""
    assert error is not None and error.startswith("interrupted at iteration "), error
    return int(error.split()[3])


def test_sigterm_checkpoints_marks_the_cell_interrupted_exits_143_and_the_run_resumes(tmp_path):
    suite, out = tmp_path / "long.yaml", tmp_path / "run"
    suite.write_text(LONG)
    first = start(suite, out)
    wait_for("first checkpoint", lambda: bool(checkpoints(out)), first)
    # As `timeout` does: the command, then its process group (the command gets it twice).
    os.kill(first.pid, signal.SIGTERM)
    os.killpg(first.pid, signal.SIGTERM)
    code, stderr = finish(first)

    assert code == 143, stderr
    assert "fewbench: SIGTERM: stopping after this iteration and writing a checkpoint" in stderr
    assert (
        f"fewbench: stopped by SIGTERM in {LABEL} (checkpoint written). "
        f"Resume with: fewbench run {out}" in stderr
    )
    assert "Traceback" not in stderr and "stopped at once" not in stderr
    [(status, error)] = cells(out)
    stopped = interrupted_at(error)  # the checkpoint path, not a stop at once
    assert status == "interrupted"
    [checkpoint] = checkpoints(out)
    saved = torch.load(checkpoint, weights_only=True)
    assert stored_meta(out, "stale_after") == "120.0"  # for fewbench status (the default)
    assert saved["loop"]["iteration"] == stopped > 0  # written at the stop, not before
    shown = render_status(out)
    assert f"{LABEL} interrupted " in shown and "0 running" in shown and "stale" not in shown

    # The next run continues from that checkpoint. A sentinel loss written into the
    # checkpoint's curve proves it: a run that started over would compute the real loss.
    iteration, _, val = saved["loop"]["curve"][0]
    saved["loop"]["curve"][0] = (iteration, SENTINEL, val)
    torch.save(saved, checkpoint)
    second = start(suite, out)
    wait_for(
        "progress past the checkpoint", lambda: iteration_of(checkpoint) > stopped + 20, second
    )
    os.kill(second.pid, signal.SIGTERM)  # the command alone, as `kill PID` does
    code, stderr = finish(second)
    assert code == 143, stderr
    points = curve(out)
    assert points[0] == (iteration, SENTINEL, val), points[:3]  # the checkpoint's own curve
    assert points[-1][0] > stopped  # ... continued past it
    assert interrupted_at(cells(out)[0][1]) == iteration_of(checkpoint) > stopped


def test_sigterm_to_the_local_executors_driver_reaches_its_workers(tmp_path):
    """``kill DRIVER``: the driver alone gets it and passes it on; each worker checkpoints its
    cell and exits 143, and so does the driver once they have."""
    suite, out = tmp_path / "long.yaml", tmp_path / "run"
    suite.write_text(LONG.replace("seeds: [0]", "seeds: [0, 1]"))
    driver = start(suite, out, "--workers", "2")
    wait_for("checkpoint of each cell", lambda: len(checkpoints(out)) == 2, driver)
    os.kill(driver.pid, signal.SIGTERM)
    code, stderr = finish(driver)

    assert code == 143, stderr
    assert "fewbench: SIGTERM: passed on to 2 workers; each checkpoints its cell" in stderr
    assert "fewbench: stopped by SIGTERM (each worker checkpointed its cell). " in stderr
    assert f"Resume with: fewbench run {out.resolve()}" in stderr
    assert "exited with code" not in stderr and "Traceback" not in stderr
    stored = cells(out)
    assert [status for status, _ in stored] == ["interrupted", "interrupted"]
    for _, error in stored:
        assert interrupted_at(error) > 0
    for log in sorted((out / "logs").glob("worker-*.log")):
        text = log.read_text()
        assert "SIGTERM: stopping after this iteration and writing a checkpoint" in text, text
        assert "Traceback" not in text


# -- the signal handling itself, in this process --------------------------------------------


@pytest.fixture
def own_handlers() -> Iterator[None]:
    """The test process's SIGINT and SIGTERM handlers, put back afterwards (a stop leaves
    both ignored, as a stopping fewbench wants)."""
    saved = {each: signal.getsignal(each) for each in (signal.SIGINT, signal.SIGTERM)}
    yield
    for each, handler in saved.items():
        signal.signal(each, handler)


def signal_self(signum: int, until: Callable[[], bool] = lambda: True) -> None:
    """Send ``signum`` to this process and give its handler the moment it needs to run."""
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 5
    while not until() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigterm_is_the_first_ctrl_c_and_its_copy_is_not_a_second(own_handlers, capsys):
    stop = threading.Event()
    with pytest.raises(KeyboardInterrupt), first_interrupt_stops(stop) as stopping:
        # Checked first: without a handler of fewbench's, SIGTERM would end pytest.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        signal_self(signal.SIGTERM, stop.is_set)
        assert stop.is_set() and stopping.exit_code == 143 and stopping.by == "SIGTERM"
        signal_self(signal.SIGTERM)  # the copy `timeout` sends to the process group
        time.sleep(0.05)
        signal_self(signal.SIGINT)  # a second request: stop at once
        time.sleep(1)
        pytest.fail("a second signal did not stop at once")
    assert stopping.exit_code == 143  # the signal that stopped the run names the code
    err = capsys.readouterr().err
    assert err.count("stopping after this iteration") == 1
    assert "(SIGTERM or Ctrl-C again to quit at once)" in err


def test_a_later_second_sigterm_stops_at_once(own_handlers, monkeypatch):
    monkeypatch.setattr(interrupts, "DUPLICATE_WINDOW_S", 0.0)
    stop = threading.Event()
    with pytest.raises(KeyboardInterrupt), first_interrupt_stops(stop):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        signal_self(signal.SIGTERM, stop.is_set)
        signal_self(signal.SIGTERM)
        time.sleep(1)
        pytest.fail("a second SIGTERM did not stop at once")
    # While exiting, further signals are ignored (no traceback from a third one).
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN == signal.getsignal(signal.SIGINT)


def test_ctrl_c_is_unchanged(own_handlers, capsys):
    stop = threading.Event()
    with pytest.raises(KeyboardInterrupt), first_interrupt_stops(stop) as stopping:
        signal_self(signal.SIGINT, stop.is_set)
        assert stop.is_set()
        signal_self(signal.SIGINT)  # pressed twice, however quickly: at once
        time.sleep(1)
        pytest.fail("a second Ctrl-C did not stop at once")
    assert stopping.exit_code == 130
    assert capsys.readouterr().err == (
        "\nfewbench: stopping after this iteration and writing a checkpoint "
        "(Ctrl-C again to quit at once)\n"
    )


# -- fewbench status: a worker that stopped beating ------------------------------------------


def set_running(run_dir: Path, learner: str, worker: str, claimed: float, beat: float) -> None:
    """What a worker leaves in the store: the cell claimed at ``claimed``, last beat at ``beat``."""
    db = sqlite3.connect(run_dir / "results.sqlite")
    db.execute(
        "UPDATE cells SET status = 'running', worker = ?, heartbeat = ?, updated_at = ?"
        " WHERE learner = ?",
        (worker, beat, claimed, learner),
    )
    db.commit()
    db.close()


def line_of(text: str, learner: str) -> str:
    return next(line for line in text.splitlines() if f"/{learner}/" in line)


def test_status_shows_a_worker_that_stopped_beating_as_stale_with_when_it_was_last_seen(
    tmp_path,
):
    now = time.time()
    run_dir = store_run(
        tmp_path / "run", [(make_cell("maml"), "pending"), (make_cell("finetune"), "pending")]
    )
    # Killed 25 minutes ago, 5 minutes into its cell; the other cell's worker beats on.
    set_running(run_dir, "maml", "node7:4242", claimed=now - 1800, beat=now - 1500)
    set_running(run_dir, "finetune", "node8:77", claimed=now - 60, beat=now - 10)
    text = render_status(run_dir)

    stale = line_of(text, "maml")
    seen = time.strftime("%H:%M:%S", time.localtime(now - 1500))
    if time.localtime(now - 1500)[:3] != time.localtime(now)[:3]:  # just after midnight
        seen = time.strftime("%Y-%m-%d %H:%M", time.localtime(now - 1500))
    assert " stale " in stale and "running" not in stale
    assert f"last seen {seen} (25 min ago)" in stale
    assert "5m00s" in stale  # how long it ran until then, not 30 minutes and counting
    live = line_of(text, "finetune")
    assert " running " in live and "last seen" not in live
    assert "0 done, 1 running, 1 stale, 0 pending, 0 failed" in text

    # Workers started with --stale-after 3600 (they record it) beat every 15 minutes: 25
    # minutes of silence is not yet stale for them.
    db = sqlite3.connect(run_dir / "results.sqlite")
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('stale_after', '3600.0')")
    db.commit()
    db.close()
    text = render_status(run_dir)
    assert " running " in line_of(text, "maml") and "stale" not in text


def test_status_shows_a_cluster_task_that_stopped_beating_as_stale(tmp_path):
    now = time.time()
    cell = make_cell("maml")
    run_dir = store_run(tmp_path / "run", [(cell, "pending")])
    db = sqlite3.connect(run_dir / "results.sqlite")
    db.execute(
        "UPDATE cells SET status = 'queued', worker = 'slurm job 42', updated_at = ?", (now - 4000,)
    )
    db.commit()
    db.close()
    folder = run_dir / CELLS_DIR / cell.id
    folder.mkdir(parents=True)
    state = {"status": "running", "worker": "gpu3:99", "attempts": 1, "started": now - 3600,
             "heartbeat": now - 1500, "updated_at": now - 1500}  # fmt: skip
    (folder / "state.json").write_text(json.dumps(state))
    line = line_of(render_status(run_dir), "maml")
    assert " stale " in line and "(25 min ago)" in line and "running" not in line
    assert "35m00s" in line  # from its start to its last beat
