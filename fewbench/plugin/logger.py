"""Experiment trackers as plugins: the logger contract, and how a worker drives loggers.

A run's results live in its ``results.sqlite``; a logger copies what a cell does into a
tracker people already watch (TensorBoard, Weights & Biases, MLflow) as it happens. The
choice of trackers is not part of the protocol: it never enters a cell's configuration, so
adding or dropping one keeps every cell id and every finished result.

Loggers are chosen by name (``fewbench run SUITE --log tensorboard``, a suite's ``log:``
list, ``fewbench.run(..., log=[...])``), reach every worker through
:class:`fewbench.running.worker.WorkerSettings` (this process, local worker processes, Ray and SLURM
tasks alike) and run in the worker's process, beside the cell. For each cell a worker runs,
each chosen logger is built afresh from its parameters and called in this order:

1. :meth:`Logger.start` once the cell is set up, with :class:`LoggedCell` (the run directory,
   the cell's id, label and configuration, its metric);
2. :meth:`Logger.log_point` for each point of the training curve, in order, as training
   records them (at each validation; the loss points in between arrive with it). A resumed
   cell's attempt first sends the curve its checkpoint restored, so each attempt's tracker
   run holds the whole curve;
3. :meth:`Logger.finish` with :class:`FinalMetrics` when the cell's result is stored;
4. :meth:`Logger.close` always, once started, with how the cell ended (``done``, ``failed``
   or ``interrupted``), also when training or evaluation raised.

A tracker is a convenience, the store is the record: a logger that raises is reported in
one warning line and left out for the rest of the cell, whose result is stored as if no
logger had run. A logger whose library is missing must say so in :meth:`Logger.check`,
which the driver calls when it checks the suite, before anything trains.

This module imports no tracker library and no torch (the driver imports it to check a suite).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TextIO

from fewbench.errors import FewbenchError, PluginError, one_line
from fewbench.plugin.base import Plugin
from fewbench.plugin.params import check_value, closest

if TYPE_CHECKING:
    from fewbench.plugin.task_types import TaskType
    from fewbench.registry import Registry
    from fewbench.storage.sink import CellResult
    from fewbench.suite.cell import Cell

__all__ = ["CellLogging", "FinalMetrics", "LoggedCell", "Logger", "choose_loggers"]


@dataclass(frozen=True)
class LoggedCell:
    """What a logger learns about its cell at the start.

    ``config`` is the cell's configuration exactly as stored and hashed into ``id``
    (dataset, backbone, learner with their parameters, tasks, train, eval, seed);
    ``metric`` names the validation and test metric (``accuracy`` as a fraction, ``mse``),
    and ``higher_is_better`` its direction."""

    run_dir: Path
    id: str
    label: str
    config: dict[str, Any]
    metric: str
    metric_title: str
    higher_is_better: bool

    def point(self, loss: float | None, val: float | None) -> dict[str, float]:
        """A curve point as ``{name: value}``, as the built-in loggers name the scalars:
        ``train/loss`` and ``val/<metric>``, each only where measured."""
        values = {"train/loss": loss, f"val/{self.metric}": val}
        return {key: float(value) for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class FinalMetrics:
    """A finished cell's result: the test metric's mean and 95% interval over ``episodes``
    test episodes (the values the store keeps, accuracy as a fraction), the best validation
    value and its iteration, the iterations trained and the seconds spent."""

    metric: str
    mean: float
    ci95: float
    episodes: int
    iterations: int
    best_iteration: int | None
    best_val: float | None
    train_seconds: float
    eval_seconds: float

    @classmethod
    def of(cls, result: CellResult) -> FinalMetrics:
        return cls(
            metric=result.metric,
            mean=result.mean,
            ci95=result.ci95,
            episodes=len(result.values),
            iterations=result.iterations,
            best_iteration=result.best_iteration,
            best_val=result.best_val,
            train_seconds=result.train_seconds,
            eval_seconds=result.eval_seconds,
        )

    def scalars(self) -> dict[str, float]:
        """The numbers as flat ``{name: value}``, named as the built-in loggers name them."""
        values = {
            f"test/{self.metric}": self.mean,
            f"test/{self.metric}_ci95": self.ci95,
            "time/train_seconds": self.train_seconds,
            "time/eval_seconds": self.eval_seconds,
        }
        if self.best_val is not None:
            values[f"val/best_{self.metric}"] = self.best_val
        return values


class Logger(Plugin):
    """Base of logger plugins (``fewbench_register_loggers``): one tracker, for one cell.

    Declare ``name``, ``description`` and ``params`` as other plugins do; the worker builds
    an instance per cell with the parameters (``self.config``, defaults filled) and calls
    the methods below (the module docstring gives the order). Import the tracker's library
    inside the methods, not at module level: the plugin is loaded by every fewbench command,
    most of which never log.
    """

    kind: ClassVar[str] = "logger"

    def check(self) -> None:
        """Raise :class:`~fewbench.errors.FewbenchError` (one line, naming what to install)
        when this logger cannot work here. Called by the driver when it checks the suite,
        before any cell trains, so that a missing library is not found in every worker."""

    def start(self, cell: LoggedCell) -> None:
        """The cell is set up and about to train: open the tracker's run, record the
        configuration."""

    def log_point(self, iteration: int, loss: float | None, val: float | None) -> None:
        """One point of the training curve: the mean training loss since the previous point
        and, at a validation, the validation metric (None where not measured)."""

    def finish(self, metrics: FinalMetrics) -> None:
        """The cell's result was stored."""

    def close(self, outcome: str) -> None:
        """Always called once :meth:`start` was: release the run; ``outcome`` is ``done``,
        ``failed`` or ``interrupted`` (an interrupted cell resumes later, as a new run)."""


