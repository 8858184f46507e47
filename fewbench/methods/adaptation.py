"""Adapting a model to a batch of tasks: the inner loop of the MAML family, public.

A learner of the gradient-based family (MAML, ANIL, BOIL, Meta-SGD, MAML++,
Proto-MAML, Reptile) differs from MAML only in *what* the inner loop adapts and
*how*; :class:`Adapter` is that inner loop, written once and fast, and each
learner composes it:

* which parameters adapt (``adapt``): ``"all"``, ``"head"`` (the model's last
  module, the linear layer :meth:`fewbench.plugin.backbone.Backbone.build` appends),
  ``"body"`` (everything else), a predicate on parameter names, or a list of names;
* the step size (``step_size``): a float, or a :class:`StepSizes` module holding
  one value, one per parameter tensor or one per element, shared by all steps or
  one per step, fixed or learnt (learnt ones are meta-parameters: they are in
  :meth:`Adapter.parameters` and receive gradients);
* the number of steps (given per call: training and testing often differ), first
  or second order, the loss, plain SGD or Adam (Reptile) in the inner loop;
* batch norm (``per_step_batch_norm``): the model's own batch norm (batch statistics
  when the backbone keeps none: Finn et al.'s transductive mode; running statistics
  when it keeps them, used at test time in eval mode: the inductive mode), or
  :class:`PerStepBatchNorm`, MAML++'s per-step weights and biases; and which statistics a
  query forward takes (``query_statistics``): the query set's own (``"query"``, Finn et al.'s
  transductive mode) or the support set's (``"support"``: no query's output depends on
  another, in meta-training and at test alike; see :func:`support_statistics`);
* a per-task initialisation (``task_init``), e.g. Proto-MAML's head from prototypes;
* the multi-step loss (``step_weights`` in :meth:`Adapter.meta_gradient`): the query
  loss after every step, weighted, as in MAML++.

How the tasks are computed is the engine (``batched``: all tasks of a call at once
under ``torch.func.vmap``; ``loop``: one task at a time; ``auto``: the rule in
:func:`choose_engine`). Both give the same numbers (tests/test_maml.py,
tests/test_adaptation.py). On a CPU the meta-batch is split into contiguous shares,
one per thread, and the shares' gradients are summed in a fixed order, so a result
does not depend on thread timing.

Gradients. :meth:`Adapter.meta_gradient` adds d(mean over tasks of the query loss)
/ d(meta-parameter) to the ``.grad`` of every meta-parameter (the model's
parameters, learnt step sizes, per-step batch-norm parameters). Second order
differentiates through the inner steps; first order treats each inner gradient
as a constant, so ``d theta' / d theta`` is the identity and a learnt step size
``alpha`` gets ``-g * dL/d theta'`` (Nichol et al.'s first-order MAML, extended to
the step size).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from fewbench.plugin.dataset import EpisodeBatch
from fewbench.running import cpu_heap

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Which = str | Callable[[str], bool] | Sequence[str]
Result = TypeVar("Result")

ENGINES = ("auto", "batched", "loop")
OPTIMIZERS = ("sgd", "adam")
# Omniglot 5-way 1-shot with 1 query per class is 10 x 784 = 7,840 values (batched
# wins); with 15 queries, 62,720, and 20-way 1-shot, 31,360 (the loop wins).
CPU_BATCHED_MAX_VALUES_PER_TASK = 20_000
# mini-ImageNet 5-way 1-shot with 15 queries per class is 80 x 3 x 84 x 84 = 1,693,440 values:
# with glibc keeping large blocks on the main heap (fewbench.running.cpu_heap), one task at a time on
# every core was 1.26x the loop split over the cores (whose threads' arenas map the 68 MB
# blocks afresh); measured with benchmarks/throughput.py, configuration 3.
CPU_ONE_TASK_MIN_VALUES_PER_TASK = 1_000_000


# -- which parameters adapt -----------------------------------------------------------
def head_names(model: nn.Module) -> tuple[str, ...]:
    """The parameters of the model's last module that has any (the appended linear layer)."""
    children = [
        (name, m) for name, m in model.named_children() if next(m.parameters(), None) is not None
    ]
    if not children:
        raise ValueError("the model has no module with parameters to call its head")
    last, module = children[-1]
    return tuple(f"{last}.{name}" for name, _ in module.named_parameters())


