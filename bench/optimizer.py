"""Bench: one NorMuon step against torch.optim.Muon on the same matrices, and NorMuon's bytes per step at world 2.

    python bench/optimizer.py                                  # PRESET=cpu shapes (4 layers, dim 128), 30 repeats
    python bench/optimizer.py --preset speedrun --repeats 2    # the record's 12-layer 768-dim shapes (slow on CPU)
    python bench/optimizer.py --bf16-muon off --skip-dist      # only the like-for-like timing
    python bench/optimizer.py --quick                          # the `test` preset's shapes, 3 repeats (what tests run)
    python bench/optimizer.py --skip-time --skip-dist          # only part 3: MuonMax and MOMO=1 against NorMuon

Part 1 (time). The matrices are those build_optimizers hands NorMuon (param_groups() keys qkvo with blocks=4,
c_fc, c_proj, gates with is_gate=True), with fixed random gradients already in .grad at world size 1. It times
one NorMuon.step() (Polar Express, variance normalization, cautious weight decay, as build_optimizers configures
it) and one torch.optim.Muon.step() (lr 0.023, momentum 0.95, Nesterov, weight decay 1.2; the constants do not
change the work) on copies of the same matrices, in four variants: qkvo_w as one (4d, d) matrix, as torch.optim.Muon
sees a fused parameter, or split into 4 (d, d) params, as NorMuon treats it; and with torch's own bf16 Newton-Schulz
or with train_gpt.newton_schulz5 patched in for torch.optim._muon._zeropower_via_newtonschulz. On CPU our
orthogonalizations run a twin (fp32 GEMMs rounded to bf16, see train_gpt._odd_polynomial_iteration) while torch
runs real bf16 GEMMs, so the LIKE-FOR-LIKE ratio is NorMuon over torch.optim.Muon with the twin and split qkvo: the
same GEMMs (Polar Express and NS5 both run 5 steps of 3 GEMMs) on the same matrices, and the rest is what
NorMuon adds. The target is <= 1.10. Every variant and the breakdown's pure functions run round-robin inside each
repeat (rotating who goes first), one thread, after a warmup; each figure is the median over repeats.

Part 2 (communication). It re-invokes itself under torchrun with 2 gloo ranks: each builds the model, sets
NorMuon.reduce_in_backward(True), puts rank-specific random gradients in .grad through a real backward (of
sum(p * g), so autograd fires the post-accumulate-grad hooks exactly as a training backward does), runs one step
and reports NorMuon.bytes_sent (ring algorithm: (world-1)/world of each collective's input per rank). The minimum is a
reduce-scatter plus an all-gather of the matrix params: 2 * (world-1)/world * their bytes. The world-2 params are
then held against a world-1 step on the mean gradient. Only the matrices matter here, so each rank builds the preset
at world size 1 (no batch or data: a preset whose batch does not split over 2 ranks still benches) and joins the
2-rank group from torchrun's env. Nothing is asserted; it prints ratios.

Part 3 (optimizer variants). The whole optimizer step (matrix optimizer and DistAdam over every parameter) for
OPTIMIZER=normuon and muonmax, each without and with MOMO=1, on the same model and fixed gradients, round-robin,
as ratios to NorMuon's step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.optim._muon as torch_muon

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402

SEED = 0
GRAD_SCALE = 1e-2
TORCH_MUON = dict(lr=0.023, momentum=0.95, nesterov=True, weight_decay=1.2)
TARGET_RATIO = 1.10
WORLD = 2
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]


def build(preset: str, compile_helpers: bool = False) -> tuple[T.Hyperparameters, T.GPT, T.NorMuon]:
    """The model of a preset (seeded, so every process builds the same one) and its matrix optimizer; with
    compile_helpers, as COMPILE=1 builds it (orthogonalization, variance norm, cautious update compiled)."""
    hp, _ = T.parse_env({"PRESET": preset, "COMPILE": str(int(compile_helpers))}, cuda_available=False)
    hp = T.resolve_auto(hp, torch.device("cpu"))
    torch.manual_seed(SEED)
    model = T.GPT(T.model_config(hp))
    normuon = T.build_optimizers(model, hp)[0]
    if not isinstance(normuon, T.NorMuon):
        raise SystemExit(f"build_optimizers gave {type(normuon).__name__} for PRESET={preset}; expected NorMuon")
    return hp, model, normuon


def matrices(normuon: T.NorMuon) -> list[tuple[torch.Tensor, dict]]:
    """(param, its group) in NorMuon's order."""
    return [(p, group) for group in normuon.param_groups for p in group["params"]]


