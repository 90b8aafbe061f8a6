"""End-to-end runs of the `test` preset: single process, and world size 2 with gloo under torchrun."""

import inspect
import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

import train_gpt as T
import conftest
from conftest import preset_env, write_shards

REPO = Path(T.__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(cmd, env, timeout=300):
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_side_by_side(envs: dict[str, dict], timeout=300) -> dict[str, str]:
    """train_gpt.py once per env ({name: env}), all at once: single-threaded processes, so on 2 cores n runs take
    the wall time of ~n / 2 (starting one costs more than the few steps it trains). Returns {name: its stdout}."""
    runs = {}
    for name, env in envs.items():
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        runs[name] = (subprocess.Popen([sys.executable, "train_gpt.py"], env=env, cwd=REPO, stdout=out, stderr=err),
                      out, err)
    stdouts = {}
    for name, (process, out, err) in runs.items():
        returncode = process.wait(timeout=timeout)
        out.seek(0)
        err.seek(0)
        stdouts[name] = out.read()
        assert returncode == 0, f"{name}: {stdouts[name][-3000:]}{err.read()[-3000:]}"
    return stdouts


def world1_and_world2(root: Path, cases: dict[str, dict]) -> dict[str, tuple[dict, dict]]:
    """Every case of tests/dist_worker.py ({name: {"steps": n, "env": {...}}}) on fresh shards in root, at world 1
    (plain python) and at world 2 (torchrun, gloo): two launches for all the cases, side by side (starting a
    process costs more than a case's steps). Returns {name: (world-1 result, world-2 result)}."""
    env = preset_env(write_shards(root), root / "logs")
    launches = {}
    try:
        for world, command in ((1, [sys.executable]), (2, TORCHRUN)):
            (root / f"world{world}").mkdir()
            with open(root / f"world{world}.out", "w") as out:
                launches[world] = subprocess.Popen(
                    command + ["tests/dist_worker.py", str(root / f"world{world}"), json.dumps(cases)],
                    env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        for world, process in launches.items():
            assert process.wait(timeout=600) == 0, (root / f"world{world}.out").read_text()[-3000:]
    finally:  # after a failure: torchrun passes SIGTERM on to its ranks
        for process in launches.values():
            process.terminate()
    return {name: tuple(torch.load(root / f"world{world}" / f"{name}.pt") for world in (1, 2)) for name in cases}


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


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """test_test_preset_run_loss_falls_and_log_parses's run of each optimizer, side by side: {optimizer: (its
    stdout, its log folder)}."""
    root = tmp_path_factory.mktemp("e2e_runs")
    data = write_shards(root)
    envs = {optimizer: {**preset_env(data, root / optimizer), "OPTIMIZER": optimizer, "NUM_ITERATIONS": "24",
                        "VAL_EVERY": "12", "RUN_TAG": "e2e"} for optimizer in ("adamw", "normuon")}
    return {optimizer: (stdout, root / optimizer) for optimizer, stdout in run_side_by_side(envs).items()}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "normuon"])
def test_test_preset_run_loss_falls_and_log_parses(e2e_runs, optimizer):
    stdout, log_dir = e2e_runs[optimizer]
    logs = list(log_dir.glob("*_e2e_*.txt"))
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
    assert "step:24/24 val_loss:" in stdout


@pytest.fixture(scope="module")
def world_runs(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """test_world2_equals_world1's runs, both optimizers in one world-1 and one world-2 launch: 2 steps from the
    seeded init plus noise (dist_worker's perturb), so that every parameter has a gradient from the first step (from
    #48's init, with its zero lm_head, only lm_head moves in 2 steps) and the Adam groups step once, on two steps'
    gradients. Not more steps: the runs' own dynamics grow a last-bit difference ~10x a step (NorMuon's
    |w2 - w1| / |w1 - w0| measured 0, 2.8e-5, 3.0e-4, 2.0e-2 after 1-4 steps; #48's init: 2.1e-2 after 4 on an
    AVX-only EPYC, 3.3e-4 on an AVX-512 machine)."""
    cases = {optimizer: dict(steps=2, perturb=0.02, env=dict(OPTIMIZER=optimizer, BATCH_CHUNKS="4",
                                                              BATCH_SCHEDULE="256", ADAM_STEP_EVERY="2"))
             for optimizer in ("adamw", "normuon")}
    return world1_and_world2(tmp_path_factory.mktemp("world_runs"), cases)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "normuon"])
