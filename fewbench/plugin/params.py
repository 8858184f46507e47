"""Declared plugin parameters and the checks a suite value must pass."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

_UNSET = object()


@dataclass(frozen=True)
class Param:
    """A plugin parameter: its default, accepted type, allowed choices and help.

    ``type`` defaults to the type of ``default``; a ``None`` default with no type
    accepts any value. ``nullable`` lets ``None`` stand for "use the framework's
    value" (for example a learner's own iteration count).
    """

    default: Any
    type: Any = _UNSET
    choices: tuple[Any, ...] | None = None
    help: str = ""
    nullable: bool = False
    minimum: float | None = None
    item_type: type | None = (
        None  # for list parameters: the type of each item (minimum applies to items)
    )
    # A parameter added to a plugin after cells were stored: left out of a cell's
    # configuration (and so of its id) while it holds its default, so those cells keep
    # their ids and finished ones are not run again. The plugin still sees the default.
    added_later: bool = False

    @property
    def value_type(self) -> type | None:
        if self.type is not _UNSET:
            return self.type
        return None if self.default is None else type(self.default)

    def describe(self) -> str:
        text = f"{self.default!r}"
        if self.choices:
            text += " (" + "|".join(str(c) for c in self.choices) + ")"
        return text


def as_param(spec: Any) -> Param:
    """Accept either a bare default or a :class:`Param`."""
    return spec if isinstance(spec, Param) else Param(spec)


def check_value(param: Param, value: Any) -> tuple[Any, str | None]:
    """Return the value (ints widened to float where a float is expected) or an error."""
    if value is None and (param.nullable or param.default is None):
        return None, None
    # NaN passes every bound (NaN < minimum is false) and infinity none that matters: a
    # non-finite setting (finetune_lr: .nan) trained cells to exactly chance, stored as done.
    bad = _non_finite(value)
    if bad is not None:
        return value, f"must be a finite number, got {bad}"
    expected = param.value_type
    if expected is not None:
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is int and isinstance(value, bool):
            return value, f"expected an integer, got {value!r}"
        if not isinstance(value, expected):
            return (
                value,
                f"expected {_type_name(expected)}, got {_type_name(type(value))} {value!r}",
            )
    if param.item_type is not None and isinstance(value, list):
        for item in value:
            if isinstance(item, bool) or not isinstance(item, param.item_type):
                return (
                    value,
                    f"every item must be {_type_name(param.item_type)}, got {item!r}",
                )
            if param.minimum is not None and item < param.minimum:
                return value, f"items must be at least {param.minimum:g}, got {item!r}"
            if param.choices is not None and item not in param.choices:
                options = ", ".join(repr(c) for c in param.choices)
                return value, f"every item must be one of {options}, got {item!r}"
        return value, None
    if param.minimum is not None and isinstance(value, int | float) and value < param.minimum:
        return value, f"must be at least {param.minimum:g}, got {value!r}"
    if param.choices is not None and value not in param.choices:
        options = ", ".join(repr(c) for c in param.choices)
        return value, f"must be one of {options}, got {value!r}"
    return value, None


def _non_finite(value: Any) -> str | None:
    """``nan``, ``inf`` or ``-inf`` where ``value`` holds one (in lists and mappings too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list | tuple):
        return next((bad for v in value if (bad := _non_finite(v)) is not None), None)
    if isinstance(value, dict):
        return next((bad for v in value.values() if (bad := _non_finite(v)) is not None), None)
    return None


def _type_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_type_name(k) for k in kind)
    return {
        int: "an integer",
        float: "a number",
        bool: "true/false",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(kind, kind.__name__)


def closest(name: str, known: list[str] | set[str] | tuple[str, ...]) -> str:
    """A ' (did you mean X?)' hint, or an empty string when nothing is close. Case is
    ignored (MAML finds maml), and a name with non-ASCII letters that only look like a known
    one (a Cyrillic 'а' in 'mаml') is said to contain them, not offered its twin."""
    name = str(name)
    foreign = sorted({c for c in name if not c.isascii()})
    if foreign:
        letters = ", ".join(f"'{c}' (U+{ord(c):04X})" for c in foreign[:3])
        return f" (it contains non-ASCII letters: {letters})"
    lower = {k.lower(): k for k in sorted(known, key=str)}
    if name.lower() in lower and name not in known:
        return f" (did you mean '{lower[name.lower()]}'?)"
    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


@dataclass
class ParamSet:
    """The resolved parameters of one plugin class."""

    params: dict[str, Param] = field(default_factory=dict)

    @classmethod
    def of(cls, plugin: type) -> ParamSet:
        raw = getattr(plugin, "params", {}) or {}
        if not isinstance(raw, dict) or not all(isinstance(key, str) for key in raw):
            raise TypeError(f"params must be a mapping of names, got {type(raw).__name__}")
        return cls({key: as_param(spec) for key, spec in raw.items()})

    def defaults(self) -> dict[str, Any]:
        return {key: param.default for key, param in self.params.items()}

    def defaults_in_cells(self) -> dict[str, Any]:
        """The defaults a cell's configuration records (see :attr:`Param.added_later`)."""
        return {key: p.default for key, p in self.params.items() if not p.added_later}
