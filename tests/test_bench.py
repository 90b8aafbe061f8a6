"""Every bench script runs (--quick: tiny shapes, synthetic data) and prints its table; no timing is asserted."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_gpt as T

REPO = Path(T.__file__).resolve().parent
BENCH = REPO / "bench"


def run_quick(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PRESET")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, str(BENCH / script), "--quick", *args], env=env, capture_output=True,
                            text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def load_bench(script: str = "step.py"):
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_bench_script_has_a_test():
    assert sorted(p.name for p in BENCH.glob("*.py")) == ["norms.py", "optimizer.py", "smoke.py", "step.py"]


@pytest.mark.slow
def test_step_quick_prints_the_split_table():
    out = run_quick("step.py")
    assert "check: split step == T.train_step on fresh states" in out
    header = next(line for line in out.splitlines() if "fwd+bwd" in line)
    for column in ("data", "optimizer", "split", "train_step", "split/whole", "tokens/s", "MFU"):
        assert column in header
    assert "peak " in out and "TFLOP/s" in out
    result = json.loads(next(line for line in out.splitlines() if line.startswith("result: "))[len("result: "):])
    assert result["preset"] == "test"
    assert {"data", "fwd+bwd", "optimizer", "split", "train_step"} <= set(result["phases"][0])


@pytest.mark.slow
def test_optimizer_quick_prints_every_part():
    out = run_quick("optimizer.py")
    assert "whole optimizer step (matrices + DistAdam)" in out
    for variant in ("normuon", "muonmax", "normuon + momo", "muonmax + momo"):
        assert any(line.split("  ")[1:2] == [variant] or line.strip().startswith(variant + " ")
                   for line in out.splitlines()), variant
    assert "like for like" in out and "x torch.optim.Muon" in out
    assert "where NorMuon's" in out
    assert "communication per step at world 2" in out and "sent / min" in out
    assert out.count("params vs a world-1 step on the mean gradient") == 2
    assert "OUTSIDE" not in out  # the world-2 step equals a world-1 step on the mean gradient


@pytest.mark.slow
def test_norms_quick_prints_both_parts():
    out = run_quick("norms.py")
    assert "rmsnorm ms" in out and "speedup" in out
    assert "validation ms" in out
    for norm in ("rmsnorm", "dyt", "derf", "derf_ema"):
        assert any(line.split() and line.split()[0] == norm for line in out.splitlines())


def test_step_split_equals_train_step_and_refuses_a_step_without_its_cuts(tmp_path, monkeypatch):
    """The cut step computes exactly what T.train_step does; a train_step whose order lost the cuts stops the
    bench instead of timing something else."""
    bench = load_bench()
    device = torch.device("cpu")
    hp, launch = T.parse_env({"PRESET": "test"}, cuda_available=False)
    hp = bench.write_synthetic_shards(T.resolve_auto(hp, device), tmp_path)
    state = T.setup(hp, launch, device)
    assert "max rel diff loss 0.0e+00, params 0.0e+00" in bench.check_split(hp, launch, state)
    step_model = state.step_model
    _, parts = bench.split_step(state, 0)
    assert set(parts) == {"data", "fwd+bwd", "optimizer"} and all(v >= 0 for v in parts.values())
    assert state.step_model is step_model and T.set_schedule.__name__ == "set_schedule"  # the cuts are undone
    monkeypatch.setattr(T, "train_step", lambda state, step: state.step_model(*[torch.zeros(9, dtype=torch.long)] * 2))
    with pytest.raises(SystemExit, match="move the cuts"):
        bench.split_step(state, 1)


def test_smoke_without_cuda_says_so_in_one_line():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PRESET")}
    result = subprocess.run([sys.executable, str(BENCH / "smoke.py")], env={**env, "CUDA_VISIBLE_DEVICES": ""},
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("smoke: no CUDA GPU here")


@pytest.mark.slow
def test_smoke_quick_passes_every_check_of_the_cpu_twin(tmp_path, compiled_run):
    """The smoke's CPU twin: the test preset compiled, every check. It runs last (conftest.AFTER_BACKGROUND_RUNS),
    once conftest's background compiled run of the same model has ended, so that its graphs come from Inductor's
    cache instead of a second cold compile of the same shapes."""
    compiled_run.process.wait(timeout=900)  # its result is test_train's to check; here only its graphs matter
    out = run_quick("smoke.py", "--out", str(tmp_path))
    for check in ("gradients", "compile", "step", "validation"):
        assert f"check {check}: PASS" in out, out
    assert "check cuda-tests: SKIP" in out
    report = json.loads(next(tmp_path.glob("smoke_*.json")).read_text())
    checks = report["checks"]
    assert report["preset"] == "test" and checks["gradients"]["nonfinite"] == checks["gradients"]["zero"] == []
    assert checks["gradients"]["max_rel_error"] <= checks["gradients"]["tolerance"]
    assert checks["compile"]["graphs_after_warmup"] == checks["compile"]["graphs_after"] > 0
    assert checks["step"]["step_ms"] > 0 and checks["step"]["phases"][0]["tokens_per_s"] > 0


@pytest.mark.slow
def test_compiled_gradients_equal_eager_at_the_cpu_preset_shapes(compiled_cpu_run):
    """The cpu preset's graph compiled by Inductor once gave non-finite gradients in 11 parameters (a masked
    softmax filled with -inf), where eager, aot_eager and the smaller test preset were finite: one packed chunk of
    the cpu preset's shapes, compiled against eager, every gradient finite and within the smoke's CPU tolerance.
    The check runs first in conftest's background compiled cpu run (tests/compiled_cpu_worker.py), whose training
    step then reuses its graph: one compile of these shapes for both tests."""
    gradients = compiled_cpu_run.root / "gradients.json"
    deadline = time.monotonic() + 900
    while not gradients.exists() and compiled_cpu_run.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if not gradients.exists():  # the worker wrote nothing: its output says why
        compiled_cpu_run.process.kill()
        compiled_cpu_run.out.seek(0)
        pytest.fail("the compiled cpu run wrote no gradient check:\n" + compiled_cpu_run.out.read()[-6000:])
    result = json.loads(gradients.read_text())
    print(result)
    # every parameter but the value-embedding table that 4 layers leave unused (layer 2 has no attention)
    assert result["parameters"] == result["model_parameters"] - 1 and result["zero"] == []
    assert result["nonfinite"] == []
    assert result["max_rel_error"] <= result["tolerance"] == load_bench("smoke.py").GRAD_TOLERANCE["cpu"]
