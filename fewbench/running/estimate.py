"""How long a run will take, measured before it starts (``fewbench run``, ``--dry-run``).

A suite's cost is not visible in it: Finn et al.'s Omniglot protocol is 4 minutes on an
H200 and about 15 hours on two CPU cores. So before a run whose cells add up to more than a
few hundred steps, each *kind* of cell (everything that decides the cost of one step or
one episode: dataset, backbone, learner and their parameters, task sizes, evaluation
queries and chunk, augmentation, device, threads) is set up once on the device at hand
and timed: for each kind of batch the learner uses (``batch_kind_at``: pretraining on
examples, then episodes), one untimed step, then steps for half a second to two seconds
(at least :data:`PROBE_STEPS`, fewer when each is slow), taking their median; then
:data:`PROBE_EPISODES` validation episodes. A cell's estimate is then

    sum over batch kinds (steps of that kind x seconds per step)
    + (validations x val_episodes + eval.episodes) x seconds per episode
    + the set-up the probe measured (building the learner; the dataset's first load too),

its steps as the run will take them (the learner's own count, any ``--max-iterations``).
The timings are kept in the cache folder (``estimates.json``), keyed by the kind of cell,
the device and the fewbench and PyTorch versions, so a second ``--dry-run`` costs nothing.

What it does not see: CUDA graphs (a graphed MAML step is about ten times faster than the
eager step timed here, so a GPU estimate errs long), data-loading stalls, and other work
on the machine. Cells are summed one after another (``--workers`` run several at once,
each with fewer threads).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewbench.errors import FewbenchError
from fewbench.reports.wording import counted
from fewbench.running.durations import in_words
from fewbench.storage.atomic import write_json_atomically
from fewbench.suite.cell import Cell
from fewbench.version import __version__

PROBE_STEPS = 4  # timed training steps per kind of batch (after one untimed), at least ...
PROBE_MIN_SECONDS = 0.5  # ... and for at least this long, up to PROBE_MAX_STEPS ...
PROBE_MAX_STEPS = 200
PROBE_SECONDS = 2.0  # ... or fewer, once they have taken this long
PROBE_EPISODES = 4  # timed validation episodes
SHORT_RUN_STEPS = 300  # a run of fewer steps in all (and few episodes) is not estimated
SHORT_RUN_EPISODES = 3000
LONG_ON_CPU_SECONDS = 2 * 3600  # past this on a CPU, say how to make the run shorter
CACHE_FILE = "estimates.json"
MAX_KEPT = 500  # kinds of cell remembered


@dataclass(frozen=True)
class Timing:
    """What one kind of cell costs on one device."""

    step_seconds: dict[str, float]  # batch kind -> seconds per training step
    episode_seconds: float  # per validation or test episode
    setup_seconds: float  # building the learner (and, the first time, loading the data)
    # Once per validation and per test, whatever their episodes (a statistic over the
    # training split computed before predicting).
    evaluation_seconds: float = 0.0


@dataclass(frozen=True)
class Estimate:
    seconds: dict[str, float]  # cell id -> estimated seconds; cells not timed are absent
    untimed: dict[str, str]  # cell id -> why it could not be timed
    kinds: int  # kinds of cell timed (or found in the cache)
    probe_seconds: float  # spent timing now (0 when every kind was in the cache)
    device: str
    threads: int

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def kind_key(cell: Cell, device: torch.device, threads: int) -> str:
    """What decides one step's and one episode's cost, as a digest (seeds, iteration counts
    and episode counts are left out: they decide how many, not how long)."""
    config = cell.config
    tasks, train, evaluation = config["tasks"], config["train"], config["eval"]
    parts = {
        "dataset": config["dataset"],
        "backbone": config["backbone"],
        "learner": config["learner"],
        "tasks": tasks,
        "augment": train.get("augment"),
        "eval": {k: evaluation.get(k) for k in ("query", "chunk", "dataset")},
        "device": str(device),
        "threads": threads,
        "versions": [__version__, torch.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def steps_by_kind(cell: Cell, registry: Any) -> Counter[str]:
    """How many training steps of each batch kind the cell will take (its learner's own
    count, capped as the run caps it)."""
    learner = registry.get("learner", cell.learner.name).build(**cell.learner.params)
    total = learner.iterations(cell.train.iterations)
    if cell.train.max_iterations is not None:
        total = min(total, cell.train.max_iterations)
    return Counter(learner.batch_kind_at(i) for i in range(1, total + 1))


def validations(cell: Cell, steps: int) -> int:
    every = cell.train.validate_every
    return steps // every + (1 if steps % every else 0) if steps else 0


def is_short(cells: list[Cell], counts: dict[str, Counter[str]]) -> bool:
    """A run too short to be worth timing first (a smoke run, a test); ``counts``: each
    cell's :func:`steps_by_kind`, by id."""
    steps = episodes = 0
    for cell in cells:
        own = sum(counts[cell.id].values())
        steps += own
        episodes += cell.eval.episodes + validations(cell, own) * cell.train.val_episodes
        if steps >= SHORT_RUN_STEPS or episodes >= SHORT_RUN_EPISODES:
            return False
    return True


