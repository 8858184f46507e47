"""Grid expansion: a checked suite becomes a list of cells, each one training run.

:func:`expand_grid` is a pure function of a :class:`~fewbench.suite.loading.CheckedSuite`: it
reads no files and loads no data. Whether the data can supply each cell's episodes
is a separate step, :mod:`fewbench.data.check`.

The grid is datasets x tasks.ways x tasks.shots x backbones x learners x seeds.
A list given as the value of a plugin parameter also expands (benchopt style):
``{name: maml, inner_lr: [0.1, 0.4]}`` is two learners. For a parameter whose
value is itself a list (``mlp``'s ``hidden``), a list of lists expands.

``overrides`` adjust settings for some cells, applied in order::

    overrides:
      - when: {ways: 20}                       # keys: dataset, backbone, learner, ways, shots, seed
        set: {learner.inner_lr: 0.1, learner.meta_batch_size: 16}
      - when: {shots: 5}
        set: {tasks.query: 5}

``when`` values may be lists (match any). ``set`` keys are dotted paths into the
cell: ``dataset.*``, ``backbone.*``, ``learner.*`` (plugin parameters),
``tasks.query``, ``train.*`` and ``eval.*``. Setting a plugin parameter that a
matched cell's plugin does not accept is an error: narrow ``when`` instead.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

from fewbench.plugin.params import check_value, closest
from fewbench.plugin.task_types import TaskType, task_type_of
from fewbench.registry import Registered
from fewbench.suite.cell import Cell, cell_id
from fewbench.suite.loading import SET_SECTIONS, CheckedSuite, SuiteSource, set_targets

__all__ = ["Cell", "Suite", "cell_id", "expand_grid"]


@dataclass(frozen=True)
class Suite:
    """An expanded suite: its settings and its cells."""

    name: str
    data: dict[str, Any]
    cells: list[Cell]
    warnings: list[str]
    # The ``execution:`` section, checked: {"executor": name, **its parameters given}.
    execution: dict[str, Any] = field(default_factory=dict)
    source: SuiteSource | None = field(default=None, compare=False, repr=False)
    # The ``log:`` list, checked (fewbench.plugin.logger): trackers, never part of a cell.
    log: list[dict[str, Any]] = field(default_factory=list)


def _task_type(dataset_class: type) -> TaskType:
    """A dataset plugin's declared task type (fewbench.plugin.task_types imports no torch)."""
    return task_type_of(dataset_class.task_type)


def _check_pairing(source: Any, dataset: Any, backbone: Any, learner: Any, label: str) -> None:
    """A learner trains only on the task types and backbones it declares
    (``Learner.task_types``, ``Learner.backbones``): MAML on an environment, or a policy
    learner on images or on a convolutional network, is refused before anything trains."""
    task_type = _task_type(dataset.cls).name
    accepted = getattr(learner.cls, "task_types", ("classification", "regression"))
    if task_type not in accepted:
        raise source.error(
            "learners",
            f"cell {label}: learner '{learner.name}' learns {' or '.join(accepted)} tasks, "
            f"but dataset '{dataset.name}' gives {task_type} tasks",
        )
    backbones = getattr(learner.cls, "backbones", None)
    if backbones is not None and backbone.name not in backbones:
        raise source.error(
            "backbones",
            f"cell {label}: learner '{learner.name}' builds its network from the "
            f"{' or '.join(backbones)} backbone, not '{backbone.name}'",
        )


MAX_UNUSED_SHOWN = 5  # overrides that match no cell, named one by one; the rest counted


