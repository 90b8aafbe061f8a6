"""records/study.py: a grid of flags x seeds run side by side, resumable, then validate.py."""

import importlib.util
import json
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

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
                          (["--grid", "NORM=derf", "--shuffle-data"], "--shuffle-data sets each run's DATA_SEED"),
                          (["--grid", "DATA_SEED=1,2", "--seeds", "1", "--shuffle-data"],
                           "DATA_SEED set both by a cell and by the study"),
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


# ---- which logs count as done, looked up by exact tag; the ETA and the exit code of a resumed study ----

def trainer_log(log_dir: Path, tag: str, end: str, run_id: str = "0123abcd") -> Path:
    """A log as train_gpt.py names and ends it: its RunLog, a step line, then `end` ("final" or how it stopped,
    written by the trainer's own stop functions, so that a change of their wording reaches this test)."""
    hp = T.parse_env({"PRESET": "test", "LOG_DIR": str(log_dir)}, False)[0]
    log = T.RunLog(hp, T.Launch(), torch.device("cpu"), f"20261201T000000Z_{tag}_{run_id}")
    log.line("step:1/4 train_loss:4.0000 train_time:10ms step_avg:10.00ms", console=False)
    if end == "final":
        log.line('final: {"val_loss": 3.5, "step": 4, "num_iterations": 4, "train_time_ms": 40.0}', console=False)
    elif end == "non-finite":
        T.stop_nonfinite(log, 2, "train_loss", 4.0)
    elif end == "signal":
        stop = T.StopSignal()
        stop.signum = signal.SIGTERM
        stop.end_run(log, 2, 4.0)
    elif end == "data error":
        T.stop_on_data_error(log, 2, T.ShardError("train_000001.bin: 10 tokens, the header says 20"), 4.0)
    log.close()
    return log.path


@pytest.mark.parametrize("end, state", [("final", "done"), ("non-finite", "done"), ("signal", "todo"),
                                        ("data error", "todo"), ("cut off", "todo")])
def test_a_log_counts_as_done_only_when_it_finished_or_diverged(tmp_path, capsys, end, state):
    """A diverged run is a result; a run stopped by a signal or a bad shard is rerun, as is one cut off."""
    log = trainer_log(tmp_path, "norm-derf_seed-0", end)
    assert study_module.run_state(tmp_path, "norm-derf_seed-0") == (state, [log])


@pytest.mark.parametrize("tag, longer", [
    ("seed-1", "seed-10"), ("optimizer-muon_seed-0", "optimizer-muonmax_seed-0"),
    # a cell that adds a flag to another (records/2026-11-26_muonmax_momo_lr_sweep/cells.txt, no seeds): the other's
    # tag is a prefix of its tag, or a suffix (MUON_LR alone against OPTIMIZER=muon MUON_LR)
    ("optimizer-muon_muon_lr-0.003_momo-1", "optimizer-muon_muon_lr-0.003_momo-1_momo_lb-3.5"),
    ("muon_lr-0.003", "optimizer-muon_muon_lr-0.003")])
def test_a_cells_log_is_looked_up_by_its_whole_tag(tmp_path, capsys, tag, longer):
    """The run of `tag` was cut off and the run of a tag that contains it finished: `tag` is still to run, and only
    its own log is set aside (the finished log of the other cell is neither taken for it nor renamed)."""
    cut = trainer_log(tmp_path, tag, "cut off", run_id="aaaaaaaa")
    done = trainer_log(tmp_path, longer, "final", run_id="bbbbbbbb")
    assert study_module.run_state(tmp_path, tag) == ("todo", [cut])
    assert study_module.run_state(tmp_path, longer) == ("done", [done])


FAKE_PYTHON = '''#!{python}
"""The study's --python: a stand-in trainer that writes a finished log at once, and a stand-in validate.py whose
exit code is FAKE_VALIDATE[its mode]."""
import json, os, sys, uuid
from pathlib import Path
if sys.argv[1].endswith("train_gpt.py"):
    log = Path(os.environ["LOG_DIR"]) / f"20261202T000000Z_{{os.environ['RUN_TAG']}}_{{uuid.uuid4().hex[:8]}}.txt"
    log.write_text(f"data_seed {{os.environ.get('DATA_SEED', 'unset')}}\\n"
                   'final: {{"val_loss": 2.5, "step": 4, "num_iterations": 4, "train_time_ms": 40.0}}\\n')
    sys.exit(0)
mode = "--compare" if "--compare" in sys.argv else "--by" if "--by" in sys.argv else "record"
print(f"validate stand-in: {{mode}}")
sys.exit(json.loads(os.environ["FAKE_VALIDATE"])[mode])
'''


