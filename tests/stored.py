"""Run directories with results written straight into the store, for report tests."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from fewbench.data.download import Resource
from fewbench.storage.sink import CellResult
from fewbench.storage.store import ResultsStore
from fewbench.suite.cell import Cell


def make_cell(
    learner: str,
    seed: int = 0,
    *,
    shots: int = 1,
    ways: int = 5,
    dataset: str = "toy",
    eval_seed: int = 0,
    backbone: str = "conv4",
    params: dict[str, Any] | None = None,
    dataset_params: dict[str, Any] | None = None,
    backbone_params: dict[str, Any] | None = None,
    eval_query: int = 15,
) -> Cell:
    label = (
        learner if not params else f"{learner}[{','.join(f'{k}={v}' for k, v in params.items())}]"
    )
    config = {
        "dataset": {"name": dataset, **(dataset_params or {})},
        "backbone": {"name": backbone, **(backbone_params or {})},
        "learner": {"name": learner, **(params or {})},
        "tasks": {"ways": ways, "shots": shots, "query": 1},
        "train": {},
        "eval": {"query": eval_query, "seed": eval_seed},
        "seed": seed,
    }
    return Cell.from_config(
        config,
        f"{dataset}/{ways}w{shots}s/{backbone}/{label}/seed{seed}",
        {"dataset": dataset, "backbone": backbone, "learner": label},
        id=f"{label}-{dataset}-{ways}-{shots}-{seed}-{eval_seed}-{backbone}",
    )


def store_run(
    path: Path,
    results: list[tuple[Cell, list[float] | str]],
    *,
    curves: dict[str, list[tuple[int, float, float | None]]] | None = None,
    metric: str = "accuracy",
) -> Path:
    """``results``: per cell, its per-episode values, or a status (failed, pending)."""
    path.mkdir(parents=True, exist_ok=True)
    store = ResultsStore.open_run(path)
    store.set_meta("suite", "name: toy\n")
    store.set_meta("environment", {"torch": "test", "device": "cpu"})
    store.add_cells([c for c, _ in results])
    for c, values in results:
        if isinstance(values, str):
            if values != "pending":
                store.mark(c.id, values, error="training loss became nan at iteration 3")
            continue
        store.complete(
            c.id,
            CellResult(
                metric=metric,
                values=list(values),
                mean=sum(values) / len(values),
                ci95=0.0,
                curve=(curves or {}).get(c.id, [(1, 1.0, 0.5), (2, 0.5, 0.6)]),
                iterations=2,
                best_iteration=2,
                best_val=0.6,
                engine="test engine",
                train_seconds=1.0,
                eval_seconds=1.0,
            ),
        )
    store.close()
    (path / "environment.json").write_text(json.dumps({"torch": "test"}))
    return path


def tar_gz(members: dict[str, bytes]) -> bytes:
    """A .tar.gz archive holding ``members`` (path -> content)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def checked_against(dataset: type, archive: Path, verify=None) -> type:
    """``dataset`` with its one archive replaced by ``archive`` (its MD5), so that the real
    import path (checksum, unpack, verify, rename) runs on generated data."""
    attributes = {
        "resources": (
            Resource(
                "http://127.0.0.1:9/unused",
                archive.name,
                hashlib.md5(archive.read_bytes()).hexdigest(),
            ),
        )
    }
    if verify is not None:
        attributes["verify"] = classmethod(verify)
    return type(f"Generated{dataset.__name__}", (dataset,), attributes)
