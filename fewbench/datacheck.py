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

from fewbench.cell import Cell
from fewbench.data import SplitSize
from fewbench.errors import DataError, FewbenchError
from fewbench.grid import Suite
from fewbench.registry import Registry


def check_data(
    suite: Suite, registry: Registry, data_root: Path | None, *, require_data: bool = True
) -> list[str]:
    """Check every cell against its dataset's split sizes; returns warnings.

    With ``require_data`` false, missing data is a warning instead of an error.
    """
    warnings: list[str] = []
    sizes: dict[str, dict[str, SplitSize] | None] = {}
    for cell in suite.cells:
        key = json.dumps(cell.config["dataset"], sort_keys=True)
        if key not in sizes:
            sizes[key] = _split_sizes(cell, registry, data_root, require_data, warnings)
        if sizes[key] is not None:
            _check_episodes(suite, cell, sizes[key])
    return sorted(set(warnings))


def _split_sizes(
    cell: Cell, registry: Registry, data_root: Path | None, require_data: bool, warnings: list[str]
) -> dict[str, SplitSize] | None:
    if data_root is None:
        if require_data:
            raise DataError("no data root: pass --data-root DIR or set FEWBENCH_DATA")
        warnings.append("data not checked: no data root given")
        return None
    dataset = registry.get("dataset", cell.dataset.name).build(**cell.dataset.params)
    try:
        return dataset.split_sizes(data_root)
    except DataError as exc:
        if require_data:
            raise
        warnings.append(f"data not checked: {exc}")
        return None


def _check_episodes(suite: Suite, cell: Cell, sizes: dict[str, SplitSize]) -> None:
    source, label, name = suite.source, cell.label, cell.dataset.name
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
    from fewbench import datastore

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
