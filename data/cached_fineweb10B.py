"""Download GPT-2-tokenized FineWeb10B shards from the Hugging Face hub into data/fineweb10B/.

    python data/cached_fineweb10B.py          # val shard + the first 9 train shards (~900M tokens, ~2 GB)
    python data/cached_fineweb10B.py 103      # all of FineWeb10B (103 train shards, ~20 GB)
    python data/cached_fineweb10B.py 0        # the val shard only
    python data/cached_fineweb10B.py 9 --mirror /shared/fineweb10B   # copy from a local folder instead of the hub

Files: fineweb_val_000000.bin and fineweb_train_000001.bin ... fineweb_train_{N:06d}.bin from the dataset repo
kjj0/fineweb10B-gpt2 (llm.c's GPT-2 tokenization of FineWeb sample-10BT, <|endoftext|> before each document;
~100M tokens a shard, in the format of data/shards.py). A file already there is kept when its header and size
say it is complete; a truncated or corrupt one is fetched again. N counts train shards exactly (the upstream
modded-nanogpt script counts chunks and defaults to the whole set). The default 9 covers a speedrun (~0.57B
training tokens for record #48) with room to spare.

Without network this prints what to do (copy the shards into data/fineweb10B/ by hand) and exits 1.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from shards import shard_token_count

REPO_ID = "kjj0/fineweb10B-gpt2"
REPO_TYPE = "dataset"
TRAIN_SHARDS_AVAILABLE = 103
DEFAULT_TRAIN_SHARDS = 9
DEFAULT_DIR = Path(__file__).resolve().parent / "fineweb10B"
VAL_NAME = "fineweb_val_000000.bin"

DownloadFn = Callable[[str, Path], "str | os.PathLike"]


class HubUnreachable(ConnectionError):
    """The hub (or the mirror) cannot be reached; the message says why."""


def shard_names(num_train_shards: int) -> list[str]:
    return [VAL_NAME] + [f"fineweb_train_{index:06d}.bin" for index in range(1, num_train_shards + 1)]


def _check_hub_reachable(timeout_s: float = 5.0) -> None:
    """Fail fast offline: huggingface_hub retries for ~25 s a file before giving up."""
    from huggingface_hub import constants

    if urllib.request.getproxies():
        return  # a direct connection says nothing when traffic goes through a proxy
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise HubUnreachable(f"cannot connect to {endpoint.hostname}:{port} ({e})") from None


def hub_download(filename: str, local_dir: Path) -> Path:
    """Download one file of the dataset repo into local_dir with huggingface_hub (its own progress bar)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    _check_hub_reachable()
    try:
        return Path(hf_hub_download(repo_id=REPO_ID, filename=filename, repo_type=REPO_TYPE, local_dir=local_dir))
    except LocalEntryNotFoundError as e:  # what huggingface_hub raises when the connection fails
        raise HubUnreachable(str(e)) from None


def mirror_download(mirror_dir: str | os.PathLike) -> DownloadFn:
    """A download function that copies from a local folder laid out like the hub repo (flat .bin files)."""
    mirror_dir = Path(mirror_dir)

    def copy(filename: str, local_dir: Path) -> Path:
        source = mirror_dir / filename
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist")
        target = local_dir / filename
        tmp_target = target.with_name(f".{filename}.{os.getpid()}.tmp")
        shutil.copyfile(source, tmp_target)
        os.replace(tmp_target, target)
        return target

    return copy


def download_shards(num_train_shards: int = DEFAULT_TRAIN_SHARDS, local_dir: str | os.PathLike = DEFAULT_DIR,
                    download_fn: DownloadFn = hub_download,
                    log: Callable[[str], None] = functools.partial(print, flush=True)) -> list[Path]:
    """Make local_dir hold the val shard and the first num_train_shards train shards, each complete."""
    if not 0 <= num_train_shards <= TRAIN_SHARDS_AVAILABLE:
        raise ValueError(f"num_train_shards={num_train_shards}: expected 0..{TRAIN_SHARDS_AVAILABLE}")
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    names = shard_names(num_train_shards)
    paths, fetched = [], 0
    for position, name in enumerate(names, start=1):
        path = local_dir / name
        prefix = f"[{position}/{len(names)}] {name}:"
        if path.exists():
            try:
                log(f"{prefix} already complete ({shard_token_count(path):,} tokens), skipping")
                paths.append(path)
                continue
            except ValueError as e:
                log(f"{prefix} incomplete, fetching again ({e})")
                path.unlink()
        log(f"{prefix} downloading")
        downloaded = Path(download_fn(name, local_dir))
        if downloaded.resolve() != path.resolve():
            shutil.move(downloaded, path)
        log(f"{prefix} done ({shard_token_count(path):,} tokens)")
        paths.append(path)
        fetched += 1
    log(f"{local_dir}: {len(paths)} shard(s) ready ({fetched} fetched, {len(paths) - fetched} already there)")
    return paths


def main(argv: list[str] | None = None, download_fn: DownloadFn | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Download FineWeb10B GPT-2 token shards from the hub dataset "
                                                 f"{REPO_ID} (val shard + the first N train shards).")
    parser.add_argument("num_train_shards", nargs="?", type=int, default=DEFAULT_TRAIN_SHARDS,
                        help=f"train shards to fetch, 0..{TRAIN_SHARDS_AVAILABLE} (default: %(default)s)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the shards go (default: %(default)s)")
    parser.add_argument("--mirror", type=Path, default=None,
                        help="copy the shards from this local folder instead of downloading them")
    args = parser.parse_args(argv)
    if not 0 <= args.num_train_shards <= TRAIN_SHARDS_AVAILABLE:
        parser.error(f"num_train_shards={args.num_train_shards}: expected 0..{TRAIN_SHARDS_AVAILABLE}")
    if download_fn is None:
        download_fn = mirror_download(args.mirror) if args.mirror else hub_download
    source = f"mirror {args.mirror}" if args.mirror else f"hub dataset {REPO_ID}"
    names = shard_names(args.num_train_shards)
    listed = ", ".join(names) if len(names) <= 3 else f"{names[0]}, {names[1]} ... {names[-1]}"
    hint = (f"HINT: on a machine with network run `python data/cached_fineweb10B.py {args.num_train_shards}` and "
            f"copy the files by hand into {args.dir}/ ({listed}), or pass --mirror DIR; the CPU preset needs no "
            f"FineWeb (it trains on the embedded corpus of `python data/build_corpus.py`)")
    try:
        download_shards(args.num_train_shards, args.dir, download_fn)
    except ConnectionError as e:
        print(f"error: the network is unreachable, cannot fetch from the {source}: {e}\n{hint}", file=sys.stderr)
        return 1
    except Exception as e:  # a CLI: one clear line instead of a traceback
        print(f"error: fetching from {source} failed: {type(e).__name__}: {e}\n{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
