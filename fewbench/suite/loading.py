"""Suite files: YAML parsing with line numbers, ``--set`` overrides and schema checks.

A suite is validated completely before anything trains. Every error names the
file, the key path (``learners[1].inner_lr``) and, where YAML gives it, the line.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from fewbench.errors import FewbenchError, PluginError, SuiteError
from fewbench.plugin.params import Param, check_value, closest
from fewbench.registry import Registered, Registry
from fewbench.suite.cell import EvalSettings, Tasks, TrainSettings, schema
from fewbench.suite.reproduces import Reproduces, parse_reproduces
from fewbench.suite.search import SearchSpace, parse_search

# The public suite format: the names below are part of the interface.
TOP_LEVEL = {
    "name": Param("", type=str, help="suite name; results go to results/<name>/"),
    "description": Param("", type=str, help="free text"),
    "seeds": Param([0], help="training seeds"),
    "datasets": Param([], help="dataset entries: {name: ..., params...}"),
    "tasks": Param({}, help="ways, shots, query"),
    "backbones": Param([], help="backbone entries"),
    "learners": Param([], help="learner entries"),
    "train": Param({}, help="training loop settings"),
    "eval": Param({}, help="test evaluation settings"),
    "overrides": Param([], help="[{when: {...}, set: {...}}] applied in order"),
    "execution": Param(
        {}, help="how cells run: {executor: NAME, ...that executor's parameters}; not part of cells"
    ),
    "search": Param(
        {},
        help="fewbench tune's search space: {dotted.path: {loguniform|uniform|int|choice: ...}}; "
        "fewbench run does not use it",
    ),
    "log": Param(
        [],
        help="experiment trackers: logger names or {name: NAME, ...its parameters}; not part of cells",
    ),
    "reproduces": Param(
        {},
        help="the published protocol a reproduction suite follows: {paper, tables, protocol, "
        "split, backbone, training, batch_norm, test_time, deviations}; not part of cells",
    ),
    "names": Param(
        {},
        help="how reports name the learners: {learner: name}, e.g. {maml: MAML (ours)}; a "
        "learner's plugin name or label; not part of cells",
    ),
}
REQUIRED = ("name", "datasets", "tasks", "backbones", "learners")
TASKS = schema(Tasks)
TRAIN = schema(TrainSettings)
EVAL = schema(EvalSettings)
SECTIONS = {"tasks": TASKS, "train": TRAIN, "eval": EVAL}
PLUGIN_LISTS = {"datasets": "dataset", "backbones": "backbone", "learners": "learner"}

WHEN_KEYS = ("dataset", "backbone", "learner", "ways", "shots", "seed")
SET_SECTIONS = {
    "dataset": None,
    "backbone": None,
    "learner": None,
    "tasks": TASKS,
    "train": TRAIN,
    "eval": EVAL,
}


@dataclass
class SuiteSource:
    """The raw suite mapping plus where each key path came from."""

    data: dict[str, Any]
    file: str
    lines: dict[str, int] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)

    def error(self, path: str, message: str) -> SuiteError:
        return SuiteError(message, file=self.file, path=path, line=self.line_of(path))

    def line_of(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            shorter = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", path)
            if shorter == path:  # a bare name not in the file (a --set key, say)
                return None
            path = shorter
        return None


# Bounds on the work a suite file may ask for: aliases can make a few hundred bytes stand
# for billions of nodes ("billion laughs"), and an alias may refer to its own ancestor.
MAX_NODES = 100_000  # visited, aliases expanded
MAX_DEPTH = 50
_STR_TAG = "tag:yaml.org,2002:str"


def _record_lines(root: yaml.Node, file: str) -> dict[str, int]:
    """The line of every key path, walking the node graph within :data:`MAX_NODES` and
    :data:`MAX_DEPTH`; refuses keys that YAML does not read as strings and repeated keys."""
    lines: dict[str, int] = {}
    stack: list[tuple[yaml.Node, str, int]] = [(root, "", 0)]
    visited = 0
    while stack:
        node, path, depth = stack.pop()
        visited += 1
        line = node.start_mark.line + 1
        if visited > MAX_NODES:
            raise SuiteError(
                f"the suite expands to more than {MAX_NODES:,} values (through aliases?); refused",
                file=file,
                line=line,
            )
        if depth > MAX_DEPTH:
            raise SuiteError(
                f"nested more than {MAX_DEPTH} levels deep (a recursive alias?); refused",
                file=file,
                line=line,
            )
        lines.setdefault(path, line)
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                key_line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
                    shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                    raise SuiteError(
                        f"key {shown!r} is not read as text by YAML ({key_node.tag.rsplit(':', 1)[-1]}); "
                        "quote it",
                        file=file,
                        line=key_line,
                    )
                if key_node.value in seen and key_node.value != "<<":
                    raise SuiteError(
                        f"key {key_node.value!r} appears twice in one mapping "
                        f"(lines {seen[key_node.value]} and {key_line})",
                        file=file,
                        line=key_line,
                    )
                seen[key_node.value] = key_line
                child = f"{path}.{key_node.value}" if path else key_node.value
                lines[child] = key_line
                stack.append((value_node, child, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                stack.append((item, f"{path}[{i}]", depth + 1))
    return lines


def _check_nesting(text: str, file: str) -> None:
    """Refuse collections nested deeper than :data:`MAX_DEPTH`, reading events (no recursion)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise SuiteError(
                    f"nested more than {MAX_DEPTH} levels deep; refused",
                    file=file,
                    line=event.start_mark.line + 1,
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _load_bounded(text: str, file: str) -> tuple[Any, dict[str, int]]:
    """YAML text as Python values and the line of every key path, with bounded work."""
    loader = None
    lines: dict[str, int] = {}
    try:
        _check_nesting(text, file)  # before the composer, which recurses
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            data = None
        else:
            lines = _record_lines(node, file)  # bounded, before anything is built
            data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).split("\n")[0]
        raise SuiteError(
            f"invalid YAML: {problem}", file=file, line=mark.line + 1 if mark else None
        ) from None
    except RecursionError:
        raise SuiteError("invalid YAML: nested too deeply", file=file) from None
    except ValueError as exc:  # an integer of thousands of digits, and the like
        raise SuiteError(f"invalid value: {exc}", file=file) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def parse_yaml(text: str, file: str) -> SuiteSource:
    """Parse a suite's YAML text, keeping the line of every key path."""
    data, lines = _load_bounded(text, file)
    if not isinstance(data, dict):
        raise SuiteError(
            "a suite must be a YAML mapping of sections (name, datasets, tasks, ...)", file=file
        )
    return SuiteSource(data, file, lines)


