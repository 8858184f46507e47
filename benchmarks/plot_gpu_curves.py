"""The validation curves of the GPU check's MAML runs (curve CSVs written by gpu_check.sh), one
line per run, as one figure.

    python benchmarks/plot_gpu_curves.py OUT.png LABEL=CURVE.csv [LABEL=CURVE.csv ...]
"""

from __future__ import annotations

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    figure, (loss_axis, val_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for spec in argv[1:]:
        label, _, path = spec.partition("=")
        with open(path) as f:
            rows = list(csv.DictReader(f))
        loss_axis.plot([int(r["iteration"]) for r in rows], [float(r["train_loss"]) for r in rows],
                       label=label, linewidth=0.6)  # fmt: skip
        val = [
            (int(r["iteration"]), 100 * float(r["val_accuracy"])) for r in rows if r["val_accuracy"]
        ]
        val_axis.plot(*zip(*val, strict=True), label=label)
    loss_axis.set(yscale="log", xlabel="meta-iteration", ylabel="training loss (mean per 50)")
    val_axis.set(xlabel="meta-iteration", ylabel="validation accuracy (%, 100 episodes)")
    for axis in (loss_axis, val_axis):
        axis.grid(alpha=0.3)
    val_axis.legend()
    figure.tight_layout()
    figure.savefig(argv[0], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
