"""``fewbench tune``: hyperparameter search with Optuna over a suite's ``search:`` section.

A trial is the suite with the trial's values applied by the same machinery as ``--set``
(:mod:`fewbench.suite.search`), run by the runner (:func:`fewbench.running.runner.run`) into one run
directory, so every run option and executor works and every trial's cells are ordinary
cells of that directory (labelled ``maml[trial=N]``). A trial is judged on **validation
only**: the mean, over its cells (several datasets, settings or seeds), of each cell's best
validation metric (``best_val`` in ``results.sqlite``, the value that chose the cell's best
state), maximised for accuracy and minimised for MSE (the task type's direction). Each
cell's fixed test episodes are evaluated by the runner as always, but :func:`validation_of`,
the only reader behind a trial's value, never reads a test result; the chosen trial's test
result is shown only once the choice is made.

Trials live in Optuna's storage in the run directory (``RUN/tune.sqlite``, one study named
after the suite and a digest of it, its search space, seed and caps), so running the same
command again continues up to ``--trials`` trials in total: finished trials (and their
cells) are not run again. A trial stopped part-way (Ctrl-C, a killed process) is marked
failed as interrupted, does not count, and its values are tried again first, its cells
resuming from their checkpoints. The sampler is TPE seeded by ``--seed`` (else
``search.seed``, else 0) and the trial's index, so the same command gives the same trials.

Optuna is an optional extra (``pip install 'fewbench[tune]'``), imported only here and only
when a search runs; reading a tuned run's record (:func:`fewbench.reports.tuning.tuning_section`, used by
``fewbench report``) needs neither Optuna nor torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from fewbench.errors import FewbenchError
from fewbench.reports.tuning import META_KEY, tuning_section
from fewbench.storage.paths import make_run_dir

MISSING_OPTUNA = "fewbench tune needs Optuna, an optional extra: pip install 'fewbench[tune]'"
STORAGE_FILE = "tune.sqlite"  # Optuna's storage, in the run directory
SUITE_FILE = "tune.yaml"  # the suite searched (after --set), to continue from the run directory
LOCK_FILE = "tune.lock"
# A trial ended without a verdict on its values: it does not count, and its values go again.
NOT_COUNTED = ("interrupted", "error")


def require_optuna() -> Any:
    """Optuna, or the one-line error that names the extra."""
    try:
        import optuna
    except ImportError:
        raise FewbenchError(MISSING_OPTUNA) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # fewbench prints each trial itself
    return optuna


@dataclass(frozen=True)
class TuneRequest:
    """``fewbench tune``: the options of each trial's run, and of the search."""

    run: Any  # fewbench.running.runner.RunRequest: suite, --set, --out, executor, caps, ...
    trials: int
    seed: int | None = None  # the sampler's; None: search.seed, else 0


@dataclass(frozen=True)
class TunePlan:
    """A checked search: what the trials run and where they are kept."""

    suite_file: Path
    sets: tuple[str, ...]  # the user's --set, applied to every trial before its own
    source: Any  # fewbench.suite.loading.SuiteSource, after the user's --set
    space: Any  # fewbench.suite.search.SearchSpace
    seed: int
    study_name: str
    run_dir: Path
    task_type: Any  # fewbench.plugin.task_types.TaskType
    cells: list[Any]  # one trial's cells without its values (labels and count)

    @property
    def direction(self) -> str:
        return "maximize" if self.task_type.higher_is_better else "minimize"


