"""bench/smoke.py's verdicts seen failing on a planted fault: a real recompile after the compiling cycle (counted by
torch.compile's graph counter, as the smoke counts it) and a non-finite compiled gradient; in process (the smoke
itself and its other parts are tested in test_bench.py)."""

import importlib.util
import sys
from pathlib import Path

import torch

import train_gpt as T


def load_smoke():
    """bench/smoke.py as a module (registered first: its dataclasses look their module up in sys.modules)."""
    spec = importlib.util.spec_from_file_location("bench_smoke_checks",
                                                  Path(T.__file__).resolve().parent / "bench" / "smoke.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


smoke = load_smoke()


def test_a_recompile_after_the_compiling_cycle_fails_the_check():
    """The smoke counts torch.compile's graphs after its compiling cycle and again after the timed work: a new
    shape planted after the cycle builds a graph, and the verdict is FAIL; the same shape again builds none: PASS."""
    compiled = torch.compile(lambda x: x * 3 + 1, backend="eager", dynamic=False)
    compiled(torch.ones(5))  # the compiling cycle
    before = T.compiled_graphs()
    compiled(torch.ones(5))
    assert smoke.recompile_verdict(before, T.compiled_graphs()) == "PASS"
    compiled(torch.ones(6))  # the planted recompile
    assert T.compiled_graphs() == before + 1
    assert smoke.recompile_verdict(before, T.compiled_graphs()) == "FAIL"


def tiny_model_and_chunk() -> tuple[T.GPT, torch.Tensor]:
    hp = T.parse_env({"PRESET": "test", "VOCAB_SIZE": "512", "BOS_ID": "500"}, False)[0]  # a small head: fast
    torch.manual_seed(0)
    model = T.GPT(T.model_config(hp))
    generator = torch.Generator().manual_seed(1)
    chunk = torch.randint(0, 500, (65,), generator=generator)
    chunk[[0, 30]] = hp.bos_id
    return model, chunk


def test_a_non_finite_compiled_gradient_fails_the_gradient_check():
    """A compiled backward that gives NaN (as Inductor once did on CPU) while eager is finite: every parameter is
    named non-finite and the check fails; the same model compiled as itself passes. The "compiled" forward is the
    perturbed eager model (the comparison is what is under test, not Inductor), or the model times NaN."""
    model, chunk = tiny_model_and_chunk()
    smoke.perturb(model)
    grads = smoke.compiled_gradient_error(model, chunk, False, compiled=model)
    assert grads["zero"] == grads["nonfinite"] == [] and grads["max_rel_error"] == 0
    assert smoke.gradient_verdict(grads, tolerance=1e-4)[0] == "PASS"
    grads = smoke.compiled_gradient_error(model, chunk, False, compiled=lambda *args: model(*args) * float("nan"))
    assert grads["zero"] == [] and len(grads["nonfinite"]) == grads["parameters"] > 0
    verdict, line = smoke.gradient_verdict(grads, tolerance=1e-4)
    assert verdict == "FAIL" and "non-finite: " + ", ".join(grads["nonfinite"]) in line