def load_suite_file(path: str | Path, sets: list[str] | None = None) -> SuiteSource:
    """Read a suite file and apply ``--set KEY=VALUE`` overrides to it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SuiteError("suite file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"cannot read the suite: {exc}", file=str(path)) from None
    source = parse_yaml(text, str(path))
    for assignment in sets or []:
        apply_set(source, assignment)
    return source


_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def split_key_path(key: str) -> list[str | int]:
    """``learners[0].inner_lr`` or ``learners.0.inner_lr`` -> ``['learners', 0, 'inner_lr']``."""
    parts: list[str | int] = []
    for name, index in _SEGMENT.findall(key):
        if index:
            parts.append(int(index))
        elif name.isdigit():
            parts.append(int(name))
        else:
            parts.append(name)
    return parts


def set_targets(sets: list[str]) -> dict[str, tuple[str, str | None]]:
    """The cell keys that ``--set`` assignments set, as an override names them
    (``train.iterations``, ``learner.inner_lr``), each with its assignment and, for a plugin
    parameter set by entry name (``learners.maml.inner_lr``), that plugin's name."""
    targets: dict[str, tuple[str, str | None]] = {}
    for assignment in sets:
        key = assignment.partition("=")[0].strip()
        parts = split_key_path(key)
        if len(parts) == 2 and parts[0] in ("tasks", "train", "eval"):
            targets[f"{parts[0]}.{parts[1]}"] = (assignment, None)
        elif len(parts) == 3 and parts[0] in PLUGIN_LISTS and isinstance(parts[1], str):
            targets[f"{PLUGIN_LISTS[parts[0]]}.{parts[2]}"] = (assignment, parts[1])
    return targets


