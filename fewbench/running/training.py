"""The training loop the core owns for every learner.

It draws the training batches (a seeded stream: batch ``t`` comes from a generator
seeded by the cell seed and ``t``, so a resumed run sees the same batches),
calls the learner's step, records the loss, validates on fixed episodes, keeps the
best state, and writes checkpoints atomically.
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fewbench.data.cache import save_atomically
from fewbench.errors import FewbenchError
from fewbench.methods.augment import augment_batch
from fewbench.methods.cuda_graphs import Capture, GraphedTraining, cuda_capture
from fewbench.plugin.dataset import (
    ClassPool,
    EpisodeBatch,
    EpisodeSource,
    LabelledBatch,
    seeded_generator,
)
from fewbench.plugin.learner import Learner
from fewbench.plugin.task_types import CLASSIFICATION, TaskType
from fewbench.running.evaluation import EpisodeSpec, evaluate
from fewbench.storage.sink import CurvePoint
from fewbench.suite.cell import Cell

PLAIN_PROGRESS_SECONDS = 30.0  # between progress lines when output is not a terminal


MIN_BAR_COLUMNS = 20  # narrower than this, a bar shows nothing: plain lines instead


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _columns(stream: Any) -> int:
    """The terminal's width, 0 when it cannot say: under ``script`` and some CI runners a
    terminal reports 0 columns, where a bar draws nothing at all."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def can_draw_a_bar(stream: Any) -> bool:
    return _is_terminal(stream) and _columns(stream) >= MIN_BAR_COLUMNS


class Diverged(FewbenchError):
    """The training loss became NaN or infinite."""


class TrainingFailed(Exception):
    """Training stopped on an error: ``cause`` at ``iteration``, with the curve so far
    (kept with the failed cell)."""

    def __init__(self, cause: BaseException, iteration: int, curve: list[CurvePoint]):
        super().__init__(str(cause))
        self.cause, self.iteration, self.curve = cause, iteration, list(curve)


@dataclass
class TrainOutcome:
    iterations: int
    best_iteration: int | None
    best_val: float | None
    curve: list[CurvePoint] = field(default_factory=list)
    seconds: float = 0.0
    graph: str | None = (
        None  # whether the steps ran as a CUDA graph, and why (fewbench.methods.cuda_graphs)
    )


class Interrupted(FewbenchError):
    """Training stopped on request after writing a checkpoint."""


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """A checkpoint, or None when it cannot be read (then training starts over).

    Read with ``weights_only=True``: a checkpoint holds only tensors and plain values, so a
    crafted file in a run directory received from someone else cannot run code here."""
    try:
        return torch.load(path, weights_only=True)
    except Exception:
        return None


