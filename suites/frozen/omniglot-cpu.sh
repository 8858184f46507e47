#!/bin/sh
# The frozen-feature comparison on Omniglot on a CPU, its three stages in one command:
#   sh suites/frozen/omniglot-cpu.sh [DATA_ROOT] [OUT]   (defaults: ../shared/data, runs)
# 1. SimpleShot's recipe trains one Conv-4 (omniglot-pretrain-cpu.yaml);
# 2. its features go out as conv4-omniglot-simpleshot.pt (in this folder: the stage-2 and
#    stage-3 suites name it), and every frozen-feature method classifies them
#    (omniglot-heads-cpu.yaml);
# 3. FEAT and MetaOptNet-SVM train episodically from it (omniglot-episodic-cpu.yaml);
# then one report of stages 2 and 3. Each stage resumes where it stopped when run again.
set -e
DATA=${1:-../shared/data}
OUT=${2:-runs}
fewbench run suites/frozen/omniglot-pretrain-cpu.yaml --out "$OUT/frozen-pretrain" --data-root "$DATA" --no-progress
fewbench export "$OUT/frozen-pretrain" --backbone -o conv4-omniglot-simpleshot.pt --force
fewbench run suites/frozen/omniglot-heads-cpu.yaml --out "$OUT/frozen-heads" --data-root "$DATA" --no-progress
fewbench run suites/frozen/omniglot-episodic-cpu.yaml --out "$OUT/frozen-episodic" --data-root "$DATA" --no-progress
fewbench report "$OUT/frozen-heads" "$OUT/frozen-episodic"
