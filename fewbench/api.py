"""fewbench as a library: run a suite, read its results, reuse a trained model.

    import fewbench

    run_dir = fewbench.run("suites/sinusoid.yaml", set={"train.iterations": 200}, out="runs/sin")
    results = fewbench.load_results(run_dir)          # pandas: cells, episodes, curves
    model = fewbench.load_learner(run_dir, "sinusoid/1w10s/mlp/maml/seed0")
    outputs = model.predict(support_x, support_y, query_x)

A finished cell keeps its best state in ``checkpoints/<cell id>/best.pt``, a self-describing
model file (:data:`MODEL_FORMAT`): the learner's state with the cell's configuration and what
setting the learner up needs (input shape, ways, number of training classes, task type), and
the fewbench and plugin versions it was trained with. ``fewbench export RUN_DIR CELL -o FILE``
copies it out; :func:`load_learner` reads it with or without its run directory.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fewbench.errors import FewbenchError
from fewbench.storage.model_file import MODEL_FORMAT, REBUILT, model_record  # noqa: F401


def _model_file(source: str | Path, cell: str | None) -> Path:
    """``source`` itself when it is a model file; else the named cell's ``best.pt`` in the run
    directory ``source`` (by label or id; the only cell when there is one)."""
    path = Path(source)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FewbenchError(f"{path}: no such model file or run directory")
    from fewbench.storage.store import ResultsStore

    store = ResultsStore.open_run(path, must_exist=True)
    try:
        rows = [(row["id"], row["label"], row["status"]) for row in store.cells()]
    finally:
        store.close()
    if cell is None:
        if len(rows) != 1:
            labels = ", ".join(label for _, label, _ in rows)
            raise FewbenchError(f"{path} holds {len(rows)} cells; name one: {labels}")
        cell = rows[0][0]
    found = [r for r in rows if cell in (r[0], r[1])]
    if not found:
        raise FewbenchError(
            f"{path} has no cell {cell!r}; its cells: {', '.join(r[1] for r in rows)}"
        )
    cell_id, label, status = found[0]
    best = path / "checkpoints" / cell_id / "best.pt"
    if not best.is_file():
        raise FewbenchError(
            f"{label}: no trained model at {best} (status {status}; the run keeps models with "
            "train.keep_checkpoints best or all)"
        )
    return best


@dataclass
class TrainedModel:
    """A trained learner, set up as its cell was, ready to adapt to new episodes."""

    learner: Any  # fewbench.plugin.learner.Learner
    cell: Any  # fewbench.suite.cell.Cell
    context: Any  # fewbench.plugin.learner.LearnerContext
    record: dict[str, Any]

    @property
    def device(self) -> Any:
        return self.context.device

    def predict(self, support_x: Any, support_y: Any, query_x: Any) -> Any:
        """Adapt to one support set and return the query outputs (classification: logits
        ``[queries, ways]``; regression: predictions). ``support_x`` is ``[examples,
        *input_shape]``, ``support_y`` the labels 0..ways-1 (or targets), ``query_x`` like
        ``support_x``. Any number of ways the learner admits: its head was built for
        ``context.ways`` classes."""
        import torch

        from fewbench.plugin.dataset import EpisodeBatch

        def batched(t: Any) -> Any:
            return torch.as_tensor(t).to(self.device).unsqueeze(0)

        sx, sy, qx = batched(support_x), batched(support_y), batched(query_x)
        ways = int(sy.max().item()) + 1 if sy.dtype in (torch.int64, torch.int32) else 1
        episode = EpisodeBatch(sx, sy, qx, sy.new_zeros((1, qx.shape[1])), ways)
        with torch.no_grad():
            return self.learner.predict(episode)[0]

    def evaluate(
        self, data_root: str | Path, *, split: str = "test", episodes: int | None = None
    ) -> Any:
        """The per-episode metric on the cell's fixed ``split`` episodes, as the run computed
        it (the same episodes, so the stored values come back exactly)."""
        import torch

        from fewbench.registry import Registry
        from fewbench.running.evaluation import EpisodeSpec, dataset_identity, evaluate
        from fewbench.running.worker import DatasetCache, source_of_test_episodes
        from fewbench.storage.paths import default_cache_dir

        device = torch.device(self.device)
        datasets = DatasetCache(Registry(), Path(data_root), default_cache_dir(), device)
        dataset, sources = datasets.get(self.cell)
        identity = dataset_identity(
            self.cell.dataset.config(), getattr(dataset, "episode_identity", None)
        )
        source = sources[split]
        if split == "test":  # a cross-domain cell's come from eval.dataset, by the run's rule
            source, identity = source_of_test_episodes(
                self.cell, datasets, sources, identity, self.context.task_type
            )
        count = episodes or (
            self.cell.eval.episodes if split == "test" else self.cell.train.val_episodes
        )
        return evaluate(
            self.learner,
            source,
            EpisodeSpec.of(self.cell, identity, split),
            episodes=count,
            chunk=self.cell.eval.chunk,
            device=device,
            task_type=self.context.task_type,
        )


def load_learner(
    source: str | Path, cell: str | None = None, *, device: str = "cpu"
) -> TrainedModel:
    """The trained learner of a cell: ``source`` is a run directory (``cell`` by label or id)
    or a model file (``best.pt`` or an export). Built from what the file records, with the
    installed plugins; a missing plugin is named in the error."""
    import torch

    from fewbench.plugin.learner import LearnerContext
    from fewbench.plugin.task_types import task_type_of
    from fewbench.registry import Registry
    from fewbench.suite.cell import Cell

    path = _model_file(source, cell)
    try:
        record = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one line
        raise FewbenchError(
            f"{path}: not a readable model file ({type(exc).__name__}: {str(exc)[:120]})"
        ) from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise FewbenchError(
            f"{path}: not a fewbench model file (written before models described themselves? "
            "rerun the cell, or load the bare state_dict with torch.load)"
        )
    _warn_if_newer(path, record.get("fewbench_version"))
    registry = Registry()
    try:
        stored = Cell.from_record(record["cell"])
        _refuse_unknown_parameters(path, registry, stored)
        saved = {k: v for k, v in record["context"].items() if k not in REBUILT}
        task_type = task_type_of(record["context"]["task_type"])

        def set_up(on: str) -> Any:
            backbone = registry.get("backbone", stored.backbone.name).build(
                **stored.backbone.params
            )
            learner = registry.get("learner", stored.learner.name).build(**stored.learner.params)
            context = LearnerContext(
                **{**saved, "input_shape": tuple(saved["input_shape"])},
                backbone=backbone,
                device=torch.device(on),
                task_type=task_type,
            )
            torch.manual_seed(0)  # setup builds fresh weights; the state below replaces them
            learner.setup(context)
            return learner, context

        _refuse_sizes_the_state_does_not_hold(path, set_up, record["state"])
        learner, context = set_up(device)
        learner.load_state_dict(record["state"])
    except FewbenchError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise FewbenchError(
            f"{path}: a damaged or inconsistent model file ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    return TrainedModel(learner, stored, context, record)


def _warn_if_newer(path: Path, version: Any) -> None:
    """A model file from a newer fewbench may hold what this one cannot read right."""
    import re
    import warnings

    from fewbench.version import __version__

    def release(text: Any) -> tuple[int, ...] | None:
        found = re.match(r"\d+(\.\d+)*", str(text))
        return tuple(int(n) for n in found.group(0).split(".")) if found else None

    written, running = release(version), release(__version__)
    if written is None or (running is not None and written > running):
        warnings.warn(
            f"{path}: written by fewbench {version}, newer than this {__version__}; "
            "upgrade fewbench if loading or predicting misbehaves",
            stacklevel=3,
        )


def _tensor_shapes(value: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Every tensor in a nested state (dicts, lists), by its path."""
    import torch

    if isinstance(value, torch.Tensor):
        return {prefix: tuple(value.shape)}
    if not isinstance(value, dict | list | tuple):
        return {}
    items = value.items() if isinstance(value, dict) else enumerate(value)
    found = {}
    for key, item in items:
        found.update(_tensor_shapes(item, f"{prefix}.{key}" if prefix else str(key)))
    return found


