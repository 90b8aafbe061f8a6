#!/usr/bin/env bash
# ./run.sh [train|test|smoke|data|bench|validate|help] [args...]  - sets up what is missing, then runs. See README.md.
#   train (default)  the speedrun with torchrun on every GPU, or the `cpu` preset on the embedded corpus without one
#                    (PRESET=research: its byte shards, then one process);
#                    flags are env vars (NORM=derf ./run.sh), listed by `./run.sh train --help`
#   test             installs the test requirements and runs the pytest suite (args go to pytest; CI runs this)
#   test --fast      the same, only the tests not marked slow (pytest -m "not slow"; slow: training runs, compiles,
#                    the studies re-derived from their logs): the math, the refusals, the state round trips
#   smoke            the first run on a GPU: python bench/smoke.py --budget 420 (SMOKE_BUDGET_S; the speedrun's
#                    longest phase timed first, then gradients, the other phases, validation, cuda tests; one
#                    verdict line each, the JSON rewritten after each), offline: with a GPU torch nothing is
#                    installed or fetched; no GPU: sets up, then one line
#   data             FineWeb shards with GPUs (args: number of train shards, default 9); the embedded corpus without
#   bench            runs every script in bench/ but smoke.py with the args (each prints figures measured side
#                    by side; --quick: tiny shapes on synthetic data, what tests/test_bench.py runs)
#   validate         python records/validate.py with the args (default: logs/)
#   help             this text (also -h, --help)
# Python: the project's .venv, made once from python3 with --system-site-packages (an installed torch, e.g. a GPU
# machine's CUDA build, is reused) and filled from requirements.txt with what is missing; an active virtual env
# instead when python3 is one; PYTHON=/path/to/python to use that interpreter as it is. Never the system Python's
# own site-packages (PEP 668).
set -euo pipefail
cd "$(dirname "$0")"
TORCH_MIN=2.11
PY_MIN_MINOR=11  # Python 3.11 to 3.13: the ones tests/matrix.sh runs the suite on (README: Supported versions)
PY_MAX_MINOR=13
VENV=.venv
command=${1:-train}
[ $# -gt 0 ] && shift

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "run.sh: $*" >&2; exit 2; }

in_venv() {  # $1 runs inside a virtual env, where pip installs stay in the env
    "$1" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)' 2>/dev/null
}

externally_managed() {  # $1 is a distribution's Python that refuses pip installs (PEP 668)
    "$1" -c 'import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.isfile(marker) else 1)' 2>/dev/null
}

choose_python() {  # sets PY; makes .venv (no network: pip comes later, only when something must be installed)
    if [ -n "${PYTHON:-}" ]; then
        command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON: no such interpreter; unset PYTHON to use $VENV"
        PY=$PYTHON
        return
    fi
    command -v python3 >/dev/null || die "no python3 on PATH: install Python 3.$PY_MIN_MINOR to 3.$PY_MAX_MINOR (Debian/Ubuntu: sudo apt install \
python3 python3-venv), or set PYTHON=/path/to/python"
    if in_venv python3; then
        PY=python3
        return
    fi
    PY=$VENV/bin/python
    if "$PY" -c '' 2>/dev/null; then
        return
    fi
    check_version python3 "$VENV is made from python3 on PATH"  # before anything is made or installed
    if [ -e "$VENV" ]; then
        [ -f "$VENV/pyvenv.cfg" ] || die "$VENV exists but is not a virtual env; move it away, or set PYTHON="
        echo "run.sh: $VENV does not start (its Python moved?); making it again"
        rm -rf "$VENV"
    fi
    echo "run.sh: making $VENV from $(command -v python3) with --system-site-packages (its packages are reused)"
    python3 -m venv --system-site-packages --without-pip "$VENV" 2>"$VENV.err" || {
        last=$(tail -n 1 "$VENV.err"); rm -rf "$VENV" "$VENV.err"
        die "python3 -m venv failed ($last): install the venv module (Debian/Ubuntu: sudo apt install python3-venv), \
or set PYTHON=/path/to/python"
    }
    rm -f "$VENV.err"
}

check_version() {  # $1: the interpreter; one line and exit 2 outside the Pythons the suite is run on (README)
    local version major minor
    version=$("$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || die "$1 does not start"
    IFS=. read -r major minor _ <<<"$version"
    if [ "$major" != 3 ] || [ "$minor" -lt "$PY_MIN_MINOR" ] || [ "$minor" -gt "$PY_MAX_MINOR" ]; then
        die "$1 is Python $version; train_gpt.py supports Python 3.$PY_MIN_MINOR to 3.$PY_MAX_MINOR: install one \
and set PYTHON=/path/to/it${2:+ ($2)}"
    fi
}

ensure_pip() {  # pip for $PY: the visible one (a system pip serves .venv through --system-site-packages) or ensurepip
    "$PY" -m pip --version >/dev/null 2>&1 && return
    [ "$PY" = "$VENV/bin/python" ] || die "$PY has no pip: install pip for it, or unset PYTHON to use $VENV"
    echo "run.sh: putting pip into $VENV (ensurepip)"
    "$PY" -m ensurepip --default-pip >/dev/null 2>&1 || die "python3 has neither pip nor ensurepip, so $VENV gets no \
pip: install python3-venv (Debian/Ubuntu: sudo apt install python3-venv), then rerun"
}

pip_install() {  # pip install "$@" into $PY's environment, never into a distribution's own Python
    if [ "$PY" != "$VENV/bin/python" ] && externally_managed "$PY"; then
        die "$PY is externally managed (PEP 668), so run.sh installs nothing into it; unset PYTHON to use $VENV \
(made with --system-site-packages, so $PY's own packages stay visible), or point PYTHON at a virtual env's python"
    fi
    ensure_pip
    "$PY" -m pip install -q "$@"
}

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
            echo "run.sh: installing requirements.txt into $PY (keeping the installed torch)"
            pip_install -r <(grep -v '^torch==' requirements.txt)
        fi
    else
        echo "run.sh: no torch >= $TORCH_MIN found; installing requirements.txt into $PY"
        pip_install -r requirements.txt
    fi
}

