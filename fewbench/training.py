"""The training loop the core owns for every learner.

It draws the training batches (a seeded stream: batch ``t`` comes from a generator
seeded by the cell seed and ``t``, so a resumed run sees the same batches),
calls the learner's step, records the loss, validates on fixed episodes, keeps the
best state, and writes checkpoints atomically.
"""

from __future__ import annotations

import copy
import math
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

from fewbench.augment import augment_batch
from fewbench.cache import save_atomically
from fewbench.cell import Cell
from fewbench.data import ClassPool, EpisodeBatch, EpisodeSource, LabelledBatch, seeded_generator
from fewbench.errors import FewbenchError
from fewbench.evaluation import EpisodeSpec, evaluate
from fewbench.graphs import Capture, GraphedTraining, cuda_capture
from fewbench.learner import Learner
from fewbench.sink import CurvePoint
from fewbench.task_types import CLASSIFICATION, TaskType

PLAIN_PROGRESS_SECONDS = 30.0  # between progress lines when output is not a terminal


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


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
    graph: str | None = None  # whether the steps ran as a CUDA graph, and why (fewbench.graphs)


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
    """Train ``learner`` on the cell's training split; leave it holding its best state.

    Resumes from ``checkpoint_dir/last.pt`` when present. Checkpoints hold the
    learner's state (parameters, optimizer), the loop's state (iteration, curve,
    best state) and every random generator's state, so a resumed run continues
    exactly as an uninterrupted one would (``on_resume`` hears the iteration it
    resumes from). Setting ``stop`` writes a checkpoint after the current iteration
    and raises :class:`Interrupted`. With ``write_checkpoints`` false (the other ranks
    of a data-parallel cell) the checkpoint is read, never written.

    A step may return its loss as a device tensor; the loop reads the losses back every
    ``read_every`` iterations (1 on a CPU, where reading costs nothing; ``log_every`` on a
    GPU) and whenever it records, validates or checkpoints, so a GPU never waits on the
    host in between. The divergence check runs on what it reads. On CUDA, a learner's
    :meth:`~fewbench.learner.Learner.graph_step` runs as a captured CUDA graph
    (:mod:`fewbench.graphs`; ``capture`` replaces the CUDA capture in tests).
    """
    settings = cell.train
    total = learner.iterations(settings.iterations)
    if settings.max_iterations is not None:  # a smoke run's cap wins over everything
        total = min(total, settings.max_iterations)
    ways, shots, query = cell.tasks.training  # the training episodes (tasks.train_*)
    started = time.perf_counter()
    checkpoint = checkpoint_dir / "last.pt" if checkpoint_dir else None

    state = {
        "iteration": 0,
        "curve": [],
        "losses": [],  # losses since the last recorded curve point
        "best_val": None,
        "best_iteration": None,
        "best_state": None,
        "seconds": 0.0,
    }
    if checkpoint_dir is not None and checkpoint_dir.is_dir():
        for leftover in checkpoint_dir.glob("*.tmp"):  # a write cut short by a crash
            leftover.unlink()
    if checkpoint is not None and checkpoint.is_file():
        saved = load_checkpoint(checkpoint)
        if saved is not None:
            learner.load_state_dict(saved["learner"])
            state = saved["loop"]
            set_rng_state(saved["rng"])
            if on_resume is not None:
                on_resume(state["iteration"])

    def write_checkpoint() -> None:
        nonlocal started
        state["seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        payload = {"learner": learner.state_dict(), "loop": state, "rng": rng_state()}
        save_atomically(payload, checkpoint, fault_point="checkpoint-write")

    def validate() -> float | None:
        if settings.val_episodes == 0:
            return None
        values = evaluate(
            learner,
            sources["val"],
            EpisodeSpec.of(cell, identity, "val"),
            episodes=settings.val_episodes,
            chunk=cell.eval.chunk,
            device=device,
            task_type=task_type,
        )
        return float(values.mean())

    losses: list[float] = state["losses"]
    pending: list[tuple[int, float | torch.Tensor]] = []  # losses not yet read back
    if read_every is None:
        read_every = 1 if device.type == "cpu" else settings.log_every
    graphed = _graphed_training(learner, sources, cell, device, capture)
    last_val = state["best_val"]
    last_loss: float | None = None

    def read_losses() -> None:
        """Read the pending losses back (one synchronisation) and check them."""
        nonlocal last_loss
        if not pending:
            return
        tensors = [v for _, v in pending if isinstance(v, torch.Tensor)]
        read = iter(torch.stack([t.double() for t in tensors]).tolist() if tensors else [])
        values = [next(read) if isinstance(v, torch.Tensor) else float(v) for _, v in pending]
        iterations = [i for i, _ in pending]
        pending.clear()
        for iteration, loss in zip(iterations, values, strict=True):
            if not math.isfinite(loss):
                state["curve"].append((iteration, loss if not math.isnan(loss) else None, None))
                error = Diverged(
                    f"training loss became {loss} at iteration {iteration}; "
                    "try a lower learning rate"
                )
                raise TrainingFailed(error, iteration, state["curve"]) from error
            losses.append(loss)
            last_loss = loss

    last_checkpoint = time.monotonic()
    # Not a terminal (a log file, a cluster job): plain lines now and then, not bar redraws.
    plain = progress and not _is_terminal(sys.stderr)
    last_line = time.monotonic()
    bar = tqdm(
        total=total,
        initial=state["iteration"],
        desc=cell.label,
        disable=not progress or plain,
        file=sys.stderr,
        mininterval=1.0,
        dynamic_ncols=True,
        leave=False,
    )
    try:
        for iteration in range(state["iteration"] + 1, total + 1):
            generator = seeded_generator("train", cell.seed, iteration)
            try:
                if graphed is not None:
                    # The same draw as sample_episodes, gathered inside the graph.
                    indices = sources["train"].draw(
                        learner.batch_size(), ways, shots, query, generator
                    )
                    loss = graphed.step(indices)
                else:
                    loss = learner.train_step(
                        _training_batch(learner, sources, cell, iteration, generator, device),
                        iteration,
                    )
            except Exception as exc:  # say where it happened, and keep the curve
                raise TrainingFailed(exc, iteration, state["curve"]) from exc
            pending.append((iteration, loss))
            record_loss = iteration % settings.log_every == 0 or iteration == total
            validating = iteration % settings.validate_every == 0 or iteration == total
            due = (
                iteration % settings.checkpoint_every == 0
                or iteration == total
                or time.monotonic() - last_checkpoint > 60 * settings.checkpoint_minutes
            )
            if record_loss or validating or due or iteration % read_every == 0:
                read_losses()
            val = None
            if validating:
                val = validate()
                if val is not None:
                    last_val = val
                    if state["best_val"] is None or task_type.better(val, state["best_val"]):
                        state["best_val"], state["best_iteration"] = val, iteration
                        state["best_state"] = copy.deepcopy(learner.state_dict())
            if record_loss or validating:
                state["curve"].append((iteration, sum(losses) / len(losses), val))
                losses.clear()
            if validating and on_validate is not None:
                on_validate(state["curve"])
            bar.update(1)
            shown_loss = "-" if last_loss is None else f"{last_loss:.3f}"
            shown_val = "-" if last_val is None else task_type.format(last_val)
            bar.set_postfix(loss=shown_loss, val=shown_val, refresh=False)
            if plain and time.monotonic() - last_line >= PLAIN_PROGRESS_SECONDS:
                last_line = time.monotonic()
                print(
                    f"{cell.label}: iteration {iteration}/{total}, loss {shown_loss}, "
                    f"validation {shown_val}",
                    file=sys.stderr,
                    flush=True,
                )
            state["iteration"] = iteration
            stopping = stop is not None and stop.is_set()
            if stopping:
                read_losses()  # a checkpoint holds read values only
            if checkpoint is not None and write_checkpoints and (due or stopping):
                write_checkpoint()
                last_checkpoint = time.monotonic()
            if stopping:
                raise Interrupted(f"interrupted at iteration {iteration} of {total}")
    finally:
        bar.close()
    if state["best_state"] is not None:
        learner.load_state_dict(state["best_state"])
    seconds = state["seconds"] + time.perf_counter() - started
    graph = graphed.status if graphed is not None else None
    return TrainOutcome(
        total, state["best_iteration"], state["best_val"], state["curve"], seconds, graph
    )


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
