"""The episode manifest: its format, its hash, and reading one back.

A manifest is one JSON object (see docs/episodes.md)::

    format            "fewbench-episodes/1"
    fewbench_version  the fewbench that wrote it
    dataset           name, params, identity, split, classes, examples_per_class,
                      example_shape, identifiers ("paths" or "indices"),
                      class_list_sha256, images_sha256
    setting           ways, shots, query, seed, episodes
    report            dataset (the cells' own dataset configuration), dataset_label,
                      eval_dataset: how report and compare group the scored cell
    cells             the labels of the cells it was exported for
    example_sha256    {identifier: short hash of its decoded image}
    episodes          [{classes, support: [[label, identifier], ...], query: [...]}, ...]
    sha256            of the canonical JSON of everything else

The hash covers the whole manifest, so a changed identifier or label is found before the
data is even read; the data check (:mod:`fewbench.episodes.score`) then finds a data root
that differs from the one the manifest was made from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fewbench.episodes.draw import (
    DrawnEpisodes,
    EpisodeSetting,
    as_json,
    canonical_json,
    sha256_text,
)
from fewbench.errors import FewbenchError
from fewbench.version import __version__

FORMAT = "fewbench-episodes/1"
SETTING_KEYS = ("ways", "shots", "query", "seed", "episodes")


def seal(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with its ``sha256``: the hash of its canonical JSON."""
    return {**body, "sha256": sha256_text(canonical_json(body))}


def build_manifest(
    drawn: DrawnEpisodes, report: dict[str, Any], cells: list[str]
) -> dict[str, Any]:
    """The manifest of ``drawn``; ``report`` says how reports group the cells it was
    exported for (their own dataset configuration and label, and ``eval.dataset``)."""
    setting, pool = drawn.setting, drawn.pool
    body = {
        "format": FORMAT,
        "fewbench_version": __version__,
        "dataset": {
            "name": setting.dataset["name"],
            "params": {k: v for k, v in setting.dataset.items() if k != "name"},
            "identity": as_json(drawn.identity),
            "split": "test",
            "classes": pool.num_classes,
            "examples_per_class": pool.examples_per_class,
            "example_shape": list(pool.input_shape),
            "identifiers": "indices" if drawn.ids is None else "paths",
            "class_list_sha256": drawn.class_list_sha256(),
            "images_sha256": drawn.images_sha256(),
        },
        "setting": {key: getattr(setting, key) for key in SETTING_KEYS},
        "report": report,
        "cells": cells,
        "example_sha256": drawn.example_sha256(),
        "episodes": [drawn.episode(i) for i in range(setting.episodes)],
    }
    return seal(body)


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest as JSON a person can read and diff: a mapping one key per line, a list
    of records (the episodes) one record per line, anything else on one line. Any JSON
    reader reads it; the hash does not depend on the layout."""
    return _layout(manifest, 0) + "\n"


def _layout(value: Any, depth: int) -> str:
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_layout(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        rows = [inner + json.dumps(v, ensure_ascii=False) for v in value]
        return "[\n" + ",\n".join(rows) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False)


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest, checked: JSON, its format, its hash, and the fields scoring reads."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FewbenchError(f"{path}: no such manifest") from None
    except IsADirectoryError:
        raise FewbenchError(f"{path}: is a folder; give the manifest's file") from None
    except OSError as exc:
        raise FewbenchError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise FewbenchError(f"{path}: not a JSON episode manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise FewbenchError(
            f"{path}: not a fewbench episode manifest (format {found!r}, expected {FORMAT!r})"
        )
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    if manifest.get("sha256") != sha256_text(canonical_json(body)):
        raise FewbenchError(
            f"{path}: its sha256 does not match its contents: the manifest was changed after "
            "it was written (or cut short); export it again"
        )
    _check_fields(path, manifest)
    return manifest


def _check_fields(path: Path, manifest: dict[str, Any]) -> None:
    """The fields scoring reads, of the right types (a hand-made manifest with a recomputed
    hash is refused in one line, not with a traceback)."""
    dataset, setting, report = (manifest.get(k) for k in ("dataset", "setting", "report"))
    problems = []
    if not isinstance(dataset, dict) or not isinstance(dataset.get("name"), str):
        problems.append("dataset.name is not a name")
    elif not isinstance(dataset.get("params"), dict):
        problems.append("dataset.params is not a mapping")
    if not isinstance(setting, dict) or not all(
        isinstance(setting.get(k), int) and not isinstance(setting.get(k), bool)
        for k in SETTING_KEYS
    ):
        problems.append(f"setting lacks one of {', '.join(SETTING_KEYS)} as a whole number")
    elif min(setting[k] for k in ("ways", "shots", "query", "episodes")) < 1:
        problems.append("setting holds a count below 1")
    if not isinstance(report, dict) or not isinstance(report.get("dataset"), dict):
        problems.append("report.dataset is not a mapping")
    elif not isinstance(report.get("dataset_label"), str):
        problems.append("report.dataset_label is not text")
    if not isinstance(manifest.get("episodes"), list):
        problems.append("episodes is not a list")
    if problems:
        raise FewbenchError(f"{path}: a malformed episode manifest: {problems[0]}")


def setting_of(manifest: dict[str, Any]) -> EpisodeSetting:
    """The episode setting a (checked) manifest names."""
    dataset, setting = manifest["dataset"], manifest["setting"]
    return EpisodeSetting(
        {"name": dataset["name"], **dataset["params"]}, **{k: setting[k] for k in SETTING_KEYS}
    )
