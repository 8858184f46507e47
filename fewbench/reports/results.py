"""Stored results of one or more run directories, merged, as reports need them.

Reports read the results store and nothing else: they never rerun anything. A
cell that failed or has not finished is kept (with its status), never dropped.
Runs merge by setting, so a new method run later can be compared with an earlier
baseline run; the same cell (same id) stored in two runs counts once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fewbench.errors import FewbenchError, one_line
from fewbench.plugin.task_types import by_metric
from fewbench.reports.stats import mean_ci95
from fewbench.storage.store import ResultsStore, damage_reported

# What a report can lay out as rows and columns; seeds are always merged.
DIMENSIONS = ("dataset", "ways", "shots", "backbone", "learner")


@dataclass
class RunInfo:
    path: Path
    suite_text: str
    environment: dict[str, Any]


@dataclass(frozen=True)
class Cap:
    """A setting that trained fewer iterations than its settings give: a smoke run
    (``fewbench run --max-iterations``), whose cap each cell keeps in ``train.max_iterations``.
    Reports mark it wherever its numbers appear, so it is never read as the method's result."""

    ran: int  # training iterations each cell ran (the cap)
    planned: int  # what its settings give: the learner's own count, or train.iterations

    def text(self) -> str:
        return f"capped: {self.ran:,} of {self.planned:,} iterations"


@dataclass
class Setting:
    """One entry of a report: a setting with its seeds merged."""

    keys: dict[str, Any]  # the DIMENSIONS
    metric: str  # accuracy | mse
    status: str  # done, or e.g. "1 done, 1 failed"
    values: np.ndarray  # [seeds, episodes] of the done cells; empty when none is done
    episode_key: str  # which fixed episodes: pairing needs the same key
    engine: str
    learner_config: dict[str, Any]
    dataset_config: dict[str, Any]
    cell_ids: list[str] = field(default_factory=list)
    # Further per-episode values by name, [seeds, episodes] each (a reinforcement-learning
    # setting's return after 0, 1, 2, 3 gradient steps); empty for classification.
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    # The whole configuration of the setting's first cell (its seeds differ only in seed):
    # what a published number's protocol is checked against.
    config: dict[str, Any] = field(default_factory=dict)
    # Training iterations its finished cells ran (stored with each result); None when none is.
    iterations: int | None = None
    # Set when a smoke run's cap cut its training short.
    cap: Cap | None = None
    # The protocol card of its first finished cell (fewbench.running.protocol), None when none
    # was stored: how the number was measured (fewbench.reports.protocol renders it).
    protocol: dict[str, Any] | None = None
    # The cost records of its finished cells (fewbench.running.cost), one per seed that has
    # one: what the number cost (fewbench.reports.cost renders them).
    costs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.values.size > 0

    @property
    def per_episode(self) -> np.ndarray:
        """Per-episode values averaged over seeds: what paired tests compare."""
        return self.values.mean(axis=0)

    @property
    def scale(self) -> float:
        return by_metric(self.metric).scale

    def estimate(self) -> tuple[float, float]:
        """Mean and 95% CI half-width, in report units (percent for accuracy)."""
        estimate = mean_ci95(self.values)
        return self.scale * estimate.mean, self.scale * estimate.ci95


@dataclass
class Results:
    runs: list[RunInfo]
    settings: list[Setting]
    curves: dict[str, pd.DataFrame]  # cell id -> iteration, loss, val_metric
    cells: pd.DataFrame  # one row per cell (with seed and status)


def _episode_key(config: dict[str, Any]) -> str:
    """Everything that fixes a cell's test episodes."""
    tasks, evaluation = config.get("tasks", {}), config.get("eval", {})
    return json.dumps(
        {
            "dataset": config.get("dataset"),
            "ways": tasks.get("ways"),
            "shots": tasks.get("shots"),
            "query": evaluation.get("query"),
            "seed": evaluation.get("seed"),
        },
        sort_keys=True,
    )


