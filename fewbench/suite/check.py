"""The whole check of a suite: its structure (:func:`fewbench.suite.loading.check_structure`),
then each path of its ``search:`` section tried on the grid, which needs the suite valid
without it first. Data is checked later, on its own (:mod:`fewbench.data.check`)."""

from __future__ import annotations

import copy
import json

from fewbench.errors import FewbenchError, SuiteError
from fewbench.registry import Registry
from fewbench.suite.grid import expand_grid
from fewbench.suite.loading import CheckedSuite, SuiteSource, apply_set, check_structure
from fewbench.suite.search import SearchSpace, flow


def check_suite(source: SuiteSource, registry: Registry) -> CheckedSuite:
    """Every check of a suite that needs no data: structure, then the search paths."""
    checked = check_structure(source, registry)
    check_plugin_settings(source, registry, checked)
    if checked.search is not None:
        check_search_paths(source, registry, checked.search)
    return checked


def check_plugin_settings(source: SuiteSource, registry: Registry, checked: CheckedSuite) -> None:
    """Each distinct plugin setting of the grid's cells (datasets, ``eval.dataset``,
    backbones, learners) passes its plugin's :meth:`~fewbench.plugin.base.Plugin.check`
    (combinations a parameter's own bounds cannot refuse: conv4's ``pool_blocks`` without
    max-pooling, Omniglot's within-alphabet episodes on a split with rotations), before
    anything is written or trained."""
    seen: set[tuple[str, str, str]] = set()
    for cell in expand_grid(checked).cells:
        choices = [
            ("dataset", cell.dataset.name, cell.dataset.params, "datasets"),
            ("backbone", cell.backbone.name, cell.backbone.params, "backbones"),
            ("learner", cell.learner.name, cell.learner.params, "learners"),
        ]
        if cell.eval.dataset:
            params = {k: v for k, v in cell.eval.dataset.items() if k != "name"}
            choices.append(("dataset", cell.eval.dataset["name"], params, "eval.dataset"))
        for kind, name, params, section in choices:
            key = (kind, name, json.dumps(params, sort_keys=True, default=str))
            if key in seen:
                continue
            seen.add(key)
            try:
                registry.get(kind, name).build(**params).check()
            except FewbenchError as exc:
                raise source.error(section, str(exc)) from None


def without_search(source: SuiteSource) -> SuiteSource:
    """A copy of ``source`` without its ``search:`` section (what a trial sets apart)."""
    data = {k: copy.deepcopy(v) for k, v in source.data.items() if k != "search"}
    return SuiteSource(data, source.file, dict(source.lines), list(source.sets))


def cell_ids_with(source: SuiteSource, registry: Registry, sets: list[str]) -> list[str]:
    """The ids of the cells ``source`` (less its search section) expands to after ``sets``."""
    trial = without_search(source)
    for assignment in sets:
        apply_set(trial, assignment)
    return [cell.id for cell in expand_grid(check_structure(trial, registry)).cells]


def check_search_paths(source: SuiteSource, registry: Registry, space: SearchSpace) -> None:
    """Each dimension at its probe values gives a valid suite of the same number of cells,
    and changes some cell."""
    base = cell_ids_with(source, registry, [])
    for dimension in space.dimensions:
        where = f"search.{dimension.path}"
        seen: set[tuple[str, ...]] = set()
        for value in dimension.probes():
            try:
                ids = cell_ids_with(source, registry, [dimension.assignment(value)])
            except SuiteError as exc:
                at = f"{exc.path}: " if exc.path and exc.path != dimension.path else ""
                raise source.error(
                    where, f"with the value {flow(value)}: {at}{exc.reason}"
                ) from None
            if len(ids) != len(base):
                raise source.error(
                    where,
                    f"with the value {flow(value)} the suite expands to {len(ids)} cells instead "
                    f"of {len(base)}: a searched value must be one value, not a grid axis",
                )
            seen.add(tuple(ids))
        if len(seen) == 1 and (len(dimension.probes()) > 1 or seen == {tuple(base)}):
            raise source.error(
                where,
                "changes no cell's configuration (an override sets it again, or it is not "
                "part of a cell): nothing to search",
            )
