#!/usr/bin/env bash
# The Finn et al. Omniglot suite (suites/omniglot.yaml) on a CUDA GPU, 5-way 1-shot only and on a
# short budget: checks the GPU path end to end (data on the device, training, fixed test episodes,
# results store, report) and gives a first figure. Not the 60,000-iteration protocol.
# Usage: benchmarks/gpu_omniglot_smoke.sh DATA_ROOT OUT_DIR [ITERATIONS] [more fewbench run arguments]
set -euo pipefail
data=$1 out=$2 iterations=${3:-2000}
shift $(( $# < 3 ? $# : 3 ))
start=$(date +%s)
python3 -m fewbench run suites/omniglot.yaml --device cuda --data-root "$data" --out "$out" --no-progress \
  --set tasks.ways=5 --set tasks.shots=1 --set train.iterations="$iterations" \
  --set train.validate_every=500 "$@"
python3 -m fewbench report "$out" --format csv
echo "wall time: $(( $(date +%s) - start )) s"
