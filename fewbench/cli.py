"""The ``fewbench`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import platformdirs
import yaml

from fewbench import __version__
from fewbench.compare import FORMATS as COMPARE_FORMATS
from fewbench.compare import compare_to_baseline, render_comparison
from fewbench.errors import FewbenchError
from fewbench.grid import expand
from fewbench.params import check_value
from fewbench.registry import KINDS, Registry
from fewbench.report import DEFAULT_COLS, DEFAULT_ROWS, FORMATS, Options, render
from fewbench.results import load_runs
from fewbench.significance import CORRECTIONS, TESTS
from fewbench.suite import load_suite_file

EXIT_FAILED_CELLS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def default_data_root() -> Path:
    return Path(os.environ.get("FEWBENCH_DATA") or platformdirs.user_data_dir("fewbench"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEWBENCH_CACHE") or platformdirs.user_cache_dir("fewbench"))


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a suite key (dotted path, YAML value), e.g. train.iterations=200",
    )
    parser.add_argument(
        "--out", type=Path, help="run directory (default results/<suite name>/<run id>)"
    )
    parser.add_argument(
        "--data-root", type=Path, help="data root (default $FEWBENCH_DATA or the user data folder)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="cache for decoded datasets (default $FEWBENCH_CACHE)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the expanded grid and train nothing"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    executors = parser.add_argument_group(
        "executors", "where the cells run; these override the suite's execution: section"
    )
    executors.add_argument(
        "--executor", help="local (default), ray, slurm or a plugin's (see fewbench plugins)"
    )
    executors.add_argument("--workers", type=int, help="local: worker processes (default 1)")
    executors.add_argument(
        "--gpus", help="local: comma-separated GPU indices, one worker per GPU (e.g. 0,1,2,3)"
    )
    executors.add_argument("--cells-per-gpu", type=int, help="local: workers sharing each GPU")
    executors.add_argument("--address", help="ray: cluster address (default: start Ray here)")
    executors.add_argument(
        "--gpus-per-cell", type=float, help="ray, slurm: GPUs per cell (ray: may be 0.25)"
    )
    executors.add_argument("--cpus-per-cell", type=float, help="ray, slurm: CPUs per cell")
    executors.add_argument("--max-retries", type=int, help="ray: retries of a lost cell")
    executors.add_argument("--partition", help="slurm: partition")
    executors.add_argument("--account", help="slurm: account")
    executors.add_argument("--time-min", type=int, help="slurm: time limit per cell, minutes")
    executors.add_argument("--mem-gb", type=float, help="slurm: memory per cell, GB")
    executors.add_argument("--array-parallelism", type=int, help="slurm: array tasks at once")
    executors.add_argument(
        "--wait",
        action="store_true",
        default=None,
        help="slurm: stay until every cell ends (default: submit and exit)",
    )
    executors.add_argument(
        "--executor-set",
        dest="executor_sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any executor parameter (YAML value), e.g. sbatch_args={constraint: a100}",
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads of this process (default: all cores)"
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="stop with instructions instead of downloading a missing dataset",
    )
    parser.add_argument(
        "--retry-failed", action="store_true", help="run failed cells of the run directory again"
    )
    parser.add_argument(
        "--worker", help="this worker's name in the results store (default host:pid)"
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="claim a running cell whose worker has not beaten for this long (default 120)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewbench", description="Benchmark few-shot learners on fixed episodes."
    )
    parser.add_argument("--version", action="version", version=f"fewbench {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train and evaluate every cell of a suite")
    run.add_argument("suite", help="suite YAML file, or a run directory to resume")
    add_run_options(run)
    resume = commands.add_parser(
        "resume", help="continue a run directory (the same as: run RUN_DIR)"
    )
    resume.add_argument("suite", metavar="run_dir", help="run directory")
    add_run_options(resume)

    report = commands.add_parser(
        "report", help="the comparison table of one or more run directories"
    )
    report.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument("--format", choices=FORMATS, default="table")
    report.add_argument("--out", type=Path, help="write to this file (default: standard output)")
    report.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help="row dimensions (default learner,backbone)"
    )
    report.add_argument(
        "--cols",
        default=",".join(DEFAULT_COLS),
        help="column dimensions (default dataset,ways,shots)",
    )
    report.add_argument("--decimals", type=int, default=2)
    report.add_argument(
        "--test", choices=tuple(TESTS), default="t", help="paired test: t or wilcoxon (default t)"
    )
    report.add_argument(
        "--correction", choices=tuple(CORRECTIONS), default="holm", help="default holm"
    )
    report.add_argument("--alpha", type=float, default=0.05, help="significance level (0.05)")
    report.add_argument(
        "--with-reference", action="store_true", help="add the published numbers beside"
    )

    compare = commands.add_parser(
        "compare", help="every learner minus a baseline, paired by test episode"
    )
    compare.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    compare.add_argument("--baseline", required=True, help="the baseline learner's label")
    compare.add_argument("--format", choices=COMPARE_FORMATS, default="table")
    compare.add_argument("--decimals", type=int, default=2)
    compare.add_argument("--out", type=Path, help="write to this file (default: standard output)")

    plot = commands.add_parser("plot", help="figures (PNG and PDF) from run directories")
    plot.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", type=Path, required=True, help="folder for the figures")

    status = commands.add_parser("status", help="every cell of a run directory and where it stands")
    status.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    collect = commands.add_parser(
        "collect",
        help="copy cells finished by cluster workers (ray, slurm) into the results store",
    )
    collect.add_argument("run_dir", type=Path, metavar="RUN_DIR")

    data = commands.add_parser("data", help="datasets under the data root: list, download, import")
    data.add_argument(
        "--data-root", type=Path, help="data root (default $FEWBENCH_DATA or the user data folder)"
    )
    actions = data.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every dataset with its status, path and size")
    get = actions.add_parser("download", help="fetch, check and install a dataset")
    get.add_argument("name")
    get.add_argument("--no-progress", action="store_true")
    bring = actions.add_parser(
        "import", help="install from the official files or an unpacked folder (offline)"
    )
    bring.add_argument("name")
    bring.add_argument("path", type=Path)
    for action in (listing, get, bring):  # --data-root after the action works too
        action.add_argument("--data-root", type=Path, default=argparse.SUPPRESS)

    commands.add_parser(
        "plugins", help="list datasets, backbones and learners with their providers"
    )
    return parser


def human_size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def cmd_data(args: argparse.Namespace, registry: Registry) -> int:
    from fewbench import datastore

    root = args.data_root or default_data_root()
    if args.action == "list":
        print(f"data root: {root}")
        for item in registry.items("dataset"):
            st = datastore.status(item.cls, root)
            where = "(generated from the seed, no files)" if st.path is None else str(st.path)
            size = human_size(st.bytes) if st.bytes else "-"
            print(f"  {item.name:<14} {st.state:<9} {size:>9}  {where}")
            for problem in st.problems[:3]:
                print(f"      problem: {problem}")
            if st.state == "missing" or st.problems:
                hint = (
                    f"fewbench data download {item.name}"
                    if st.downloadable
                    else item.cls.how_to_get or "see the plugin's documentation"
                )
                print(f"      get it: {hint}")
        return 0
    dataset = registry.get("dataset", args.name).cls
    if not dataset.needs_files:
        print(f"{args.name} generates its tasks from the seed: nothing to install")
        return 0
    if args.action == "download":
        path = datastore.download(dataset, root, progress=not args.no_progress)
    else:
        path = datastore.import_path(dataset, root, args.path)
    print(f"{args.name}: installed and verified in {path}")
    return 0


def ensure_data(names: set[str], registry: Registry, root: Path, progress: bool) -> None:
    """Download a suite's missing datasets that can be downloaded, before anything trains."""
    from fewbench import datastore

    for name in sorted(names):
        dataset = registry.get("dataset", name).cls
        st = datastore.status(dataset, root, verify=False)
        if st.state == "missing" and st.downloadable:
            print(f"fewbench: {name} is not under {root}; downloading it", file=sys.stderr)
            try:
                datastore.download(dataset, root, progress=progress)
            except FewbenchError as exc:
                raise FewbenchError(
                    f"{name} is missing under {root} and could not be downloaded: {exc}; "
                    f"on a machine without internet: fewbench data import {name} PATH"
                ) from None


