"""The ``higher`` reference engine of MAML's meta-gradient.

The engines every gradient-based learner runs (``batched``, ``loop``, ``auto``)
are :class:`fewbench.methods.adaptation.Adapter`'s. ``higher`` is one task at a time
through the ``higher`` library, as higher's own MAML example does; MAML keeps it as
the reference the core's engines are tested (tests/test_maml.py) and benchmarked
(benchmarks/throughput.py) against. It is never split over threads.
"""

from __future__ import annotations

import higher
import torch
from torch import nn

from fewbench.methods.adaptation import ENGINES as CORE_ENGINES
from fewbench.methods.adaptation import EngineChoice, LossFn, choose_engine
from fewbench.plugin import EpisodeBatch

ENGINES = (*CORE_ENGINES, "higher")
__all__ = ["ENGINES", "EngineChoice", "choose_engine", "higher_meta_gradient"]


def higher_meta_gradient(
    model: nn.Module,
    loss: LossFn,
    batch: EpisodeBatch,
    *,
    lr: float,
    steps: int,
    second_order: bool,
) -> float:
    """The reference: higher's MAML example, one task at a time, gradients into ``.grad``."""
    tasks = len(batch)
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
    theta = list(model.parameters())
    total = 0.0
    for t in range(tasks):
        with higher.innerloop_ctx(
            model, inner_opt, copy_initial_weights=False, track_higher_grads=second_order
        ) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss(fmodel(batch.support_x[t]), batch.support_y[t]))
            task_loss = loss(fmodel(batch.query_x[t]), batch.query_y[t]) / tasks
            if second_order:
                task_loss.backward()
            else:  # higher detaches the fast weights: carry their gradient over to theta
                grads = torch.autograd.grad(task_loss, list(fmodel.parameters()))
                for p, g in zip(theta, grads, strict=True):
                    p.grad = g.detach() if p.grad is None else p.grad + g.detach()
            total += task_loss.item()
    return total
