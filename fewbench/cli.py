"""The ``fewbench`` command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import platformdirs

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
    parser.add_argument(
        "--executor", default="local", help="how cells are run: local (default) or a plugin's"
    )
    parser.add_argument("--workers", type=int, help="local: worker processes (default 1)")
    parser.add_argument(
        "--gpus", help="local: comma-separated GPU indices, one worker per GPU (e.g. 0,1,2,3)"
    )
    parser.add_argument("--cells-per-gpu", type=int, help="local: workers sharing each GPU")
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
    executor = build_executor(args, registry)
    if executor is not None:
        return run_with_executor(executor, args, suite, registry, run_dir, data_root, device)
    print(f"fewbench: {len(suite.cells)} cells on {device}, results in {run_dir}", file=sys.stderr)
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
            )
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


def build_executor(args: argparse.Namespace, registry: Registry):
    """The executor to hand the run to, or None to run the cells in this process."""
    for flag, value in (("--workers", args.workers), ("--cells-per-gpu", args.cells_per_gpu)):
        if value is not None and value < 1:
            raise FewbenchError(f"{flag}: must be at least 1, got {value}")
    if args.executor == "local" and (args.workers or 1) <= 1 and not args.gpus:
        return None  # one worker: this process
    item = registry.get("executor", args.executor)
    config = item.params.defaults()
    if args.executor == "local":
        if args.workers is not None:
            config["workers"] = args.workers
        if args.gpus:
            try:
                config["gpus"] = [int(g) for g in args.gpus.split(",") if g.strip()]
            except ValueError:
                raise FewbenchError(
                    f"--gpus {args.gpus!r}: expected indices like 0,1,2,3"
                ) from None
            import torch

            visible = torch.cuda.device_count()
            wrong = [g for g in config["gpus"] if g >= visible]
            if wrong:
                raise FewbenchError(
                    f"--gpus {args.gpus}: GPU {wrong[0]} does not exist ({visible} visible)"
                )
        if args.cells_per_gpu is not None:
            config["cells_per_gpu"] = args.cells_per_gpu
    for key, param in item.params.params.items():
        value, problem = check_value(param, config[key])
        if problem:
            raise FewbenchError(f"--{key.replace('_', '-')}: {problem}")
    return item.build(**config)


def run_with_executor(executor, args, suite, registry, run_dir, data_root, device) -> int:
    from fewbench.executor import WorkerCommand
    from fewbench.runner import prepare_run_dir, suite_text_of

    store = prepare_run_dir(run_dir, suite, suite_text_of(suite), registry, device)
    try:
        if args.retry_failed:
            store.retry_failed()
    finally:
        store.close()
    options = [
        "--data-root",
        str(data_root),
        "--stale-after",
        str(args.stale_after),
        "--no-download",
    ]
    if args.cache_dir:
        options += ["--cache-dir", str(args.cache_dir)]
    if args.device != "auto":
        options += ["--device", args.device]
    code = executor.run(WorkerCommand(run_dir, options), sys.stderr)
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