def probe(cell: Cell, runner: Any) -> Timing:
    """Set the cell up on the runner's device and time a few steps and episodes."""
    from fewbench.running.evaluation import EpisodeSpec, evaluate
    from fewbench.running.training import TrainingLoop

    started = time.perf_counter()
    setup = runner.set_up(cell)
    setup_seconds = time.perf_counter() - started
    loop = TrainingLoop(
        setup.learner, setup.sources, cell, identity=setup.identity, device=runner.device,
        checkpoint_dir=None, task_type=setup.task_type, progress=False,
    )  # fmt: skip
    first: dict[str, int] = {}
    for iteration in range(1, loop.total + 1):
        first.setdefault(setup.learner.batch_kind_at(iteration), iteration)
    step_seconds = {}
    first_step = min(first.values(), default=0)
    for kind, start in first.items():
        step_seconds[kind] = _seconds_per_step(loop, start, runner.device)
    episodes = max(1, min(PROBE_EPISODES, cell.eval.chunk))

    def evaluation() -> float:
        began = time.perf_counter()
        evaluate(
            setup.learner, setup.sources["val"], EpisodeSpec.of(cell, setup.identity, "val"),
            episodes=episodes, chunk=cell.eval.chunk, device=runner.device,
            task_type=setup.task_type,
        )  # fmt: skip
        _synchronize(runner.device)
        return time.perf_counter() - began

    fixed = evaluation()  # first calls' costs, and any once-per-evaluation cost
    again = evaluation()  # episodes alone
    if first_step:  # a cell that trains: one more step, then what an evaluation costs after one
        loop.step(first_step, None)
        _synchronize(runner.device)
        fixed = evaluation()
    return Timing(step_seconds, again / episodes, setup_seconds, max(0.0, fixed - again))


def _seconds_per_step(loop: Any, start: int, device: torch.device) -> float:
    """The median time of a training step from iteration ``start`` on: one untimed step,
    then at least :data:`PROBE_STEPS` for at least :data:`PROBE_MIN_SECONDS` (a step of a
    millisecond needs many), at most :data:`PROBE_SECONDS`. The median, not the mean: on
    a busy machine a step now and then waits for a core."""
    loop.step(start, None)  # untimed: first-call costs (allocation, compilation)
    _synchronize(device)
    durations: list[float] = []
    began = time.perf_counter()
    iteration = start + 1
    while iteration <= loop.total and len(durations) < PROBE_MAX_STEPS:
        before = time.perf_counter()
        float(loop.step(iteration, None))  # read back: the device has finished
        _synchronize(device)
        durations.append(time.perf_counter() - before)
        spent = time.perf_counter() - began
        if spent > PROBE_SECONDS or (len(durations) >= PROBE_STEPS and spent > PROBE_MIN_SECONDS):
            break
        iteration += 1
    if not durations:  # a one-step cell: its only step, timed again
        before = time.perf_counter()
        float(loop.step(start, None))
        _synchronize(device)
        durations.append(time.perf_counter() - before)
    return statistics.median(durations)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cell_seconds(cell: Cell, timing: Timing, counts: Counter[str]) -> float:
    steps = sum(counts.values())
    training = sum(n * timing.step_seconds.get(kind, 0.0) for kind, n in counts.items())
    evaluations = validations(cell, steps) + 1
    episodes = validations(cell, steps) * cell.train.val_episodes + cell.eval.episodes
    return (
        timing.setup_seconds
        + training
        + episodes * timing.episode_seconds
        + evaluations * timing.evaluation_seconds
    )


