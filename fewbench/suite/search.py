"""Search spaces for ``fewbench tune``: a suite's ``search:`` section, checked.

::

    search:
      seed: 0                                             # the sampler's seed (--seed wins)
      learners.maml.inner_lr: {loguniform: [0.01, 1.0]}
      learners.maml.meta_lr: {uniform: [0.0005, 0.002]}
      learners.maml.inner_steps: {int: [1, 5]}
      train.iterations: {int: [200, 1000], step: 200}
      backbones.mlp.hidden: {choice: [[40, 40], [80]]}

Each key is a dotted path into the suite as ``--set`` takes it (a segment of a list of
plugin entries may be an index or a plugin name); a trial sets each path to a value drawn
from its distribution, by the same machinery as ``--set``, before the suite's overrides.
The section is checked with the rest of the suite, without Optuna: every distribution's
form and bounds, and every path with the values at its bounds (or every choice), which must
give a valid suite with as many cells as the suite without it, and must change some cell's
configuration (a key that an override sets again, or that is not part of any cell, would
search nothing). This module imports neither Optuna nor torch.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from fewbench.plugin.params import closest

if TYPE_CHECKING:
    from fewbench.suite.loading import SuiteSource

KINDS = ("loguniform", "uniform", "int", "choice")
EXAMPLE = "{loguniform: [0.01, 1.0]}, {uniform: [a, b]}, {int: [a, b], step: k} or {choice: [...]}"
RESERVED = ("seed",)  # keys of the section that are not paths


def flow(value: Any) -> str:
    """A value as one line of YAML, as ``--set`` reads it back exactly (floats by repr)."""
    return (
        yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
        .strip()
        .removesuffix("...")
        .strip()
    )


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: a ``--set`` key path and its distribution."""

    path: str
    kind: str  # one of KINDS
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None
    choices: tuple[Any, ...] = ()

    def assignment(self, value: Any) -> str:
        """The ``--set`` that gives this parameter ``value``."""
        return f"{self.path}={flow(value)}"

    def shown(self, value: Any) -> str:
        """``path=value`` for people: floats to 4 significant digits (``assignment`` is exact)."""
        text = f"{value:.4g}" if isinstance(value, float) else flow(value)
        return f"{self.path}={text}"

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.path}: one of {', '.join(flow(c) for c in self.choices)}"
        step = f", step {self.step}" if self.step else ""
        scale = "log-uniform" if self.kind == "loguniform" else self.kind
        return f"{self.path}: {scale} in [{self.low:g}, {self.high:g}]{step}"

    def probes(self) -> list[Any]:
        """The values a check tries: both bounds (as the type a trial draws), or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            last = self.low + (self.high - self.low) // (self.step or 1) * (self.step or 1)
            return [int(self.low), int(last)]
        return [float(self.low), float(self.high)]


@dataclass(frozen=True)
class SearchSpace:
    """The checked ``search:`` section: its dimensions, in file order, and its seed."""

    dimensions: tuple[Dimension, ...]
    seed: int | None = None

    def describe(self) -> list[str]:
        return [d.describe() for d in self.dimensions]


def _number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return abs(value) <= 2**63 - 1 if isinstance(value, int) else math.isfinite(value)


def parse_dimension(source: SuiteSource, path: str, spec: Any) -> Dimension:
    """One ``path: {kind: ...}`` entry, its form and bounds checked (not yet its path)."""
    where = f"search.{path}"
    if not isinstance(spec, dict):
        raise source.error(where, f"expected a distribution: {EXAMPLE}; got {spec!r}")
    kinds = [k for k in spec if k in KINDS]
    for key in spec:
        if key not in KINDS and key != "step":
            raise source.error(
                where,
                f"unknown key '{key}'{closest(str(key), [*KINDS, 'step'])}; a distribution is "
                f"{EXAMPLE}",
            )
    if len(kinds) != 1:
        raise source.error(
            where,
            f"expected one distribution ({', '.join(KINDS)}), got "
            f"{', '.join(kinds) if kinds else 'none'}; like {EXAMPLE}",
        )
    kind = kinds[0]
    value = spec[kind]
    if "step" in spec and kind != "int":
        raise source.error(
            where, f"'step' is for int ranges ({{int: [a, b], step: k}}), not {kind}"
        )
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise source.error(where, f"choice: expected a non-empty list of values, got {value!r}")
        texts = [json.dumps(v, sort_keys=True, default=str) for v in value]
        if len(set(texts)) != len(texts):
            raise source.error(where, f"choice: repeated values in {flow(value)}")
        return Dimension(path, kind, choices=tuple(copy.deepcopy(value)))
    if not (isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)):
        raise source.error(where, f"{kind}: expected [low, high], two numbers, got {value!r}")
    low, high = value
    if not low < high:
        raise source.error(where, f"{kind}: low must be below high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise source.error(where, f"loguniform: both bounds must be above 0, got [{low}, {high}]")
    step = None
    if kind == "int":
        if not all(isinstance(v, int) for v in value):
            raise source.error(where, f"int: expected two integers, got [{low}, {high}]")
        step = spec.get("step", 1)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise source.error(where, f"step: expected a positive integer, got {step!r}")
        if (high - low) % step:
            raise source.error(
                where, f"int: high - low ({high - low}) is not a multiple of step {step}"
            )
    return Dimension(path, kind, low, high, step if kind == "int" else None)


def parse_search(source: SuiteSource) -> SearchSpace | None:
    """The suite's ``search:`` section, its form checked (None when it has none); whether each
    path searches something is :func:`fewbench.suite.check.check_search_paths`'s question.

    Each error is a :class:`SuiteError` naming the key (``search.learners.maml.inner_lr``)
    and its line."""
    section = source.data.get("search")
    if section is None:
        return None
    if not isinstance(section, dict) or not section:
        raise source.error(
            "search",
            "expected a mapping of dotted parameter paths to distributions, like "
            "{learners.maml.inner_lr: {loguniform: [0.01, 1.0]}}",
        )
    seed = section.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise source.error("search.seed", f"expected a non-negative integer, got {seed!r}")
    dimensions = []
    for key, spec in section.items():
        if key in RESERVED:
            continue
        path = str(key)
        if "." not in path and "[" not in path:
            raise source.error(
                f"search.{path}",
                f"expected a dotted parameter path like learners.maml.inner_lr (or seed), "
                f"got '{path}'",
            )
        if path.split(".")[0].split("[")[0] in ("search", "execution", "name", "description"):
            raise source.error(f"search.{path}", "not a parameter of the cells: nothing to search")
        dimensions.append(parse_dimension(source, path, spec))
    if not dimensions:
        raise source.error(
            "search", "no parameter to search: add a path like learners.maml.inner_lr"
        )
    return SearchSpace(tuple(dimensions), seed)
