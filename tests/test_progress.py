"""Honest progress: plain lines instead of bar redraws when output is not a terminal,
accuracy in percent, and the whole run's progress beside each finished cell."""

from __future__ import annotations

import re

import pytest
from test_graphs import cell, maml, run

from fewbench.running import training
from fewbench.running.worker import run_progress

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_log_file_gets_plain_lines_with_accuracy_in_percent(capsys, monkeypatch):
    monkeypatch.setattr(training, "PLAIN_PROGRESS_SECONDS", 0.0)  # a line every iteration
    run(maml(), progress=True)  # pytest's capture is not a terminal
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"c: iteration 1/12, loss \d\.\d{3}, validation -", lines[0])
    assert len(lines) == 12 and "\r" not in "".join(lines)  # no tqdm redraws
    # Validated at 6: the accuracy as a person reads it.
    assert re.fullmatch(r"c: iteration 6/12, loss \d\.\d{3}, validation \d{1,3}\.\d\d%", lines[5])


def test_run_progress_counts_every_worker_and_estimates_at_this_workers_pace():
    statuses = ["done", "done", "failed", "running", "pending", "queued", "interrupted"]
    assert run_progress(statuses, [60.0, 120.0]) == (
        "run: 2/7 done, 1 failed, 1 running, 3 left, about 4 min to go"
    )
    assert run_progress(["done", "done"], [5.0, 5.0]) == "run: 2/2 done"
    assert run_progress(["done", "pending"], [30.0]) == "run: 1/2 done, 1 left, about 30 s to go"


def test_a_terminal_that_reports_no_width_gets_plain_lines(monkeypatch):
    """Under `script` and some CI runners stderr is a terminal of 0 columns: tqdm drew
    nothing there and no plain line came either (5 minutes of silence a sinusoid cell)."""
    import fcntl
    import os
    import struct
    import termios

    master, slave = os.openpty()  # a new pseudo-terminal: 0 rows, 0 columns
    stream = os.fdopen(slave, "w")
    try:
        assert stream.isatty() and os.get_terminal_size(slave).columns == 0
        assert not training.can_draw_a_bar(stream)
        monkeypatch.setattr(training.sys, "stderr", stream)
        monkeypatch.setattr(training, "PLAIN_PROGRESS_SECONDS", 0.0)
        progress = training.Progress(cell(), total=3, initial=0, enabled=True)
        assert progress.plain
        progress.advance(1, 0.5, None, training.CLASSIFICATION)
        progress.close()
        stream.flush()
        assert b"iteration 1/3, loss 0.500" in os.read(master, 4096)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        assert training.can_draw_a_bar(stream)  # a real width: the bar
    finally:
        stream.close()
        os.close(master)
