"""Bench: milliseconds per training step of a preset on this machine, split into data, forward+backward and
optimizer, with tokens/s and MFU.

    python bench/step.py                          # CPU: the `cpu` preset on data/embedded (python data/build_corpus.py)
    python bench/step.py                          # GPU: the `speedrun` preset on data/fineweb10B, one process
    python bench/step.py --synthetic              # random BOS-led documents in a temp dir instead of the shards
    python bench/step.py --preset cpu --steps 50  # more timed steps per schedule phase
    NORM=derf python bench/step.py                # env overrides apply, as for train_gpt.py
    python bench/step.py --quick                  # the `test` preset, synthetic data, a few steps (what tests run)

It builds the run as train_gpt.main does (parse_env, resolve_auto, setup; warmup when COMPILE is on) in ONE
process (world size 1: an 8-GPU speedrun step runs 1/8 of these forwards on each GPU). Each schedule phase (global
batch, long window) gets its own row. Two ways of running T.train_step alternate on the same state, a cycle of each
at a time (a cycle: as many steps as it takes every optimizer to step, so Adam's every-other-step is in every figure):

  train_step  T.train_step, the device synchronized only before and after: the figure a run pays.
  split       T.train_step cut in three, the device synchronized at each cut (part_marks: a wrapper around
              state.step_model marks the first forward, one around T.set_schedule the end of the last backward):
              data (loader, first host-to-device copy), fwd+bwd (every chunk), optimizer (schedule, every
              optimizer's step, norm scales). Nothing of the step is copied here, so it cannot drift from
              train_step; a train_step whose order no longer has these cuts stops the bench with a message. Before
              timing, CHECK_STEPS cut steps on a fresh state must give the same losses and parameters as plain
              train_steps on another (exactly on CPU): the cuts change nothing.

Each figure is the median over cycles, per step. tokens/s and MFU come from train_step. MFU = 6 * N * tokens /
time / peak, N the matmul parameters (qkvo, c_fc, c_proj, lm_head; not embeddings, gates or scalars; attention's
T^2 FLOPs not counted). The peak is --peak-tflops, else a known GPU's bf16 dense peak (H100 SXM, H200: 989), else
on CPU a measured fp32 matmul rate at this thread count. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402

CHECK_STEPS = 3  # losses of steps 0-2 see the updates of steps 0 and 1: NorMuon's, and Adam's at ADAM_STEP_EVERY=2
# bf16 dense tensor-core peaks (TFLOP/s) by a substring of torch.cuda.get_device_name, first match wins
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
SYNTHETIC_DOC_TOKENS = (16, 2000)  # document lengths, uniform: about FineWeb's mean of ~1k tokens
LAUNCH_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def write_synthetic_shards(hp: T.Hyperparameters, folder: Path, seed: int = 0) -> T.Hyperparameters:
    """Writes one train and one val shard of random documents (each led by BOS) into folder, sized for hp's batch
    and validation, and returns hp reading them."""
    rng = np.random.default_rng(seed)
    paths = {}
    # train: two of the largest steps, and at least 64 of the longest documents, so that a small preset's shard
    # holds more than a handful of documents
    train_count = max(2 * max(hp.batch_schedule) + 4 * hp.max_seq_len, 64 * SYNTHETIC_DOC_TOKENS[1])
    for split, count in (("train", train_count), ("val", hp.val_tokens + 1)):
        tokens = rng.integers(0, hp.bos_id, size=count, dtype=np.uint16)
        lengths = rng.integers(*SYNTHETIC_DOC_TOKENS, size=count // SYNTHETIC_DOC_TOKENS[0] + 1)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        tokens[starts[starts < count]] = hp.bos_id  # the first token is a BOS: the loader starts at documents
        header = np.zeros(T.SHARD_HEADER_INTS, dtype=np.int32)
        header[:3] = (T.SHARD_MAGIC, T.SHARD_VERSION, count)
        paths[split] = folder / f"{split}_000000.bin"
        paths[split].write_bytes(header.tobytes() + tokens.tobytes())
    return dataclasses.replace(hp, train_files=str(paths["train"]), val_files=str(paths["val"]))


@contextlib.contextmanager
def part_marks(state: T.TrainState) -> Iterator[dict[str, float]]:
    """Inside, T.train_step records (device synchronized first) when its first forward starts and when it calls
    T.set_schedule: the loop's one call between the last backward and the optimizer steps."""
    marks: dict[str, float] = {}
    step_model, set_schedule = state.step_model, T.set_schedule

    def forward(*args, **kwargs):
        if "forward" not in marks:
            T.synchronize(state.device)
            marks["forward"] = time.perf_counter()
        return step_model(*args, **kwargs)

    def schedule(*args, **kwargs):
        T.synchronize(state.device)
        marks["schedule"] = time.perf_counter()
        return set_schedule(*args, **kwargs)

    state.step_model, T.set_schedule = forward, schedule
    try:
        yield marks
    finally:
        state.step_model, T.set_schedule = step_model, set_schedule


