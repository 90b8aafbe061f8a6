"""End-to-end runs of the `test` preset: single process, and world size 2 with gloo under torchrun."""

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


def run(cmd, env, timeout=300):
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def parse_log(path: Path) -> dict:
    source, _, rest = path.read_text().partition("\n" + "=" * 100 + "\n")
    lines = rest.splitlines()
    config = json.loads(lines[0].removeprefix("config: "))
    vals = [line for line in lines if " val_loss:" in line]
    trains = [line for line in lines if " train_loss:" in line]
    final = json.loads(lines[-1].removeprefix("final: "))
    return dict(source=source, config=config, vals=vals, trains=trains, final=final, lines=lines)


def value(line: str, key: str) -> float:
    return float(line.split(f"{key}:")[1].split()[0].removesuffix("ms"))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "normuon"])
def test_test_preset_run_loss_falls_and_log_parses(run_env, tmp_path, optimizer):
    env = {**run_env, "OPTIMIZER": optimizer, "NUM_ITERATIONS": "24", "VAL_EVERY": "12", "RUN_TAG": "e2e"}
    out = run([sys.executable, "train_gpt.py"], env)
    logs = list((tmp_path / "logs").glob("*_e2e_*.txt"))
    assert len(logs) == 1
    log = parse_log(logs[0])
    assert log["source"] == (REPO / "train_gpt.py").read_text()
    assert log["config"]["optimizer"] == optimizer and log["config"]["world_size"] == 1
    assert {"device", "torch_version", "git_commit", "num_iterations"} <= set(log["config"])
    assert [line.split()[0] for line in log["vals"]] == ["step:0/24", "step:12/24", "step:24/24"]
    first, last = value(log["vals"][0], "val_loss"), value(log["vals"][-1], "val_loss")
    assert abs(first - math.log(50304)) < 1e-4
    assert last < first - 1.0
    assert len(log["trains"]) == 24
    assert log["lines"][-2].startswith("peak memory allocated: ") and log["lines"][-2].endswith(" MiB")
    assert log["final"]["status"] == "complete" and log["final"]["step"] == 24
    assert abs(log["final"]["val_loss"] - last) < 1e-4
    assert "step:24/24 val_loss:" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "normuon"])
def test_world2_equals_world1(run_env, tmp_path, optimizer):
    """The whole step at world 2 (gloo: 2 micro-batches per rank) against world 1 (4 micro-batches), with the Adam
    groups stepping every second step on two steps' gradients. The chunks are the same; only the order in which
    the 4 chunk gradients are summed differs ((c0 + c1) + (c2 + c3) against ((c0 + c1) + c2) + c3)."""
    env = {**run_env, "OPTIMIZER": optimizer, "BATCH_CHUNKS": "4", "BATCH_SCHEDULE": "256", "ADAM_STEP_EVERY": "2"}
    run([sys.executable, "tests/dist_worker.py", str(tmp_path / "w1.pt"), "4"], env)
    run(TORCHRUN + ["tests/dist_worker.py", str(tmp_path / "w2.pt"), "4"], env)
    one, two = torch.load(tmp_path / "w1.pt"), torch.load(tmp_path / "w2.pt")
    torch.manual_seed(0)  # setup() seeds with SEED (0) before it builds the model: the same initial weights
    fresh = T.GPT(T.parse_env({"PRESET": "test"}, False)[0])
    start = torch.cat([p.flatten() for p in fresh.state_dict().values()])
    w1 = torch.cat([p.flatten() for p in one["params"].values()])
    w2 = torch.cat([p.flatten() for p in two["params"].values()])
    # fp32 sums in another order differ in the last bits; Adam turns that into a sign flip where a gradient is
    # ~0, and bf16 Polar Express of the near-zero gradients of zero-initialized matrices into larger differences.
    # Measured |w2 - w1| / |w1 - w0|: 6.6e-5 (adamw), 3.3e-4 (normuon); a gradient reduced after the wrong
    # micro-batch is off by O(1)
    print(f"|w2 - w1| / |w1 - w0| = {((w2 - w1).norm() / (w1 - start).norm()).item():.2e}")
    assert (w2 - w1).norm() <= 1e-3 * (w1 - start).norm()
    assert one["params"]["embed.weight"].sub(fresh.embed.weight).abs().max() > 0  # training moved the params
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) < 1e-5


@pytest.mark.slow
def test_world2_run_writes_one_log_by_rank0(run_env, tmp_path):
    env = {**run_env, "OPTIMIZER": "adamw", "NUM_ITERATIONS": "4", "RUN_TAG": "w2"}
    run(TORCHRUN + ["train_gpt.py"], env)
    logs = list((tmp_path / "logs").iterdir())
    assert len(logs) == 1
    log = parse_log(logs[0])
    assert log["config"]["world_size"] == 2
    assert len([line for line in log["lines"] if line.startswith("step:4/4 val_loss:")]) == 1
    assert log["final"]["status"] == "complete"