def apply_set(source: SuiteSource, assignment: str) -> None:
    """Apply one ``--set`` (a dotted key path and a YAML value) to the raw suite.

    Inside a list of plugin entries a segment may be an index or a plugin name,
    which sets the key on every entry of that name: ``learners.maml.inner_lr=0.1``.
    """
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise SuiteError(f"--set expects KEY=VALUE, got {assignment!r}", file="--set")
    try:
        value, _ = _load_bounded(text, "--set")
    except SuiteError as exc:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise SuiteError(
            f"--set {key}: the value {shown!r} is not a valid YAML value ({exc.reason})",
            file="--set",
        ) from None
    parts = split_key_path(key.strip())
    if not parts:
        raise SuiteError(
            f"--set expects KEY=VALUE with a dotted key, got {assignment!r}", file="--set"
        )
    # An override's `set:` maps flat dotted keys (`train.iterations: 300`), so the rest of
    # the path after `overrides[i].set` is one key, not more levels.
    if len(parts) > 4 and parts[0] == "overrides" and parts[2] == "set":
        parts = [*parts[:3], ".".join(str(p) for p in parts[3:])]
    targets: list[Any] = [source.data]
    for depth, part in enumerate(parts[:-1]):
        next_targets = []
        for target in targets:
            if isinstance(target, list) and isinstance(part, str):
                for i, entry in enumerate(target):  # `- maml` is short for `- {name: maml}`
                    if entry == part:
                        target[i] = {"name": part}
                matches = [e for e in target if isinstance(e, dict) and e.get("name") == part]
                if not matches:
                    names = [e.get("name") for e in target if isinstance(e, dict)]
                    raise SuiteError(
                        f"no entry named '{part}'{closest(part, names)}", file="--set", path=key
                    )
                next_targets += matches
            elif isinstance(target, list):
                if part >= len(target):
                    raise SuiteError(
                        f"index {part} is past the end of a list of {len(target)}",
                        file="--set",
                        path=key,
                    )
                next_targets.append(target[part])
            elif isinstance(target, dict):
                next_targets.append(target.setdefault(part, {}))
            else:
                prefix = ".".join(str(p) for p in parts[: depth + 1])
                raise SuiteError(f"'{prefix}' is not a mapping or a list", file="--set", path=key)
        targets = next_targets
    last = parts[-1]
    for target in targets:
        if (
            isinstance(target, dict)
            or isinstance(target, list)
            and isinstance(last, int)
            and last < len(target)
        ):
            target[last] = copy.deepcopy(value)
        else:
            raise SuiteError("cannot set this key here", file="--set", path=key)
    source.sets.append(assignment)


