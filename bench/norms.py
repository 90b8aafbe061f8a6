"""Bench: the bounded norms (DyT, Derf, Derf-EMA) against RMSNorm, as NORM selects them in train_gpt.py.

    python bench/norms.py                                   # dims 768 and 2048, 8192 tokens, eager and compiled
    python bench/norms.py --dims 768 --repeats 5 --no-compile   # a quick look on a laptop CPU
    python bench/norms.py --diagnostics                     # DIAGNOSTICS=1's cost per validation (PRESET=cpu)
    python bench/norms.py --quick                           # tiny shapes, eager, then --diagnostics at PRESET=test

For each model dim and mode it times one norm module on (tokens, dim) activations (bf16 on CUDA, fp32 on CPU)
in training mode: the forward alone (with autograd recording, as a training step pays it) and forward +
backward. "eager" runs the plain torch ops; "compiled" runs torch.compile of the module (on CUDA train_gpt.py
already fuses the bounded norms this way, see bounded_kernel). The variants run round-robin inside each repeat,
so load on a shared machine hits them alike; each figure is the median over repeats. It prints each time and
its speedup over RMSNorm (rmsnorm time / variant time; > 1: faster than RMSNorm). Nothing is asserted.

--diagnostics instead times, at the shapes of --preset (default cpu) on synthetic shards in a temp dir, one validation
(evaluate) against the diag record of DIAGNOSTICS=1 (Diagnostics.collect after a snapshotted step, on the sequence
train() gives it), per NORM. --quick runs both parts at tiny shapes, eager only (compiling takes minutes on a CPU),
to check that the bench runs; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402
from step import write_synthetic_shards  # noqa: E402  (bench/step.py: one writer of synthetic shards for bench/)

VARIANTS = ("rmsnorm", "dyt", "derf", "derf_ema")


@contextlib.contextmanager
def eager_bounded_kernels():
    """Makes the bounded norms run their plain torch ops even on CUDA (train_gpt picks a compiled kernel there)."""
    picked = T.bounded_kernel
    T.bounded_kernel = lambda fn, x: functools.partial(T._upcast_apply, fn)
    try:
        yield
    finally:
        T.bounded_kernel = picked


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, inner: int) -> float:
    """Milliseconds per call of fn over `inner` back-to-back calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / inner


def bench_dim(dim: int, tokens: int, compiled: bool, repeats: int, inner: int, device: torch.device) -> dict:
    """{(variant, pass): median ms} for one model dim and mode."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hp = T.parse_env({"PRESET": "test", "MODEL_DIM": str(dim), "HEAD_DIM": str(dim)}, False)[0]
    x = torch.randn(tokens, dim, device=device, dtype=dtype).mul_(2).requires_grad_()
    grad = torch.randn_like(x)
    calls = {}
    for name in VARIANTS:
        module = T.make_norm(T.dataclasses.replace(T.model_config(hp), norm=name)).to(device)
        run = torch.compile(module, dynamic=False) if compiled else module
        calls[(name, "fwd")] = functools.partial(run, x)
        calls[(name, "fwd+bwd")] = lambda run=run: run(x).backward(grad)
    for fn in calls.values():  # warm up (and compile) every call before timing any
        fn()
        fn()
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            samples[key].append(time_calls(fn, device, inner))
    return {key: statistics.median(values) for key, values in samples.items()}


def bench_diagnostics(preset: str, norms: list[str], repeats: int, device: torch.device) -> None:
    """Prints a validation's time and the diag record's time (medians) per NORM at the preset's shapes."""
    print(f"{'norm':>9} {'validation ms':>14} {'diag ms':>8} {'overhead':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for norm in norms:
            env = {"PRESET": preset, "NORM": norm, "OPTIMIZER": "adamw", "DIAGNOSTICS": "1"}
            hp, launch = T.parse_env(env, cuda_available=device.type == "cuda")
            hp = T.resolve_auto(T.dataclasses.replace(hp, compile=False), device)
            hp = write_synthetic_shards(hp, Path(tmp))
            state = T.setup(hp, launch, device)
            state.diagnostics = T.Diagnostics(state.model, hp)
            state.diagnostics.before_step(hp.val_every - 1)  # snapshot, as before the step that precedes a val
            T.train_step(state, 0)
            # as train() does: the start of the first validation sequence, one training chunk long
            batch = state.val_sequences[0][:state.geometry.chunk_tokens(hp.batch_schedule[0]) + 1]
            val_ms, diag_ms = [], []
            for _ in range(repeats):
                val_ms.append(time_calls(lambda: T.evaluate(state), device, 1))
                diag_ms.append(time_calls(lambda: state.diagnostics.collect(1, batch), device, 1))
            val, diag = statistics.median(val_ms), statistics.median(diag_ms)
            print(f"{norm:>9} {val:>14.1f} {diag:>8.1f} {100 * diag / val:>8.1f}%", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="768,2048", help="comma-separated model dims")
    parser.add_argument("--tokens", type=int, default=8192, help="rows of the activation (batch * sequence)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per figure (median taken)")
    parser.add_argument("--inner", type=int, default=5, help="calls per timed repeat")
    parser.add_argument("--no-compile", action="store_true", help="eager only (skip torch.compile)")
    parser.add_argument("--diagnostics", action="store_true", help="time DIAGNOSTICS=1 against a validation")
    parser.add_argument("--norms", default=",".join(VARIANTS), help="--diagnostics: the NORM values to time")
    parser.add_argument("--preset", default="cpu", choices=("cpu", "test", "speedrun"),
                        help="--diagnostics: the preset whose shapes are timed")
    parser.add_argument("--quick", action="store_true",
                        help="dim 64, 256 tokens, 2 repeats, eager; then --diagnostics at PRESET=test, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.dims, args.tokens, args.repeats, args.inner, args.no_compile = "64", 256, 2, 1, True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}, median of {args.repeats} x "
          + ("1 call" if args.diagnostics else f"{args.inner} calls, tokens {args.tokens}"))
    if args.diagnostics:
        bench_diagnostics(args.preset, args.norms.split(","), args.repeats, device)
        return
    bench_table(args, device)
    if args.quick:
        print("--quick: DIAGNOSTICS=1 at PRESET=test, 1 call")
        bench_diagnostics("test", args.norms.split(","), 1, device)


def bench_table(args: argparse.Namespace, device: torch.device) -> None:
    """Prints each norm's fwd and fwd+bwd time and its speedup over RMSNorm, per dim and mode."""
    modes = ("eager",) if args.no_compile else ("eager", "compiled")
    header = f"{'dim':>5} {'mode':>9} {'pass':>8} {'rmsnorm ms':>11}" + "".join(
        f" {v + ' ms':>12} {'speedup':>8}" for v in VARIANTS[1:])
    print(header)
    for dim in (int(d) for d in args.dims.split(",")):
        for mode in modes:
            with eager_bounded_kernels() if mode == "eager" else contextlib.nullcontext():
                times = bench_dim(dim, args.tokens, mode == "compiled", args.repeats, args.inner, device)
            for pass_ in ("fwd", "fwd+bwd"):
                base = times[("rmsnorm", pass_)]
                row = f"{dim:>5} {mode:>9} {pass_:>8} {base:>11.3f}"
                for variant in VARIANTS[1:]:
                    ms = times[(variant, pass_)]
                    row += f" {ms:>12.3f} {base / ms:>7.2f}x"
                print(row, flush=True)


if __name__ == "__main__":
    main()
