"""The data check: can the data supply every cell's episodes?

A step of its own, after the suite is checked and expanded and before anything
trains (and after any download): each distinct dataset configuration reports its
split sizes once, and every cell's ways, shots and query counts are checked
against them, with errors located in the suite file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from fewbench.errors import DataError, FewbenchError
from fewbench.plugin.dataset import SplitSize
from fewbench.registry import Registry
from fewbench.suite.cell import Cell
from fewbench.suite.check import check_suite
from fewbench.suite.grid import Suite, expand_grid
from fewbench.suite.loading import SuiteSource


def check_data(
    suite: Suite, registry: Registry, data_root: Path | None, *, require_data: bool = True
) -> list[str]:
    """Check every cell against its dataset's split sizes; returns warnings.

    With ``require_data`` false, missing data is a warning instead of an error.
    """
    warnings: list[str] = []
    sizes: dict[str, dict[str, SplitSize] | None] = {}

    def sizes_of(config: dict) -> dict[str, SplitSize] | None:
        key = json.dumps(config, sort_keys=True)
        if key not in sizes:
            sizes[key] = _split_sizes(config, registry, data_root, require_data, warnings)
        return sizes[key]

    for cell in suite.cells:
        tested_on = cell.eval.dataset
        if getattr(registry.get("dataset", cell.dataset.name).cls, "test_only", False):
            name = cell.dataset.name
            raise suite.source.error(
                "datasets",
                f"cell {cell.label}: {name} has no training split, only test classes (a "
                f"cross-domain target): train on another dataset and test on it with "
                f"eval.dataset: {{name: {name}}}",
            )
        _check_input_normalisation(suite, cell, registry)
        own = sizes_of(cell.config["dataset"])
        if own is not None:  # a cross-domain cell draws no test episodes from its own dataset
            _check_episodes(suite, cell, own, cell.dataset.name, skip_test=tested_on is not None)
        if tested_on is not None:
            _check_tested_on(suite, cell, registry)
        if tested_on is not None and (other := sizes_of(tested_on)) is not None:
            _check_episodes(
                suite,
                cell,
                {k: v for k, v in other.items() if k == "test"},
                f"{tested_on['name']} (eval.dataset)",
            )
    return sorted(set(warnings))


def _split_sizes(
    config: dict,
    registry: Registry,
    data_root: Path | None,
    require_data: bool,
    warnings: list[str],
) -> dict[str, SplitSize] | None:
    if data_root is None:
        if require_data:
            raise DataError("no data root: pass --data-root DIR or set FEWBENCH_DATA")
        warnings.append("data not checked: no data root given")
        return None
    params = {k: v for k, v in config.items() if k != "name"}
    dataset = registry.get("dataset", config["name"]).build(**params)
    try:
        return dataset.split_sizes(data_root)
    except DataError as exc:
        if require_data:
            raise
        warnings.append(f"data not checked: {exc}")
        return None


def _check_input_normalisation(suite: Suite, cell: Cell, registry: Registry) -> None:
    """A backbone that normalises its input with its pretraining statistics needs images on
    [0, 1]: a dataset (or test dataset) that normalises them too would be normalised twice."""
    backbone = registry.get("backbone", cell.backbone.name).build(**cell.backbone.params)
    if not backbone.normalizes_input():
        return
    for section, config in (
        ("datasets", cell.config["dataset"]),
        ("eval.dataset", cell.eval.dataset),
    ):
        if config is None:
            continue
        params = (
            registry.get("dataset", config["name"])
            .build(**{k: v for k, v in config.items() if k != "name"})
            .config
        )
        if params.get("normalize", False) not in (False, "none"):
            raise suite.source.error(
                section,
                f"cell {cell.label}: backbone {cell.backbone.name} normalises images with its "
                f"model's statistics, and {config['name']} normalises them too (normalize: "
                f"{params['normalize']}); set the dataset's normalize: "
                f"{'none' if isinstance(params['normalize'], str) else 'false'}, or the "
                "backbone's normalize: none",
            )


def _check_tested_on(suite: Suite, cell: Cell, registry: Registry) -> None:
    """A cross-domain test dataset must pose the same kind of task as the training one."""
    from fewbench.plugin.task_types import task_type_of

    tested = cell.eval.dataset["name"]
    trained = task_type_of(registry.get("dataset", cell.dataset.name).cls.task_type)
    other = task_type_of(registry.get("dataset", tested).cls.task_type)
    if other != trained:
        raise suite.source.error(
            "eval.dataset",
            f"cell {cell.label}: eval.dataset {tested} poses {other.name} tasks; a model "
            f"trained on {cell.dataset.name} ({trained.name}) cannot be tested on it",
        )


def _check_episodes(
    suite: Suite,
    cell: Cell,
    sizes: dict[str, SplitSize],
    name: str,
    skip_test: bool = False,
) -> None:
    source, label = suite.source, cell.label
    tasks = cell.tasks
    for split, ways, shots, query, path, ways_path in (
        (
            "train",
            *tasks.training,
            "tasks.train_query" if tasks.train_query else "tasks.query",
            "tasks.train_ways" if tasks.train_ways else "tasks.ways",
        ),
        ("val", cell.ways, cell.shots, cell.eval.query, "eval.query", "tasks.ways"),
        ("test", cell.ways, cell.shots, cell.eval.query, "eval.query", "tasks.ways"),
    ):
        if split not in sizes or (split == "val" and cell.train.val_episodes == 0):
            continue
        if split == "test" and skip_test:
            continue
        size = sizes[split]
        if ways > size.classes:
            raise source.error(
                ways_path,
                f"cell {label}: {ways}-way episodes need {ways} classes, but the "
                f"'{split}' split of {name} has {size.classes}",
            )
        if shots + query > size.examples_per_class:
            raise source.error(
                path,
                f"cell {label}: {shots} shots + {query} query = {shots + query} examples "
                f"per class, but classes of the '{split}' split of "
                f"{name} have {size.examples_per_class}",
            )


def download_missing(
    names: set[str], registry: Registry, root: Path, progress: bool, log: TextIO
) -> None:
    """Download a suite's missing datasets that can be downloaded, before anything trains."""
    from fewbench.data import root as datastore

    for name in sorted(names):
        dataset = registry.get("dataset", name).cls
        status = datastore.status(dataset, root, verify=False)
        if status.state == "missing" and status.downloadable:
            print(f"fewbench: {name} is not under {root}; downloading it", file=log)
            try:
                datastore.download(dataset, root, progress=progress)
            except FewbenchError as exc:
                raise FewbenchError(
                    f"{name} is missing under {root} and could not be downloaded: {exc}; "
                    f"on a machine without internet: fewbench data import {name} PATH"
                ) from None


def expand_and_check(
    source: SuiteSource, registry: Registry, data_root: Path | None, *, require_data: bool = True
) -> Suite:
    """Check ``source``, expand it and check the data: the three steps in one call.

    With ``require_data`` false (``--dry-run``), missing data is a warning instead of
    an error, so a suite can be inspected on a machine that has no data yet.
    """
    suite = expand_grid(check_suite(source, registry))
    warnings = suite.warnings + check_data(suite, registry, data_root, require_data=require_data)
    return Suite(
        suite.name, suite.data, suite.cells, warnings, suite.execution, source, log=suite.log
    )
