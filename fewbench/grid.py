"""Grid expansion: a validated suite becomes a list of cells, each one training run.

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
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewbench.data import SplitSize
from fewbench.errors import DataError, PluginError
from fewbench.params import check_value, closest
from fewbench.registry import Registered, Registry
from fewbench.suite import (
    EVAL,
    PLUGIN_LISTS,
    REQUIRED,
    TASKS,
    TOP_LEVEL,
    TRAIN,
    SuiteSource,
    check_mapping,
)

WHEN_KEYS = ("dataset", "backbone", "learner", "ways", "shots", "seed")
SET_SECTIONS = {
    "dataset": None,
    "backbone": None,
    "learner": None,
    "tasks": TASKS,
    "train": TRAIN,
    "eval": EVAL,
}


@dataclass(frozen=True)
class Cell:
    """One training run of the grid.

    ``config`` holds everything that determines the result; ``id`` is a hash of
    it, stable across runs and machines, so an unchanged cell keeps its id.
    """

    id: str
    label: str
    config: dict[str, Any]
    labels: dict[str, str]  # dataset, backbone and learner as shown in tables

    @property
    def ways(self) -> int:
        return self.config["tasks"]["ways"]

    @property
    def shots(self) -> int:
        return self.config["tasks"]["shots"]


@dataclass(frozen=True)
class Suite:
    """A validated suite: its settings and its cells."""

    name: str
    data: dict[str, Any]
    cells: list[Cell]
    warnings: list[str]
    # The ``execution:`` section, checked: {"executor": name, **its parameters given}.
    execution: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Entry:
    """One expanded plugin entry of a suite list."""

    plugin: Registered
    params: dict[str, Any]
    given: dict[str, Any]
    label: str = ""

    def config(self) -> dict[str, Any]:
        return {"name": self.plugin.name, **self.params}


# Settings that change how a cell is run but not its results: left out of its id, so
# changing them does not make finished cells run again.
NOT_IN_ID = {
    "train": ("checkpoint_every", "checkpoint_minutes", "keep_checkpoints"),
    "eval": ("chunk",),
}


def cell_id(config: dict[str, Any]) -> str:
    """A stable hash of everything in ``config`` that determines the cell's results."""
    relevant = {
        section: {k: v for k, v in value.items() if k not in NOT_IN_ID[section]}
        if section in NOT_IN_ID and isinstance(value, dict)
        else value
        for section, value in config.items()
    }
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _int_list(source: SuiteSource, path: str, value: Any, minimum: int) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise source.error(path, "expected at least one value")
    for i, item in enumerate(values):
        if isinstance(item, bool) or not isinstance(item, int):
            raise source.error(
                f"{path}[{i}]" if isinstance(value, list) else path,
                f"expected an integer, got {item!r}",
            )
        if item < minimum:
            raise source.error(path, f"must be at least {minimum}, got {item}")
    if len(set(values)) != len(values):
        raise source.error(path, f"repeated values in {values}")
    return values


def _expand_entries(source: SuiteSource, registry: Registry, key: str) -> list[_Entry]:
    kind = PLUGIN_LISTS[key]
    raw = source.data.get(key)
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise source.error(
            key, f"expected a non-empty list of {kind} entries like '- {{name: ...}}'"
        )
    entries: list[_Entry] = []
    for i, item in enumerate(raw):
        path = f"{key}[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise source.error(
                path, f"expected a mapping with a 'name', like {{name: ...}}, got {item!r}"
            )
        try:
            plugin = registry.get(kind, item["name"])
        except PluginError as exc:
            raise source.error(f"{path}.name", str(exc)) from None
        choices: list[list[tuple[str, Any]]] = []
        for param_name, value in item.items():
            if param_name == "name":
                continue
            param_path = f"{path}.{param_name}"
            if param_name not in plugin.params.params:
                known = ", ".join(plugin.params.params) or "none"
                raise source.error(
                    param_path,
                    f"{kind} '{plugin.name}' has no parameter '{param_name}'"
                    f"{closest(str(param_name), list(plugin.params.params))}; "
                    f"its parameters: {known}",
                )
            param = plugin.params.params[param_name]
            expands = isinstance(value, list) and (
                param.value_type is not list or (value and all(isinstance(v, list) for v in value))
            )
            options = value if expands else [value]
            if not options:
                raise source.error(param_path, "an empty list gives no values to run")
            checked = []
            for option in options:
                option, problem = check_value(param, option)
                if problem:
                    raise source.error(param_path, problem)
                checked.append((param_name, option))
            choices.append(checked)
        for combination in itertools.product(*choices):
            given = dict(combination)
            entries.append(_Entry(plugin, {**plugin.params.defaults(), **given}, given))
    _label_entries(entries)
    return entries


