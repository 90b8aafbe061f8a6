"""Shared fixtures: synthetic token shards in temp dirs and the env for a tiny `test`-preset run."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# This process asks for its GPUs now (torch reads CUDA_VISIBLE_DEVICES once, when CUDA is first queried) and keeps
# them for the cuda-marked tests; every subprocess a test starts (training runs, torchrun ranks) inherits an empty
# CUDA_VISIBLE_DEVICES and runs on the CPU, so a one-GPU machine never puts two gloo ranks on one device.
CUDA_IN_THIS_PROCESS = torch.cuda.is_available()
GPU_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")  # for a cuda-marked test that starts a GPU subprocess
os.environ["CUDA_VISIBLE_DEVICES"] = ""

BOS = 50256


def write_test_shard(path: Path, tokens: np.ndarray, magic: int = 20240520, version: int = 1,
                     count: int | None = None) -> Path:
    """Writes a shard in the speedrun format (256 int32 header, uint16 tokens); the header fields can be forged."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (magic, version, len(tokens) if count is None else count)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
    return path


def synthetic_tokens(num_tokens: int, seed: int = 0, vocab: int = 512) -> np.ndarray:
    """Documents of learnable text: each starts with BOS and repeats a short random phrase with small noise,
    so a tiny model's loss falls fast."""
    rng = np.random.default_rng(seed)
    out = []
    total = 0
    while total < num_tokens:
        phrase = rng.integers(0, vocab, size=rng.integers(3, 8))
        length = int(rng.integers(20, 200))
        doc = np.resize(phrase, length)
        noise = rng.random(length) < 0.05
        doc[noise] = rng.integers(0, vocab, size=int(noise.sum()))
        out.append(np.concatenate([[BOS], doc]))
        total += length + 1
    return np.concatenate(out)[:num_tokens].astype(np.uint16)


def write_shards(root: Path) -> Path:
    """root/data: two train shards and one val shard of synthetic documents."""
    data = root / "data"
    data.mkdir()
    write_test_shard(data / "train_000000.bin", synthetic_tokens(20000, seed=1))
    write_test_shard(data / "train_000001.bin", synthetic_tokens(20000, seed=2))
    write_test_shard(data / "val_000000.bin", synthetic_tokens(8000, seed=3))
    return data


def preset_env(data: Path, log_dir: Path) -> dict[str, str]:
    """The environment of a `test`-preset run on the shards in data, logging into log_dir."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PRESET="test", TRAIN_FILES=str(data / "train_*.bin"), VAL_FILES=str(data / "val_*.bin"),
               LOG_DIR=str(log_dir), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def signal_everywhere(model, generator: torch.Generator, scale: float = 0.05):
    """Makes every zero-initialized weight of a GPT random (the head, the gates, each attention's output projection:
    qkvo_w's last quarter of rows), so that every path carries signal; returns the model."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
        for block in model.blocks:
            if block.attn is not None:
                rows = block.attn.qkvo_w[3 * block.attn.qkvo_w.size(1):]
                rows.copy_(torch.randn(rows.shape, generator=generator) * scale)
    return model


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """Two train shards and one val shard of synthetic documents."""
    return write_shards(tmp_path)


@pytest.fixture
def run_env(shard_dir: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of a `test`-preset run on the synthetic shards, logging into tmp_path/logs."""
    return preset_env(shard_dir, tmp_path / "logs")


# Tests that first wait for conftest's background compiled run to end, to take its compiled graphs from Inductor's
# on-disk cache (the same model shapes): bench/smoke.py --quick took 14 s after the compiled run and 93 s on a cold
# cache (measured on the 2-core machine). They run last, so that the suite goes on while the run compiles.
AFTER_BACKGROUND_RUNS = ("test_smoke_quick_passes_every_check_of_the_cpu_twin",
                         "test_smoke_budget_starts_only_what_fits",
                         "test_smoke_killed_between_checks_leaves_the_finished_ones")


# The compiled runs that the tests read, {fixture name: (the tests that read it, its flags, the script it runs)}:
# compiled_run: two batch phases, an extension with its own window, validations at both phases and in the extension,
# and a final window of its own; compiled_cpu_run: the cpu preset's shapes (dim 128, 1024-token chunks), where
# Inductor's code once gave non-finite gradients, a few steps on the synthetic shards, after the compiled-against-eager
# gradient check of tests/compiled_cpu_worker.py (in the same process: the run reuses the check's compiled graph).
COMPILED_RUNS = {
    "compiled_run": (("test_compiled_run_has_no_recompile_after_warmup", *AFTER_BACKGROUND_RUNS), dict(
        COMPILE="1", WARMUP="1", NUM_ITERATIONS="5", EXTENSION_ITERATIONS="1", BATCH_SCHEDULE="128,256",
        LONG_WINDOWS="2,4", EXTENSION_WINDOW="6", FINAL_WINDOW="8", VAL_EVERY="2", ADAM_STEP_EVERY="2",
        RUN_TAG="compiled"), "train_gpt.py"),
    "compiled_cpu_run": (("test_compiled_cpu_preset_run_loss_falls",
                          "test_compiled_gradients_equal_eager_at_the_cpu_preset_shapes"), dict(
        PRESET="cpu", COMPILE="1", NUM_ITERATIONS="8", VAL_EVERY="0", VAL_TOKENS="4096", VAL_BATCH_TOKENS="2048",
        TRAIN_LOG_EVERY="1", RUN_TAG="compiled_cpu"), "tests/compiled_cpu_worker.py"),
}


def pytest_collection_modifyitems(session, config, items):
    waiting = [item for item in items if item.name in AFTER_BACKGROUND_RUNS]
    items[:] = [item for item in items if item.name not in AFTER_BACKGROUND_RUNS] + waiting


@dataclass
class BackgroundRun:
    process: subprocess.Popen
    out: IO[str]  # its stdout and stderr
    log_dir: Path
    root: Path  # its temp folder (a worker's own output lands here)


def start_compiled_run(request, tmp_path_factory, name: str):
    """Starts COMPILED_RUNS[name] before the session's first test when a test that reads it is selected:
    torch.compile on CPU takes minutes, mostly on one core, so the run goes on beside the suite instead of adding to
    its time. Yields a BackgroundRun, or None."""
    tests, flags, script = COMPILED_RUNS[name]
    if not any(item.name in tests for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp(name)
    env = {**preset_env(write_shards(root), root / "logs"), **flags}
    args = [str(root / "gradients.json")] if script != "train_gpt.py" else []
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen([sys.executable, script, *args], env=env, cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT)
        yield BackgroundRun(process, out, root / "logs", root)
        process.kill()  # still running only when the tests did not wait for it


@pytest.fixture(scope="session", autouse=True)
def compiled_run(request, tmp_path_factory):
    yield from start_compiled_run(request, tmp_path_factory, "compiled_run")


@pytest.fixture(scope="session", autouse=True)
def compiled_cpu_run(request, tmp_path_factory):
    yield from start_compiled_run(request, tmp_path_factory, "compiled_cpu_run")