def _refuse_sizes_the_state_does_not_hold(path: Path, set_up: Any, state: Any) -> None:
    """Build the model on PyTorch's ``meta`` device first (shapes, no memory) and refuse it
    unless every tensor it would allocate is in the file, with the same shape: a crafted
    ``hidden: 1000000`` or a huge ``input_shape`` asked for terabytes before the state was
    compared. The file's own tensors are already in memory, so this bounds the real build
    by the file's size. A plugin whose setup cannot run on ``meta`` is built as before."""
    import torch

    try:
        with torch.device("meta"):  # modules built outside setup land there too
            learner, _ = set_up("meta")
        wanted = _tensor_shapes(learner.state_dict())
    except (NotImplementedError, RuntimeError):
        return
    held = _tensor_shapes(state)
    for name, shape in wanted.items():
        if held.get(name) != shape:
            elements = sum(math.prod(s) for s in wanted.values())
            raise FewbenchError(
                f"{path}: the recorded settings build a model of {elements:,} values whose "
                f"{name} has shape {list(shape)}, but the file holds "
                + ("no such tensor" if name not in held else f"shape {list(held[name])}")
                + " (a damaged or crafted model file; nothing was allocated)"
            )


def _refuse_unknown_parameters(path: Path, registry: Any, stored: Any) -> None:
    """A parameter the installed plugin does not know was silently dropped: refuse it."""
    for kind, choice in (("backbone", stored.backbone), ("learner", stored.learner)):
        known = registry.get(kind, choice.name).params.params
        unknown = sorted(set(choice.params) - set(known))
        if unknown:
            raise FewbenchError(
                f"{path}: the model's {kind} {choice.name} has parameters the installed plugin "
                f"does not know ({', '.join(unknown)}); install the plugin version that wrote it"
            )