def random_grads(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator).mul_(GRAD_SCALE) for p in params]


@contextlib.contextmanager
def ortho_twin() -> Iterator[None]:
    """torch.optim.Muon with train_gpt.newton_schulz5 (the CPU twin: fp32 GEMMs rounded to bf16) as its NS5."""
    original = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = lambda grad, ns_coefficients, ns_steps, eps: T.newton_schulz5(grad)
    try:
        yield
    finally:
        torch_muon._zeropower_via_newtonschulz = original


def torch_muon_step(normuon: T.NorMuon, grads: list[torch.Tensor], split: bool, twin: bool) -> Callable[[], float]:
    """A timed step of torch.optim.Muon on copies of NorMuon's matrices; split: qkvo_w as `blocks` square params."""
    params, param_grads = [], []
    for (p, group), grad in zip(matrices(normuon), grads):
        pieces = group["blocks"] if split else 1
        rows = p.shape[0] // pieces
        for k in range(pieces):
            params.append(p.detach()[k * rows:(k + 1) * rows].clone().requires_grad_())
            param_grads.append(grad[k * rows:(k + 1) * rows].clone())
    optimizer = torch.optim.Muon(params, **TORCH_MUON)

    def step() -> float:
        for p, grad in zip(params, param_grads):
            p.grad = grad
        with ortho_twin() if twin else contextlib.nullcontext():
            start = time.perf_counter()
            optimizer.step()
            return time.perf_counter() - start
    return step


def normuon_step(normuon: T.NorMuon, grads: list[torch.Tensor]) -> Callable[[], float]:
    def step() -> float:
        for (p, _), grad in zip(matrices(normuon), grads):
            p.grad = grad
        start = time.perf_counter()
        normuon.step()
        return time.perf_counter() - start
    return step


