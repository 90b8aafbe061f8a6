"""Runs a study: a grid of env flags (or a list of cells) times seeds, N runs at a time, resumable; then
records/validate.py on its logs.

    python records/study.py --out records/my_study --grid NORM=rmsnorm,derf OPTIMIZER=adamw,muon --seeds 0,1,2 \
        PRESET=ablation DIAGNOSTICS=1                # 4 cells x 3 seeds, then validate.py --by NORM,OPTIMIZER
    python records/study.py --out records/my_study --cells records/my_study/cells.txt PRESET=cpu   # listed cells
    python records/study.py --out records/new_record --seeds 0,1,2,3,4 --baseline records/old_record
                                                     # the record workflow: N seeds of one config, then
                                                     # validate.py on them and --compare against the baseline

A run is train_gpt.py with the fixed flags (KEY=VALUE arguments), its cell's flags and SEED, logging into OUT/logs
with RUN_TAG = the cell's and seed's flags, lower case ("norm-derf_optimizer-muon_seed-1", after --tag-prefix;
without --seeds no SEED is set or tagged). A run whose log holds its `final:` line, or a `stopped:` line for a non-
finite loss (a diverged run is a result), is not run again; a half-written one is renamed to `<log>.incomplete` and
run again. TRAIN_FILES and VAL_FILES default to the embedded corpus (its bytes with PRESET=research). Runs go
seed-major (an interrupted study has every cell at the same number of seeds), --jobs at a time with the machine's
cores split between them (OMP_NUM_THREADS). After the runs: `validate.py --by` the grid's keys (or --by) into
OUT/validate_by.txt, or with one cell `validate.py` (the record test) into OUT/validate.txt, and with --baseline
`validate.py --compare BASELINE OUT/logs` into OUT/validate_compare.txt; each is printed.

Exit codes: 0 every run done and validate.py ran; 1 a run failed (the others still ran); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINER = REPO / "train_gpt.py"
VALIDATE = REPO / "records" / "validate.py"
# The embedded corpus (data/build_corpus.py): GPT-2 tokens, or bytes for PRESET=research (--bytes).
DATA_FOLDER = {"research": "embedded_bytes"}


def default_data(preset: str | None) -> dict[str, str]:
    """TRAIN_FILES and VAL_FILES of the embedded corpus of the preset's kind, as absolute paths."""
    folder = REPO / "data" / DATA_FOLDER.get(preset or "", "embedded")
    return {"TRAIN_FILES": str(folder / "train_*.bin"), "VAL_FILES": str(folder / "val_*.bin")}