def logger_entry(item: Any, registry: Registry) -> dict[str, Any]:
    """A logger choice, ``NAME`` or ``{name: NAME, param: value, ...}``, checked against the
    plugin's parameters: ``{"name": NAME, **parameters}`` with the defaults filled in."""
    if isinstance(item, Mapping) and "name" not in item and len(item) == 1:
        ((name, given),) = item.items()  # the short form {NAME: {param: value}}
        if given is None or isinstance(given, Mapping):
            item = {"name": name, **(given or {})}
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
        raise FewbenchError(
            f"expected a logger's name or {{name: NAME, ...its parameters}}, got {item!r}"
        )
    plugin = registry.get("logger", item["name"])
    params = plugin.params.defaults()
    for key, value in item.items():
        if key == "name":
            continue
        if key not in plugin.params.params:
            known = ", ".join(plugin.params.params) or "none"
            raise FewbenchError(
                f"logger '{plugin.name}' has no parameter '{key}'"
                f"{closest(str(key), list(plugin.params.params))}; its parameters: {known}"
            )
        params[key], problem = check_value(plugin.params.params[key], value)
        if problem:
            raise FewbenchError(f"logger '{plugin.name}', {key}: {problem}")
    return {"name": plugin.name, **params}


def check_logger(entry: Mapping[str, Any], registry: Registry) -> None:
    """Build the logger of a checked entry and ask it whether it can work here; a plugin's
    bug in doing so is one line naming the logger too."""
    params = {k: v for k, v in entry.items() if k != "name"}
    try:
        registry.get("logger", entry["name"]).build(**params).check()
    except FewbenchError:
        raise
    except Exception as exc:
        raise PluginError(
            f"the {entry['name']} logger failed its check: {type(exc).__name__}: {exc}"
        ) from exc


def choose_loggers(
    from_suite: Sequence[Mapping[str, Any]], added: Sequence[Any], registry: Registry
) -> list[dict[str, Any]]:
    """The loggers of a run: the suite's ``log:`` entries (checked with the suite) and those
    added by ``--log NAME`` or ``fewbench.run(log=...)``, each checked here. A name given in
    both keeps the suite's parameters."""
    chosen = [dict(entry) for entry in from_suite]
    for item in added:
        shown = item if isinstance(item, str) else repr(item)
        try:
            entry = logger_entry(item, registry)
            if any(entry["name"] == known["name"] for known in chosen):
                continue
            check_logger(entry, registry)
        except PluginError as exc:
            raise PluginError(f"--log {shown}: {exc}") from None
        except FewbenchError as exc:
            raise FewbenchError(f"--log {shown}: {exc}") from None
        chosen.append(entry)
    return chosen