def _label_entries(entries: list[_Entry]) -> None:
    """Name each entry by its plugin, plus the parameters that tell same-named entries apart."""
    by_name: dict[str, list[_Entry]] = {}
    for entry in entries:
        by_name.setdefault(entry.plugin.name, []).append(entry)
    for name, group in by_name.items():
        if len(group) == 1:
            group[0].label = name
            continue
        varying = [k for k in group[0].params if len({json.dumps(e.params[k]) for e in group}) > 1]
        for entry in group:
            detail = ",".join(f"{k}={entry.params[k]}" for k in varying)
            entry.label = f"{name}[{detail}]" if detail else name


def _check_overrides(source: SuiteSource) -> list[dict[str, Any]]:
    raw = source.data.get("overrides") or []
    if not isinstance(raw, list):
        raise source.error("overrides", "expected a list of {when: {...}, set: {...}}")
    result = []
    for i, item in enumerate(raw):
        path = f"overrides[{i}]"
        if not isinstance(item, dict):
            raise source.error(path, "expected a mapping {when: {...}, set: {...}}")
        for key in item:
            if key not in ("when", "set"):
                raise source.error(
                    f"{path}.{key}",
                    f"unknown key '{key}'{closest(str(key), ['when', 'set'])}; "
                    "an override has 'when' and 'set'",
                )
        when, assign = item.get("when") or {}, item.get("set")
        if not isinstance(when, dict):
            raise source.error(f"{path}.when", "expected a mapping like {ways: 20}")
        for key in when:
            if key not in WHEN_KEYS:
                raise source.error(
                    f"{path}.when.{key}",
                    f"unknown key '{key}'{closest(str(key), WHEN_KEYS)}; "
                    f"known keys: {', '.join(WHEN_KEYS)}",
                )
        if not isinstance(assign, dict) or not assign:
            raise source.error(
                f"{path}.set", "expected a non-empty mapping like {learner.inner_lr: 0.1}"
            )
        for key in assign:
            section = str(key).split(".")[0]
            if section not in SET_SECTIONS or "." not in str(key):
                raise source.error(
                    f"{path}.set.{key}",
                    f"expected a dotted key starting with one of {', '.join(SET_SECTIONS)}"
                    f"{closest(section, list(SET_SECTIONS))}",
                )
        result.append({"when": when, "set": assign, "path": path})
    return result


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
        else:
            param = SET_SECTIONS[section].get(name)
            if param is None:
                raise source.error(
                    path, f"unknown key '{name}'{closest(name, list(SET_SECTIONS[section]))}"
                )
        checked, problem = check_value(param, value)
        if problem:
            raise source.error(path, problem)
        config[section][name] = copy.deepcopy(checked)


def _check_episodes(
    source: SuiteSource, config: dict[str, Any], sizes: dict[str, SplitSize], label: str
) -> None:
    ways, shots = config["tasks"]["ways"], config["tasks"]["shots"]
    for split, query, path in (
        ("train", config["tasks"]["query"], "tasks.query"),
        ("val", config["eval"]["query"], "eval.query"),
        ("test", config["eval"]["query"], "eval.query"),
    ):
        if split not in sizes or (split == "val" and config["train"]["val_episodes"] == 0):
            continue
        size = sizes[split]
        if ways > size.classes:
            raise source.error(
                "tasks.ways",
                f"cell {label}: {ways}-way episodes need {ways} classes, but the "
                f"'{split}' split of {config['dataset']['name']} has {size.classes}",
            )
        if shots + query > size.examples_per_class:
            raise source.error(
                path,
                f"cell {label}: {shots} shots + {query} query = {shots + query} examples "
                f"per class, but classes of the '{split}' split of "
                f"{config['dataset']['name']} have {size.examples_per_class}",
            )


