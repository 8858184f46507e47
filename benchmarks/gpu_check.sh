#!/usr/bin/env bash
# The GPU check of the performance work, in one go on a CUDA machine:
#  (a) benchmarks/throughput.py on CUDA (every configuration; higher loop, torch.func loop,
#      batched engine, fewbench's default), and
#  (b) MAML on Omniglot 5-way 1-shot with Finn et al.'s settings (suites/omniglot.yaml) for as
#      many meta-iterations as fit in TRAIN_SECONDS at the speed measured in (a), then the 600
#      fixed test episodes: accuracy ± 95% CI and wall time.
# Usage: benchmarks/gpu_check.sh DATA_ROOT OUT_DIR [TRAIN_SECONDS (default 420)] [THROUGHPUT_SECONDS (default 3)]
set -euo pipefail
data=$1 out=$2 budget=${3:-420} seconds=${4:-3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== (a) throughput on CUDA"
python3 "$here/throughput.py" --device cuda --seconds "$seconds" --json "$out/throughput-cuda.json" \
  | tee "$out/throughput-cuda.md"

echo "== (b) MAML, Omniglot 5-way 1-shot, Finn et al. settings, ${budget} s of training"
# Iterations from the measured speed of the default engine on configuration 1a (the same
# shapes), with 15% held back for validation; rounded down to whole validation intervals.
iterations=$(python3 - "$out/throughput-cuda.json" "$budget" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
auto = next(r for r in rows if r["config"] == "1a" and r["engine"] == "auto" and not r["error"])
print(max(500, int(0.85 * float(sys.argv[2]) * 1000 / auto["ms_per_iteration"]) // 500 * 500))
EOF
)
echo "meta-iterations: $iterations"
train_start=$(date +%s)
python3 -m fewbench run "$here/../suites/omniglot.yaml" --device cuda --data-root "$data" \
  --out "$out/run" --no-progress \
  --set tasks.ways=5 --set tasks.shots=1 --set train.iterations="$iterations" \
  --set 'learners=[{name: maml, inner_lr: 0.4, inner_steps: 1, eval_inner_steps: 3, meta_batch_size: 32, meta_lr: 0.001}]'
echo "training + evaluation wall time: $(( $(date +%s) - train_start )) s"
python3 -m fewbench report "$out/run" --format markdown | tee "$out/maml-omniglot.md"
python3 - "$out/run/results.sqlite" <<'EOF'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
for row in db.execute("SELECT label, iterations, best_iteration, best_val, train_seconds, eval_seconds, engine FROM cells"):
    print(dict(zip(["label", "iterations", "best_iteration", "best_val", "train_s", "eval_s", "engine"], row)))
EOF
echo "total wall time: $(( $(date +%s) - start )) s"
