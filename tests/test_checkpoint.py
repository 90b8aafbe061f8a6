"""Checkpoints (SAVE_CHECKPOINT / RESUME with torch.distributed.checkpoint), multi-node launch, faults, determinism.

Every run is a `test`-preset subprocess on synthetic shards. A resumed run is compared with an uninterrupted one
bit for bit: the loss lines after the resume point, and every tensor of the two runs' final checkpoints (model,
optimizer shards, schedule, loader, Momo, RNG)."""

import collections
import concurrent.futures
import dataclasses
import enum
import io
import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_filesystem, metadata as dcp_metadata

import train_gpt as T
from conftest import preset_env, synthetic_tokens, write_shards, write_test_shard
from test_train import run_side_by_side

REPO = Path(T.__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STANDALONE_2 = TORCHRUN + ["--standalone", "--nproc_per_node=2"]
LOSS_LINE = re.compile(r"^step:\d+/\d+ (?:val|train)_loss:\S+")


def run(cmd, env, timeout=300, ok=True):
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def only_log(folder: Path) -> Path:
    (log,) = folder.glob("*.txt")
    return log


def loss_lines(log: Path, from_step: int | None = None) -> list[str]:
    """`step:i/N train_loss:x` / `val_loss:x` prefixes (no times); with from_step, from that step's validation on
    (where a resumed run starts)."""
    found = [LOSS_LINE.match(line)[0] for line in log.read_text().splitlines() if LOSS_LINE.match(line)]
    if from_step is None:
        return found
    start = next(i for i, line in enumerate(found) if line.startswith(f"step:{from_step}/") and "val_loss" in line)
    return found[start:]


def final(log: Path) -> dict:
    return json.loads(log.read_text().splitlines()[-1].removeprefix("final: "))


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, all ranks' keys, read the way RESUME reads them (safe metadata)."""
    metadata = T.read_checkpoint_metadata(path)
    target = {key: torch.empty(item.size, dtype=item.properties.dtype)
              for key, item in metadata.state_dict_metadata.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=T.safe_reader(path), no_dist=True)
    return target


def assert_same_checkpoint(a: Path, b: Path) -> None:
    one, two = read_checkpoint(a), read_checkpoint(b)
    assert set(one) == set(two)
    differ = [k for k in one if k != "progress/train_ms" and not torch.equal(one[k], two[k])]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:5]}"


def ckpt_env(run_env, tmp_path, name, **extra):
    return {**run_env, "LOG_DIR": str(tmp_path / name), **{k: str(v) for k, v in extra.items()}}


RESUME_CASES = {
    # Adam stepping every 2nd step on accumulated gradients, a batch and window change (YaRN) before the
    # checkpoint, the EMA-blend norm's running scales; and the diag lines' power-iteration state
    "normuon_derf_ema": dict(ADAM_STEP_EVERY=2, NORM="derf_ema", BATCH_SCHEDULE="128,256", LONG_WINDOWS="1,2",
                             DIAGNOSTICS=1, DIAG_EVERY=2),
    # MuonMax's momentum buffers and Momo's averages and directions
    "muonmax_momo": dict(OPTIMIZER="muonmax", MOMO=1),
    "adamw": dict(OPTIMIZER="adamw"),
}


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory) -> dict[str, Path]:
    """For every RESUME_CASES case, in its own folder: full/, an uninterrupted 10-step run with checkpoints at 6
    and 10, and resumed/ (its checkpoints in resumed_ckpt/), the run resumed from full's step 6. The three full runs
    side by side, then the three resumed ones."""
    root = tmp_path_factory.mktemp("resume_runs")
    env = preset_env(write_shards(root), root / "logs")
    settings = {case: dict(NUM_ITERATIONS=10, CHECKPOINT_EVERY=6, VAL_EVERY=3, SAVE_CHECKPOINT=1, **extra)
                for case, extra in RESUME_CASES.items()}
    run_side_by_side({case: ckpt_env(env, root / case, "full", **settings[case]) for case in RESUME_CASES})
    run_side_by_side({case: ckpt_env(env, root / case, "resumed", CHECKPOINT_DIR=root / case / "resumed_ckpt",
                                     RESUME=root / case / "full" / only_log(root / case / "full").stem / "step_000006",
                                     **settings[case]) for case in RESUME_CASES})
    return {case: root / case for case in RESUME_CASES}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_equals_uninterrupted_run_bit_for_bit(resume_runs, case):
    runs, settings = resume_runs[case], RESUME_CASES[case]
    full_log = only_log(runs / "full")
    folder = runs / "full" / full_log.stem
    assert sorted(p.name for p in folder.iterdir()) == ["step_000006", "step_000010"]
    resumed_log = only_log(runs / "resumed")
    text = resumed_log.read_text()
    resumed = json.loads(next(l for l in text.splitlines() if l.startswith("resumed: ")).removeprefix("resumed: "))
    assert resumed["from_log"] == full_log.stem and resumed["step"] == 6
    assert loss_lines(resumed_log) == loss_lines(full_log, from_step=6)  # step 6's validation is repeated
    assert len(loss_lines(resumed_log)) >= 5
    assert final(resumed_log)["val_loss"] == final(full_log)["val_loss"]
    assert final(resumed_log)["tokens"] == final(full_log)["tokens"]
    if "DIAGNOSTICS" in settings:  # spectral norms (warm-started power iteration) and update RMS: equal too
        diags = lambda log: [l for l in log.read_text().splitlines() if l.startswith("diag: ")]
        after = [l for l in diags(full_log) if json.loads(l[6:])["step"] >= 6]
        assert diags(resumed_log) == after and len(after) == 4
    assert_same_checkpoint(folder / "step_000010", runs / "resumed_ckpt" / "step_000010")