def split_step(state: T.TrainState, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """One T.train_step, cut at its first forward and at its set_schedule call, the device synchronized at each
    cut: (its loss, seconds of data, fwd+bwd and optimizer)."""
    with part_marks(state) as marks:
        T.synchronize(state.device)
        start = time.perf_counter()
        loss = T.train_step(state, step)
        T.synchronize(state.device)
        end = time.perf_counter()
    if set(marks) != {"forward", "schedule"} or not start <= marks["forward"] <= marks["schedule"] <= end:
        raise SystemExit(f"bench/step.py: train_step no longer runs its forwards through state.step_model and then "
                         f"calls T.set_schedule once before the optimizers (marks seen: {sorted(marks)}); move the "
                         f"cuts in part_marks to the new boundaries")
    return loss, {"data": marks["forward"] - start, "fwd+bwd": marks["schedule"] - marks["forward"],
                  "optimizer": end - marks["schedule"]}


def whole_step(state: T.TrainState, step: int) -> float:
    """Seconds of one T.train_step, the device synchronized before and after."""
    T.synchronize(state.device)
    start = time.perf_counter()
    T.train_step(state, step)
    T.synchronize(state.device)
    return time.perf_counter() - start


def check_split(hp: T.Hyperparameters, launch: T.Launch, state: T.TrainState) -> str:
    """Runs CHECK_STEPS split steps on `state` (fresh) and plain T.train_steps on a second fresh state; raises
    SystemExit unless losses and parameters agree (exactly on CPU; 1e-3 relative on CUDA, whose backward is not
    deterministic). Returns a line saying what was compared."""
    reference = T.setup(hp, launch, state.device)
    whole = [T.read_train_loss(T.train_step(reference, step)) for step in range(CHECK_STEPS)]
    split = [T.read_train_loss(split_step(state, step)[0]) for step in range(CHECK_STEPS)]
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(whole, split))
    param_diff = max(((p.float() - q.float()).abs().max() / q.float().abs().max().clamp_min(1e-30)).item()
                     for p, q in zip(state.model.parameters(), reference.model.parameters()))
    del reference
    if state.device.type == "cuda":
        torch.cuda.empty_cache()
    tolerance = 0.0 if state.device.type == "cpu" else 1e-3
    losses = ", ".join(f"{a:.6f}" for a in whole)
    if loss_diff > tolerance or param_diff > tolerance:
        raise SystemExit(f"split step != T.train_step: losses {losses} vs {', '.join(f'{b:.6f}' for b in split)}, "
                         f"params max rel diff {param_diff:.3e} (tolerance {tolerance}): the cuts of bench/step.py's "
                         "part_marks change what train_step computes")
    return (f"check: split step == T.train_step on fresh states, steps 0-{CHECK_STEPS - 1} (losses {losses}): "
            f"max rel diff loss {loss_diff:.1e}, params {param_diff:.1e} (tolerance {tolerance})")


def matmul_params(model: T.GPT) -> int:
    """N of MFU's 6 * N * tokens: the hidden matrices and lm_head (embeddings are lookups, not matmuls)."""
    groups = model.param_groups()
    return sum(p.numel() for key in ("qkvo", "c_fc", "c_proj", "head") for p in groups[key])