def rng_state() -> dict[str, Any]:
    """Every random generator's state as tensors and plain values (see :func:`load_checkpoint`)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    learner: Learner,
    sources: dict[str, EpisodeSource],
    cell: Cell,
    *,
    identity: tuple,
    device: torch.device,
    checkpoint_dir: Path | None,
    task_type: TaskType = CLASSIFICATION,
    progress: bool = True,
    on_validate: Callable[[list], None] | None = None,
    on_resume: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
    write_checkpoints: bool = True,
    read_every: int | None = None,
    capture: Capture | None = None,
) -> TrainOutcome:
    """Train ``learner`` on the cell's training split; leave it holding its best state
    (:class:`TrainingLoop` says how)."""
    loop = TrainingLoop(
        learner,
        sources,
        cell,
        identity=identity,
        device=device,
        checkpoint_dir=checkpoint_dir,
        task_type=task_type,
        progress=progress,
        on_validate=on_validate,
        on_resume=on_resume,
        stop=stop,
        write_checkpoints=write_checkpoints,
        read_every=read_every,
        capture=capture,
    )
    return loop.run()


def fresh_loop_state() -> dict[str, Any]:
    """The loop's state as a checkpoint stores it (plain values, so it loads with
    ``weights_only``): the iteration reached, the curve, the losses since its last point,
    the best validation so far with its iteration and state, the seconds trained."""
    return {
        "iteration": 0,
        "curve": [],
        "losses": [],
        "best_val": None,
        "best_iteration": None,
        "best_state": None,
        "seconds": 0.0,
    }


class TrainingLoop:
    """One cell's training loop: iterations, loss read-back, validation, best state,
    checkpoints, progress.

    Resumes from ``checkpoint_dir/last.pt`` when present. Checkpoints hold the
    learner's state (parameters, optimizer), the loop's state (:func:`fresh_loop_state`)
    and every random generator's state, so a resumed run continues exactly as an
    uninterrupted one would (``on_resume`` hears the iteration it resumes from). Setting
    ``stop`` writes a checkpoint after the current iteration and raises
    :class:`Interrupted`. With ``write_checkpoints`` false (the other ranks of a
    data-parallel cell) the checkpoint is read, never written.

    A step may return its loss as a device tensor; the loop reads the losses back every
    ``read_every`` iterations (1 on a CPU, where reading costs nothing; ``log_every`` on a
    GPU) and whenever it records, validates or checkpoints, so a GPU never waits on the
    host in between. The divergence check runs on what it reads. On CUDA, a learner's
    :meth:`~fewbench.plugin.learner.Learner.graph_step` runs as a captured CUDA graph
    (:mod:`fewbench.methods.cuda_graphs`; ``capture`` replaces the CUDA capture in tests).
    """

    def __init__(
        self,
        learner: Learner,
        sources: dict[str, EpisodeSource],
        cell: Cell,
        *,
        identity: tuple,
        device: torch.device,
        checkpoint_dir: Path | None,
        task_type: TaskType = CLASSIFICATION,
        progress: bool = True,
        on_validate: Callable[[list], None] | None = None,
        on_resume: Callable[[int], None] | None = None,
        stop: threading.Event | None = None,
        write_checkpoints: bool = True,
        read_every: int | None = None,
        capture: Capture | None = None,
    ):
        self.learner, self.sources, self.cell = learner, sources, cell
        self.identity, self.device, self.task_type = identity, device, task_type
        self.progress, self.on_validate, self.on_resume = progress, on_validate, on_resume
        self.stop, self.write_checkpoints, self.capture = stop, write_checkpoints, capture
        self.settings = cell.train
        self.total = learner.iterations(self.settings.iterations)
        if self.settings.max_iterations is not None:  # a smoke run's cap wins over everything
            self.total = min(self.total, self.settings.max_iterations)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint = checkpoint_dir / "last.pt" if checkpoint_dir else None
        if read_every is None:
            read_every = 1 if device.type == "cpu" else self.settings.log_every
        self.read_every = read_every
        self.state = fresh_loop_state()
        self.started = time.perf_counter()
        self.pending: list[tuple[int, float | torch.Tensor]] = []  # losses not yet read back
        self.last_loss: float | None = None
        self.last_val: float | None = None

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainOutcome:
        self.resume()
        graphed = _graphed_training(
            self.learner, self.sources, self.cell, self.device, self.capture
        )
        self.last_val = self.state["best_val"]
        last_checkpoint = time.monotonic()
        progress = Progress(self.cell, self.total, self.state["iteration"], self.progress)
        settings = self.settings
        try:
            for iteration in range(self.state["iteration"] + 1, self.total + 1):
                self.pending.append((iteration, self.step(iteration, graphed)))
                record_loss = iteration % settings.log_every == 0 or iteration == self.total
                validating = iteration % settings.validate_every == 0 or iteration == self.total
                due = (
                    iteration % settings.checkpoint_every == 0
                    or iteration == self.total
                    or time.monotonic() - last_checkpoint > 60 * settings.checkpoint_minutes
                )
                if record_loss or validating or due or iteration % self.read_every == 0:
                    self.read_losses()
                val = self.validate_and_keep_best(iteration) if validating else None
                if record_loss or validating:
                    losses = self.state["losses"]
                    self.state["curve"].append((iteration, sum(losses) / len(losses), val))
                    losses.clear()
                if validating and self.on_validate is not None:
                    self.on_validate(self.state["curve"])
                progress.advance(iteration, self.last_loss, self.last_val, self.task_type)
                self.state["iteration"] = iteration
                stopping = self.stop is not None and self.stop.is_set()
                if stopping:
                    self.read_losses()  # a checkpoint holds read values only
                if self.checkpoint is not None and self.write_checkpoints and (due or stopping):
                    self.write_checkpoint()
                    last_checkpoint = time.monotonic()
                if stopping:
                    raise Interrupted(f"interrupted at iteration {iteration} of {self.total}")
        finally:
            progress.close()
        if self.state["best_state"] is not None:
            self.learner.load_state_dict(self.state["best_state"])
        seconds = self.state["seconds"] + time.perf_counter() - self.started
        graph = graphed.status if graphed is not None else None
        return TrainOutcome(
            self.total,
            self.state["best_iteration"],
            self.state["best_val"],
            self.state["curve"],
            seconds,
            graph,
        )

    def step(self, iteration: int, graphed: GraphedTraining | None) -> float | torch.Tensor:
        """One training step on the iteration's seeded batch; its loss, maybe unread."""
        generator = seeded_generator("train", self.cell.seed, iteration)
        try:
            if graphed is not None:
                # The same draw as sample_episodes, gathered inside the graph.
                ways, shots, query = self.cell.tasks.training
                indices = self.sources["train"].draw(
                    self.learner.batch_size(), ways, shots, query, generator
                )
                return graphed.step(indices)
            batch = _training_batch(
                self.learner, self.sources, self.cell, iteration, generator, self.device
            )
            return self.learner.train_step(batch, iteration)
        except Exception as exc:  # say where it happened, and keep the curve
            raise TrainingFailed(exc, iteration, self.state["curve"]) from exc

    # -- losses, validation, checkpoints ------------------------------------------------------
    def read_losses(self) -> None:
        """Read the pending losses back (one synchronisation) and check them."""
        pending = self.pending
        if not pending:
            return
        tensors = [v for _, v in pending if isinstance(v, torch.Tensor)]
        read = iter(torch.stack([t.double() for t in tensors]).tolist() if tensors else [])
        values = [next(read) if isinstance(v, torch.Tensor) else float(v) for _, v in pending]
        iterations = [i for i, _ in pending]
        pending.clear()
        for iteration, loss in zip(iterations, values, strict=True):
            if not math.isfinite(loss):
                curve = self.state["curve"]
                curve.append((iteration, loss if not math.isnan(loss) else None, None))
                error = Diverged(
                    f"training loss became {loss} at iteration {iteration}; "
                    "try a lower learning rate"
                )
                raise TrainingFailed(error, iteration, curve) from error
            self.state["losses"].append(loss)
            self.last_loss = loss

    def validate(self) -> float | None:
        """The mean metric over the cell's fixed validation episodes (None when it has none)."""
        if self.settings.val_episodes == 0:
            return None
        values = evaluate(
            self.learner,
            self.sources["val"],
            EpisodeSpec.of(self.cell, self.identity, "val"),
            episodes=self.settings.val_episodes,
            chunk=self.cell.eval.chunk,
            device=self.device,
            task_type=self.task_type,
        )
        return float(values.mean())

    def validate_and_keep_best(self, iteration: int) -> float | None:
        val = self.validate()
        if val is not None:
            self.last_val = val
            best = self.state["best_val"]
            if best is None or self.task_type.better(val, best):
                self.state["best_val"], self.state["best_iteration"] = val, iteration
                self.state["best_state"] = copy.deepcopy(self.learner.state_dict())
        return val

    def resume(self) -> None:
        """Continue from ``last.pt`` when there is one (a cut write's leftovers removed)."""
        if self.checkpoint_dir is not None and self.checkpoint_dir.is_dir():
            for leftover in self.checkpoint_dir.glob("*.tmp"):  # a write cut short by a crash
                leftover.unlink()
        if self.checkpoint is None or not self.checkpoint.is_file():
            return
        saved = load_checkpoint(self.checkpoint)
        if saved is None:
            return
        self.learner.load_state_dict(saved["learner"])
        self.state = saved["loop"]
        set_rng_state(saved["rng"])
        if self.on_resume is not None:
            self.on_resume(self.state["iteration"])

    def write_checkpoint(self) -> None:
        now = time.perf_counter()
        self.state["seconds"] += now - self.started
        self.started = now
        payload = {"learner": self.learner.state_dict(), "loop": self.state, "rng": rng_state()}
        save_atomically(payload, self.checkpoint, fault_point="checkpoint-write")


