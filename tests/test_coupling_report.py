"""records/2026-12-07_research_coupling_600/report.py and the claims.json that plan.py writes, on planted stage-3
logs shaped as train_gpt writes them: the cell table and the interaction's trajectory re-derived by hand."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "records" / "2026-12-07_research_coupling_600"


def load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


plan = load("coupling_plan", STUDY / "plan.py")
report = load("coupling_report", STUDY / "report.py")
claims = report.claims

# Every cell at one lr of its optimizer, so that Derf at alpha 0.5 and at alpha 0.3 share NORM, OPTIMIZER and lr:
# only NORM_ALPHA tells their runs apart.
LRS = {"MUON_LR": "0.006", "ADAMW_MATRIX_LR": "0.001"}
STEPS = range(0, 601, 50)
SEED_NOISE = (-0.03, -0.01, 0.01, 0.03)  # the same for every cell and step: a cell's SD is known exactly
# the Derf-under-Muon cell's extra loss grows 0.002 a validation: the interaction is 0.002 * step / 50
GROWTH = 0.002


def cells() -> dict[str, dict[str, str]]:
    return {name: {**flags, **{key: value for key, value in LRS.items()
                               if (key == "MUON_LR") == (flags["OPTIMIZER"] == "muon")}}
            for name, flags in plan.STUDY_CELLS.items()}


def base(name: str) -> float:
    return 2.0 + 0.1 * list(plan.STUDY_CELLS).index(name)


def val_loss(name: str, step: int, seed: int) -> float:
    extra = GROWTH * step / 50 if name == "derf_muon" else 0.0
    return round(base(name) + extra + SEED_NOISE[seed] + 0.5 * (600 - step) / 600, 6)


def write_logs(study: Path) -> None:
    """Stage 3's logs as study.py --shuffle-data runs them: DATA_SEED = SEED, the config with train_gpt's defaults
    for the flags a cell does not set (NORM_ALPHA 0.5, ADAMW_MATRIX_WD 0.0), val lines every 50 steps."""
    logs = study / "logs"
    logs.mkdir(parents=True)
    for name, flags in cells().items():
        for seed in range(len(SEED_NOISE)):
            config = {"norm_alpha": 0.5, "adamw_matrix_wd": 0.0, "muon_lr": 0.023, "adamw_matrix_lr": 0.002,
                      **{k.lower(): (v if k in ("NORM", "OPTIMIZER") else float(v)) for k, v in flags.items()},
                      "seed": seed, "data_seed": seed, "run_tag": plan.run_tag(flags, seed)}
            lines = ["print('source')", "=" * 100, "config: " + json.dumps(config)]
            lines += [f"step:{step}/600 val_loss:{val_loss(name, step, seed):.6f} train_time:{step}ms "
                      f"step_avg:1.00ms" for step in STEPS]
            lines.append("final: " + json.dumps({"val_loss": val_loss(name, 600, seed), "step": 600,
                                                 "train_time_ms": 600.0, "status": "complete"}))
            (logs / f"20261208T000000Z_{config['run_tag']}_{seed:08x}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def study(tmp_path: Path) -> Path:
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "claims.json").write_text(json.dumps(plan.claims_document(cells())))
    write_logs(folder)
    (folder / "README.md").write_text(f"# planted\n\n{report.BEGIN}\n{report.END}\n")
    return folder


def test_every_cell_matches_its_own_runs_despite_shared_lrs_and_per_run_data_seeds(study):
    """claims.json from plan.py tells Derf at alpha 0.5 from alpha 0.3 at one lr, and DATA_SEED = SEED is a per-run
    value, not a second configuration."""
    spec, runs_of = report.load(study)
    assert {name: len(runs) for name, runs in runs_of.items()} == {name: 4 for name in plan.STUDY_CELLS}
    assert {json.loads(r.path.read_text().splitlines()[2][8:])["norm_alpha"] for r in runs_of["derf_muon"]} == {0.5}


def test_the_cell_table_and_the_trajectory_equal_a_hand_computation(study):
    spec, runs_of = report.load(study)
    rows = {row["cell"]: row for row in report.cell_rows(spec, runs_of)}
    sd = float(np.std(SEED_NOISE, ddof=1))
    half = stats.t.ppf(0.975, 3) * sd / 2
    for name in plan.STUDY_CELLS:
        mean = base(name) + (GROWTH * 12 if name == "derf_muon" else 0.0)
        assert rows[name]["n"] == 4 and rows[name]["mean"] == pytest.approx(mean, abs=1e-6)
        assert rows[name]["sd"] == pytest.approx(sd, abs=1e-6)
        assert (rows[name]["low"], rows[name]["high"]) == pytest.approx((mean - half, mean + half), abs=1e-6)
    assert rows["derf_adamw"]["lr"] == "adamw_matrix_lr 0.001" and rows["dyt_muon"]["lr"] == "muon_lr 0.006"
    points = report.trajectory(runs_of, report.primary(spec)["contrast"]["interaction"])
    assert [p["step"] for p in points] == list(STEPS)
    # by hand: four cells of 4 runs with one SD: SE = sqrt(4 sd^2 / 4) = sd, Welch-Satterthwaite df = 4 * 3
    for point in points:
        expected = GROWTH * point["step"] / 50
        assert point["estimate"] == pytest.approx(expected, abs=1e-6)
        assert point["se"] == pytest.approx(sd, rel=1e-4) and point["df"] == pytest.approx(12, rel=1e-4)
        margin = stats.t.ppf(0.975, 12) * sd
        assert (point["low"], point["high"]) == pytest.approx((expected - margin, expected + margin), abs=1e-4)


def test_write_fills_the_readme_block_and_the_figure_and_check_sees_it_stale(study, capsys):
    assert report.main(["--study", str(study), "--check"]) == 1
    assert "is stale: run python study/report.py --write" in capsys.readouterr().err
    assert report.main(["--study", str(study), "--write"]) == 0
    text = (study / "README.md").read_text()
    assert "| derf_muon | muon_lr 0.006 | 4 | 2.1240 |" in text and "| 600 | +0.0240 |" in text
    assert (study / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.main(["--study", str(study), "--check"]) == 0


def test_a_readme_without_the_block_is_refused_with_the_fix(study, capsys):
    (study / "README.md").write_text("# no block\n")
    assert report.main(["--study", str(study), "--write"]) == 2
    assert f"put the line {report.BEGIN}" in capsys.readouterr().err
    assert (study / "README.md").read_text() == "# no block\n"  # nothing written


def test_a_study_without_usable_logs_is_refused_in_one_line(study, capsys):
    for log in (study / "logs").glob("*.txt"):
        log.unlink()
    assert report.main(["--study", str(study)]) == 2
    assert capsys.readouterr().err.startswith("report.py: ")


def test_the_pinned_defaults_are_train_gpts():
    """claims.json pins NORM_ALPHA and ADAMW_MATRIX_WD where a cell leaves them: the values its runs log."""
    import train_gpt as T
    research = T.parse_env({"PRESET": "research"}, False)[0]
    assert {key: float(value) for key, value in plan.UNSET_DEFAULTS.items()} == {
        "NORM_ALPHA": research.norm_alpha, "ADAMW_MATRIX_WD": research.adamw_matrix_wd}
