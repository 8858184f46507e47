"""The ``fewbench`` command line: the parser and the dispatch to the commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fewbench.errors import FewbenchError, one_line
from fewbench.reports.compare import FORMATS as COMPARE_FORMATS
from fewbench.reports.significance import CORRECTIONS, TESTS
from fewbench.reports.table import DEFAULT_COLS, DEFAULT_ROWS, FORMATS
from fewbench.version import __version__

if TYPE_CHECKING:
    from fewbench.plugin.executor import ExecutorOption

EXIT_USAGE = 2
REFRESH_HELP = (
    "load the plugins instead of reading the cached plugin index, and store it again "
    "(FEWBENCH_NO_PLUGIN_INDEX=1: always)"
)
RUN_COMMANDS = ("run", "resume")


def _dest(flag: str) -> str:
    return "executor_option_" + flag.lstrip("-").replace("-", "_")


def add_run_options(
    parser: argparse.ArgumentParser, executor_options: list[ExecutorOption]
) -> None:
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
        "--dry-run",
        action="store_true",
        help="print each cell's effective training steps and episodes (and its state in --out) "
        "and train nothing",
    )
    parser.add_argument(
        "--max-iterations",
        type=int,
        metavar="N",
        help="smoke run: at most N training steps per cell, after every override and every "
        "learner's own count (capped cells get their own ids)",
    )
    parser.add_argument(
        "--max-episodes",
        type=int,
        metavar="N",
        help="smoke run: at most N validation and N test episodes per cell",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--no-estimate",
        action="store_true",
        help="do not time the cells before a long run (the estimate of how long it will take)",
    )
    parser.add_argument(
        "--log",
        action="append",
        default=[],
        metavar="NAME",
        help="follow each cell in an experiment tracker (repeatable): tensorboard, wandb, mlflow "
        "or another logger plugin; added to the suite's log: list, never part of a cell",
    )
    executors = parser.add_argument_group(
        "executors", "where the cells run; these override the suite's execution: section"
    )
    executors.add_argument(
        "--executor",
        help="local (default) or another executor plugin's name (see fewbench plugins)",
    )
    for option in executor_options:  # declared by the executor plugins
        if option.flag_only:
            executors.add_argument(
                option.flag,
                dest=_dest(option.flag),
                action="store_true",
                default=None,
                help=option.help,
            )
        else:
            executors.add_argument(
                option.flag, dest=_dest(option.flag), metavar=option.param.upper(), help=option.help
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


def add_name_options(parser: argparse.ArgumentParser) -> None:
    """How reports name learners (fewbench.reports.names): --names, --ids."""
    names = parser.add_mutually_exclusive_group()
    names.add_argument(
        "--names",
        metavar="LEARNER=NAME,...|FILE",
        help="learners' names, over the suite's names: and the built-in paper spellings, e.g. "
        "maml=MAML,finetune=Baseline++, or a YAML file of that mapping (a suite file: its names:)",
    )
    names.add_argument(
        "--ids",
        action="store_true",
        help="show the learners' plugin ids and labels (maml, finetune[head=cosine]), not names",
    )


def build_parser(executor_options: list[ExecutorOption] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewbench", description="Benchmark few-shot learners on fixed episodes."
    )
    parser.add_argument("--version", action="version", version=f"fewbench {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train and evaluate every cell of a suite")
    run.add_argument("suite", help="suite YAML file, or a run directory to resume")
    add_run_options(run, list(executor_options))
    resume = commands.add_parser(
        "resume", help="continue a run directory (the same as: run RUN_DIR)"
    )
    resume.add_argument("suite", metavar="run_dir", help="run directory")
    add_run_options(resume, list(executor_options))
    tune = commands.add_parser(
        "tune",
        help="hyperparameter search (Optuna) over the suite's search: section, judged on "
        "validation only",
    )
    tune.add_argument(
        "suite", help="suite YAML file with a search: section, or a tune run directory to continue"
    )
    tune.add_argument(
        "--trials",
        type=int,
        required=True,
        metavar="N",
        help="trials in total: running the same command again continues up to N",
    )
    tune.add_argument(
        "--seed", type=int, help="the TPE sampler's seed (default: the suite's search.seed, or 0)"
    )
    add_run_options(tune, list(executor_options))

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
    report.add_argument(
        "--ranks",
        action="store_true",
        help="instead of the table, each method's rank in each setting (column), its "
        "average rank, settings ranked and times best",
    )
    report.add_argument(
        "--protocol",
        action="store_true",
        help="after the table, each setting's protocol card: dataset, backbone size, training "
        "seen, test episodes, test-time steps, batch norm at test, inductive or transductive",
    )
    report.add_argument(
        "--cost",
        action="store_true",
        help="after the table, what each setting cost: device model, parameters, training "
        "time per seed, inference time per episode, peak memory, GPU-hours (and per method)",
    )
    report.add_argument(
        "--interval",
        choices=("episodes", "population"),
        default="episodes",
        help="the ±: episodes (default) covers other episodes of the same test classes; "
        "population also covers the draw of the test classes (new classes and examples), "
        "drawing the episodes' classes again from the data root",
    )
    add_name_options(report)

    compare = commands.add_parser(
        "compare",
        help="every learner minus a baseline, or every pair of learners (Holm), paired by test "
        "episode",
    )
    compare.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    compare.add_argument(
        "--baseline",
        help="the baseline learner (its label or name); without it, every pair of learners in "
        "each setting, with p-values also adjusted by Holm's method",
    )
    compare.add_argument("--format", choices=COMPARE_FORMATS, default="table")
    compare.add_argument("--decimals", type=int, default=2)
    compare.add_argument("--out", type=Path, help="write to this file (default: standard output)")
    add_name_options(compare)

    plot = commands.add_parser("plot", help="figures (PNG and PDF) from run directories")
    plot.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    plot.add_argument(
        "--out",
        type=Path,
        help="folder for the figures (default: RUN_DIR/plots, with one run directory)",
    )
    add_name_options(plot)

    export = commands.add_parser(
        "export", help="copy a finished cell's trained model out of its run directory"
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("cell", nargs="?", help="label or id (may be left out with one cell)")
    export.add_argument("-o", "--out", type=Path, required=True, help="the model file to write")
    export.add_argument("--force", action="store_true", help="replace an existing file")
    export.add_argument(
        "--backbone",
        action="store_true",
        help="write the trained feature extractor alone, as a state_dict a backbone's "
        "weights parameter loads",
    )

    status = commands.add_parser("status", help="every cell of a run directory and where it stands")
    status.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    status.add_argument(
        "--protocol", action="store_true", help="each finished cell's protocol card in full"
    )
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
    listing.add_argument("--refresh", action="store_true", help=REFRESH_HELP)
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

    ledger = commands.add_parser(
        "ledger", help="the reproduction ledger: export reproduction runs, write its page"
    )
    steps = ledger.add_subparsers(dest="action", required=True)
    add = steps.add_parser(
        "add", help="export the finished cells of reproduction runs as committed files"
    )
    add.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    add.add_argument(
        "--into", type=Path, default=Path("reproduction"), help="folder (default: reproduction)"
    )
    write = steps.add_parser("write", help="write the ledger page from the exported files")
    write.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=Path("reproduction"),
        help="folder of exports (default: reproduction)",
    )
    write.add_argument(
        "--out",
        type=Path,
        default=Path("docs/reproduction.md"),
        help="default: docs/reproduction.md",
    )
    write.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when the page differs from what the exports give",
    )

    plugins = commands.add_parser(
        "plugins", help="list datasets, backbones and learners with their providers"
    )
    plugins.add_argument("--refresh", action="store_true", help=REFRESH_HELP)
    from fewbench.cli.episodes import add_episodes_command  # fewbench episodes export|score

    add_episodes_command(commands)
    return parser


def run_request(args: argparse.Namespace, executor_options: list[ExecutorOption]):
    """The typed request of ``fewbench run`` from its parsed arguments."""
    from fewbench.running.executor_setup import ExecutorRequest
    from fewbench.running.runner import RunRequest
    from fewbench.storage.paths import default_data_root

    for flag, value in (
        ("--max-iterations", args.max_iterations),
        ("--max-episodes", args.max_episodes),
    ):
        if value is not None and value < 1:
            raise FewbenchError(f"{flag} {value}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise FewbenchError(f"--threads {args.threads}: must be at least 1")
    if not args.stale_after >= 1:  # 0 would let every worker take every cell
        raise FewbenchError(f"--stale-after {args.stale_after}: must be at least 1 second")
    flags = {
        option.flag: getattr(args, _dest(option.flag))
        for option in executor_options
        if getattr(args, _dest(option.flag), None) is not None
    }
    return RunRequest(
        suite=Path(args.suite),
        data_root=args.data_root or default_data_root(),
        cache_dir=args.cache_dir,
        sets=tuple(args.sets),
        out=args.out,
        device=args.device,
        dry_run=args.dry_run,
        max_iterations=args.max_iterations,
        max_episodes=args.max_episodes,
        progress=not args.no_progress,
        download=not args.no_download,
        retry_failed=args.retry_failed,
        worker=args.worker,
        stale_after=args.stale_after,
        threads=args.threads,
        executor=ExecutorRequest(args.executor, flags, tuple(args.executor_sets)),
        log=tuple(args.log),
        estimate=not getattr(args, "no_estimate", False),
    )


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        registry = None
        options: list[ExecutorOption] = []
        # plugins and data load the plugins themselves, when the plugin index is not current
        if _command_of(argv) in RUN_COMMANDS + ("tune",):
            from fewbench.running import cpu_heap  # first: before any thread allocates

            cpu_heap.keep_large_blocks_on_heap()
            from fewbench.registry import Registry

            registry = Registry()
            options = list(registry.executor_options.values())
        args = build_parser(options).parse_args(argv)
        from fewbench.cli import commands

        if args.command in ("report", "compare", "plot"):
            return commands.cmd_reports(args)
        if args.command == "status":
            return commands.cmd_status(args.run_dir, protocol=args.protocol)
        if args.command == "export":
            return commands.cmd_export(
                args.run_dir, args.cell, args.out, args.force, backbone=args.backbone
            )
        if args.command == "episodes":
            return commands.cmd_episodes(args)
        if args.command == "collect":
            return commands.cmd_collect(args.run_dir)
        if args.command == "ledger":
            return commands.cmd_ledger(args)
        if args.command == "plugins":
            return commands.cmd_plugins(refresh=args.refresh)
        if args.command == "data":
            return commands.cmd_data(args)
        if args.command == "tune":
            return commands.cmd_tune(run_request(args, options), args.trials, args.seed, registry)
        from fewbench.running.runner import run

        return run(run_request(args, options), registry)
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
