"""Every built-in learner end to end through the CLI on real Omniglot: trained for a few
iterations, each cell killed once and resumed exactly, and the same results from the local
executor with two workers. The core owns batches, checkpoints and resumption, so a learner
gets these for free; this test proves it for all of them at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from grid_runs import cells, results
from helpers import REPO, run_fewbench

LEARNERS = """\
  - {name: maml, meta_batch_size: 2, eval_inner_steps: 1}
  - {name: fomaml, meta_batch_size: 2, eval_inner_steps: 1}
  - {name: finetune, batch_size: 16, finetune_steps: 5}
  - {name: protonet}
  - {name: matchingnet}
  - {name: relationnet}
  - {name: r2d2}
  - {name: rfs, batch_size: 16}
  - {name: meta_baseline, pretrain_iterations: 3, meta_iterations: 3, pretrain_batch_size: 16}
"""
SUITE = f"""\
name: zoo
datasets: [{{name: omniglot}}]
tasks: {{ways: 5, shots: 1, query: 2}}
backbones: [{{name: conv4, hidden: 8}}]
learners:
{LEARNERS}train: {{iterations: 6, validate_every: 3, val_episodes: 2, checkpoint_every: 3}}
eval: {{episodes: 4, query: 2}}
"""


def test_every_learner_trains_resumes_exactly_and_runs_under_two_workers(
    tmp_path, data_root, cache_dir
):
    suite = tmp_path / "zoo.yaml"
    suite.write_text(SUITE)
    common = ["--data-root", str(data_root), "--no-progress", "--threads", "1"]

    plain = tmp_path / "plain"
    first = run_fewbench("run", str(suite), "--out", str(plain), *common, cache_dir=cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    baseline = results(plain)
    assert len(baseline) == 9 and all(len(v) == 4 for v in baseline.values())

    # The run under two workers does not depend on the kill cycles below: it runs beside them
    # (one thread per process, as everywhere here, so the results do not depend on the load).
    workers = tmp_path / "workers"
    with open(tmp_path / "workers.log", "w+") as log:
        shared = subprocess.Popen(
            [sys.executable, "-m", "fewbench", "run", str(suite), "--out", str(workers),
             "--workers", "2", "--executor-set", "progress_every=0.5", *common],
            cwd=REPO, env={**os.environ, "FEWBENCH_CACHE": str(cache_dir)},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            kill_and_resume_every_cell(suite, tmp_path / "killed", common, cache_dir, baseline)
        finally:
            code = shared.wait(timeout=900)
        log.seek(0)
        assert code == 0, log.read()[-3000:]
    assert results(workers) == baseline


def kill_and_resume_every_cell(suite, killed, common, cache_dir, baseline) -> None:
    # Each cell is killed once, at its second checkpoint write (iteration 6), after its first
    # (iteration 3) is on disk, and resumes from that one in the next process. Counts are per
    # process: the first process's second write is its first cell's second; in a later one the
    # resumed cell writes one checkpoint (iteration 6) before the next cell writes its two.
    kills = 0
    for _ in range(30):
        attempt = run_fewbench(
            "run", str(suite), "--out", str(killed), *common, cache_dir=cache_dir,
            crash=f"checkpoint-write:{2 if kills == 0 else 3}",
        )  # fmt: skip
        if attempt.returncode == 0:
            break
        assert attempt.returncode == -signal.SIGKILL, attempt.stderr[-3000:]
        kills += 1
    assert attempt.returncode == 0 and kills == 9
    assert results(killed) == baseline
    # Every cell was started twice (killed once, then resumed) and completed once.
    assert (
        sorted((c["status"], c["attempts"], c["completions"]) for c in cells(killed))
        == [("done", 2, 1)] * 9
    )
