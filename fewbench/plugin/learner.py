"""The learner contract, the heart of the plugin API.

The core owns the loop: it draws training batches, counts iterations, validates
on fixed episodes, keeps the best state, checkpoints, and evaluates on the fixed
test episodes. A learner supplies only

* what kind of training batch it wants (:attr:`Learner.batch_kind`:
  ``"episodes"`` for a meta-batch of episodes, ``"examples"`` for labelled
  examples from all training classes; a learner with stages may change it per
  iteration, :meth:`Learner.batch_kind_at`) and how many per step (:meth:`batch_size`);
* one training step on such a batch (:meth:`train_step`), returning the loss;
* how it adapts to a batch of episodes and predicts their query sets (:meth:`predict`),
  and how that prediction treats an episode (:meth:`prediction_protocol`: which examples share
  a forward pass with a query, test-time steps), for the cell's protocol card;
* its state, for keeping the best parameters and for checkpoints.

MAML, first-order MAML and pretrain + fine-tune fit this, and so do prototypical
networks, Reptile, ANIL or Meta-SGD (episodes in, query predictions out).

What arrives, and what the core does around the calls:

* **Devices.** Every batch is already on ``ctx.device`` (the cell's device); build
  networks there in :meth:`Learner.setup`.
* **EpisodeBatch** (``T`` episodes of ``N = ways`` classes): ``support_x``
  ``float32[T, N*K, *input_shape]`` and ``query_x`` ``float32[T, N*Q, *input_shape]``
  (images scaled to [0, 1], normalised where the dataset gives statistics);
  classification labels ``support_y`` ``int64[T, N*K]`` and ``query_y`` ``int64[T, N*Q]``,
  0..N-1 in class-major order (``0,0,..,1,1,..``); regression targets are
  ``float32[T, M, outputs]``. Training episodes use ``ctx.train_ways / train_shots /
  train_query``; validation and test episodes ``ctx.ways / shots`` and the suite's
  ``eval.query``.
* **LabelledBatch**: ``x`` ``float32[B, *input_shape]``, ``y`` ``int64[B]`` over all
  ``ctx.num_train_classes`` training classes.
* **TaskBatch** (reinforcement learning, :mod:`fewbench.plugin.environment`; the learner declares
  ``task_types = ("reinforcement",)``): ``tasks`` ``float32[T, task_dim]``, one seed per
  task and the environment, which is also ``ctx.environment``; the learner rolls its
  policies out through it. ``predict`` returns the average return ``[T, S + 1]`` after
  0..S test-time adaptation steps (:data:`fewbench.plugin.task_types.REINFORCEMENT`).
* **Grad and mode.** The core sets neither: :meth:`train_step` and :meth:`predict` run
  with autograd enabled and the modules in whatever mode the learner left them. A
  learner that adapts at test time by gradient (MAML) needs that; one that does not
  should call ``eval()`` / ``torch.no_grad()`` itself in ``predict`` (and ``train()`` in
  ``train_step``). The test metric never sees a learner's gradients.
* **State.** :meth:`state_dict` may return live tensors: the core deep-copies it when it
  keeps the best state and writes checkpoints from it (``torch.save``); it must hold
  everything a resumed run needs, optimizer state included, as tensors and plain values
  (checkpoints are read with ``weights_only=True``). :meth:`load_state_dict` must accept
  what :meth:`state_dict` returned, on a learner that :meth:`setup` has just built.
* **Setup.** The core seeds torch's generator, then calls :meth:`setup` once with the
  :class:`LearnerContext`; an override must call ``super().setup(ctx)`` (it sets
  ``self.ctx``). ``self.config`` holds the learner's parameters, defaults filled in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fewbench.methods.cuda_graphs import GraphStep
from fewbench.plugin.backbone import Backbone
from fewbench.plugin.base import Plugin
from fewbench.plugin.dataset import EpisodeBatch, LabelledBatch
from fewbench.plugin.protocol import PredictionProtocol
from fewbench.plugin.task_types import CLASSIFICATION, TaskType


@dataclass(frozen=True)
class LearnerContext:
    """What the core tells a learner before training."""

    backbone: Backbone
    input_shape: tuple[int, ...]
    ways: int
    shots: int
    query: int
    num_train_classes: int
    device: torch.device
    task_type: TaskType = CLASSIFICATION
    # Training episodes (``tasks.train_ways`` ...); the test episodes' values when unset.
    train_ways: int | None = None
    train_shots: int | None = None
    train_query: int | None = None
    # Reinforcement learning: the cell's environment (fewbench.plugin.environment.Environment),
    # through which the learner rolls its policies out; None for datasets.
    environment: Any = None
    # Every training example once, in a fixed order, in batches of the size asked
    # (EpisodeSource.labelled_in_order): for a statistic over the whole training split, such as
    # SimpleShot's base-class mean. None where the split cannot give them (task generators)
    # and for a learner loaded from a model file, which has no data: keep such a statistic in
    # the learner's state.
    base_examples: Callable[[int], Iterator[LabelledBatch]] | None = None
    # The cell's cache of frozen features (fewbench.data.feature_cache.FeatureCache): for a
    # network that no longer changes, ``feature_cache.episode_features(module,
    # feature_cache.digest(module), episodes)`` looks an episode's features up in a table of the
    # whole split, computed once and kept in the cache folder, or gives None (then embed as
    # usual). None for a learner loaded from a model file.
    feature_cache: Any = None

    def __post_init__(self) -> None:
        for name, value in (
            ("train_ways", self.ways),
            ("train_shots", self.shots),
            ("train_query", self.query),
        ):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The training loss of the task type (over all tasks of the batch)."""
        return self.task_type.loss(outputs, targets)


