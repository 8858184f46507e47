"""``fewbench episodes score``: an outside method's predictions on a manifest's episodes,
scored into a run directory that reports read like any other.

Before anything is scored, the manifest is checked against the local data root: its
episodes are drawn again as evaluation draws them and must name the same examples, and
those examples must decode to the same pixels (:func:`verify`). So a score stored here is
a score on the very episodes fewbench's own cells of the setting are tested on.

The run directory holds one cell, done, whose settings are those the manifest's cells have
where reports look (their dataset and its label, ways, shots, test query, evaluation seed;
:func:`fewbench.reports.results._episode_key`): ``report`` shows it beside them and
``compare`` pairs it with them episode by episode. Its learner is the outside method
(``--name``), its backbone ``--backbone``: ``compare`` compares learners within a backbone,
so give the backbone of the cells to compare it with. Accuracy is stored as fewbench stores
it, a fraction per episode.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewbench.episodes.draw import DrawnEpisodes, as_json, draw_episodes
from fewbench.episodes.manifest import read_manifest, setting_of
from fewbench.episodes.predictions import read_predictions
from fewbench.errors import FewbenchError
from fewbench.registry import Registry
from fewbench.suite.cell import Cell, cell_id


@dataclass(frozen=True)
class Scored:
    run_dir: Path
    label: str
    values: list[float]  # accuracy per episode, a fraction
    mean: float
    ci95: float


def check_label(option: str, value: str) -> None:
    """A learner or backbone label as reports show it: printable text without a slash
    (cell labels join their parts with ``/``)."""
    if not value.strip() or not value.isprintable() or "/" in value or len(value) > 100:
        raise FewbenchError(
            f"{option} {value!r:.60}: give a short printable label without '/', e.g. outside:knn"
        )


def check_out(out: Path) -> None:
    """``--out`` is a new run directory: absent, or an empty folder."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FewbenchError(f"--out {out}: exists and is not an empty folder; give a new one")


def verify(manifest: dict[str, Any], drawn: DrawnEpisodes, data_root: Path) -> None:
    """Refuse, in one line naming the first difference, a manifest that the episodes drawn
    from ``data_root`` do not match: another dataset version (identity, class list),
    other episodes, or other images behind the same names."""
    dataset, name = manifest["dataset"], manifest["dataset"]["name"]
    where = f"the {name} data under {data_root}"
    if dataset.get("identity") != as_json(drawn.identity):
        raise FewbenchError(
            f"the manifest's dataset identity {dataset.get('identity')} is not this fewbench's "
            f"{as_json(drawn.identity)} (another version of the {name} plugin?)"
        )
    kind = "indices" if drawn.ids is None else "paths"
    if dataset.get("identifiers") != kind:
        raise FewbenchError(
            f"the manifest names examples by {dataset.get('identifiers')}, the installed {name} "
            f"plugin by {kind} (another version of the plugin?)"
        )
    episodes = manifest["episodes"]
    if len(episodes) != drawn.setting.episodes:
        raise FewbenchError(
            f"the manifest lists {len(episodes)} episodes, its setting says {drawn.setting.episodes}"
        )
    for index, listed in enumerate(episodes):
        _same_episode(index, listed, drawn.episode(index), where)
    _same_images(manifest.get("example_sha256"), drawn.example_sha256(), where)
    for key, local in (
        ("class_list_sha256", drawn.class_list_sha256()),
        ("images_sha256", drawn.images_sha256()),
    ):
        if dataset.get(key) != local:
            what = "list of classes and examples" if key.startswith("class") else "decoded images"
            raise FewbenchError(
                f"the {what} of {where} differ from the manifest's ({key}), though every "
                "example its episodes hold matches; the data root holds another copy of the data"
            )


def _same_episode(index: int, listed: Any, local: dict[str, Any], where: str) -> None:
    if not isinstance(listed, dict):
        raise FewbenchError(f"the manifest's episode {index} is not a record")
    for part in ("classes", "support", "query"):
        mine, theirs = local[part], listed.get(part)
        if mine == theirs:
            continue
        if not isinstance(theirs, list) or len(theirs) != len(mine):
            raise FewbenchError(
                f"episode {index}: the manifest's {part} differs in length from the episode "
                f"drawn from {where}"
            )
        at = next(i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b)
        raise FewbenchError(
            f"episode {index} {part} {at}: the manifest holds {theirs[at]}, the episode drawn "
            f"from {where} holds {mine[at]} (another split or another copy of the data)"
        )