def test_world2_equals_world1(world_runs, optimizer):
    """The whole step at world 2 (gloo: 2 micro-batches per rank) against world 1 (4 micro-batches), with the Adam
    groups stepping every second step on two steps' gradients. The chunks are the same; only the order in which
    the 4 chunk gradients are summed differs ((c0 + c1) + (c2 + c3) against ((c0 + c1) + c2) + c3)."""
    one, two = world_runs[optimizer]
    flat = lambda params: torch.cat([p.flatten() for p in params.values()])
    start, w1, w2 = flat(one["start"]), flat(one["params"]), flat(two["params"])
    assert torch.equal(start, flat(two["start"]))
    # fp32 sums in another order differ in the last bits: measured 2.9e-6 (adamw), 2.8e-5 (normuon); the reduce
    # launched after the first micro-batch instead of the last: 0.58 (adamw, normuon)
    print(f"|w2 - w1| / |w1 - w0| = {((w2 - w1).norm() / (w1 - start).norm()).item():.2e}")
    assert (w2 - w1).norm() <= 1e-3 * (w1 - start).norm()
    for name in ("embed.weight", "value_embeds.0.weight", "lm_head", "scalars", "blocks.1.mlp.c_proj"):
        assert not torch.equal(one["params"][name], one["start"][name]), name  # every kind of parameter moved
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
    """Issue 19: a group that outlives close_distributed keeps gloo's workers running into interpreter shutdown,
    where a worker freeing a finished work's tensors needs the GIL and aborts the rank (SIGABRT, `terminate called
    without an active exception`) after a complete run."""
    script, out = tmp_path / "close_worker.py", str(tmp_path / "threads")
    script.write_text(CLOSE_WORKER.format(repo=str(REPO), out=out))
    run(TORCHRUN + [str(script)], run_env, timeout=120)
    assert [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)] == [[], []]


def test_every_process_group_is_joined_through_join_process_group():
    """The cause above, in a helper of the suite: tests/optim_worker.py joined its group itself, kept its gloo
    workers past close_distributed, and a rank aborted at exit on a loaded machine (Debian's Python 3.11.2).
    join_process_group imports torch._dynamo first; no other code may call init_process_group."""
    call = re.compile(r"^\s*(dist|torch\.distributed)\.init_process_group\(")
    callers = [f"{path.relative_to(REPO)}" for path in sorted(REPO.rglob("*.py")) if ".venv" not in path.parts
               for line in path.read_text().splitlines() if call.match(line)]
    assert callers == ["train_gpt.py"], callers
    assert any(call.match(line) for line in inspect.getsource(T.join_process_group).splitlines())


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
def test_compiled_run_has_no_recompile_after_warmup(compiled_run):
    """COMPILE=1 on CPU: the model compiles fullgraph, and warmup covers every shape and window the run uses (two
    batch phases, the extension's window, every validation's windows, the final one), so the log carries no
    recompile warning (flags: conftest.COMPILED_RUNS). The detector itself is checked by test_recompile_detector."""
    log = finished_log(compiled_run, "compiled")
    assert log["config"]["compile"] is True and log["final"]["status"] == "complete"
    assert not [line for line in log["lines"] if line.startswith("warning:")]
    assert [line.split()[0] for line in log["vals"]] == ["step:0/5", "step:2/5", "step:4/5", "step:5/5"]


def finished_log(background_run, tag: str) -> dict:
    """The parsed log of one of conftest's background runs, once it has ended with exit code 0."""
    returncode = background_run.process.wait(timeout=900)
    background_run.out.seek(0)
    assert returncode == 0, background_run.out.read()[-6000:]
    return parse_log(next(background_run.log_dir.glob(f"*_{tag}_*.txt")))