def check_mapping(
    source: SuiteSource, path: str, value: Any, schema: dict[str, Param]
) -> dict[str, Any]:
    """Check a mapping against a schema of :class:`Param`; return it with defaults filled."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise source.error(path, f"expected a mapping, got {type(value).__name__} {value!r}")
    result = {}
    for key, item in value.items():
        child = f"{path}.{key}" if path else str(key)
        if key not in schema:
            raise source.error(
                child,
                f"unknown key '{key}'{closest(str(key), list(schema))}; "
                f"known keys: {', '.join(schema)}",
            )
        checked, problem = check_value(schema[key], item)
        if problem:
            raise source.error(child, problem)
        result[key] = checked
    for key, param in schema.items():
        result.setdefault(key, copy.deepcopy(param.default))
    return result


@dataclass
class PluginEntry:
    """One plugin entry of a suite list, after a list-valued parameter expanded it."""

    plugin: Registered
    params: dict[str, Any]
    given: dict[str, Any]
    label: str = ""

    def config(self) -> dict[str, Any]:
        return {"name": self.plugin.name, **self.params}


@dataclass(frozen=True)
class CheckedSuite:
    """A suite that passed every structural check: its axes, settings and plugin
    entries, ready to expand (:func:`fewbench.suite.grid.expand_grid`)."""

    source: SuiteSource
    name: str
    seeds: list[int]
    ways: list[int]
    shots: list[int]
    query: int
    train_tasks: dict[str, int]  # train_ways, train_shots, train_query where given
    train: dict[str, Any]
    eval: dict[str, Any]
    entries: dict[str, list[PluginEntry]]  # datasets, backbones, learners
    overrides: list[dict[str, Any]]
    # The ``execution:`` section, checked: {"executor": name, **its parameters given}.
    execution: dict[str, Any]
    # The ``search:`` section (fewbench tune), checked; None when the suite has none.
    search: SearchSpace | None = None
    # The ``log:`` list, checked: [{"name": logger, **its parameters, defaults filled}].
    log: list[dict[str, Any]] = field(default_factory=list)
    # The ``reproduces:`` section, checked; None when the suite reproduces no paper.
    reproduces: Reproduces | None = None
    # The ``names:`` section, checked: learner (plugin name or label) -> its name in reports.
    names: dict[str, str] = field(default_factory=dict)


def check_structure(source: SuiteSource, registry: Registry) -> CheckedSuite:
    """Every structural check of a suite (keys, types, plugin names and parameters,
    overrides, the execution section, the search section's form); data is checked later, on
    its own. :func:`fewbench.suite.check.check_suite` adds the search paths' check, which
    needs the grid."""
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
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name.strip()):
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:60] + "..."
        raise source.error(
            "name",
            "expected a folder-safe name (letters, digits, '.', '_', '-', not starting with "
            f"'.', at most 100 characters) like 'omniglot', got {shown}",
        )
    seeds = _int_list(source, "seeds", data.get("seeds", [0]), minimum=0)
    tasks = check_mapping(source, "tasks", data["tasks"], TASKS)
    checked = CheckedSuite(
        source=source,
        name=name.strip(),
        seeds=seeds,
        ways=_int_list(source, "tasks.ways", tasks["ways"], minimum=1),
        shots=_int_list(source, "tasks.shots", tasks["shots"], minimum=1),
        query=tasks["query"],
        train_tasks={k: v for k, v in tasks.items() if k.startswith("train_") and v is not None},
        train=check_mapping(source, "train", data.get("train"), TRAIN),
        eval=_checked_eval(source, registry, check_mapping(source, "eval", data.get("eval"), EVAL)),
        entries=_bounded_entries(source, registry, seeds, tasks),
        overrides=_check_overrides(source),
        execution=_check_execution(source, registry),
        log=_check_log(source, registry),
        reproduces=_check_reproduces(source),
    )
    names = _check_names(source, checked.entries["learners"])
    return replace(checked, names=names, search=parse_search(source))


def _check_reproduces(source: SuiteSource) -> Reproduces | None:
    if "reproduces" not in source.data:
        return None
    try:
        return parse_reproduces(source.data["reproduces"])
    except FewbenchError as exc:  # "reproduces.KEY: what is wrong": point at that line
        path, _, message = str(exc).partition(": ")
        raise source.error(path, message) from None


def _check_names(source: SuiteSource, learners: list[PluginEntry]) -> dict[str, str]:
    """The ``names:`` section: how reports name the suite's learners (fewbench.reports.names).
    A key is a learner's plugin name (``maml``: its variants keep their label's suffix) or a
    label (``maml[inner_lr=0.1]``); one the suite does not have is a typo, refused. Like
    ``log:``, it never enters a cell, so renaming keeps the cell ids."""
    raw = source.data.get("names")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise source.error(
            "names", f"expected a mapping of learner to name, like {{maml: MAML}}, got {raw!r}"
        )
    known = list(dict.fromkeys([e.plugin.name for e in learners] + [e.label for e in learners]))
    names = {}
    for key, value in raw.items():
        path = f"names.{key}"
        if key not in known:
            raise source.error(
                path,
                f"no learner '{key}' in this suite{closest(str(key), known)}; its learners: "
                f"{', '.join(known)}",
            )
        if (
            not isinstance(value, str)
            or not value.strip()
            or any(not c.isprintable() for c in value)
        ):
            raise source.error(path, f"expected a name (one line of text), got {value!r}")
        names[key] = value.strip()
    return names


def _checked_eval(source: SuiteSource, registry: Registry, settings: dict[str, Any]) -> dict:
    return {**settings, "dataset": _check_eval_dataset(source, registry, settings["dataset"])}


SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
# The most cells one suite may expand to: counted before anything is expanded, so a few lines
# of lists cannot make the driver build millions of cells (26.9 million from a ten-line file
# grew memory without end). A larger study is several suites, or one run per seed.
MAX_CELLS = 100_000
MAX_INTEGER = 2**63 - 1  # what the results store's INTEGER columns hold


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
        if item > MAX_INTEGER:
            raise source.error(path, f"must be at most {MAX_INTEGER} (2**63 - 1), got {item}")
    if len(set(values)) != len(values):
        raise source.error(path, f"repeated values in {values}")
    return values


def _bounded_entries(
    source: SuiteSource, registry: Registry, seeds: list[int], tasks: dict[str, Any]
) -> dict[str, list[PluginEntry]]:
    """The plugin entries, once the grid they span is known to stay under MAX_CELLS."""
    axes = {"seeds": len(seeds)}
    for key in ("ways", "shots"):
        axes[key] = len(tasks[key]) if isinstance(tasks[key], list) else 1
    entries = {}
    for key in PLUGIN_LISTS:
        entries[key] = _expand_entries(source, registry, key)
        axes[key] = len(entries[key])
        _refuse_too_many(source, key, axes)
    return entries


def _refuse_too_many(source: SuiteSource, path: str, axes: dict[str, int]) -> None:
    cells = math.prod(axes.values())
    if cells > MAX_CELLS:
        product = " x ".join(f"{n:,} {name}" for name, n in axes.items())
        raise source.error(
            path,
            f"the grid has {cells:,} cells ({product}), more than the {MAX_CELLS:,} one suite "
            "may hold; split it into several suites",
        )


def _expand_entries(source: SuiteSource, registry: Registry, key: str) -> list[PluginEntry]:
    kind = PLUGIN_LISTS[key]
    raw = source.data.get(key)
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise source.error(
            key, f"expected a non-empty list of {kind} entries like '- {{name: ...}}'"
        )
    entries: list[PluginEntry] = []
    for i, item in enumerate(raw):
        entries += _entry_variants(source, registry, kind, item, f"{key}[{i}]")
    _label_entries(entries)
    return entries


def _entry_variants(
    source: SuiteSource, registry: Registry, kind: str, item: Any, path: str
) -> list[PluginEntry]:
    """One plugin entry of a suite (``{name: ..., params}`` or a bare name), checked, with
    every combination its list-valued parameters expand to."""
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
    entries: list[PluginEntry] = []
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
    variants = {f"{c[0][0]} values": len(c) for c in choices if len(c) > 1}
    _refuse_too_many(source, path, variants)
    for combination in itertools.product(*choices):
        given = dict(combination)
        params = {**plugin.params.defaults_in_cells(), **given}
        for name, param in plugin.params.params.items():
            if param.added_later and params.get(name, param.default) == param.default:
                params.pop(name, None)  # at its default: out of the id (Param.added_later)
        entries.append(PluginEntry(plugin, params, given))
    return entries


def _check_eval_dataset(
    source: SuiteSource, registry: Registry, value: dict | str | None
) -> dict | None:
    """``eval.dataset``: one dataset entry (no list-valued parameters), as its full
    configuration."""
    if value is None:
        return None
    variants = _entry_variants(source, registry, "dataset", value, "eval.dataset")
    if len(variants) != 1:
        raise source.error(
            "eval.dataset",
            "one test dataset per suite: a list-valued parameter is not a grid axis here",
        )
    return variants[0].config()


def _label_entries(entries: list[PluginEntry]) -> None:
    """Name each entry by its plugin, plus the parameters that tell same-named entries apart."""
    by_name: dict[str, list[PluginEntry]] = {}
    for entry in entries:
        by_name.setdefault(entry.plugin.name, []).append(entry)
    for name, group in by_name.items():
        if len(group) == 1:
            group[0].label = name
            continue
        # A parameter added later is left out of an entry at its default (Param.added_later):
        # compare every entry's value, the default where it is left out, so that two entries
        # differing only there (maml's eval_batch_norm) still get labels of their own.
        defaults = group[0].plugin.params.defaults()
        keys = list(dict.fromkeys(k for entry in group for k in entry.params))

        def value(entry: PluginEntry, key: str, defaults: dict[str, Any] = defaults) -> Any:
            return entry.params.get(key, defaults.get(key))

        varying = [k for k in keys if len({json.dumps(value(e, k)) for e in group}) > 1]
        for entry in group:
            detail = ",".join(f"{k}={value(entry, k)}" for k in varying)
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


def _check_log(source: SuiteSource, registry: Registry) -> list[dict[str, Any]]:
    """The ``log:`` list: experiment trackers (logger plugins), each a name or ``{name: NAME,
    ...its parameters}``. Like ``execution:`` it never enters a cell's configuration, so
    choosing trackers keeps the cell ids. Each logger is asked whether it can work here (its
    library installed) now, before anything trains."""
    from fewbench.plugin.logger import check_logger, logger_entry

    raw = source.data.get("log")
    if raw is None:
        return []
    if isinstance(raw, str | dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise source.error("log", f"expected a list of logger names, got {raw!r}")
    entries: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        path = f"log[{i}]"
        try:
            entry = logger_entry(item, registry)
        except FewbenchError as exc:
            raise source.error(path, str(exc)) from None
        if any(e["name"] == entry["name"] for e in entries):
            raise source.error(path, f"logger '{entry['name']}' is listed twice")
        try:
            check_logger(entry, registry)
        except FewbenchError as exc:
            raise source.error(path, str(exc)) from None
        entries.append(entry)
    return entries
