"""Runs a fixed list of short seeded configs with a given train_gpt.py and writes their logs' step, diag and final
lines with the timing fields stripped, so that two versions of the file can be compared line by line (a refactor
that should not change behaviour gives an empty diff).

    cp train_gpt.py /tmp/before.py                        # before the edit
    python scripts/same_logs.py /tmp/before.py /tmp/before.txt
    python scripts/same_logs.py train_gpt.py /tmp/after.txt
    diff /tmp/before.txt /tmp/after.txt

The configs: the test preset with every optimizer x every norm (with DIAGNOSTICS=1), MOMO=1 with every optimizer,
and a plain run; the cpu preset (on synthetic GPT-2-vocab shards: data/embedded's tokenizer may be missing) and the
research preset (data/embedded_bytes: python data/build_corpus.py --bytes) for a few steps with every optimizer, the
other norms, and MOMO=1 with DIAGNOSTICS=1. Every run is single-threaded (OMP_NUM_THREADS=1), so a seed gives the
same numbers each time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import write_shards  # noqa: E402  (the suite's synthetic shards, so the runs match the tests' data)

OPTIMIZERS = ("normuon", "muon", "adamw", "muonmax")
NORMS = ("rmsnorm", "dyt", "derf", "derf_ema")
SHORT = dict(NUM_ITERATIONS="4", VAL_EVERY="2", TRAIN_LOG_EVERY="1", DIAG_EVERY="0")
# cpu-shaped runs read the synthetic shards (8,000 val tokens), so their validation is cut to fit
CPU = dict(PRESET="cpu", VAL_TOKENS="4096", VAL_BATCH_TOKENS="2048", **SHORT)
RESEARCH = dict(PRESET="research", TRAIN_FILES=str(REPO / "data/embedded_bytes/train_*.bin"),
                VAL_FILES=str(REPO / "data/embedded_bytes/val_*.bin"), VAL_TOKENS="4096", **SHORT)
KEPT_LINES = ("step:", "diag:", "final:")
# the wall-clock fields of step lines ("train_time:12ms", "step_avg:3.1ms", "(534 tok/s, eta 0m00s)") and final lines
TIMING = [re.compile(p) for p in (r" train_time:\S+", r" step_avg:\S+", r" +\(\d+ tok/s, eta [^)]*\)",
                                  r', "train_time_ms": [^,}]+', r', "step_avg_ms": [^,}]+')]


def configs() -> dict[str, dict[str, str]]:
    """{name: the flags of that run}; test-preset runs also get the synthetic shards (see run)."""
    runs = {"test-plain": dict(PRESET="test")}
    for optimizer in OPTIMIZERS:
        for norm in NORMS:
            runs[f"test-{optimizer}-{norm}-diag"] = dict(PRESET="test", OPTIMIZER=optimizer, NORM=norm, DIAGNOSTICS="1")
        runs[f"test-{optimizer}-momo"] = dict(PRESET="test", OPTIMIZER=optimizer, MOMO="1")
        runs[f"cpu-{optimizer}"] = dict(CPU, OPTIMIZER=optimizer)
        runs[f"research-{optimizer}"] = dict(RESEARCH, OPTIMIZER=optimizer)
    for norm in NORMS[1:]:
        runs[f"cpu-{norm}"] = dict(CPU, NORM=norm)
        runs[f"research-{norm}"] = dict(RESEARCH, NORM=norm)
    runs["cpu-momo-diag"] = dict(CPU, MOMO="1", DIAGNOSTICS="1")
    runs["research-muonmax-derf_ema-momo-diag"] = dict(RESEARCH, OPTIMIZER="muonmax", NORM="derf_ema", MOMO="1",
                                                       DIAGNOSTICS="1")
    return runs


def kept_lines(log: str) -> list[str]:
    """The log's step, diag and final lines after the embedded source, without their timing fields."""
    body = log.split("\n" + "=" * 100 + "\n", 1)[1]
    lines = [line for line in body.splitlines() if line.startswith(KEPT_LINES)]
    for pattern in TIMING:
        lines = [pattern.sub("", line) for line in lines]
    return lines


def run(script: Path, name: str, flags: dict[str, str], shards: Path, root: Path) -> list[str]:
    log_dir = root / name
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(TRAIN_FILES=str(shards / "train_*.bin"), VAL_FILES=str(shards / "val_*.bin"), LOG_DIR=str(log_dir),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", COMPILE="0")
    env.update(flags)
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        return [f"{name}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"]
    (log,) = log_dir.glob("*.txt")
    return [f"{name}: {line}" for line in kept_lines(log.read_text())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", type=Path, help="the train_gpt.py to run")
    parser.add_argument("out", type=Path, help="file to write the stripped lines into")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("-k", "--only", default="", help="only the configs whose name contains this")
    args = parser.parse_args()
    runs = {name: flags for name, flags in configs().items() if args.only in name}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = write_shards(root)
        with ThreadPoolExecutor(args.jobs) as pool:
            outputs = pool.map(lambda item: run(args.script.resolve(), *item, shards, root), runs.items())
            lines = [line for output in outputs for line in output]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"{len(runs)} configs, {len(lines)} lines -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