@pytest.mark.slow
def test_compiled_cpu_preset_run_loss_falls(compiled_cpu_run):
    """COMPILE=1 on the cpu preset's shapes once stopped at step 2 with a non-finite loss (Inductor's code for a
    masked softmax filled with -inf, on an AVX-512 CPU): now every train loss is finite and validation falls (flags:
    conftest.COMPILED_RUNS)."""
    log = finished_log(compiled_cpu_run, "compiled_cpu")
    assert log["config"]["compile"] is True and log["final"]["status"] == "complete"
    trains = [value(line, "train_loss") for line in log["trains"]]
    vals = [value(line, "val_loss") for line in log["vals"]]
    assert len(trains) == 8 and all(math.isfinite(loss) for loss in trains)
    assert len(vals) == 2 and vals[-1] < vals[0] - 0.1, vals  # measured 10.83 -> 10.62 in the 8 steps


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
@pytest.mark.parametrize("variant", [dict(ADAM_STEP_EVERY="2"), dict(OPTIMIZER="muonmax", MOMO="1"),
                                     dict(ADAM_STEP_EVERY="2", COMPILE="1", FP8="1")],
                         ids=["normuon", "muonmax-momo", "compiled-fp8"])
def test_training_step_has_no_host_sync_on_cuda(run_env, variant):
    """A whole step (packed chunks to the GPU, forward, backward, the optimizers, Momo's all-reduced model; and the
    compiled model with the FP8 head, as a speedrun runs it) runs under CUDA's sync debug mode set to error: any
    operation that waits for the device raises. The first steps are outside (lazy state and compile)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hp, launch = T.parse_env({**run_env, "COMPILE": "0", "FP8": "0", **variant}, cuda_available=True)
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


@pytest.mark.cuda
def test_compiled_test_preset_on_cuda_has_no_recompile_after_warmup(run_env):
    """The compiled model on CUDA (FlexAttention, FP8 head where the GPU has it): after warmup, every training step
    of the run and every validation window add no graph."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    flags = {k: v for k, v in conftest.COMPILED_RUNS["compiled_run"][1].items() if k != "RUN_TAG"}
    hp, launch = T.parse_env({**run_env, **flags}, cuda_available=True)
    device = torch.device("cuda", 0)
    state = T.setup(T.resolve_auto(hp, device), launch, device)
    T.warmup(state)
    graphs = T.compiled_graphs()
    losses = [T.train_step(state, step) for step in range(hp.num_iterations)]
    for windows in T.validation_windows(hp):
        state.model.windows = windows
        assert math.isfinite(T.evaluate(state))
    assert all(torch.isfinite(loss) for loss in losses)
    assert T.compiled_graphs() == graphs


# ---- the loop: train time across pauses, the last step's loss, a stop at a saved step ----

@pytest.fixture
def small_vocab_env(tmp_path: Path) -> dict[str, str]:
    """A test-preset run's env on shards of ids below 500 with BOS 500 and a 512-row vocabulary: a validation or a
    checkpoint of the 50,304-row default costs seconds on a loaded 2-core machine."""
    data = tmp_path / "small_vocab"
    data.mkdir()
    for name, count, seed in (("train_000000.bin", 20000, 1), ("train_000001.bin", 20000, 2),
                              ("val_000000.bin", 8000, 3)):
        tokens = conftest.synthetic_tokens(count, seed=seed, vocab=500)
        tokens[tokens == conftest.BOS] = 500
        conftest.write_test_shard(data / name, tokens)
    return {**preset_env(data, tmp_path / "logs"), "VOCAB_SIZE": "512", "BOS_ID": "500"}


def loop_state(env: dict, tmp_path: Path, **flags: str) -> tuple[T.TrainState, T.RunLog, T.Checkpointer]:
    """A test-preset state, its log, and a checkpointer that saves into tmp_path/checkpoints."""
    hp, launch = T.parse_env({**env, "SAVE_CHECKPOINT": "1", **flags}, False)
    device = torch.device("cpu")
    state = T.setup(T.resolve_auto(hp, device), launch, device)
    return state, T.RunLog(state.hp, launch, device), T.Checkpointer(state.hp, tmp_path / "checkpoints", 0)


def saves_counted(monkeypatch) -> list[int]:
    """The steps Checkpointer.save is called at, in order."""
    saved, real_save = [], T.Checkpointer.save

    def save(self, state, step, *args):
        saved.append(step)
        return real_save(self, state, step, *args)

    monkeypatch.setattr(T.Checkpointer, "save", save)
    return saved


