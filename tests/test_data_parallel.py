"""Data-parallel MAML: the meta-gradient on 2 ranks (gloo, CPU) equals the one on 1 process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fewbench.data import EpisodeBatch
from fewbench.learner import LearnerContext
from fewbench.params import ParamSet
from fewbench_plugins.backbones import Conv4
from fewbench_plugins.maml import MAML

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


def rank_main(rank: int, world: int, init_file: str, out_file: str, first_order: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        grads, loss = meta_gradient(first_order)
        if rank == 0:
            torch.save({"grads": grads, "loss": loss}, out_file)
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_single_process_meta_gradient(tmp_path):
    for first_order in (False, True):
        out = tmp_path / f"ranks-{first_order}.pt"
        mp.spawn(
            rank_main,
            args=(2, str(tmp_path / f"init-{first_order}"), str(out), first_order),
            nprocs=2,
            join=True,
        )
        distributed = torch.load(out)
        single, loss = meta_gradient(first_order)
        assert abs(distributed["loss"] - loss) < 1e-6
        for a, b in zip(distributed["grads"], single, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
