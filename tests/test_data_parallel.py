"""Data-parallel MAML: the meta-gradient on 2 ranks (gloo, CPU) equals the one on 1 process."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import REPO, assert_same_trained_conv4, concurrently, run_cli

from fewbench.plugin.dataset import EpisodeBatch
from fewbench.plugin.learner import LearnerContext
from fewbench.plugin.params import ParamSet
from fewbench_plugins.backbones.standard import Conv4
from fewbench_plugins.learners.maml import MAML

TASKS, WAYS = 5, 3  # an odd number of tasks: unequal shares


def batch() -> EpisodeBatch:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(WAYS)
    return EpisodeBatch(
        torch.randn(TASKS, WAYS * 2, 1, 14, 14, generator=g),
        labels.repeat_interleave(2).expand(TASKS, -1),
        torch.randn(TASKS, WAYS * 3, 1, 14, 14, generator=g),
        labels.repeat_interleave(3).expand(TASKS, -1),
        WAYS,
    )


def meta_gradient(first_order: bool) -> tuple[list[torch.Tensor], float]:
    torch.manual_seed(0)
    learner = MAML(
        **{
            **ParamSet.of(MAML).defaults(),
            "first_order": first_order,
            "inner_steps": 2,
            "threads": 1,
        }
    )
    context = LearnerContext(
        Conv4(hidden=8, pool="stride"), (1, 14, 14), WAYS, 2, 3, 10, torch.device("cpu")
    )
    learner.setup(context)
    loss = learner.meta_gradient_step(batch())
    return [p.grad.clone() for p in learner.model.parameters()], loss


def rank_main(rank: int, world: int, init_file: str, out_file: str) -> None:
    """Both meta-gradients (second and first order) in one process group."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        computed = {first_order: meta_gradient(first_order) for first_order in (False, True)}
        if rank == 0:
            torch.save(
                {k: {"grads": grads, "loss": loss} for k, (grads, loss) in computed.items()},
                out_file,
            )
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: under load, gloo's threads were once still
    # joinable when C++ destructors ran ("terminate called without an active exception",
    # SIGABRT in CI) after all the work above had finished. Everything is written by now.
    os._exit(0)


def test_two_ranks_give_the_single_process_meta_gradient(tmp_path):
    # One spawn of two ranks computes both orders: starting the processes is most of the cost.
    out = tmp_path / "ranks.pt"
    mp.spawn(rank_main, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    both = torch.load(out)
    for first_order in (False, True):
        distributed = both[first_order]
        single, loss = meta_gradient(first_order)
        assert abs(distributed["loss"] - loss) < 1e-6
        for a, b in zip(distributed["grads"], single, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


TORCHRUN_SUITE = """\
name: ranks
seeds: [0]
datasets: [{name: omniglot}]
tasks: {ways: 5, shots: 1, query: 2}
backbones: [{name: conv4, hidden: 16}]
learners: [{name: maml, meta_batch_size: 4, threads: 1}]
train: {iterations: 6, validate_every: 3, val_episodes: 4, log_every: 1, checkpoint_every: 2}
eval: {episodes: 10, query: 3}
"""


def test_torchrun_trains_one_cell_on_two_ranks_like_one_process(tmp_path, data_root, cache_dir):
    """``torchrun -m fewbench run``: rank 0 runs the cell and records it, rank 1 adapts half of
    every meta-batch; the trained weights equal a one-process run's to float tolerance."""
    suite = tmp_path / "ranks.yaml"
    suite.write_text(TORCHRUN_SUITE)
    common = ["--data-root", str(data_root), "--threads", "1", "--no-progress"]
    env = {"FEWBENCH_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "fewbench", "run", str(suite),
                "--out", str(tmp_path / "two"), *common]  # fmt: skip
    # The two runs are independent (one thread per process: the same numbers under any load).
    single, ranks = concurrently(
        lambda: run_cli("run", str(suite), "--out", str(tmp_path / "one"), *common, env=env),
        lambda: subprocess.run(
            torchrun,
            cwd=REPO,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=600,
        ),
    )
    assert single.returncode == 0, single.stderr
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert "1 cell on 2 ranks (cpu)" in ranks.stderr

    def stored(run: str):
        db = sqlite3.connect(tmp_path / run / "results.sqlite")
        ((cell_id, worker, completions),) = db.execute("SELECT id, worker, completions FROM cells")
        losses = [row[0] for row in db.execute(
            "SELECT loss FROM curve WHERE cell_id = ? ORDER BY iteration", (cell_id,))]  # fmt: skip
        best = torch.load(tmp_path / run / "checkpoints" / cell_id / "best.pt")["state"]
        return cell_id, completions, losses, best

    one, two = stored("one"), stored("two")
    assert one[0] == two[0] and two[1] == 1  # the same cell, recorded once (by rank 0)
    assert torch.allclose(torch.tensor(one[2]), torch.tensor(two[2]), rtol=1e-4, atol=1e-6)
    assert_same_trained_conv4(one[3]["model"], two[3]["model"])
