#!/usr/bin/env bash
# tests/matrix.sh [pytest args...] - the README's test command (./run.sh test) in a fresh clone of HEAD for every
# Python on this machine and for the torch releases we claim, one row per combination:
#   - the distribution's python3 (/usr/bin/python3) and each `pyenv versions` interpreter, with the pinned torch
#     (requirements.txt): run.sh makes .venv from it as on a stock machine (an unsupported one is refused in one line);
#   - Python 3.12 (the GPU machine's) with torch 2.11 (TORCH_MIN) and the newest release, installed into .venv first,
#     which run.sh then reuses as it reuses a GPU machine's torch.
# Each combination's whole output goes to $MATRIX_OUT/<python>_<torch>.log (default /tmp/matrix); the table is
# printed as it goes and again at the end. Pytest args (e.g. -k test_config) narrow every run, and MATRIX_ONLY (a
# regex on the labels, e.g. 'system|3.10') picks combinations, for a quick try.
# Needs the network for the wheels (PyPI's torch for Python != 3.11 is a CUDA build: ~3 GB per version, cached).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${MATRIX_OUT:-/tmp/matrix}
NEWEST_TORCH=${NEWEST_TORCH:-2.15.0}
OLDEST_TORCH=${OLDEST_TORCH:-2.11.0}
STOCK_PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin  # a stock user's PATH: no pyenv shims
mkdir -p "$OUT"
PINNED=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' "$REPO/requirements.txt")
rows=()

row() {  # python torch passed failed skipped wall note
    local line
    line=$(printf '| %-8s | %-12s | %6s | %6s | %7s | %7s | %s' "$@")
    rows+=("$line")
    echo "$line"
}

summary_counts() {  # "passed failed skipped" from a pytest log's last summary line
    local last
    last=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed).* =+$|[0-9]+ passed' "$1" | tail -n 1)
    local passed failed skipped errors
    passed=$(grep -oE '[0-9]+ passed' <<<"$last" | cut -d' ' -f1)
    failed=$(grep -oE '[0-9]+ failed' <<<"$last" | cut -d' ' -f1)
    errors=$(grep -oE '[0-9]+ errors?' <<<"$last" | cut -d' ' -f1)
    skipped=$(grep -oE '[0-9]+ skipped' <<<"$last" | cut -d' ' -f1)
    echo "${passed:-0} $(( ${failed:-0} + ${errors:-0} )) ${skipped:-0}"
}

# run_combination <label> <python3 to put first on PATH, or "stock"> <torch to preinstall, or "">
run_combination() {
    local label=$1 python=$2 torch=$3 clone bin log start wall rc version counts note
    shift 3
    if [ -n "${MATRIX_ONLY:-}" ] && ! grep -qE "$MATRIX_ONLY" <<<"$label"; then
        return
    fi
    clone=$(mktemp -d /tmp/matrix_clone.XXXXXX)
    git clone -q "$REPO" "$clone"
    log="$OUT/${label// /_}.log"
    bin="$clone.bin"
    mkdir -p "$bin"
    local path=$STOCK_PATH
    if [ "$python" != stock ]; then
        ln -s "$python" "$bin/python3"
        path="$bin:$STOCK_PATH"
    fi
    version=$(PATH=$path python3 -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?')
    start=$(date +%s)
    if [ -n "$torch" ]; then  # the torch a GPU machine would bring: in .venv before run.sh looks
        # PIP_CONFIG_FILE=/dev/null: this workplace's pip config caps torch below the newest release
        (cd "$clone" && PATH=$path python3 -m venv --system-site-packages .venv \
            && PIP_CONFIG_FILE=/dev/null .venv/bin/python -m pip install -q "torch==$torch") >"$log" 2>&1 \
            || { row "$version" "$torch" - - - - "torch $torch did not install (see $log)"; rm -rf "$clone" "$bin"
                 return; }
    fi
    (cd "$clone" && env -i HOME="$HOME" PATH="$path" CI="${CI:-}" ./run.sh test "$@") >>"$log" 2>&1
    rc=$?
    wall=$(( $(date +%s) - start ))
    counts=$(summary_counts "$log")
    note="exit $rc at $(git -C "$clone" rev-parse --short HEAD)"
    if [ "$rc" = 2 ] && grep -q '^run.sh: ' "$log"; then
        note="refused: $(grep -m1 '^run.sh: ' "$log" | cut -c1-100)"
        counts="- - -"
    fi
    torch=${torch:-$( "$clone/.venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo -)}
    # shellcheck disable=SC2086
    row "$version" "$torch" $counts "$(( wall / 60 ))m$(( wall % 60 ))s" "$note"
    rm -rf "$clone" "$bin"
}

echo "| python   | torch        | passed | failed | skipped | wall    | note"
echo "|----------|--------------|--------|--------|---------|---------|-----"
if [ -x /usr/bin/python3 ]; then
    run_combination "system_$(/usr/bin/python3 -c 'import platform; print(platform.python_version())')" stock "" "$@"
else
    row - - - - - - "no /usr/bin/python3 on this machine"
fi
pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
if command -v pyenv >/dev/null 2>&1 || [ -d "$pyenv_root/versions" ]; then
    for version in $(ls "$pyenv_root/versions" 2>/dev/null); do
        run_combination "pyenv_$version" "$pyenv_root/versions/$version/bin/python" "" "$@"
    done
else
    row - - - - - - "no pyenv on this machine"
fi
py312=$(ls -d "$pyenv_root"/versions/3.12* 2>/dev/null | tail -n 1)
for torch in "$OLDEST_TORCH" "$NEWEST_TORCH"; do
    [ "$torch" = "$PINNED" ] && continue
    if [ -n "$py312" ]; then
        run_combination "pyenv_$(basename "$py312")_torch$torch" "$py312/bin/python" "$torch" "$@"
    else
        row 3.12 "$torch" - - - - "no Python 3.12 on this machine"
    fi
done
echo
echo "| python   | torch        | passed | failed | skipped | wall    | note"
echo "|----------|--------------|--------|--------|---------|---------|-----"
printf '%s\n' "${rows[@]}"
