"""Smoke: the first minutes on a GPU. One command checks the CUDA path and times the speedrun model on one GPU.

    ./run.sh smoke                 # the same as python bench/smoke.py, after building the embedded corpus
    python bench/smoke.py          # with CUDA: every check below; without: one line, exit 0
    python bench/smoke.py --quick  # the CPU twin path: the test preset compiled, a few steps (what tests run)

The checks, in order, each ending in one verdict line `check <name>: PASS|FAIL|SKIP ...` with its number:

  cuda-tests  `pytest -m cuda` in a subprocess: FP8 head forward and backward, FlexAttention backward against dense
              attention, the compiled test-preset step without recompiles, no host sync in a compiled step.
  gradients   one packed chunk forward+backward of a fresh model plus noise, eager and compiled (Inductor, fullgraph, as
              training compiles it): every gradient finite, and the largest relative error over the parameters,
              |g_compiled - g_eager| / |g_eager|, within GRAD_TOLERANCE (bf16 activations on CUDA, fp32 on CPU).
  compile     T.warmup (every batch/window phase and validation window): its seconds; and the number of compiled
              graphs after it equals the number after every timed step and the validation (no recompile).
  step        ms per step in each schedule phase (bench/step.py's timing: split and whole steps alternated), with
              tokens/s and MFU, and the split of one step into data, forward+backward and optimizer.
  validation  one validation at the final window: its loss is finite; its seconds.
  memory      peak allocated memory, against the device's total.

On CUDA it runs the `speedrun` preset at its real shapes (dim 768, 12 layers, FP8 head, FlexAttention, 8 packed
chunks a step: 16,384 / 32,768 / 49,152 tokens a chunk in the three phases) on data/embedded (no network;
`python data/build_corpus.py` builds it) or, when that is missing, on random documents; the schedule shortened to
SMOKE_FLAGS so that each phase has a few steps. Record #48 took 60.7 ms a step on 8 H100s; one H100 at the same
efficiency would take ~486 ms (8 x 60.7) on a whole step of the same global batch.

MFU = FLOPs / time / peak, FLOPs per token = 6 N + 6 d_attn sum_l w_l: N the matmul parameters (qkvo, c_fc, c_proj,
lm_head), and per attention layer l QK^T and PV at 2 d_attn FLOPs a key each, forward + backward (x3), over w_l / 2
keys on average for a causal window of w_l tokens (documents' starts ignored: an upper bound). The peak is H100/H200
bf16 dense 989 TFLOP/s (bench/step.py's table), --peak-tflops, or on CPU a measured fp32 matmul rate.

All numbers go to logs/smoke_<date>_<time>.json. Exit 0 when every check passes (or there is no CUDA and no
--quick), 1 when one fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_gpt as T  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_step", REPO / "bench" / "step.py")
step_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_bench)

# A shortened speedrun schedule: 12 scheduled steps (three phases of 4) and 2 extension steps, so every batch size
# and window of the real run is compiled and timed; validation on 131,072 tokens of the embedded corpus's ~220K.
SMOKE_FLAGS = dict(NUM_ITERATIONS="14", EXTENSION_ITERATIONS="2", VAL_TOKENS="131072", VAL_BATCH_TOKENS="131072",
                   VAL_EVERY="0")
QUICK_FLAGS = dict(COMPILE="1", WARMUP="1")  # the test preset's own schedule: one phase
# Largest |g_compiled - g_eager| / |g_eager| over parameters: on CUDA the activations are bf16 and Inductor fuses
# (and so rounds) in other places than eager (bf16's unit roundoff is 2^-8 = 0.4%); on CPU everything is fp32.
GRAD_TOLERANCE = {"cuda": 5e-2, "cpu": 1e-4}
CUDA_TESTS_TIMEOUT_S = 300
H100_48_MS = 8 * 60.7  # one H100 doing #48's 8-GPU step at #48's efficiency (60.7 ms/step on 8xH100)


def perturb(model: T.GPT, scale: float = 0.02, seed: int = 1234) -> T.GPT:
    """Adds seeded noise to every parameter, so that every gradient of the next backward is nonzero: at #48's init
    lm_head is zero, and so is every other parameter's gradient on the first step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator).to(p.device, p.dtype))
    return model