def parse_assignment(text: str, where: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not key.replace("_", "").isalnum() or key != key.upper():
        raise SystemExit(f"study.py: {where} '{text}': expected KEY=VALUE with an upper-case flag name (NORM=derf)")
    return key, value


def cells_from(grid: list[str], cells_file: str | None) -> list[dict[str, str]]:
    """The cells: the grid's product (keys in the order given), or the file's lines (one cell of KEY=VALUE words
    per line, # comments), or one empty cell."""
    if grid and cells_file:
        raise SystemExit("study.py: --grid and --cells: give one of them")
    if cells_file:
        path = Path(cells_file)
        if not path.is_file():
            raise SystemExit(f"study.py: --cells {cells_file}: no such file")
        lines = [line.split("#")[0].split() for line in path.read_text().splitlines()]
        return [dict(parse_assignment(word, f"{cells_file} cell") for word in line) for line in lines if line]
    axes = []
    for item in grid:
        key, values = parse_assignment(item, "--grid")
        if not values or "" in values.split(","):
            raise SystemExit(f"study.py: --grid {item}: expected KEY=v1,v2,...")
        if key in (axis[0][0] for axis in axes):
            raise SystemExit(f"study.py: --grid names {key} twice; give its values once: {key}=v1,v2")
        axes.append([(key, value) for value in values.split(",")])
    return [dict(combination) for combination in itertools.product(*axes)] if axes else [{}]


def run_tag(prefix: str, flags: dict[str, str]) -> str:
    words = ([prefix] if prefix else []) + [f"{key}-{value}" for key, value in flags.items()]
    return "_".join(words).lower()


def run_state(log_dir: Path, tag: str) -> tuple[str, list[Path]]:
    """("done", [log]) when a log of this tag ended (a final: line, or stopped on a non-finite loss), else
    ("todo", the tag's unfinished logs)."""
    # a log is <UTC stamp>_<tag>_<run id>.txt: its whole tag must be this one, since a cell that adds a flag to
    # another (MOMO=1 and MOMO=1 MOMO_LB=3.5) has a tag that holds the other's
    logs = sorted(log for log in log_dir.glob("*.txt") if log.stem.split("_", 1)[-1].rsplit("_", 1)[0] == tag)
    for log in logs:
        lines = log.read_text(errors="replace").splitlines()
        if any(line.startswith("final: ") or (line.startswith("stopped: ") and "non-finite" in line)
               for line in lines):
            return "done", [log]
    return "todo", logs


def final_loss(log: Path) -> str:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("final: "):
            return line.split('"val_loss": ')[1].split(",")[0]
        if line.startswith("stopped: "):
            return "diverged"
    return "?"


def validate(args: list[str], out: Path, name: str, python: str) -> int:
    """validate.py with args, its report printed and written to out/name; its exit code (0, 1: a verdict)."""
    result = subprocess.run([python, str(VALIDATE), *args], capture_output=True, text=True)
    text = result.stdout + (result.stderr if result.returncode > 1 else "")
    (out / name).write_text(text)
    print(f"== validate.py {' '.join(args)} -> {out / name}\n{text}", end="" if text.endswith("\n") else "\n")
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("fixed", nargs="*", metavar="KEY=VALUE", help="flags every run gets (PRESET=ablation ...)")
    parser.add_argument("--out", required=True, help="the study's folder: logs in OUT/logs, reports in OUT")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=v1,v2", help="the cells: every combination")
    parser.add_argument("--cells", help="a file of cells, one line of KEY=VALUE words each (instead of --grid)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated SEED values, each a run of every cell (default: no SEED flag, "
                             "train_gpt's seed 0, and no seed in the tags)")
    parser.add_argument("--shuffle-data", action="store_true",
                        help="each run's DATA_SEED is its SEED: seeds then vary the training documents' order as "
                             "well as the init (not in the tags; needs --seeds)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of a run (default: cores / jobs)")
    parser.add_argument("--by", default=None, help="validate.py --by keys (default: the grid's keys)")
    parser.add_argument("--baseline", default=None, help="a folder of logs to --compare the study's logs against")
    parser.add_argument("--tag-prefix", default="", help="first word of every RUN_TAG")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the runs (default: this one)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes a run (default 1: python train_gpt.py; N > 1: torchrun --standalone "
                             "--nproc_per_node=N, e.g. 8 with 8 GPUs and --jobs 1)")
    args = parser.parse_args(argv)

    given = dict(parse_assignment(item, "fixed flag") for item in args.fixed)
    fixed = {**default_data(given.get("PRESET")), **given}
    cells = cells_from(args.grid, args.cells)
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds is not None else [None]
    except ValueError:
        raise SystemExit(f"study.py: --seeds {args.seeds}: expected comma-separated integers (0,1,2)")
    if args.jobs < 1 or args.nproc < 1 or (args.threads is not None and args.threads < 1):
        raise SystemExit(f"study.py: --jobs {args.jobs} / --nproc {args.nproc} / --threads {args.threads}: "
                         "expected >= 1")
    if args.baseline and not Path(args.baseline).is_dir():
        raise SystemExit(f"study.py: --baseline {args.baseline}: no such folder")
    if args.shuffle_data and seeds == [None]:
        raise SystemExit("study.py: --shuffle-data sets each run's DATA_SEED to its SEED: give --seeds too")
    study_set = set(fixed) | {"SEED", "RUN_TAG", "LOG_DIR"} | ({"DATA_SEED"} if args.shuffle_data else set())
    clash = sorted({key for cell in cells for key in cell} & study_set)
    if clash:
        raise SystemExit(f"study.py: {', '.join(clash)} set both by a cell and by the study; set it in one place")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    out = Path(args.out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    runs = [{**cell, **({} if seed is None else {"SEED": str(seed)})} for seed in seeds for cell in cells]  # seed-major
    todo = []
    for flags in runs:
        tag = run_tag(args.tag_prefix, flags)
        state, logs = run_state(log_dir, tag)
        if state == "done":
            continue
        for log in logs:  # cut off: kept aside, never deleted
            log.rename(log.with_name(log.name + ".incomplete"))
        todo.append((tag, flags))
    print(f"study: {len(runs)} runs ({len(cells)} cells x {len(seeds)} seeds), {len(runs) - len(todo)} done, "
          f"{len(todo)} to run, {args.jobs} at a time on {threads} thread(s) each; logs in {log_dir}", flush=True)

    def run_one(tag: str, flags: dict[str, str]) -> tuple[str, int, float, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        env.update(fixed, **flags, RUN_TAG=tag, LOG_DIR=str(log_dir), OMP_NUM_THREADS=str(threads))
        if args.shuffle_data:
            env["DATA_SEED"] = flags["SEED"]
        started = time.perf_counter()
        launch = [args.python] if args.nproc == 1 else [args.python, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc_per_node={args.nproc}"]
        result = subprocess.run(launch + [str(TRAINER)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        return tag, result.returncode, time.perf_counter() - started, result.stderr[-1500:]

    failed = []
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, tag, flags) for tag, flags in todo]
        for finished, future in enumerate(concurrent.futures.as_completed(futures), 1):
            tag, returncode, seconds, stderr = future.result()
            state, logs = run_state(log_dir, tag)
            if state != "done":
                failed.append(tag)
                print(f"[{finished}/{len(todo)}] FAILED {tag} (exit {returncode}):\n{stderr}", flush=True)
                continue
            eta = (time.perf_counter() - started) / finished * (len(todo) - finished)
            print(f"[{finished}/{len(todo)}] {tag}: val_loss {final_loss(logs[0])} in {seconds:.0f} s; "
                  f"ETA {eta / 60:.1f} min", flush=True)
    if failed:
        print(f"study: {len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry them",
              file=sys.stderr)
        return 1

    by = args.by or ",".join(dict.fromkeys(key for cell in cells for key in cell))
    status = validate(["--by", by, str(log_dir)], out, "validate_by.txt", args.python) if by else \
        validate([str(log_dir)], out, "validate.txt", args.python)
    if args.baseline:
        status = max(status, validate(["--compare", args.baseline, str(log_dir)], out, "validate_compare.txt",
                                      args.python))
    return 0 if status <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