def write_output(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"fewbench: wrote {out}", file=sys.stderr)


def cmd_reports(args: argparse.Namespace) -> int:
    """report, compare and plot: read the results stores, never run anything."""
    if args.command == "report":
        options = Options(
            rows=tuple(d for d in args.rows.split(",") if d),
            cols=tuple(d for d in args.cols.split(",") if d),
            decimals=args.decimals,
            test=args.test,
            correction=args.correction,
            alpha=args.alpha,
            with_reference=args.with_reference,
        )
        write_output(render(args.run_dirs, args.format, options), args.out)
        return 0
    results = load_runs(args.run_dirs)
    if args.command == "compare":
        records = compare_to_baseline(results, args.baseline)
        write_output(render_comparison(records, args.format, args.decimals), args.out)
        return 0
    from fewbench.plots import plot_all

    paths = plot_all(results, args.out)
    for path in paths:
        print(path)
    if not paths:
        print("fewbench: nothing to plot yet (no curves or finished cells)", file=sys.stderr)
    return 0


def cmd_plugins(registry: Registry) -> int:
    for kind in KINDS:
        print(f"{kind}s:")
        for item in registry.items(kind):
            print(f"  {item.name:<12} {item.description}  [{item.provider}]")
            for name, param in item.params.params.items():
                print(
                    f"      {name} = {param.describe()}"
                    + (f"  # {param.help}" if param.help else "")
                )
    return 0


