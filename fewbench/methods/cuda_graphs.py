"""A whole training iteration as one CUDA graph, checked against the eager step first.

On a GPU, a meta-iteration of MAML on small images launches thousands of small
kernels; launching them costs more than running them. A CUDA graph records the
launches of one iteration once and replays them with one call. What an iteration
reads must then sit at fixed addresses: the episode indices are drawn on the CPU as
always (the iteration's seeded generator, so a GPU run sees the episodes a CPU run
sees), copied through a pinned buffer into a static device buffer, and the graph
gathers the images, runs the learner's step (meta-gradient and optimizer step,
``capturable=True``) and leaves the loss on the device.

A learner offers such a step with :meth:`fewbench.plugin.learner.Learner.graph_step`. The core
replays it only after a self-check: at the first iteration after warm-up it takes
one eager step, restores the state, captures, replays, and compares parameters and
optimizer state to float tolerance. Any disagreement, or a failed capture, restores
the eager result and trains eagerly from there on, with the reason recorded in the
cell's engine description (``graph: off (...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewbench.errors import FewbenchError
from fewbench.plugin.dataset import ClassPool, EpisodeBatch, EpisodeIndices

GRAPH_MODES = ("auto", "on", "off")
# Eager iterations before capture: lazy initialisation (optimizer state, cuBLAS and
# cuDNN workspaces, autograd's caches) must happen outside the graph.
WARMUP_ITERATIONS = 3
# Parameters after one eager and one replayed step from the same state agree to this.
RTOL, ATOL = 1e-4, 1e-6

Replay = Callable[[], Tensor]
Capture = Callable[[Callable[[], Tensor]], Replay]


@dataclass(frozen=True)
class GraphStep:
    """One whole training step a learner lets the core capture.

    ``run(batch)`` zeroes the gradients, adds the meta-gradient, takes the optimizer step
    and returns the loss as a 0-dim tensor, with no host synchronisation and nothing that
    depends on the iteration number. ``required`` (the learner's ``graph: on``) turns a
    failed self-check into an error instead of a fallback."""

    run: Callable[[EpisodeBatch], Tensor]
    required: bool = False
    parameters: Sequence[Tensor] = ()  # what it computes gradients of (compared at the check)


class GraphFailed(FewbenchError):
    """``graph: on`` and the graph could not be used."""


def cuda_capture(work: Callable[[], Tensor]) -> Replay:
    """Record ``work`` as a CUDA graph; the returned call replays it and returns its output."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = work()

    def replay() -> Tensor:
        graph.replay()
        return output

    return replay


def state_tensors(state: Any, path: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor of a (nested) state dict with its path, in a fixed order: the live
    tensors a step updates in place, so copying into them restores a state."""
    if isinstance(state, Tensor):
        return [(path, state)]
    if isinstance(state, dict):
        return [
            item
            for key in sorted(state, key=str)
            for item in state_tensors(state[key], f"{path}/{key}" if path else str(key))
        ]
    if isinstance(state, list | tuple):
        return [item for i, v in enumerate(state) for item in state_tensors(v, f"{path}/{i}")]
    return []


def _restore(live: list[Tensor], saved: list[Tensor]) -> None:
    with torch.no_grad():
        for target, value in zip(live, saved, strict=True):
            target.copy_(value)


def disagreement(
    names: list[str],
    before: list[Tensor],
    eager: list[Tensor],
    graph: list[Tensor],
    eager_grads: list[Tensor | None] = (),
    graph_grads: list[Tensor | None] = (),
) -> str | None:
    """Why a replayed step does not match the eager step from the same state (None if it does).

    Float tolerance, not equality: reductions with atomics make two eager steps differ
    in the last bits, and Adam turns a gradient that is zero in exact arithmetic (a
    convolution's bias before batch norm) into a step of its sign's noise. So gradients
    are compared to a tolerance on the scale of the largest gradient, and each state
    tensor to within twice the largest change the eager step made to it; and a tensor
    the eager step changed must change in the replay (a step the graph did not record)."""
    scale = max((g.abs().max().item() for g in eager_grads if g is not None), default=0.0)
    for index, (e, g) in enumerate(zip(eager_grads, graph_grads, strict=True)):
        if (e is None) != (g is None):
            return f"gradient {index} is missing in one of the two steps"
        if e is not None and not torch.allclose(g, e, rtol=RTOL, atol=1e-4 * scale + ATOL):
            gap = (g - e).abs().max().item()
            return f"gradient {index} {tuple(e.shape)} differs by {gap:.3g} (largest {scale:.3g})"
    for name, old, e, g in zip(names, before, eager, graph, strict=True):
        if e.shape != g.shape:
            return f"{name} has shape {tuple(g.shape)}, not {tuple(e.shape)}"
        e, g, old = e.double(), g.double(), old.double()
        change = (e - old).abs().max().item() if e.numel() else 0.0
        gap = (g - e).abs().max().item() if e.numel() else 0.0
        if not gap <= 2 * change + RTOL * (e.abs().max().item() if e.numel() else 0.0) + ATOL:
            return f"{name} differs by {gap:.3g} (the eager step changed it by {change:.3g})"
        if change > 0 and torch.equal(g, old):
            return f"{name} was not updated by the replay"
    return None


@contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """Eager steps before and around capture run on a side stream, as torch's graph docs
    ask, so that the capture stream starts clean."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


class GraphedTraining:
    """Training iterations of one learner on one split, replayed from a CUDA graph.

    :meth:`step` takes the iteration's drawn indices and returns the loss tensor. The
    first :data:`WARMUP_ITERATIONS` run eagerly from the static buffers; the next one
    is the self-check; after it, every step is one copy and one replay (or eager, if
    the check failed). ``capture`` is :func:`cuda_capture` on a GPU; tests pass a
    stand-in to exercise the self-check on a CPU.
    """

    def __init__(
        self,
        learner: Any,
        step: GraphStep,
        source: ClassPool,
        shots: int,
        device: torch.device,
        capture: Capture = cuda_capture,
    ):
        self.learner, self.graph_step, self.source = learner, step, source
        self.shots, self.device, self.capture = shots, device, capture
        self.static: EpisodeIndices | None = None
        self.pinned: list[EpisodeIndices] = []
        self.copied: list[Any] = []  # per pinned buffer: the event its last copy recorded
        self.replay: Replay | None = None
        self.eager_steps = 0
        self.status = "graph: pending (warm-up)"

    # -- buffers -------------------------------------------------------------------------
    def _load(self, indices: EpisodeIndices) -> None:
        """Copy the drawn indices into the static device buffer (through pinned memory on
        CUDA, alternating two buffers so a copy in flight is never overwritten)."""
        if self.static is None:
            self.static = EpisodeIndices(
                torch.empty_like(indices.classes, device=self.device),
                torch.empty_like(indices.examples, device=self.device),
            )
            if self.device.type == "cuda":
                self.pinned = [
                    EpisodeIndices(
                        torch.empty_like(indices.classes).pin_memory(),
                        torch.empty_like(indices.examples).pin_memory(),
                    )
                    for _ in range(2)
                ]
                self.copied = [None, None]
        if indices.classes.shape != self.static.classes.shape:
            raise ValueError("graphed training needs the same batch shape every iteration")
        if not self.pinned:
            self.static.classes.copy_(indices.classes)
            self.static.examples.copy_(indices.examples)
            return
        slot = self.eager_steps % 2
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()
        host = self.pinned[slot]
        host.classes.copy_(indices.classes)
        host.examples.copy_(indices.examples)
        self.static.classes.copy_(host.classes, non_blocking=True)
        self.static.examples.copy_(host.examples, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.copied[slot] = event

    def _work(self) -> Tensor:
        return self.graph_step.run(self.source.gather(self.static, self.shots))

    def _eager(self) -> Tensor:
        with _side_stream(self.device):
            return self._work()

    # -- the iteration -------------------------------------------------------------------
    def step(self, indices: EpisodeIndices) -> Tensor:
        self._load(indices)
        self.eager_steps += 1
        if self.replay is not None:
            return self.replay().clone()  # the output buffer is overwritten by the next replay
        if self.eager_steps <= WARMUP_ITERATIONS or self.status.startswith("graph: off"):
            return self._eager()
        return self._self_check()

    def _self_check(self) -> Tensor:
        named = state_tensors(self.learner.state_dict())
        names, live = [name for name, _ in named], [t for _, t in named]
        parameters = list(self.graph_step.parameters)
        before = [t.clone() for t in live]
        eager_loss = self._eager()
        eager_after = [t.clone() for t in live]
        eager_grads = [None if p.grad is None else p.grad.clone() for p in parameters]
        _restore(live, before)
        try:
            replay = self.capture(self._work)  # torch.cuda.graph captures on its own stream
            graph_loss = replay().detach().clone()
            problem = disagreement(
                [*names, "loss"],
                [*before, eager_loss],
                [*eager_after, eager_loss],
                [*live, graph_loss],
                eager_grads,
                [None if p.grad is None else p.grad for p in parameters],
            )
        except Exception as exc:  # a failed capture: say why, train on eagerly
            problem = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if problem is None:
            self.replay = replay
            self.status = "graph: on (self-check passed)"
            return graph_loss
        _restore(live, eager_after)
        self.status = f"graph: off (self-check: {problem})"
        if self.graph_step.required:
            raise GraphFailed(f"graph: on, but the {self.status[len('graph: off (') : -1]}")
        return eager_loss
