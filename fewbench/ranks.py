"""One cell on several ranks: ``torchrun --nproc-per-node N -m fewbench run SUITE``.

torchrun starts N copies of ``fewbench run``; they form a ``torch.distributed``
group (NCCL on GPUs, gloo on CPUs), and each rank sees its own GPU
(``LOCAL_RANK``). Rank 0 is the worker: it claims cells, writes checkpoints and
results, and evaluates. Before each cell it announces the cell's id; every rank
then sets up the same learner from the same seed and trains in step, each
adapting its share of every meta-batch (MAML and first-order MAML combine the
shares' meta-gradients with ``all_reduce``: see the maml plugin's ``data_parallel``),
so all ranks take the same optimizer steps. The other ranks read the cell's
checkpoint to resume with rank 0, and never write anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TextIO

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

    def announce(self, cell_id: str | None) -> str | None:
        """Rank 0 says which cell comes next (None: no more); every rank returns it."""
        message = [cell_id if self.leader else None]
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


def follow(ranks: Ranks, suite, registry, datasets, run_dir: Path, log: TextIO) -> None:
    """The loop of every rank but 0: train each announced cell in step with rank 0."""
    from fewbench.runner import failure_reason, set_up_cell
    from fewbench.training import train

    cells = {cell.id: cell for cell in suite.cells}
    while (cell_id := ranks.announce(None)) is not None:
        cell = cells[cell_id]
        try:
            setup = set_up_cell(cell, registry, datasets, ranks.device)
            train(
                setup.learner,
                setup.sources,
                cell,
                identity=setup.identity,
                device=ranks.device,
                checkpoint_dir=run_dir / "checkpoints" / cell.id,
                task_type=setup.task_type,
                progress=False,
                write_checkpoints=False,
            )
        except Exception as exc:  # rank 0 records the failure; it meets the same one
            print(f"rank {ranks.rank}: {cell.label}: {failure_reason(exc)}", file=log, flush=True)


def leave() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