def plan(request: TuneRequest, registry: Any) -> TunePlan:
    """Check the suite and its search space; name the study and the run directory."""
    from fewbench.plugin.task_types import task_type_of
    from fewbench.suite.check import check_suite
    from fewbench.suite.grid import expand_grid
    from fewbench.suite.loading import load_suite_file

    given, sets, run_dir = Path(request.run.suite), tuple(request.run.sets), None
    if given.is_dir():  # continue a search from its run directory
        if not (given / SUITE_FILE).is_file():
            raise FewbenchError(
                f"{given}: not a run directory of fewbench tune (no {SUITE_FILE}); give the suite file"
            )
        if request.run.out is not None and request.run.out.resolve() != given.resolve():
            raise FewbenchError(f"--out {request.run.out}: continuing {given} writes into it")
        run_dir, given = given, given / SUITE_FILE
    source = load_suite_file(given, list(sets))
    checked = check_suite(source, registry)
    if checked.search is None:
        raise source.error(
            "search",
            "no search: section; fewbench tune searches the paths it maps to distributions, "
            "like search: {learners.maml.inner_lr: {loguniform: [0.01, 1.0]}}",
        )
    cells = [
        c.capped(request.run.max_iterations, request.run.max_episodes)
        for c in expand_grid(checked).cells
    ]
    learners = sorted({c.labels["learner"] for c in cells})
    if len(learners) > 1:
        raise source.error(
            "learners",
            f"fewbench tune tunes one learner entry; this suite expands to {len(learners)} "
            f"({', '.join(learners)}): keep one",
        )
    if any(c.train.val_episodes < 1 for c in cells):
        raise source.error(
            "train.val_episodes",
            "fewbench tune judges trials on validation episodes only: set at least 1",
        )
    types = {task_type_of(registry.get("dataset", c.dataset.name).cls.task_type) for c in cells}
    if len(types) > 1:
        raise source.error(
            "datasets",
            f"the cells mix metrics ({', '.join(sorted(t.metric for t in types))}); a search "
            "optimises one: tune them separately",
        )
    seed = request.seed if request.seed is not None else checked.search.seed or 0
    digest = hashlib.sha256(
        json.dumps(
            {
                "suite": source.data,
                "seed": seed,
                "caps": [request.run.max_iterations, request.run.max_episodes],
            },
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:12]
    run_dir = run_dir or request.run.out or Path("results") / checked.name / f"tune-{digest}"
    return TunePlan(
        suite_file=given,
        sets=sets,
        source=source,
        space=checked.search,
        seed=seed,
        study_name=f"{checked.name}-{digest}",
        run_dir=Path(run_dir),
        task_type=types.pop(),
        cells=cells,
    )


# -- Optuna ------------------------------------------------------------------------------------
def _distributions(optuna: Any, space: Any) -> dict[str, Any]:
    dists = optuna.distributions
    out = {}
    for d in space.dimensions:
        if d.kind == "choice":
            out[d.path] = dists.CategoricalDistribution(_encoded(d))
        elif d.kind == "int":
            out[d.path] = dists.IntDistribution(int(d.low), int(d.high), step=d.step or 1)
        else:
            out[d.path] = dists.FloatDistribution(
                float(d.low), float(d.high), log=d.kind == "loguniform"
            )
    return out


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _encoded(dimension: Any) -> tuple[Any, ...]:
    """A choice's values as Optuna stores them: themselves, or JSON text for lists and
    mappings (Optuna's categorical values are plain scalars)."""
    if all(_plain(c) for c in dimension.choices):
        return tuple(dimension.choices)
    return tuple(json.dumps(c, sort_keys=True) for c in dimension.choices)


def _decoded(dimension: Any, value: Any) -> Any:
    if dimension.kind == "choice" and not all(_plain(c) for c in dimension.choices):
        return json.loads(value)
    return value


def _sampler_seed(seed: int, index: int) -> int:
    """The TPE sampler's seed for the search's ``index``-th counted trial: fixed by the
    search's seed and the index, so continuing a search draws what one run would have."""
    return int(hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()[:8], 16)


def open_study(optuna: Any, plan: TunePlan) -> Any:
    """The search's study in ``RUN/tune.sqlite``, created or continued; a study of another
    suite, space, seed or cap in the same directory is refused."""
    path = (plan.run_dir / STORAGE_FILE).resolve()
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # a damaged or foreign file: SQLAlchemy's many errors
        raise FewbenchError(f"{path}: cannot be read as Optuna's storage ({exc})") from None
    others = [name for name in names if name != plan.study_name]
    if others:
        raise FewbenchError(
            f"{plan.run_dir} holds the search {others[0]} (another suite, search space, seed or "
            f"cap than {plan.study_name}); give another --out"
        )
    return optuna.create_study(
        storage=storage,
        study_name=plan.study_name,
        direction=plan.direction,
        load_if_exists=True,
    )


def _ended(trial: Any) -> str:
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        return "complete"
    if trial.state == TrialState.FAIL:
        return str(trial.user_attrs.get("ended", "failed"))
    return trial.state.name.lower()


def counted(study: Any) -> list[Any]:
    """The trials that count towards ``--trials``: complete, or failed by their cells (a
    diverging loss is a verdict on the values); not those interrupted or stopped by an error."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if _ended(t) == "complete" or (t.state.is_finished() and _ended(t) not in NOT_COUNTED)
    ]


def fail_orphans(study: Any) -> list[int]:
    """Trials left running by a process that is gone (the lock says no other runs here):
    failed as interrupted, and their values queued to go first, so their cells resume."""
    import optuna
    from optuna.trial import TrialState

    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in orphans:
        stop_trial(study, optuna.trial.Trial(study, trial._trial_id), "interrupted")
    return [t.number for t in orphans]


def first_attempt(trial: Any) -> int:
    """The number of the trial that first tried these values (a retry's cells keep its label)."""
    return int(trial.user_attrs.get("retry_of", trial.number))


def stop_trial(study: Any, trial: Any, why: str) -> None:
    """End a running trial (an ``optuna.trial.Trial``) without a verdict; its values go
    again first next time, and its cells resume from their checkpoints."""
    from optuna.trial import TrialState

    params, retry_of = trial.params, first_attempt(trial)
    trial.set_user_attr("ended", why)
    study.tell(trial, state=TrialState.FAIL)
    study.enqueue_trial(params, user_attrs={"retry_of": retry_of})


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """One ``fewbench tune`` per run directory at a time (its trials share the directory's
    current cells); the lock goes with the process, however it ends."""
    make_run_dir(run_dir)
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    lock = run_dir / LOCK_FILE
    try:
        handle = open(lock, "a+")  # noqa: SIM115 - closed by the with below
    except OSError as exc:  # a folder or a file we may not write: one line, not a traceback
        raise FewbenchError(
            f"{lock}: cannot be opened as tune's lock file ({exc.strerror or exc}); "
            "remove or fix it (it holds nothing: fewbench tune makes it again)"
        ) from None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FewbenchError(
                f"{run_dir}: another fewbench tune is searching here; wait for it (one search "
                "per run directory: its trials run through the executor, in parallel there)"
            ) from None
        yield


# -- judging a trial: validation only ----------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    value: float | None  # the mean best validation metric, when every cell is done
    per_cell: dict[str, float | None]  # label -> best_val
    failed: list[str]  # "label: reason"
    unfinished: list[str]  # labels of cells neither done nor failed


def validation_of(run_dir: Path, cell_ids: list[str]) -> Verdict:
    """A trial's value from its cells' stored best validation metric (``best_val``): the
    mean over the cells. Reads the cells' status, error and best_val and nothing else: not
    ``mean``, ``ci95`` or the ``episodes`` table, which hold the test results."""
    from fewbench.storage.store import ResultsStore

    store = ResultsStore.open_run(run_dir, must_exist=True, readonly=True)
    try:
        marks = ",".join("?" * len(cell_ids))
        rows = {
            row["id"]: row
            for row in store.db.execute(
                f"SELECT id, label, status, error, best_val FROM cells WHERE id IN ({marks})",
                cell_ids,
            )
        }
    finally:
        store.close()
    failed, unfinished, per_cell = [], [], {}
    for cell_id in cell_ids:
        row = rows.get(cell_id)
        if row is None or row["status"] not in ("done", "failed"):
            unfinished.append(row["label"] if row else cell_id)
        elif row["status"] == "failed":
            reason = (row["error"] or "no reason stored").splitlines() or [""]
            failed.append(f"{row['label']}: {reason[0]}")  # the traceback stays in the store
        elif row["best_val"] is None:
            failed.append(f"{row['label']}: no validation value (train.val_episodes is 0)")
        else:
            per_cell[row["label"]] = row["best_val"]
    value = None
    if not failed and not unfinished and per_cell:
        value = sum(per_cell.values()) / len(per_cell)
    return Verdict(value, per_cell, failed, unfinished)


# -- the record reports read -------------------------------------------------------------------
def record_of(plan: TunePlan, study: Any, wanted: int) -> dict[str, Any]:
    """The search as ``results.sqlite`` keeps it (meta ``tune``), for reports: every finished
    trial with its values and cells, and the best complete one by its validation value."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        trials.append(
            {
                "number": t.number,
                "retry_of": t.user_attrs.get("retry_of"),
                "ended": _ended(t),
                "set": t.user_attrs.get("set", []),
                "shown": t.user_attrs.get("shown", []),
                "cells": t.user_attrs.get("cells", []),
                "value": t.value,
            }
        )
    complete = [t for t in trials if t["ended"] == "complete"]
    best = None
    if complete:  # Optuna's best trial: the first of equal values
        pick = max if plan.task_type.higher_is_better else min
        best = pick(complete, key=lambda t: t["value"])
    return {
        "study": plan.study_name,
        "storage": STORAGE_FILE,
        "suite": str(plan.suite_file),
        "user_sets": list(plan.sets),
        "metric": plan.task_type.metric,
        "direction": plan.direction,
        "seed": plan.seed,
        "space": plan.space.describe(),
        "wanted": wanted,
        "counted": len(counted(study)),
        "trials": trials,
        "best": best,
    }


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Keep ``record`` in the run's store (none yet when the first trial stopped before its
    run directory was written: then nothing to keep)."""
    from fewbench.storage.store import DB_NAME, ResultsStore

    if not (run_dir / DB_NAME).is_file():
        return
    store = ResultsStore.open_run(run_dir, must_exist=True)
    try:
        store.set_meta(META_KEY, record)
    finally:
        store.close()


# -- the command -------------------------------------------------------------------------------
def tune(
    request: TuneRequest, registry: Any, log: TextIO | None = None, out: TextIO | None = None
) -> int:
    """``fewbench tune``; returns the exit code (0; 1 when no trial completed; 130 when
    interrupted). Bad input raises :class:`FewbenchError` before anything trains."""
    log, out = log or sys.stderr, out or sys.stdout
    optuna = require_optuna()
    if request.trials < 1:
        raise FewbenchError(f"--trials {request.trials}: must be at least 1")
    if request.run.retry_failed:
        raise FewbenchError(
            "--retry-failed: not a tune option (a trial whose cells failed is a failed trial)"
        )
    checked = plan(request, registry)
    if request.run.dry_run:
        print_plan(checked)
        return 0
    with locked(checked.run_dir):
        if checked.suite_file != checked.run_dir / SUITE_FILE:
            import yaml

            from fewbench.storage.atomic import write_text_atomically

            write_text_atomically(
                checked.run_dir / SUITE_FILE, yaml.safe_dump(checked.source.data, sort_keys=False)
            )
        study = open_study(optuna, checked)
        retried = fail_orphans(study)
        task = checked.task_type
        print(
            f"fewbench tune: study {checked.study_name} in {checked.run_dir / STORAGE_FILE}: "
            f"{len(counted(study))} of {request.trials} trials done. Each trial is judged on "
            f"validation only (the mean best validation {task.noun} of its "
            f"{len(checked.cells)} cell(s), {task.direction} wins), never on the test episodes"
            + (
                f"; interrupted trial(s) {', '.join(map(str, retried))} go again" if retried else ""
            ),
            file=log,
            flush=True,
        )
        while len(counted(study)) < request.trials:
            code = run_trial(optuna, study, checked, request, registry, log, out)
            if code is not None:
                return code
        record = record_of(checked, study, request.trials)
        write_record(checked.run_dir, record)
    print(tuning_section(checked.run_dir), end="", file=out)
    best = record["best"]
    if best is None:
        print("fewbench tune: no trial completed", file=log)
        return 1
    rerun = ["fewbench", "run", str(checked.suite_file)]
    for assignment in (*checked.sets, *best["set"]):
        rerun += ["--set", assignment]
    print(f"To train the chosen values again (more seeds, say): {shlex.join(rerun)}", file=out)
    return 0


def run_trial(
    optuna: Any,
    study: Any,
    checked: TunePlan,
    request: TuneRequest,
    registry: Any,
    log: TextIO,
    out: TextIO,
) -> int | None:
    """Ask for one trial, run its cells through the runner and tell its validation value;
    an exit code when the search must stop (interrupted), else None."""
    from fewbench.running import runner
    from fewbench.storage.journal import collect

    index = len(counted(study))
    study.sampler = optuna.samplers.TPESampler(seed=_sampler_seed(checked.seed, index))
    trial = study.ask(_distributions(optuna, checked.space))
    dimensions = checked.space.dimensions
    values = {d.path: _decoded(d, trial.params[d.path]) for d in dimensions}
    assignments = [d.assignment(values[d.path]) for d in dimensions]
    shown = ", ".join(d.shown(values[d.path]) for d in dimensions)
    trial.set_user_attr("set", assignments)
    trial.set_user_attr("shown", shown)
    trial_request = replace(
        request.run,
        suite=checked.suite_file,
        sets=(*checked.sets, *assignments),
        out=checked.run_dir,
        tune_trial=first_attempt(trial),  # the label's number: a retry keeps its cells' label
        dry_run=False,
    )
    retry = trial.user_attrs.get("retry_of")
    again = f", trying interrupted trial {retry}'s values again" if retry is not None else ""
    try:
        cells = runner.load(trial_request, registry, log)[0].cells
        trial.set_user_attr("cells", [c.id for c in cells])
        print(
            f"fewbench tune: trial {trial.number} ({index + 1} of {request.trials}{again}): {shown}",
            file=log,
            flush=True,
        )
        code = runner.run(trial_request, registry, log)
        if code in (runner.EXIT_INTERRUPTED, runner.EXIT_TERMINATED):  # Ctrl-C, SIGTERM
            stop_trial(study, trial, "interrupted")
            write_record(checked.run_dir, record_of(checked, study, request.trials))
            print(
                f"fewbench tune: trial {trial.number} interrupted; its values go first when the "
                f"same command runs again (or: fewbench tune {checked.run_dir} --trials "
                f"{request.trials})",
                file=log,
            )
            return code  # 130 or 143, as the signal that stopped it
        collect(checked.run_dir)  # what cluster workers finished and the driver has not copied
        verdict = validation_of(checked.run_dir, [c.id for c in cells])
        if verdict.unfinished:
            raise FewbenchError(
                f"trial {trial.number}: {len(verdict.unfinished)} cell(s) unfinished when the "
                f"executor returned ({verdict.unfinished[0]}); fewbench tune needs each trial's "
                "results before the next (with --executor slurm, add --wait): run the same "
                "command again once they are done"
            )
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the first problem is the one to report
            stop_trial(study, trial, "error" if isinstance(exc, Exception) else "interrupted")
            write_record(checked.run_dir, record_of(checked, study, request.trials))
        raise
    trial.set_user_attr("validation", verdict.per_cell)
    if verdict.failed:
        trial.set_user_attr("ended", f"failed: {verdict.failed[0]}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        result = f"failed ({verdict.failed[0]})"
    else:
        study.tell(trial, verdict.value)
        result = f"validation {checked.task_type.noun} {checked.task_type.format(verdict.value)}"
    record = record_of(checked, study, request.trials)
    write_record(checked.run_dir, record)
    best = record["best"]
    lead = f" (best so far: trial {best['number']})" if best else ""
    print(f"trial {trial.number}: {shown}: {result}{lead}", file=out, flush=True)
    return None


def print_plan(checked: TunePlan) -> None:
    """``fewbench tune --dry-run``: the search space and one trial's cells; nothing runs."""
    space = checked.space
    print(f"search space ({len(space.dimensions)} parameters, TPE seed {checked.seed}):")
    for line in space.describe():
        print(f"  {line}")
    print(
        f"each trial: {len(checked.cells)} cell(s), judged on the mean best validation "
        f"{checked.task_type.noun} ({checked.task_type.direction} wins), never on test episodes:"
    )
    for cell in checked.cells:
        print(f"  {cell.label}")
    state = "continues" if (checked.run_dir / STORAGE_FILE).is_file() else "starts"
    print(f"study {checked.study_name} {state} in {checked.run_dir / STORAGE_FILE}")
