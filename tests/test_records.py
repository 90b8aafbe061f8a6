"""The committed studies under records/ reproduce from their own logs: their tables and validate.py output are
what their scripts print for the logs in the folder (so a hand-edited number, or a log left out, fails here)."""

import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

RECORDS = Path(__file__).resolve().parents[1] / "records"
STUDY = RECORDS / "2026-11-26_norm_optimizer_ablation"


@pytest.mark.slow  # runs a study's analysis over its logs in a subprocess
@pytest.mark.parametrize("folder", [STUDY.name, "2026-12-02_research_norm_optimizer"])
def test_norm_optimizer_study_reproduces_from_its_logs(tmp_path, folder):
    """The CPU study and study (b) on the research preset, both analysed by the CPU study's analyze.py: table.txt
    and the figures are what it makes of the committed logs, validate_by.txt is validate.py --by NORM,OPTIMIZER's."""
    study = RECORDS / folder
    result = subprocess.run([sys.executable, str(STUDY / "analyze.py"), str(study / "logs"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "table.txt").read_text() == (study / "table.txt").read_text()
    for figure in ("loss.png", "saturation.png", "growth.png"):
        assert (tmp_path / figure).stat().st_size > 10_000 and (study / figure).is_file()
    by = subprocess.run([sys.executable, str(RECORDS / "validate.py"), "--by", "NORM,OPTIMIZER", "logs"],
                        capture_output=True, text=True, timeout=300, cwd=study)  # from the study folder (its paths)
    assert by.returncode == 0, by.stderr[-3000:]
    assert by.stdout == (study / "validate_by.txt").read_text()
    # alpha 0.3 is a cell of its own, never pooled (study (b) also splits by its two AdamW lrs)
    assert re.search(r"cells also split by [A-Z0-9_, ]*NORM_ALPHA \(", by.stderr), by.stderr


@pytest.mark.slow  # runs a study's analysis over its logs in a subprocess
def test_research_lr_sweep_reproduces_from_its_logs(tmp_path):
    """The research preset's lr sweep (records/2026-12-02_research_lr_sweep/): table.txt is what analyze.py prints
    for the committed logs, so a hand-edited number or a log left out fails here."""
    sweep = RECORDS / "2026-12-02_research_lr_sweep"
    result = subprocess.run([sys.executable, str(sweep / "analyze.py"), str(sweep / "logs"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "table.txt").read_text() == (sweep / "table.txt").read_text()
    assert (tmp_path / "sweep.png").stat().st_size > 10_000 and (sweep / "sweep.png").is_file()


@pytest.mark.slow  # runs a study's analysis over its logs in a subprocess
def test_normuon_muon_adamw_study_reproduces_from_its_logs(tmp_path):
    """Study (c) (records/2026-12-02_research_normuon_muon_adamw/): table.txt, with each pair's difference, CI and
    p, is what analyze.py prints for the committed logs, and validate_by.txt is validate.py --by OPTIMIZER's."""
    study = RECORDS / "2026-12-02_research_normuon_muon_adamw"
    result = subprocess.run([sys.executable, str(study / "analyze.py"), str(study / "logs"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "table.txt").read_text() == (study / "table.txt").read_text()
    assert (tmp_path / "loss.png").stat().st_size > 10_000 and (study / "loss.png").is_file()
    by = subprocess.run([sys.executable, str(RECORDS / "validate.py"), "--by", "OPTIMIZER",
                         "records/2026-12-02_research_normuon_muon_adamw/logs"],
                        capture_output=True, text=True, timeout=300, cwd=RECORDS.parent)
    assert by.returncode == 0, by.stderr[-3000:]
    assert by.stdout == (study / "validate_by.txt").read_text()


def load_sweep_analysis():
    path = RECORDS / "2026-12-02_research_lr_sweep" / "analyze.py"
    spec = importlib.util.spec_from_file_location("sweep_analyze", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("points, expected", [
    ([(0.01, 2.0), (0.02, 1.9), (0.04, 2.1)], 0.0),                  # both neighbours more than 0.05 worse
    ([(0.01, 1.94), (0.02, 1.9), (0.04, 1.95)], 2.0),                # each neighbour within: 0.01 .. 0.04
    ([(0.01, 1.96), (0.02, 1.9), (0.04, 1.92), (0.08, 1.99)], 1.0),  # only the right neighbour: 0.02 .. 0.04
    ([(0.01, 1.9), (0.02, None), (0.04, 1.91)], 0.0),                # a divergence breaks the stretch
    ([(0.01, 1.92), (0.02, 1.96), (0.04, 1.9)], 0.0),                # a point past the limit ends it (1.92 beyond)
    ([(0.005, 1.95), (0.01, 1.92), (0.02, 1.9)], 2.0),               # the best at an edge, two factors to the left
])
def test_flatness_counts_factors_of_2_within_the_limit_of_the_best(points, expected):
    """Flatness (the lr-sensitivity study's measure): log2 of the span of the unbroken stretch of lrs around the
    best whose loss is within 0.05 nats of the best."""
    assert load_sweep_analysis().flatness(points) == expected


@pytest.mark.slow  # runs a study's analysis over its logs in a subprocess
def test_lr_sensitivity_analysis_reads_the_sweeps_curves(tmp_path):
    """The lr-sensitivity study (records/2026-12-02_research_lr_sensitivity/) takes its curves without Momo from the
    lr sweep's logs: given an empty log folder, its table is the sweep's Muon and MuonMax rows."""
    study, logs, out = RECORDS / "2026-12-02_research_lr_sensitivity", tmp_path / "logs", tmp_path / "new" / "out"
    logs.mkdir()
    result = subprocess.run([sys.executable, str(study / "analyze.py"), str(logs), str(out)],  # out: made for it
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_rows = (RECORDS / "2026-12-02_research_lr_sweep" / "table.txt").read_text().splitlines()
    assert result.stdout.splitlines() == [row for row in sweep_rows
                                          if row.startswith(("rmsnorm muon MUON_LR", "rmsnorm muonmax MUONMAX_LR"))]
    assert (out / "sensitivity.png").stat().st_size > 10_000


@pytest.mark.slow  # runs a study's analysis over its logs in a subprocess
def test_lr_sensitivity_study_reproduces_from_its_logs(tmp_path):
    """Its committed table.txt is what analyze.py makes of the committed logs (with the sweep's curves)."""
    study = RECORDS / "2026-12-02_research_lr_sensitivity"
    if not (study / "table.txt").exists():
        pytest.skip("no run of the lr-sensitivity study is committed yet")
    result = subprocess.run([sys.executable, str(study / "analyze.py"), str(study / "logs"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "table.txt").read_text() == (study / "table.txt").read_text()
    assert " momo " in (study / "table.txt").read_text()  # its own curves, not only the sweep's
    assert (tmp_path / "sensitivity.png").stat().st_size > 10_000 and (study / "sensitivity.png").is_file()


def test_norm_optimizer_analysis_keeps_the_adamw_arms_apart():
    """The research preset's normalization x optimizer study runs AdamW with the speedrun's Adam settings at two lrs
    and, apart, with beta1 0.9 and 20 warmup steps: the analysis must never pool them (logs older than
    LR_WARMUP_STEPS lack it)."""
    spec = importlib.util.spec_from_file_location("ablation_analyze", STUDY / "analyze.py")
    analyze = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(analyze)

    def run(**config):
        return types.SimpleNamespace(config={"norm": "derf", "optimizer": "adamw", "norm_alpha": 0.5,
                                             "adam_beta1": 0.65, "adamw_matrix_lr": 0.002, **config})
    speedrun, old_log = run(lr_warmup_steps=0), run()
    tuned = run(adam_beta1=0.9, lr_warmup_steps=20)
    assert analyze.cell_of(speedrun) == analyze.cell_of(old_log) == ("derf", "adamw", 0.5)
    assert analyze.cell_of(tuned) == ("derf", "adamw b1=0.9,wu=20", 0.5)
    assert analyze.cell_of(run(adam_beta1=0.65, lr_warmup_steps=20)) != analyze.cell_of(speedrun)
    # and a run at another matrix lr (the study's AdamW cells at 0.001, below Derf's collapse at 0.002)
    assert analyze.cell_of(run(lr_warmup_steps=0, adamw_matrix_lr=0.001)) == ("derf", "adamw lr=0.001", 0.5)


def test_adam_lr_arm_gets_the_matrix_arms_run_at_the_preset_adam_lr():
    """The Adam lr arm's cells leave out ADAM_LR=0.004 (the preset's): that point is the NorMuon run at the same
    MUON_LR, and it must join the arm, or the arm's best and flatness miss it."""
    sweep = load_sweep_analysis()
    runs = [dict(arm="rmsnorm normuon MUON_LR", lr=0.012, loss=1.87), dict(arm="rmsnorm normuon MUON_LR", lr=0.024,
            loss=1.89), dict(arm="rmsnorm normuon ADAM_LR", lr=0.002, loss=1.86, matrix_lr=0.012),
            dict(arm="rmsnorm muon MUON_LR", lr=0.012, loss=1.85)]
    added = sweep.with_preset_adam_lr(runs)[len(runs):]
    assert added == [dict(arm="rmsnorm normuon ADAM_LR", lr=sweep.PRESET_ADAM_LR, loss=1.87)]