def measured_cpu_tflops(size: int, repeats: int = 5) -> float:
    """The best fp32 (size x size) @ (size x size) rate of this CPU at torch's thread count, in TFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e12


def peak_tflops(device: torch.device, given: float | None, quick: bool) -> tuple[float | None, str]:
    """(peak TFLOP/s for MFU or None, where it came from)."""
    if given is not None:
        return given, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS:
            if key in name:
                return tflops, f"{key} bf16 dense peak (FP8 lm_head counted at it too)"
        return None, f"unknown GPU {name!r}: pass --peak-tflops for MFU"
    size = 256 if quick else 1024
    return measured_cpu_tflops(size), (f"measured fp32 matmul {size}^3 on this CPU, {torch.get_num_threads()} "
                                       "thread(s); pass --peak-tflops to set it")


def cycle_length(state: T.TrainState) -> int:
    """Steps until every optimizer has stepped (Adam steps every ADAM_STEP_EVERY)."""
    return math.lcm(*(opt.step_every for opt in state.optimizers))


def phases(hp: T.Hyperparameters) -> dict[tuple[int, int], list[int]]:
    """The schedule's phases, (global batch tokens, long window) -> their steps, in order."""
    out: dict[tuple[int, int], list[int]] = {}
    for step in range(hp.num_iterations):
        out.setdefault(T.schedule_phase(step, hp), []).append(step)
    return out


def bench_phase(state: T.TrainState, steps: list[int], warmup_cycles: int, cycles: int) -> dict[str, float]:
    """Median ms per step of each part and of train_step over `cycles` cycles of each, alternating which goes
    first, after warmup_cycles of each untimed. Steps are the phase's, from its start (wrapping around)."""
    cycle = cycle_length(state)
    position = itertools.count()
    next_steps = lambda: [steps[next(position) % len(steps)] for _ in range(cycle)]
    parts = ["data", "fwd+bwd", "optimizer"]
    samples: dict[str, list[float]] = {name: [] for name in parts + ["split", "train_step"]}

    def run_split(record: bool) -> None:
        total = dict.fromkeys(parts, 0.0)
        for step in next_steps():
            for part, seconds in split_step(state, step)[1].items():
                total[part] += seconds
        if record:
            for part, seconds in total.items():
                samples[part].append(seconds / cycle)
            samples["split"].append(sum(total.values()) / cycle)

    def run_whole(record: bool) -> None:
        seconds = sum(whole_step(state, step) for step in next_steps())
        if record:
            samples["train_step"].append(seconds / cycle)

    for _ in range(warmup_cycles):
        run_split(False)
        run_whole(False)
    for r in range(cycles):
        order: list[Callable[[bool], None]] = [run_split, run_whole] if r % 2 == 0 else [run_whole, run_split]
        for run in order:
            run(True)
    return {name: 1000 * statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", choices=("speedrun", "cpu", "test"),
                        help="the preset to time (default: speedrun with CUDA, else cpu; --quick: test)")
    parser.add_argument("--synthetic", action="store_true",
                        help="train on random BOS-led documents written to a temp dir, not the preset's shards")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed cycles per phase for each step function (default 20 on CUDA, 10 on CPU; "
                             "--quick: 3)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="untimed cycles per phase for each step function first (default 2; --quick: 1)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (default: known GPUs' bf16 dense peak; on CPU a "
                             "measured fp32 matmul rate)")
    parser.add_argument("--quick", action="store_true",
                        help="the test preset on synthetic data, a few steps: checks the bench runs, times nothing")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    cycles = args.steps if args.steps is not None else (3 if args.quick else 20 if cuda else 10)
    warmup_cycles = args.warmup_steps if args.warmup_steps is not None else (1 if args.quick else 2)
    if cycles < 1 or warmup_cycles < 0:
        parser.error(f"--steps {cycles} / --warmup-steps {warmup_cycles}: expected >= 1 and >= 0")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops {args.peak_tflops}: expected a number > 0")

    preset = args.preset or ("test" if args.quick else "speedrun" if cuda else "cpu")
    synthetic = args.synthetic or args.quick or preset == "test"  # the test preset names no shards
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_KEYS}
    env["PRESET"] = preset
    try:
        hp, launch = T.parse_env(env, cuda_available=cuda)
    except T.ConfigError as error:
        raise SystemExit(f"error: {error}")
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # as main(), before CUDA starts
    device = T.init_distributed(launch)
    hp = T.resolve_auto(hp, device)
    with tempfile.TemporaryDirectory() as tmp:
        if synthetic:
            hp = write_synthetic_shards(hp, Path(tmp))
        try:
            state = T.setup(hp, launch, device)
            check = check_split(hp, launch, state)
        except T.ShardError as error:
            raise SystemExit(f"error: {error}\n(or pass --synthetic)")
        if hp.compile:
            T.warmup(state)
        results = {phase: bench_phase(state, steps, warmup_cycles, cycles) for phase, steps in phases(hp).items()}

    peak, peak_source = peak_tflops(device, args.peak_tflops, args.quick)
    report(state, results, check, peak, peak_source, synthetic, cycles, warmup_cycles)


