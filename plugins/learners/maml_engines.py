"""Three ways to compute the same MAML meta-gradient, and the rule that picks one.

* ``batched``: the tasks at once, ``torch.func.vmap`` over the task dimension of
  ``grad`` (inner loop) and of the query loss. A Conv-4 on a five-image support
  set is a tiny kernel; batching turns hundreds of tiny launches into a few large
  ones, which is what a GPU needs. ``tasks_per_call`` bounds how many tasks share
  one call, which bounds peak memory without changing the result.
* ``loop``: one task at a time through ``torch.func.functional_call`` and
  ``torch.autograd.grad``; only one task's graph is alive at a time.
* ``higher``: one task at a time through the ``higher`` library, as higher's own
  MAML example does; kept as the reference the others are tested and benchmarked
  against, and never split over threads.

On a CPU the convolutions cost the same however the tasks are grouped; what pays
is using every core. ``batched`` and ``loop`` therefore split the meta-batch into
contiguous shares, one per thread (at most one per task), the threads sharing the
intra-op threads; the shares' gradients are summed in a fixed order, so the result
does not depend on which thread finishes first.

The rule behind ``engine: auto`` (measured with benchmarks/throughput.py; the
tables are in benchmarks/README.md): on CUDA, ``batched`` in one thread. On a CPU,
one thread per core (torch's intra-op thread count), each running ``batched`` while
a task is small (at most CPU_BATCHED_MAX_VALUES_PER_TASK input values, support plus
query: per-call overhead dominates and batching removes it) and ``loop`` above that
(the work is in the convolutions, and vmap's batched convolutions and batch norms
are slower on a CPU than one task's).

Every engine returns the mean over tasks of the query loss and adds its gradient
with respect to ``theta`` to ``.grad`` (second order: through the inner steps;
first order: the query gradient taken at the adapted weights).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType
from typing import TypeVar

import higher
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from fewbench.data import EpisodeBatch

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Result = TypeVar("Result")

ENGINES = ("auto", "batched", "loop", "higher")
# Omniglot 5-way 1-shot with 1 query per class is 10 x 784 = 7,840 values (batched
# wins); with 15 queries, 62,720, and 20-way 1-shot, 31,360 (the loop wins).
CPU_BATCHED_MAX_VALUES_PER_TASK = 20_000


@dataclass(frozen=True)
class EngineChoice:
    engine: str  # batched | loop | higher
    threads: int
    why: str

    def describe(self) -> str:
        threads = f" x {self.threads} threads" if self.threads > 1 else ""
        return f"{self.engine}{threads} ({self.why})"


# -- batch norm under vmap ------------------------------------------------------------
def _batch_norm_from_elementary_ops(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """What ``F.batch_norm`` computes from batch statistics, in differentiable elementary ops."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(var + self.eps)
    if self.affine:
        scale = scale * self.weight.view(shape)
    shift = -mean * scale
    if self.affine:
        shift = shift + self.bias.view(shape)
    return torch.addcmul(shift, x, scale)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def can_batch(model: nn.Module) -> bool:
    """False when a batch norm keeps running statistics (in-place updates cannot be vmapped)."""
    return all(m.running_mean is None for m in batch_norms(model))


