"""Hyperparameters: presets, typed env overrides and their errors."""

import subprocess
import sys

import pytest

import train_gpt as T


def parse(env, cuda=False):
    return T.parse_env(env, cuda_available=cuda)


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
    ("PRESET", "fast", "PRESET=fast: expected one of speedrun, cpu, test"),
])
def test_bad_values_name_variable_value_and_allowed(var, value, words):
    with pytest.raises(T.ConfigError) as error:
        parse({"PRESET": "test", var: value})
    assert words in str(error.value)


@pytest.mark.parametrize("world, accum", [(1, 8), (2, 4), (4, 2), (8, 1), (16, 1)])
def test_speedrun_batch_geometry_is_record_48s(world, accum):
    """#48: one packed chunk of global batch / 8 tokens per forward, 8 / world forwards per rank; above 8 ranks
    one forward of global batch / world."""
    env = {"PRESET": "speedrun", "WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0"}
    hp, launch = parse(env, cuda=True)
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
        parse({"PRESET": "speedrun", "WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0"}, cuda=True)


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
