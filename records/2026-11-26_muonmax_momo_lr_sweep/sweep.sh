#!/usr/bin/env bash
# The MuonMax/Momo learning-rate sweep on the `cpu` preset: 4 matrix learning rates spread over 16x for each of
# muon and muonmax, each alone, with Momo (MOMO_LB=0) and with Momo (MOMO_LB=3.5); same seed, data and steps. Logs go to ./logs/, then
# plot.py draws final validation loss against lr. Usage: ./sweep.sh [extra env assignments...]
#   JOBS=2 ./sweep.sh                 # two runs at a time (one thread each)
#   NUM_ITERATIONS=150 ./sweep.sh     # the full cpu preset instead of the 60 steps used here
set -euo pipefail
cd "$(dirname "$0")"
REPO=../..
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}
STEPS=${NUM_ITERATIONS:-60}
MUON_LRS=(0.003 0.0075 0.019 0.048)      # 16x around the cpu preset's MUON_LR=0.012
MUONMAX_LRS=(0.0125 0.03 0.08 0.2)       # 16x around MUONMAX_LR=0.05
mkdir -p logs
runs=()
# Momo with the default lower bound 0 (far below these losses) and with 3.5 (near the loss these runs reach)
for momo in "MOMO=0" "MOMO=1" "MOMO=1 MOMO_LB=3.5"; do
    for lr in "${MUON_LRS[@]}"; do runs+=("OPTIMIZER=muon MUON_LR=$lr $momo"); done
    for lr in "${MUONMAX_LRS[@]}"; do runs+=("OPTIMIZER=muonmax MUONMAX_LR=$lr $momo"); done
done
run_one() {
    local settings=$1 tag
    tag=$(echo "$settings" | tr ' =' '_-' | tr 'A-Z' 'a-z')
    if ls logs/*_"${tag}"_*.txt >/dev/null 2>&1; then echo "have $tag"; return; fi
    echo "run  $tag"
    env $settings PRESET=cpu NUM_ITERATIONS="$STEPS" VAL_EVERY=$((STEPS / 2)) RUN_TAG="$tag" LOG_DIR=logs \
        OMP_NUM_THREADS=1 TRAIN_FILES="$REPO/data/embedded/train_*.bin" VAL_FILES="$REPO/data/embedded/val_*.bin" \
        "$PY" "$REPO/train_gpt.py" > /dev/null
}
export -f run_one
export PY REPO STEPS
printf '%s\n' "${runs[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {}
"$PY" plot.py logs sweep.png
