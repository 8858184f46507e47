"""fewbench as a library: run a suite, read its results, reuse a trained model.

    import fewbench

    run_dir = fewbench.run("suites/sinusoid.yaml", set={"train.iterations": 200}, out="runs/sin")
    results = fewbench.load_results(run_dir)          # pandas: cells, episodes, curves
    model = fewbench.load_learner(run_dir, "sinusoid/1w10s/mlp/maml/seed0")
    outputs = model.predict(support_x, support_y, query_x)
    images = model.preprocess(["a.png", "b.png"])  # image cells: files as their episodes hold them

A finished cell keeps its best state in ``checkpoints/<cell id>/best.pt``, a self-describing
model file (:data:`MODEL_FORMAT`): the learner's state with the cell's configuration and what
setting the learner up needs (input shape, ways, number of training classes, task type), and
the fewbench and plugin versions it was trained with. ``fewbench export RUN_DIR CELL -o FILE``
copies it out; :func:`load_learner` reads it with or without its run directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fewbench.errors import FewbenchError
from fewbench.models.loading import _model_file, export_model, load_learner  # noqa: F401
from fewbench.models.trained import InputWarning, TrainedModel  # noqa: F401
from fewbench.storage.model_file import MODEL_FORMAT, REBUILT, model_record  # noqa: F401


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
    mean, ci95, iterations, times, engine, the configuration's main keys, and ``protocol``
    and ``cost``, the cell's protocol card and cost record as dicts, None where none was
    stored), ``episodes`` (cell_id, label, episode, value) and ``curves`` (cell_id, label,
    iteration, loss, val_metric). The metric is stored as a fraction (accuracy 0.97);
    reports print percent."""

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
    """Cells (with each finished cell's protocol card and cost record, None where none was
    stored), per-episode values and curve points as the store holds them."""
    rows = [
        {**dict(row), "protocol": store.protocol(row["id"]), "cost": store.cost(row["id"])}
        for row in store.cells()
    ]
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
    quiet: bool = False,
) -> Path:
    """``fewbench run`` in this process; returns the run directory. Bad input raises
    :class:`~fewbench.errors.FewbenchError` (the CLI's one-line error); failed cells raise
    it too, after every other cell ran and was stored. ``log`` adds experiment trackers to
    the suite's ``log:`` (``--log``): logger names, or ``{"name": NAME, **its parameters}``.
    ``quiet`` prints nothing (the command's table and its lines on stderr; read the results
    with :func:`load_results`); a failure's error then quotes the run's last line."""
    import contextlib
    import io

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
    said = io.StringIO()
    with contextlib.redirect_stdout(said) if quiet else contextlib.nullcontext():
        code = run_suite(request, Registry(), log=said if quiet else None)
    if code != 0:
        last = said.getvalue().strip().splitlines()[-1:] if quiet else []
        raise FewbenchError(
            f"fewbench run {suite}: exit code {code} (see the run's status: {out})"
            + (f"; it said: {last[0]}" if last else "")
        )
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