class Progress:
    """A cell's progress: a bar in a terminal, a plain line every
    ``PLAIN_PROGRESS_SECONDS`` wherever a bar cannot be drawn (a log file, a cluster job, a
    terminal that reports no width), nothing when off."""

    def __init__(self, cell: Cell, total: int, initial: int, enabled: bool):
        self.cell, self.total = cell, total
        self.plain = enabled and not can_draw_a_bar(sys.stderr)
        self.last_line = time.monotonic()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=cell.label,
            disable=not enabled or self.plain,
            file=sys.stderr,
            mininterval=1.0,
            dynamic_ncols=True,
            leave=False,
        )

    def advance(
        self, iteration: int, loss: float | None, val: float | None, task_type: TaskType
    ) -> None:
        self.bar.update(1)
        shown_loss = "-" if loss is None else f"{loss:.3f}"
        shown_val = "-" if val is None else task_type.format(val)
        self.bar.set_postfix(loss=shown_loss, val=shown_val, refresh=False)
        if self.plain and time.monotonic() - self.last_line >= PLAIN_PROGRESS_SECONDS:
            self.last_line = time.monotonic()
            print(
                f"{self.cell.label}: iteration {iteration}/{self.total}, loss {shown_loss}, "
                f"validation {shown_val}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()


def _training_batch(
    learner: Learner,
    sources: dict[str, EpisodeSource],
    cell: Cell,
    iteration: int,
    generator: torch.Generator,
    device: torch.device,
) -> EpisodeBatch | LabelledBatch:
    ways, shots, query = cell.tasks.training  # the training episodes (tasks.train_*)
    if learner.batch_kind_at(iteration) == "episodes":
        batch = sources["train"].sample_episodes(
            learner.batch_size(), ways, shots, query, generator
        )
    else:
        batch = sources["train"].sample_labelled(learner.batch_size(), generator)
    # The augmentations continue the iteration's generator: a resumed run, or a run on
    # another device, draws the same transformations.
    return augment_batch(batch.to(device), list(cell.train.augment), generator)


def _graphed_training(
    learner: Learner,
    sources: dict[str, EpisodeSource],
    cell: Cell,
    device: torch.device,
    capture: Capture | None,
) -> GraphedTraining | None:
    """The graph runner, when the learner offers a step and the cell allows one: CUDA (or a
    test's stand-in capture), episode batches at every iteration, images on the device in
    a :class:`ClassPool`, and no augmentation (its draws happen on the host)."""
    if capture is None and device.type != "cuda":
        return None
    step = learner.graph_step()
    source = sources["train"]
    if step is None or not isinstance(source, ClassPool) or cell.train.augment:
        return None
    if learner.batch_kind != "episodes" or type(learner).batch_kind_at is not Learner.batch_kind_at:
        return None
    return GraphedTraining(
        learner, step, source, cell.tasks.training[1], device, capture or cuda_capture
    )
