"""Where a running cell reports: one interface, two places.

A worker runs a cell and tells a :class:`ResultSink` what happens to it: it
started (with the engine the learner chose), it resumed from a checkpoint, its
curve so far, its heartbeat, and how it ended (a :class:`CellResult`, a failure
or an interruption). Locally the sink is the run directory's SQLite store
(:class:`fewbench.storage.store.StoreSink`); a cluster task, which must not open SQLite
over a network file system, reports to its cell's folder
(:class:`fewbench.storage.journal.CellJournal`), which the driver collects. The ranks of a
data-parallel cell other than rank 0 report nowhere (:class:`NullSink`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

CurvePoint = tuple[int, float | None, float | None]  # iteration, mean loss, validation metric


@dataclass(frozen=True)
class CellResult:
    """A finished cell: its per-episode test values and how it got there."""

    metric: str
    values: list[float]
    mean: float
    ci95: float
    curve: list[CurvePoint]
    iterations: int
    best_iteration: int | None
    best_val: float | None
    engine: str
    train_seconds: float
    eval_seconds: float
    # More per-episode values beside ``values``, by name (a reinforcement-learning cell's
    # return after 0, 1, 2, 3 gradient steps); stored per episode so they pair too.
    extras: dict[str, list[float]] = field(default_factory=dict)
    # The cell's protocol card (fewbench.running.protocol): how the number was measured,
    # derived from what ran; None from a worker of before cards.
    protocol: dict[str, Any] | None = None
    # What the number cost (fewbench.running.cost): device and its model, peak memory,
    # parameters, inference time per episode; None from a worker of before cost records.
    cost: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "curve": [list(p) for p in self.curve]}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> CellResult:
        fields = {k: v for k, v in payload.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "curve": [tuple(p) for p in payload["curve"]]})


class ResultSink(ABC):
    """What a worker reports about the one cell it runs."""

    @abstractmethod
    def started(self, engine: str, metric: str | None = None) -> None:
        """The cell is running; ``engine`` is the learner's description of its code path,
        ``metric`` what its validation values measure (status prints them in its unit)."""

    def resumed(self, iteration: int) -> None:  # noqa: B027 - optional: most sinks ignore it
        """Training picked up the cell's checkpoint at ``iteration``."""

    @abstractmethod
    def save_curve(self, curve: list[CurvePoint]) -> None:
        """The training curve so far (written at each validation and on failure)."""

    @abstractmethod
    def complete(self, result: CellResult) -> bool:
        """Commit the finished cell; False (nothing written) when it was already done."""

    @abstractmethod
    def failed(self, reason: str) -> None: ...

    @abstractmethod
    def interrupted(self, reason: str) -> None: ...

    def heartbeat(self, interval: float) -> contextlib.AbstractContextManager[Any]:
        """A context that renews the worker's claim on the cell while it runs."""
        return contextlib.nullcontext()


@dataclass
class NullSink(ResultSink):
    """Reports nowhere: for the ranks of a data-parallel cell other than rank 0."""

    curve: list[CurvePoint] = field(default_factory=list)

    def started(self, engine: str, metric: str | None = None) -> None:
        pass

    def save_curve(self, curve: list[CurvePoint]) -> None:
        self.curve = list(curve)

    def complete(self, result: CellResult) -> bool:
        return False

    def failed(self, reason: str) -> None:
        pass

    def interrupted(self, reason: str) -> None:
        pass
