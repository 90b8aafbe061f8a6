#!/usr/bin/env bash
# The normalization x optimizer ablation: (rmsnorm, derf, dyt) x (adamw, muon), plus Derf's two remedies under
# Muon (NORM_ALPHA=0.3 and the EMA-blend scale NORM=derf_ema), 3 seeds each, on the `ablation` preset with
# DIAGNOSTICS=1. Logs go to ./logs/; then validate.py --by NORM,OPTIMIZER writes validate_by.txt, and analyze.py
# writes table.txt and the figures. A run whose log is complete is not run again, so the script resumes after an
# interruption.
#   ./study.sh                          # the study as committed (JOBS=2 runs at a time, one thread each)
#   PRESET=cpu SEEDS="0 1 2 3" ./study.sh   # another preset or more seeds (on a GPU: a bigger preset, and
#                                           # TRAIN_FILES/VAL_FILES for FineWeb; default: the embedded corpus)
#   JOBS=1 THREADS=2 ./study.sh         # one run at a time on two threads
set -euo pipefail
cd "$(dirname "$0")"
REPO=${REPO:-../..}
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
PRESET=${PRESET:-ablation}
SEEDS=${SEEDS:-"0 1 2"}
TRAIN_FILES=${TRAIN_FILES:-$REPO/data/embedded/train_*.bin}  # quoted globs, expanded by train_gpt.py
VAL_FILES=${VAL_FILES:-$REPO/data/embedded/val_*.bin}
CELLS=(
    "NORM=rmsnorm OPTIMIZER=adamw"
    "NORM=derf OPTIMIZER=adamw"
    "NORM=rmsnorm OPTIMIZER=muon"
    "NORM=derf OPTIMIZER=muon"
    "NORM=derf NORM_ALPHA=0.3 OPTIMIZER=muon"
    "NORM=derf_ema OPTIMIZER=muon"
    "NORM=dyt OPTIMIZER=muon"
    "NORM=dyt OPTIMIZER=adamw"
)
mkdir -p logs
runs=()
for seed in $SEEDS; do  # seed-major: an interrupted study still has every cell at the same number of seeds
    for cell in "${CELLS[@]}"; do runs+=("$cell SEED=$seed"); done
done
run_one() {
    local settings=$1 tag log
    tag=$(echo "$PRESET $settings" | tr ' =' '_-' | tr 'A-Z' 'a-z')
    for log in logs/*_"${tag}"_*.txt; do
        [ -e "$log" ] || continue
        if grep -q '"status": "complete"' "$log"; then echo "have $tag"; return; fi
        rm -f "$log"  # an interrupted run: start it again
    done
    echo "run  $tag"
    env $settings PRESET="$PRESET" DIAGNOSTICS=1 RUN_TAG="$tag" LOG_DIR=logs OMP_NUM_THREADS="$THREADS" \
        TRAIN_FILES="$TRAIN_FILES" VAL_FILES="$VAL_FILES" \
        "$PY" "$REPO/train_gpt.py" > /dev/null
}
export -f run_one
export PY REPO PRESET THREADS TRAIN_FILES VAL_FILES
printf '%s\n' "${runs[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {}
set +e
"$PY" "$REPO/records/validate.py" --by NORM,OPTIMIZER logs > validate_by.txt
status=$?
set -e
[ $status -le 1 ] || { echo "validate.py failed (exit $status)" >&2; exit $status; }
cat validate_by.txt
"$PY" analyze.py logs .
