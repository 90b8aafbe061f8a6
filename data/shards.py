"""Token shard format shared with llm.c and the modded-nanogpt speedrun.

A shard is a 1024-byte header of 256 little-endian int32 (header[0] = magic 20240520, header[1] = version 1,
header[2] = number of tokens, the rest zero) followed by that many little-endian uint16 token ids.

    write_shard(path, tokens)                 atomic write (temp file in the same folder, then rename)
    read_shard(path, vocab_size=None)         -> np.ndarray[uint16]; checks magic, version, size and token ids
    shard_token_count(path)                   -> int; header and size check only (no token read)

Every format problem raises ValueError naming the file, what is wrong and a HINT of what to do. An empty shard
(header only, count 0) is well formed, here as in train_gpt.py: whether a shard holds enough tokens is the loader's
question, not the format's.
train_gpt.py carries its own copy of the reader (the trainer is one file by design); keep the two equivalent:
tests/test_data.py feeds both the same good and bad files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN_ID = 2**16 - 1  # uint16 storage
HINT = ("HINT: re-download FineWeb shards with `python data/cached_fineweb10B.py` or rebuild the embedded corpus "
        "with `python data/build_corpus.py`")


def write_shard(path: str | os.PathLike, tokens: np.ndarray | list[int]) -> None:
    """Write `tokens` (integer ids in [0, 65535]) as a shard at `path`, atomically."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"write_shard({path}): tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"write_shard({path}): tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high > MAX_TOKEN_ID:
            raise ValueError(f"write_shard({path}): token ids must lie in [0, {MAX_TOKEN_ID}] to fit uint16, "
                             f"got min {low} max {high}. HINT: this format only holds vocabularies up to 65536")
    if tokens.size >= 2**31:
        raise ValueError(f"write_shard({path}): {tokens.size} tokens do not fit the int32 header; split the shard")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: os.replace is atomic
    try:
        with open(tmp_path, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2").tobytes())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def shard_token_count(path: str | os.PathLike) -> int:
    """Check a shard's header and file size; return its token count."""
    path = Path(path)
    try:
        file_bytes = path.stat().st_size
        with open(path, "rb") as f:
            raw_header = f.read(HEADER_BYTES)
    except OSError as error:  # a folder, a missing or unreadable file: one line, as for a bad header
        raise ValueError(f"{path}: cannot read it ({error.strerror}). {HINT}") from None
    # checked on the bytes: np.frombuffer of a length that is not a multiple of 4 raises numpy's own error
    if len(raw_header) < HEADER_BYTES:
        raise ValueError(f"{path}: {file_bytes} bytes is shorter than the {HEADER_BYTES}-byte shard header "
                         f"(truncated or not a shard). {HINT}")
    header = np.frombuffer(raw_header, dtype="<i4")
    if header[0] != MAGIC:
        raise ValueError(f"{path}: bad magic number {header[0]} (expected {MAGIC}): not a token shard in the "
                         f"llm.c/speedrun format. {HINT}")
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {VERSION}). {HINT}")
    num_tokens = int(header[2])
    expected_bytes = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or file_bytes != expected_bytes:
        if num_tokens < 0:
            what = "a negative token count (corrupt header)"
        elif file_bytes < expected_bytes:
            what = "truncated (an interrupted download or write?)"
        else:
            what = "padded (bytes after the last token)"
        raise ValueError(f"{path}: file size {file_bytes} bytes does not match the header's token count "
                         f"{num_tokens} (expected {expected_bytes} bytes): {what}. {HINT}")
    return num_tokens


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Read a shard's tokens as uint16 after checking its header, size and (given vocab_size) token ids."""
    num_tokens = shard_token_count(path)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        tokens = np.fromfile(f, dtype="<u2", count=num_tokens)
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise ValueError(f"{path}: token id {int(tokens[bad])} at position {bad} is >= vocab_size {vocab_size}: the "
                         f"shard was made with another tokenizer or is corrupt. HINT: use shards tokenized with "
                         f"GPT-2 (data/cached_fineweb10B.py, data/build_corpus.py) or raise vocab_size")
    return tokens
