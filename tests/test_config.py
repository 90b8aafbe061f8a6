"""Hyperparameters: presets, typed env overrides and their errors."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as T

REPO = Path(T.__file__).resolve().parent


def parse(env, cuda=False):
    return T.parse_env(env, cuda_available=cuda)


def torchrun_env(world: int, rank: int = 0) -> dict:
    """What torchrun sets for one rank of a world (the launch vars the trainer reads)."""
    return {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank % 8), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}


def test_presets_default_by_hardware():
    assert parse({}, cuda=True)[0].preset == "speedrun"
    assert parse({}, cuda=False)[0].preset == "cpu"
    hp, launch = parse({"PRESET": "test"})
    assert (hp.num_layers, hp.model_dim) == (4, 32)
    assert launch == T.Launch(0, 0, 1)


def test_speedrun_preset_is_record_48():
    hp, _ = parse({"PRESET": "speedrun"}, cuda=True)
    assert (hp.num_layers, hp.num_heads, hp.head_dim, hp.model_dim, hp.vocab_size) == (12, 6, 128, 768, 50304)
    assert hp.batch_schedule == (131072, 262144, 393216)
    assert (hp.num_iterations, hp.extension_iterations, hp.scheduled_iterations) == (2160, 40, 2120)
    assert (hp.muon_lr, hp.adam_lr, hp.adam_beta1, hp.embed_lr_mul, hp.scalar_lr_mul) == (0.023, 0.008, 0.65, 75, 5)
    assert hp.fp8 is None and hp.compile is None  # auto


def test_typed_overrides():
    hp, _ = parse({"PRESET": "test", "NUM_ITERATIONS": "50", "ADAM_LR": "0.01", "CWD": "off", "FP8": "0",
                   "BATCH_SCHEDULE": "128, 256", "NORM": "rmsnorm", "RUN_TAG": "abl"})
    assert hp.num_iterations == 50 and isinstance(hp.num_iterations, int)
    assert hp.adam_lr == 0.01
    assert hp.cwd is False and hp.fp8 is False  # FLAG=0 means off, never truthy strings
    assert hp.batch_schedule == (128, 256)
    assert hp.run_tag == "abl"


@pytest.mark.parametrize("var, value, words", [
    ("NORM", "drf", "NORM=drf: expected one of rmsnorm, dyt, derf, derf_ema"),
    ("NUM_ITERATIONS", "-1", "NUM_ITERATIONS=-1: expected a number > 0"),
    ("NUM_ITERATIONS", "ten", "NUM_ITERATIONS=ten: expected an integer"),
    ("FP8", "maybe", "FP8=maybe: expected one of 1, true, yes, on, 0, false, no, off, auto"),
    ("CWD", "2", "CWD=2: expected one of 1, true, yes, on, 0, false, no, off"),
    ("OPTIMIZER", "sgd", "OPTIMIZER=sgd: expected one of"),
    ("NORM_EMA", "1.0", "NORM_EMA=1.0: expected a number in [0, 1)"),
    ("ADAM_LR", "nan", "ADAM_LR=nan: expected a finite number"),
    ("PRESET", "fast", "PRESET=fast: expected one of speedrun, cpu, ablation, research, test"),
])
def test_bad_values_name_variable_value_and_allowed(var, value, words):
    with pytest.raises(T.ConfigError) as error:
        parse({"PRESET": "test", var: value})
    assert words in str(error.value)


@pytest.mark.parametrize("world, accum", [(1, 8), (2, 4), (4, 2), (8, 1), (16, 1)])
def test_speedrun_batch_geometry_is_record_48s(world, accum):
    """#48: one packed chunk of global batch / 8 tokens per forward, 8 / world forwards per rank; above 8 ranks
    one forward of global batch / world."""
    hp, launch = parse({"PRESET": "speedrun", **torchrun_env(world)}, cuda=True)
    geometry = T.batch_geometry(hp, launch.world_size)
    assert geometry.accum_steps == accum and geometry.chunks == max(8, world)
    chunk = [geometry.chunk_tokens(b) for b in hp.batch_schedule]
    assert chunk == ([16384, 32768, 49152] if world <= 8 else [131072 // world, 262144 // world, 393216 // world])
    assert geometry.chunk_tokens(hp.val_batch_tokens) == 2097152 // max(8, world)
    assert hp.val_tokens // hp.val_batch_tokens == 5 and hp.max_seq_len == 2048


@pytest.mark.parametrize("world, words", [
    (3, "world size 3 does not divide BATCH_CHUNKS=8"),
    (6, "world size 6 does not divide BATCH_CHUNKS=8"),
    (24, "131072 tokens do not split into 24 chunks"),
])
def test_world_size_that_divides_neither_way_is_an_error(world, words):
    with pytest.raises(T.ConfigError, match=words):
        parse({"PRESET": "speedrun", **torchrun_env(world)}, cuda=True)


def test_val_tokens_must_be_whole_validation_steps():
    with pytest.raises(T.ConfigError, match="VAL_TOKENS=1000: expected a multiple of VAL_BATCH_TOKENS=256"):
        parse({"PRESET": "test", "VAL_TOKENS": "1000"})


def test_heads_times_head_dim_must_equal_model_dim():
    with pytest.raises(T.ConfigError, match="NUM_HEADS=2 \\* HEAD_DIM=32 != MODEL_DIM=32"):
        parse({"PRESET": "test", "NUM_HEADS": "2"})


def test_bad_env_stops_before_any_work(tmp_path):
    env = {"PRESET": "test", "NORM": "drf", "LOG_DIR": str(tmp_path / "logs"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(T.Path(T.__file__))], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: NORM=drf: expected one of rmsnorm, dyt, derf, derf_ema"]
    assert not (tmp_path / "logs").exists()


def test_help_lists_every_flag():
    text = T.help_text()
    for f in T.dataclasses.fields(T.Hyperparameters):
        assert f.name.upper() in text


# ---- names: misspelled, other-case and renamed flags; the machine's own variables ----

@pytest.mark.parametrize("env, words", [
    ({"NROM": "derf"}, "NROM=derf: not a flag; did you mean NORM?"),
    ({"norm": "derf"}, "norm=derf: flags are upper case; did you mean NORM?"),
    ({"Num_Iterations": "5"}, "did you mean NUM_ITERATIONS?"),
    ({"NUM_ITERATION": "5"}, "NUM_ITERATION=5: not a flag; did you mean NUM_ITERATIONS?"),
    ({"VAL_EVRY": "5"}, "did you mean VAL_EVERY?"),
    ({"SEQ_LEN": "64"}, "SEQ_LEN=64: renamed MAX_SEQ_LEN"),
    ({"MICRO_BATCH_ROWS": "2"}, "renamed BATCH_CHUNKS"),
    ({"resume": "x"}, "resume=x: flags are upper case; did you mean RESUME?"),
    ({"CHECKPOINT_EVRY": "5"}, "CHECKPOINT_EVRY=5: not a flag; did you mean CHECKPOINT_EVERY?"),
])
def test_flag_names_that_are_not_flags_stop_the_run(env, words):
    with pytest.raises(T.ConfigError) as error:
        parse({"PRESET": "test", **env})
    assert words in str(error.value)


def test_every_name_problem_in_one_line():
    with pytest.raises(T.ConfigError) as error:
        parse({"PRESET": "test", "SEQ_LEN": "8", "NROM": "derf"})
    assert "SEQ_LEN=8: renamed MAX_SEQ_LEN" in str(error.value) and "NROM=derf: not a flag" in str(error.value)
    assert "\n" not in str(error.value)


def test_ablation_preset_is_the_cpu_preset_with_a_bigger_validation():
    cpu, _ = parse({"PRESET": "cpu"})
    ablation, _ = parse({"PRESET": "ablation"})
    differ = {f.name for f in T.dataclasses.fields(cpu) if getattr(cpu, f.name) != getattr(ablation, f.name)}
    assert differ == {"preset", "num_iterations", "val_every", "val_tokens", "diag_every"}
    assert ablation.val_tokens == 65536 and ablation.val_every == 0 and ablation.num_iterations == 100


def test_checkpoint_and_timeout_flags_parse():
    hp, _ = parse({"PRESET": "test", "SAVE_CHECKPOINT": "1", "CHECKPOINT_EVERY": "4", "CHECKPOINT_DIR": "ck",
                   "CHECKPOINT_KEEP": "2", "RESUME": "ck/step_000004", "DIST_TIMEOUT": "60"})
    assert (hp.save_checkpoint, hp.checkpoint_every, hp.checkpoint_dir, hp.checkpoint_keep, hp.resume,
            hp.dist_timeout) == (True, 4, "ck", 2, "ck/step_000004", 60.0)
    with pytest.raises(T.ConfigError, match="DIST_TIMEOUT=0"):
        parse({"PRESET": "test", "DIST_TIMEOUT": "0"})


MACHINE_ENV = {  # what clusters, containers, CI and torchrun set: none of it may trip the flag check
    name: "1" for name in (
        "PATH", "HOME", "PWD", "OLDPWD", "TERM", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "TZ", "HOSTNAME",
        "TMPDIR", "EDITOR", "PAGER", "DISPLAY", "SSH_CONNECTION", "CI", "GITHUB_ACTIONS", "RUNNER_OS",
        "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "LD_LIBRARY_PATH",
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUM_THREADS", "TOKENIZERS_PARALLELISM", "PYTHONPATH", "PYTHONHASHSEED",
        "PYTHONUNBUFFERED", "VIRTUAL_ENV", "CONDA_PREFIX", "PIP_FIND_LINKS", "HF_HOME", "HF_TOKEN", "WANDB_API_KEY",
        "TORCH_HOME", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_LOGS", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
        "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "NCCL_DEBUG", "NCCL_IB_DISABLE", "NCCL_SOCKET_IFNAME",
        "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "GROUP_WORLD_SIZE",
        "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
        "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS",
        "PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER", "MAX_JOBS", "BATCH_SIZE", "SEED_ALL")}


def test_the_machines_own_variables_never_trip_the_flag_check(monkeypatch):
    hp, launch = parse({**os.environ, **MACHINE_ENV, "PRESET": "test", "WORLD_SIZE": "1", "RANK": "0",
                        "LOCAL_RANK": "0"})
    assert launch == T.Launch(0, 0, 1) and hp.preset == "test"


@pytest.mark.parametrize("a, b, distance", [("NROM", "NORM", 1), ("NORM", "NORM", 0), ("PWD", "CWD", 1),
                                            ("TERM", "NORM", 2), ("NUM_ITERATION", "NUM_ITERATIONS", 1),
                                            ("", "AB", 2), ("ABC", "CBA", 2)])
def test_edit_distance_counts_a_swap_of_neighbours_as_one(a, b, distance):
    assert T.edit_distance(a, b) == T.edit_distance(b, a) == distance


# ---- launches, paths, schedules ----

@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 without MASTER_ADDR and MASTER_PORT"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h"}, "WORLD_SIZE=2 without MASTER_PORT"),
    ({"RANK": "1"}, "RANK=1: expected less than WORLD_SIZE=1 (unset)"),
    ({**torchrun_env(2), "RANK": "2"}, "RANK=2: expected less than WORLD_SIZE=2;"),
])
def test_world_size_or_rank_without_torchrun_is_refused(env, words):
    with pytest.raises(T.ConfigError) as error:
        parse({"PRESET": "test", **env})
    assert words in str(error.value) and "torchrun --standalone --nproc_per_node=2 train_gpt.py" in str(error.value)
    assert parse({"PRESET": "test", **torchrun_env(2, rank=1)})[1] == T.Launch(1, 1, 2)


def test_lr_boost_at_must_increase_inside_the_schedule():
    for value in ("0.6,0.5", "0.5,0.5", "0.0,0.5", "0.5,1.2"):
        with pytest.raises(T.ConfigError, match=f"LR_BOOST_AT={value}: expected an increasing"):
            parse({"PRESET": "test", "LR_BOOSTS": "1,2,3", "LR_BOOST_AT": value})
    assert parse({"PRESET": "test", "LR_BOOSTS": "1,2,3", "LR_BOOST_AT": "0.2,0.7"})[0].lr_boost_at == (0.2, 0.7)


@pytest.mark.parametrize("raised", [
    {"VAL_BATCH_TOKENS": "2048"},
    {"BATCH_SCHEDULE": "1000", "VAL_BATCH_TOKENS": "1000"},
    {"VAL_BATCH_TOKENS": "1000", "VAL_TOKENS": "3000"},
    {"BATCH_CHUNKS": "3"},
])
def test_raising_a_size_names_every_field_to_change_at_once(raised):
    """One error names every field that must change with the raised one, with values that fit: taking them all
    makes a configuration that parses (no second round of errors)."""
    env = {"PRESET": "test", **raised}
    with pytest.raises(T.ConfigError) as error:
        parse(env)
    message = str(error.value)
    assert "\n" not in message
    fixes = dict(re.findall(r"e\.g\. ([A-Z_]+)=([\d,]+)", message) + re.findall(r"with ([A-Z_]+)=(\d+)", message))
    assert fixes
    assert parse({**env, **fixes})[0].preset == "test"


def test_log_dir_under_a_regular_file_is_one_line(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PRESET", "test")
    monkeypatch.setenv("LOG_DIR", str(blocker / "logs"))
    assert T.main([]) == 2
    assert capsys.readouterr().err.strip() == f"error: LOG_DIR={blocker}/logs: {blocker} is a file, not a folder; " \
                                              "point LOG_DIR at a folder"
    with pytest.raises(T.ConfigError, match="is a file"):
        T.check_log_dir(str(blocker))


def test_arguments_other_than_help_and_check_are_named(capsys, monkeypatch):
    assert T.main(["--foo"]) == 2
    assert capsys.readouterr().err.startswith("error: --foo: not an argument of train_gpt.py")
    assert T.main(["--help", "extra"]) == 2 and "error: extra:" in capsys.readouterr().err
    assert T.main(["-h"]) == 0 and "NUM_ITERATIONS" in capsys.readouterr().out
    monkeypatch.setenv("PRESET", "test")
    monkeypatch.setenv("NROM", "derf")
    assert T.main(["--check"]) == 2 and "did you mean NORM?" in capsys.readouterr().err
    monkeypatch.delenv("NROM")
    assert T.main(["--check"]) == 0


@pytest.mark.parametrize("env, words", [
    ({"NROM": "derf"}, "error: NROM=derf: not a flag; did you mean NORM?"),
    ({"WORLD_SIZE": "2"}, "error: WORLD_SIZE=2 without MASTER_ADDR and MASTER_PORT"),
])
def test_env_errors_exit_2_with_one_line_from_the_command_line(tmp_path, env, words):
    full = {"PRESET": "test", "LOG_DIR": str(tmp_path / "logs"), "PATH": "/usr/bin:/bin", **env}
    result = subprocess.run([sys.executable, str(T.Path(T.__file__))], env=full, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(words)
    assert not (tmp_path / "logs").exists()


def test_subprocesses_of_cpu_tests_see_no_gpu(run_env):
    """conftest hides CUDA from every process a test starts, so a one-GPU machine runs the torchrun tests' two ranks
    on the CPU (gloo) instead of both on one device; this process keeps its GPUs for the cuda-marked tests."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and run_env["CUDA_VISIBLE_DEVICES"] == ""
    seen = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], env=run_env,
                          capture_output=True, text=True, timeout=120)
    assert seen.stdout.strip() == "0", seen.stderr


