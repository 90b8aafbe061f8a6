#!/usr/bin/env bash
# ./run.sh [train|test|data|bench|validate] [args...]  - sets up what is missing, then runs. See README.md.
#   train (default)  the speedrun with torchrun on every GPU, or the `cpu` preset on the embedded corpus without one
#   test             installs the test requirements and runs the pytest suite (args go to pytest)
#   data             FineWeb shards with GPUs (args: number of train shards, default 9); the embedded corpus without
#   bench            runs every script in bench/ (each prints ratios measured side by side)
#   validate         python records/validate.py with the args (default: logs/)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_MIN=2.11
command=${1:-train}
[ $# -gt 0 ] && shift

have_torch() {
    "$PY" - "$TORCH_MIN" <<'PY' 2>/dev/null
import sys
import torch
version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if version >= tuple(int(p) for p in sys.argv[1].split(".")) else 1)
PY
}

ensure_requirements() {
    # An installed torch >= TORCH_MIN is reused (GPU machines ship their own CUDA build); only the rest is pinned.
    if have_torch; then
        if ! "$PY" -c "import numpy, tiktoken, huggingface_hub, scipy" 2>/dev/null; then
            echo "run.sh: installing requirements.txt (keeping the installed torch)"
            grep -v '^torch==' requirements.txt | "$PY" -m pip install -q -r /dev/stdin
        fi
    else
        echo "run.sh: no torch >= $TORCH_MIN found; installing requirements.txt"
        "$PY" -m pip install -q -r requirements.txt
    fi
}

num_gpus() {
    "$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
}

get_data() {
    if [ "$(num_gpus)" -gt 0 ]; then
        "$PY" data/cached_fineweb10B.py "$@"
    else
        "$PY" data/build_corpus.py "$@"
    fi
}

case "$command" in
    train)
        ensure_requirements
        gpus=$(num_gpus)
        if [ "$gpus" -gt 0 ]; then
            ls data/fineweb10B/fineweb_val_*.bin >/dev/null 2>&1 || get_data
            exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$gpus" train_gpt.py "$@"
        fi
        get_data
        echo "run.sh: no GPU: training the cpu preset on the embedded corpus (PRESET, NUM_ITERATIONS, ... change it)"
        exec "$PY" train_gpt.py "$@"
        ;;
    test)
        ensure_requirements
        "$PY" -c "import pytest, matplotlib" 2>/dev/null || "$PY" -m pip install -q -r tests/requirements.txt
        exec "$PY" -m pytest -q "$@"
        ;;
    data)
        ensure_requirements
        get_data "$@"
        ;;
    bench)
        ensure_requirements
        for script in bench/*.py; do
            echo "== $script"
            "$PY" "$script" "$@"
        done
        ;;
    validate)
        ensure_requirements
        exec "$PY" records/validate.py "${@:-logs/}"
        ;;
    *)
        echo "run.sh: unknown command '$command'; use one of: train, test, data, bench, validate" >&2
        exit 2
        ;;
esac