def export_model(
    run_dir: str | Path, cell: str | None, destination: str | Path, *, force: bool = False
) -> Path:
    """Copy a cell's model file out of its run directory (``fewbench export``).

    Never destroys a result: an existing destination is replaced only with ``force``, and
    nothing is written inside a run directory (a folder holding a ``results.sqlite``, or
    under one). The copy is written atomically and readable by its owner only, as the source."""
    from fewbench.storage.atomic import write_atomically
    from fewbench.storage.store import DB_NAME

    source = _model_file(run_dir, cell)
    destination = Path(destination)
    target = destination.resolve()
    if destination.is_dir():
        raise FewbenchError(f"-o {destination}: is a folder; give the model file's path")
    if target == source.resolve():
        raise FewbenchError(f"-o {destination}: is the model file itself")
    for folder in target.parents:
        if (folder / DB_NAME).is_file():
            raise FewbenchError(
                f"-o {destination}: inside the run directory {folder}; fewbench export never "
                "writes into a run (write the model file elsewhere)"
            )
    if not destination.parent.is_dir():
        raise FewbenchError(f"-o {destination}: the folder {destination.parent} does not exist")
    if destination.exists() and not force:
        raise FewbenchError(f"-o {destination}: exists; give --force to replace it")
    try:
        with open(source, "rb") as model:
            write_atomically(destination, lambda out: shutil.copyfileobj(model, out))
    except PermissionError:
        raise FewbenchError(
            f"-o {destination}: cannot write in {destination.parent} (permission denied)"
        ) from None
    return destination