def test_allocator_setting_is_in_place_before_torch_is_imported():
    """#48's expandable segments: set by train_gpt.py before `import torch`, a value the user set kept."""
    code = "import os, sys; import train_gpt; print(os.environ['PYTORCH_ALLOC_CONF'], 'torch' in sys.modules)"
    for given, expected in ((None, "expandable_segments:True"),
                            ("expandable_segments:False", "expandable_segments:False")):
        env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ALLOC_CONF"}
        if given:
            env["PYTORCH_ALLOC_CONF"] = given
        out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                             text=True, timeout=120, cwd=REPO)
        assert out.stdout.split() == [expected, "True"], out.stderr
    source = (REPO / "train_gpt.py").read_text()
    assert source.index('os.environ.setdefault("PYTORCH_ALLOC_CONF"') < source.index("\nimport torch\n")


def test_research_preset_is_byte_level_and_its_matrices_hold_most_parameters():
    hp, _ = parse({"PRESET": "research"})
    assert hp.bos_id == T.BYTE_BOS_ID == 256 and hp.vocab_size == 384 and "embedded_bytes" in hp.train_files
    groups = T.GPT(T.model_config(hp)).param_groups()
    total = sum(p.numel() for ps in groups.values() for p in ps)
    matrices = sum(p.numel() for key in ("qkvo", "c_fc", "c_proj") for p in groups[key])
    assert matrices / total > 0.85  # 3.67M of 4.16M; the cpu preset's: 0.8M of ~33M
    assert parse({"PRESET": "cpu"})[0].bos_id == T.BOS_ID == 50256  # GPT-2's <|endoftext|>, as #48
    with pytest.raises(T.ConfigError, match="BOS_ID=384: expected below VOCAB_SIZE=384"):
        T.check_consistency(parse({"PRESET": "research", "BOS_ID": "384"})[0], 1)