def expand(
    source: SuiteSource, registry: Registry, data_root: Path | None, *, require_data: bool = True
) -> Suite:
    """Validate ``source`` completely and expand it into cells.

    With ``require_data`` false (``--dry-run``), missing data is a warning instead of
    an error, so a suite can be inspected on a machine that has no data yet.
    """
    data = source.data
    for key in data:
        if key not in TOP_LEVEL:
            raise source.error(
                str(key),
                f"unknown key '{key}'{closest(str(key), list(TOP_LEVEL))}; "
                f"known keys: {', '.join(TOP_LEVEL)}",
            )
    for key in REQUIRED:
        if key not in data:
            raise source.error("", f"missing required section '{key}'")
    name = data["name"]
    if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith("."):
        raise source.error("name", f"expected a folder-safe name like 'omniglot', got {name!r}")
    seeds = _int_list(source, "seeds", data.get("seeds", [0]), minimum=0)
    tasks = check_mapping(source, "tasks", data["tasks"], TASKS)
    ways_list = _int_list(source, "tasks.ways", tasks["ways"], minimum=1)
    shots_list = _int_list(source, "tasks.shots", tasks["shots"], minimum=1)
    train = check_mapping(source, "train", data.get("train"), TRAIN)
    evaluation = check_mapping(source, "eval", data.get("eval"), EVAL)
    entries = {key: _expand_entries(source, registry, key) for key in PLUGIN_LISTS}
    overrides = _check_overrides(source)
    execution = _check_execution(source, registry)

    cells: list[Cell] = []
    warnings: list[str] = []
    seen: dict[str, str] = {}
    split_sizes: dict[str, dict[str, SplitSize] | None] = {}
    for dataset, ways, shots, backbone, learner, seed in itertools.product(
        entries["datasets"], ways_list, shots_list, entries["backbones"], entries["learners"], seeds
    ):
        label = f"{dataset.label}/{ways}w{shots}s/{backbone.label}/{learner.label}/seed{seed}"
        config = {
            "dataset": dataset.config(),
            "backbone": backbone.config(),
            "learner": learner.config(),
            "tasks": {"ways": ways, "shots": shots, "query": tasks["query"]},
            "train": dict(train),
            "eval": dict(evaluation),
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
        for override in overrides:
            if _matches(override["when"], coords):
                _apply_override(source, override, config, plugins, label)
        key = json.dumps(config["dataset"], sort_keys=True)
        if key not in split_sizes:
            instance = dataset.plugin.build(
                **{k: v for k, v in config["dataset"].items() if k != "name"}
            )
            try:
                split_sizes[key] = (
                    instance.split_sizes(data_root) if data_root is not None else None
                )
            except DataError as exc:
                if require_data:
                    raise
                split_sizes[key] = None
                warnings.append(f"data not checked: {exc}")
            if split_sizes[key] is None and data_root is None:
                if require_data:
                    raise DataError("no data root: pass --data-root DIR or set FEWBENCH_DATA")
                warnings.append("data not checked: no data root given")
        if split_sizes[key] is not None:
            _check_episodes(source, config, split_sizes[key], label)
        identifier = cell_id(config)
        if identifier in seen:
            raise source.error(
                "", f"cells {seen[identifier]} and {label} have the same configuration"
            )
        seen[identifier] = label
        labels = {"dataset": dataset.label, "backbone": backbone.label, "learner": learner.label}
        cells.append(Cell(identifier, label, config, labels))
    return Suite(name.strip(), data, cells, sorted(set(warnings)), execution)


def _check_execution(source: SuiteSource, registry: Registry) -> dict[str, Any]:
    """The ``execution:`` section: an executor's name and any of its parameters.

    Only the parameters written are kept (command-line flags and the executor's
    defaults fill the rest); it never enters a cell's configuration, so moving a
    suite from a workstation to a cluster keeps its cell ids and results.
    """
    section = source.data.get("execution")
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise source.error(
            "execution", f"expected a mapping, got {type(section).__name__} {section!r}"
        )
    name = section.get("executor", "local")
    if not isinstance(name, str) or not registry.has("executor", name):
        known = registry.names("executor")
        raise source.error(
            "execution.executor",
            f"unknown executor {name!r}{closest(str(name), known)}; known executors: {', '.join(known)}",
        )
    params = registry.get("executor", name).params.params
    given = {k: v for k, v in section.items() if k != "executor"}
    checked = check_mapping(source, "execution", given, params)
    return {"executor": name, **{key: checked[key] for key in given}}