def fake_python(tmp_path: Path) -> Path:
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON.format(python=sys.executable))
    path.chmod(0o755)
    return path


def test_a_resumed_study_reruns_the_stopped_runs_and_its_eta_counts_only_them(tmp_path, capsys, monkeypatch):
    """Four runs, two finished before (one diverged) and two stopped (a signal, a bad shard): the two are run again
    (their logs set aside), and the ETA after each is the time per run of this session times the runs left of it
    (a clock that moves 60 s between the study's readings: 1 min after the first, 0 after the last)."""
    log_dir = tmp_path / "study" / "logs"
    log_dir.mkdir(parents=True)
    ends = {"norm-derf_seed-0": "final", "norm-dyt_seed-0": "non-finite", "norm-derf_seed-1": "signal",
            "norm-dyt_seed-1": "data error"}
    old = {tag: trainer_log(log_dir, tag, end) for tag, end in ends.items()}
    clock = {"now": 0.0}

    def perf_counter() -> float:  # the runs' own timing (worker threads) stands still
        if threading.current_thread() is threading.main_thread():
            clock["now"] += 60.0
        return clock["now"]

    monkeypatch.setattr(study_module, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setenv("FAKE_VALIDATE", '{"--by": 0}')
    code = study_module.main(["--out", str(tmp_path / "study"), "--grid", "NORM=derf,dyt", "--seeds", "0,1",
                              "--jobs", "1", "--python", str(fake_python(tmp_path))])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 runs (2 cells x 2 seeds), 2 done, 2 to run" in out
    etas = [line.rsplit("ETA ", 1)[1] for line in out.splitlines() if line.startswith("[")]
    assert etas == ["1.0 min", "0.0 min"], out
    for tag in ("norm-derf_seed-1", "norm-dyt_seed-1"):
        assert not old[tag].exists() and old[tag].with_name(old[tag].name + ".incomplete").exists()
        assert study_module.run_state(log_dir, tag)[0] == "done"
    assert old["norm-derf_seed-0"].exists() and old["norm-dyt_seed-0"].exists()  # kept as they were


@pytest.mark.parametrize("by, compare, expected", [(0, None, 0), (1, None, 0), (2, None, 1),
                                                   (0, 1, 0), (0, 2, 1), (2, 0, 1)])
def test_the_study_exit_code_follows_each_verdict_of_validate(tmp_path, capsys, monkeypatch, by, compare, expected):
    """validate.py's 0 (passed) and 1 (a verdict: not passed) both mean the study did its work: exit 0; its 2
    (unusable input) is the study's failure: exit 1, also when only the --compare against the baseline gives it."""
    monkeypatch.setenv("FAKE_VALIDATE", json.dumps({"--by": by, "--compare": compare}))
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    args = ["--out", str(tmp_path / "study"), "--grid", "NORM=derf,dyt", "--jobs", "1",
            "--python", str(fake_python(tmp_path))] + (["--baseline", str(baseline)] if compare is not None else [])
    assert study_module.main(args) == expected, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "validate stand-in: --by" in out and ("validate stand-in: --compare" in out) == (compare is not None)


@pytest.mark.parametrize("shuffle", [False, True])
def test_shuffle_data_gives_each_run_its_seed_as_data_seed(tmp_path, capsys, monkeypatch, shuffle):
    """--shuffle-data: every run's DATA_SEED is its SEED (the data order varies with the seed), and the tags stay
    the seed's alone; without it no DATA_SEED is set (the shards' order)."""
    monkeypatch.setenv("FAKE_VALIDATE", '{"--by": 0}')
    monkeypatch.delenv("DATA_SEED", raising=False)
    args = ["--out", str(tmp_path / "study"), "--grid", "NORM=derf", "--seeds", "3,4", "--jobs", "1",
            "--python", str(fake_python(tmp_path))] + (["--shuffle-data"] if shuffle else [])
    assert study_module.main(args) == 0, capsys.readouterr().out
    logs = {log.stem.split("_", 1)[1].rsplit("_", 1)[0]: log.read_text().splitlines()[0]
            for log in (tmp_path / "study" / "logs").glob("*.txt")}
    assert logs == {f"norm-derf_seed-{s}": f"data_seed {s if shuffle else 'unset'}" for s in (3, 4)}
