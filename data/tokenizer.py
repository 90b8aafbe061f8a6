"""GPT-2 BPE tokenizer (tiktoken) that also works offline.

    from tokenizer import gpt2_encoding          # with data/ on sys.path, as the data scripts have it
    enc = gpt2_encoding()                         # enc.encode("Hello world") == [15496, 995]

    python data/tokenizer.py                      # load the encoding and check "Hello world" -> [15496, 995]
    python data/tokenizer.py --fetch              # pip-download the openai-whisper sdist, cache its gpt2.tiktoken

Where the encoding comes from, first match wins:
  1. tiktoken's own cache already holds GPT-2's files -> tiktoken.get_encoding("gpt2").
  2. The BPE ranks file data/cache/gpt2.tiktoken (or an openai-whisper sdist tarball in data/cache/) -> the same
     encoding built locally. data/cache/ is git-ignored; `--fetch` fills it through pip (only PyPI is needed).
  3. tiktoken's download host answers within a few seconds -> tiktoken.get_encoding("gpt2") (downloads).
  4. Otherwise a RuntimeError that says how to get the file.
The ranks file is the one openai-whisper ships as whisper/assets/gpt2.tiktoken (50256 base64 token/rank lines);
with GPT-2's split pattern and <|endoftext|> = 50256 it gives tiktoken's "gpt2" encoding exactly. Its SHA-256 is
checked, so a corrupt file is an error rather than a silently different tokenizer.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import tiktoken

CACHE_DIR = Path(__file__).resolve().parent / "cache"
RANKS_FILENAME = "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_REQUIREMENT = "openai-whisper==20250625"
WHISPER_SDIST_URL = "https://files.pythonhosted.org/packages/source/o/openai-whisper/openai_whisper-20250625.tar.gz"
RANKS_MEMBER_SUFFIX = "whisper/assets/gpt2.tiktoken"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
# GPT-2's pre-tokenizer regex, as tiktoken's r50k/gpt2 definition spells it (a test holds the two equal).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
TIKTOKEN_GPT2_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                      "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")
TIKTOKEN_HOST = "openaipublic.blob.core.windows.net"


def _tiktoken_cache_has_gpt2() -> bool:
    """True when tiktoken would load "gpt2" from its cache (mirrors tiktoken.load.read_file_cached's lookup)."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return all(os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))
               for url in TIKTOKEN_GPT2_URLS)


def _host_reachable(host: str, timeout_s: float = 3.0) -> bool:
    # tiktoken's download has no timeout, so a firewall that drops packets would hang it: probe first.
    if urllib.request.getproxies():
        return True  # a direct connection says nothing when traffic goes through a proxy
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def read_ranks_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of gpt2.tiktoken from the file itself or from an openai-whisper sdist tarball (.tar.gz)."""
    path = Path(path)
    if not path.name.endswith((".tar.gz", ".tgz")):
        return path.read_bytes()
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            if member.name.endswith(RANKS_MEMBER_SUFFIX) and member.isfile():
                return tar.extractfile(member).read()
    raise RuntimeError(f"{path}: no {RANKS_MEMBER_SUFFIX} inside; expected the {WHISPER_REQUIREMENT} sdist")


def parse_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """Check the SHA-256 of a gpt2.tiktoken file's bytes and parse its `base64-token rank` lines."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(f"{source}: SHA-256 {digest} is not the GPT-2 ranks file's {RANKS_SHA256}. "
                           f"HINT: delete it and run `python data/tokenizer.py --fetch`")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def encoding_from_ranks(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding built from its mergeable ranks (no download).

    No `explicit_n_vocab`: parse_ranks' SHA-256 already pins GPT-2's 50256 ranks (n_vocab = EOT_ID + 1 = 50257),
    and the check would refuse the tests' small synthetic ranks file (256 bytes and a few merges)."""
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT_TOKEN: EOT_ID})