# ---- every check_consistency rule at its boundary: the value just allowed passes, the one just outside is refused ----

# {rule: ([(world size, settings just allowed)], [(world size, settings just outside, words of its refusal)])}, on
# the `test` preset: MODEL_DIM=32 (1 head of 32), VOCAB_SIZE=50304, NUM_ITERATIONS=8, BATCH_CHUNKS=2,
# WINDOW_BLOCK_TOKENS=16 (a batch splits into units of 2 * 16 tokens), VAL_BATCH_TOKENS=256, VAL_TOKENS=1024
CONSISTENCY_BOUNDARIES = {
    "heads_times_head_dim": (
        [(1, dict(num_heads=2, head_dim=16))],
        [(1, dict(head_dim=28), "NUM_HEADS=1 * HEAD_DIM=28 != MODEL_DIM=32"),
         (1, dict(head_dim=36), "NUM_HEADS=1 * HEAD_DIM=36 != MODEL_DIM=32")]),
    "bos_below_vocab": (
        [(1, dict(bos_id=50303))],
        [(1, dict(bos_id=50304), "BOS_ID=50304: expected below VOCAB_SIZE=50304")]),
    "gate_input_dim": (
        [(1, dict(gate_input_dim=32))],
        [(1, dict(gate_input_dim=33), "GATE_INPUT_DIM=33: expected at most MODEL_DIM=32")]),
    "extension_iterations": (
        [(1, dict(extension_iterations=7))],
        [(1, dict(extension_iterations=8), "EXTENSION_ITERATIONS=8: expected fewer than NUM_ITERATIONS=8")]),
    "lr_boosts": (
        [(1, dict(lr_boosts=(1.0, 2.0), lr_boost_at=(0.5,)))],
        [(1, dict(lr_boosts=(1.0, 2.0, 3.0), lr_boost_at=(0.5,)), "LR_BOOSTS has 3 values: expected one more than"),
         (1, dict(lr_boosts=(1.0,), lr_boost_at=(0.5,)), "LR_BOOSTS has 1 values: expected one more than")]),
    "momo_steps_adam_every_step": (
        [(1, dict(momo=True, adam_step_every=1)), (1, dict(momo=False, adam_step_every=2))],
        [(1, dict(momo=True, adam_step_every=2), "MOMO=1 with ADAM_STEP_EVERY=2")]),
    "checkpoint_every_whole_adam_cycles": (
        [(1, dict(save_checkpoint=True, adam_step_every=2, checkpoint_every=4)),
         (1, dict(save_checkpoint=True, adam_step_every=2, checkpoint_every=0)),
         (1, dict(save_checkpoint=False, adam_step_every=2, checkpoint_every=3))],
        [(1, dict(save_checkpoint=True, adam_step_every=2, checkpoint_every=3),
          "CHECKPOINT_EVERY=3: expected a multiple of ADAM_STEP_EVERY=2"),
         (1, dict(save_checkpoint=True, adam_step_every=2, checkpoint_every=5), "CHECKPOINT_EVERY=5: expected")]),
    # BATCH_CHUNKS=4 on 768-token batches: every world size below passes the batch and validation rules
    "world_size_divides_batch_chunks": (
        [(world, dict(batch_chunks=4, batch_schedule=(768,), val_batch_tokens=768, val_tokens=1536))
         for world in (1, 2, 4, 6)],
        [(3, dict(batch_chunks=4, batch_schedule=(768,), val_batch_tokens=768, val_tokens=1536),
          "world size 3 does not divide BATCH_CHUNKS=4")]),
    "batch_splits_into_whole_blocks": (
        [(1, dict(batch_schedule=(64, 96)))],
        [(1, dict(batch_schedule=(64, 80)), "BATCH_SCHEDULE=64,80: 80 tokens do not split into 2 chunks"),
         (1, dict(batch_schedule=(97,)), "BATCH_SCHEDULE=97: 97 tokens do not split")]),
    "val_batch_splits_into_whole_blocks": (
        [(1, dict(val_batch_tokens=96, val_tokens=960))],
        [(1, dict(val_batch_tokens=80, val_tokens=960), "VAL_BATCH_TOKENS=80: expected a multiple of 32")]),
    "val_tokens_whole_validation_steps": (
        [(1, dict(val_tokens=1280))],
        [(1, dict(val_tokens=1279), "VAL_TOKENS=1279: expected a multiple of VAL_BATCH_TOKENS=256"),
         (1, dict(val_tokens=1281), "VAL_TOKENS=1281: expected a multiple of VAL_BATCH_TOKENS=256")]),
}