class Learner(Plugin):
    """Base class of learner plugins; see the module docstring for the contract."""

    kind: ClassVar[str] = "learner"
    batch_kind: ClassVar[str] = "episodes"
    # The task types (fewbench.plugin.task_types names) it can learn; a suite pairing it with a
    # dataset of another type is refused before anything trains.
    task_types: ClassVar[tuple[str, ...]] = ("classification", "regression")
    # The backbones (by name) it can build on; None: any.
    backbones: ClassVar[tuple[str, ...] | None] = None
    # Added to a cell's failure when it ran out of memory: which of its parameters to lower.
    out_of_memory_hint: ClassVar[str] = ""
    # The attributes (modules, optimizers) whose state_dict is the learner's state, saved in
    # checkpoints under these names; a learner with other state overrides state_dict.
    state_attributes: ClassVar[tuple[str, ...]] = ()
    # How reports name it (fewbench.reports.names): its paper's spelling ("MAML", "FO-MAML"),
    # or, where the paper names variants by a parameter, ({parameter: value}, name) pairs tried
    # in order, the first whose values the cell has winning (finetune: Baseline, Baseline++;
    # write the non-default values, a cell may not record a default). Paper tables need those
    # names, not plugin ids. It names only the class that declares it: a subclass registered
    # under another name shows that name unless it declares its own, so it is never taken for
    # its parent's method. Empty: reports show the plugin's name. Write it as a literal: reports
    # read it from the plugin's source, without importing the plugin (and torch).
    display_name: ClassVar[str | tuple[tuple[dict[str, Any], str], ...]] = ""

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.ctx: LearnerContext | None = None

    def setup(self, ctx: LearnerContext) -> None:
        """Build networks and optimizers (the core has seeded torch's global generator)."""
        self.ctx = ctx

    def batch_kind_at(self, iteration: int) -> str:
        """The kind of training batch for ``iteration`` (from 1); :attr:`batch_kind` by default.

        A learner with stages (pretraining on examples, then episodes) overrides it. The
        core asks once per iteration, right before :meth:`batch_size`, so such a learner's
        ``batch_size`` may answer for the kind it last returned."""
        return self.batch_kind

    def batch_size(self) -> int:
        """Episodes per meta-batch (``episodes``) or examples per batch (``examples``)."""
        self.not_implemented("batch_size")

    def iterations(self, suite_iterations: int) -> int:
        """How many training steps to run; the suite's ``train.iterations`` by default."""
        return suite_iterations

    def train_step(self, batch: EpisodeBatch | LabelledBatch, iteration: int) -> float | Tensor:
        """One training step; returns its loss.

        A 0-dim tensor is read by the core only when it records the curve (every
        ``train.log_every`` iterations on a GPU), so a step that keeps its loss on the
        device never waits for the GPU; a float is taken as is."""
        self.not_implemented("train_step")

    def graph_step(self) -> GraphStep | None:
        """A whole training step on a batch of episodes that the core may capture as one
        CUDA graph and replay (:mod:`fewbench.methods.cuda_graphs`), or None (the default: eager steps).

        Offer one only when the step is the same computation at every iteration (no
        schedules read from ``iteration``), reads nothing back to the host, and updates
        its state in place (an optimizer built with ``capturable=True``). The core checks
        the captured step against an eager one before it relies on it."""
        return None

    def predict(self, episodes: EpisodeBatch) -> Tensor:
        """Adapt to each episode's support set; return query outputs ``[T, N*Q, ways]``."""
        self.not_implemented("predict")

    def state_dict(self) -> dict[str, Any]:
        """The state of :attr:`state_attributes` (tensors and plain values only: checkpoints
        are read with ``weights_only=True``)."""
        if not self.state_attributes:
            self.not_implemented("state_dict", "declare state_attributes")
        return {name: getattr(self, name).state_dict() for name in self.state_attributes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.state_attributes:
            self.not_implemented("load_state_dict", "declare state_attributes")
        for name in self.state_attributes:
            getattr(self, name).load_state_dict(state[name])

    def describe_engine(self) -> str:
        """A short word recorded with results so a number can be traced to its code path."""
        return "default"

    def prediction_protocol(self) -> PredictionProtocol:
        """How :meth:`predict` treats a test episode (:mod:`fewbench.plugin.protocol`): which
        examples share a forward pass with a query, what adapts to the support set and in how
        many steps. The cell's protocol card is derived from it and from the networks built.

        Answer from ``self.config`` alone: the core asks after :meth:`setup` when a cell
        finishes, and without setup to describe a stored cell. The default declares nothing,
        and a cell whose networks normalise with batch statistics is then counted
        transductive, the safe side."""
        return PredictionProtocol()


def supervised_step(
    optimizer: torch.optim.Optimizer,
    compute_loss: Callable[[], Tensor],
    before_step: Callable[[], None] | None = None,
) -> float:
    """One plain gradient step, the training step of every learner that is not a bilevel
    method: clear the gradients, compute the loss, back-propagate, (``before_step``: clip the
    gradients, say) step, and give the loss as a float for the training curve."""
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss()
    loss.backward()
    if before_step is not None:
        before_step()
    optimizer.step()
    return loss.item()