train_help() {  # the flags without installing or fetching anything
    if "$PY" -c "import numpy, torch" 2>/dev/null; then
        exec "$PY" train_gpt.py --help
    fi
    usage
    echo
    echo "Flags: env vars, listed in docs/flags.md and by \`python train_gpt.py --help\` once torch is installed"
    echo "(./run.sh test or ./run.sh data installs it)."
}

num_gpus() {
    "$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
}

get_data() {
    if [ "$(num_gpus)" -gt 0 ]; then
        "$PY" data/cached_fineweb10B.py "$@"
    else
        ensure_pip  # the corpus builder fetches the GPT-2 tokenizer's ranks file through pip when it is missing
        "$PY" data/build_corpus.py "$@"
    fi
}

case "$command" in
    help|-h|--help)
        usage
        exit 0
        ;;
    train)
        case "${1:-}" in
            ""|-h|--help|help) ;;
            *) die "train takes no arguments ('$1'): its flags are env vars (NORM=derf ./run.sh), listed by \
./run.sh train --help" ;;
        esac
        choose_python
        check_version "$PY" "$([ "$PY" = "$VENV/bin/python" ] && echo "$VENV was made from it: rm -rf $VENV first")"
        ;;
    test|smoke|data|bench|validate)
        choose_python
        check_version "$PY" "$([ "$PY" = "$VENV/bin/python" ] && echo "$VENV was made from it: rm -rf $VENV first")"
        ;;
    *)
        die "unknown command '$command'; use one of: train, test, smoke, data, bench, validate, help"
        ;;
esac

case "$command" in
    train)
        # #48's allocator setting, before any process touches CUDA (train_gpt.py sets the same default itself)
        export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}
        if [ $# -gt 0 ]; then  # --help
            train_help
            exit 0
        fi
        ensure_requirements
        "$PY" train_gpt.py --check  # a bad flag stops here (exit 2), before any data is fetched or built
        if [ "${PRESET:-}" = research ]; then  # its own data: the embedded corpus's bytes, on any machine
            "$PY" data/build_corpus.py --bytes
            echo "run.sh: training the research preset on the embedded corpus's bytes (one process)"
            exec "$PY" train_gpt.py
        fi
        gpus=$(num_gpus)
        if [ "$gpus" -gt 0 ]; then
            ls data/fineweb10B/fineweb_val_*.bin >/dev/null 2>&1 || get_data
            exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$gpus" train_gpt.py
        fi
        get_data
        echo "run.sh: no GPU: training the cpu preset on the embedded corpus (PRESET, NUM_ITERATIONS, ... change it)"
        exec "$PY" train_gpt.py
        ;;
    test)
        ensure_requirements
        "$PY" -c "import pytest, matplotlib" 2>/dev/null || pip_install -r tests/requirements.txt
        if [ "${1:-}" = --fast ]; then  # the tests not marked slow; CI (.ci/run) runs the whole suite
            shift
            exec "$PY" -m pytest -q -m "not slow" "$@"
        fi
        exec "$PY" -m pytest -q "$@"
        ;;
    smoke)
        if have_torch && [ "$(num_gpus)" -gt 0 ]; then
            # A GPU machine is lent for minutes and may have no network: nothing is installed or fetched. The
            # embedded corpus is built only from a tokenizer already on disk; otherwise the smoke trains on random
            # documents (and says so). A missing pytest, tiktoken or scipy skips what needs it.
            if [[ " $* " != *" --quick "* ]] && ! out=$("$PY" data/build_corpus.py --offline 2>&1 | tee /dev/stderr); then
                echo "run.sh: no embedded corpus offline (${out##*$'\n'}): the smoke trains on random documents"
            fi
            [[ " $* " == *" --budget"* ]] || set -- --budget "${SMOKE_BUDGET_S:-420}" "$@"
            exec "$PY" bench/smoke.py "$@"
        fi
        ensure_requirements
        exec "$PY" bench/smoke.py "$@"
        ;;
    data)
        ensure_requirements
        get_data "$@"
        ;;
    bench)
        ensure_requirements
        if [[ " $* " != *" --quick "* ]]; then  # bench/step.py times the default preset on its shards
            if [ "$(num_gpus)" -gt 0 ]; then
                ls data/fineweb10B/fineweb_val_*.bin >/dev/null 2>&1 || get_data
            else
                get_data
            fi
        fi
        for script in bench/*.py; do
            [ "$script" = bench/smoke.py ] && continue  # ./run.sh smoke: checks first, then times
            echo "== $script"
            "$PY" "$script" "$@"
        done
        ;;
    validate)
        ensure_requirements
        exec "$PY" records/validate.py "${@:-logs/}"
        ;;
esac