def _same_images(listed: Any, local: dict[str, str], where: str) -> None:
    if not isinstance(listed, dict) or set(listed) != set(local):
        raise FewbenchError(
            "the manifest's example_sha256 does not list exactly the examples its episodes hold"
        )
    differ = [name for name in local if listed[name] != local[name]]
    if differ:
        raise FewbenchError(
            f"{differ[0]}: its image in {where} differs from the manifest's "
            f"({len(differ)} of {len(local)} examples differ): these are not the episodes "
            "the manifest was made from"
        )


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def scored_cell(manifest: dict[str, Any], name: str, backbone: str, predictions: str) -> Cell:
    """The cell a score is stored as: the manifest's cells' settings where reports look,
    the outside method as its learner (its predictions' hash in its parameters, so that
    two scorings are two cells)."""
    setting, report = manifest["setting"], manifest["report"]
    evaluation = {k: setting[k] for k in ("episodes", "query", "seed")}
    if report.get("eval_dataset"):
        evaluation["dataset"] = report["eval_dataset"]
    config = {
        "dataset": report["dataset"],
        "backbone": {"name": backbone},
        "learner": {"name": name, "predictions_sha256": predictions[:16]},
        "tasks": {"ways": setting["ways"], "shots": setting["shots"], "query": setting["query"]},
        "train": {},
        "eval": evaluation,
        "seed": 0,
    }
    dataset_label = report["dataset_label"]
    label = f"{dataset_label}/{setting['ways']}w{setting['shots']}s/{backbone}/{name}/seed0"
    labels = {"dataset": dataset_label, "backbone": backbone, "learner": name}
    return Cell.from_config(config, label, labels, cell_id(config))


def write_run(
    out: Path, cell: Cell, values: list[float], estimate: Any, meta: dict[str, Any]
) -> None:
    """The run directory, built beside ``out`` and renamed into place: a failure leaves
    nothing at ``out``."""
    from fewbench.storage.sink import CellResult
    from fewbench.storage.store import ResultsStore

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise FewbenchError(f"--out {out}: cannot create it: {exc.strerror or exc}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        building.chmod(0o777 & ~umask)  # a run directory as any other, not mkdtemp's 0700
        store = ResultsStore.open_run(building)
        try:
            store.set_meta(
                "suite",
                "# fewbench episodes score: an outside method's predictions on the fixed test\n"
                "# episodes of a manifest; nothing was trained here (see meta 'outside').\n"
                f"name: {json.dumps(cell.learner.label)}\n",
            )
            store.set_meta("environment", {"scored_by": "fewbench episodes score"})
            store.set_meta("outside", meta)
            store.add_cells([cell])
            store.complete(
                cell.id,
                CellResult(
                    metric="accuracy",
                    values=values,
                    mean=estimate.mean,
                    ci95=estimate.ci95,
                    curve=[],
                    iterations=0,
                    best_iteration=None,
                    best_val=None,
                    engine="outside fewbench: predictions scored against an episode manifest",
                    train_seconds=0.0,
                    eval_seconds=0.0,
                ),
            )
        finally:
            store.close()
        if out.is_dir():
            out.rmdir()  # empty: check_out
        os.replace(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def score_predictions(
    manifest_path: Path,
    predictions_path: Path,
    out: Path,
    *,
    name: str,
    backbone: str,
    data_root: Path,
    cache_dir: Path,
    registry: Registry | None = None,
) -> Scored:
    """Check the manifest, the predictions and the local data, then write the run
    directory ``out``; every problem is one FewbenchError, and then nothing is written."""
    from fewbench.reports.stats import mean_ci95

    out = Path(out)
    check_label("--name", name)
    check_label("--backbone", backbone)
    check_out(out)
    manifest = read_manifest(manifest_path)
    setting = setting_of(manifest)
    queries = setting.ways * setting.query
    predicted = read_predictions(predictions_path, setting.episodes, queries, setting.ways)
    registry = registry or Registry()
    if registry.has("learner", name.partition("[")[0]):
        raise FewbenchError(
            f"--name {name}: the name of a fewbench learner; an outside method needs its own "
            f"(e.g. outside:{name}), or reports would merge it with that learner's cells"
        )
    drawn = draw_episodes(setting, data_root, cache_dir, registry)
    verify(manifest, drawn, data_root)
    truth = np.arange(queries) // setting.query  # gather's query labels, as the manifest's
    values = (predicted == truth[None, :]).mean(axis=1).astype(float).tolist()
    digest = file_sha256(predictions_path)
    cell = scored_cell(manifest, name, backbone, digest)
    meta = {
        "manifest": str(manifest_path),
        "manifest_sha256": manifest["sha256"],
        "predictions": str(predictions_path),
        "predictions_sha256": digest,
        "data_root": str(data_root),
        "setting": manifest["setting"],
        "dataset": manifest["dataset"],
    }
    estimate = mean_ci95(values)
    write_run(out, cell, values, estimate, meta)
    return Scored(out, cell.label, values, estimate.mean, estimate.ci95)
