"""Task types: what a dataset's tasks ask of a model, and how their results read.

A task type fixes the training loss, the per-episode metric and its name, which
direction is better, and how a value is scaled and written. Datasets declare
theirs (:attr:`fewbench.plugin.dataset.Dataset.task_type`); the training loop, the
evaluation, the results store and the reports ask the task type instead of
switching on a name. Reinforcement learning is the third: its metric is the
average return of a policy in each test task after adaptation.

Importing this module does not import torch: reports use it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fewbench.errors import PluginError

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True, eq=False)
class TaskType:
    """One kind of task.

    ``loss(outputs, targets)`` is the training loss over a batch of tasks, and
    ``episode_metric(outputs, targets)`` the metric of each episode (``[T]``), for
    outputs ``[T, M, ...]``. ``predicts_classes`` says whether outputs are class
    scores (a learner's new head has ``ways`` outputs) or values.
    """

    name: str
    metric: str  # stored with each result: "accuracy", "mse"
    metric_title: str  # a table's or axis's title
    higher_is_better: bool
    scale: float  # shown values are value * scale
    unit: str  # right after a shown value: "%" or ""
    noun: str  # what a shown value is, in a log line
    decimals: int  # of a single shown value
    predicts_classes: bool
    loss: Callable[[Tensor, Tensor], Tensor]
    episode_metric: Callable[[Tensor, Tensor], Tensor]
    # More per-episode values stored beside the metric, by name ([T] each), or None.
    episode_extras: Callable[[Tensor], dict[str, Tensor]] | None = None
    # Whether a cell's label and tables show ways and shots (not for environments).
    has_ways: bool = True

    def __eq__(self, other: object) -> bool:
        """Equal to its name too: learners that compared ``ctx.task_type`` with a string
        (the plugin API before task types) keep working."""
        if isinstance(other, str):
            return other == self.name
        return isinstance(other, TaskType) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def better(self, new: float, old: float) -> bool:
        return new > old if self.higher_is_better else new < old

    def format(self, value: float, decimals: int | None = None) -> str:
        """One value as shown: ``96.63%``, ``0.1325``."""
        places = self.decimals if decimals is None else decimals
        return f"{value * self.scale:.{places}f}{self.unit}"

    def describe(self, mean: float, ci95: float) -> str:
        """A mean and its interval in a log line: ``96.63 ± 0.32% accuracy``."""
        return f"{mean * self.scale:.2f} ± {ci95 * self.scale:.2f}{self.unit} {self.noun}"

    @property
    def direction(self) -> str:
        return "highest" if self.higher_is_better else "lowest"


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    from torch.nn import functional

    return functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def _accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs.argmax(dim=-1) == targets).float().mean(dim=-1)


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    from torch.nn import functional

    return functional.mse_loss(outputs, targets)


def _episode_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    return ((outputs - targets) ** 2).reshape(outputs.shape[0], -1).mean(dim=-1)


CLASSIFICATION = TaskType(
    name="classification",
    metric="accuracy",
    metric_title="Accuracy (%)",
    higher_is_better=True,
    scale=100.0,
    unit="%",
    noun="accuracy",
    decimals=2,
    predicts_classes=True,
    loss=_cross_entropy,
    episode_metric=_accuracy,
)
REGRESSION = TaskType(
    name="regression",
    metric="mse",
    metric_title="Mean squared error",
    higher_is_better=False,
    scale=1.0,
    unit="",
    noun="MSE",
    decimals=4,
    predicts_classes=False,
    loss=_mse,
    episode_metric=_episode_mse,
)


def _no_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    raise TypeError(
        "reinforcement-learning tasks have no supervised loss: a learner computes its own "
        "objective from rollouts (fewbench.methods.policy_gradient)"
    )


# Reinforcement learning: a learner's ``predict`` on a batch of tasks returns the average
# return ``[T, S + 1]`` of the policy after 0, 1, ..., S gradient steps in each task (Finn et
# al. 2017, figure 5). The metric is the return after one step, what MAML's meta-objective
# optimises and the comparison the paper draws (a learner that does not adapt, such as
# the oracle, repeats its return); every column is stored as ``return_after_K_steps``.
ADAPTATION_STEP = 1


def _return_after_adaptation(outputs: Tensor, targets: Tensor) -> Tensor:
    return outputs[:, min(ADAPTATION_STEP, outputs.shape[1] - 1)]


def _returns_by_steps(outputs: Tensor) -> dict[str, Tensor]:
    return {f"return_after_{k}_steps": outputs[:, k] for k in range(outputs.shape[1])}


REINFORCEMENT = TaskType(
    name="reinforcement",
    metric="return",
    metric_title="Average return",
    higher_is_better=True,
    scale=1.0,
    unit="",
    noun="return",
    decimals=2,
    predicts_classes=False,
    loss=_no_loss,
    episode_metric=_return_after_adaptation,
    episode_extras=_returns_by_steps,
    has_ways=False,
)
TASK_TYPES = {t.name: t for t in (CLASSIFICATION, REGRESSION, REINFORCEMENT)}
_BY_METRIC = {t.metric: t for t in TASK_TYPES.values()}


def task_type_of(value: TaskType | str) -> TaskType:
    """A dataset's declared task type (a :class:`TaskType`, or its name)."""
    if isinstance(value, TaskType):
        return value
    try:
        return TASK_TYPES[value]
    except KeyError:
        raise PluginError(f"unknown task type {value!r}; known: {', '.join(TASK_TYPES)}") from None


def by_metric(metric: str | None) -> TaskType:
    """The task type whose results are stored under ``metric`` (reports read it back);
    classification for a cell not yet finished."""
    return _BY_METRIC.get(metric or "accuracy", CLASSIFICATION)
