"""One cell on several ranks: ``torchrun --nproc-per-node N -m fewbench run SUITE``.

torchrun starts N copies of ``fewbench run``; they form a ``torch.distributed``
group (NCCL on GPUs, gloo on CPUs), and each rank sees its own GPU
(``LOCAL_RANK``). Rank 0 is the worker: it claims cells, writes checkpoints and
results, and evaluates. Before each cell it sends the cell to the others; every
rank then sets up the same learner from the same seed and trains in step, each
adapting its share of every meta-batch (MAML and first-order MAML combine the
shares' meta-gradients with ``all_reduce``: see the maml plugin's ``data_parallel``),
so all ranks take the same optimizer steps. The other ranks read the cell's
checkpoint to resume with rank 0 (:func:`fewbench.running.worker.follow`), and never
write anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Rank 0 evaluates a finished cell while the others wait for the next announcement.
GROUP_TIMEOUT = timedelta(hours=2)


@dataclass
class Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, value: Any = None) -> Any:
        """Rank 0's ``value`` on every rank (the others pass nothing)."""
        message = [value if self.leader else None]
        dist.broadcast_object_list(message, src=0)
        return message[0]


def from_environment(device: torch.device) -> Ranks | None:
    """Join the process group torchrun describes in the environment; None when alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=GROUP_TIMEOUT)
    return Ranks(rank, world, device)


def leave() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
