"""records/2026-12-07_research_coupling_600/plan.py: the pre-registered rules that turn the lr sweep into the
study's cells and seeds, on planted sweep logs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "records" / "2026-12-07_research_coupling_600"
_spec = importlib.util.spec_from_file_location("coupling_plan", STUDY / "plan.py")
plan = importlib.util.module_from_spec(_spec)
sys.modules["coupling_plan"] = plan
_spec.loader.exec_module(plan)


def write_log(folder: Path, flags: dict[str, str], seed: int, loss: float) -> None:
    """A minimal log as train_gpt writes it: config (with study.py's RUN_TAG), then the final line, or a stopped
    line for a non-finite loss."""
    tag = plan.run_tag(flags, seed)
    config = {"run_tag": tag, "seed": seed, **{k.lower(): v for k, v in flags.items()}}
    end = ("final: " + json.dumps({"val_loss": loss, "step": 600, "train_time_ms": 1.0, "status": "complete"})
           if math.isfinite(loss) else
           "stopped: " + json.dumps({"reason": "non-finite loss", "step": 20, "last_finite_loss": 3.0}))
    (folder / f"20261207T000000Z_{tag}_{seed:08x}.txt").write_text(
        "\n".join(["print('source')", "=" * 100, "config: " + json.dumps(config), end]) + "\n")


# final losses by seed 100, 101 around each cell's middle lr: (low lr, middle, high); the middle wins
BOWL = ((2.10, 2.12), (2.00, 2.02), (2.05, 2.09))


def plant(folder: Path, losses=BOWL, edge_cell: dict | None = None, diverge: dict | None = None) -> Path:
    logs = folder / "sweep" / "logs"
    logs.mkdir(parents=True)
    lines = plan.sweep_lines(STUDY / "sweep_cells.txt")
    grids: dict[tuple, list[dict]] = {}
    for flags in lines:
        grids.setdefault(plan.identity(flags), []).append(flags)
    for key, cell_lines in grids.items():
        offset = {"derf": 0.3, "dyt": 0.2}.get(dict(key)["NORM"], 0.0) if dict(key)["OPTIMIZER"] == "muon" else 0.0
        for i, flags in enumerate(cell_lines):
            row = losses[i] if len(cell_lines) == 3 else losses[1]
            for seed, loss in zip(plan.SWEEP_SEEDS, row):
                if edge_cell is not None and plan.identity(flags) == plan.identity(edge_cell):
                    loss = 3.0 - i  # falling with the lr: the best is the largest
                if diverge is not None and flags == diverge:
                    loss = math.inf
                write_log(logs, flags, seed, loss + offset)
    return folder / "sweep"


def test_each_cell_takes_its_best_lr_and_the_seeds_follow_the_pilot(tmp_path):
    result = plan.plan(plant(tmp_path))
    assert result["not_ready"] == {}
    assert result["cells"]["rmsnorm_muon"]["MUON_LR"] == "0.012"
    assert result["cells"]["derf_muon"]["MUON_LR"] == "0.006"
    assert result["cells"]["derf_adamw"]["ADAMW_MATRIX_LR"] == "0.0005"
    assert result["cells"]["rmsnorm_adamw"] == {"NORM": "rmsnorm", "OPTIMIZER": "adamw", "ADAMW_MATRIX_WD": "0.1",
                                                "ADAMW_MATRIX_LR": "0.002"}
    # by hand: every cell's two seeds at its best lr are 0.02 apart (variance 0.0002); the interaction is Derf's
    # Muon offset 0.3 (AdamW cells have none)
    seeds = result["seeds"]
    assert seeds["sigma2"] == pytest.approx(0.0002) and seeds["delta"] == pytest.approx(0.3)
    z = stats.norm.ppf(0.95) + stats.norm.ppf(0.8)
    assert seeds["n_for_power"] == math.ceil(4 * 0.0002 * z ** 2 / 0.3 ** 2) == 1
    assert seeds["n"] == plan.N_MIN and not seeds["capped"]


def test_a_best_lr_at_the_edge_or_a_missing_seed_is_no_choice(tmp_path):
    edge = {"NORM": "dyt", "OPTIMIZER": "muon", "MUON_LR": "0.012"}
    result = plan.plan(plant(tmp_path, edge_cell=edge))
    assert result["not_ready"] == {"dyt_muon": "the best lr 0.012 is at the grid's edge: add 0.024 on seeds "
                                                "(100, 101)"}
    assert "seeds" not in result
    missing = next((tmp_path / "sweep" / "logs").glob("*derf_optimizer-muon_muon_lr-0.003_seed-101*"))
    missing.unlink()
    assert plan.plan(tmp_path / "sweep")["not_ready"]["derf_muon"] == "not every seed has run at 0.003"


def test_a_diverged_run_loses_its_lr(tmp_path):
    """A run stopped on a non-finite loss counts (as an infinite loss), so its lr cannot win."""
    diverge = {"NORM": "derf", "OPTIMIZER": "adamw", "ADAMW_MATRIX_WD": "0.1", "ADAMW_MATRIX_LR": "0.0005"}
    result = plan.plan(plant(tmp_path, diverge=diverge))
    assert result["table"][plan.identity(diverge)]["means"][0.0005] == math.inf
    assert result["not_ready"]["derf_adamw"].startswith("the best lr 0.001 is at the grid's edge: add 0.002")


def test_seeds_are_capped_with_the_power_left_said():
    seeds = plan.seeds_needed(sigma2=0.01, delta=0.05)
    z = stats.norm.ppf(0.95) + stats.norm.ppf(0.8)
    assert seeds["n_for_power"] == math.ceil(4 * 0.01 * z ** 2 / 0.05 ** 2) > plan.N_MAX
    assert seeds["n"] == plan.N_MAX and seeds["capped"]
    se = math.sqrt(4 * 0.01 / plan.N_MAX)
    assert seeds["power_at_delta"] == pytest.approx(stats.norm.cdf(0.05 / se - stats.norm.ppf(0.95)))
    assert seeds["detectable_at_80"] == pytest.approx(z * se)
    assert plan.seeds_needed(0.01, 0.0)["n"] == plan.N_MAX  # no pilot effect: the cap


def test_the_claims_document_is_one_claims_py_accepts(tmp_path):
    """--write's claims.json over the planted sweep's choices loads in records/claims.py (every cell its study's,
    every claim's contrast on those cells), pre-registered."""
    result = plan.plan(plant(tmp_path / "a"))
    study = tmp_path / "study"
    study.mkdir()
    (study / "claims.json").write_text(json.dumps(plan.claims_document(result["cells"])))
    spec = importlib.util.spec_from_file_location("claims_for_plan", REPO / "records" / "claims.py")
    claims = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(claims)
    document = claims.load_claims(study)
    assert document["registered"].startswith("pre-registered") and len(document["claims"]) == len(plan.CLAIMS)
    assert document["cells"]["derf_muon"]["MUON_LR"] == 0.006