@contextmanager
def vmap_safe_batch_norm(model: nn.Module) -> Iterator[None]:
    """Run torch's batch norms as elementary ops while tasks are batched.

    The fused batch-norm kernel gives wrong second derivatives under
    ``torch.func.vmap`` (tests/test_maml.py compares every engine on a Conv-4 and
    would catch it), while it is the fastest choice for the per-task loop; so the
    batched engine swaps it out only for the duration of its calls.
    """
    patched = batch_norms(model)
    for module in patched:
        module.forward = MethodType(_batch_norm_from_elementary_ops, module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


# -- choosing ---------------------------------------------------------------------------
def choose_engine(
    requested: str,
    requested_threads: int,
    device: torch.device,
    batch: EpisodeBatch,
    *,
    vmap_safe: bool = True,
) -> EngineChoice:
    """The engine and thread count to run, and why (see the module docstring for the rule).

    ``vmap_safe`` is False when the backbone cannot be batched (a batch norm with
    running statistics); then ``auto`` never batches and ``batched`` is refused.
    """
    if not vmap_safe and requested == "batched":
        raise ValueError(
            "engine: batched cannot run a backbone whose batch norm keeps running statistics "
            "(in-place updates under torch.func.vmap); use engine: loop"
        )
    if requested == "auto":
        if device.type == "cuda" and vmap_safe:
            engine, why = "batched", "auto: CUDA device"
        elif device.type == "cuda":
            engine, why = "loop", "auto: the backbone's batch norm keeps running statistics"
        else:
            values = batch.support_x[0].numel() + batch.query_x[0].numel()
            limit = CPU_BATCHED_MAX_VALUES_PER_TASK
            if values <= limit and vmap_safe:
                engine, why = "batched", f"auto: CPU, {values} input values per task <= {limit}"
            else:
                engine, why = "loop", f"auto: CPU, {values} input values per task > {limit}"
            if not vmap_safe:
                why = "auto: the backbone's batch norm keeps running statistics"
    else:
        engine, why = requested, "set in the suite"
    if engine == "higher" or device.type != "cpu":
        threads = 1
    elif requested_threads > 0:
        threads = requested_threads
    else:
        threads = torch.get_num_threads()
    return EngineChoice(engine, threads, why)


# -- shared pieces -------------------------------------------------------------------------
class Replicas:
    """One copy of the model's module structure per thread.

    ``functional_call`` swaps tensors into a module while it runs, so two threads
    must not share one module. The copies' own parameters are never used: every
    call passes the real model's parameters and buffers explicitly.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.copies: list[nn.Module] = [model]

    def get(self, count: int) -> list[nn.Module]:
        while len(self.copies) < count:
            self.copies.append(copy.deepcopy(self.model))
        return self.copies[:count]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _in_parallel(work: Callable[[int, slice], Result], parts: list[slice]) -> list[Result]:
    """``work(i, part)`` for every part, one thread each, sharing the intra-op threads.

    With as many parts as cores each thread computes with one core; with fewer parts
    (a meta-batch of 4 on 16 cores) each gets its share of the cores.
    """
    if len(parts) == 1:
        return [work(0, parts[0])]
    pool = _POOLS.setdefault(len(parts), ThreadPoolExecutor(len(parts), "fewbench-task"))
    saved = torch.get_num_threads()
    share = max(1, saved // len(parts))

    def run(index: int) -> Result:
        torch.set_num_threads(share)
        return work(index, parts[index])

    try:
        futures = [pool.submit(run, i) for i in range(len(parts))]
        return [f.result() for f in futures]
    finally:
        torch.set_num_threads(saved)


def _split(tasks: int, parts: int) -> list[slice]:
    """``tasks`` as at most ``parts`` contiguous, near-equal shares."""
    parts = max(1, min(parts, tasks))
    bounds = [round(i * tasks / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _chunks(part: slice, per_call: int) -> list[slice]:
    size = part.stop - part.start if per_call <= 0 else per_call
    return [slice(s, min(s + size, part.stop)) for s in range(part.start, part.stop, size)]


def _select(batch: EpisodeBatch, part: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return batch.support_x[part], batch.support_y[part], batch.query_x[part], batch.query_y[part]


@dataclass(frozen=True)
class InnerLoop:
    """What every task of one call shares: a network skeleton, its buffers, the loss, the
    inner step size and the number of steps."""

    model: nn.Module
    buffers: Params
    loss: LossFn
    lr: float
    steps: int

    def forward(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, (params, self.buffers), (x,))

    def task_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(self.forward(params, x), y)

    def adapt_vmappable(self, params: Params, x: Tensor, y: Tensor) -> Params:
        """The inner SGD steps written with ``torch.func.grad``, so they can be vmapped."""
        for _ in range(self.steps):
            grads = grad(self.task_loss)(params, x, y)
            params = {name: torch.add(p, grads[name], alpha=-self.lr) for name, p in params.items()}
        return params

    def adapt(self, params: Params, x: Tensor, y: Tensor, create_graph: bool) -> Params:
        """The inner SGD steps on one task, differentiable in ``params`` when ``create_graph``."""
        for _ in range(self.steps):
            grads = torch.autograd.grad(
                self.task_loss(params, x, y), list(params.values()), create_graph=create_graph
            )
            params = {
                name: torch.add(p, g, alpha=-self.lr)
                for (name, p), g in zip(params.items(), grads, strict=True)
            }
        return params


# -- meta-gradients -------------------------------------------------------------------------
def meta_gradient(
    choice: EngineChoice,
    replicas: Replicas,
    loss: LossFn,
    batch: EpisodeBatch,
    *,
    lr: float,
    steps: int,
    second_order: bool,
    tasks_per_call: int = 0,
) -> float:
    """Add the meta-gradient of the mean query loss to ``.grad``; return that loss."""
    model = replicas.model
    if choice.engine == "higher":
        return higher_meta_gradient(
            model, loss, batch, lr=lr, steps=steps, second_order=second_order
        )
    theta = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    tasks = len(batch)
    parts = _split(tasks, choice.threads)
    loops = [InnerLoop(m, buffers, loss, lr, steps) for m in replicas.get(len(parts))]

    def share(index: int, part: slice) -> tuple[list[Tensor], float]:
        if choice.engine == "batched":
            with vmap_safe_batch_norm(loops[index].model):
                return _batched_share(
                    loops[index], theta, batch, part, second_order, tasks, tasks_per_call
                )
        return _loop_share(loops[index], theta, batch, part, second_order, tasks)

    results = _in_parallel(share, parts)
    total = 0.0
    for grads, value in results:  # a fixed order: the sum does not depend on thread timing
        for p, g in zip(theta.values(), grads, strict=True):
            p.grad = g if p.grad is None else p.grad + g
        total += value
    return total


def _add(into: list[Tensor] | None, grads: tuple[Tensor, ...] | list[Tensor]) -> list[Tensor]:
    return list(grads) if into is None else [a + b for a, b in zip(into, grads, strict=True)]


def _loop_share(
    inner: InnerLoop,
    theta: Params,
    batch: EpisodeBatch,
    part: slice,
    second_order: bool,
    tasks: int,
) -> tuple[list[Tensor], float]:
    total_grads: list[Tensor] | None = None
    total = 0.0
    for t in range(part.start, part.stop):
        adapted = inner.adapt(theta, batch.support_x[t], batch.support_y[t], second_order)
        task_loss = inner.task_loss(adapted, batch.query_x[t], batch.query_y[t]) / tasks
        # First order: the inner gradients are constants, so d theta'/d theta is the identity
        # and this is the query gradient at theta'. One task's graph is alive at a time.
        total_grads = _add(total_grads, torch.autograd.grad(task_loss, list(theta.values())))
        total += task_loss.item()
    return total_grads, total


def _batched_share(
    inner: InnerLoop,
    theta: Params,
    batch: EpisodeBatch,
    part: slice,
    second_order: bool,
    tasks: int,
    tasks_per_call: int,
) -> tuple[list[Tensor], float]:
    total_grads: list[Tensor] | None = None
    total = 0.0
    if second_order:

        def task_query_loss(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            return inner.task_loss(inner.adapt_vmappable(p, sx, sy), qx, qy)

        per_task = vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0), randomness="different")
        for chunk in _chunks(part, tasks_per_call):
            chunk_loss = per_task(theta, *_select(batch, chunk)).sum() / tasks
            # The chunk's graph is freed here, before the next chunk's is built.
            total_grads = _add(total_grads, torch.autograd.grad(chunk_loss, list(theta.values())))
            total += chunk_loss.item()
        return total_grads, total

    constants = {name: p.detach() for name, p in theta.items()}

    def task_query_grad(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        adapted = inner.adapt_vmappable(p, sx, sy)
        return grad_and_value(inner.task_loss)(adapted, qx, qy)

    per_task = vmap(task_query_grad, in_dims=(None, 0, 0, 0, 0), randomness="different")
    for chunk in _chunks(part, tasks_per_call):
        grads, losses = per_task(constants, *_select(batch, chunk))
        total_grads = _add(total_grads, [grads[name].sum(dim=0) / tasks for name in theta])
        total += losses.sum().item() / tasks
    return total_grads, total


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


# -- adaptation at validation and test time -------------------------------------------------
def adapt_and_predict(
    choice: EngineChoice,
    replicas: Replicas,
    loss: LossFn,
    episodes: EpisodeBatch,
    *,
    lr: float,
    steps: int,
    tasks_per_call: int = 0,
) -> Tensor:
    """Adapt a copy of the weights to each episode's support set; query outputs ``[T, NQ, out]``."""
    model = replicas.model
    theta = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    parts = _split(len(episodes), choice.threads)
    loops = [InnerLoop(m, buffers, loss, lr, steps) for m in replicas.get(len(parts))]

    def share(index: int, part: slice) -> Tensor:
        with torch.enable_grad():
            if choice.engine == "batched":
                return _batched_predict(loops[index], theta, episodes, part, tasks_per_call)
            return _loop_predict(loops[index], theta, episodes, part)

    return torch.cat(_in_parallel(share, parts))


def _batched_predict(
    inner: InnerLoop, theta: Params, episodes: EpisodeBatch, part: slice, tasks_per_call: int
) -> Tensor:
    def task_outputs(p: Params, sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
        return inner.forward(inner.adapt_vmappable(p, sx, sy), qx)

    per_task = vmap(task_outputs, in_dims=(None, 0, 0, 0), randomness="different")
    outputs = []
    with vmap_safe_batch_norm(inner.model):
        for chunk in _chunks(part, tasks_per_call):
            sx, sy, qx, _ = _select(episodes, chunk)
            outputs.append(per_task(theta, sx, sy, qx).detach())
    return torch.cat(outputs)


def _loop_predict(inner: InnerLoop, theta: Params, episodes: EpisodeBatch, part: slice) -> Tensor:
    outputs = []
    for t in range(part.start, part.stop):
        base = {name: p.clone().requires_grad_() for name, p in theta.items()}
        adapted = inner.adapt(base, episodes.support_x[t], episodes.support_y[t], False)
        with torch.no_grad():
            outputs.append(inner.forward(adapted, episodes.query_x[t]))
    return torch.stack(outputs)