class CellLogging:
    """The loggers of one cell in a worker, as the worker drives them.

    Every call into a logger is guarded: the first exception a logger raises is reported
    as one warning line on ``log`` and that logger is dropped for the rest of the cell
    (closed, if it had started). The cell itself never sees a logger's error.
    """

    def __init__(
        self,
        entries: Sequence[Mapping[str, Any]],
        registry: Registry,
        cell: Cell,
        run_dir: Path,
        log: TextIO | None = None,
    ):
        self.entries = [dict(e) for e in entries]
        self.registry, self.cell, self.run_dir = registry, cell, Path(run_dir)
        self.log = log
        self.active: list[tuple[str, Logger]] = []
        self.started = False
        self.sent = 0  # curve points sent in this attempt
        self.outcome: str | None = None

    def start(self, task_type: TaskType) -> None:
        """Build every chosen logger and start it on this cell (once it is set up)."""
        if self.started:
            return
        self.started = True
        info = LoggedCell(
            run_dir=self.run_dir,
            id=self.cell.id,
            label=self.cell.label,
            config=self.cell.config,
            metric=task_type.metric,
            metric_title=task_type.metric_title,
            higher_is_better=task_type.higher_is_better,
        )
        for entry in self.entries:
            name = entry["name"]
            try:
                params = {k: v for k, v in entry.items() if k != "name"}
                logger = self.registry.get("logger", name).build(**params)
            except Exception as exc:
                self._warn(name, "set-up", exc)
                continue
            self.active.append((name, logger))
            self._call(name, logger, "start", info)

    def curve(self, curve: Sequence[tuple[int, float | None, float | None]]) -> None:
        """The curve so far (the worker's ``on_validate``): send the points not yet sent."""
        if not self.started:
            return
        new, self.sent = list(curve[self.sent :]), max(self.sent, len(curve))
        for iteration, loss, val in new:
            for name, logger in list(self.active):
                self._call(name, logger, "log_point", int(iteration), loss, val)

    def following(self, save_curve: Callable[[list], None]) -> Callable[[list], None]:
        """``save_curve`` (the sink's), then the loggers: the store hears first."""

        def on_validate(curve: list) -> None:
            save_curve(curve)
            self.curve(curve)

        return on_validate

    def finish(self, result: CellResult) -> None:
        """The stored result: the curve's last points (a resumed cell that had finished
        training sends its curve here), then the final metrics."""
        self.curve(result.curve)
        metrics = FinalMetrics.of(result)
        for name, logger in list(self.active):
            self._call(name, logger, "finish", metrics)

    def close(self, outcome: str) -> None:
        """Close every started logger, once, whatever happened to the cell."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        for name, logger in list(self.active):
            self._call(name, logger, "close", outcome)
        self.active = []

    def _call(self, name: str, logger: Logger, method: str, *arguments: Any) -> None:
        """``logger.method(*arguments)``; on an exception, one warning and the logger is
        dropped (closed as failed, unless closing was what failed)."""
        try:
            getattr(logger, method)(*arguments)
        except Exception as exc:  # a tracker must not cost the cell its result
            self._warn(name, method, exc)
            if (name, logger) in self.active:
                self.active.remove((name, logger))
                if method != "close":
                    with contextlib.suppress(Exception):  # reported once for this logger
                        logger.close("failed")

    def _warn(self, name: str, what: str, exc: BaseException) -> None:
        print(
            one_line(
                f"warning: logger {name} failed in {what} ({self.cell.label}): "
                f"{type(exc).__name__}: {exc}; the cell goes on without it"
            ),
            file=self.log or sys.stderr,
            flush=True,
        )
