"""Every bench script runs (--quick: tiny shapes, synthetic data) and prints its table; no timing is asserted."""

import importlib.util
import json
import math
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


SMOKE_CHECKS = ("step", "gradients", "phase-128-w2", "phase-256-w6", "run-average", "validation")


def quick_smoke(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PRESET")}
    env["OMP_NUM_THREADS"] = "1"  # the JSON's device name is then "cpu, 1 thread(s)"
    return subprocess.Popen([sys.executable, str(BENCH / "smoke.py"), "--quick", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def smoke_json(folder: Path) -> dict:
    files = sorted(folder.glob("smoke_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.mark.slow
def test_smoke_quick_passes_every_check_of_the_cpu_twin(tmp_path, compiled_run):
    """The smoke's CPU twin: the test preset compiled, every check. It runs last (conftest.AFTER_BACKGROUND_RUNS),
    once conftest's background compiled run of the same model has ended, so that its graphs come from Inductor's
    cache instead of a second cold compile of the same shapes."""
    compiled_run.process.wait(timeout=900)  # its result is test_train's to check; here only its graphs matter
    out = run_quick("smoke.py", "--out", str(tmp_path))
    for check in SMOKE_CHECKS:
        assert f"check {check}: PASS" in out, out
    assert "check cuda-tests: SKIP" in out
    report = smoke_json(tmp_path)
    checks = report["checks"]
    assert report["preset"] == "test" and checks["gradients"]["nonfinite"] == checks["gradients"]["zero"] == []
    assert checks["gradients"]["max_rel_error"] <= checks["gradients"]["tolerance"]
    assert checks["step"]["graphs_after_compile"] == checks["step"]["graphs_after"] > 0
    assert (checks["step"]["batch_tokens"], checks["step"]["window"]) == (256, 4)  # the most tokens of the run
    assert checks["step"]["seconds"] > 0 and all(checks[name]["seconds"] >= 0 for name in SMOKE_CHECKS)
    # the run's 5 steps: 2 at (128, 2), 2 at (256, 4), the extension step at (256, 6)
    assert checks["run-average"]["steps_by_phase"] == {"phase-128-w2": 2, "phase-256-w4": 2, "phase-256-w6": 1}
    rows = [checks[name] for name in ("phase-128-w2", "phase-128-w2", "step", "step", "phase-256-w6")]
    assert checks["run-average"]["step_ms"] == pytest.approx(sum(r["train_step"] for r in rows) / 5, abs=0.01)
    assert checks["validation"]["sequences"] == 8 and math.isfinite(checks["validation"]["val_loss"])


@pytest.mark.slow
def test_smoke_budget_starts_only_what_fits(tmp_path, compiled_run):
    """--budget: a check starts only when the seconds it took in this device's last smoke (here a planted earlier
    JSON) fit what is left; the rest print `SKIP (budget)` and the run exits 0 with a JSON of what ran."""
    compiled_run.process.wait(timeout=900)
    earlier = {"device": "cpu, 1 thread(s)", "quick": True,
               "checks": {"step": {"verdict": "PASS", "seconds": 1.0},
                          **{name: {"verdict": "PASS", "seconds": 1e6} for name in SMOKE_CHECKS[1:]}}}
    (tmp_path / "smoke_20000101_000000.json").write_text(json.dumps(earlier))
    process = quick_smoke("--budget", "600", "--out", str(tmp_path))
    out = process.communicate(timeout=600)[0]
    assert process.returncode == 0, out[-3000:]
    assert "check step: PASS" in out
    for name in SMOKE_CHECKS[1:]:
        assert f"check {name}: SKIP (budget)" in out, out
    (earlier_file,) = [p for p in tmp_path.glob("smoke_2000*.json")]
    earlier_file.unlink()
    checks = smoke_json(tmp_path)["checks"]
    assert checks["step"]["verdict"] == "PASS" and checks["gradients"]["expected_s"] == 1e6
    assert {name for name, c in checks.items() if c["verdict"] == "SKIP"} == set(SMOKE_CHECKS[1:]) | {"cuda-tests"}


@pytest.mark.slow
def test_smoke_killed_between_checks_leaves_the_finished_ones(tmp_path, compiled_run):
    """The JSON is rewritten after every check, before its line is printed: a smoke killed (SIGKILL: nothing runs
    at exit) right after its first check line leaves a valid JSON holding every check it printed."""
    compiled_run.process.wait(timeout=900)
    process = quick_smoke("--out", str(tmp_path))
    printed = []
    for line in process.stdout:
        if line.startswith("check "):
            printed.append(line.split(":")[0].removeprefix("check "))
            process.kill()
            break
    process.communicate(timeout=60)
    assert printed == ["step"]
    checks = smoke_json(tmp_path)["checks"]
    assert checks["step"]["verdict"] == "PASS" and checks["step"]["train_step"] > 0
    assert set(checks) <= {"step", "gradients"}  # at most the next check, if it ended before the kill landed


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


# ---- smoke.py's parts: the attention count, #48's one-GPU reference, the budget, the verdicts ----


def brute_force_pairs(tokens: list[int], bos: int, window: int) -> int:
    """Query-key pairs by the mask's definition, one pair at a time: k <= q, q - k <= window, one document."""
    docs, doc = [], 0
    for token in tokens:
        doc += token == bos
        docs.append(doc)
    return sum(1 for q in range(len(tokens)) for k in range(q + 1) if q - k <= window and docs[q] == docs[k])


@pytest.mark.parametrize("window", [0, 3, 7, 100])
def test_smoke_attended_pairs_equal_a_brute_force_count(window):
    smoke = load_bench("smoke.py")
    # tokens before the first BOS (a chunk may start mid-document), documents of 1, 9 and 14 tokens, two BOS in a row
    tokens = [5, 6, 7, 9, 9, 9, 99, 1, 2, 3, 4, 5, 6, 7, 8, 99, 99] + [3] * 13 + [99] + list(range(10))
    assert smoke.attended_pairs(torch.tensor(tokens), 99, window) == brute_force_pairs(tokens, 99, window)


def test_smoke_attention_flops_count_each_layer_at_its_window():
    """12 d_attn FLOPs a pair, each attention layer at its own window: layer 0 has none (the test preset's plan),
    the long-window layers at long * block tokens, the others at half of it (short = long // 2)."""
    smoke = load_bench("smoke.py")
    hp = T.parse_env({"PRESET": "test"}, False)[0]  # 4 layers, d_attn 32, blocks of 16 tokens
    plan = T.layer_plan(hp.num_layers, hp.num_value_embeds)
    tokens = torch.tensor([T.BOS_ID] + [1] * 60 + [T.BOS_ID] + [2] * 30)
    by_hand = 0
    for layer in range(hp.num_layers):
        if plan.attn[layer]:
            window = (4 if plan.long_window[layer] else 2) * 16  # long window 4 blocks, short 2
            by_hand += brute_force_pairs(tokens[:-1].tolist(), T.BOS_ID, window)
    chunk = torch.cat([tokens, tokens])  # two chunks: the count adds up over them
    assert smoke.attention_flops([tokens, chunk], hp, 4) == pytest.approx(
        12 * 32 * (by_hand + sum(brute_force_pairs(chunk[:-1].tolist(), T.BOS_ID, (4 if plan.long_window[i] else 2)
                                                   * 16) for i in range(hp.num_layers) if plan.attn[i])))


def test_smoke_one_gpu_reference_is_a_line_through_record_48s_phases():
    """The reference: a least-squares line through #48's three (tokens a GPU, ms a step) points, its fixed part paid
    once a step and its token part for the whole global batch, weighted by the run's steps (numpy's fit as the
    independent reference)."""
    import numpy as np
    smoke = load_bench("smoke.py")
    batches = sorted(smoke.RECORD_48_MS_PER_STEP)
    slope, intercept = np.polyfit([b / 8 for b in batches], [smoke.RECORD_48_MS_PER_STEP[b] for b in batches], 1)
    weights = {131072: 707, 262144: 707, 393216: 746}
    got = smoke.one_gpu_reference(weights)
    assert got["fixed_ms"] == pytest.approx(intercept, abs=0.01)
    assert got["us_per_token"] == pytest.approx(1000 * slope, abs=1e-4)
    want = sum((intercept + slope * b) * n for b, n in weights.items()) / sum(weights.values())
    assert got["run_ms"] == pytest.approx(want, abs=0.1)
    eight_times = sum(8 * smoke.RECORD_48_MS_PER_STEP[b] * n for b, n in weights.items()) / sum(weights.values())
    assert got["run_ms"] < eight_times - 7 * intercept + 1  # the fixed part is not multiplied by 8


def test_smoke_budget_and_the_expected_seconds_of_earlier_smokes(tmp_path):
    smoke = load_bench("smoke.py")
    now = [100.0]
    budget = smoke.Budget(30, clock=lambda: now[0])
    now[0] += 25
    assert budget.left() == 5 and budget.fits(5) and not budget.fits(5.1)
    assert smoke.Budget(None).fits(1e12)
    mine = {"device": "gpu", "quick": False}
    for name, report in (("smoke_20260101_000000.json", {**mine, "checks": {"step": {"seconds": 50}}}),
                         ("smoke_20260102_000000.json", {**mine, "checks": {"step": {"seconds": 20},
                                                                             "gradients": {"verdict": "SKIP"}},
                                                          "cuda_test_seconds": {"tests/t.py::a": 3}}),
                         ("smoke_20260103_000000.json", {**mine, "quick": True, "checks": {"step": {"seconds": 1}}}),
                         ("smoke_20260104_000000.json", {"device": "other", "quick": False,
                                                         "checks": {"step": {"seconds": 2}}})):
        (tmp_path / name).write_text(json.dumps(report))
    (tmp_path / "smoke_20260105_000000.json").write_text('{"device": "gpu", "qu')  # killed mid-write by hand
    reports = smoke.earlier_reports(tmp_path, "gpu", quick=False)
    assert len(reports) == 2
    assert smoke.expected_seconds(reports) == {"step": 20.0, "cuda-test tests/t.py::a": 3.0}


def test_smoke_verdicts_fail_where_they_should():
    """A recompile after the compiling cycle fails the step; a non-finite, an all-zero or a too different gradient
    fails the gradient check; the cache state reads Inductor's hit and miss counts."""
    smoke = load_bench("smoke.py")
    assert smoke.recompile_verdict(12, 12) == "PASS" and smoke.recompile_verdict(12, 13) == "FAIL"
    good = {"max_rel_error": 1e-3, "worst": "w", "parameters": 3, "nonfinite": [], "zero": []}
    assert smoke.gradient_verdict(good, 1e-2)[0] == "PASS"
    for bad in ({"nonfinite": ["w"]}, {"zero": ["lm_head"]}, {"max_rel_error": 2e-2}):
        verdict, line = smoke.gradient_verdict({**good, **bad}, 1e-2)
        assert verdict == "FAIL", bad
    assert "all zero: lm_head" in smoke.gradient_verdict({**good, "zero": ["lm_head"]}, 1e-2)[1]
    assert [smoke.compile_cache_state(h, m) for h, m in ((3, 0), (0, 3), (2, 1), (0, 0))] == [
        "warm", "cold", "mixed", "none"]


def test_smoke_gradient_check_sees_a_zero_gradient():
    """compiled_gradient_error names a parameter whose gradient is all zero (a fresh model's: #48's zero head)."""
    smoke = load_bench("smoke.py")
    hp = T.parse_env({"PRESET": "test"}, False)[0]
    torch.manual_seed(0)
    model = T.GPT(T.model_config(hp))  # not perturbed: the head is zero, so every gradient but the head's is zero
    chunk = torch.randint(0, 50257, (65,))
    grads = smoke.compiled_gradient_error(model, chunk, False, compiled=model)  # "compiled" = eager: equal grads
    assert grads["max_rel_error"] == 0 and "lm_head" not in grads["zero"] and "embed.weight" in grads["zero"]
    assert smoke.gradient_verdict(grads, 1e-4)[0] == "FAIL"


def test_smoke_cuda_tests_run_in_process_within_the_budget(tmp_path):
    """The cuda tests run through pytest.main in the smoke's own process, behind a plugin that starts a test only
    while the budget has room; without pytest the check is a SKIP that says so. On the CPU every cuda test skips for
    want of a GPU; with no room every one is skipped for the budget."""
    script = f"""
import json, sys
sys.path.insert(0, {str(BENCH)!r})
import importlib.util
spec = importlib.util.spec_from_file_location("smoke", {str(BENCH / 'smoke.py')!r})
smoke = importlib.util.module_from_spec(spec); spec.loader.exec_module(smoke)
import torch
stub = type("Stub", (), {{"device": torch.device("cpu")}})()
results = {{}}
for case, budget, expected in (("room", None, {{}}), ("no room", 100, "all")):
    report = smoke.Report(smoke.Path({str(tmp_path)!r}) / (case.replace(" ", "_") + ".json"), {{}})
    if expected == "all":
        expected = {{"cuda-test " + k: 1e6 for k in results["room"]["outcomes"]}}
    smoke.check_cuda_tests(stub, report, smoke.Budget(budget), expected)
    results[case] = report.checks["cuda-tests"]
sys.modules["pytest"] = None  # an interpreter without pytest
report = smoke.Report(smoke.Path({str(tmp_path)!r}) / "none.json", {{}})
smoke.check_cuda_tests(stub, report, smoke.Budget(None), {{}})
results["no pytest"] = report.checks["cuda-tests"]
print("RESULT " + json.dumps(results))
"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(result.stdout.split("RESULT ", 1)[1])
    room, no_room = results["room"], results["no room"]
    assert room["verdict"] == "SKIP" and room["skipped"] == len(room["outcomes"]) >= 7 and room["passed"] == 0
    assert no_room["skipped_(budget)"] == len(no_room["outcomes"]) == len(room["outcomes"])
    assert no_room["verdict"] == "SKIP" and set(no_room["outcomes"].values()) == {"skipped (budget)"}
    assert results["no pytest"]["verdict"] == "SKIP" and "pytest is not installed" in results["no pytest"]["line"]


def test_smoke_budget_refusals_and_nothing_started_when_the_first_check_does_not_fit(tmp_path):
    """--budget 0 is refused in one line; when the step check (which builds the model) does not fit, every check
    after it says why it did not run, and the run exits 0 with a JSON of SKIPs."""
    bad = quick_smoke("--budget", "0", "--out", str(tmp_path))
    out = bad.communicate(timeout=120)[0]
    assert bad.returncode == 2 and "--budget 0: expected a number of seconds > 0" in out
    earlier = {"device": "cpu, 1 thread(s)", "quick": True, "checks": {"step": {"verdict": "PASS", "seconds": 1e6}}}
    (tmp_path / "smoke_20000101_000000.json").write_text(json.dumps(earlier))
    process = quick_smoke("--budget", "60", "--out", str(tmp_path))
    out = process.communicate(timeout=120)[0]
    assert process.returncode == 0, out[-3000:]
    assert "check step: SKIP (budget): expected 1000000 s" in out
    for name in SMOKE_CHECKS[1:]:
        assert f"check {name}: SKIP (the step check, which builds the model, did not run)" in out, out
    (tmp_path / "smoke_20000101_000000.json").unlink()
    assert {c["verdict"] for c in smoke_json(tmp_path)["checks"].values()} == {"SKIP"}