def load_runs(run_dirs: list[Path]) -> Results:
    """Read every cell, curve and per-episode value of ``run_dirs``."""
    if not run_dirs:
        raise FewbenchError("give at least one run directory")
    runs, rows, values, curves, extras, protocols, costs = [], {}, {}, {}, {}, {}, {}
    for run_dir in run_dirs:
        store = ResultsStore.open_run(run_dir, must_exist=True, readonly=True)
        try:
            with damage_reported(store.path):
                runs.append(RunInfo(Path(run_dir), store.meta("suite") or "", _environment(store)))
                _read_cells(store, Path(run_dir), rows, values, curves, extras, protocols, costs)
        finally:
            store.close()
    cells = _frame(list(rows.values()))
    return Results(runs, _settings(cells, values, extras, protocols, costs), curves, cells)


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The cells as a DataFrame; the run directory stays a Python string (object column):
    a path that is not UTF-8 (its bytes as surrogates) cannot become an Arrow string, which
    pandas uses for text when pyarrow is installed."""
    cells = pd.DataFrame([{k: v for k, v in r.items() if k != "run"} for r in records])
    if records:
        cells["run"] = pd.Series([r["run"] for r in records], dtype=object, index=cells.index)
    return cells


def _read_cells(
    store: ResultsStore,
    run_dir: Path,
    rows: dict[str, dict[str, Any]],
    values: dict[str, np.ndarray],
    curves: dict[str, pd.DataFrame],
    extras: dict[str, dict[str, list[float]]],
    protocols: dict[str, dict[str, Any]] | None = None,
    costs: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Add one run's cells; a cell an earlier run holds (same id) counts once. A cell whose
    stored record cannot be read (settings that are not JSON, a per-episode value or curve
    point that is not a number: an edited or damaged store) is named in a warning on stderr:
    left out when its settings are unreadable, else shown as ``unreadable``, not done."""
    for cell in store.cells():
        if cell["id"] in rows:
            continue
        problem = _unreadable_settings(cell["config"])
        if problem:
            _warn(store, cell, f"{problem}; left out")
            continue
        rows[cell["id"]] = {**dict(cell), "run": str(run_dir)}
        if cell["status"] == "done":
            card = store.protocol(cell["id"])
            if card is not None and protocols is not None:
                protocols[cell["id"]] = card
            cost = store.cost(cell["id"])
            if cost is not None and costs is not None:
                costs[cell["id"]] = cost
            try:
                values[cell["id"]] = _numbers(store.episode_values(cell["id"]))
                extras[cell["id"]] = {
                    name: list(_numbers(v)) for name, v in store.episode_extras(cell["id"]).items()
                }
            except ValueError as exc:
                values.pop(cell["id"], None)
                rows[cell["id"]]["status"] = "unreadable"
                _warn(store, cell, f"per-episode results: {exc}; shown as unreadable")
        curve = [dict(r) for r in store.curve(cell["id"])]
        try:
            for point in curve:
                _numbers([point["iteration"], point["loss"], point["val_metric"]])
        except ValueError as exc:
            _warn(store, cell, f"learning curve: {exc}; curve left out")
            continue
        if curve:
            curves[cell["id"]] = pd.DataFrame(curve)


def _unreadable_settings(text: Any) -> str | None:
    """Why a cell's stored settings cannot be used, or None."""
    try:
        config = json.loads(text)
    except (TypeError, ValueError):
        return "its stored settings are not valid JSON"
    if not isinstance(config, dict) or not all(
        isinstance(config.get(part), dict) for part in ("dataset", "learner")
    ):
        return "its stored settings lack the dataset or the learner"
    return None


def _numbers(values: list[Any]) -> np.ndarray:
    """``values`` as floats (None is a missing value); ValueError naming the first that is
    text or bytes (SQLite keeps whatever was written into a REAL column)."""
    for index, value in enumerate(values):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"value {index} is {value!r:.40}, not a number")
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


def _warn(store: ResultsStore, cell: Any, message: str) -> None:
    label = one_line(str(cell["label"]))
    print(f"fewbench: warning: {store.path}: cell {label}: {message}", file=sys.stderr)


def _environment(store: ResultsStore) -> dict[str, Any]:
    """The stored environment; a damaged record is a note, not a lost report."""
    try:
        environment = json.loads(store.meta("environment") or "{}")
    except ValueError:
        return {"unreadable": "the stored environment is not valid JSON"}
    return environment if isinstance(environment, dict) else {"environment": environment}


