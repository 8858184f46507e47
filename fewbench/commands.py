"""The commands other than ``run``: data, reports (report, compare, plot), plugins,
status and collect. Each reads what it needs and prints; none trains."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewbench.paths import default_data_root
from fewbench.registry import KINDS, Registry


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


def write_output(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"fewbench: wrote {out}", file=sys.stderr)


def cmd_reports(args: argparse.Namespace) -> int:
    """report, compare and plot: read the results stores, never run anything."""
    from fewbench.compare import compare_to_baseline, render_comparison
    from fewbench.report import Options, render
    from fewbench.results import load_runs

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


def cmd_status(run_dir: Path) -> int:
    from fewbench.status import render_status

    sys.stdout.write(render_status(run_dir))
    return 0


def cmd_collect(run_dir: Path) -> int:
    from fewbench.journal import collect

    counts = collect(run_dir)
    print(
        f"fewbench: collected {counts['done']} finished and {counts['failed']} failed cells "
        f"into {run_dir}/results.sqlite"
    )
    return 0