def report(state: T.TrainState, results: dict[tuple[int, int], dict[str, float]], check: str, peak: float | None,
           peak_source: str, synthetic: bool, cycles: int, warmup_cycles: int) -> None:
    """Prints the table (a row per schedule phase), the whole run's figures and a `result: {json}` line."""
    hp, device = state.hp, state.device
    n_matmul = matmul_params(state.model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    data = "synthetic documents (temp dir)" if synthetic else hp.train_files
    cycle = cycle_length(state)
    print(f"== training step: preset {hp.preset}, {name}, torch {torch.__version__}, world 1, compile {hp.compile}, "
          f"fp8 {hp.fp8}, data {data} ==")
    print(check)
    print(f"matmul params N = {n_matmul / 1e6:.2f} M (qkvo, c_fc, c_proj, lm_head); "
          f"peak {'n/a' if peak is None else f'{peak:.3g} TFLOP/s'} ({peak_source})")
    print(f"median over {cycles} cycle(s) of {cycle} step(s) per phase, after {warmup_cycles} untimed; ms per step")
    columns = ["data", "fwd+bwd", "optimizer", "split", "train_step"]
    print(f"{'steps':>11} {'batch tok':>10} {'window':>6}" + "".join(f" {c:>{max(9, len(c))}}" for c in columns)
          + f" {'split/whole':>11} {'tokens/s':>11} {'MFU':>7}")
    run_ms = run_tokens = 0.0
    for (batch_tokens, window), steps in phases(hp).items():
        r = results[(batch_tokens, window)]
        tokens_per_s = batch_tokens / (r["train_step"] / 1000)
        mfu = f"{100 * 6 * n_matmul * tokens_per_s / (peak * 1e12):.2f}%" if peak else "n/a"
        print(f"{f'{steps[0]}-{steps[-1]}':>11} {batch_tokens:>10} {window:>6}"
              + "".join(f" {r[c]:>{max(9, len(c))}.2f}" for c in columns)
              + f" {r['split'] / r['train_step']:>10.3f}x {tokens_per_s:>11,.0f} {mfu:>7}")
        run_ms += len(steps) * r["train_step"]
        run_tokens += len(steps) * batch_tokens
    run_tokens_per_s = run_tokens / (run_ms / 1000)
    run_mfu = 100 * 6 * n_matmul * run_tokens_per_s / (peak * 1e12) if peak else None
    print(f"whole run ({hp.num_iterations} steps, train_step medians weighted by steps): "
          f"{run_ms / hp.num_iterations:.2f} ms/step, {run_tokens_per_s:,.0f} tokens/s, "
          f"MFU {'n/a' if run_mfu is None else f'{run_mfu:.2f}%'}, "
          f"training time without validation {T.format_duration(run_ms / 1000)}")
    summary = {"preset": hp.preset, "device": name, "step_ms": round(run_ms / hp.num_iterations, 3),
               "tokens_per_s": round(run_tokens_per_s), "mfu_percent": None if run_mfu is None else round(run_mfu, 3),
               "phases": [{"batch_tokens": b, "window": w, **{k: round(v, 3) for k, v in results[(b, w)].items()}}
                          for b, w in results]}
    print("result: " + json.dumps(summary))


if __name__ == "__main__":
    main()
