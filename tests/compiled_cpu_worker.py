"""The suite's compiled run at the cpu preset's shapes, with the compiled-against-eager gradient check first.

Run as `python tests/compiled_cpu_worker.py GRADIENTS_JSON` with the run's env flags (conftest.COMPILED_RUNS):
one packed chunk of the cpu preset's shapes through the model eager and compiled as setup() compiles it (bench/
smoke.py's check), its result written to GRADIENTS_JSON; then `train_gpt.main()`, the run itself. Both in one
process because the check's graph is the training step's graph: the run takes it from Inductor's cache instead of
compiling it again (one compile of these shapes is about a minute of a 2-core machine's CPU).
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import train_gpt as T  # noqa: E402
from conftest import synthetic_tokens  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_smoke", REPO / "bench" / "smoke.py")
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)


def gradient_check() -> dict:
    """bench/smoke.py's compiled-gradient check on one chunk of the cpu preset (model dim 128, 1024-token chunks,
    GPT-2's vocab), the model perturbed so that every gradient is nonzero."""
    hp = T.parse_env({"PRESET": "cpu"}, cuda_available=False)[0]
    torch.manual_seed(0)
    model = smoke.perturb(T.GPT(T.model_config(hp), torch.float32))  # as setup() builds it
    model.set_training_window(hp.long_windows[0])  # the training run's first window: the graph it compiles first
    chunk = torch.from_numpy(synthetic_tokens(hp.batch_schedule[0] + 1, seed=5, vocab=T.BOS_ID).astype("int64"))
    result = smoke.compiled_gradient_error(model, chunk, fp8=False)
    return {**result, "model_parameters": len(list(model.parameters())), "tolerance": smoke.GRAD_TOLERANCE["cpu"]}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.with_suffix(".tmp").write_text(json.dumps(gradient_check()))
    os.replace(out.with_suffix(".tmp"), out)  # the test polls for the file: it appears whole
    sys.exit(T.main([]))
