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


def test_missing_byte_shards_name_the_command_that_builds_them(tmp_path):
    """PRESET=research reads data/embedded_bytes/, which ./run.sh data does not build: the hint says --bytes."""
    with pytest.raises(T.ShardError) as error:
        T.find_shards(str(tmp_path / "embedded_bytes" / "train_*.bin"), "TRAIN_FILES")
    assert "no file matches" in str(error.value) and "python data/build_corpus.py --bytes" in str(error.value)


def chunk_stream(files, world, steps, chunk_tokens=64, accum=None, max_seq_len=48, data_seed=-1):
    """Per step, the step's chunks in stream order, merged from every rank's loader: chunk c = rank c % world,
    micro-step c // world."""
    accum = accum or 4 // world
    loaders = [T.PackedLoader(files, 50304, max_seq_len, r, world, data_seed=data_seed) for r in range(world)]
    out = []
    for _ in range(steps):
        per_rank = [loader.next_step(chunk_tokens, accum) for loader in loaders]
        out.append([per_rank[c % world][c // world] for c in range(accum * world)])
    return out


@pytest.mark.parametrize("data_seed", [-1, 7])
def test_packed_chunk_stream_is_the_same_at_world_1_2_and_4(shard_dir, data_seed):
    """The shards' order and DATA_SEED's shuffled one alike: one stream, whatever the world size."""
    files = T.find_shards(str(shard_dir / "train_*.bin"), "TRAIN_FILES")
    single = chunk_stream(files, 1, steps=150, data_seed=data_seed)  # changes shard 6 times: wraps past both
    for world in (2, 4):
        split = chunk_stream(files, world, steps=150, data_seed=data_seed)
        assert all(torch.equal(a, b) for step_a, step_b in zip(single, split) for a, b in zip(step_a, step_b))


def whole_documents(files, data_seed, shard=0, max_seq_len=10_000):
    """The documents that the chunks of one pass over a shard hold whole, in stream order: every document of a chunk
    but its last, which is cut to fill it (max_seq_len is above any document, so no other cut)."""
    loader = T.PackedLoader(files, 50304, max_seq_len, 0, 1, data_seed=data_seed)
    loader.restore(shard, 0)
    docs = []
    while True:
        chunk = loader.next_step(256, 1)[0].tolist()
        if loader.shard != shard:  # a chunk that would run past the shard's last document comes from the next one
            return docs
        starts = [i for i, t in enumerate(chunk) if t == BOS] + [len(chunk)]
        docs += [chunk[a:b] for a, b in zip(starts[:-2], starts[1:-1])]


def test_data_seed_shuffles_whole_documents_within_a_shard(shard_dir):
    """DATA_SEED=s walks shard 0's documents in an order of its own, a permutation seeded by (DATA_SEED, shard):
    its chunks hold the file's documents whole, in that order; another seed gives another order; -1 the file's."""
    files = T.find_shards(str(shard_dir / "train_*.bin"), "TRAIN_FILES")
    in_file = shard_documents(files[:1])
    index = {tuple(doc): i for i, doc in enumerate(in_file)}
    assert len(index) == len(in_file)  # the synthetic documents are all different: an index names each one
    positions = {seed: [index[tuple(doc)] for doc in whole_documents(files, seed)] for seed in (-1, 7, 8)}
    assert positions[-1] == sorted(positions[-1])  # the file's order
    order = np.random.default_rng((7, 0)).permutation(len(in_file)).tolist()
    assert positions[7] == [i for i in order if i in set(positions[7])]  # the permutation's order
    assert positions[7][0] == order[0] and positions[7] != sorted(positions[7])
    assert positions[7][:20] != positions[8][:20]
    assert len(positions[7]) > len(in_file) // 2  # most documents begin whole somewhere in a chunk
    # shard 1 has a permutation of its own, seeded by (7, 1): not shard 0's applied again
    in_shard_1 = {tuple(doc): i for i, doc in enumerate(shard_documents(files[1:2]))}
    first = in_shard_1[tuple(whole_documents(files, 7, shard=1)[0])]
    assert first == np.random.default_rng((7, 1)).permutation(len(in_shard_1))[0]
    assert first != np.random.default_rng((7, 0)).permutation(len(in_shard_1))[0]


def test_data_seed_loader_resumes_where_it_stopped(shard_dir):
    """A shuffled loader saved mid-shard and restored into a fresh one (the checkpoint path) continues with the same
    chunks as the one that never stopped."""
    files = T.find_shards(str(shard_dir / "train_*.bin"), "TRAIN_FILES")
    walked = T.PackedLoader(files, 50304, 48, 0, 1, data_seed=3)
    for _ in range(40):
        walked.next_step(64, 2)
    saved = walked.state()
    restored = T.PackedLoader(files, 50304, 48, 0, 1, data_seed=3)
    restored.load_state(saved)
    for _ in range(100):  # past the end of the shard: the next one is shuffled the same way in both
        assert all(torch.equal(a, b) for a, b in zip(walked.next_step(64, 2), restored.next_step(64, 2)))


def shard_documents(files):
    """Every document of the shards as a token list, in order."""
    docs = []
    for path in files:
        tokens = T.read_shard(path, 50304).astype(np.int64)
        starts = np.flatnonzero(tokens == BOS).tolist() + [tokens.size]
        docs += [tokens[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]
    return docs


def test_packed_chunks_are_whole_documents_cut_at_max_seq_len(shard_dir):
    """Each chunk is 64 + 1 tokens: documents from their BOS, each cut at 48 tokens, the last cut to fill; the
    next chunk starts at the next document. Checked against the documents read independently of the loader."""
    files = T.find_shards(str(shard_dir / "train_*.bin"), "TRAIN_FILES")
    documents = shard_documents(files)
    next_doc = 0
    for step in chunk_stream(files, 1, steps=10):
        for chunk in step:
            assert chunk.dtype == torch.int32 and chunk.shape == (65,) and chunk[0] == BOS
            expected, have = [], 0
            while have < 65:
                piece = documents[next_doc][:min(48, 65 - have)]
                expected += piece
                have += len(piece)
                next_doc += 1
            assert chunk.tolist() == expected
            starts = (chunk == BOS).nonzero().flatten().tolist() + [65]
            assert max(b - a for a, b in zip(starts[:-1], starts[1:])) <= 48


def test_packed_loader_is_deterministic_and_resets(shard_dir):
    files = T.find_shards(str(shard_dir / "train_*.bin"), "TRAIN_FILES")
    loader = T.PackedLoader(files, 50304, 48, 0, 1)
    first = loader.next_step(64, 2)
    loader.next_step(64, 2)
    loader.reset()
    again = loader.next_step(64, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a, b) for a, b in zip(first, chunk_stream(files, 1, 1, accum=2)[0]))


def test_packed_loader_refuses_shards_too_small_for_a_chunk(tmp_path):
    path = write_test_shard(tmp_path / "tiny.bin", synthetic_tokens(100))
    loader = T.PackedLoader([str(path)], 50304, 48, 0, 1)
    with pytest.raises(T.ShardError, match="too few documents for one chunk of 1025 tokens"):
        loader.next_step(1024, 1)


def test_val_sequences_are_consecutive_and_split_by_rank(shard_dir):
    files = [str(shard_dir / "val_000000.bin")]
    stream = T.read_shard(files[0], 50304).astype(np.int64)
    full = T.load_val_sequences(files, 1024, 128, 50304, 0, 1)
    assert full.shape == (8, 129)
    for c, sequence in enumerate(full):  # not aligned to documents: sequence c starts at token c * 128
        assert sequence.tolist() == stream[c * 128:c * 128 + 129].tolist()
    parts = [T.load_val_sequences(files, 1024, 128, 50304, r, 4) for r in range(4)]
    for c in range(8):
        assert torch.equal(parts[c % 4][c // 4], full[c])
    with pytest.raises(T.ShardError, match="VAL_TOKENS=100000: the val files hold only 8000 tokens"):
        T.load_val_sequences(files, 100000, 128, 50304, 0, 1)
