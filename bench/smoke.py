"""Smoke: the first minutes on a GPU. One command checks the CUDA path and times the speedrun model on one GPU,
within a time budget, writing its numbers as it goes.

    ./run.sh smoke                           # python bench/smoke.py --budget 420, offline (nothing installed)
    python bench/smoke.py --budget 300       # start a check only when its expected seconds fit what is left
    python bench/smoke.py                    # with CUDA: every check, no budget; without: one line, exit 0
    python bench/smoke.py --quick            # the CPU twin path: the test preset compiled, a few steps (tests)

The checks, most valuable first, each ending in one line `check <name>: PASS|FAIL|SKIP ...` with its numbers:

  step             the phase that carries most of the run's tokens (#48's third: 393,216 tokens a step, 8 chunks
                   of 49,152, long window 11 blocks), compiled, 8 chunks accumulated on one GPU: its compile
                   seconds (Inductor's cache cold or warm), ms/step (bench/step.py's timing: split and whole steps
                   alternated), tokens/s, MFU, peak memory, and no recompile after the first cycle.
  gradients        one chunk of that phase through the model eager and compiled (the graph `step` timed): every
                   gradient finite and nonzero, the worst parameter's |g_compiled - g_eager| / |g_eager| within
                   GRAD_TOLERANCE (bf16 activations on CUDA, fp32 on CPU).
  phase-<b>-w<w>   each other phase of the run (global batch b, long window w): compile seconds, ms/step, MFU.
  run-average      ms/step over the run, each phase weighted by its steps in the real run (needs every phase),
                   against #48 at its own efficiency on one GPU (see ONE_GPU_REFERENCE).
  validation       one validation at the final window on #48's 262,144-token sequences: compile seconds, then
                   seconds and val loss (finite) of a second, compiled pass; peak memory.
  cuda-tests       `pytest -m cuda` in this process (its compiled kernels and CUDA context are reused), a test
                   started only while the budget has room; SKIP with the reason when pytest is not installed.

Budget: before each check its expected seconds (the seconds it took in the newest earlier smoke JSON of this
device in --out, else COST_GUESS_S) are compared with what is left; a check that does not fit prints
`check <name>: SKIP (budget)`. A check that started runs to its end.

Numbers: logs/smoke_<date>_<time>.json, rewritten (write, then rename) at the start and after every check, so a run
killed at any moment leaves the finished checks. On CUDA Inductor's and Triton's caches live in .cache/ (git-
ignored), so a second smoke on the same machine compiles from cache: each compile records whether the cache was
cold or warm, and the step check lists the compile seconds of earlier smokes of this device.

Data: the `speedrun` preset at its real shapes on data/embedded (`python data/build_corpus.py --offline`) or, when
that is missing, on random documents; the validation always on random documents, since the embedded corpus has
fewer than the 2,097,152 tokens of one of #48's validation steps. The schedule is shortened to SMOKE_FLAGS so that
each phase has a few steps; the phases' weights come from the real schedule.

MFU = FLOPs / time / peak. FLOPs of a step = 6 N tokens + 12 d_attn (attended query-key pairs): N the matmul
parameters (qkvo, c_fc, c_proj, lm_head), and per attention layer every pair a query really attends (same document,
within the layer's window: counted on the phase's first step's chunks) costs 2 d_attn for q.k and 2 d_attn for the
weighted v, forward and backward (x3). The peak is H100/H200 bf16 dense 989 TFLOP/s (bench/step.py's table),
--peak-tflops, or on CPU a measured fp32 matmul rate.

Exit 0 when no check failed (SKIPs included, and when there is no CUDA and no --quick), 1 when one failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_gpt as T  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_step", REPO / "bench" / "step.py")
step_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_bench)

# A shortened speedrun schedule: 12 scheduled steps (three phases of 4) and 2 extension steps, so every batch size
# and window of the real run is compiled and timed; validation on #48's sequences (2,097,152 tokens a validation
# step: 8 sequences of 262,144 on one GPU), one step of them.
SMOKE_FLAGS = dict(NUM_ITERATIONS="14", EXTENSION_ITERATIONS="2", VAL_TOKENS="2097152", VAL_BATCH_TOKENS="2097152",
                   VAL_EVERY="0")
# The test preset with the schedule of tests/conftest.py's background compiled run (two phases, an extension with
# its own window, a final window of its own): every graph of the quick smoke is then in Inductor's cache.
QUICK_FLAGS = dict(COMPILE="1", WARMUP="1", NUM_ITERATIONS="5", EXTENSION_ITERATIONS="1", BATCH_SCHEDULE="128,256",
                   LONG_WINDOWS="2,4", EXTENSION_WINDOW="6", FINAL_WINDOW="8", ADAM_STEP_EVERY="2")
# Largest |g_compiled - g_eager| / |g_eager| over parameters: on CUDA the activations are bf16 and Inductor fuses
# (and so rounds) in other places than eager (bf16's unit roundoff is 2^-8 = 0.4%); on CPU everything is fp32.
GRAD_TOLERANCE = {"cuda": 5e-2, "cpu": 1e-4}
TIMED_CYCLES = {"cuda": 3, "cpu": 2}  # cycles of each step function per phase, after one untimed (bench/step.py)
# Seconds each check is expected to take on a first call (cold caches), used only to decide whether to start it:
# guesses, never reported as measurements; a later call uses what the newest earlier JSON of this device measured.
COST_GUESS_S = {"cuda": {"step": 240.0, "gradients": 60.0, "phase": 90.0, "run-average": 0.0, "validation": 60.0,
                         "cuda-test": 30.0},
                "cpu": {"step": 10.0, "gradients": 2.0, "phase": 15.0, "run-average": 0.0, "validation": 10.0,
                        "cuda-test": 1.0}}
# Record #48 on 8 H100s, per GPU (one chunk each, no accumulation), ms a step by the global batch of its three phases:
# the slope of train_time in its log 82edf6be-f343-475d-b93a-47c32acf4de2.txt over steps 20-700, 720-1405 and
# 1425-2115 (validations excluded, as train_time excludes them).
RECORD_48_MS_PER_STEP = {131072: 33.56, 262144: 60.65, 393216: 88.42}
RECORD_48_GPUS = 8


def one_gpu_reference(weights: dict[int, int]) -> dict:
    """#48's efficiency moved to one GPU: a least-squares line through RECORD_48_MS_PER_STEP against the tokens each
    GPU ran (batch / 8) gives a fixed part (optimizer and launch overheads, paid once a step) and a part per token.
    One GPU runs all 8 chunks, so it pays the token part 8 times and the fixed part once (not 8 x the 8-GPU step);
    its optimizer does all the work that 8 GPUs shard, so this is a lower bound. weights: global batch -> steps."""
    xs = [batch / RECORD_48_GPUS for batch in RECORD_48_MS_PER_STEP]
    ys = list(RECORD_48_MS_PER_STEP.values())
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    per_token = (sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys))
                 / sum((x - x_mean) ** 2 for x in xs))  # ms per token on one GPU's chunk
    fixed = y_mean - per_token * x_mean
    per_phase = {batch: fixed + per_token * batch for batch in weights}
    run_ms = sum(per_phase[batch] * steps for batch, steps in weights.items()) / sum(weights.values())
    return {"fixed_ms": round(fixed, 2), "us_per_token": round(1000 * per_token, 4), "run_ms": round(run_ms, 1),
            "per_phase_ms": {str(batch): round(ms, 1) for batch, ms in per_phase.items()}}


def attended_pairs(tokens: torch.Tensor, bos_id: int, window_tokens: int) -> int:
    """Query-key pairs a packed sequence tokens (T,) attends under document_window_mask's rule: query q sees key k
    iff q - window_tokens <= k <= q and both lie in one document (a new one at every BOS). Per query that is
    min(q - start of its document, window_tokens) + 1 keys, without building the (T, T) mask."""
    positions = torch.arange(tokens.numel(), device=tokens.device)
    starts = torch.where(tokens == bos_id, positions, 0).cummax(0).values  # tokens before the first BOS: doc 0 at 0
    return int(((positions - starts).clamp(max=window_tokens) + 1).sum())


def attention_flops(chunks: list[torch.Tensor], hp: T.Hyperparameters, long_window: int) -> float:
    """Forward + backward FLOPs of the attention scores and weighted values over packed chunks (each (T + 1,):
    inputs chunk[:-1]), every attention layer at its own window (short = long // 2): 12 d_attn a pair."""
    plan = T.layer_plan(hp.num_layers, hp.num_value_embeds)
    short, long = T.window_pair(long_window)
    windows = [(long if plan.long_window[i] else short) * hp.window_block_tokens
               for i in range(hp.num_layers) if plan.attn[i]]
    d_attn = hp.num_heads * hp.head_dim
    return 12.0 * d_attn * sum(attended_pairs(chunk[:-1].cpu(), hp.bos_id, w) for chunk in chunks for w in windows)


def perturb(model: T.GPT, scale: float = 0.02, seed: int = 1234) -> T.GPT:
    """Adds seeded noise to every parameter, so that every gradient of the next backward is nonzero: at #48's init
    lm_head is zero, and so is every other parameter's gradient on the first step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator).to(p.device, p.dtype))
    return model


def compiled_gradient_error(model: T.GPT, chunk: torch.Tensor, fp8: bool, compiled: Callable | None = None) -> dict:
    """One forward+backward of chunk (a packed token sequence: inputs chunk[:-1], targets chunk[1:]) through model
    eager, then through `compiled` (default: torch.compile(model) as setup() compiles it). Returns the worst
    parameter's relative error, its name, and the names of parameters whose gradient is not finite or all zero."""
    inputs, targets = chunk[:-1].long(), chunk[1:].long()

    def gradients(forward) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        forward(inputs, targets, "sum", fp8).backward()
        return {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}

    eager = gradients(model)
    compiled = gradients(compiled if compiled is not None else torch.compile(model, dynamic=False, fullgraph=True))
    model.zero_grad(set_to_none=True)
    if set(eager) != set(compiled):
        raise SystemExit(f"smoke: eager and compiled backward reach different parameters: "
                         f"{sorted(set(eager) ^ set(compiled))}")
    errors = {name: ((compiled[name] - g).norm() / g.norm().clamp_min(1e-30)).item() for name, g in eager.items()}
    worst = max(errors, key=errors.get)
    return {"max_rel_error": errors[worst], "worst": worst, "parameters": len(errors),
            "nonfinite": sorted(name for name, g in compiled.items() if not torch.isfinite(g).all()),
            "zero": sorted(name for name, g in eager.items() if not g.any())}


def gradient_verdict(grads: dict, tolerance: float) -> tuple[str, str]:
    """PASS when every gradient is finite and nonzero and the worst relative error is within tolerance."""
    ok = not grads["nonfinite"] and not grads["zero"] and grads["max_rel_error"] <= tolerance
    return ("PASS" if ok else "FAIL",
            f"compiled vs eager, {grads['parameters']} parameters: max relative error {grads['max_rel_error']:.2e} "
            f"({grads['worst']}; tolerance {tolerance:g}), non-finite: {', '.join(grads['nonfinite']) or 'none'}, "
            f"all zero: {', '.join(grads['zero']) or 'none'}")


def recompile_verdict(graphs_before: int, graphs_after: int) -> str:
    """FAIL when timed work after the compiling cycle built a graph (a recompile on every step would be timed)."""
    return "PASS" if graphs_after == graphs_before else "FAIL"


def compile_cache_state(hits: int, misses: int) -> str:
    """cold: Inductor compiled every graph; warm: every graph came from its on-disk cache; mixed: some of each."""
    return "warm" if hits and not misses else "cold" if misses and not hits else "mixed" if hits else "none"


def inductor_cache_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters
    return int(counters["inductor"]["fxgraph_cache_hit"]), int(counters["inductor"]["fxgraph_cache_miss"])


class Budget:
    """Seconds left of --budget, and whether a check expected to take `seconds` fits in them."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock, self.started = seconds, clock, clock()

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (self.clock() - self.started)

    def fits(self, expected_seconds: float) -> bool:
        return expected_seconds <= self.left()


class Report:
    """The JSON of one smoke, rewritten whole after every check (write a temp file, then rename: a reader never
    sees half a file), and the one line per check it prints after writing."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.meta, self.checks = path, meta, {}
        self.write()

    def add(self, name: str, verdict: str, line: str, **numbers) -> None:
        self.checks[name] = {"verdict": verdict, "line": line, **numbers}
        self.write()  # before the line: whoever sees the line finds the check in the file
        print(f"check {name}: {verdict} {line}", flush=True)

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({**self.meta, "checks": self.checks}, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)

    @property
    def failed(self) -> list[str]:
        return [name for name, check in self.checks.items() if check["verdict"] == "FAIL"]


def earlier_reports(out: Path, device: str, quick: bool) -> list[dict]:
    """The earlier smoke JSONs in out of this device and mode, newest first (unreadable ones are passed over)."""
    reports = []
    for path in sorted(out.glob("smoke_*.json"), reverse=True):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and report.get("device") == device and report.get("quick") == quick:
            reports.append(report)
    return reports


def expected_seconds(reports: list[dict]) -> dict[str, float]:
    """What each check took in the newest earlier report that ran it: check name -> seconds."""
    seconds: dict[str, float] = {}
    for report in reversed(reports):  # oldest first: newer reports overwrite
        for name, check in report.get("checks", {}).items():
            if isinstance(check, dict) and isinstance(check.get("seconds"), (int, float)):
                seconds[name] = float(check["seconds"])
        for name, value in report.get("cuda_test_seconds", {}).items():
            seconds[f"cuda-test {name}"] = float(value)
    return seconds


class Smoke:
    """What the checks share: the run, its state once the first check built it, and the per-phase results. (A plain
    class, not a dataclass: tests load this file without registering it as a module, which dataclasses need.)"""

    def __init__(self, args: argparse.Namespace, hp: T.Hyperparameters, launch: T.Launch, device: torch.device,
                 data: str, weights: dict[tuple[int, int], int], reports: list[dict]) -> None:
        self.args, self.hp, self.launch, self.device, self.data = args, hp, launch, device, data
        self.weights = weights  # (global batch, long window) -> steps of the real run
        self.reports = reports  # earlier smokes of this device, newest first
        self.state: T.TrainState | None = None
        self.rows: dict[tuple[int, int], dict] = {}
        self.chunks: dict[tuple[int, int], list[torch.Tensor]] = {}

    @property
    def phases(self) -> dict[tuple[int, int], list[int]]:
        """The shortened schedule's phases, (global batch, long window) -> steps."""
        return step_bench.phases(self.hp)

    @property
    def dominant(self) -> tuple[int, int]:
        """The phase that carries the most tokens of the real run: #48's third."""
        return max(self.weights, key=lambda phase: self.weights[phase] * phase[0])

    def first_step_chunks(self, phase: tuple[int, int]) -> list[torch.Tensor]:
        """The chunks of the first step of a phase, from a loader of its own (the state's keeps its place)."""
        if phase not in self.chunks:
            hp, geometry = self.hp, self.state.geometry
            loader = T.PackedLoader(T.find_shards(hp.train_files, "TRAIN_FILES"), hp.vocab_size, hp.max_seq_len,
                                    self.launch.rank, self.launch.world_size, bos_id=hp.bos_id, data_seed=hp.data_seed)
            self.chunks[phase] = loader.next_step(geometry.chunk_tokens(phase[0]), geometry.accum_steps)
        return self.chunks[phase]

    def time_phase(self, phase: tuple[int, int]) -> dict:
        """Compiles a phase (its first cycle of steps, timed as compile seconds), then times it as bench/step.py
        does; its numbers, with the graphs built after the compiling cycle (a recompile) and the peak memory."""
        state, steps = self.state, self.phases[phase]
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        hits, misses = inductor_cache_counts()
        T.synchronize(self.device)
        started = time.perf_counter()
        for step in steps[:step_bench.cycle_length(state)]:
            T.train_step(state, step)
        T.synchronize(self.device)
        compile_s = time.perf_counter() - started
        hits, misses = (now - before for now, before in zip(inductor_cache_counts(), (hits, misses)))
        graphs = T.compiled_graphs()
        timed = step_bench.bench_phase(state, steps, 1, TIMED_CYCLES[self.device.type])
        batch, long_window = phase
        flops = batch * 6 * step_bench.matmul_params(state.model) + attention_flops(
            self.first_step_chunks(phase), self.hp, long_window)
        peak, _ = self.peak
        step_s = timed["train_step"] / 1000
        return {"batch_tokens": batch, "window": long_window, "compile_s": round(compile_s, 2),
                "compile_cache": compile_cache_state(hits, misses), "fxgraph_cache_hits": hits,
                "fxgraph_cache_misses": misses, "graphs_after_compile": graphs, "graphs_after": T.compiled_graphs(),
                **{part: round(ms, 2) for part, ms in timed.items()}, "tokens_per_s": round(batch / step_s),
                "flops_per_step": flops, "mfu_percent": round(100 * flops / step_s / (peak * 1e12), 2) if peak else None,
                "peak_memory_mib": round(torch.cuda.max_memory_allocated(self.device) / 2**20) if cuda else None}

    @functools.cached_property
    def peak(self) -> tuple[float | None, str]:
        return step_bench.peak_tflops(self.device, self.args.peak_tflops, self.args.quick)


def phase_line(row: dict) -> str:
    memory = f", peak memory {row['peak_memory_mib']:,} MiB" if row["peak_memory_mib"] is not None else ""
    mfu = "n/a" if row["mfu_percent"] is None else f"{row['mfu_percent']:.1f}%"
    return (f"batch {row['batch_tokens']:,} window {row['window']}: compile {row['compile_s']:.1f} s (cache "
            f"{row['compile_cache']}), {row['train_step']:.2f} ms/step (data {row['data']:.2f}, fwd+bwd "
            f"{row['fwd+bwd']:.2f}, optimizer {row['optimizer']:.2f}), {row['tokens_per_s']:,} tokens/s, MFU {mfu}"
            f"{memory}; graphs {row['graphs_after_compile']} after the compiling cycle, {row['graphs_after']} after "
            "timing (a rise is a recompile)")


def check_step(smoke: Smoke, report: Report) -> None:
    phase = smoke.dominant
    print(f"  step: setting up, then compiling batch {phase[0]:,} window {phase[1]} ({smoke.data})", flush=True)
    smoke.state = T.setup(smoke.hp, smoke.launch, smoke.device)
    row = smoke.rows[phase] = smoke.time_phase(phase)
    earlier = {f"{c['compile_cache']}": c["compile_s"] for r in smoke.reports[::-1]
               if isinstance(c := r.get("checks", {}).get("step"), dict) and "compile_s" in c}
    report.add("step", recompile_verdict(row["graphs_after_compile"], row["graphs_after"]), phase_line(row),
               **row, earlier_compile_s=earlier)


def check_gradients(smoke: Smoke, report: Report) -> None:
    state, phase = smoke.state, smoke.dominant
    for optimizer in state.optimizers:
        optimizer.reduce_in_backward(False)  # these backwards feed no optimizer step
    perturb(state.model)  # every gradient nonzero, whatever the timed steps left
    state.model.set_training_window(phase[1])
    chunk = smoke.first_step_chunks(phase)[0].to(smoke.device)
    grads = compiled_gradient_error(state.model, chunk, smoke.hp.fp8, compiled=state.step_model)
    tolerance = GRAD_TOLERANCE[smoke.device.type]
    verdict, line = gradient_verdict(grads, tolerance)
    report.add("gradients", verdict, f"batch {phase[0]:,} window {phase[1]}, one chunk of {chunk.numel() - 1:,} "
               f"tokens: {line}", tolerance=tolerance, **grads)


def phase_check(phase: tuple[int, int]) -> Callable[[Smoke, Report], None]:
    def check(smoke: Smoke, report: Report) -> None:
        print(f"  compiling batch {phase[0]:,} window {phase[1]}", flush=True)
        row = smoke.rows[phase] = smoke.time_phase(phase)
        report.add(phase_name(phase), recompile_verdict(row["graphs_after_compile"], row["graphs_after"]),
                   phase_line(row), **row)
    return check


def phase_name(phase: tuple[int, int]) -> str:
    return f"phase-{phase[0]}-w{phase[1]}"


def check_run_average(smoke: Smoke, report: Report) -> None:
    missing = [phase_name(p) for p in smoke.weights if p not in smoke.rows]
    if missing:
        report.add("run-average", "SKIP", f"(not every phase was timed: {', '.join(missing)})")
        return
    steps = sum(smoke.weights.values())
    step_ms = sum(smoke.rows[p]["train_step"] * n for p, n in smoke.weights.items()) / steps
    tokens = sum(p[0] * n for p, n in smoke.weights.items())
    flops = sum(smoke.rows[p]["flops_per_step"] * n for p, n in smoke.weights.items())
    seconds = step_ms * steps / 1000
    peak, peak_source = smoke.peak
    mfu = 100 * flops / seconds / (peak * 1e12) if peak else None
    numbers = {"step_ms": round(step_ms, 2), "tokens_per_s": round(tokens / seconds),
               "mfu_percent": None if mfu is None else round(mfu, 2), "peak_tflops": peak, "peak_source": peak_source,
               "steps_by_phase": {phase_name(p): n for p, n in smoke.weights.items()}}
    line = (f"{step_ms:.2f} ms/step over the real run's {steps} steps, {tokens / seconds:,.0f} tokens/s, MFU "
            f"{'n/a' if mfu is None else f'{mfu:.2f}%'} (peak {peak_source})")
    if not smoke.args.quick:
        reference = one_gpu_reference({p[0]: n for p, n in smoke.weights.items()})
        numbers["record_48_one_gpu"] = reference
        line += (f"; #48's efficiency on one GPU: {reference['run_ms']:.0f} ms/step (its log: {reference['fixed_ms']} "
                 f"ms fixed + {reference['us_per_token']} us a token a GPU), ratio {step_ms / reference['run_ms']:.2f}")
    report.add("run-average", "PASS" if math.isfinite(step_ms) else "FAIL", line, **numbers)


def check_validation(smoke: Smoke, report: Report) -> None:
    state = smoke.state
    state.model.windows = T.validation_windows(smoke.hp)[-1]  # the final validation's (short, long) window
    cuda = smoke.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(smoke.device)
    hits, misses = inductor_cache_counts()
    seconds = []
    for _ in range(2):  # the first pass compiles the validation graph
        T.synchronize(smoke.device)
        started = time.perf_counter()
        val_loss = T.evaluate(state)
        seconds.append(time.perf_counter() - started)
        if len(seconds) == 1:
            graphs = T.compiled_graphs()
    hits, misses = (now - before for now, before in zip(inductor_cache_counts(), (hits, misses)))
    sequence_tokens = state.val_sequences.size(-1) - 1
    numbers = {"val_loss": val_loss, "compile_s": round(seconds[0], 2), "validation_s": round(seconds[1], 3), "compile_cache": compile_cache_state(hits, misses),
               "sequences": len(state.val_sequences), "sequence_tokens": sequence_tokens,
               "graphs_after_compile": graphs, "graphs_after": T.compiled_graphs(),
               "peak_memory_mib": round(torch.cuda.max_memory_allocated(smoke.device) / 2**20) if cuda else None}
    ok = math.isfinite(val_loss) and numbers["graphs_after"] == graphs
    memory = f", peak memory {numbers['peak_memory_mib']:,} MiB" if cuda else ""
    report.add("validation", "PASS" if ok else "FAIL",
               f"final window {state.model.windows}, {len(state.val_sequences)} sequence(s) of {sequence_tokens:,} "
               f"tokens: compile {seconds[0]:.1f} s (cache {numbers['compile_cache']}), then {seconds[1]:.2f} s, "
               f"val_loss {val_loss:.4f}{memory}", **numbers)


def check_cuda_tests(smoke: Smoke, report: Report, budget: Budget, expected: dict[str, float]) -> None:
    """pytest -m cuda in this process, each test started only when its expected seconds (an earlier smoke's, else
    the guess) fit the budget; the others are skipped by a small plugin with the reason `budget`."""
    try:
        import pytest
    except ImportError:
        report.add("cuda-tests", "SKIP", "(pytest is not installed: `pip install pytest` to run them)")
        return
    guess = COST_GUESS_S[smoke.device.type]["cuda-test"]
    if not budget.fits(guess):
        report.add("cuda-tests", "SKIP", f"(budget): {budget.left():.0f} s left, a test is expected to take {guess:g} s")
        return
    outcomes: dict[str, str] = {}
    durations: dict[str, float] = {}

    class BudgetPlugin:
        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_setup(self, item) -> None:
            if not budget.fits(expected.get(f"cuda-test {item.nodeid}", guess)):
                pytest.skip("budget")

        def pytest_runtest_logreport(self, report) -> None:
            if report.when == "call" or report.outcome != "passed":
                outcomes[report.nodeid] = ("skipped (budget)" if report.skipped and "budget" in str(report.longrepr)
                                           else report.outcome)
                durations[report.nodeid] = durations.get(report.nodeid, 0.0) + report.duration

    files = sorted(str(p) for p in (REPO / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())
    code = pytest.main(["-q", "-m", "cuda", "-p", "no:cacheprovider", *files], plugins=[BudgetPlugin()])
    counts = {kind: sum(1 for o in outcomes.values() if o == kind)
              for kind in ("passed", "failed", "skipped", "skipped (budget)")}
    report.meta["cuda_test_seconds"] = {name: round(s, 1) for name, s in durations.items()}  # the next budget's
    verdict = "FAIL" if counts["failed"] or code not in (0, 5) else "PASS" if counts["passed"] else "SKIP"
    report.add("cuda-tests", verdict, f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} "
               f"skipped, {counts['skipped (budget)']} not started (budget); pytest exit {int(code)}",
               outcomes=outcomes, pytest_exit=int(code), **{k.replace(' ', '_'): v for k, v in counts.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="the test preset compiled on this machine's device, synthetic data, a few steps")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds this smoke may take: a check starts only when its expected seconds fit what "
                             "is left (default: no limit; ./run.sh smoke passes 420)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (see bench/step.py)")
    parser.add_argument("--out", default="logs", help="folder of the JSON file (default: logs)")
    args = parser.parse_args()
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget {args.budget:g}: expected a number of seconds > 0")
    budget = Budget(args.budget)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("smoke: no CUDA GPU here: nothing to check (the smoke times the speedrun path on a GPU; --quick runs "
              "its CPU twin path)")
        return 0
    if cuda and not args.quick:  # before the first compile: Inductor and Triton read these when they first write
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))
        os.environ.setdefault("TRITON_CACHE_DIR", str(REPO / ".cache" / "triton"))

    env = {k: v for k, v in os.environ.items() if k not in step_bench.LAUNCH_KEYS}
    env.update(PRESET="test", **QUICK_FLAGS) if args.quick else env.update(PRESET="speedrun", **SMOKE_FLAGS)
    try:
        hp, launch = T.parse_env(env, cuda_available=cuda)
        real_hp, _ = T.parse_env({k: v for k, v in env.items() if k not in SMOKE_FLAGS or args.quick}, cuda)
    except T.ConfigError as error:
        raise SystemExit(f"error: {error}")
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # as main(), before CUDA starts
    device = T.init_distributed(launch)
    hp = T.resolve_auto(hp, device)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} thread(s)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = earlier_reports(out, name, args.quick)
    expected = expected_seconds(reports)
    kind = "cuda" if cuda and not args.quick else "cpu"
    weights = {phase: len(steps) for phase, steps in step_bench.phases(real_hp).items()}

    with tempfile.TemporaryDirectory() as tmp:
        embedded = REPO / "data" / "embedded"
        synthetic = step_bench.write_synthetic_shards(hp, Path(tmp))
        if args.quick or not list(embedded.glob("train_*.bin")):
            hp, data = synthetic, "random documents"
        else:
            hp = dataclasses.replace(hp, train_files=str(embedded / "train_*.bin"), val_files=synthetic.val_files)
            data = f"{hp.train_files}, validation on random documents"
        smoke = Smoke(args, hp, launch, device, data, weights, reports)
        report = Report(out / f"smoke_{datetime.datetime.now():%Y%m%d_%H%M%S}.json",
                        {"device": name, "torch": torch.__version__, "preset": hp.preset, "quick": args.quick,
                         "budget_s": args.budget, "compile": hp.compile, "fp8": hp.fp8, "data": data,
                         "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default")})
        print(f"== smoke: preset {hp.preset}, {name}, torch {torch.__version__}, compile {hp.compile}, fp8 {hp.fp8}, "
              f"data {data}, budget {'none' if args.budget is None else f'{args.budget:g} s'}; numbers in "
              f"{report.path} ==", flush=True)
        others = [p for p in smoke.phases if p != smoke.dominant]
        checks: list[tuple[str, str, Callable[[Smoke, Report], None]]] = [
            ("step", "step", check_step), ("gradients", "gradients", check_gradients),
            *[(phase_name(p), "phase", phase_check(p)) for p in others],
            ("run-average", "run-average", check_run_average), ("validation", "validation", check_validation)]
        for check_name, cost_kind, run in checks:
            estimate = expected.get(check_name, COST_GUESS_S[kind][cost_kind])
            if smoke.state is None and check_name != "step":
                report.add(check_name, "SKIP", "(the step check, which builds the model, did not run)")
            elif not budget.fits(estimate):
                report.add(check_name, "SKIP", f"(budget): expected {estimate:.0f} s, {budget.left():.0f} s left",
                           expected_s=estimate)
            else:
                started = time.monotonic()
                run(smoke, report)
                report.checks[check_name]["seconds"] = round(time.monotonic() - started, 1)
                report.write()
        if cuda and not args.quick:
            check_cuda_tests(smoke, report, budget, expected)
        else:
            report.add("cuda-tests", "SKIP", "(--quick on the CPU: the cuda tests need a GPU)")

    failed = report.failed
    skipped = [n for n, c in report.checks.items() if c["verdict"] == "SKIP"]
    print(f"smoke: {'FAILED: ' + ', '.join(failed) if failed else 'no check failed'}"
          f"{'; skipped: ' + ', '.join(skipped) if skipped else ''}; numbers in {report.path}")
    T.close_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