def printable_path(path: Path) -> str:
    """``path`` as text that encodes as UTF-8: bytes of a name that is not UTF-8 show as
    ``\\xNN`` instead of failing when the report is written."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _settings(
    cells: pd.DataFrame,
    values: dict[str, np.ndarray],
    extras: dict[str, dict[str, list[float]]] | None = None,
    protocols: dict[str, dict[str, Any]] | None = None,
    costs: dict[str, dict[str, Any]] | None = None,
) -> list[Setting]:
    extras, protocols, costs = extras or {}, protocols or {}, costs or {}
    if cells.empty:
        return []
    settings = []
    for key, group in cells.groupby(list(DIMENSIONS), sort=False):
        done = group[group["status"] == "done"]
        counts = group["status"].value_counts()
        status = (
            "done" if len(done) == len(group) else ", ".join(f"{n} {s}" for s, n in counts.items())
        )
        arrays = [values[cell_id] for cell_id in done["id"]]
        if arrays:
            episodes = min(len(a) for a in arrays)
            matrix = np.stack([a[:episodes] for a in arrays])
        else:
            matrix = np.empty((0, 0))
        names = _common_extras(extras, list(done["id"]))
        extra_matrices = {
            name: np.stack([np.asarray(extras[c][name])[: matrix.shape[1]] for c in done["id"]])
            for name in names
        }
        config = json.loads(group["config"].iloc[0])
        ran = _iterations(done)
        settings.append(
            Setting(
                keys=dict(zip(DIMENSIONS, key, strict=True)),
                metric=done["metric"].iloc[0] if len(done) else "accuracy",
                status=status,
                values=matrix,
                episode_key=_episode_key(config),
                engine=" | ".join(sorted(set(done["engine"].dropna()))),
                learner_config=config["learner"],
                dataset_config=config["dataset"],
                cell_ids=list(group["id"]),
                extras=extra_matrices,
                config=config,
                iterations=ran,
                cap=_cap(config),
                protocol=next((protocols[c] for c in done["id"] if c in protocols), None),
                costs=[costs[c] for c in done["id"] if c in costs],
            )
        )
    return settings


def _iterations(done: pd.DataFrame) -> int | None:
    """The most training iterations a finished cell of the setting ran (as stored)."""
    if "iterations" not in done:
        return None
    counts = [v for v in done["iterations"].tolist() if isinstance(v, int | float) and v == v]
    return int(max(counts)) if counts else None


def _cap(config: dict[str, Any]) -> Cap | None:
    """The cap that cut the setting's training short, or None (no cap, or one at least its
    own count: such a cell trained in full)."""
    train = config.get("train")
    cap = train.get("max_iterations") if isinstance(train, dict) else None
    if isinstance(cap, bool) or not isinstance(cap, int):
        return None
    planned = planned_iterations(config)
    return Cap(cap, planned) if planned is not None and cap < planned else None


def planned_iterations(config: dict[str, Any]) -> int | None:
    """The training steps a cell's settings give before any cap: the learner's own count
    (``Learner.iterations``: finetune's ``iterations``, Meta-Baseline's two stages) or
    ``train.iterations``. The learner plugin is asked (loaded only for a capped cell, whose
    caption must say "30 of 60,000"); where it is not installed, ``train.iterations``."""
    from fewbench.registry import plugin_registry

    suite_iterations = (config.get("train") or {}).get("iterations")
    if isinstance(suite_iterations, bool) or not isinstance(suite_iterations, int):
        return None
    learner = dict(config.get("learner") or {})
    name = learner.pop("name", None)
    registry = plugin_registry()
    if registry is None or not isinstance(name, str) or not registry.has("learner", name):
        return suite_iterations
    try:
        own = registry.get("learner", name).build(**learner).iterations(suite_iterations)
    except (FewbenchError, TypeError, ValueError, KeyError):  # settings it would refuse
        return suite_iterations
    return own if isinstance(own, int) and not isinstance(own, bool) else suite_iterations


def _common_extras(extras: dict[str, dict[str, list[float]]], cell_ids: list[str]) -> list[str]:
    """The names of the further values every one of ``cell_ids`` holds, in name order."""
    if not cell_ids:
        return []
    common = set.intersection(*(set(extras.get(cell_id, {})) for cell_id in cell_ids))
    return sorted(common)