def cmd_run(args: argparse.Namespace, registry: Registry) -> int:
    from fewbench.runner import resolve_device, run_suite, suite_text_of

    data_root = args.data_root or default_data_root()
    suite_path = Path(args.suite)
    if suite_path.is_dir():  # a run directory: resume it with the suite it was run with
        if not (suite_path / "suite.yaml").is_file():
            raise FewbenchError(
                f"{suite_path}: a directory without suite.yaml is not a fewbench run directory"
            )
        if args.out is not None and args.out.resolve() != suite_path.resolve():
            raise FewbenchError(
                f"--out {args.out}: resuming {suite_path} writes into that directory"
            )
        args.out, suite_path = suite_path, suite_path / "suite.yaml"
    source = load_suite_file(suite_path, args.sets)
    if not args.dry_run and not args.no_download:
        # The whole suite is checked first, so a typo is reported before any download.
        checked = expand(source, registry, data_root, require_data=False)
        names = {cell.config["dataset"]["name"] for cell in checked.cells}
        ensure_data(names, registry, data_root, progress=not args.no_progress)
    suite = expand(source, registry, data_root, require_data=not args.dry_run)
    for warning in suite.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        for cell in suite.cells:
            print(f"{cell.id}  {cell.label}")
        print(f"{len(suite.cells)} cells")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    run_dir = args.out or Path("results") / suite.name / time.strftime("%Y%m%d-%H%M%S")
    executor = build_executor(args, registry, suite.execution, run_dir)
    ranks = ranks_from_environment(device)
    if ranks is not None and executor is not None:
        raise FewbenchError(
            "under torchrun each rank is part of one worker: drop --executor/--workers/--gpus"
        )
    if executor is not None:
        return run_with_executor(executor, args, suite, registry, run_dir, data_root, device)
    if ranks is not None:
        device = ranks.device
        run_dir = Path(ranks.announce(str(run_dir)))  # rank 0's: the default name has a timestamp
        if not ranks.leader:
            return follow_leader(ranks, suite, registry, run_dir, data_root, args)
    where = f"{ranks.world} ranks ({device.type})" if ranks else str(device)
    print(f"fewbench: {len(suite.cells)} cells on {where}, results in {run_dir}", file=sys.stderr)
    stop = threading.Event()
    with first_interrupt_stops(stop):
        try:
            summary = run_suite(
                suite,
                suite_text_of(suite),
                registry,
                run_dir=run_dir,
                data_root=data_root,
                cache_dir=args.cache_dir or default_cache_dir(),
                device=device,
                log=sys.stderr,
                progress=not args.no_progress,
                worker=args.worker,
                stale_after=args.stale_after,
                retry_failed=args.retry_failed,
                stop=stop,
                announce=ranks.announce if ranks else None,
            )
            if ranks:
                leave_ranks()
            table = render(run_dir, "table")
        except KeyboardInterrupt:
            print(
                f"fewbench: stopped at once; the last checkpoint holds. Resume with: fewbench run {run_dir}",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
    print(table)
    if summary.interrupted:
        print(
            f"fewbench: interrupted {summary.interrupted} (checkpoint written). "
            f"Resume with: fewbench run {run_dir}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if summary.failed:
        print(
            f"{len(summary.failed)} of {len(suite.cells)} cells failed (rerun them with: "
            f"fewbench run --retry-failed {run_dir}):",
            file=sys.stderr,
        )
        for label, reason in summary.failed:
            print(f"  {label}: {reason}", file=sys.stderr)
        return EXIT_FAILED_CELLS
    return 0


def ranks_from_environment(device):
    from fewbench.ranks import from_environment

    return from_environment(device)


def leave_ranks() -> None:
    from fewbench.ranks import leave

    leave()


def follow_leader(ranks, suite, registry, run_dir: Path, data_root: Path, args) -> int:
    """A rank other than 0 under torchrun: train in step with rank 0, write nothing."""
    from fewbench.ranks import follow
    from fewbench.runner import DatasetCache

    datasets = DatasetCache(
        registry, data_root, args.cache_dir or default_cache_dir(), ranks.device
    )
    follow(ranks, suite, registry, datasets, run_dir, sys.stderr)
    leave_ranks()
    return 0


# Command-line flags that set executor parameters: flag attribute -> parameter name.
EXECUTOR_FLAGS = {
    "workers": "workers",
    "gpus": "gpus",
    "cells_per_gpu": "cells_per_gpu",
    "address": "address",
    "gpus_per_cell": "gpus_per_cell",
    "cpus_per_cell": "cpus_per_cell",
    "max_retries": "max_retries",
    "partition": "partition",
    "account": "account",
    "time_min": "time_min",
    "mem_gb": "mem_gb",
    "array_parallelism": "array_parallelism",
    "wait": "wait",
}


EXECUTION_FILE = "execution.json"  # the executor and parameters a run directory last ran with


def executor_config(
    args: argparse.Namespace, registry: Registry, execution: dict, previous: dict | None = None
) -> tuple[str, dict]:
    """The executor's name and parameters: its defaults, then the suite's ``execution:``
    section, then what the run directory last ran with (``previous``; each only when it
    names the same executor), then the command line."""
    previous = previous or {}
    name = args.executor or previous.get("executor") or execution.get("executor", "local")
    item = registry.get("executor", name)
    params = item.params.params
    config = item.params.defaults()
    for layer in (execution, previous):
        if layer.get("executor", "local") == name:
            config.update({k: v for k, v in layer.items() if k in params})
    for attr, key in EXECUTOR_FLAGS.items():
        value = getattr(args, attr)
        if value is None:
            continue
        flag = "--" + attr.replace("_", "-")
        if key not in params:
            raise FewbenchError(
                f"{flag}: not an option of the {name} executor (its parameters: "
                f"{', '.join(params) or 'none'})"
            )
        if key == "gpus":
            try:
                value = [int(g) for g in value.split(",") if g.strip()]
            except ValueError:
                raise FewbenchError(f"--gpus {value!r}: expected indices like 0,1,2,3") from None
        elif isinstance(value, float) and params[key].value_type is int and value.is_integer():
            value = int(value)
        config[key], problem = check_value(params[key], value)
        if problem:
            raise FewbenchError(f"{flag}: {problem}")
    for assignment in args.executor_sets:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or key not in params:
            raise FewbenchError(
                f"--executor-set {assignment!r}: expected KEY=VALUE with KEY one of the {name} "
                f"executor's parameters: {', '.join(params) or 'none'}"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise FewbenchError(f"--executor-set {assignment!r}: not a YAML value") from None
        config[key], problem = check_value(params[key], value)
        if problem:
            raise FewbenchError(f"--executor-set {key}: {problem}")
    return name, config


def build_executor(args: argparse.Namespace, registry: Registry, execution: dict, run_dir: Path):
    """The executor to hand the run to, or None to run the cells in this process.

    Rerunning a run directory reuses the executor and parameters it last ran with
    (``execution.json``), so that ``fewbench run RUN_DIR`` alone carries on a cluster run.
    """
    try:
        previous = json.loads((run_dir / EXECUTION_FILE).read_text())
    except (OSError, ValueError):
        previous = None
    name, config = executor_config(args, registry, execution, previous)
    if name == "local":
        if config["workers"] <= 1 and not config["gpus"]:
            return None  # one worker: this process
        if config["gpus"]:
            import torch

            visible = torch.cuda.device_count()
            wrong = [g for g in config["gpus"] if g >= visible]
            if wrong:
                raise FewbenchError(
                    f"--gpus {','.join(map(str, config['gpus']))}: GPU {wrong[0]} does not exist "
                    f"({visible} visible)"
                )
    executor = registry.get("executor", name).build(**config)
    executor.name_and_config = {"executor": name, **config}
    executor.check()
    return executor


def run_with_executor(executor, args, suite, registry, run_dir, data_root, device) -> int:
    from fewbench.executor import WorkerCommand
    from fewbench.runner import prepare_run_dir, suite_text_of

    run_dir = run_dir.resolve()  # workers elsewhere find it by this path (shared file system)
    store = prepare_run_dir(run_dir, suite, suite_text_of(suite), registry, device)
    try:
        if args.retry_failed:
            store.retry_failed()
    finally:
        store.close()
    settings = {
        "data_root": str(Path(data_root).resolve()),
        "cache_dir": str(args.cache_dir.resolve()) if args.cache_dir else None,
        "device": args.device,
        "stale_after": args.stale_after,
    }
    options = [
        "--executor", "local", "--workers", "1",  # each worker runs cells itself
        "--data-root", settings["data_root"], "--stale-after", str(args.stale_after),
        "--no-download",
    ]  # fmt: skip
    if args.cache_dir:
        options += ["--cache-dir", settings["cache_dir"]]
    if args.device != "auto":
        options += ["--device", args.device]
    (run_dir / EXECUTION_FILE).write_text(json.dumps(executor.name_and_config, indent=2) + "\n")
    code = executor.run(WorkerCommand(run_dir, options, settings), sys.stderr)
    print(render(run_dir, "table"))
    return code


@contextlib.contextmanager
def first_interrupt_stops(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C once: finish the iteration, checkpoint, stop. Twice: stop at once."""

    def second(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one KeyboardInterrupt, handled in cmd_run
        raise KeyboardInterrupt

    def handler(signum: int, frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, second)
        print(
            "\nfewbench: stopping after this iteration and writing a checkpoint "
            "(Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        # Once the user has pressed Ctrl-C, further presses while exiting are ignored, so that
        # they cannot break the shutdown with a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN if stop.is_set() else previous)


def one_line(text: str) -> str:
    """Escape line breaks and other control characters (a suite may hold any unicode)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("report", "compare", "plot"):
            return cmd_reports(args)
        if args.command == "status":
            from fewbench.status import render_status

            sys.stdout.write(render_status(args.run_dir))
            return 0
        if args.command == "collect":
            from fewbench.journal import collect

            counts = collect(args.run_dir)
            print(
                f"fewbench: collected {counts['done']} finished and {counts['failed']} failed cells "
                f"into {args.run_dir}/results.sqlite"
            )
            return 0
        registry = Registry()
        if args.command == "plugins":
            return cmd_plugins(registry)
        if args.command == "data":
            return cmd_data(args, registry)
        return cmd_run(args, registry)
    except FewbenchError as exc:
        print(f"fewbench: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fewbench: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
