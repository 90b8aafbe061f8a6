"""Tests of data/: shard format (against train_gpt.py's own reader), tokenizer, embedded corpus builder, FineWeb
downloader. Hermetic: nothing is downloaded and nothing is written into the repo. The tokenizer tests use a small
synthetic ranks file in a tmp dir; the one test of GPT-2's real ranks is opt-in (after `python data/tokenizer.py
--fetch`):
    GPT2_RANKS=data/cache/gpt2.tiktoken python -m pytest tests/test_data.py
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import train_gpt  # the repo root is on sys.path (tests/conftest.py)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
sys.path.insert(0, str(DATA_DIR))  # the data scripts import each other as top-level modules

import build_corpus  # noqa: E402
import cached_fineweb10B  # noqa: E402
import shards  # noqa: E402
import tokenizer  # noqa: E402

EOT = 50256
GPT2_RANKS = os.environ.get("GPT2_RANKS")  # opt-in: path to GPT-2's real gpt2.tiktoken


def run_script(script: str, *args: str, env_update: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env_update or {})}
    return subprocess.run([sys.executable, str(DATA_DIR / script), *args], capture_output=True, text=True,
                          env=env, timeout=120)


# ---- shards ----

def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7, 7], dtype=np.int64)
    path = tmp_path / "sub" / "s.bin"
    shards.write_shard(path, tokens)
    assert path.stat().st_size == shards.HEADER_BYTES + 2 * len(tokens)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240520, 1, len(tokens)]
    read = shards.read_shard(path, vocab_size=65536)
    assert read.dtype == np.uint16 and read.tolist() == tokens.tolist()
    assert shards.shard_token_count(path) == len(tokens)
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.bin"]  # no temp file left behind
    shards.write_shard(tmp_path / "empty.bin", [])
    assert shards.read_shard(tmp_path / "empty.bin", vocab_size=10).size == 0


@pytest.mark.parametrize("tokens, message", [([1, -1], "min -1"), ([1, 65536], "max 65536"),
                                             (np.array([1.5]), "integers")])
def test_write_shard_refuses_bad_tokens_and_keeps_old_file(tmp_path, tokens, message):
    path = tmp_path / "s.bin"
    shards.write_shard(path, [1, 2, 3])
    with pytest.raises(ValueError, match=message):
        shards.write_shard(path, tokens)
    assert shards.read_shard(path).tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]


def _corrupt(path: Path, kind: str) -> None:
    """Forge one format problem into a 16-token shard (1056 bytes) written by write_shard."""
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(raw[:shards.HEADER_BYTES], dtype="<i4").copy()
    if kind == "magic":
        header[0] = 12345
    elif kind == "version":
        header[1] = 7
    elif kind == "negative_count":
        header[2] = -3
    if kind in ("magic", "version", "negative_count"):
        raw[:shards.HEADER_BYTES] = header.tobytes()
    if kind == "negative_count":
        raw = raw[:shards.HEADER_BYTES]
    elif kind == "truncated":
        raw = raw[:-3]
    elif kind == "padded":
        raw += b"\0\0"
    elif kind == "short_header":
        raw = raw[:100]
    elif kind == "odd_short_header":
        raw = raw[:1023]  # not a whole number of int32
    elif kind == "empty_file":
        raw = b""
    path.write_bytes(bytes(raw))


# The readers' wordings differ; each pattern names what both must say about the problem (the values included).
SHARD_PROBLEMS = [
    ("magic", [r"magic number 12345\b", r"\b20240520\b"]),
    ("version", [r"version 7\b", r"expected 1\b"]),
    ("truncated", [r"truncated", r"\b1053 bytes", r"\b1056 bytes"]),
    ("padded", [r"padded", r"\b1058 bytes", r"\b1056 bytes"]),
    ("negative_count", [r"-3 tokens|token count -3", r"\b1024 bytes", r"\b1018 bytes"]),
    ("short_header", [r"shorter than the 1024-byte"]),
    ("odd_short_header", [r"shorter than the 1024-byte"]),
    ("empty_file", [r"shorter than the 1024-byte"]),
    ("vocab", [r"token id 50257 at position 2 is >= .*\b50257\b"]),
]
SHARD_READERS = {"train_gpt.read_shard": lambda path: train_gpt.read_shard(str(path), 50257),
                 "shards.read_shard": lambda path: shards.read_shard(path, vocab_size=50257)}
HEADER_READERS = {"train_gpt.read_shard_header": lambda path: train_gpt.read_shard_header(str(path)),
                  "shards.shard_token_count": shards.shard_token_count}


@pytest.mark.parametrize("kind, patterns", SHARD_PROBLEMS, ids=[kind for kind, _ in SHARD_PROBLEMS])
def test_both_shard_readers_refuse_the_same_bad_files(tmp_path, kind, patterns):
    path = tmp_path / f"bad_{kind}.bin"
    shards.write_shard(path, [1, 2, 50257, 3] * 4)  # 50257: the first id past the vocab
    _corrupt(path, kind)
    readers = dict(SHARD_READERS, **({} if kind == "vocab" else HEADER_READERS))  # a header check reads no ids
    for name, read in readers.items():
        with pytest.raises(ValueError) as info:
            read(path)
        message = str(info.value)
        assert str(path) in message and "HINT" in message, (name, message)
        problem = message.replace(str(path), "<path>")  # the file is named after its problem: match the rest
        for pattern in patterns:
            assert re.search(pattern, problem), (name, pattern, message)
    with pytest.raises(train_gpt.ShardError):
        train_gpt.read_shard(str(path), 50257)


@pytest.mark.parametrize("tokens", [[1, 2, 50256, 3, 0, 50000] * 3, [7], []], ids=["tokens", "one", "empty"])
def test_both_shard_readers_agree_on_good_files(tmp_path, tokens):
    # an empty token list is a well-formed shard for both readers; the loader judges whether a shard is long enough
    path = tmp_path / "good.bin"
    shards.write_shard(path, tokens)
    from_trainer = train_gpt.read_shard(str(path), 50257)
    from_data = shards.read_shard(path, vocab_size=50257)
    assert from_trainer.dtype == from_data.dtype == np.uint16
    assert from_trainer.tolist() == from_data.tolist() == tokens
    assert train_gpt.read_shard_header(str(path)) == shards.shard_token_count(path) == len(tokens)


# ---- tokenizer ----

# Each merge is the join of two earlier tokens, so BPE can reach it; "é" is b"\xc3\xa9" in UTF-8.
SYNTHETIC_MERGES = [b" t", b"he", b" the", b"in", b"ing", b"\xc3\xa9", b"re", b"  "]


def synthetic_ranks_bytes() -> bytes:
    """A ranks file in tiktoken's format, one `base64(token) rank` line per token: the 256 single bytes (ranks
    0..255, so every text encodes), then SYNTHETIC_MERGES (ranks 256..)."""
    tokens = [bytes([value]) for value in range(256)] + SYNTHETIC_MERGES
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(tokens))


def tarball_holding(path: Path, ranks: bytes) -> Path:
    """An openai-whisper-like sdist at `path` holding `ranks` as whisper/assets/gpt2.tiktoken."""
    with tarfile.open(path, "w:gz") as tar:
        member = tarfile.TarInfo("openai_whisper-20250625/whisper/assets/gpt2.tiktoken")
        member.size = len(ranks)
        tar.addfile(member, io.BytesIO(ranks))
    return path


@pytest.fixture
def synthetic_cache(tmp_path, monkeypatch) -> Path:
    """A tokenizer cache folder whose gpt2.tiktoken is the synthetic ranks file, standing in for GPT-2's: its SHA-256
    replaces the pinned one, and tiktoken's own cache and download host are out of the picture (whatever this
    machine holds), so gpt2_encoding(cache_dir=...) can only read this file."""
    data = synthetic_ranks_bytes()
    cache = tmp_path / "tokenizer_cache"
    cache.mkdir()
    (cache / tokenizer.RANKS_FILENAME).write_bytes(data)
    monkeypatch.setattr(tokenizer, "RANKS_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(tokenizer, "_tiktoken_cache_has_gpt2", lambda: False)
    monkeypatch.setattr(tokenizer, "_host_reachable", lambda host, timeout_s=3.0: False)
    return cache


@pytest.fixture
def encoding(synthetic_cache):
    return tokenizer.gpt2_encoding(cache_dir=synthetic_cache, allow_download=False)


def test_synthetic_encoding_merges_and_round_trips(encoding):
    pieces = [encoding.decode_single_token_bytes(t) for t in encoding.encode_ordinary("the thing café")]
    assert pieces == [b"t", b"he", b" t", b"h", b"ing", b" ", b"c", b"a", b"f", b"\xc3\xa9"]  # BPE, lowest rank first
    assert encoding.encode_ordinary(" the") == [256 + SYNTHETIC_MERGES.index(b" the")]
    assert encoding.n_vocab == 50257 and encoding.eot_token == EOT
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [EOT]
    text = "naïve café — Größe ≠ größer; 東京 🙂\n\tdef f(x): return x ** 2  # <|endoftext|>"
    tokens = encoding.encode_ordinary(text)
    assert EOT not in tokens and encoding.decode(tokens) == text


@pytest.mark.skipif(not GPT2_RANKS, reason="opt-in: GPT2_RANKS=path/to/gpt2.tiktoken (see the module docstring)")
def test_real_gpt2_ranks_known_ids():
    path = Path(GPT2_RANKS)
    real = tokenizer.encoding_from_ranks(tokenizer.parse_ranks(tokenizer.read_ranks_bytes(path), str(path)))
    assert real.encode("Hello world") == [15496, 995]
    assert real.n_vocab == tokenizer.VOCAB_SIZE == 50257 and real.eot_token == EOT
    text = "naïve café — Größe ≠ größer; 東京 🙂\n\tdef f(x): return x ** 2  # <|endoftext|>"
    assert real.decode(real.encode_ordinary(text)) == text


def test_encoding_from_ranks_file_and_sdist_tarball_agree(synthetic_cache, tmp_path):
    data = (synthetic_cache / tokenizer.RANKS_FILENAME).read_bytes()
    sdist_cache = tmp_path / "sdist_cache"
    sdist_cache.mkdir()
    tarball = tarball_holding(sdist_cache / "openai_whisper-20250625.tar.gz", data)
    assert tokenizer.read_ranks_bytes(tarball) == data
    from_tarball = tokenizer.gpt2_encoding(cache_dir=sdist_cache, allow_download=False)
    from_file = tokenizer.gpt2_encoding(cache_dir=synthetic_cache, allow_download=False)
    sample = "The quick brown fox, 1234 times:  'll've\n\n  ok, the thing"
    assert from_tarball.encode(sample) == from_file.encode(sample)
    assert len(from_file.encode(sample)) < len(sample.encode())  # the merges were used


def test_gpt2_encoding_lookup_order(synthetic_cache, tmp_path, monkeypatch):
    downloads: list[str] = []
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", lambda name: downloads.append(name) or "tiktoken's")
    monkeypatch.setattr(tokenizer, "_tiktoken_cache_has_gpt2", lambda: True)  # 1. tiktoken's cache first
    assert tokenizer.gpt2_encoding(cache_dir=synthetic_cache) == "tiktoken's" and downloads == ["gpt2"]
    monkeypatch.setattr(tokenizer, "_tiktoken_cache_has_gpt2", lambda: False)  # 2. then the local ranks file
    the = 256 + SYNTHETIC_MERGES.index(b" the")
    assert tokenizer.gpt2_encoding(cache_dir=synthetic_cache).encode_ordinary(" the") == [the]
    assert downloads == ["gpt2"]
    empty = tmp_path / "empty_cache"
    with pytest.raises(RuntimeError, match=r"is unreachable.*python data/tokenizer.py --fetch"):
        tokenizer.gpt2_encoding(cache_dir=empty)  # 3. a download only when the host answers
    with pytest.raises(RuntimeError, match=r"download not attempted.*python data/tokenizer.py --fetch"):
        tokenizer.gpt2_encoding(cache_dir=empty, allow_download=False)
    monkeypatch.setattr(tokenizer, "_host_reachable", lambda host, timeout_s=3.0: True)
    assert tokenizer.gpt2_encoding(cache_dir=empty) == "tiktoken's" and downloads == ["gpt2", "gpt2"]
    assert not empty.exists()


def test_tiktoken_cache_check_reads_the_cache_dir_it_is_given(tmp_path, monkeypatch):
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert not tokenizer._tiktoken_cache_has_gpt2()
    for url in tokenizer.TIKTOKEN_GPT2_URLS:  # tiktoken names a cached file by the SHA-1 of its URL
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"cached")
    assert tokenizer._tiktoken_cache_has_gpt2()


def test_pattern_is_tiktokens_gpt2_pattern():
    from tiktoken_ext import openai_public
    assert tokenizer.GPT2_PATTERN == openai_public.r50k_pat_str


def test_corrupt_ranks_file_is_refused():
    with pytest.raises(RuntimeError, match="SHA-256 .* HINT"):
        tokenizer.parse_ranks(b"SGVsbG8= 0\n", "fake.tiktoken")


def test_fetch_gpt2_ranks_with_a_fake_pip(synthetic_cache, tmp_path, monkeypatch):
    data = synthetic_ranks_bytes()
    fetches: list[Path] = []

    def fake_pip(dest_dir: Path, timeout_s: float) -> Path:
        fetches.append(dest_dir)
        return tarball_holding(dest_dir / "openai_whisper-20250625.tar.gz", data)
    monkeypatch.setattr(tokenizer, "pip_download_sdist", fake_pip)
    cache = tmp_path / "new_cache"
    assert tokenizer.fetch_gpt2_ranks(cache) == cache / "gpt2.tiktoken"
    assert (cache / "gpt2.tiktoken").read_bytes() == data and [p.name for p in cache.iterdir()] == ["gpt2.tiktoken"]
    assert len(fetches) == 1 and not fetches[0].exists()  # the sdist lived in a temporary folder
    assert tokenizer.fetch_gpt2_ranks(cache) == cache / "gpt2.tiktoken" and len(fetches) == 1  # cached: no fetch

    other = tmp_path / "other_cache"
    monkeypatch.setattr(tokenizer, "pip_download_sdist",
                        lambda dest_dir, timeout_s: tarball_holding(dest_dir / "openai_whisper-1.tar.gz", b"eA== 0\n"))
    with pytest.raises(RuntimeError, match=r"openai_whisper-1.tar.gz:whisper/assets/gpt2.tiktoken: SHA-256"):
        tokenizer.fetch_gpt2_ranks(other)

    def offline(dest_dir: Path, timeout_s: float) -> Path:
        raise RuntimeError("`pip download openai-whisper==20250625` failed (No matching distribution)")
    monkeypatch.setattr(tokenizer, "pip_download_sdist", offline)
    with pytest.raises(RuntimeError, match=rf"No matching distribution\)\. HINT: .* into {re.escape(str(other))}/"):
        tokenizer.fetch_gpt2_ranks(other)
    assert not other.exists()


def test_pip_download_sdist_command_and_failures(tmp_path, monkeypatch):
    commands: list[list[str]] = []

    def pip_that_works(cmd, **kwargs):
        commands.append(cmd)
        (Path(cmd[cmd.index("-d") + 1]) / "openai_whisper-20250625.tar.gz").write_bytes(b"sdist")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(tokenizer.subprocess, "run", pip_that_works)
    assert tokenizer.pip_download_sdist(tmp_path, 5.0) == tmp_path / "openai_whisper-20250625.tar.gz"
    (cmd,) = commands
    assert cmd[1:4] == ["-m", "pip", "download"] and tokenizer.WHISPER_REQUIREMENT in cmd
    assert "--no-deps" in cmd and cmd[cmd.index("--no-binary") + 1] == "openai-whisper"

    def pip_that_fails(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes\nERROR: No matching distribution\n")
    monkeypatch.setattr(tokenizer.subprocess, "run", pip_that_fails)
    with pytest.raises(RuntimeError, match=r"pip download .* failed \(ERROR: No matching distribution\)"):
        tokenizer.pip_download_sdist(tmp_path / "empty", 5.0)

    def pip_that_hangs(cmd, timeout, **kwargs):
        raise subprocess.TimeoutExpired(cmd, timeout)
    monkeypatch.setattr(tokenizer.subprocess, "run", pip_that_hangs)
    with pytest.raises(RuntimeError, match=r"failed \(timed out after 5s\)"):
        tokenizer.pip_download_sdist(tmp_path, 5.0)


# ---- embedded corpus ----

def make_source(root: Path) -> list[str]:
    """A synthetic stdlib-like folder; returns the relative paths the builder must keep, sorted."""
    kept = [f"mod_{i:02d}.py" for i in range(7)] + ["pkg/__init__.py", "pkg/sub/deep.py", "z_last.py"]
    excluded = ["test/test_x.py", "tests/t.py", "pkg/tests/t2.py", "idlelib/idle_test/t3.py",
                "site-packages/foo.py", "pkg/__pycache__/cached.py"]
    for rel in kept + excluded:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        body = f"# file {rel}\ndef f_{len(rel)}(x):\n    return 'é' * x\n"
        if rel in excluded:
            body = "EXCLUDED_MARKER = 1\n"
        (root / rel).write_text(body, encoding="utf-8")
    (root / "notes.txt").write_text("not python")
    return sorted(kept)


def split_docs(tokens: np.ndarray) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == EOT).tolist()
    return [tokens[s:e] for s, e in zip(starts, starts[1:] + [len(tokens)])]


def test_build_corpus_documents_split_and_determinism(encoding, tmp_path):
    source = tmp_path / "src"
    kept = make_source(source)
    assert build_corpus.source_files(source) == kept
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    manifest = build_corpus.build_corpus(source, out_a, val_every=4, log=lambda _: None, encoding=encoding)
    build_corpus.build_corpus(source, out_b, val_every=4, log=lambda _: None, encoding=encoding)
    for name in ("train_000000.bin", "val_000000.bin"):
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes()
    train = shards.read_shard(out_a / "train_000000.bin", vocab_size=50257)
    val = shards.read_shard(out_a / "val_000000.bin", vocab_size=50257)
    assert train[0] == EOT and val[0] == EOT
    val_docs, train_docs = split_docs(val), split_docs(train)
    expected_val = [rel for i, rel in enumerate(kept) if i % 4 == 0]
    assert [encoding.decode(d[1:].tolist()).splitlines()[0] for d in val_docs] == [f"# file {r}" for r in expected_val]
    assert len(val_docs) + len(train_docs) == len(kept) == manifest["documents"] == manifest["file_count"]
    assert "EXCLUDED_MARKER" not in encoding.decode(train.tolist()) + encoding.decode(val.tolist())
    assert manifest["train_tokens"] == len(train) and manifest["val_tokens"] == len(val)
    assert json.loads((out_a / "manifest.json").read_text()) == manifest


def test_build_corpus_is_cached_and_rebuilds_when_stale(encoding, tmp_path):
    source, out = tmp_path / "src", tmp_path / "out"
    make_source(source)
    messages: list[str] = []
    build_corpus.build_corpus(source, out, val_every=3, log=messages.append, encoding=encoding)
    shard = out / "train_000000.bin"
    first_bytes, first_mtime = shard.read_bytes(), shard.stat().st_mtime_ns
    messages.clear()
    build_corpus.build_corpus(source, out, val_every=3, log=messages.append, encoding=encoding)
    assert "nothing to do" in messages[-1] and shard.stat().st_mtime_ns == first_mtime
    shard.write_bytes(first_bytes[:-2])  # truncated shard: rebuild
    messages.clear()
    build_corpus.build_corpus(source, out, val_every=3, log=messages.append, encoding=encoding)
    assert "nothing to do" not in messages[-1] and shard.read_bytes() == first_bytes
    (source / "new_file.py").write_text("x = 1\n")  # file count changed: rebuild
    messages.clear()
    manifest = build_corpus.build_corpus(source, out, val_every=3, log=messages.append, encoding=encoding)
    assert "nothing to do" not in messages[-1] and manifest["file_count"] == 11


def test_build_corpus_max_tokens_and_multiple_shards(encoding, tmp_path):
    source, out = tmp_path / "src", tmp_path / "out"
    make_source(source)
    manifest = build_corpus.build_corpus(source, out, max_tokens=100, val_every=3, shard_tokens=16,
                                         log=lambda _: None, encoding=encoding)
    assert manifest["train_tokens"] + manifest["val_tokens"] == 100
    train_names = sorted(p.name for p in out.glob("train_*.bin"))
    assert len(train_names) == -(-manifest["train_tokens"] // 16) >= 2
    assert sum(shards.shard_token_count(out / n) for n in manifest["shards"]) == 100
    build_corpus.build_corpus(source, out, max_tokens=100, val_every=3, log=lambda _: None, encoding=encoding)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]  # stale ones gone


def test_build_corpus_cli(encoding, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build_corpus, "_load_encoding", lambda log, offline=False: encoding)
    source, out = tmp_path / "src", tmp_path / "out"
    make_source(source)
    args = ["--source", str(source), "--out", str(out), "--max-tokens", "120", "--val-every", "3"]
    assert build_corpus.main(args) == 0
    first = capsys.readouterr().out
    assert "building embedded corpus" in first and "wrote" in first
    assert build_corpus.main(args) == 0 and "nothing to do" in capsys.readouterr().out
    assert build_corpus.main(["--source", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "is not a folder" in capsys.readouterr().err
    usage = run_script("build_corpus.py", "--help")  # the script's own imports, as a user runs it
    assert usage.returncode == 0 and "--max-tokens" in usage.stdout


def test_build_corpus_fetches_tokenizer_when_missing(encoding, tmp_path, monkeypatch):
    attempts, fetches = [], []

    def gpt2_encoding(allow_download=True):
        attempts.append(allow_download)
        if not fetches:
            raise RuntimeError("GPT-2 tokenizer unavailable. HINT: fetch it")
        return encoding
    monkeypatch.setattr(build_corpus, "gpt2_encoding", gpt2_encoding)
    monkeypatch.setattr(build_corpus, "fetch_gpt2_ranks", lambda: fetches.append(1) or tmp_path / "gpt2.tiktoken")
    source = tmp_path / "src"
    make_source(source)
    messages: list[str] = []
    build_corpus.build_corpus(source, tmp_path / "out", log=messages.append)
    assert fetches == [1] and attempts == [True, False]
    assert any("fetching its ranks file via pip" in m for m in messages)


def test_build_corpus_offline_never_fetches_and_stops_at_once(tmp_path, monkeypatch, capsys):
    """--offline (./run.sh smoke on a GPU machine): a tokenizer already on disk or an error at once, exit 1; never
    a download, never pip."""
    attempts = []

    def gpt2_encoding(allow_download=True):
        attempts.append(allow_download)
        raise RuntimeError("GPT-2 tokenizer unavailable: no file. HINT: fetch it")
    monkeypatch.setattr(build_corpus, "gpt2_encoding", gpt2_encoding)
    monkeypatch.setattr(build_corpus, "fetch_gpt2_ranks", lambda: pytest.fail("--offline fetched the ranks file"))
    source = tmp_path / "src"
    make_source(source)
    assert build_corpus.main(["--source", str(source), "--out", str(tmp_path / "out"), "--offline"]) == 1
    assert attempts == [False] and "GPT-2 tokenizer unavailable" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_stdlib_file_list_leaves_out_tests():
    files = build_corpus.source_files(build_corpus.stdlib_dir())
    assert "os.py" in files and "json/decoder.py" in files
    excluded = set(build_corpus.EXCLUDED_DIRS)
    assert not [f for f in files if excluded & set(f.split("/")[:-1])]


# ---- FineWeb downloader ----

@pytest.fixture()
def fake_hub(tmp_path) -> Path:
    hub = tmp_path / "hub"
    for i, name in enumerate(cached_fineweb10B.shard_names(3)):
        shards.write_shard(hub / name, np.arange(100 + i) % 50257)
    return hub


def hub_stand_in(hub: Path, calls: list[str]):
    """Mimics hf_hub_download(local_dir=...): copies hub/filename to local_dir/filename and returns the path."""
    def download(filename: str, local_dir: Path) -> Path:
        calls.append(filename)
        target = Path(local_dir) / filename
        target.write_bytes((hub / filename).read_bytes())
        return target
    return download


def test_downloader_fetches_missing_skips_complete_refetches_truncated(fake_hub, tmp_path):
    local, calls = tmp_path / "fineweb10B", []
    download = hub_stand_in(fake_hub, calls)
    log: list[str] = []
    paths = cached_fineweb10B.download_shards(2, local, download, log=log.append)
    assert [p.name for p in paths] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                       "fineweb_train_000002.bin"]
    assert calls == [p.name for p in paths]
    calls.clear()
    cached_fineweb10B.download_shards(2, local, download, log=log.append)
    assert calls == [] and "3 shard(s) ready (0 fetched" in log[-1]
    truncated = local / "fineweb_train_000001.bin"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    cached_fineweb10B.download_shards(3, local, download, log=log.append)
    assert calls == ["fineweb_train_000001.bin", "fineweb_train_000003.bin"]
    assert truncated.read_bytes() == (fake_hub / truncated.name).read_bytes()


def test_downloader_offline_message_no_traceback(tmp_path, capsys):
    def offline(filename: str, local_dir: Path) -> Path:
        raise cached_fineweb10B.HubUnreachable("cannot connect to huggingface.co:443")
    assert cached_fineweb10B.main(["2", "--dir", str(tmp_path)], download_fn=offline) == 1
    err = capsys.readouterr().err
    assert "network is unreachable" in err and "copy the files by hand into" in err and "Traceback" not in err


def test_downloader_bad_download_is_reported(fake_hub, tmp_path, capsys):
    def broken(filename: str, local_dir: Path) -> Path:
        (Path(local_dir) / filename).write_bytes((fake_hub / filename).read_bytes()[:-4])
        return Path(local_dir) / filename
    assert cached_fineweb10B.main(["0", "--dir", str(tmp_path)], download_fn=broken) == 1
    assert "truncated" in capsys.readouterr().err


def test_downloader_cli_mirror_and_offline(fake_hub, tmp_path):
    local = tmp_path / "local"
    ok = run_script("cached_fineweb10B.py", "3", "--dir", str(local), "--mirror", str(fake_hub))
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in local.glob("*.bin")) == sorted(cached_fineweb10B.shard_names(3))
    # a closed local port stands in for "no network"; proxies would skip the reachability probe
    no_proxy = {key: "" for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                     "all_proxy")}
    offline = run_script("cached_fineweb10B.py", "1", "--dir", str(tmp_path / "empty"),
                         env_update={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), **no_proxy})
    assert offline.returncode == 1
    assert "network is unreachable" in offline.stderr and "Traceback" not in offline.stderr
    bad_n = run_script("cached_fineweb10B.py", "500", "--dir", str(local))
    assert bad_n.returncode == 2 and "expected 0..103" in bad_n.stderr


def test_build_corpus_bytes_are_utf8_documents_led_by_256(tmp_path):
    source = tmp_path / "src"
    kept = make_source(source)
    out = tmp_path / "bytes"
    manifest = build_corpus.build_corpus(source, out, val_every=4, log=lambda _: None,
                                         encoding=build_corpus.ByteEncoding())
    assert manifest["tokenizer"] == "bytes"
    tokens = {split: shards.read_shard(out / f"{split}_000000.bin", vocab_size=257) for split in ("train", "val")}
    docs = []
    for split, t in tokens.items():
        starts = np.flatnonzero(t == 256).tolist()
        assert starts[0] == 0 and t.max() == 256  # every document led by 256, the rest bytes
        docs += [bytes(t[s + 1:e].astype(np.uint8)).decode("utf-8") for s, e in zip(starts, starts[1:] + [len(t)])]
    assert sorted(doc.splitlines()[0] for doc in docs) == sorted(f"# file {rel}" for rel in kept)
    assert all("é" in doc for doc in docs)  # two UTF-8 bytes, decoded back
    # the GPT-2 build of the same source into the same folder is not taken for this one, and back
    rebuilt = []
    build_corpus.build_corpus(source, out, val_every=4, log=rebuilt.append, encoding=build_corpus.ByteEncoding())
    assert "nothing to do" in rebuilt[-1]