def _checked_arguments(
    suite: Any, max_iterations: Any, max_episodes: Any, log: Sequence[Any] = ()
) -> None:
    """The API's arguments, refused as the command line refuses them (one FewbenchError,
    not a TypeError from deep inside; ``max_iterations=0`` is not "no cap")."""
    if not isinstance(suite, str | Path):
        raise FewbenchError(
            f"suite: expected the path of a suite file (or run directory), got "
            f"{type(suite).__name__}; write the suite to a file first"
        )
    for name, value in (("max_iterations", max_iterations), ("max_episodes", max_episodes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise FewbenchError(f"{name}: expected a positive integer or None, got {value!r}")
        if value is not None and value < 1:
            raise FewbenchError(f"{name}: must be at least 1 (None: no cap), got {value}")
    for item in log:
        if not isinstance(item, str | Mapping):
            raise FewbenchError(
                f"log: expected logger names or {{'name': NAME, ...}} mappings, got {item!r}"
            )


# -- results -------------------------------------------------------------------------------------
@dataclass
class Results:
    """A run's results as DataFrames: ``cells`` (one row per cell: label, status, metric,
    mean, ci95, iterations, times, engine, and the configuration's main keys), ``episodes``
    (cell_id, label, episode, value) and ``curves`` (cell_id, label, iteration, loss,
    val_metric). The metric is stored as a fraction (accuracy 0.97); reports print percent."""

    cells: Any
    episodes: Any
    curves: Any


def load_results(run_dir: str | Path) -> Results:
    """The data the reports use, from a run directory's ``results.sqlite``, as stored (a
    cell whose settings are not valid JSON gets ``config`` None, with a warning)."""
    import json
    import warnings

    import pandas as pd

    from fewbench.storage.store import ResultsStore, damage_reported

    store = ResultsStore.open_run(Path(run_dir), must_exist=True, readonly=True)
    try:
        with damage_reported(store.path):
            rows, episodes, curves = _stored_rows(store)
    finally:
        store.close()
    for row in rows:
        try:
            row["config"] = json.loads(row["config"])
        except (TypeError, ValueError):
            warnings.warn(
                f"{store.path}: cell {row['label']}: its stored settings are not valid JSON "
                "(config is None)",
                stacklevel=2,
            )
            row["config"] = None
    cells = pd.DataFrame(rows).rename(columns={"id": "cell_id"})
    return Results(
        cells,
        pd.DataFrame(episodes, columns=["cell_id", "label", "episode", "value"]),
        pd.DataFrame(curves, columns=["cell_id", "label", "iteration", "loss", "val_metric"]),
    )


def _stored_rows(store: Any) -> tuple[list[dict], list[tuple], list[tuple]]:
    """Cells, per-episode values and curve points as the store holds them."""
    rows = [dict(row) for row in store.cells()]
    episodes = [
        (row["id"], row["label"], i, v)
        for row in rows
        for i, v in enumerate(store.episode_values(row["id"]))
    ]
    curves = [
        (row["id"], row["label"], point["iteration"], point["loss"], point["val_metric"])
        for row in rows
        for point in store.curve(row["id"])
    ]
    return rows, episodes, curves


# -- running -------------------------------------------------------------------------------------
def run(
    suite: str | Path,
    *,
    set: Mapping[str, Any] | None = None,  # noqa: A002 (the CLI's --set)
    out: str | Path | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    max_iterations: int | None = None,
    max_episodes: int | None = None,
    progress: bool = False,
    log: Sequence[str | Mapping[str, Any]] = (),
) -> Path:
    """``fewbench run`` in this process; returns the run directory. Bad input raises
    :class:`~fewbench.errors.FewbenchError` (the CLI's one-line error); failed cells raise
    it too, after every other cell ran and was stored. ``log`` adds experiment trackers to
    the suite's ``log:`` (``--log``): logger names, or ``{"name": NAME, **its parameters}``."""
    import yaml

    from fewbench.registry import Registry
    from fewbench.running.runner import RunRequest
    from fewbench.running.runner import run as run_suite
    from fewbench.storage.paths import default_data_root, default_run_dir

    _checked_arguments(suite, max_iterations, max_episodes, log)
    sets = tuple(
        f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        for key, value in (set or {}).items()
    )
    if out is None:
        from fewbench.suite.loading import load_suite_file

        name = load_suite_file(Path(suite), list(sets)).data.get("name", "suite")
        out = default_run_dir(str(name))
    request = RunRequest(
        suite=Path(suite),
        data_root=Path(data_root) if data_root else default_data_root(),
        sets=sets,
        out=Path(out),
        device=device,
        max_iterations=max_iterations,
        max_episodes=max_episodes,
        progress=progress,
        log=tuple(item if isinstance(item, str) else dict(item) for item in log),
    )
    code = run_suite(request, Registry())
    if code != 0:
        raise FewbenchError(f"fewbench run {suite}: exit code {code} (see the run's status: {out})")
    return Path(out)


# -- hyperparameter search ----------------------------------------------------------------------
@dataclass
class TuneResult:
    """What ``fewbench.tune`` found: the trial chosen on validation alone, its values (the
    searched paths, as ``--set`` takes them), its validation value (the mean of its cells'
    best validation metric) and its cells' labels; ``trials`` holds every finished trial
    (number, how it ended, values, cells, validation value). The chosen cells' test results
    are in the run directory like any cell's (``load_results(run_dir)``)."""

    run_dir: Path
    study: str
    metric: str
    best_trial: int | None
    best_values: dict[str, Any]
    best_value: float | None
    best_cells: list[str]
    trials: list[dict[str, Any]]


def tune(
    suite: str | Path,
    *,
    trials: int,
    set: Mapping[str, Any] | None = None,  # noqa: A002 (the CLI's --set)
    out: str | Path | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    seed: int | None = None,
    max_iterations: int | None = None,
    max_episodes: int | None = None,
    progress: bool = False,
) -> TuneResult:
    """``fewbench tune`` in this process: Optuna trials of the suite's ``search:`` section,
    each judged on validation only, stored in ``out/tune.sqlite`` so that calling again
    continues up to ``trials`` in total. Needs the ``tune`` extra (Optuna). Bad input, a
    missing Optuna or a search in which no trial completed raise
    :class:`~fewbench.errors.FewbenchError`."""
    import json

    import yaml

    from fewbench.registry import Registry
    from fewbench.running.runner import RunRequest
    from fewbench.running.tuning import META_KEY, TuneRequest, plan, require_optuna
    from fewbench.running.tuning import tune as tune_suite
    from fewbench.storage.paths import default_data_root
    from fewbench.storage.store import ResultsStore
    from fewbench.suite.search import flow

    _checked_arguments(suite, max_iterations, max_episodes)
    require_optuna()
    registry = Registry()
    request = TuneRequest(
        RunRequest(
            suite=Path(suite),
            data_root=Path(data_root) if data_root else default_data_root(),
            sets=tuple(f"{key}={flow(value)}" for key, value in (set or {}).items()),
            out=Path(out) if out is not None else None,
            device=device,
            max_iterations=max_iterations,
            max_episodes=max_episodes,
            progress=progress,
        ),
        trials,
        seed,
    )
    if request.run.out is None:  # the default folder, named after the search
        request = replace(request, run=replace(request.run, out=plan(request, registry).run_dir))
    code = tune_suite(request, registry)
    run_dir = Path(request.run.out)
    store = ResultsStore.open_run(run_dir, must_exist=True, readonly=True)
    try:
        record = json.loads(store.meta(META_KEY) or "{}")
        best = record.get("best")
        labels = {}
        if best:
            marks = ",".join("?" * len(best["cells"]))
            labels = dict(
                store.db.execute(
                    f"SELECT id, label FROM cells WHERE id IN ({marks})", best["cells"]
                ).fetchall()
            )
    finally:
        store.close()
    if code != 0:
        raise FewbenchError(f"fewbench tune {suite}: exit code {code} (see {run_dir})")
    return TuneResult(
        run_dir=run_dir,
        study=record["study"],
        metric=record["metric"],
        best_trial=best["number"] if best else None,
        best_values={
            key: yaml.safe_load(text)
            for key, _, text in (a.partition("=") for a in (best["set"] if best else []))
        },
        best_value=best["value"] if best else None,
        best_cells=[labels.get(cell_id, cell_id) for cell_id in (best["cells"] if best else [])],
        trials=record["trials"],
    )
