"""NORM variants and DIAGNOSTICS=1: formulas, gradients, the derf_ema scale, ranks, runs."""

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train_gpt as T

REPO = Path(T.__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
VARIANTS = ("rmsnorm", "dyt", "derf", "derf_ema")


def hp(**overrides):
    return T.parse_env({"PRESET": "test", **{k.upper(): str(v) for k, v in overrides.items()}}, False)[0]


def randomized(norm: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The norm with its parameters (and sigma_hat) moved off their init, so every term of the formula counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
        if isinstance(norm, T.DerfEMA):
            norm.sigma_hat.fill_(1.7)
    return norm


def test_make_norm_picks_each_variant_and_rejects_others():
    kinds = {"rmsnorm": T.RMSNorm, "dyt": T.DyT, "derf": T.Derf, "derf_ema": T.DerfEMA}
    for name, cls in kinds.items():
        assert type(T.make_norm(hp(norm=name))) is cls
    with pytest.raises(T.ConfigError, match="NORM=drf: expected one of rmsnorm, dyt, derf, derf_ema"):
        hp(norm="drf")


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_matches_formula(name):
    norm = randomized(T.make_norm(hp(norm=name, norm_alpha=0.3)))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)) * 3
    if name == "rmsnorm":
        expected = x / x.square().mean(-1, keepdim=True).add(torch.finfo(x.dtype).eps).sqrt()
    elif name == "dyt":
        expected = norm.gamma * torch.tanh(norm.alpha * x) + norm.beta
    elif name == "derf":
        expected = norm.gamma * torch.erf(norm.alpha * x + norm.shift) + norm.beta
    else:
        expected = norm.gamma * torch.erf(norm.alpha * x / 1.7 + norm.shift) + norm.beta
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


def test_init_values_follow_norm_alpha():
    norm = T.make_norm(hp(norm="derf_ema", norm_alpha=0.3))
    assert norm.alpha.tolist() == pytest.approx([0.3]) and norm.shift.tolist() == [0.0]
    assert torch.equal(norm.gamma, torch.ones(32)) and torch.equal(norm.beta, torch.zeros(32))
    assert norm.sigma_hat.tolist() == [1.0] and norm.ema == pytest.approx(0.9)
    assert T.make_norm(hp(norm="dyt")).alpha.tolist() == [0.5]


