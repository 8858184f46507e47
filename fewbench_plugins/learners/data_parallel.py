"""Data-parallel meta-gradients: a meta-batch spread over the ranks of ``torch.distributed``.

Every rank draws the same meta-batch (the batches come from the seeded stream),
adapts its contiguous share of the tasks, and the shares' gradients, each weighted
by its share of the tasks, are summed across ranks with ``all_reduce``. The result
is the meta-gradient of the whole meta-batch: the same, to float tolerance, as on
one process (tests/test_data_parallel.py checks it on 2 CPU ranks with gloo).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fewbench.plugin import EpisodeBatch


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def share_of(batch: EpisodeBatch, rank: int, world: int) -> EpisodeBatch | None:
    """This rank's contiguous share of the tasks (None when there are fewer tasks than ranks)."""
    tasks = len(batch)
    start, stop = round(rank * tasks / world), round((rank + 1) * tasks / world)
    if stop <= start:
        return None
    part = slice(start, stop)
    return EpisodeBatch(
        batch.support_x[part], batch.support_y[part], batch.query_x[part], batch.query_y[part],
        batch.ways,
    )  # fmt: skip


def meta_gradient(
    model: nn.Module, batch: EpisodeBatch, local: Callable[[EpisodeBatch], float | Tensor]
) -> float:
    """``local(share)`` adds the mean meta-gradient of ``share`` to ``.grad``; combine the ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    share = share_of(batch, rank, world)
    params = list(model.parameters())
    loss = 0.0
    if share is not None:
        loss = float(local(share)) * len(share) / len(batch)  # all_reduce syncs anyway
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif share is not None:
            p.grad.mul_(len(share) / len(batch))
    flat = torch.cat(
        [p.grad.reshape(-1) for p in params] + [torch.tensor([loss], device=params[0].device)]
    )
    dist.all_reduce(flat)  # one call for every gradient and the loss
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return float(flat[-1])
