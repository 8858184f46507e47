"""Start-up time of the quick commands: ``--help``, ``plugins``, ``data list`` and ``status``.

Each command runs ``--repeat`` times (default 5), each in a fresh ``python -m fewbench``
process, and the wall time of the whole process (interpreter start-up included) gives the
median and the minimum. One more run per command, through a child that calls the CLI's
``main`` and then looks in ``sys.modules``, says which heavy modules (torch, scipy, pandas,
matplotlib) the command imported. ``status`` reads a small run directory made beforehand
by a smoke run of ``suites/sinusoid.yaml`` (2 iterations, 2 episodes).

``plugins`` and ``data list`` are measured twice (fewbench.cli.plugin_index): cold, with the
plugin index removed before every run (so the plugins are imported, as on the first call
after an install or an edit of a plugin), and warm, with the index (and ``data list``'s
verified folders) left by the run before. Every run uses a cache folder of its own
(``FEWBENCH_CACHE``), never the user's.

    python benchmarks/startup.py                                   # the table
    python benchmarks/startup.py --repeat 10 --json startup.json   # and the numbers as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fewbench.running.cost import cpu_model  # reads /proc/cpuinfo; imports no torch

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "scipy", "pandas", "matplotlib")

# Runs the CLI in this process, then prints the heavy modules it imported on the last line
# of the standard error (the command's own output goes where it always does).
PROBE = """\
import sys
from fewbench.cli.parser import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help exits through argparse
    code = exc.code
heavy = [m for m in {heavy!r} if m in sys.modules]
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
"""


def commands(data_root: Path, run_dir: Path) -> list[tuple[str, list[str], bool]]:
    """(label, arguments of fewbench, cold: without the plugin index) of each command."""
    listing = ["data", "list", "--data-root", str(data_root)]
    return [
        ("fewbench --help", ["--help"], False),
        ("fewbench plugins (cold: no index)", ["plugins"], True),
        ("fewbench plugins (warm)", ["plugins"], False),
        ("fewbench data list (cold: no index)", listing, True),
        ("fewbench data list (warm)", listing, False),
        ("fewbench status RUN_DIR", ["status", str(run_dir)], False),
    ]


class Cache:
    """The cache folder the measured commands use; ``cold`` removes the plugin index."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.env = {**os.environ, "FEWBENCH_CACHE": str(folder)}
        self.env.pop("FEWBENCH_NO_PLUGIN_INDEX", None)

    def prepare(self, cold: bool) -> None:
        if cold:
            shutil.rmtree(self.folder / "plugins", ignore_errors=True)


def make_run_dir(folder: Path) -> Path:
    """A small finished run of the sinusoid suite for ``status`` to read."""
    out = folder / "sinusoid-run"
    command = [
        sys.executable, "-m", "fewbench", "run", str(REPO / "suites" / "sinusoid.yaml"),
        "--max-iterations", "2", "--max-episodes", "2", "--out", str(out), "--no-progress",
        "--threads", "1",
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    return out


def time_once(arguments: list[str], cache: Cache, cold: bool) -> float:
    cache.prepare(cold)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fewbench", *arguments],
        cwd=REPO,
        env=cache.env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def heavy_imports(arguments: list[str], cache: Cache, cold: bool) -> list[str]:
    cache.prepare(cold)
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *arguments],
        cwd=REPO,
        env=cache.env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = done.stderr.strip().splitlines()[-1]
    if not line.startswith("HEAVY:"):
        raise RuntimeError(f"the probe printed no module list: {done.stderr[-500:]}")
    return [m for m in line[len("HEAVY:") :].split(",") if m]


def measure(label: str, arguments: list[str], cold: bool, repeat: int, cache: Cache) -> dict:
    # warm the file cache, as every later start finds it (and, warm, leave the index)
    time_once(arguments, cache, cold)
    times = [time_once(arguments, cache, cold) for _ in range(repeat)]
    return {
        "command": label,
        "arguments": arguments,
        "cold": cold,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "heavy_imports": heavy_imports(arguments, cache, cold),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| command | median s | min s | heavy modules imported |",
        "|---|---:|---:|---|",
    ]
    for row in rows:
        heavy = ", ".join(row["heavy_imports"]) or "none"
        lines.append(
            f"| `{row['command']}` | {row['median_s']:.2f} | {row['min_s']:.2f} | {heavy} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command (default 5)")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="data root for `data list` (default ../shared/data)",
    )
    parser.add_argument("--run-dir", type=Path, help="a run directory for `status` (default: "
                        "a smoke run of suites/sinusoid.yaml made now)")  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the numbers here")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    with tempfile.TemporaryDirectory(prefix="fewbench-startup-") as folder:
        run_dir = args.run_dir or make_run_dir(Path(folder))
        cache = Cache(Path(folder) / "cache")
        rows = [
            measure(label, arguments, cold, args.repeat, cache)
            for label, arguments, cold in commands(args.data_root, run_dir)
        ]
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs ({cpu_model()}), "
        f"{args.repeat} runs each\n"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(
            json.dumps({"repeat": args.repeat, "rows": rows}, indent=2) + "\n", encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
