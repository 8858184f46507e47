#!/usr/bin/env bash
# PYTHON: the interpreter with fewbench installed (default python3, as in an activated venv).
# The reproduction ledger's GPU work (issue 26), for one device call of at most 10 minutes:
# the Omniglot cells whose protocols do not train in 45 minutes on 2 CPU cores, in the order
# below, each for as many iterations as its paper's protocol asks (or the cap given here, said
# in the ledger as "N of M it."), then exported into the ledger's folder with
# `fewbench ledger add`. A job starts only when its estimate fits in what is left of the budget;
# each runs under `timeout`, and a job cut short resumes exactly in a later call (same OUT).
#
# Estimates: MAML 5-way on Finn et al.'s protocol measured 234 s for 60,000 iterations on an
# H200 (docs/results.md); the others are not measured on a GPU yet and their estimates are
# guesses, to be replaced by the times this script prints. `timeout` sends SIGINT, which fewbench
# treats as Ctrl-C: the cell writes a checkpoint and is marked interrupted, so nothing is lost.
#
# Usage: benchmarks/reproduce_gpu.sh DATA_ROOT OUT [BUDGET_SECONDS (default 540)]
#   LEDGER=folder   where the exports go (default: reproduction)
#   SMOKE=1         every job at 2 iterations and 3 episodes on whatever device there is: the
#                   test of this script on a CPU (tests/test_reproduction.py)
set -euo pipefail
data=$1 out=$2 budget=${3:-540}
here=$(cd "$(dirname "$0")" && pwd)
suites="$here/../suites/reproduce"
ledger=${LEDGER:-reproduction}
mkdir -p "$out"
start=$(date +%s)
smoke=()
if [[ "${SMOKE:-0}" == 1 ]]; then
  smoke=(--max-iterations 2 --max-episodes 3 --set train.validate_every=1)
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

# name | suite | estimated seconds | fewbench run arguments (the cells and their cap)
jobs=$(cat <<'EOF'
maml-5w1s    | finn2017-omniglot   | 260 | --set tasks.ways=5 --set tasks.shots=1
protonet-5s  | snell2017-omniglot  | 120 | --set tasks.shots=5 --max-iterations 20000
maml-5w5s    | finn2017-omniglot   | 300 | --set tasks.ways=5 --set tasks.shots=5
relation-5w  | sung2018-omniglot   | 240 | --set tasks.ways=5 --max-iterations 100000
matching     | vinyals2016-omniglot| 180 | --max-iterations 20000
EOF
)

while IFS='|' read -r name suite estimate arguments; do
  name=$(echo $name) suite=$(echo $suite) estimate=$(echo $estimate)
  left=$(( budget - ($(date +%s) - start) ))
  if [[ "${SMOKE:-0}" != 1 && $estimate -gt $left ]]; then
    echo "== $name: skipped (estimate ${estimate} s, ${left} s left of the budget)"
    continue
  fi
  echo "== $name: suites/reproduce/$suite.yaml $arguments (estimate ${estimate} s, ${left} s left)"
  job_start=$(date +%s)
  # shellcheck disable=SC2086  # the arguments are words
  if timeout -s INT -k 60 "$(( left > 30 ? left - 15 : 15 ))" "${PYTHON:-python3}" -m fewbench run "$suites/$suite.yaml" \
      --data-root "$data" --out "$out/$name" --no-progress $arguments "${smoke[@]}"; then
    "${PYTHON:-python3}" -m fewbench ledger add "$out/$name" --into "$ledger"
  else
    echo "== $name: stopped before it finished; rerun this script with the same OUT to resume it"
  fi
  echo "== $name: $(( $(date +%s) - job_start )) s"
done <<< "$jobs"
echo "== total: $(( $(date +%s) - start )) s; now: fewbench ledger write"
