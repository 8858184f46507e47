"""Honest progress: plain lines instead of bar redraws when output is not a terminal,
accuracy in percent, and the whole run's progress beside each finished cell."""

from __future__ import annotations

import re

import pytest
from test_graphs import maml, run

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