def _local_ranks_source(cache_dir: Path) -> Path | None:
    ranks_file = cache_dir / RANKS_FILENAME
    if ranks_file.is_file():
        return ranks_file
    tarballs = sorted(cache_dir.glob("openai_whisper-*.tar.gz")) if cache_dir.is_dir() else []
    return tarballs[-1] if tarballs else None


def gpt2_encoding(cache_dir: str | os.PathLike = CACHE_DIR, allow_download: bool = True) -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding from tiktoken's cache, the local ranks file, or a download (see module docstring)."""
    cache_dir = Path(cache_dir)
    if _tiktoken_cache_has_gpt2():
        return tiktoken.get_encoding("gpt2")
    local = _local_ranks_source(cache_dir)
    if local is not None:
        return encoding_from_ranks(parse_ranks(read_ranks_bytes(local), str(local)))
    download_error = "download not attempted"
    if allow_download and _host_reachable(TIKTOKEN_HOST):
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # any failure here means "fall through to the instructions"
            download_error = f"{type(e).__name__}: {e}"
    elif allow_download:
        download_error = f"{TIKTOKEN_HOST} is unreachable"
    raise RuntimeError(
        f"GPT-2 tokenizer unavailable: tiktoken cannot download its files ({download_error}) and there is no "
        f"{cache_dir / RANKS_FILENAME}. HINT: run `python data/tokenizer.py --fetch` (pip-downloads the "
        f"{WHISPER_REQUIREMENT} sdist from PyPI and caches its {RANKS_MEMBER_SUFFIX}), or fetch {WHISPER_SDIST_URL} "
        f"by hand and put the tarball, or the {RANKS_FILENAME} inside it, into {cache_dir}/")


def pip_download_sdist(dest_dir: Path, timeout_s: float) -> Path:
    """pip-download the openai-whisper sdist into dest_dir and return the tarball; RuntimeError naming the command
    and pip's last line when that fails. fetch_gpt2_ranks' one contact with the network (tests replace it)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "openai-whisper",
           "--disable-pip-version-check", "--quiet", "-d", str(dest_dir), WHISPER_REQUIREMENT]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed (timed out after {timeout_s:.0f}s)") from None
    tarballs = sorted(dest_dir.glob("openai_whisper-*.tar.gz"))
    if result.returncode != 0 or not tarballs:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1] if result.returncode else "no tarball"
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed ({detail})")
    return tarballs[-1]


def fetch_gpt2_ranks(cache_dir: str | os.PathLike = CACHE_DIR, timeout_s: float = 600.0) -> Path:
    """pip-download the openai-whisper sdist, check and cache its gpt2.tiktoken as cache_dir/gpt2.tiktoken."""
    cache_dir = Path(cache_dir)
    target = cache_dir / RANKS_FILENAME
    if target.is_file():
        parse_ranks(target.read_bytes(), str(target))
        return target
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tarball = pip_download_sdist(Path(tmp), timeout_s)
        except RuntimeError as e:
            raise RuntimeError(f"{e}. HINT: fetch {WHISPER_SDIST_URL} by hand and put it, or the {RANKS_FILENAME} "
                               f"inside it, into {cache_dir}/") from e
        data = read_ranks_bytes(tarball)
    parse_ranks(data, f"{tarball.name}:{RANKS_MEMBER_SUFFIX}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_target = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp_target.write_bytes(data)
    os.replace(tmp_target, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check (or first fetch) the GPT-2 tokenizer used by the data scripts.")
    parser.add_argument("--fetch", action="store_true",
                        help=f"pip-download {WHISPER_REQUIREMENT} and cache its {RANKS_FILENAME} in --cache-dir")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR,
                        help="where the ranks file lives (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.fetch:
            print(f"cached GPT-2 ranks at {fetch_gpt2_ranks(args.cache_dir)}")
        enc = gpt2_encoding(args.cache_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tokens = enc.encode("Hello world")
    print(f"GPT-2 encoding ok: n_vocab {enc.n_vocab}, 'Hello world' -> {tokens}")
    return 0 if tokens == [15496, 995] and enc.n_vocab == VOCAB_SIZE else 1


if __name__ == "__main__":
    sys.exit(main())