@pytest.mark.parametrize("rule", list(CONSISTENCY_BOUNDARIES))
def test_each_consistency_rule_at_its_boundary(rule):
    base = parse({"PRESET": "test"})[0]
    allowed, refused = CONSISTENCY_BOUNDARIES[rule]
    for world, settings in allowed:
        T.check_consistency(dataclasses.replace(base, **settings), world)
    for world, settings, words in refused:
        with pytest.raises(T.ConfigError) as error:
            T.check_consistency(dataclasses.replace(base, **settings), world)
        assert words in str(error.value), (settings, str(error.value))


def test_adamw_matrix_weight_decay_reaches_the_matrices_only(run_env):
    """ADAMW_MATRIX_WD is the matrices' decoupled decay under OPTIMIZER=adamw (so that the arm is AdamW, not Adam);
    the embeddings, scalars and head keep ADAM_WD."""
    hp, launch = T.parse_env({**run_env, "OPTIMIZER": "adamw", "ADAMW_MATRIX_WD": "0.1", "ADAM_WD": "0.02"}, False)
    state = T.setup(hp, launch, T.torch.device("cpu"))
    matrices, adam = state.optimizers
    assert {g["weight_decay"] for g in matrices.param_groups} == {0.1}
    assert {g["weight_decay"] for g in adam.param_groups} == {0.02}
    default = T.parse_env({**run_env, "OPTIMIZER": "adamw"}, False)[0]
    assert default.adamw_matrix_wd == 0.0  # Adam, as the earlier studies' arm


def test_data_seed_reaches_the_loader_and_refuses_below_minus_one(run_env):
    hp, launch = T.parse_env({**run_env, "DATA_SEED": "5"}, False)
    assert T.setup(hp, launch, T.torch.device("cpu")).loader.data_seed == 5
    assert T.parse_env(run_env, False)[0].data_seed == -1  # #48's order unless asked
    with pytest.raises(T.ConfigError, match=r"DATA_SEED=-2: expected -1 \(the shards' order\) or a seed >= 0"):
        T.parse_env({**run_env, "DATA_SEED": "-2"}, False)