def test_bf16_input_returns_bf16():
    norm = T.make_norm(hp(norm="derf"))
    x = torch.randn(4, 32)
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), norm(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def f64(*shape, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5
            ).requires_grad_()


def test_gradcheck_pure_functions_float64():
    x, gamma, beta = f64(3, 4, 6), f64(6, seed=1), f64(6, seed=2)
    alpha, shift = f64(1, seed=3), f64(1, seed=4)
    sigma_hat = torch.tensor([1.3], dtype=torch.float64)
    assert torch.autograd.gradcheck(T.dyt, (x, alpha, gamma, beta))
    assert torch.autograd.gradcheck(T.derf, (x, alpha, shift, gamma, beta))
    assert torch.autograd.gradcheck(lambda *a: T.derf_ema(*a, sigma_hat), (x, alpha, shift, gamma, beta))


@pytest.mark.parametrize("name", VARIANTS)
def test_gradcheck_modules_float64(name):
    """Through each module's forward (training mode: derf_ema also accumulates its stats), w.r.t. the input and
    every parameter."""
    norm = randomized(T.make_norm(hp(norm=name))).double()
    params = dict(norm.named_parameters())
    x = f64(2, 3, 32)

    def run(x, *values):
        return torch.func.functional_call(norm, dict(zip(params, values)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params.values()))


def test_ema_rule_is_exact_and_moves_only_on_update():
    norm = T.DerfEMA(8, alpha=0.5, ema=0.9)
    twos, fours = torch.full((3, 8), 2.0), torch.full((3, 8), 4.0)
    norm(twos)
    norm(fours)  # two micro-batches of one step: mean squares 4 and 16
    assert norm.sigma_hat.tolist() == [1.0]
    norm.eval()
    norm(torch.full((3, 8), 100.0))
    norm.train()
    with torch.no_grad():
        norm(torch.full((3, 8), 100.0))
    assert norm.sigma_hat.tolist() == [1.0] and norm.scale_stats.tolist() == [20.0, 2.0]
    T.DerfEMA.update_running_scales([norm])
    expected = 0.9 * 1.0 + 0.1 * math.sqrt(10.0)
    assert norm.sigma_hat.item() == pytest.approx(expected, rel=1e-6)
    assert norm.scale_stats.tolist() == [0.0, 0.0]
    T.DerfEMA.update_running_scales([norm])  # no forward since: unchanged
    assert norm.sigma_hat.item() == pytest.approx(expected, rel=1e-6)
    assert T.ema_blend_scale(torch.tensor([2.0]), torch.tensor([4.0]), 0.75).item() == pytest.approx(2.5)


def test_gpt_has_one_scale_per_site_in_state_dict_and_params_in_scalar_group():
    model = T.GPT(T.model_config(hp(norm="derf_ema")))
    plan = model.plan
    sites = [k for k in model.state_dict() if k.endswith("sigma_hat")]
    assert len(sites) == sum(plan.attn) + sum(plan.mlp) + 1 and "final_norm.sigma_hat" in sites
    assert not any("scale_stats" in k for k in model.state_dict())
    groups = model.param_groups()
    grouped = [id(p) for ps in groups.values() for p in ps]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert {id(p) for p in model.final_norm.parameters()} <= {id(p) for p in groups["scalar"]}


def test_warmup_restores_sigma_hat(run_env, one_thread):
    hp_, launch = T.parse_env({**run_env, "OPTIMIZER": "adamw", "NORM": "derf_ema", "WARMUP": "1"}, False)
    device = torch.device("cpu")
    state = T.setup(T.resolve_auto(hp_, device), launch, device)
    T.train_step(state, 0)
    moved = {k: v.item() for k, v in state.model.state_dict().items() if k.endswith("sigma_hat")}
    assert all(v != 1.0 for v in moved.values())
    state2 = T.setup(T.resolve_auto(hp_, device), launch, device)
    T.warmup(state2)
    scales = [v for k, v in state2.model.state_dict().items() if k.endswith("sigma_hat")]
    assert all(v.item() == 1.0 for v in scales)
    assert all(m.scale_stats.abs().sum() == 0 for m in state2.model.modules() if isinstance(m, T.DerfEMA))
    T.train_step(state2, 0)
    after = {k: v.item() for k, v in state2.model.state_dict().items() if k.endswith("sigma_hat")}
    assert after == pytest.approx(moved, rel=1e-6)  # the same first step as a model that never warmed up


RANK_WORKER = textwrap.dedent("""
    import os, sys
    import torch
    sys.path.insert(0, {repo!r})
    import train_gpt as T
    launch = T.parse_env(os.environ, cuda_available=False)[1]
    T.init_distributed(launch)
    norms = [T.DerfEMA(4, alpha=0.5, ema=0.9) for _ in range(2)]
    value = 1.0 + 2.0 * launch.rank  # rank 0 sees 1s, rank 1 sees 3s: mean squares 1 and 9, averaged 5
    for micro_batch in range(2):
        for site, norm in enumerate(norms):
            norm(torch.full((2, 4), value * (site + 1)))
    T.DerfEMA.update_running_scales(norms)
    torch.save([n.sigma_hat.clone() for n in norms], {out!r} + f".{{launch.rank}}")
    T.dist.destroy_process_group()
""")


@pytest.mark.slow
def test_sigma_hat_identical_across_two_gloo_ranks(run_env, tmp_path):
    script = tmp_path / "rank_worker.py"
    out = str(tmp_path / "sigma")
    script.write_text(RANK_WORKER.format(repo=str(REPO), out=out))
    result = subprocess.run(TORCHRUN + [str(script)], env=run_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rank0, rank1 = torch.load(out + ".0"), torch.load(out + ".1")
    for site, (a, b) in enumerate(zip(rank0, rank1)):
        assert torch.equal(a, b)
        assert a.item() == pytest.approx(0.9 + 0.1 * math.sqrt(5.0) * (site + 1), rel=1e-6)


@pytest.mark.parametrize("name,alpha,sat99,sat95", [("dyt", 1.0, 0.375, 0.625), ("derf", 1.0, 0.625, 0.75)])
def test_saturation_metric_on_known_inputs(name, alpha, sat99, sat95):
    # |tanh| > 0.99 beyond 2.647, > 0.95 beyond 1.832; |erf| > 0.99 beyond 1.822, > 0.95 beyond 1.386
    norm = T.make_norm(hp(norm=name, norm_alpha=alpha))
    x = torch.tensor([0.0, 0.5, -1.5, 1.9, 2.0, -3.0, 5.0, 9.0])
    stats = T.norm_input_stats(norm, x)
    assert stats["sat99"].item() == sat99 and stats["sat95"].item() == sat95
    assert stats["arg_mean"].item() == pytest.approx(x.mean().item())
    assert stats["rms"].item() == pytest.approx(x.square().mean().sqrt().item())
    assert "sat99" not in T.norm_input_stats(T.RMSNorm(), x)


def test_percentile_and_spectral_norm():
    assert T.percentile(torch.arange(1.0, 201.0), 0.99).item() == 198.0
    w = torch.diag(torch.tensor([3.0, 2.0, 0.5])) @ torch.linalg.qr(torch.randn(3, 3))[0]
    sigma, v = T.spectral_norm(w, torch.ones(3), 30)
    assert sigma.item() == pytest.approx(3.0, rel=1e-4) and v.norm().item() == pytest.approx(1.0)


def load_validate():
    spec = importlib.util.spec_from_file_location("validate", REPO / "records" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("validate", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """In-process runs on one intra-op thread, as the subprocess runs (OMP_NUM_THREADS=1): the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_short_run_loss_falls_with_diagnostics(name, run_env, one_thread):
    env = {**run_env, "OPTIMIZER": "adamw", "NORM": name, "NUM_ITERATIONS": "16", "VAL_EVERY": "8",
           "VAL_TOKENS": "256", "DIAGNOSTICS": "1", "DIAG_EVERY": "3", "RUN_TAG": name}
    hp_, launch = T.parse_env(env, False)
    device = torch.device("cpu")
    state = T.setup(T.resolve_auto(hp_, device), launch, device)
    log = T.RunLog(state.hp, launch, device)
    try:
        assert T.train(state, log) == 0
    finally:
        log.close()
    lines = log.path.read_text().partition("\n" + "=" * 100 + "\n")[2].splitlines()
    vals = [float(line.split("val_loss:")[1].split()[0]) for line in lines if " val_loss:" in line]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.3
    diags = [json.loads(line.removeprefix("diag: ")) for line in lines if line.startswith("diag: ")]
    assert [d["step"] for d in diags] == [0, 3, 6, 8, 9, 12, 15, 16]  # validations and every DIAG_EVERY steps
    assert all("mlp_fc_update_rms" in d["layers"][0] for d in diags[1:])  # each one's previous step snapshotted
    layers = diags[-1]["layers"]
    assert [layer["block"] for layer in layers] == [f"blocks.{i}" for i in range(1, hp_.num_layers)]
    assert all(math.isfinite(v) for layer in layers for v in layer.values() if not isinstance(v, str))
    assert "mlp_fc_spectral" in layers[0] and "attn_o_update_rms" in layers[0]
    assert "mlp_fc_update_rms" not in diags[0]["layers"][0]  # nothing stepped before step 0
    assert layers[0]["mlp_fc_update_rms"] > 0 and diags[-1]["final_norm_rms"] > 0
    bounded = name != "rmsnorm"
    assert ("mlp_norm_sat99" in layers[0]) == bounded and ("final_norm_arg_p99" in diags[-1]) == bounded
    assert ("final_norm_sigma_hat" in diags[-1]) == (name == "derf_ema")
    series = load_validate().diagnostic_series(diags)
    assert len(series["layers.mlp_norm_rms (mean)"]) == 8 and "final_norm_rms" in series


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["dyt", "derf"])
def test_compiled_bounded_kernel_on_cuda_matches_eager_cpu(name):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fn = {"dyt": T.dyt, "derf": T.derf}[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 768, generator=gen).bfloat16()
    params = [torch.tensor([0.5]), torch.tensor([0.1]), torch.rand(768, generator=gen) + 0.5,
              torch.randn(768, generator=gen) * 0.1]
    if name == "dyt":
        params = [params[0], params[2], params[3]]
    eager = T.bounded_kernel(fn, x)(x, *params)
    on_gpu = T.bounded_kernel(fn, x.cuda())(x.cuda(), *[p.cuda() for p in params])
    assert on_gpu.dtype == torch.bfloat16
    torch.testing.assert_close(on_gpu.float().cpu(), eager.float(), rtol=1e-2, atol=1e-2)
