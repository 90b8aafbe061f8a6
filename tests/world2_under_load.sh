#!/usr/bin/env bash
# tests/world2_under_load.sh [N] - the world-2 run of tests/test_train.py::test_world2_run_writes_one_log_by_rank0
# (torchrun, 2 gloo ranks, the test preset, 4 steps) N times in a row (default 30) while a cpu-preset training run on
# 2 threads, not niced, loads both cores: the check that no rank aborts at exit (`terminate called without an
# active exception`) on a loaded machine. One line per run, then the count; exit 1 if any run failed.
# PYTHON: the interpreter (default: the project's .venv, as ./run.sh makes it). Needs data/embedded (./run.sh data).
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-30}
PY=${PYTHON:-.venv/bin/python}
root=$(mktemp -d /tmp/world2_under_load.XXXXXX)
# the test's synthetic shards (two train, one val), as tests/conftest.py writes them
"$PY" -c "import sys; sys.path[:0] = ['tests', '.']; from pathlib import Path; \
from conftest import write_shards; write_shards(Path(sys.argv[1]))" "$root" || exit 2
OMP_NUM_THREADS=2 PRESET=cpu NUM_ITERATIONS=100000 LOG_DIR="$root/load" "$PY" train_gpt.py >"$root/load.out" 2>&1 &
load=$!
trap 'kill $load 2>/dev/null' EXIT
sleep 20  # the load past its setup, training
ok=0
for i in $(seq 1 "$N"); do
    out="$root/run$i"
    mkdir -p "$out"
    env PRESET=test TRAIN_FILES="$root/data/train_*.bin" VAL_FILES="$root/data/val_*.bin" LOG_DIR="$out/logs" \
        OMP_NUM_THREADS=1 OPTIMIZER=adamw NUM_ITERATIONS=4 RUN_TAG=w2 \
        "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 train_gpt.py >"$out/out.txt" 2>&1
    rc=$?
    # a pass: torchrun exit 0, rank 0's log complete, and no rank's C++ abort in the output
    if [ $rc = 0 ] && grep -q '"status": "complete"' "$out"/logs/*.txt && ! grep -q "terminate called" "$out/out.txt"
    then
        ok=$((ok + 1)); echo "run $i: ok"
    else
        echo "run $i: FAILED (torchrun exit $rc; output: $out/out.txt)"; tail -n 5 "$out/out.txt"
    fi
done
kill -0 $load 2>/dev/null || echo "note: the load run ended early: $root/load.out"
echo "world-2 runs: $ok of $N ok while a cpu-preset run loaded both cores"
[ "$ok" = "$N" ]