def breakdown_steps(normuon: T.NorMuon, grads: list[torch.Tensor]) -> dict[str, Callable[[], float]]:
    """NorMuon's stages as the pure functions it calls, each over every matrix, on the tensors of one step."""
    stages: dict[str, list[Callable[[], object]]] = {"momentum": [], "orthogonalization": [],
                                                     "variance normalization": [], "cautious update": []}
    beta2 = normuon._beta2
    for (p, group), grad in zip(matrices(normuon), grads):
        rows, cols = p.shape
        blocks, momentum = group["blocks"], group["momentum"]
        buffer = torch.zeros_like(grad)
        update = grad.lerp(buffer, momentum).view(blocks, rows // blocks, cols)
        ortho = normuon.orthogonalize(update)
        reduce_dim = T.variance_reduce_dim(ortho.shape, group["is_gate"])
        second_moment = normuon.state[p]["second_moment"].clone()
        normalized, _ = normuon.variance_normalize(ortho, second_moment, beta2, reduce_dim)
        lr = group["lr"] * group["schedule"]
        eff_lr = torch.tensor(lr * max(1.0, rows / cols) ** 0.5 * group["lr_mul"])
        decay = torch.tensor(group["weight_decay"] * lr)
        stages["momentum"].append(lambda b=buffer, g=grad, m=momentum: g.lerp(b.lerp_(g, 1 - m), m))
        stages["orthogonalization"].append(lambda u=update: normuon.orthogonalize(u))
        stages["variance normalization"].append(
            lambda o=ortho, s=second_moment, d=reduce_dim: normuon.variance_normalize(o, s, beta2, d))
        stages["cautious update"].append(
            lambda w=p.detach(), v=normalized.view(rows, cols), lr_t=eff_lr, d=decay:
            normuon.cautious_update(w, v, lr_t, d, normuon.cautious))

    def timed(calls: list[Callable[[], object]]) -> Callable[[], float]:
        @torch.no_grad()  # as in NorMuon.step
        def run() -> float:
            start = time.perf_counter()
            for call in calls:
                call()
            return time.perf_counter() - start
        return run
    return {name: timed(calls) for name, calls in stages.items()}


def interleaved_samples(calls: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """`repeats` timings of each call, in rounds whose starting call rotates, so that a slow spell of a shared
    machine falls on every call alike rather than on whichever ran at that moment."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(calls[name]())
    return samples


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def bench_time(preset: str, repeats: int, bf16_muon: bool, compile_helpers: bool) -> None:
    hp, _, normuon = build(preset, compile_helpers)
    for group in normuon.param_groups:
        group["momentum"] = hp.muon_momentum  # the loop's value after warmup, as torch.optim.Muon's 0.95
    params = [p for p, _ in matrices(normuon)]
    grads = random_grads(params, SEED)
    normuon_name = f"NorMuon ({hp.ortho} twin, variance norm, cautious wd{', COMPILE=1' if hp.compile else ''})"
    muon = "torch.optim.Muon"
    steps = {normuon_name: normuon_step(normuon, grads)}
    if bf16_muon:
        steps[f"{muon}, qkvo 1x(4d,d), torch bf16 NS5"] = torch_muon_step(normuon, grads, split=False, twin=False)
        steps[f"{muon}, qkvo 4x(d,d), torch bf16 NS5"] = torch_muon_step(normuon, grads, split=True, twin=False)
    steps[f"{muon}, qkvo 1x(4d,d), our NS5 twin"] = torch_muon_step(normuon, grads, split=False, twin=True)
    like_for_like = f"{muon}, qkvo 4x(d,d), our NS5 twin"
    steps[like_for_like] = torch_muon_step(normuon, grads, split=True, twin=True)
    for step in steps.values():  # warm up, and let NorMuon create its state (the breakdown reads it)
        step()
    stages = breakdown_steps(normuon, grads)
    calls = {**steps, **stages}
    for call in stages.values():
        call()
    samples = interleaved_samples(calls, repeats)

    shapes = sorted({tuple(p.shape) for p in params}, reverse=True)
    numel = sum(p.numel() for p in params)
    print(f"== NorMuon step vs torch.optim.Muon: preset {preset}, {len(params)} matrices "
          f"({', '.join(map(str, shapes))}), {numel / 1e6:.2f} M params, gradient in .grad, world 1, "
          f"{torch.get_num_threads()} thread, median of {repeats} ==")
    normuon_ms = median_ms(samples[normuon_name])
    width = max(map(len, steps)) + 2
    print(f"  {'optimizer step':<{width}}{'ms':>10}  {'NorMuon / it':>13}")
    for name in steps:
        ms = median_ms(samples[name])
        mark = "  <- like for like" if name == like_for_like else ""
        print(f"  {name:<{width}}{ms:>10.2f}  {normuon_ms / ms:>12.3f}x{mark}")
    if not bf16_muon:
        print(f"  ({muon} with torch's own bf16 GEMMs skipped: pass --bf16-muon on)")
    ratio = normuon_ms / median_ms(samples[like_for_like])
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"  like for like (same GEMMs on the same (d, d) blocks, CPU twin in both): NorMuon = {ratio:.3f}x "
          f"torch.optim.Muon; target <= {TARGET_RATIO:.2f}x {verdict}")
    print(f"\n== where NorMuon's {normuon_ms:.2f} ms go (pure functions on the same tensors, same repeats) ==")
    print(f"  {'stage':<24}{'ms':>10}{'share':>8}")
    accounted = 0.0
    for name in stages:
        ms = median_ms(samples[name])
        accounted += ms
        print(f"  {name:<24}{ms:>10.2f}{100 * ms / normuon_ms:>7.1f}%")
    other = normuon_ms - accounted
    print(f"  {'other':<24}{other:>10.2f}{100 * other / normuon_ms:>7.1f}%   "
          "(grad stack, copy-back, 0-D tensors, Python; step minus the stages)")


OPTIMIZER_VARIANTS = (("normuon", False), ("muonmax", False), ("normuon", True), ("muonmax", True))


def bench_variants(preset: str, repeats: int) -> None:
    """Part 3: the whole optimizer step of every parameter (the matrix optimizer and DistAdam, as build_optimizers
    makes them) for OPTIMIZER=normuon/muonmax, each without and with MOMO=1 (Momo's prepare, one 4-number reduce,
    apply), on the same model and the same fixed gradients, round-robin in one process, world 1."""
    runs = {}
    for optimizer, momo in OPTIMIZER_VARIANTS:
        hp = T.parse_env({"PRESET": preset, "OPTIMIZER": optimizer, "MOMO": "1" if momo else "0",
                          "ADAM_STEP_EVERY": "1", "COMPILE": "0", "FP8": "0"}, cuda_available=False)[0]
        torch.manual_seed(SEED)
        model = T.GPT(T.model_config(hp))
        optimizers = T.build_optimizers(model, hp)
        params = [p for p in model.parameters()]
        grads = random_grads(params, SEED)
        momo_state = T.Momo(hp.momo_lb, hp.momo_beta) if momo else None
        loss = torch.tensor(4.0)

        def step(model=model, optimizers=optimizers, params=params, grads=grads, momo_state=momo_state) -> float:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            T.set_schedule(optimizers, 500, hp, grad_scale=1.0)
            start = time.perf_counter()
            if momo_state is not None:
                momo_state.step(optimizers, loss)
            else:
                for opt in optimizers:
                    opt.step()
            return time.perf_counter() - start

        runs[f"{optimizer}{' + momo' if momo else ''}"] = step
    for step in runs.values():
        step()
    samples = interleaved_samples(runs, repeats)
    base = median_ms(samples["normuon"])
    print(f"\n== whole optimizer step (matrices + DistAdam), preset {preset}, world 1, "
          f"{torch.get_num_threads()} thread, median of {repeats} ==")
    print(f"  {'OPTIMIZER, MOMO':<20}{'ms':>10}  {'/ normuon':>10}")
    for name in runs:
        ms = median_ms(samples[name])
        print(f"  {name:<20}{ms:>10.2f}  {ms / base:>9.3f}x")


def dist_worker(preset: str, out_dir: str) -> None:
    """One rank of part 2: a hook-driven NorMuon step at the world size torchrun gives; writes rank{r}.pt."""
    torch.set_num_threads(1)
    # torchrun's env straight into Launch, not through parse_env: that would also check the preset's batch against
    # this world size, which NorMuon's step never sees
    launch = T.Launch(*(int(os.environ[key]) for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")))
    T.init_distributed(launch)
    _, _, normuon = build(preset)
    params = [p for p, _ in matrices(normuon)]
    grads = random_grads(params, SEED + 1 + launch.rank)
    normuon.reduce_in_backward(True)
    torch.stack([(p * g).sum() for p, g in zip(params, grads)]).sum().backward()
    reduces_from_hooks = len(normuon._pending)
    normuon.step()
    torch.save({"params": [p.detach().clone() for p in params], "bytes_sent": normuon.bytes_sent,
                "reduces_from_hooks": reduces_from_hooks, "buckets": len(normuon.buckets)},
               os.path.join(out_dir, f"rank{launch.rank}.pt"))
    T.dist.destroy_process_group()


def bench_comm(preset: str) -> None:
    with tempfile.TemporaryDirectory() as out_dir:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = TORCHRUN + [str(Path(__file__).resolve()), "--preset", preset, "--dist-worker", out_dir]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"torchrun failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    _, _, normuon = build(preset)
    params = [p for p, _ in matrices(normuon)]
    before = [p.detach().clone() for p in params]
    rank_grads = [random_grads(params, SEED + 1 + r) for r in range(WORLD)]
    for p, *gs in zip(params, *rank_grads):
        p.grad = torch.stack(gs).sum(0) / WORLD
    normuon.step()
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    minimum = 2 * (WORLD - 1) / WORLD * param_bytes

    print(f"\n== communication per step at world {WORLD} (gloo, one NorMuon step, hooks fired by backward) ==")
    print(f"  matrix params: {param_bytes / 2**20:.2f} MiB in {ranks[0]['buckets']} buckets; "
          f"reduce-scatters launched from hooks before step(): {ranks[0]['reduces_from_hooks']}"
          f"/{ranks[0]['buckets']}")
    print(f"  {'rank':<6}{'bytes sent':>14}{'minimum':>14}{'sent / min':>14}")
    for r, result in enumerate(ranks):
        print(f"  {r:<6}{result['bytes_sent']:>14,}{int(minimum):>14,}{result['bytes_sent'] / minimum:>13.6f}x")
    print("  minimum = 2 * (world-1)/world * bytes of the matrix params (ring reduce-scatter + all-gather)")
    step_size = max((p.detach() - b).abs().max().item() for p, b in zip(params, before))
    tolerance = step_size * 2 ** -7  # one bf16 ulp of the largest change: the update is orthogonalized in bf16
    for r, result in enumerate(ranks):
        diff = max((p.detach() - q).abs().max().item() for p, q in zip(params, result["params"]))
        verdict = "within" if diff <= tolerance else "OUTSIDE"
        print(f"  rank {r} params vs a world-1 step on the mean gradient: max |diff| {diff:.3e} "
              f"({verdict} bf16 tolerance {tolerance:.3e} = 2^-7 * largest change {step_size:.3e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, choices=("cpu", "speedrun", "test"),
                        help="parameter shapes: cpu (4 layers, dim 128, the default), speedrun (12 layers, dim 768) "
                             "or test (4 layers, dim 32; --quick's)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per variant (default: 30 for cpu and test, 2 for speedrun; --quick: 3)")
    parser.add_argument("--bf16-muon", choices=("auto", "on", "off"), default="auto",
                        help="also time torch.optim.Muon with its own bf16 GEMMs (auto: not for speedrun, where "
                             "one such step takes minutes on a CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="both parts at the test preset's shapes, 3 repeats: checks the bench runs, times nothing")
    parser.add_argument("--compile", action="store_true",
                        help="build NorMuon as COMPILE=1 does (its helpers torch.compile'd; first call compiles)")
    parser.add_argument("--skip-time", action="store_true", help="skip part 1 (step time)")
    parser.add_argument("--skip-dist", action="store_true", help="skip part 2 (world-2 communication)")
    parser.add_argument("--skip-variants", action="store_true",
                        help="skip part 3 (whole optimizer step: normuon, muonmax, each with and without MOMO=1)")
    parser.add_argument("--dist-worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dist_worker:
        dist_worker(args.preset, args.dist_worker)
        return
    torch.set_num_threads(1)
    preset = args.preset or ("test" if args.quick else "cpu")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 2 if preset == "speedrun" else 30)
    if repeats < 1:
        parser.error(f"--repeats {repeats}: expected at least 1")
    bf16_muon = args.bf16_muon == "on" or (args.bf16_muon == "auto" and preset != "speedrun")
    if not args.skip_time:
        bench_time(preset, repeats, bf16_muon, args.compile)
    if not args.skip_dist:
        bench_comm(preset)
    if not args.skip_variants:
        bench_variants(preset, repeats)


if __name__ == "__main__":
    main()
