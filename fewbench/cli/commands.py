"""The commands other than ``run``: data, reports (report, compare, plot), plugins,
status, collect and tune. Each reads what it needs and prints; none trains but tune, which
runs its trials through :func:`fewbench.running.runner.run`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fewbench.errors import FewbenchError
from fewbench.reports.wording import counted

if TYPE_CHECKING:
    from fewbench.registry import Registry
    from fewbench.reports.results import Results

# Each command imports what it needs in its own function: ``fewbench status`` should not
# pay for the plugin machinery, nor any command for another's libraries.


def human_size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def cmd_data(args: argparse.Namespace, registry: Registry | None = None) -> int:
    from fewbench.data import root as datastore
    from fewbench.storage.paths import default_data_root

    root = args.data_root or default_data_root()
    if args.action == "list":
        # From the plugin index when it is current (no plugin imported): fewbench.cli.plugin_index
        from fewbench.cli.plugin_index import data_statuses

        rows = data_statuses(root, registry, refresh=getattr(args, "refresh", False))
        print(f"data root: {root}")
        for item, st in rows:
            where = "(generated from the seed, no files)" if st.path is None else str(st.path)
            size = human_size(st.bytes) if st.bytes else "-"
            print(f"  {item.name:<14} {st.state:<9} {size:>9}  {where}")
            for problem in st.problems[:3]:
                print(f"      problem: {problem}")
            if st.state == "missing" or st.problems:
                hint = (
                    f"fewbench data download {item.name}"
                    if st.downloadable
                    else (item.dataset and item.dataset.how_to_get)
                    or "see the plugin's documentation"
                )
                print(f"      get it: {hint}")
        for left in datastore.incoming(root):  # temporary folders of installs, maybe killed
            size = human_size(datastore.folder_size(left.path))
            state = "stale" if left.stale else ""
            print(f"  {'(temporary)':<14} {state:<9} {size:>9}  {left.path}")
            print(f"      {left.describe()}")
        return 0
    if registry is None:
        from fewbench.registry import Registry

        registry = Registry()
    dataset = registry.get("dataset", args.name).cls
    if not dataset.needs_files:
        print(f"{args.name} generates its tasks from the seed: nothing to install")
        return 0
    from fewbench.storage.paths import check_writable_folder

    where = "--data-root" if args.data_root else "the data root"
    check_writable_folder(Path(root), where, f"{args.name}", "give a writable --data-root")
    if args.action == "download":
        path = datastore.download(dataset, root, progress=not args.no_progress)
    else:
        path = datastore.import_path(dataset, root, args.path)
    print(f"{args.name}: installed and verified in {path}")
    return 0


def write_output(text: str, out: Path | None) -> None:
    """``text`` to ``out``, or to standard output; a write that fails (a full disk, a
    folder that cannot be made) is one line naming the file."""
    if out is None:
        write_stdout(text)
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise FewbenchError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"fewbench: wrote {out}", file=sys.stderr)


def write_stdout(text: str) -> None:
    """Write and flush now, so that a full disk is one line here, not a traceback at exit."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        # What is left in the buffer goes nowhere, instead of failing again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(exc, BrokenPipeError):
            raise
        raise FewbenchError(f"cannot write the standard output: {exc.strerror or exc}") from None


MAX_DECIMALS = 10


def check_decimals(decimals: int) -> None:
    if not 0 <= decimals <= MAX_DECIMALS:
        raise FewbenchError(f"--decimals {decimals}: give a whole number from 0 to {MAX_DECIMALS}")


def check_figure_folder(out: Path) -> None:
    """``plot --out`` names a folder: refuse a file before any figure is drawn."""
    if out.exists() and not out.is_dir():
        raise FewbenchError(f"--out {out}: is a file; plot writes a folder of figures")


def cmd_reports(args: argparse.Namespace) -> int:
    """report, compare and plot: read the results stores, never run anything."""
    from fewbench.reports.compare import compare_all_pairs, compare_to_baseline, render_comparison
    from fewbench.reports.names import learner_names, parse_names
    from fewbench.reports.results import load_runs
    from fewbench.reports.table import Options, render

    if args.command in ("report", "compare"):
        check_decimals(args.decimals)
    given = parse_names(args.names) if args.names else {}  # a malformed one before any store
    if args.command == "report":
        options = Options(
            rows=tuple(d for d in args.rows.split(",") if d),
            cols=tuple(d for d in args.cols.split(",") if d),
            decimals=args.decimals,
            test=args.test,
            correction=args.correction,
            alpha=args.alpha,
            with_reference=args.with_reference,
            ranks=args.ranks,
            names=tuple(given.items()),
            ids=args.ids,
            protocol=args.protocol,
            cost=args.cost,
            interval=args.interval,
        )
        write_output(render(args.run_dirs, args.format, options), args.out)
        return 0
    if args.command == "plot":
        if args.out is None:
            if len(args.run_dirs) != 1:
                raise FewbenchError("plot: give --out for the figures of several run directories")
            args.out = args.run_dirs[0] / "plots"
        check_figure_folder(args.out)
    results = load_runs(args.run_dirs)
    names = learner_names(results, given, ids=args.ids)
    if args.command == "compare":
        if args.baseline is None:
            records = compare_all_pairs(results, names)
        else:
            records = compare_to_baseline(results, args.baseline, names)
        write_output(render_comparison(records, args.format, args.decimals), args.out)
        return 0
    return cmd_plot(results, args.out, names)


