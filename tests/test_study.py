"""records/study.py: a grid of flags x seeds run side by side, resumable, then validate.py."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as T

REPO = Path(T.__file__).resolve().parent
STUDY = [sys.executable, str(REPO / "records" / "study.py")]
_spec = importlib.util.spec_from_file_location("study_module", REPO / "records" / "study.py")
study_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study_module)


def study(args, timeout=600):
    return subprocess.run(STUDY + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_grid_runs_every_cell_and_seed_resumes_and_validates(shard_dir, tmp_path):
    out = tmp_path / "study"
    args = ["--out", out, "--grid", "NORM=rmsnorm,dyt", "--seeds", "0,1", "--jobs", "2", "--threads", "1",
            "PRESET=test", "NUM_ITERATIONS=4", "VAL_EVERY=0", f"TRAIN_FILES={shard_dir / 'train_*.bin'}",
            f"VAL_FILES={shard_dir / 'val_*.bin'}"]
    first = study(args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "4 runs (2 cells x 2 seeds), 0 done, 4 to run" in first.stdout
    assert sum(line.startswith("[") and "ETA" in line for line in first.stdout.splitlines()) == 4
    logs = sorted((out / "logs").glob("*.txt"))
    assert sorted(log.name.split("_", 1)[1].rsplit("_", 1)[0] for log in logs) == [
        "norm-dyt_seed-0", "norm-dyt_seed-1", "norm-rmsnorm_seed-0", "norm-rmsnorm_seed-1"]
    report = (out / "validate_by.txt").read_text()
    assert "rmsnorm" in report and "dyt" in report and report in first.stdout

    again = study(args)  # every log has its final: line: nothing runs
    assert again.returncode == 0 and "4 done, 0 to run" in again.stdout

    cut = next(log for log in logs if "norm-dyt_seed-1" in log.name)  # a run cut off before its final: line
    cut.write_text("\n".join(line for line in cut.read_text().splitlines() if not line.startswith("final: ")))
    resumed = study(args)
    assert resumed.returncode == 0 and "3 done, 1 to run" in resumed.stdout
    assert (cut.parent / (cut.name + ".incomplete")).exists()  # kept aside, not deleted
    assert len(list((out / "logs").glob("*norm-dyt_seed-1_*.txt"))) == 1


def test_bad_arguments_are_named(tmp_path):
    for args, message in ((["--grid", "NORM="], "--grid NORM=: expected KEY=v1,v2"),
                          (["--grid", "norm=derf"], "expected KEY=VALUE with an upper-case flag name"),
                          (["--grid", "SEED=1,2"], "SEED set both by a cell and by the study"),
                          (["NORM=dyt", "--grid", "NORM=derf"], "NORM set both by a cell and by the study"),
                          (["--grid", "NORM=derf", "NORM=dyt"], "--grid names NORM twice"),
                          (["--seeds", "a,b"], "--seeds a,b: expected comma-separated integers"),
                          (["--cells", tmp_path / "none.txt"], "no such file")):
        result = study(["--out", tmp_path / "s", *args])
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_default_data_follows_the_preset():
    """PRESET=research trains on bytes: the study's default data must be the byte shards, not GPT-2 tokens."""
    assert "embedded_bytes" in study_module.default_data("research")["TRAIN_FILES"]
    assert "embedded_bytes" in study_module.default_data("research")["VAL_FILES"]
    assert "embedded_bytes" not in study_module.default_data("cpu")["TRAIN_FILES"]
    assert study_module.default_data(None)["VAL_FILES"].endswith("data/embedded/val_*.bin")
