"""Suite files: YAML parsing with line numbers, ``--set`` overrides and schema checks.

A suite is validated completely before anything trains. Every error names the
file, the key path (``learners[1].inner_lr``) and, where YAML gives it, the line.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fewbench.augment import AUGMENTATIONS
from fewbench.errors import SuiteError
from fewbench.params import Param, check_value, closest

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
}
REQUIRED = ("name", "datasets", "tasks", "backbones", "learners")
TASKS = {
    "ways": Param(5, type=(int, list), help="classes per episode (an integer or a list)"),
    "shots": Param(1, type=(int, list), help="support examples per class (an integer or a list)"),
    "query": Param(1, minimum=1, help="query examples per class in training episodes"),
}
TRAIN = {
    "iterations": Param(1000, minimum=1, help="training steps (meta-iterations)"),
    "validate_every": Param(500, minimum=1, help="validate every this many iterations"),
    "val_episodes": Param(
        100, minimum=0, help="fixed validation episodes (0: keep the last state)"
    ),
    "log_every": Param(50, minimum=1, help="record the training loss every this many iterations"),
    "checkpoint_every": Param(
        1000, minimum=1, help="write a checkpoint every this many iterations"
    ),
    "checkpoint_minutes": Param(5.0, minimum=0.0, help="and at least this often, in minutes"),
    "keep_checkpoints": Param(
        "best",
        choices=("best", "none", "all"),
        help="what to keep of a finished cell: its best state, nothing, or everything",
    ),
    "augment": Param(
        [],
        item_type=str,
        choices=AUGMENTATIONS,
        help="augmentations of training images, batched on the device: flip, crop, rotate90",
    ),
}
EVAL = {
    "episodes": Param(600, minimum=1, help="fixed test episodes"),
    "query": Param(15, minimum=1, help="query examples per class in validation and test episodes"),
    "seed": Param(0, help="seed of the fixed validation and test episodes"),
    "chunk": Param(50, minimum=1, help="episodes adapted per call to the learner"),
}
SECTIONS = {"tasks": TASKS, "train": TRAIN, "eval": EVAL}
PLUGIN_LISTS = {"datasets": "dataset", "backbones": "backbone", "learners": "learner"}


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
            path = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", path)
        return None


def _record_lines(node: yaml.Node, path: str, lines: dict[str, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = f"{path}.{key_node.value}" if path else str(key_node.value)
            lines[child] = key_node.start_mark.line + 1
            _record_lines(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, f"{path}[{i}]", lines)


def parse_yaml(text: str, file: str) -> SuiteSource:
    """Parse YAML text, keeping the line of every key path."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).split("\n")[0]
        raise SuiteError(
            f"invalid YAML: {problem}", file=file, line=mark.line + 1 if mark else None
        ) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise SuiteError(
            "a suite must be a YAML mapping of sections (name, datasets, tasks, ...)", file=file
        )
    lines: dict[str, int] = {}
    _record_lines(node, "", lines)
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


def apply_set(source: SuiteSource, assignment: str) -> None:
    """Apply one ``--set`` (a dotted key path and a YAML value) to the raw suite.

    Inside a list of plugin entries a segment may be an index or a plugin name,
    which sets the key on every entry of that name: ``learners.maml.inner_lr=0.1``.
    """
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise SuiteError(f"--set expects KEY=VALUE, got {assignment!r}", file="--set")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise SuiteError(
            f"--set {key}: the value {text!r} is not valid YAML", file="--set"
        ) from None
    parts = split_key_path(key.strip())
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