def cmd_plot(results: Results, out: Path, names: dict[str, str] | None = None) -> int:
    from fewbench.reports.plots import plot_all

    try:
        paths = plot_all(results, out, names=names)
    except OSError as exc:
        where = exc.filename or out
        raise FewbenchError(f"cannot write figures into {where}: {exc.strerror or exc}") from None
    for path in paths:
        print(path)
    if not paths:
        print("fewbench: nothing to plot yet (no curves or finished cells)", file=sys.stderr)
    return 0


def cmd_plugins(registry: Registry | None = None, *, refresh: bool = False) -> int:
    # From the plugin index when it is current (no plugin imported): fewbench.cli.plugin_index
    from fewbench.cli.plugin_index import current

    index = current(registry, refresh=refresh)
    for kind in index.kinds:
        print(f"{kind}s:")
        for item in index.items(kind):
            print(f"  {item.name:<12} {item.description}  [{item.provider}]")
            for param in item.params:
                print(
                    f"      {param.name} = {param.shown}"
                    + (f"  # {param.help}" if param.help else "")
                )
    return 0


def cmd_export(
    run_dir: Path, cell: str | None, out: Path, force: bool = False, *, backbone: bool = False
) -> int:
    """``fewbench export``: the cell's self-describing model file, for fewbench.load_learner;
    with ``--backbone``, its trained feature extractor, for a backbone's ``weights``."""
    if backbone:
        from fewbench.models.loading import export_backbone

        written = export_backbone(run_dir, cell, out, force=force)
        print(
            f"fewbench: wrote {written} (give it to a backbone as weights: {written})",
            file=sys.stderr,
        )
        return 0
    from fewbench.api import export_model

    written = export_model(run_dir, cell, out, force=force)
    print(f"fewbench: wrote {written} (load it with fewbench.load_learner)", file=sys.stderr)
    return 0


def cmd_episodes(args: argparse.Namespace) -> int:
    """``fewbench episodes export|score``: a setting's test episodes as a manifest; an
    outside method's predictions on them scored into a run directory (fewbench.episodes)."""
    from fewbench.storage.paths import default_cache_dir, default_data_root

    root, cache = args.data_root or default_data_root(), args.cache_dir or default_cache_dir()
    if args.action == "export":
        from fewbench.episodes.export import export_episodes

        done = export_episodes(
            args.source, args.cell, args.out, data_root=root, cache_dir=cache,
            sets=args.sets, force=args.force,
        )  # fmt: skip
        print(
            f"fewbench: wrote {done.path}: {done.setting.describe()}, the test episodes of "
            f"{counted(len(done.cells), 'cell')} (sha256 {done.sha256[:12]})",
            file=sys.stderr,
        )
        return 0
    from fewbench.episodes.score import score_predictions

    scored = score_predictions(
        args.manifest, args.predictions, args.out, name=args.name, backbone=args.backbone,
        data_root=root, cache_dir=cache,
    )  # fmt: skip
    print(
        f"fewbench: scored {scored.label}: {100 * scored.mean:.2f} ± {100 * scored.ci95:.2f}% "
        f"over {len(scored.values)} episodes, in {scored.run_dir} (fewbench report / compare)",
        file=sys.stderr,
    )
    return 0


def cmd_tune(request, trials: int, seed: int | None, registry: Registry) -> int:
    """``fewbench tune``: Optuna trials of the suite's search space, judged on validation."""
    from fewbench.running.tuning import TuneRequest, tune

    return tune(TuneRequest(request, trials, seed), registry)


def cmd_status(run_dir: Path, protocol: bool = False) -> int:
    from fewbench.reports.status import render_status

    write_stdout(render_status(run_dir, protocol=protocol))
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    """``fewbench ledger add|write``: export reproduction runs; write (or check) the page."""
    from fewbench.reports import ledger

    if args.action == "add":
        for run_dir in args.run_dirs:
            written = ledger.export_run(run_dir, args.into)
            print(
                f"fewbench: exported {counted(len(written), 'cell')} of {run_dir} to {written[0].parent}"
            )
        return 0
    text = ledger.render(
        ledger.load(args.source), args.source.as_posix(), ledger.load_causes(args.source)
    )
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(
                f"fewbench: {args.out} differs from what {args.source}/ gives; "
                f"run: fewbench ledger write --from {args.source} --out {args.out}",
                file=sys.stderr,
            )
            return 1
        print(f"fewbench: {args.out} is what {args.source}/ gives")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"fewbench: wrote {args.out} from {args.source}/")
    return 0


def cmd_collect(run_dir: Path) -> int:
    from fewbench.storage.journal import collect

    counts = collect(run_dir)
    print(
        f"fewbench: collected {counts['done']} finished and {counts['failed']} failed cells "
        f"into {run_dir}/results.sqlite"
    )
    return 0