@pytest.mark.slow
def test_resume_at_world2_equals_uninterrupted_run(run_env, tmp_path):
    """Each rank writes and reads its own optimizer shards (rank0/, rank1/ keys in two files)."""
    settings = dict(NUM_ITERATIONS=8, CHECKPOINT_EVERY=4, SAVE_CHECKPOINT=1, ADAM_STEP_EVERY=2)
    run(STANDALONE_2 + ["train_gpt.py"], ckpt_env(run_env, tmp_path, "full", **settings))
    full_log = only_log(tmp_path / "full")
    step4 = tmp_path / "full" / full_log.stem / "step_000004"
    assert sorted(p.name for p in step4.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    keys = read_checkpoint(step4)
    assert any(k.startswith("rank0/optim") for k in keys) and any(k.startswith("rank1/optim") for k in keys)
    run(STANDALONE_2 + ["train_gpt.py"], ckpt_env(run_env, tmp_path, "resumed", RESUME=step4,
                                                  CHECKPOINT_DIR=tmp_path / "resumed_ckpt", **settings))
    assert loss_lines(only_log(tmp_path / "resumed")) == loss_lines(full_log, from_step=4)
    assert_same_checkpoint(step4.parent / "step_000008", tmp_path / "resumed_ckpt" / "step_000008")
    # another world size is refused before any work, naming both sizes
    refused = run([sys.executable, "train_gpt.py"], ckpt_env(run_env, tmp_path, "w1", RESUME=step4, **settings),
                  ok=False)
    assert refused.returncode == 2
    assert "written by 2 rank(s), this run has 1" in refused.stderr and "--nproc_per_node=2" in refused.stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_pair_counts_as_one_run(run_env, tmp_path):
    settings = dict(NUM_ITERATIONS=40, SAVE_CHECKPOINT=1, CHECKPOINT_KEEP=1, CHECKPOINT_EVERY=10)
    env = ckpt_env(run_env, tmp_path, "logs", **settings)
    # the uninterrupted run to compare with, side by side with the signalled one (one core each)
    plain_env = ckpt_env(run_env, tmp_path, "plain", NUM_ITERATIONS=40)
    plain = subprocess.Popen([sys.executable, "train_gpt.py"], env=plain_env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    process = subprocess.Popen([sys.executable, "train_gpt.py"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("step:13/40 train_loss"):
            process.send_signal(signal.SIGTERM)
            break
    process.stdout.read()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    first = only_log(tmp_path / "logs")
    lines = first.read_text().splitlines()
    stopped = json.loads(lines[-1].removeprefix("stopped: "))
    assert "SIGTERM" in stopped["reason"]
    saved = [json.loads(l.removeprefix("checkpoint: ")) for l in lines if l.startswith("checkpoint: ")]
    assert [c["step"] for c in saved] == [10, stopped["step"]]  # every 10, and where the signal stopped it
    assert saved[-1]["pruned"] == ["step_000010"]  # CHECKPOINT_KEEP=1
    folder = tmp_path / "logs" / first.stem
    run([sys.executable, "train_gpt.py"], {**env, "RESUME": str(folder)})  # the folder: its newest checkpoint
    second = [log for log in (tmp_path / "logs").glob("*.txt") if log != first][0]
    assert sorted(p.name for p in folder.iterdir()) == ["step_000040"]  # continued in the same folder
    assert plain.wait(timeout=300) == 0, plain.stderr.read()[-3000:]
    assert final(second)["val_loss"] == final(only_log(tmp_path / "plain"))["val_loss"]
    report = run([sys.executable, "records/validate.py", "--json", "--target", "20", str(tmp_path / "logs")],
                 env, ok=False)
    assert report.returncode in (0, 1, 2)
    runs = json.loads(report.stdout)["groups"][0]["runs"] if report.stdout else []
    # one run from the pair (a t-test needs two, so validate.py says so rather than testing one)
    assert report.returncode == 2 and "1 usable run(s)" in report.stderr, report.stderr
    assert f"{first.name} continues in {second.name}" in report.stderr
    assert runs == []


@pytest.mark.slow
def test_refusals_name_the_input(small_checkpoint, tmp_path):
    env, step2 = small_checkpoint  # a 2-step run's checkpoint (NUM_ITERATIONS=2, MODEL_DIM=32)
    cut = tmp_path / "cut" / "step_000002"
    cut.mkdir(parents=True)
    # a shard file of the right size with damaged bytes passes the check before work; torch.distributed.checkpoint's
    # error at load (a BaseException) still ends in a clear exit 2 (a truncated file is refused earlier: see below)
    damaged = tmp_path / "damaged" / "step_000002"
    shutil.copytree(step2, damaged)
    size = (damaged / "__0_0.distcp").stat().st_size
    (damaged / "__0_0.distcp").write_bytes(bytes(size // 2) + (damaged / "__0_0.distcp").read_bytes()[size // 2:])
    train = [sys.executable, "train_gpt.py"]
    logs = lambda name, **extra: {**env, "LOG_DIR": str(tmp_path / name), **{k: str(v) for k, v in extra.items()}}
    results = run_many({  # side by side: each is mostly the start of a process
        "differ": (train, logs("a", RESUME=step2, NUM_ITERATIONS=6, MODEL_DIM=64, NUM_HEADS=2)),
        "missing": (train, logs("b", RESUME=tmp_path / "nowhere")),
        "partial folder": (train, logs("c", RESUME=cut.parent)),
        "partial step": (train, logs("c2", RESUME=cut)),
        "broken": (train, logs("e", RESUME=damaged, SAVE_CHECKPOINT=1)),
        "uneven": (train + ["--check"], logs("d", SAVE_CHECKPOINT=1, CHECKPOINT_EVERY=3, ADAM_STEP_EVERY=2)),
    })
    assert all(result.returncode == 2 for result in results.values()), {k: r.stderr[-500:] for k, r in results.items()}
    differ = results["differ"].stderr
    assert "NUM_ITERATIONS=2 in the checkpoint, 6 now" in differ and "MODEL_DIM=32" in differ
    assert "NUM_HEADS" in differ and "LOG_DIR" in differ  # and what may change
    assert f"RESUME={tmp_path / 'nowhere'}: not a checkpoint" in results["missing"].stderr
    assert "no complete checkpoint" in results["partial folder"].stderr
    assert "an incomplete checkpoint" in results["partial step"].stderr
    assert f"RESUME={damaged}: cannot load" in results["broken"].stderr
    assert only_log(tmp_path / "e").read_text().splitlines()[-1].startswith('stopped: {"reason": "resume failed')
    assert "CHECKPOINT_EVERY=3: expected a multiple of ADAM_STEP_EVERY=2" in results["uneven"].stderr
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").glob("*.txt"))  # refused before any log


def run_many(jobs: dict[str, tuple[list, dict]], timeout=300) -> dict[str, subprocess.CompletedProcess]:
    """Every {name: (command, env)} at once, in the repo; waits for all."""
    started = {name: subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, (cmd, env) in jobs.items()}
    results = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=timeout)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


def test_prune_keeps_the_newest_up_to_the_step_saved(tmp_path):
    hp, _ = T.parse_env({"PRESET": "test", "SAVE_CHECKPOINT": "1", "CHECKPOINT_KEEP": "2"}, False)
    for step in (2, 4, 6, 8):  # step 8: from a run that went further, then was resumed from step 4
        (tmp_path / f"step_{step:06d}").mkdir()
        (tmp_path / f"step_{step:06d}" / T.CHECKPOINT_META).write_text("{}")
    (tmp_path / "step_000010").mkdir()  # cut off while saving: not a checkpoint
    removed = T.Checkpointer(hp, tmp_path, 4).prune(6)
    assert [p.name for p in removed] == ["step_000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004", "step_000006", "step_000008", "step_000010"]
    assert [p.name for p in T.checkpoint_steps(tmp_path)] == ["step_000004", "step_000006", "step_000008"]


class _Payload:
    """Unpickling this runs `touch <marker>`: what a crafted .metadata could do with plain pickle.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_unpickles_arbitrary_objects(small_checkpoint, tmp_path):
    env, original = small_checkpoint
    step = copy_of(original, tmp_path)
    assert set(read_checkpoint(step)) >= {"progress/step", "model/embed.weight", "rank0/rng/cpu"}
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(pickle.UnpicklingError, match="posix.system is not part of a checkpoint's metadata"):
        T.read_checkpoint_metadata(step)
    # refused while the checkpoint's files are checked, before any work: exit 2, one line, no log
    result = run([sys.executable, "train_gpt.py"], {**env, "LOG_DIR": str(tmp_path / "r"), "RESUME": str(step)},
                 ok=False)
    assert_refused_before_any_work(result, tmp_path / "r", "is not part of a checkpoint's metadata", str(step))
    assert not marker.exists()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> tuple[dict, Path]:
    """One 2-step run with SAVE_CHECKPOINT=1, shared by the tests that only read or damage a copy of its
    checkpoint: (its run env, its step_000002 folder)."""
    root = tmp_path_factory.mktemp("small_checkpoint")
    data = root / "data"
    data.mkdir()
    for name, count, seed in (("train_000000.bin", 20000, 1), ("train_000001.bin", 20000, 2),
                              ("val_000000.bin", 8000, 3)):
        write_test_shard(data / name, synthetic_tokens(count, seed=seed))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PRESET="test", TRAIN_FILES=str(data / "train_*.bin"), VAL_FILES=str(data / "val_*.bin"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), NUM_ITERATIONS="2")
    run([sys.executable, "train_gpt.py"], {**env, "LOG_DIR": str(root / "full"), "SAVE_CHECKPOINT": "1"})
    return env, next((root / "full").glob("*/step_000002"))


def copy_of(step: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(step, tmp_path / "copy" / step.name))


def assert_refused_before_any_work(result, logs: Path, *fragments: str) -> None:
    """Exit 2, one line on stderr naming what is wrong, and no log (nothing trained, nothing written)."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not logs.exists() or not any(logs.glob("*.txt"))
    assert "step:" not in result.stdout


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_checkpoint_dir_stops_before_any_step(small_checkpoint, tmp_path, where):
    env, _ = small_checkpoint
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    folder = blocker / "ckpt" if where == "under_a_file" else Path("/proc/speedrun_ckpt")
    result = run([sys.executable, "train_gpt.py"], {**env, "LOG_DIR": str(tmp_path / "logs"), "SAVE_CHECKPOINT": "1",
                                                    "CHECKPOINT_DIR": str(folder)}, ok=False)
    assert_refused_before_any_work(result, tmp_path / "logs", f"CHECKPOINT_DIR={folder}", "writable folder")


def test_unwritable_default_checkpoint_folder_is_named(small_checkpoint, tmp_path, monkeypatch):
    """Without CHECKPOINT_DIR the folder is LOG_DIR/<run name>; the probe names it and points at LOG_DIR."""
    monkeypatch.setattr(T.Path, "mkdir", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    hp, _ = T.parse_env({**small_checkpoint[0], "LOG_DIR": str(tmp_path), "SAVE_CHECKPOINT": "1"}, False)
    folder = T.checkpoint_folder(hp, None, "the_run")
    assert folder == tmp_path / "the_run"
    with pytest.raises(T.ConfigError, match=r"checkpoint folder .*the_run \(PermissionError: denied\); point LOG_DIR"):
        T.probe_checkpoint_folder(folder, hp)


def test_resume_from_damaged_meta_json_stops_before_any_step(small_checkpoint, tmp_path):
    env, step = small_checkpoint
    copy = copy_of(step, tmp_path)
    (copy / T.CHECKPOINT_META).write_text('{"step": 2, "world_si')
    result = run([sys.executable, "train_gpt.py"], {**env, "LOG_DIR": str(tmp_path / "logs"), "RESUME": str(copy)},
                 ok=False)
    assert_refused_before_any_work(result, tmp_path / "logs", str(copy / T.CHECKPOINT_META), "JSONDecodeError",
                                   "point RESUME at another step folder")


def test_meta_json_without_its_keys_is_refused(small_checkpoint, tmp_path):
    copy = copy_of(small_checkpoint[1], tmp_path)
    (copy / T.CHECKPOINT_META).write_text('{"step": 2}')
    with pytest.raises(T.ConfigError, match="lacks world_size, config, log, train_shards"):
        T.read_checkpoint_meta(copy)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_resume_from_truncated_or_missing_shard_file_stops_before_any_step(small_checkpoint, tmp_path, damage):
    env, step = small_checkpoint
    copy = copy_of(step, tmp_path)
    (data_file,) = copy.glob("*.distcp")
    if damage == "truncated":
        data_file.write_bytes(data_file.read_bytes()[:data_file.stat().st_size // 2])
    else:
        data_file.unlink()
    result = run([sys.executable, "train_gpt.py"], {**env, "LOG_DIR": str(tmp_path / "logs"), "RESUME": str(copy)},
                 ok=False)
    assert_refused_before_any_work(result, tmp_path / "logs", str(data_file),
                                   "is truncated" if damage == "truncated" else "is missing")


def test_a_truncation_inside_the_last_item_of_a_shard_file_is_refused(small_checkpoint, tmp_path):
    """One byte short of the end of the index's last byte range in its file (not half the file): refused before
    any work; the file at its full length passes, so the check is at the exact end."""
    copy = copy_of(small_checkpoint[1], tmp_path)
    (data_file,) = copy.glob("*.distcp")
    items = [item for item in T.read_checkpoint_metadata(copy).storage_data.values()
             if item.relative_path == data_file.name]
    last = max(items, key=lambda item: item.offset)
    assert len(items) > 1 and last.length > 1  # a cut inside it leaves every other item whole
    end = last.offset + last.length
    data_file.write_bytes(data_file.read_bytes()[:end])
    T.check_checkpoint_files(copy)
    data_file.write_bytes(data_file.read_bytes()[:end - 1])
    with pytest.raises(T.ConfigError, match=f"is truncated \\({end - 1} bytes, the index reads up to {end}\\)"):
        T.check_checkpoint_files(copy)


def test_meta_json_that_is_not_utf8_is_refused_naming_it(small_checkpoint, tmp_path):
    copy = copy_of(small_checkpoint[1], tmp_path)
    (copy / T.CHECKPOINT_META).write_bytes(b'{"step": 2, "log": "\xff\xfe"}')
    with pytest.raises(T.ConfigError, match=r"meta.json cannot be read \(UnicodeDecodeError: .*another step folder"):
        T.read_checkpoint_meta(copy)


def test_a_checkpoint_dir_that_can_be_made_but_not_written_stops_the_run(small_checkpoint, tmp_path, monkeypatch):
    """Made, but its files cannot be written (a read-only mount; as root, chmod cannot make one): the probe's write
    fails and the run stops before training, naming CHECKPOINT_DIR. The write is refused here in-process, where
    the probe makes it, since root writes through any mode bits."""
    real_write = T.Path.write_bytes

    def read_only(path, data):
        if path.name.startswith(".probe"):
            raise OSError(30, "Read-only file system")  # EROFS
        return real_write(path, data)

    monkeypatch.setattr(T.Path, "write_bytes", read_only)
    folder = tmp_path / "made" / "ckpt"
    hp, _ = T.parse_env({**small_checkpoint[0], "LOG_DIR": str(tmp_path / "logs"), "SAVE_CHECKPOINT": "1",
                         "CHECKPOINT_DIR": str(folder)}, False)
    with pytest.raises(T.ConfigError, match=f"CHECKPOINT_DIR={folder} \\(OSError: Read-only file system\\); "
                                            "point CHECKPOINT_DIR at a writable folder"):
        T.probe_checkpoint_folder(T.checkpoint_folder(hp, None, "the_run"), hp)
    assert folder.is_dir() and not any(folder.iterdir())  # it was made; nothing was left in it


def test_a_resume_from_an_older_checkpoint_saves_into_a_folder_of_its_own(tmp_path):
    """RESUME at an older checkpoint of a folder branches off: its saves go to LOG_DIR/<its run name>, so the
    folder's newer checkpoints (another run's future) are neither overwritten nor pruned. At the folder's newest
    complete checkpoint (a newer step without meta.json is a cut-off save) the run continues in the folder;
    CHECKPOINT_DIR wins over both."""
    hp, _ = T.parse_env({"PRESET": "test", "LOG_DIR": str(tmp_path / "logs"), "SAVE_CHECKPOINT": "1"}, False)
    folder = tmp_path / "logs" / "first_run"
    for step in (2, 4, 6):
        (folder / f"step_{step:06d}").mkdir(parents=True)
        if step < 6:
            (folder / f"step_{step:06d}" / T.CHECKPOINT_META).write_text("{}")
    assert T.checkpoint_folder(hp, folder / "step_000002", "branch") == tmp_path / "logs" / "branch"
    assert T.checkpoint_folder(hp, folder / "step_000004", "continued") == folder
    assert T.checkpoint_folder(hp, None, "fresh") == tmp_path / "logs" / "fresh"
    chosen = dataclasses.replace(hp, checkpoint_dir=str(tmp_path / "elsewhere"))
    for resumed in (folder / "step_000002", folder / "step_000004", None):
        assert T.checkpoint_folder(chosen, resumed, "any") == tmp_path / "elsewhere"


# ---- multi-node launch ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SIX_STEPS = dict(NUM_ITERATIONS=6, VAL_EVERY=3, BATCH_CHUNKS=2)  # the runs the next tests compare


@pytest.fixture(scope="module")
def one_node_world2(tmp_path_factory) -> Path:
    """The log of a single-node world-2 run of SIX_STEPS, the reference of the two-node run and of world 1: one
    launch for both tests."""
    root = tmp_path_factory.mktemp("one_node_world2")
    run(STANDALONE_2 + ["train_gpt.py"], ckpt_env(preset_env(write_shards(root), root / "logs"), root, "single",
                                                  **SIX_STEPS))
    return only_log(root / "single")


@pytest.mark.slow
def test_two_nodes_over_c10d_equal_one_node_world2(run_env, tmp_path, one_node_world2):
    """Two torchrun agents (one process each) meet over the c10d rendezvous as two nodes would; the run writes
    one log (global rank 0) and its loss lines equal a single-node world-2 run's."""
    settings = SIX_STEPS
    port = free_port()
    node = TORCHRUN + ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                       f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two_nodes", "train_gpt.py"]
    env = ckpt_env(run_env, tmp_path, "nodes", **settings)
    started = time.perf_counter()
    nodes = [subprocess.Popen(node, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in nodes]
    print(f"two-node run: {time.perf_counter() - started:.1f} s")
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outputs]
    log = only_log(tmp_path / "nodes")  # one log: only global rank 0 writes
    config = json.loads(next(l for l in log.read_text().splitlines() if l.startswith("config: "))[8:])
    assert config["world_size"] == 2
    assert loss_lines(log) == loss_lines(one_node_world2)
    assert final(log)["val_loss"] == final(one_node_world2)["val_loss"]


# ---- faults ----

def worker_of_rank(agent: int, wanted: int) -> int:
    """The pid of the torchrun worker with RANK=wanted under the agent process `agent`."""
    for _ in range(600):
        for child in Path(f"/proc/{agent}/task").glob("*/children"):
            for pid in child.read_text().split():
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={wanted}".encode() in environ:
                    return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no RANK={wanted} worker under {agent}")


def start_long_world2(run_env, tmp_path, timeout_s: int) -> tuple[subprocess.Popen, int]:
    env = ckpt_env(run_env, tmp_path, "logs", NUM_ITERATIONS=100000, DIST_TIMEOUT=timeout_s, VAL_EVERY=0)
    agent = subprocess.Popen(STANDALONE_2 + ["train_gpt.py"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    for line in agent.stdout:
        if line.startswith("step:5/"):
            return agent, worker_of_rank(agent.pid, 1)
    raise AssertionError("the run ended before step 5: " + agent.stderr.read()[-2000:])


FAULT_TIMEOUT_S = 8  # DIST_TIMEOUT of the fault runs
# A job still running this long after the fault is hung. Quiet, a dead peer ends it in ~2 s and a silent one in ~40 s
# (the timeout, then torchrun's 30 s grace); a loaded CI machine has taken 53 s, so what tells the two faults apart
# is the cause rank 0 names, not a wall-clock bound.
JOB_DEADLINE_S = 240


def fault_run(root: Path, fault: str) -> dict:
    """A long world-2 run whose rank 1 is SIGKILLed ("killed") or SIGSTOPped ("hung") at step 5; waits for the job
    to end. Returns its return code, the seconds from the fault to the end, and its log folder."""
    agent, worker = start_long_world2(preset_env(write_shards(root), root / "logs"), root, FAULT_TIMEOUT_S)
    os.kill(worker, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    started = time.perf_counter()
    try:
        agent.communicate(timeout=JOB_DEADLINE_S)  # TimeoutExpired here fails the test: the job did not end
    finally:
        agent.kill()
    return {"returncode": agent.returncode, "elapsed": time.perf_counter() - started, "logs": root / "logs"}


@pytest.fixture(scope="module", autouse=True)
def fault_runs(request, tmp_path_factory):
    """Both fault runs, started in threads when this module's first test starts: they spend most of their ~50 s
    waiting (the timeout, then torchrun's 30 s grace), so the module's other tests run meanwhile. Yields
    {fault: a Future of fault_run's result}, or {} when the fault test is not selected."""
    if not any(item.name.startswith("test_a_dead_or_hung_rank") for item in request.session.items):
        yield {}
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield {fault: pool.submit(fault_run, tmp_path_factory.mktemp(f"fault_{fault}"), fault)
               for fault in ("killed", "hung")}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_rank_ends_the_job_in_bounded_time(fault_runs, fault):
    """A rank killed mid-run (SIGKILL) or hung (SIGSTOP): rank 0's next collective fails, at once for a dead peer
    (gloo: "Connection closed by peer") or after DIST_TIMEOUT for a silent one ("Application timeout"); its log
    ends with a `stopped:` line naming that cause, and torchrun ends the job by itself (SIGTERM, then SIGKILL
    after its 30 s grace for a stopped process)."""
    result = fault_runs[fault].result(timeout=JOB_DEADLINE_S + 300)
    elapsed = result["elapsed"]
    lines = only_log(result["logs"]).read_text().splitlines()
    print(f"{fault}: the job ended {elapsed:.1f} s after the fault; rank 0's last line: {lines[-1][:200]}")
    assert result["returncode"] != 0
    assert lines[-1].startswith("stopped: ") and "RuntimeError" in lines[-1]
    reason = json.loads(lines[-1].removeprefix("stopped: "))["reason"]
    # the cause, not the clock, tells the faults apart: only the silent peer is ended by the timeout
    assert ("timeout" in reason.lower()) == (fault == "hung"), reason
    if fault == "hung":
        assert elapsed > FAULT_TIMEOUT_S - 1  # rank 0 waited out DIST_TIMEOUT before giving up


# ---- determinism ----

@pytest.mark.slow
def test_same_seed_same_loss_lines_and_world2_close_to_world1(run_env, tmp_path, one_node_world2):
    run_side_by_side({name: ckpt_env(run_env, tmp_path, name, **SIX_STEPS, **seed)
                      for name, seed in (("a", {}), ("b", {}), ("seed1", dict(SEED=1)))})
    a, b = only_log(tmp_path / "a"), only_log(tmp_path / "b")
    assert loss_lines(a) == loss_lines(b) and len(loss_lines(a)) == 9
    assert final(a)["val_loss"] == final(b)["val_loss"]
    assert final(only_log(tmp_path / "seed1"))["val_loss"] != final(a)["val_loss"]  # the seed does reach the init
    w2 = one_node_world2
    # the same chunks, their gradients averaged in another order: equal up to fp32 rounding carried through 6 steps
    # (measured: 0.0 difference at the logged 4 and the final 6 decimals; bounds of a few last-digit units)
    one = [float(l.split("loss:")[1]) for l in loss_lines(a)]
    two = [float(l.split("loss:")[1]) for l in loss_lines(w2)]
    print("max |world2 - world1| logged loss:", max(abs(x - y) for x, y in zip(one, two)),
          "final val loss:", abs(final(w2)["val_loss"] - final(a)["val_loss"]))
    assert len(one) == len(two) and max(abs(x - y) for x, y in zip(one, two)) <= 2e-4
    assert abs(final(w2)["val_loss"] - final(a)["val_loss"]) <= 1e-4


# ---- the restricted unpickler's getattr rule (Enum members as Debian 12's Python 3.11.2 pickles them) ----

class _EnumByGetattr(pickle.Pickler):
    """Pickles every Enum member as getattr(EnumClass, name), the way Python 3.11.2 (Debian 12) does."""

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj.name)
        return NotImplemented


def pickled_as_311_2(obj, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    buffer = io.BytesIO()
    _EnumByGetattr(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


def unpickle_metadata(data: bytes):
    return T._MetadataUnpickler(io.BytesIO(data)).load()


def metadata_enum() -> type:
    from torch.distributed.checkpoint import metadata
    return metadata._MEM_FORMAT_ENCODING


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_enum_member_pickled_through_getattr_loads(protocol):
    member = list(metadata_enum())[0]
    data = pickled_as_311_2(member, protocol)
    assert b"getattr" in data  # the 3.11.2 form, not the (EnumClass, (value,)) one other Pythons write
    assert unpickle_metadata(data) is member


def test_real_metadata_pickled_the_311_2_way_loads(small_checkpoint, tmp_path):
    step = copy_of(small_checkpoint[1], tmp_path)
    with open(step / ".metadata", "rb") as f:
        original = pickle.load(f)  # our own file, written just now
    data = pickled_as_311_2(original)
    assert b"getattr" in data  # TensorProperties hold a _MEM_FORMAT_ENCODING member
    (step / ".metadata").write_bytes(data)
    assert T.read_checkpoint_metadata(step) == original
    assert set(read_checkpoint(step)) >= {"progress/step", "model/embed.weight", "rank0/rng/cpu"}


def getattr_pickle(owner: bytes, name: str, then_call: str | None = None) -> bytes:
    """Protocol-2 opcodes for getattr(<owner>, name)(then_call): owner is an opcode sequence that pushes it."""
    body = b"\x80\x02cbuiltins\ngetattr\n" + owner + pickle.dumps(name, protocol=2)[2:-1] + b"\x86R"
    if then_call is not None:
        body += pickle.dumps(then_call, protocol=2)[2:-1] + b"\x85R"
    return body + b"."


class _Outside(enum.Enum):  # an enum, but not one of the checkpoint metadata's
    A = 1


@pytest.mark.parametrize("owner, name", [
    (b"cos\nsystem\n", "__call__"),  # a function of a module outside the allowed set: find_class refuses os
    (b"cbuiltins\neval\n", "__call__"),
    (b"ctorch\nSize\n", "__init__"),  # an allowed class that is not an enum
    (b"ctorch.distributed.checkpoint.metadata\nTensorProperties\n", "__init__"),  # an allowed dataclass
    (b"ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n", "__class__"),  # not a member
    (b"ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n", "_missing_"),
    (b"ctests.test_checkpoint\n_Outside\n", "A"),  # an enum outside the metadata modules
    (pickle.dumps("a string", protocol=2)[2:-1], "join"),
])
def test_getattr_on_anything_but_a_metadata_enum_member_is_refused(owner, name, tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="is not part of a checkpoint's metadata"):
        unpickle_metadata(getattr_pickle(owner, name, then_call=f"touch {marker}"))
    assert not marker.exists()


@pytest.mark.parametrize("owner", [os, __builtins__, T, _Outside, torch.Size, "x"])
def test_the_getattr_stand_in_refuses_other_owners_before_any_lookup(owner):
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.getattr\(.*\) is not part of"):
        T._MetadataUnpickler.enum_member(owner, "system")


@pytest.mark.parametrize("module", [b"pathlib", b"pathlib._local"])  # 3.13 writes the second, older ones the first
def test_paths_pickled_by_any_supported_python_load(module):
    data = b"\x80\x02c" + module + b"\nPosixPath\nX\x04\x00\x00\x00/tmp\x85R."
    assert unpickle_metadata(data) == Path("/tmp")


def test_getattr_itself_is_never_handed_out():
    unpickler = T._MetadataUnpickler(io.BytesIO(b""))
    for module in ("builtins", "__builtin__"):
        assert unpickler.find_class(module, "getattr") is not getattr
    with pytest.raises(pickle.UnpicklingError):
        unpickler.find_class("builtins", "setattr")


# ---- the restricted unpickler's rules, one name each: what a checkpoint's metadata is made of loads, nothing else ----

METADATA, FILESYSTEM = dcp_metadata.__name__, dcp_filesystem.__name__


def global_pickle(module: str, name: str) -> bytes:
    """Protocol-2 opcodes that only push the global module.name: the unpickler's find_class alone decides."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."


@pytest.mark.parametrize("module, name, expected", [
    # the checkpoint modules' own plain data: dataclasses and enums defined there
    (METADATA, "Metadata", dcp_metadata.Metadata),
    (METADATA, "TensorStorageMetadata", dcp_metadata.TensorStorageMetadata),
    (METADATA, "_MEM_FORMAT_ENCODING", dcp_metadata._MEM_FORMAT_ENCODING),
    (FILESYSTEM, "_StorageInfo", dcp_filesystem._StorageInfo),
    # torch's sizes and dtypes
    ("torch", "Size", torch.Size),
    ("torch", "float32", torch.float32),
    ("torch", "bfloat16", torch.bfloat16),
    # the two single names
    ("torch.serialization", "_get_layout", torch.serialization._get_layout),
    ("collections", "OrderedDict", collections.OrderedDict),
    # paths, under either module name
    ("pathlib", "PosixPath", pathlib.PosixPath),
    ("pathlib", "WindowsPath", pathlib.WindowsPath),
    ("pathlib._local", "PurePosixPath", pathlib.PurePosixPath),
])
def test_each_name_of_a_checkpoints_metadata_loads(module, name, expected):
    assert unpickle_metadata(global_pickle(module, name)) is expected


@pytest.mark.parametrize("module, name", [
    # a checkpoint module's name that is not its own plain data: a planner dataclass, a class and an enum base that
    # it imports, a class with behaviour, a function, a name it lacks
    (FILESYSTEM, "LoadPlan"),
    (FILESYSTEM, "Path"),
    (METADATA, "Enum"),
    (FILESYSTEM, "FileSystemReader"),
    (FILESYSTEM, "_write_item"),
    (METADATA, "no_such_name"),
    # torch: Size and dtypes only
    ("torch", "load"),
    ("torch", "Tensor"),
    ("torch", "device"),
    # the single names only, not their modules' other names
    ("torch.serialization", "load"),
    ("collections", "defaultdict"),
    # pathlib: the three path classes only
    ("pathlib", "Path"),
    ("pathlib._local", "Path"),
    ("pathlib", "PureWindowsPath"),
    # builtins: getattr only (handed out as the guarded stand-in)
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "__import__"),
    ("builtins", "open"),
    ("__builtin__", "eval"),
    # any other module
    ("os", "system"),
    ("subprocess", "Popen"),
    ("importlib", "import_module"),
])
def test_every_other_name_is_refused(module, name):
    with pytest.raises(pickle.UnpicklingError, match=re.escape(f"{module}.{name} is not part of a checkpoint's")):
        unpickle_metadata(global_pickle(module, name))