CLOSE_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    sys.path.insert(0, {repo!r})
    import train_gpt as T
    launch = T.parse_env(os.environ, cuda_available=False)[1]
    T.init_distributed(launch)
    T.all_reduce_sum(torch.ones(2))  # gloo starts its worker threads
    torch.optim.SGD([torch.nn.Parameter(torch.ones(1))])  # the first optimizer imports torch._dynamo, as setup() does
    T.close_distributed()
    threads = [open(f"/proc/self/task/{{task}}/comm").read().strip() for task in os.listdir("/proc/self/task")]
    with open({out!r} + f".{{launch.rank}}", "w") as f:
        json.dump([name for name in threads if "gloo" in name], f)
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_close_distributed_ends_the_gloo_threads(run_env, tmp_path):
    """A group that outlives close_distributed keeps gloo's workers running into interpreter shutdown,
    where a worker freeing a finished work's tensors needs the GIL and aborts the rank (SIGABRT, `terminate called
    without an active exception`) after a complete run."""
    script, out = tmp_path / "close_worker.py", str(tmp_path / "threads")
    script.write_text(CLOSE_WORKER.format(repo=str(REPO), out=out))
    run(TORCHRUN + [str(script)], run_env, timeout=120)
    assert [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)] == [[], []]


def test_nonfinite_loss_stops_with_step_and_last_finite_loss(run_env, tmp_path, monkeypatch):
    hp, launch = T.parse_env({**run_env, "OPTIMIZER": "adamw", "NUM_ITERATIONS": "6", "RUN_TAG": "nan"}, False)
    device = torch.device("cpu")
    state = T.setup(T.resolve_auto(hp, device), launch, device)
    real_step = T.train_step
    monkeypatch.setattr(T, "train_step",
                        lambda s, step: torch.tensor(float("nan")) if step == 2 else real_step(s, step))
    log = T.RunLog(state.hp, launch, device)
    assert T.train(state, log) == 1
    log.close()
    lines = log.path.read_text().splitlines()
    stopped = json.loads(lines[-1].removeprefix("stopped: "))
    assert stopped["reason"] == "non-finite train_loss" and stopped["step"] == 3
    last_train = [line for line in lines if "train_loss:" in line][-1]
    assert last_train.startswith("step:2/6")
    assert abs(value(last_train, "train_loss") - stopped["last_finite_loss"]) < 1e-4
    assert not any(line.startswith("final:") for line in lines)


@pytest.mark.parametrize("optimizer", ["adamw", "normuon"])
def test_warmup_restores_every_state(run_env, optimizer):
    """After warmup (a step of every schedule phase, then restore), training is exactly as without it."""
    env = {**run_env, "OPTIMIZER": optimizer, "NUM_ITERATIONS": "6", "BATCH_SCHEDULE": "64,128",
           "LONG_WINDOWS": "1,2", "EXTENSION_ITERATIONS": "2", "ADAM_STEP_EVERY": "2"}
    device = torch.device("cpu")

    def losses(with_warmup: bool) -> list[float]:
        hp, launch = T.parse_env(env, False)
        state = T.setup(T.resolve_auto(hp, device), launch, device)
        if with_warmup:
            T.warmup(state)
        return [T.read_train_loss(T.train_step(state, step)) for step in range(4)] + [T.evaluate(state)]

    assert losses(True) == losses(False)


@pytest.mark.slow
def test_compiled_run_has_no_recompile_after_warmup(run_env, tmp_path):
    """COMPILE=1 on CPU: the model compiles fullgraph, and warmup covers every shape and window the run uses (two
    batch phases, the extension's window, every validation's windows, the final one), so the log carries no
    recompile warning. The detector itself is checked by the next test."""
    env = {**run_env, "COMPILE": "1", "WARMUP": "1", "NUM_ITERATIONS": "5", "EXTENSION_ITERATIONS": "1",
           "BATCH_SCHEDULE": "128,256", "LONG_WINDOWS": "2,4", "EXTENSION_WINDOW": "6", "FINAL_WINDOW": "8",
           "VAL_EVERY": "2", "ADAM_STEP_EVERY": "2", "RUN_TAG": "compiled"}
    run([sys.executable, "train_gpt.py"], env, timeout=600)
    log = parse_log(next((tmp_path / "logs").glob("*_compiled_*.txt")))
    assert log["config"]["compile"] is True and log["final"]["status"] == "complete"
    assert not [line for line in log["lines"] if line.startswith("warning:")]
    assert [line.split()[0] for line in log["vals"]] == ["step:0/5", "step:2/5", "step:4/5", "step:5/5"]


def test_recompile_detector_counts_new_graphs():
    before = T.compiled_graphs()
    compiled = torch.compile(lambda x: x * 3 + 1, backend="eager", dynamic=False)
    compiled(torch.ones(3))
    assert T.compiled_graphs() == before + 1
    compiled(torch.ones(3))
    assert T.compiled_graphs() == before + 1  # same shape: no new graph
    compiled(torch.ones(4))
    assert T.compiled_graphs() == before + 2


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [dict(ADAM_STEP_EVERY="2"), dict(OPTIMIZER="muonmax", MOMO="1")],
                         ids=["normuon", "muonmax-momo"])
def test_training_step_has_no_host_sync_on_cuda(run_env, variant):
    """A whole step (packed chunks to the GPU, forward, backward, the optimizers, Momo's all-reduced model) runs
    under CUDA's sync debug mode set to error: any operation that waits for the device raises. The first steps are
    outside (lazy state and compile)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hp, launch = T.parse_env({**run_env, **variant, "COMPILE": "0", "FP8": "0"}, cuda_available=True)
    device = torch.device("cuda", 0)
    state = T.setup(T.resolve_auto(hp, device), launch, device)
    T.train_step(state, 0)
    T.train_step(state, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [T.train_step(state, step) for step in (2, 3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)
