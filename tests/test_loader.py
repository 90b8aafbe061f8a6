"""Shard reader errors and the BOS-aligned loader's determinism and world-size independence."""

import numpy as np
import pytest
import torch

import train_gpt as T
from conftest import BOS, synthetic_tokens, write_test_shard


def test_round_trip(tmp_path):
    tokens = synthetic_tokens(1000)
    path = write_test_shard(tmp_path / "a.bin", tokens)
    assert np.array_equal(T.read_shard(str(path), 50304), tokens)


@pytest.mark.parametrize("forge, words", [
    (dict(magic=12345), "magic number 12345, expected 20240520"),
    (dict(version=2), "version 2, expected 1"),
    (dict(count=2000), "header promises 2000 tokens"),
])
def test_header_errors_name_file_and_problem(tmp_path, forge, words):
    path = write_test_shard(tmp_path / "bad.bin", synthetic_tokens(1000), **forge)
    with pytest.raises(T.ShardError) as error:
        T.read_shard(str(path), 50304)
    assert str(path) in str(error.value) and words in str(error.value) and "HINT" in str(error.value)


def test_truncated_header_and_out_of_vocab_ids(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x00" * 100)
    with pytest.raises(T.ShardError, match="shorter than the 1024-byte header"):
        T.read_shard(str(short), 50304)
    path = write_test_shard(tmp_path / "big.bin", np.array([1, 2, 60000, 3]))
    with pytest.raises(T.ShardError, match="token id 60000 at position 2 is >= the vocab size 50304"):
        T.read_shard(str(path), 50304)


def test_no_matching_files_names_the_variable(tmp_path):
    with pytest.raises(T.ShardError, match="TRAIN_FILES=.*nothing.*|TRAIN_FILES=.*no file matches"):
        T.find_shards(str(tmp_path / "*.bin"), "TRAIN_FILES")


def rows_for(files, world, steps, rows_per_step=6, seq_len=64):
    loaders = [T.TrainLoader(files, seq_len, 50304, r, world) for r in range(world)]
    return [[loader.next_rows(rows_per_step) for loader in loaders] for _ in range(steps)]


def test_loader_same_global_batches_for_every_world_size(shard_dir):
    files = T.find_shards(str(shard_dir / "train_*.bin"), "TRAIN_FILES")
    single = rows_for(files, 1, steps=40)  # 40 * 6 * 64 tokens: wraps past both shards
    for world in (2, 3):
        split = rows_for(files, world, steps=40)
        for step_single, step_split in zip(single, split):
            merged = torch.empty_like(step_single[0])
            for r, part in enumerate(step_split):
                merged[r::world] = part
            assert torch.equal(merged, step_single[0])


def test_loader_is_deterministic_and_bos_aligned(shard_dir):
    files = T.find_shards(str(shard_dir / "train_*.bin"), "TRAIN_FILES")
    a, b = rows_for(files, 1, steps=5), rows_for(files, 1, steps=5)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    rows = torch.cat([step[0] for step in a])
    starts_at_bos = rows[:, 0] == BOS
    assert starts_at_bos.float().mean() > 0.5
    # a row that does not start a document had no document start within reach of the cursor
    assert not (rows[~starts_at_bos, :64] == BOS).any()


def test_loader_reset_restarts_the_stream(shard_dir):
    files = T.find_shards(str(shard_dir / "train_*.bin"), "TRAIN_FILES")
    loader = T.TrainLoader(files, 64, 50304, 0, 1)
    first = loader.next_rows(4)
    loader.next_rows(4)
    loader.reset()
    assert torch.equal(loader.next_rows(4), first)


def test_val_rows_cover_the_same_tokens_at_any_world_size(shard_dir):
    files = [str(shard_dir / "val_000000.bin")]
    full = T.load_val_rows(files, 64, 1024, 50304, 0, 1)
    assert full.shape == (16, 65)
    parts = [T.load_val_rows(files, 64, 1024, 50304, r, 3) for r in range(3)]
    assert sum(p.size(0) for p in parts) == 16
    assert torch.equal(parts[1][0], full[1]) and torch.equal(parts[2][1], full[5])
    with pytest.raises(T.ShardError, match="VAL_TOKENS=100000: the val files hold only 8000 tokens"):
        T.load_val_rows(files, 64, 100000, 50304, 0, 1)