def compiled_gradient_error(model: T.GPT, chunk: torch.Tensor, fp8: bool) -> dict:
    """One forward+backward of chunk (a packed token sequence: inputs chunk[:-1], targets chunk[1:]) through model
    eager, then through torch.compile(model) as setup() compiles it. Returns the worst parameter's relative error,
    its name, and the names of parameters whose compiled gradient is not finite."""
    inputs, targets = chunk[:-1].long(), chunk[1:].long()

    def gradients(forward) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        forward(inputs, targets, "sum", fp8).backward()
        return {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}

    eager = gradients(model)
    compiled = gradients(torch.compile(model, dynamic=False, fullgraph=True))
    model.zero_grad(set_to_none=True)
    if set(eager) != set(compiled):
        raise SystemExit(f"smoke: eager and compiled backward reach different parameters: "
                         f"{sorted(set(eager) ^ set(compiled))}")
    errors = {name: ((compiled[name] - g).norm() / g.norm().clamp_min(1e-30)).item() for name, g in eager.items()}
    worst = max(errors, key=errors.get)
    return {"max_rel_error": errors[worst], "worst": worst, "parameters": len(errors),
            "nonfinite": sorted(name for name, g in compiled.items() if not torch.isfinite(g).all()),
            "zero": sorted(name for name, g in eager.items() if not g.any())}


def attention_flops_per_token(hp: T.Hyperparameters, long_window: int) -> float:
    """6 d_attn sum_l w_l over attention layers (see the module docstring), w_l the layer's window in tokens."""
    plan = T.layer_plan(hp.num_layers, hp.num_value_embeds)
    windows = [(long_window if plan.long_window[i] else long_window // 2) * hp.window_block_tokens
               for i in range(hp.num_layers) if plan.attn[i]]
    return 6 * hp.num_heads * hp.head_dim * sum(min(w, hp.max_seq_len) for w in windows)


def run_cuda_tests() -> dict:
    """pytest -m cuda in a subprocess; its counts and return code."""
    started = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
                                cwd=REPO, capture_output=True, text=True, timeout=CUDA_TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "seconds": CUDA_TESTS_TIMEOUT_S,
                "tail": f"timed out after {CUDA_TESTS_TIMEOUT_S} s"}
    counts = {key: int(n) for n, key in re.findall(r"(\d+) (passed|failed|skipped|errors?)", result.stdout)}
    return {"returncode": result.returncode, "seconds": round(time.perf_counter() - started, 1), **counts,
            "tail": result.stdout[-2000:] if result.returncode else ""}