def test_train_time_counts_only_the_steps_and_the_last_steps_loss_is_logged(small_vocab_env, tmp_path, monkeypatch):
    """A clock that moves only where the loop spends time: 1 s a training step, 100 s a validation, 1000 s a
    checkpoint. Validations (steps 0, 2, 4, 5) and checkpoints (2, 4, 5) are paused time: every train_time logged
    is 1000 ms per step done, the final line's too. TRAIN_LOG_EVERY=2 does not divide the 5 steps: the loss is read
    and logged at steps 2, 4 and at the last one, 5."""
    state, log, checkpointer = loop_state(small_vocab_env, tmp_path, NUM_ITERATIONS="5", VAL_EVERY="2",
                                          TRAIN_LOG_EVERY="2", CHECKPOINT_EVERY="2")
    now = [0.0]
    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    clock.perf_counter = lambda: now[0]
    monkeypatch.setattr(T, "time", clock)
    saved = saves_counted(monkeypatch)  # wrapped again below, to move the clock
    for name, seconds in (("train_step", 1.0), ("evaluate", 100.0)):
        def paced(*args, real=getattr(T, name), seconds=seconds):
            now[0] += seconds
            return real(*args)
        monkeypatch.setattr(T, name, paced)
    real_save = T.Checkpointer.save
    monkeypatch.setattr(T.Checkpointer, "save", lambda *args: (now.__setitem__(0, now[0] + 1000.0), real_save(*args)))
    assert T.train(state, log, checkpointer=checkpointer) == 0
    log.close()
    assert saved == [2, 4, 5]
    lines = log.path.read_text().splitlines()
    steps = [line for line in lines if line.startswith("step:")]
    times = {(int(line.split("/")[0].removeprefix("step:")), "val_loss" in line): value(line, "train_time")
             for line in steps}
    assert times == {**{(step, False): 1000.0 * step for step in range(1, 6)},
                     **{(step, True): 1000.0 * step for step in (0, 2, 4, 5)}}
    assert json.loads(lines[-1].removeprefix("final: "))["train_time_ms"] == 5000.0
    logged = [int(line.split("/")[0].removeprefix("step:")) for line in steps if " train_loss:" in line]
    assert logged == [2, 4, 5]
    assert all(math.isfinite(value(line, "train_loss")) for line in steps if " train_loss:" in line)


def test_a_stop_at_a_saved_step_saves_once_and_loses_nothing(small_vocab_env, tmp_path, monkeypatch):
    """SIGTERM during step 3 with CHECKPOINT_EVERY=2: the stop before step 4 saves step 4 once (the periodic save
    of that step does not come again) and ends there, exit 143. A run resumed from that checkpoint and stopped at
    once stops at step 4 without a second save over it (it holds nothing newer), the checkpoint left as it was."""
    state, log, checkpointer = loop_state(small_vocab_env, tmp_path, NUM_ITERATIONS="8", VAL_EVERY="0",
                                          CHECKPOINT_EVERY="2")
    saved = saves_counted(monkeypatch)
    stop = T.StopSignal()
    real_step = T.train_step

    def step(state, index):
        loss = real_step(state, index)
        if index == 3:
            stop.signum = signal.SIGTERM  # as the handler sets it
        return loss

    monkeypatch.setattr(T, "train_step", step)
    assert T.train(state, log, stop, checkpointer) == 128 + signal.SIGTERM
    log.close()
    assert saved == [2, 4]
    lines = log.path.read_text().splitlines()
    assert json.loads(lines[-1].removeprefix("stopped: "))["step"] == 4
    assert not any(line.startswith("checkpoint: none") for line in lines)
    checkpoint = tmp_path / "checkpoints" / "step_000004"
    written = {path.name: path.stat().st_mtime_ns for path in checkpoint.iterdir()}

    resumed, log, _ = loop_state(small_vocab_env, tmp_path, NUM_ITERATIONS="8", VAL_EVERY="0", CHECKPOINT_EVERY="2")
    resumed.start_step, resumed.start_train_ms, resumed.start_tokens = T.load_checkpoint(resumed, checkpoint)
    checkpointer = T.Checkpointer(resumed.hp, tmp_path / "checkpoints", resumed.start_step)
    stop = T.StopSignal()
    stop.signum = signal.SIGTERM  # before the first step of the resumed run
    assert T.train(resumed, log, stop, checkpointer) == 128 + signal.SIGTERM
    log.close()
    assert saved == [2, 4]  # no save at all, and no line saying that none could be saved
    lines = log.path.read_text().splitlines()
    assert json.loads(lines[-1].removeprefix("stopped: "))["step"] == 4
    assert not any(line.startswith("checkpoint: ") for line in lines)
    assert {path.name: path.stat().st_mtime_ns for path in checkpoint.iterdir()} == written