# -- the cache ---------------------------------------------------------------------------------


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _timing_of(record: Any) -> Timing | None:
    try:
        steps = {str(k): float(v) for k, v in record["step_seconds"].items()}
        # A timing cached before the fixed cost of an evaluation was kept apart counted it in
        # every episode (42 minutes estimated for a 9-minute SimpleShot cell): probed again.
        return Timing(
            steps,
            float(record["episode_seconds"]),
            float(record["setup_seconds"]),
            float(record["evaluation_seconds"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _write_cache(path: Path, cached: dict[str, Any]) -> None:
    kept = dict(list(cached.items())[-MAX_KEPT:])
    with contextlib.suppress(OSError):  # it only saves time: an unwritable cache costs a probe
        write_json_atomically(path, kept, indent=1)


# -- the whole run -----------------------------------------------------------------------------


def estimate(
    cells: list[Cell],
    registry: Any,
    runner: Any,
    cache_dir: Path,
    counts: dict[str, Counter[str]] | None = None,
) -> Estimate:
    """Time each kind of cell (or read its timing from the cache) and add the cells up;
    ``counts``: each cell's :func:`steps_by_kind` by id, when the caller has them."""
    if counts is None:
        counts = {cell.id: steps_by_kind(cell, registry) for cell in cells}
    threads = torch.get_num_threads()
    path = Path(cache_dir) / CACHE_FILE
    cached = _read_cache(path)
    timings: dict[str, Timing | str] = {}
    seconds, untimed = {}, {}
    spent = 0.0
    for cell in cells:
        key = kind_key(cell, runner.device, threads)
        if key not in timings:
            found = _timing_of(cached.get(key))
            if found is None:
                began = time.perf_counter()
                try:
                    found = probe(cell, runner)
                except FewbenchError as exc:  # data not installed, a setting refused
                    found = str(exc)
                except Exception as exc:  # noqa: BLE001 - a plugin's failure shows in the run
                    found = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                spent += time.perf_counter() - began
                if isinstance(found, Timing):
                    cached[key] = {**found.__dict__, "cell": cell.label, "at": time.time()}
            timings[key] = found
        timing = timings[key]
        if isinstance(timing, Timing):
            seconds[cell.id] = cell_seconds(cell, timing, counts[cell.id])
        else:
            untimed[cell.id] = timing
    if spent:
        _write_cache(path, cached)
    return Estimate(seconds, untimed, len(timings), spent, str(runner.device), threads)


def counterpart(suite_file: Path | None) -> Path | None:
    """The suite's CPU counterpart (``NAME-cpu.yaml`` beside ``NAME.yaml``), if shipped."""
    if suite_file is None or suite_file.stem.endswith("-cpu"):
        return None
    candidate = suite_file.with_name(f"{suite_file.stem}-cpu{suite_file.suffix}")
    return candidate if candidate.is_file() else None


def describe(result: Estimate, cells: int, suite_file: Path | None) -> list[str]:
    """The lines printed before the run (and in ``--dry-run``)."""
    if not result.seconds:
        reason = next(iter(result.untimed.values()), "nothing to time")
        return [f"fewbench: no time estimate ({reason})"]
    timed = len(result.seconds)
    where = f"{result.device}, {result.threads} thread{'s' * (result.threads != 1)}"
    how = (
        f"timed up to {PROBE_STEPS} steps and {PROBE_EPISODES} episodes of each of {result.kinds} "
        f"kind{'s' * (result.kinds != 1)} of cell in {result.probe_seconds:.0f} s"
        if result.probe_seconds
        else "timings from an earlier probe on this device"
    )
    lines = [
        f"fewbench: estimated {in_words(result.total)} for "
        + (f"{timed} of {counted(cells, 'cell')}" if timed != cells else counted(cells, "cell"))
        + f", one after another, on {where} ({how})"
    ]
    if result.untimed:
        first = next(iter(result.untimed.values()))
        lines.append(f"fewbench: {counted(len(result.untimed), 'cell')} not timed ({first})")
    if result.device == "cpu" and result.total > LONG_ON_CPU_SECONDS:
        hint = counterpart(suite_file)
        shorter = f"{hint} is this suite's CPU counterpart; " if hint else ""
        lines.append(
            f"warning: about {in_words(result.total)} on this CPU; {shorter}a GPU runs it "
            "far sooner, and --max-iterations N makes a short smoke run of the same grid"
        )
    return lines


def environment_disabled() -> bool:
    return os.environ.get("FEWBENCH_NO_ESTIMATE", "") not in ("", "0")