class Verdicts:
    """Prints one line per check and keeps every number for the JSON file."""

    def __init__(self) -> None:
        self.checks: dict[str, dict] = {}

    def add(self, name: str, verdict: str, line: str, **numbers) -> None:
        self.checks[name] = {"verdict": verdict, "line": line, **numbers}
        print(f"check {name}: {verdict} {line}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [name for name, check in self.checks.items() if check["verdict"] == "FAIL"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="the test preset compiled on this machine's device, synthetic data, a few steps")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (see bench/step.py)")
    parser.add_argument("--out", default="logs", help="folder of the JSON file (default: logs)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("smoke: no CUDA GPU here: nothing to check (the smoke times the speedrun path on a GPU; --quick runs "
              "its CPU twin path)")
        return 0

    verdicts = Verdicts()
    if cuda and not args.quick:
        tests = run_cuda_tests()
        passed = tests["returncode"] == 0 and tests.get("passed", 0) > 0 and not tests.get("skipped", 0)
        verdicts.add("cuda-tests", "PASS" if passed else "FAIL",
                     f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('skipped', 0)} "
                     f"skipped in {tests['seconds']} s" + (f"\n{tests['tail']}" if not passed else ""), **tests)
    else:
        verdicts.add("cuda-tests", "SKIP", "--quick on the CPU: the cuda tests need a GPU")

    env = {k: v for k, v in os.environ.items() if k not in step_bench.LAUNCH_KEYS}
    if args.quick:
        env.update(PRESET="test", **QUICK_FLAGS)
    else:
        env.update(PRESET="speedrun", **SMOKE_FLAGS)
    try:
        hp, launch = T.parse_env(env, cuda_available=cuda)
    except T.ConfigError as error:
        raise SystemExit(f"error: {error}")
    device = T.init_distributed(launch)
    hp = T.resolve_auto(hp, device)
    embedded = REPO / "data" / "embedded"
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick or not list(embedded.glob("train_*.bin")):
            hp = step_bench.write_synthetic_shards(hp, Path(tmp))
            data = "random documents"
        else:
            hp = dataclasses.replace(hp, train_files=str(embedded / "train_*.bin"),
                                     val_files=str(embedded / "val_*.bin"))
            data = hp.train_files
        name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} thread(s)"
        print(f"== smoke: preset {hp.preset}, {name}, torch {torch.__version__}, compile {hp.compile}, fp8 {hp.fp8}, "
              f"data {data} ==", flush=True)
        state = T.setup(hp, launch, device)

        # gradients: a fresh model (the run's seed, then noise: every gradient nonzero) on the run's first chunk
        torch.manual_seed(hp.seed)
        fresh = T.GPT(hp, state.model.embed.weight.dtype, T.max_sequence_tokens(hp, launch.world_size)).to(device)
        perturb(fresh)
        batch_tokens, window = T.schedule_phase(0, hp)
        fresh.set_training_window(window)
        chunk = state.loader.next_step(state.geometry.chunk_tokens(batch_tokens), 1)[0].to(device)
        state.loader.reset()  # the timed steps start from the first document, as a run does
        grads = compiled_gradient_error(fresh, chunk, hp.fp8)
        del fresh
        tolerance = GRAD_TOLERANCE[device.type]
        ok = not grads["nonfinite"] and not grads["zero"] and grads["max_rel_error"] <= tolerance
        verdicts.add("gradients", "PASS" if ok else "FAIL",
                     f"compiled vs eager, {grads['parameters']} parameters: max relative error "
                     f"{grads['max_rel_error']:.2e} ({grads['worst']}; tolerance {tolerance:g}), non-finite: "
                     f"{', '.join(grads['nonfinite']) or 'none'}, all zero: {', '.join(grads['zero']) or 'none'}",
                     tolerance=tolerance, **grads)

        started = time.perf_counter()
        if hp.compile:
            T.warmup(state)
        T.synchronize(device)
        compile_s = time.perf_counter() - started
        graphs_after_warmup = T.compiled_graphs()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cycles, warmup_cycles = (2, 1) if args.quick else (3, 1)
        phases = step_bench.phases(hp)
        results = {phase: step_bench.bench_phase(state, steps, warmup_cycles, cycles)
                   for phase, steps in phases.items()}

        state.model.windows = T.validation_windows(hp)[-1]  # the final validation's (short, long) window
        T.synchronize(device)
        started = time.perf_counter()
        val_loss = T.evaluate(state)
        val_s = time.perf_counter() - started
        graphs_after = T.compiled_graphs()

    verdicts.add("compile", "PASS" if graphs_after == graphs_after_warmup else "FAIL",
                 f"warmup {compile_s:.1f} s, {graphs_after_warmup} graphs; after the timed steps and the validation "
                 f"{graphs_after} (a rise is a recompile)" if hp.compile else "COMPILE off",
                 seconds=round(compile_s, 1), graphs_after_warmup=graphs_after_warmup, graphs_after=graphs_after)

    peak, peak_source = step_bench.peak_tflops(device, args.peak_tflops, args.quick)
    n_matmul = step_bench.matmul_params(state.model)
    rows, run_ms, run_tokens, run_flops = [], 0.0, 0, 0.0
    for (batch, long_window), steps in phases.items():
        r = results[(batch, long_window)]
        flops = batch * (6 * n_matmul + attention_flops_per_token(hp, long_window))
        mfu = 100 * flops / (r["train_step"] / 1000) / (peak * 1e12) if peak else None
        rows.append({"steps": f"{steps[0]}-{steps[-1]}", "batch_tokens": batch, "window": long_window,
                     **{k: round(v, 2) for k, v in r.items()}, "tokens_per_s": round(batch / (r["train_step"] / 1000)),
                     "mfu_percent": None if mfu is None else round(mfu, 2)})
        run_ms += len(steps) * r["train_step"]
        run_tokens += len(steps) * batch
        run_flops += len(steps) * flops
        print(f"  steps {rows[-1]['steps']:>5}  batch {batch:>7}  window {long_window:>2}  "
              f"{r['train_step']:9.2f} ms/step "
              f"(data {r['data']:.2f}, fwd+bwd {r['fwd+bwd']:.2f}, optimizer {r['optimizer']:.2f})  "
              f"{rows[-1]['tokens_per_s']:>11,} tokens/s  MFU {'n/a' if mfu is None else f'{mfu:.1f}%'}")
    step_ms = run_ms / hp.num_iterations
    mfu = 100 * run_flops / (run_ms / 1000) / (peak * 1e12) if peak else None
    split = {part: sum(len(s) * results[p][part] for p, s in phases.items()) / hp.num_iterations
             for part in ("data", "fwd+bwd", "optimizer")}
    reference = f"; #48's 8-GPU step on one H100: ~{H100_48_MS:.0f} ms" if not args.quick else ""
    verdicts.add("step", "PASS" if math.isfinite(step_ms) else "FAIL",
                 f"{step_ms:.2f} ms/step over the run's phases, {run_tokens / (run_ms / 1000):,.0f} tokens/s, MFU "
                 f"{'n/a' if mfu is None else f'{mfu:.2f}%'} (peak {peak_source}); one step: data "
                 f"{split['data']:.2f} ms, fwd+bwd {split['fwd+bwd']:.2f} ms, optimizer {split['optimizer']:.2f} ms"
                 + reference, step_ms=round(step_ms, 2), tokens_per_s=round(run_tokens / (run_ms / 1000)),
                 mfu_percent=None if mfu is None else round(mfu, 3), peak_tflops=peak, split_ms=split, phases=rows)
    verdicts.add("validation", "PASS" if math.isfinite(val_loss) else "FAIL",
                 f"final window {state.model.windows}: val_loss {val_loss:.4f} on {hp.val_tokens} tokens in "
                 f"{val_s:.2f} s", val_loss=val_loss, seconds=round(val_s, 3))
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        total_mib = torch.cuda.get_device_properties(device).total_memory / 2**20
        verdicts.add("memory", "PASS" if peak_mib < total_mib else "FAIL",
                     f"peak allocated {peak_mib:,.0f} MiB of {total_mib:,.0f} MiB", peak_mib=round(peak_mib),
                     total_mib=round(total_mib))
    else:
        verdicts.add("memory", "SKIP", "CPU: no allocator statistics")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"smoke_{datetime.datetime.now():%Y%m%d_%H%M%S}.json"
    path.write_text(json.dumps({"device": name, "torch": torch.__version__, "preset": hp.preset, "quick": args.quick,
                                "checks": verdicts.checks}, indent=1) + "\n")
    failed = verdicts.failed
    print(f"smoke: {'FAILED: ' + ', '.join(failed) if failed else 'every check passed'}; numbers in {path}")
    T.close_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
