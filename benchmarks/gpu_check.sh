#!/usr/bin/env bash
# The GPU check of the performance work (issue 14), in one go on a CUDA machine:
#  (a) benchmarks/throughput.py on CUDA, configurations 1a (Finn's Omniglot 5-way 1-shot step:
#      32 tasks, 1 query, 1 second-order step) and 2 (20-way 1-shot, 5 steps, 16 tasks): the
#      higher reference, the eager loop reading each loss (the loop before this work), the
#      eager loop without that sync, the CUDA graph, and the graph with TF32 matrix products;
#  (b) MAML on Omniglot 5-way 1-shot with Finn et al.'s protocol (suites/omniglot-finn.yaml:
#      their split, 60,000 meta-iterations), or, when 60,000 do not fit in TRAIN_SECONDS at the
#      speed measured in (a), as many as fit; then the 600 fixed test episodes. Prints the
#      accuracy ± 95% CI, the wall time, the engine actually used (graph or not, and why) and
#      writes the training curve (curve.csv).
# Usage: benchmarks/gpu_check.sh DATA_ROOT OUT_DIR [TRAIN_SECONDS (default 420)] [THROUGHPUT_SECONDS (default 3)]
set -euo pipefail
data=$1 out=$2 budget=${3:-420} seconds=${4:-3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== (a) throughput on CUDA"
python3 "$here/throughput.py" --device cuda --configs 1a,2 --seconds "$seconds" \
  --json "$out/throughput-cuda.json" | tee "$out/throughput-cuda.md"

echo "== (b) MAML, Omniglot 5-way 1-shot, Finn et al.'s protocol, at most ${budget} s of training"
# Iterations: 60,000, or what fits in the budget at the measured speed of configuration 1a's
# fastest working row (same shapes), with 15% held back for validation; whole validation intervals.
iterations=$(python3 - "$out/throughput-cuda.json" "$budget" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r["config"] == "1a" and not r["error"]
        and r["engine"] in ("batched", "batched+graph") and "graph: off" not in r["chosen"]]
fastest = min(r["ms_per_iteration"] for r in rows)
fit = int(0.85 * float(sys.argv[2]) * 1000 / fastest) // 500 * 500
print(max(500, min(60000, fit)))
EOF
)
echo "meta-iterations: $iterations (Finn et al.: 60000)"
train_start=$(date +%s)
python3 -m fewbench run "$here/../suites/omniglot-finn.yaml" --device cuda --data-root "$data" \
  --out "$out/run" --no-progress \
  --set tasks.ways=5 --set tasks.shots=1 --set train.iterations="$iterations"
echo "training + evaluation wall time: $(( $(date +%s) - train_start )) s"
python3 -m fewbench report "$out/run" --format markdown | tee "$out/maml-omniglot-finn.md"
python3 - "$out/run/results.sqlite" "$out/curve.csv" <<'EOF'
import csv, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
columns = ["label", "status", "error", "mean", "ci95", "iterations", "best_iteration", "best_val",
           "train_seconds", "eval_seconds", "engine"]
for row in db.execute(f"SELECT {', '.join(columns)} FROM cells"):
    print(dict(zip(columns, row)))
with open(sys.argv[2], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["iteration", "train_loss", "val_accuracy"])
    writer.writerows(db.execute("SELECT iteration, loss, val_metric FROM curve ORDER BY iteration"))
EOF
echo "total wall time: $(( $(date +%s) - start )) s"
