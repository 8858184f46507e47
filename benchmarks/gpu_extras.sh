#!/usr/bin/env bash
# The measurements of issue 14 that gpu_check.sh leaves out, in one go on a CUDA machine,
# each side by side with its own baseline in the same process or run (ratios, not absolutes):
#  (a) training, Omniglot 5-way 1-shot (1a): MAML eager with a sync per iteration, without it,
#      as a CUDA graph; first-order MAML eager, with torch.compile (Module.compile), as a graph;
#  (b) evaluation's adaptation (--phase predict; 1b: 32 episodes of 15 queries, 3 test steps):
#      eager, torch.compile, TF32;
#  (c) a vmapped ensemble of 4 and 8 seeds against one seed at a time (seed_ensemble.py; its
#      --check compares the ensemble's gradients with MAML's own in float64 first);
#  (d) --cells-per-gpu: 4 seeds of Finn's 5-way 1-shot protocol, ITERATIONS meta-iterations
#      each and the 600 test episodes, with 1 and then 4 cells sharing the GPU: wall times.
# Usage: benchmarks/gpu_extras.sh DATA_ROOT OUT_DIR [SECONDS per row (2)] [ITERATIONS (3000)]
set -uo pipefail
data=$1 out=$2 seconds=${3:-2} iterations=${4:-3000}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
section() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

section "(a) training: MAML and first-order MAML, eager, compile, graph"
timeout 120 python3 "$here/throughput.py" --device cuda --configs 1a --seconds "$seconds" \
  --learners maml,fomaml --engines batched+sync,batched,batched+compile,batched+graph \
  --json "$out/train.json"

section "(b) evaluation's adaptation: eager, compile, TF32"
timeout 90 python3 "$here/throughput.py" --device cuda --configs 1b --seconds "$seconds" \
  --phase predict --engines batched,batched+compile,batched+tf32 --json "$out/predict.json"

section "(c) seeds as one vmapped ensemble"
timeout 90 python3 "$here/seed_ensemble.py" --device cuda --configs 1a --seeds 4,8 \
  --seconds "$seconds" --check

section "(d) --cells-per-gpu 1 and 4: 4 seeds, $iterations iterations each"
for per_gpu in 1 4; do
  begin=$(date +%s)
  timeout 150 python3 -m fewbench run "$here/../suites/omniglot-finn.yaml" --device cuda \
    --data-root "$data" --out "$out/cells-$per_gpu" --no-progress --gpus 0 \
    --cells-per-gpu "$per_gpu" --set tasks.ways=5 --set tasks.shots=1 \
    --set 'seeds=[0,1,2,3]' --set train.iterations="$iterations" > "$out/cells-$per_gpu.log" 2>&1
  echo "cells-per-gpu $per_gpu: exit $?, wall $(( $(date +%s) - begin )) s"
  tail -3 "$out/cells-$per_gpu.log"
  python3 - "$out/cells-$per_gpu/results.sqlite" <<'EOF'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
for row in db.execute("SELECT label, status, mean, ci95, train_seconds, eval_seconds, engine FROM cells"):
    print(row)
EOF
done
section "done"
