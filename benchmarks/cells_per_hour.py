"""Cells per hour of a small Omniglot grid, one cell at a time vs several at once.

Each layout runs the same grid (Finn's 5-way 1-shot MAML on a Conv-4, one cell per seed,
a fixed number of meta-iterations, then the test episodes) through ``fewbench run`` with
the local executor, from an empty run directory, and the wall time of the whole command
(worker start-up and data loading included) gives cells per hour. The first layout is
the baseline of the ratios.

    python benchmarks/cells_per_hour.py --data-root ../shared/data                  # CPU: 1 vs N workers
    python benchmarks/cells_per_hour.py --data-root DATA --gpus 0 --cells-per-gpu 1,2,4,8   # one GPU
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = """\
name: cells-per-hour
seeds: {seeds}
datasets: [{{name: omniglot, split: vinyals, image_size: 28}}]
tasks: {{ways: 5, shots: 1, query: 1}}
backbones: [{{name: conv4, hidden: 64, pool: stride}}]
learners: [{{name: maml, inner_lr: 0.4, inner_steps: 1, eval_inner_steps: 3, meta_batch_size: 32}}]
train: {{iterations: {iterations}, validate_every: {iterations}, val_episodes: 20}}
eval: {{episodes: {episodes}, query: 15}}
"""


def layouts(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, fewbench run flags) of each layout, the baseline first."""
    if args.gpus is not None:
        return [
            (
                f"{k} cell{'s' if k > 1 else ''} per GPU",
                ["--gpus", args.gpus, "--cells-per-gpu", str(k)],
            )
            for k in args.cells_per_gpu
        ]
    cores = os.cpu_count() or 1
    return [
        (f"{n} worker{'s' if n > 1 else ''} x {max(1, cores // n)} threads", ["--workers", str(n)])
        for n in args.workers
    ]


def _machine(args: argparse.Namespace) -> str:
    """The machine the layouts ran on: the CPU model and cores, and the GPUs when used."""
    from fewbench.running.cost import cpu_model

    text = f"{cpu_model()}, {os.cpu_count()} cores"
    if args.gpus is not None:
        import torch

        if torch.cuda.is_available():
            text += f", GPUs {args.gpus} ({torch.cuda.get_device_name(0)})"
    return text


def run_layout(suite: Path, flags: list[str], args: argparse.Namespace, folder: Path) -> float:
    command = [
        sys.executable, "-m", "fewbench", "run", str(suite), "--out", str(folder),
        "--data-root", str(args.data_root), "--no-progress", *flags,
    ]  # fmt: skip
    if args.cache_dir:
        command += ["--cache-dir", str(args.cache_dir)]
    if "--workers" in flags and flags[flags.index("--workers") + 1] == "1":
        command += ["--threads", str(os.cpu_count() or 1)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, help="decoded-dataset cache (fewbench's default)")
    parser.add_argument("--cells", type=int, default=4, help="cells in the grid (one per seed)")
    parser.add_argument("--iterations", type=int, default=100, help="meta-iterations per cell")
    parser.add_argument("--episodes", type=int, default=100, help="test episodes per cell")
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--gpus", help="GPU indices (e.g. 0): compare --cells-per-gpu values")
    parser.add_argument(
        "--cells-per-gpu", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4]
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fewbench-cells-per-hour-") as tmp:
        suite = Path(tmp) / "suite.yaml"
        suite.write_text(
            SUITE.format(
                seeds=list(range(args.cells)), iterations=args.iterations, episodes=args.episodes
            )
        )
        rows = []
        for index, (label, flags) in enumerate(layouts(args)):
            seconds = run_layout(suite, flags, args, Path(tmp) / f"run-{index}")
            rows.append((label, seconds, 3600 * args.cells / seconds))
    print(
        f"{args.cells} cells of Omniglot 5-way 1-shot MAML (Conv-4, meta-batch 32), "
        f"{args.iterations} meta-iterations and {args.episodes} test episodes each; "
        f"{_machine(args)}\n"
    )
    print("| layout | wall time (s) | cells per hour | ratio |\n|---|---:|---:|---:|")
    for label, seconds, per_hour in rows:
        print(f"| {label} | {seconds:.0f} | {per_hour:.1f} | {per_hour / rows[0][2]:.2f}x |")


if __name__ == "__main__":
    main()