def expand_grid(checked: CheckedSuite) -> Suite:
    """The cells of ``checked``: datasets x ways x shots x backbones x learners x seeds,
    with the overrides applied in order. Pure: no files, no data."""
    source = checked.source
    entries = checked.entries
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    matched = [False] * len(checked.overrides)
    from_set = set_targets(source.sets)
    replaced: dict[tuple[str, str, str], list[str]] = {}  # (--set, override, key) -> cells
    for dataset, ways, shots, backbone, learner, seed in itertools.product(
        entries["datasets"],
        checked.ways,
        checked.shots,
        entries["backbones"],
        entries["learners"],
        checked.seeds,
    ):
        # Cross-domain cells say both datasets: trained on one, tested on the other.
        tested_on = (checked.eval.get("dataset") or {}).get("name")
        data_label = f"{dataset.label}->{tested_on}" if tested_on else dataset.label
        # An environment's tasks have no ways or shots (TaskType.has_ways).
        setting = f"{ways}w{shots}s/" if _task_type(dataset.plugin.cls).has_ways else ""
        label = f"{data_label}/{setting}{backbone.label}/{learner.label}/seed{seed}"
        config = {
            "dataset": dataset.config(),
            "backbone": backbone.config(),
            "learner": learner.config(),
            "tasks": {"ways": ways, "shots": shots, "query": checked.query, **checked.train_tasks},
            "train": dict(checked.train),
            "eval": dict(checked.eval),
            "seed": seed,
        }
        coords = {
            "dataset": dataset.label,
            "dataset_name": dataset.plugin.name,
            "backbone": backbone.label,
            "backbone_name": backbone.plugin.name,
            "learner": learner.label,
            "learner_name": learner.plugin.name,
            "ways": ways,
            "shots": shots,
            "seed": seed,
        }
        plugins = {
            "dataset": dataset.plugin,
            "backbone": backbone.plugin,
            "learner": learner.plugin,
        }
        for index, override in enumerate(checked.overrides):
            if _matches(override["when"], coords):
                matched[index] = True
                _apply_override(source, override, config, plugins, label)
                for key in map(str, override["set"]):
                    assignment, plugin = from_set.get(key, (None, None))
                    section = key.partition(".")[0]
                    if assignment is None or (
                        plugin is not None and plugins.get(section) is not None
                        and plugins[section].name != plugin
                    ):  # fmt: skip
                        continue
                    replaced.setdefault((assignment, override["path"], key), []).append(label)
        _check_pairing(source, dataset.plugin, backbone.plugin, learner.plugin, label)
        identifier = cell_id(config)
        if identifier in seen:
            raise source.error(
                "", f"cells {seen[identifier]} and {label} have the same configuration"
            )
        seen[identifier] = label
        labels = {"dataset": data_label, "backbone": backbone.label, "learner": learner.label}
        cells.append(Cell.from_config(config, label, labels, identifier))
    unused = [o for o, used in zip(checked.overrides, matched, strict=True) if not used]
    warnings = [
        f"{source.file}:{source.line_of(override['path']) or '?'}: {override['path']}: its "
        f"'when' matches no cell ({override['when']}); it changes nothing"
        for override in unused[:MAX_UNUSED_SHOWN]
    ]
    if len(unused) > MAX_UNUSED_SHOWN:  # a thousand such overrides once printed 1,000 lines
        warnings.append(
            f"{source.file}: and {len(unused) - MAX_UNUSED_SHOWN:,} more overrides whose 'when' "
            "matches no cell"
        )
    for (assignment, path, key), labels in replaced.items():
        shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
        warnings.append(
            f"--set {assignment}: {source.file}:{source.line_of(path) or '?'}: {path} sets {key} "
            f"again for {shown}, and wins (overrides apply after --set; --max-iterations and "
            "--max-episodes cap after both)"
        )
    return Suite(
        checked.name, source.data, cells, warnings, checked.execution, source, log=checked.log
    )


def _matches(when: dict[str, Any], coords: dict[str, Any]) -> bool:
    for key, wanted in when.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if coords[key] not in options and coords.get(f"{key}_name") not in options:
            return False
    return True


def _apply_override(
    source: SuiteSource,
    override: dict[str, Any],
    config: dict[str, Any],
    plugins: dict[str, Registered],
    label: str,
) -> None:
    for key, value in override["set"].items():
        path = f"{override['path']}.set.{key}"
        section, _, name = str(key).partition(".")
        if SET_SECTIONS[section] is None:
            plugin = plugins[section]
            param = plugin.params.params.get(name)
            if param is None:
                raise source.error(
                    path,
                    f"cell {label}: {section} '{plugin.name}' has no parameter '{name}'"
                    f"{closest(name, list(plugin.params.params))}; narrow 'when' "
                    f"(for example when: {{{section}: ...}})",
                )
        elif (section, name) == ("eval", "dataset"):
            raise source.error(
                path,
                "eval.dataset is set once for the whole suite (eval: {dataset: ...}), not per cell",
            )
        else:
            param = SET_SECTIONS[section].get(name)
            if param is None:
                raise source.error(
                    path, f"unknown key '{name}'{closest(name, list(SET_SECTIONS[section]))}"
                )
        checked, problem = check_value(param, value)
        if (
            not problem
            and section == "tasks"
            and name in ("ways", "shots")
            and not (isinstance(checked, int) and not isinstance(checked, bool) and checked >= 1)
        ):
            problem = f"an override sets one positive integer (lists of {name} are grid axes), got {value!r}"
        if problem:
            raise source.error(path, problem)
        if checked is None and section == "tasks":
            config[section].pop(name, None)  # back to the test episodes' value
        else:
            config[section][name] = copy.deepcopy(checked)