def parameter_names(model: nn.Module, which: Which) -> tuple[str, ...]:
    """The names of the parameters ``which`` selects, in the model's order."""
    names = [name for name, _ in model.named_parameters()]
    if isinstance(which, str):
        if which == "all":
            return tuple(names)
        head = set(head_names(model))
        if which == "head":
            return tuple(n for n in names if n in head)
        if which == "body":
            return tuple(n for n in names if n not in head)
        raise ValueError(f"adapt must be all, head, body, a predicate or names; got {which!r}")
    if callable(which):
        chosen = tuple(n for n in names if which(n))
    else:
        unknown = sorted(set(which) - set(names))
        if unknown:
            raise ValueError(f"adapt names parameters the model does not have: {unknown}")
        chosen = tuple(n for n in names if n in set(which))
    if not chosen:
        raise ValueError("adapt selects no parameter")
    return chosen


# -- step sizes ---------------------------------------------------------------------------
def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


class StepSizes(nn.Module):
    """Inner-loop step sizes: fixed or learnt, of one of three granularities, per step or not.

    ``per``: ``"scalar"`` (one value for every parameter), ``"tensor"`` (one per
    parameter tensor: MAML++'s per-layer rates) or ``"element"`` (one per parameter
    element: Meta-SGD's ``alpha``). ``steps``: one set of values per inner step
    (MAML++'s per-step rates) when given; a step past the last uses the last set.
    ``learnable``: the values are ``nn.Parameter`` (meta-learnt) or fixed buffers.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        init: float,
        *,
        per: str = "tensor",
        steps: int | None = None,
        learnable: bool = True,
    ):
        super().__init__()
        if per not in ("scalar", "tensor", "element"):
            raise ValueError(f"per must be scalar, tensor or element; got {per!r}")
        self.names = tuple(names)
        self.per = per
        self.steps = steps
        shapes = dict(model.named_parameters())
        lead = (steps,) if steps else ()
        values: dict[str, Tensor] = {}
        for name in ("all",) if per == "scalar" else self.names:
            shape = shapes[name].shape if per == "element" else ()
            values[_key(name)] = torch.full(
                lead + tuple(shape), float(init), dtype=shapes[self.names[0]].dtype
            )
        if learnable:
            self.values = nn.ParameterDict({k: nn.Parameter(v) for k, v in values.items()})
        else:
            self.values = nn.ParameterDict(
                {k: nn.Parameter(v, requires_grad=False) for k, v in values.items()}
            )
        self.to(next(iter(shapes.values())).device)

    def at(self, step: int) -> Params:
        """The step size of every adapted parameter at ``step`` (from 0), broadcastable to it."""
        index = min(step, self.steps - 1) if self.steps else None

        def value(name: str) -> Tensor:
            v = self.values[_key("all" if self.per == "scalar" else name)]
            return v if index is None else v[index]

        return {name: value(name) for name in self.names}


# -- per-step batch norm (MAML++) ----------------------------------------------------------
def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batch_norm_affine_names(model: nn.Module) -> list[str]:
    """The names of every batch norm's weight and bias, in the model's order."""
    return [
        f"{module_name}.{kind}"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
        for kind in ("weight", "bias")
    ]


class PerStepBatchNorm(nn.Module):
    """One weight and bias per inner step for every batch norm (MAML++'s BNWB).

    Antoniou et al. (2019, section 4, "per-step batch normalization weights and
    biases") keep a set of batch-norm affine parameters for each inner step; the
    support forward of step ``k`` and the query forward after step ``k + 1`` use set
    ``k`` (their code's ``num_step``). They are meta-learnt and not adapted in the
    inner loop. Normalisation uses each step's batch statistics, as their code does
    in every phase (``F.batch_norm(..., training=True)``); the per-step running
    statistics their code also keeps are never read, so none are kept here.
    """

    def __init__(self, model: nn.Module, steps: int):
        super().__init__()
        self.steps = steps
        self.names = batch_norm_affine_names(model)
        current = dict(model.named_parameters())
        values = {
            _key(name): nn.Parameter(current[name].detach().clone().expand(steps, -1).clone())
            for name in self.names
        }
        if not values:
            raise ValueError("per-step batch norm: the model has no affine batch norm")
        self.values = nn.ParameterDict(values)

    def at(self, step: int) -> Params:
        index = min(step, self.steps - 1)
        return {name: self.values[_key(name)][index] for name in self.names}


# -- batch norm under vmap ------------------------------------------------------------------
def _batch_norm_from_elementary_ops(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """What ``F.batch_norm`` computes from batch statistics, in differentiable elementary ops."""
    return _normalise_with(self, x, x)


def _normalise_with(self: nn.modules.batchnorm._BatchNorm, x: Tensor, stats_of: Tensor) -> Tensor:
    """Batch norm of ``x`` with the batch statistics of ``stats_of`` (``x`` itself, or a part
    of it), in differentiable elementary ops."""
    dims = [0, *range(2, x.dim())]
    mean = stats_of.mean(dim=dims, keepdim=True)
    var = stats_of.var(dim=dims, unbiased=False, keepdim=True)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(var + self.eps)
    if self.affine:
        scale = scale * self.weight.view(shape)
    shift = -mean * scale
    if self.affine:
        shift = shift + self.bias.view(shape)
    return torch.addcmul(shift, x, scale)


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


@contextmanager
def inductive_batch_norm(models: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode for the batch norms that keep running statistics, for the duration.

    A test episode is then adapted and predicted with the running averages gathered
    while meta-training (the inductive mode: no query example affects another's
    prediction, and testing leaves the statistics as they were). Batch norms without
    running statistics normalise with the batch at hand in either mode (Finn et al.'s
    transductive mode)."""
    saved = [(m, m.training) for model in models for m in batch_norms(model)]
    for module, _ in saved:
        if module.running_mean is not None:
            module.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.train(training)


QUERY_STATISTICS = ("query", "support")


def _normalise_with_leading(self: nn.modules.batchnorm._BatchNorm, count: int, x: Tensor) -> Tensor:
    """Batch norm of ``x`` with the statistics of its first ``count`` examples only."""
    return _normalise_with(self, x, x[:count])


@contextmanager
def support_statistics(model: nn.Module, count: int) -> Iterator[None]:
    """For the duration, every batch norm of ``model`` that keeps no running statistics
    normalises a batch with the statistics of its first ``count`` examples.

    A query forward of the inductive mode runs on the support set followed by the query set,
    with ``count`` the support set's size: each query is normalised with the support set's
    statistics (at the adapted weights), so no query's output depends on another query, and
    a query's output is what it would be with that query alone. Batch norms with running
    statistics are left as they are (eval mode at test time is inductive already; in
    meta-training they gather their averages). Any forward an engine patched in before (the
    batched engine's, :func:`vmap_safe_batch_norm`) is restored afterwards."""
    modules = [m for m in batch_norms(model) if m.running_mean is None]
    saved = [(m, m.__dict__.get("forward")) for m in modules]
    for module in modules:
        module.forward = functools.partial(_normalise_with_leading, module, count)
    try:
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


# -- choosing an engine -------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineChoice:
    engine: str  # batched | loop (| a learner's own, e.g. maml's higher)
    threads: int
    why: str

    def describe(self) -> str:
        threads = f" x {self.threads} threads" if self.threads > 1 else ""
        return f"{self.engine}{threads} ({self.why})"


def choose_engine(
    requested: str,
    requested_threads: int,
    device: torch.device,
    batch: EpisodeBatch,
    *,
    vmap_safe: bool = True,
) -> EngineChoice:
    """The engine and thread count to run, and why.

    On CUDA, ``batched`` in one thread. On a CPU, one thread per core (torch's
    intra-op thread count), each running ``batched`` while a task is small (at most
    :data:`CPU_BATCHED_MAX_VALUES_PER_TASK` input values, support plus query:
    per-call overhead dominates and batching removes it) and ``loop`` above that
    (the work is in the convolutions, and vmap's batched convolutions and batch
    norms are slower on a CPU than one task's); measured with
    benchmarks/throughput.py. A task of mini-ImageNet size (at least
    :data:`CPU_ONE_TASK_MIN_VALUES_PER_TASK` values) runs one at a time on all the
    intra-op threads when glibc keeps large blocks on the main heap
    (:mod:`fewbench.running.cpu_heap`). ``vmap_safe`` is False when the backbone cannot be
    batched (a batch norm with running statistics): then ``auto`` never batches
    and ``batched`` is refused.
    """
    if not vmap_safe and requested == "batched":
        raise ValueError(
            "engine: batched cannot run a backbone whose batch norm keeps running statistics "
            "(in-place updates under torch.func.vmap); use engine: loop"
        )
    values = batch.support_x[0].numel() + batch.query_x[0].numel()  # one task's inputs
    if requested == "auto":
        if device.type == "cuda" and vmap_safe:
            engine, why = "batched", "auto: CUDA device"
        elif device.type == "cuda":
            engine, why = "loop", "auto: the backbone's batch norm keeps running statistics"
        else:
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
    elif (
        requested == "auto"
        and engine == "loop"
        and values >= CPU_ONE_TASK_MIN_VALUES_PER_TASK
        and cpu_heap.is_on()
    ):
        threads = 1
        why += "; one task at a time, its large blocks on the main heap (fewbench.running.cpu_heap)"
    else:
        threads = torch.get_num_threads()
    return EngineChoice(engine, threads, why)


# -- threads ----------------------------------------------------------------------------------
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


def in_parallel(work: Callable[[int, slice], Result], parts: list[slice]) -> list[Result]:
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


def split(tasks: int, parts: int) -> list[slice]:
    """``tasks`` as at most ``parts`` contiguous, near-equal shares."""
    parts = max(1, min(parts, tasks))
    bounds = [round(i * tasks / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _chunks(part: slice, per_call: int) -> list[slice]:
    size = part.stop - part.start if per_call <= 0 else per_call
    return [slice(s, min(s + size, part.stop)) for s in range(part.start, part.stop, size)]


def _select(batch: EpisodeBatch, part: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return batch.support_x[part], batch.support_y[part], batch.query_x[part], batch.query_y[part]


def _zero(like: Tensor) -> Tensor:
    """A float64 zero on ``like``'s device: losses are summed there in float64, in the order
    Python summed ``.item()`` values before, so the numbers are the same without a sync."""
    return torch.zeros((), dtype=torch.float64, device=like.device)


def _add(
    into: list[Tensor] | None, grads: Sequence[Tensor | None], like: Sequence[Tensor] = ()
) -> list[Tensor]:
    """``into + grads`` element-wise; a ``None`` gradient (an unused input) counts as zero."""
    if like:
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like, strict=True)]
    return list(grads) if into is None else [a + b for a, b in zip(into, grads, strict=True)]


# -- one call's inner loop ------------------------------------------------------------------------
TaskInit = Callable[["InnerLoop", Params, Tensor, Tensor], Params]


@dataclass(frozen=True)
class InnerLoop:
    """What every task of one call shares: a network skeleton (one per thread), its
    buffers, the loss, the adapted names, the step sizes and the per-step parameters.

    Every method works on one task's tensors, so that it can be vmapped."""

    model: nn.Module
    buffers: Params
    loss: LossFn
    adapted: tuple[str, ...]
    step_size: float | StepSizes
    per_step: PerStepBatchNorm | None = None
    task_init: TaskInit | None = None
    optimizer: str = "sgd"
    adam_betas: tuple[float, float] = (0.0, 0.999)
    adam_eps: float = 1e-8
    query_statistics: str = "query"  # QUERY_STATISTICS: see Adapter

    def query_forward(self, params: Params, sx: Tensor, qx: Tensor, step: int = 0) -> Tensor:
        """The query set's outputs after adaptation: one forward of the query set
        (``query_statistics: query``), or of support and query with the support set's batch
        statistics (``support``: :func:`support_statistics`)."""
        if self.query_statistics == "query":
            return self.forward(params, qx, step)
        count = sx.shape[0]
        with support_statistics(self.model, count):
            return self.forward(params, torch.cat([sx, qx]), step)[count:]

    def query_loss(
        self, params: Params, sx: Tensor, qx: Tensor, qy: Tensor, step: int = 0
    ) -> Tensor:
        return self.loss(self.query_forward(params, sx, qx, step), qy)

    def forward(self, params: Params, x: Tensor, step: int = 0) -> Tensor:
        if self.per_step is not None:
            params = {**params, **self.per_step.at(step)}
        return functional_call(self.model, (params, self.buffers), (x,))

    def features(self, params: Params, x: Tensor, step: int = 0) -> Tensor:
        """The output of every module but the last (the head), e.g. for a per-task head.

        Needs an ``nn.Sequential`` model, as :meth:`fewbench.plugin.backbone.Backbone.build` gives."""
        if not isinstance(self.model, nn.Sequential):
            raise TypeError("features() needs an nn.Sequential model (body, then head)")
        if self.per_step is not None:
            params = {**params, **self.per_step.at(step)}
        head = f"{len(self.model) - 1}."
        body = {n: v for n, v in {**params, **self.buffers}.items() if not n.startswith(head)}
        return functional_call(self.model[:-1], body, (x,))

    def task_loss(self, params: Params, x: Tensor, y: Tensor, step: int = 0) -> Tensor:
        return self.loss(self.forward(params, x, step), y)

    def initial(self, theta: Params, sx: Tensor, sy: Tensor) -> Params:
        """The task's starting point: ``theta``, or what ``task_init`` makes of it.

        After a task init every tensor becomes a node of its own (``view_as``), so that
        the inner gradient is the partial derivative in each, as ``torch.func.grad``
        gives it: a head computed from the body must not send the support loss's
        gradient back into the body's inner step through ``torch.autograd.grad``."""
        if self.task_init is None:
            return dict(theta)
        return {n: p.view_as(p) for n, p in self.task_init(self, dict(theta), sx, sy).items()}

    def _update(self, params: Params, grads: Params, step: int, state: dict) -> Params:
        """One step of the inner optimizer on the adapted parameters."""
        if self.optimizer == "adam":
            beta1, beta2 = self.adam_betas
            t = step + 1
            lrs = self._rates(step)
            new = dict(params)
            for name in self.adapted:
                g = grads[name]
                m = beta1 * state.get(("m", name), torch.zeros_like(g)) + (1 - beta1) * g
                v = beta2 * state.get(("v", name), torch.zeros_like(g)) + (1 - beta2) * g * g
                state[("m", name)], state[("v", name)] = m, v
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                new[name] = params[name] - lrs[name] * m_hat / (v_hat.sqrt() + self.adam_eps)
            return new
        new = dict(params)
        if isinstance(self.step_size, float):
            for name in self.adapted:
                new[name] = torch.add(params[name], grads[name], alpha=-self.step_size)
        else:
            rates = self.step_size.at(step)
            for name in self.adapted:
                new[name] = params[name] - rates[name] * grads[name]
        return new

    def _rates(self, step: int) -> dict[str, float | Tensor]:
        if isinstance(self.step_size, float):
            return dict.fromkeys(self.adapted, self.step_size)
        return self.step_size.at(step)

    # vmappable: gradients with torch.func.grad
    def step_vmappable(
        self, params: Params, x: Tensor, y: Tensor, step: int, first_order: bool, state: dict
    ) -> Params:
        fixed = {n: p for n, p in params.items() if n not in self.adapted}

        def support_loss(fast: Params) -> Tensor:
            return self.task_loss({**fixed, **fast}, x, y, step)

        grads = grad(support_loss)({n: params[n] for n in self.adapted})
        if first_order:
            grads = {n: g.detach() for n, g in grads.items()}
        return self._update(params, grads, step, state)

    # one task at a time: gradients with torch.autograd.grad
    def step_autograd(
        self, params: Params, x: Tensor, y: Tensor, step: int, create_graph: bool, state: dict
    ) -> Params:
        if not create_graph:
            # First order: the inner gradient is a constant, taken at detached copies so
            # that this backward never touches (and frees) the graph that leads to params.
            params_at = {n: p.detach().requires_grad_(n in self.adapted) for n, p in params.items()}
        else:
            params_at = params
        loss = self.task_loss(params_at, x, y, step)
        grads = torch.autograd.grad(
            loss, [params_at[n] for n in self.adapted], create_graph=create_graph
        )
        return self._update(params, dict(zip(self.adapted, grads, strict=True)), step, state)

    def run(
        self, theta: Params, sx: Tensor, sy: Tensor, steps: int, *, first_order: bool, vmapped: bool
    ) -> list[Params]:
        """The parameters before the first step and after every step; ``vmapped``: with
        ``torch.func.grad`` (inside vmap), else with ``torch.autograd.grad`` (one task)."""
        params = self.initial(theta, sx, sy)
        trajectory, state = [params], {}
        for step in range(steps):
            if vmapped:
                params = self.step_vmappable(params, sx, sy, step, first_order, state)
            else:
                params = self.step_autograd(params, sx, sy, step, not first_order, state)
            trajectory.append(params)
        return trajectory

    def query_objective(
        self,
        trajectory: list[Params],
        qx: Tensor,
        qy: Tensor,
        weights: Sequence[float] | None,
        sx: Tensor | None = None,
    ) -> Tensor:
        """The query loss after the last step, or the weighted sum over steps (MAML++);
        ``sx``, the support set, is needed with ``query_statistics: support``."""
        steps = len(trajectory) - 1
        if weights is None:
            return self.query_loss(trajectory[-1], sx, qx, qy, max(steps - 1, 0))
        total = None
        for step, weight in enumerate(weights, start=1):
            if weight == 0:
                continue
            term = weight * self.query_loss(trajectory[step], sx, qx, qy, step - 1)
            total = term if total is None else total + term
        return total


# -- the public entry point --------------------------------------------------------------------------
class Adapter(nn.Module):
    """The inner loop of one learner: what adapts and how; see the module docstring.

    An ``nn.Module`` so that its meta-parameters (the model's, learnt step sizes,
    per-step batch norm) are one ``parameters()`` for the meta-optimizer and one
    ``state_dict()`` for checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        *,
        adapt: Which = "all",
        step_size: float | StepSizes = 0.4,
        first_order: bool = False,
        optimizer: str = "sgd",
        engine: str = "auto",
        threads: int = 0,
        tasks_per_call: int = 0,
        per_step_batch_norm: PerStepBatchNorm | None = None,
        task_init: TaskInit | None = None,
        query_statistics: str = "query",
    ):
        super().__init__()
        if query_statistics not in QUERY_STATISTICS:
            raise ValueError(f"query_statistics must be query or support; got {query_statistics!r}")
        self.query_statistics = query_statistics
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be sgd or adam; got {optimizer!r}")
        self.model = model
        self.step_sizes = step_size if isinstance(step_size, StepSizes) else None
        self.per_step_batch_norm = per_step_batch_norm
        self.fixed_step = None if self.step_sizes is not None else float(step_size)
        self.adapted = parameter_names(model, adapt)
        if self.step_sizes is not None and set(self.step_sizes.names) != set(self.adapted):
            raise ValueError("the step sizes must cover exactly the adapted parameters")
        self.loss = loss
        self.first_order = first_order
        self.optimizer = optimizer
        self.engine = engine
        self.threads = threads
        self.tasks_per_call = tasks_per_call
        self.task_init = task_init
        self.replicas = Replicas(model)
        self.engines: dict[str, EngineChoice] = {}  # train | predict, chosen at the first batch

    # -- what is learnt ------------------------------------------------------------------
    def meta_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Everything the outer loop learns, in a fixed order."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def _extra(self) -> list[nn.Parameter]:
        """Meta-parameters other than the model's (they reach the inner loop by closure)."""
        model_ids = {id(p) for p in self.model.parameters()}
        return [p for _, p in self.meta_parameters() if id(p) not in model_ids]

    def engine_for(self, phase: str, batch: EpisodeBatch) -> EngineChoice:
        if phase not in self.engines:
            device = next(self.model.parameters()).device
            self.engines[phase] = choose_engine(
                self.engine, self.threads, device, batch, vmap_safe=can_batch(self.model)
            )
        return self.engines[phase]

    def describe(self) -> str:
        if not self.engines:
            return f"{self.engine} (chosen at the first batch)"
        return "; ".join(f"{phase}: {e.describe()}" for phase, e in self.engines.items())

    def _loops(self, count: int) -> list[InnerLoop]:
        buffers = dict(self.model.named_buffers())
        step: float | StepSizes = self.fixed_step if self.step_sizes is None else self.step_sizes
        return [
            InnerLoop(
                m,
                buffers,
                self.loss,
                self.adapted,
                step,
                self.per_step_batch_norm,
                self.task_init,
                self.optimizer,
                query_statistics=self.query_statistics,
            )
            for m in self.replicas.get(count)
        ]

    def _plain(self) -> bool:
        """True when only the model is learnt and the loop is plain SGD: the fast first-order
        path (adapt constants, then one query gradient) applies."""
        return (
            not self._extra()
            and self.task_init is None
            and self.per_step_batch_norm is None
            and self.optimizer == "sgd"
        )

    # -- meta-training -------------------------------------------------------------------
    def meta_gradient(
        self,
        batch: EpisodeBatch,
        *,
        steps: int,
        first_order: bool | None = None,
        step_weights: Sequence[float] | None = None,
    ) -> Tensor:
        """Add the meta-gradient of the mean query loss to ``.grad``; return that loss.

        The loss is a detached 0-dim float64 tensor on the model's device, summed over shares
        in a fixed order: reading it (``float(loss)``) is the only host synchronisation, so
        the caller decides when (:func:`fewbench.running.training.train` reads it every
        ``log_every`` iterations on CUDA).

        ``step_weights`` (one per step) makes the objective the weighted sum of the query
        losses after each step (MAML++'s multi-step loss); by default, the loss after the
        last step. ``first_order`` overrides the adapter's setting for this call (MAML++'s
        derivative-order annealing)."""
        if self.optimizer != "sgd":
            raise ValueError("the meta-gradient is defined for an SGD inner loop; use adapt()")
        if step_weights is not None and len(step_weights) != steps:
            raise ValueError(f"step_weights needs {steps} values, one per step")
        first = self.first_order if first_order is None else first_order
        choice = self.engine_for("train", batch)
        theta = dict(self.model.named_parameters())
        extra = self._extra()
        learnt = list(theta.values()) + extra
        tasks = len(batch)
        parts = split(tasks, choice.threads)
        loops = self._loops(len(parts))
        plain_first = first and self._plain() and step_weights is None

        def share(index: int, part: slice) -> tuple[list[Tensor], Tensor]:
            loop = loops[index]
            if choice.engine == "batched":
                with vmap_safe_batch_norm(loop.model):
                    if plain_first:
                        return _batched_first_order(loop, theta, batch, part, steps, tasks, self)
                    return _batched_share(
                        loop, theta, learnt, batch, part, steps, first, step_weights, tasks, self
                    )
            return _loop_share(loop, theta, learnt, batch, part, steps, first, step_weights, tasks)

        total: Tensor | None = None
        for grads, value in in_parallel(share, parts):  # fixed order: thread timing is moot
            for p, g in zip(learnt, grads, strict=True):
                p.grad = g if p.grad is None else p.grad + g
            total = value if total is None else total + value
        return total

    # -- adaptation without a meta-gradient ------------------------------------------------------
    def predict(self, episodes: EpisodeBatch, *, steps: int) -> Tensor:
        """Adapt a copy of the weights to each episode's support set; query outputs ``[T, NQ, out]``."""
        choice = self.engine_for("predict", episodes)
        theta = {name: p.detach() for name, p in self.model.named_parameters()}
        parts = split(len(episodes), choice.threads)
        loops = self._loops(len(parts))

        def share(index: int, part: slice) -> Tensor:
            loop = loops[index]
            with torch.enable_grad():
                if choice.engine == "batched":
                    with vmap_safe_batch_norm(loop.model):
                        return _batched_predict(loop, theta, episodes, part, steps, self)
                return _loop_predict(loop, theta, episodes, part, steps)

        with inductive_batch_norm(self.replicas.get(len(parts))):
            return torch.cat(in_parallel(share, parts))

    def adapt(self, x: Tensor, y: Tensor, *, steps: int, batch_size: int = 0) -> Params:
        """The adapted parameters of each task, ``[T, *shape]`` per name, detached.

        ``x`` and ``y`` are ``[T, M, ...]`` and ``[T, M]``: each task's data. With
        ``batch_size`` each step uses the next ``batch_size`` examples (cycling, in the
        given order: shuffle beforehand), as Reptile's inner loop does; 0 uses all."""
        theta = {name: p.detach() for name, p in self.model.named_parameters()}
        probe = EpisodeBatch(x, y, x[:, :0], y[:, :0], 0)
        choice = self.engine_for("adapt", probe)
        parts = split(x.shape[0], choice.threads)
        loops = self._loops(len(parts))
        examples = x.shape[1]
        size = examples if batch_size <= 0 else min(batch_size, examples)
        windows = [[(step * size + i) % examples for i in range(size)] for step in range(steps)]

        def one_task(loop: InnerLoop, tx: Tensor, ty: Tensor, vmapped: bool) -> Params:
            params, state = dict(theta), {}
            if not vmapped:
                params = {n: p.clone().requires_grad_() for n, p in params.items()}
            for step, window in enumerate(windows):
                bx, by = tx[window], ty[window]
                if vmapped:
                    params = loop.step_vmappable(params, bx, by, step, True, state)
                else:
                    params = loop.step_autograd(params, bx, by, step, False, state)
            return {n: p.detach() for n, p in params.items()}

        def share(index: int, part: slice) -> Params:
            loop = loops[index]
            with torch.enable_grad():
                if choice.engine == "batched":
                    with vmap_safe_batch_norm(loop.model):
                        outs = [
                            vmap(
                                lambda tx, ty: one_task(loop, tx, ty, True),
                                randomness="different",
                            )(x[chunk], y[chunk])
                            for chunk in _chunks(part, self.tasks_per_call)
                        ]
                    return {n: torch.cat([o[n] for o in outs]) for n in theta}
                outs = [one_task(loop, x[t], y[t], False) for t in range(part.start, part.stop)]
                return {n: torch.stack([o[n] for o in outs]) for n in theta}

        results = in_parallel(share, parts)
        return {n: torch.cat([r[n] for r in results]) for n in theta}


# -- the engines' shares ------------------------------------------------------------------------------
def _loop_share(
    loop: InnerLoop,
    theta: Params,
    learnt: list[Tensor],
    batch: EpisodeBatch,
    part: slice,
    steps: int,
    first_order: bool,
    step_weights: Sequence[float] | None,
    tasks: int,
) -> tuple[list[Tensor], Tensor]:
    total_grads: list[Tensor] | None = None
    total = _zero(learnt[0])
    for t in range(part.start, part.stop):
        trajectory = loop.run(
            theta,
            batch.support_x[t],
            batch.support_y[t],
            steps,
            first_order=first_order,
            vmapped=False,
        )
        task_loss = loop.query_objective(
            trajectory, batch.query_x[t], batch.query_y[t], step_weights, batch.support_x[t]
        )
        task_loss = task_loss / tasks
        # First order: the inner gradients are constants, so d theta'/d theta is the identity
        # and this is the query gradient at theta'. One task's graph is alive at a time.
        grads = torch.autograd.grad(task_loss, learnt, allow_unused=True)
        total_grads = _add(total_grads, grads, learnt)
        total = total + task_loss.detach().double()
    return total_grads, total


def _batched_share(
    loop: InnerLoop,
    theta: Params,
    learnt: list[Tensor],
    batch: EpisodeBatch,
    part: slice,
    steps: int,
    first_order: bool,
    step_weights: Sequence[float] | None,
    tasks: int,
    adapter: Adapter,
) -> tuple[list[Tensor], Tensor]:
    def task_objective(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        trajectory = loop.run(p, sx, sy, steps, first_order=first_order, vmapped=True)
        return loop.query_objective(trajectory, qx, qy, step_weights, sx)

    per_task = vmap(task_objective, in_dims=(None, 0, 0, 0, 0), randomness="different")
    total_grads: list[Tensor] | None = None
    total = _zero(learnt[0])
    for chunk in _chunks(part, adapter.tasks_per_call):
        chunk_loss = per_task(theta, *_select(batch, chunk)).sum() / tasks
        # The chunk's graph is freed here, before the next chunk's is built.
        grads = torch.autograd.grad(chunk_loss, learnt, allow_unused=True)
        total_grads = _add(total_grads, grads, learnt)
        total = total + chunk_loss.detach().double()
    return total_grads, total


def _batched_first_order(
    loop: InnerLoop,
    theta: Params,
    batch: EpisodeBatch,
    part: slice,
    steps: int,
    tasks: int,
    adapter: Adapter,
) -> tuple[list[Tensor], Tensor]:
    """First order with only the model learnt: adapt constants, then one query gradient at
    the adapted weights, which is the meta-gradient of every parameter (no outer graph)."""
    constants = {name: p.detach() for name, p in theta.items()}

    def task_query_grad(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        adapted = loop.run(p, sx, sy, steps, first_order=True, vmapped=True)[-1]
        return grad_and_value(lambda fast: loop.query_loss(fast, sx, qx, qy))(adapted)

    per_task = vmap(task_query_grad, in_dims=(None, 0, 0, 0, 0), randomness="different")
    total_grads: list[Tensor] | None = None
    total = _zero(next(iter(theta.values())))
    for chunk in _chunks(part, adapter.tasks_per_call):
        grads, losses = per_task(constants, *_select(batch, chunk))
        total_grads = _add(total_grads, [grads[name].sum(dim=0) / tasks for name in theta])
        total = total + losses.detach().sum().double() / tasks
    return total_grads, total


def _batched_predict(
    loop: InnerLoop,
    theta: Params,
    episodes: EpisodeBatch,
    part: slice,
    steps: int,
    adapter: Adapter,
) -> Tensor:
    def task_outputs(p: Params, sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
        adapted = loop.run(p, sx, sy, steps, first_order=True, vmapped=True)[-1]
        return loop.query_forward(adapted, sx, qx, max(steps - 1, 0))

    per_task = vmap(task_outputs, in_dims=(None, 0, 0, 0), randomness="different")
    outputs = []
    for chunk in _chunks(part, adapter.tasks_per_call):
        sx, sy, qx, _ = _select(episodes, chunk)
        outputs.append(per_task(theta, sx, sy, qx).detach())
    return torch.cat(outputs)


def _loop_predict(
    loop: InnerLoop, theta: Params, episodes: EpisodeBatch, part: slice, steps: int
) -> Tensor:
    outputs = []
    for t in range(part.start, part.stop):
        base = {name: p.clone().requires_grad_() for name, p in theta.items()}
        adapted = loop.run(
            base,
            episodes.support_x[t],
            episodes.support_y[t],
            steps,
            first_order=True,
            vmapped=False,
        )
        with torch.no_grad():
            outputs.append(
                loop.query_forward(
                    adapted[-1], episodes.support_x[t], episodes.query_x[t], max(steps - 1, 0)
                )
            )
    return torch.stack(outputs)


def cosine(start: float, end: float, progress: float) -> float:
    """Cosine annealing from ``start`` to ``end`` as ``progress`` goes from 0 to 1."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2
