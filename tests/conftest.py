"""Shared fixtures: synthetic token shards in temp dirs and the env for a tiny `test`-preset run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """Two train shards and one val shard of synthetic documents."""
    data = tmp_path / "data"
    data.mkdir()
    write_test_shard(data / "train_000000.bin", synthetic_tokens(20000, seed=1))
    write_test_shard(data / "train_000001.bin", synthetic_tokens(20000, seed=2))
    write_test_shard(data / "val_000000.bin", synthetic_tokens(8000, seed=3))
    return data


@pytest.fixture
def run_env(shard_dir: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of a `test`-preset run on the synthetic shards, logging into tmp_path/logs."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PRESET="test", TRAIN_FILES=str(shard_dir / "train_*.bin"), VAL_FILES=str(shard_dir / "val_*.bin"),
               LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env
