#!/usr/bin/env python3
"""Stage 2 of this study, computed from stage 1's logs: each cell's lr, the seeds a cell needs, and the study's
cells.txt and claims.json. The claims (CLAIMS below) and the rules were committed before any log of the study.

    python records/2026-12-07_research_coupling_600/plan.py            # the lr table and the plan, nothing written
    python records/2026-12-07_research_coupling_600/plan.py --write    # also cells.txt and claims.json (stage 3's)

The rules:
  lr      A sweep cell is a line of sweep_cells.txt without its lr (MUON_LR or ADAMW_MATRIX_LR). Its lr is the one
          with the lowest mean final val loss over the sweep's seeds (100, 101), each lr run at both. A best lr at
          the edge of its cell's grid is not a choice: the plan names the lr to add (half the smallest or twice
          the largest, on the same seeds) and writes nothing.
  decay   The AdamW cells keep ADAMW_MATRIX_WD=0.1 (AdamW's usual value, fixed before the sweep); the sweep's runs at
          0 and 1.0 (RMSNorm, lr 0.002) are reported beside it, not chosen from.
  seeds   sigma^2 = the pooled within-cell variance of the final val loss of the study's cells at their lrs (two
          seeds each: one degree of freedom a cell); delta = the primary claim's interaction at those lrs. A cell
          needs n = ceil(4 sigma^2 (z_0.95 + z_0.80)^2 / delta^2) seeds for 80% power at delta (one-sided, alpha
          0.05, four cells of n), at least N_MIN and at most N_MAX (this machine's budget); when N_MAX binds, the plan
          says the power it leaves and the effect it detects at 80%.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

HERE = Path(__file__).resolve().parent
RECORDS = HERE.parent
if "validate" in sys.modules:  # one module whoever loaded it first (the tests load it under this name)
    validate = sys.modules["validate"]
else:
    _spec = importlib.util.spec_from_file_location("validate", RECORDS / "validate.py")
    validate = importlib.util.module_from_spec(_spec)
    sys.modules["validate"] = validate
    _spec.loader.exec_module(validate)

LR_KEYS = ("MUON_LR", "ADAMW_MATRIX_LR")
SWEEP_SEEDS = (100, 101)
ALPHA, POWER = 0.05, 0.80
N_MIN, N_MAX = 4, 8
ADAMW_DECAY = 0.1
# The study's cells: name -> the sweep line's flags without its lr (the lr comes from the sweep)
STUDY_CELLS = {
    "rmsnorm_muon": {"NORM": "rmsnorm", "OPTIMIZER": "muon"},
    "derf_muon": {"NORM": "derf", "OPTIMIZER": "muon"},
    "dyt_muon": {"NORM": "dyt", "OPTIMIZER": "muon"},
    "derf_alpha0.3_muon": {"NORM": "derf", "NORM_ALPHA": "0.3", "OPTIMIZER": "muon"},
    "derf_ema_muon": {"NORM": "derf_ema", "OPTIMIZER": "muon"},
    "rmsnorm_adamw": {"NORM": "rmsnorm", "OPTIMIZER": "adamw", "ADAMW_MATRIX_WD": str(ADAMW_DECAY)},
    "derf_adamw": {"NORM": "derf", "OPTIMIZER": "adamw", "ADAMW_MATRIX_WD": str(ADAMW_DECAY)},
    "dyt_adamw": {"NORM": "dyt", "OPTIMIZER": "adamw", "ADAMW_MATRIX_WD": str(ADAMW_DECAY)},
}
# train_gpt's defaults of the flags that some cells set and others leave (the research preset's): claims.json pins
# them in every cell, so that a cell's runs are told from those of a cell that differs only there (Derf at alpha 0.5
# and at alpha 0.3 may end up at one lr)
UNSET_DEFAULTS = {"NORM_ALPHA": "0.5", "ADAMW_MATRIX_WD": "0.0"}
PAPER = "Abouzeid, arXiv 2604.01563"
GAP = {"difference": ["derf_muon", "rmsnorm_muon"]}
SPECTRAL = {"diagnostic": "layers.*_spectral (mean)", "step": 600}
# The claims, fixed before the study's logs; the first family is the primary test the seeds are powered for.
CLAIMS = [
    {"id": "derf_gap_grows_under_muon", "family": "coupling paper, primary", "claim": "Derf's gap grows under Muon",
     "statement": "Derf's gap to RMSNorm grows from +0.31 nats under AdamW to +0.97 under Muon",
     "contrast": {"interaction": [["derf_muon", "rmsnorm_muon"], ["derf_adamw", "rmsnorm_adamw"]]}},
    {"id": "dyt_gap_grows_under_muon", "family": "coupling paper, secondary", "claim": "DyT's gap grows under Muon",
     "statement": "the bounded norms' gap to RMSNorm grows under Muon (shown for Derf; DyT is the other bounded "
                  "norm)",
     "contrast": {"interaction": [["dyt_muon", "rmsnorm_muon"], ["dyt_adamw", "rmsnorm_adamw"]]}},
    {"id": "derf_trails_under_muon", "family": "coupling paper, secondary", "claim": "Derf trails RMSNorm under Muon",
     "statement": "under Muon Derf trails RMSNorm by +0.97 nats", "contrast": GAP},
    {"id": "ema_blend_recovers", "family": "coupling paper, secondary", "claim": "EMA-blend beats Derf under Muon",
     "statement": "the EMA-blend scale recovers ~84% of Derf's gap under Muon",
     "contrast": {"difference": ["derf_muon", "derf_ema_muon"]}, "share_of": GAP, "paper_share": 0.84},
    {"id": "alpha0.3_recovers", "family": "coupling paper, secondary", "claim": "alpha 0.3 beats Derf under Muon",
     "statement": "alpha 0.3 recovers ~80% of Derf's gap under Muon",
     "contrast": {"difference": ["derf_muon", "derf_alpha0.3_muon"]}, "share_of": GAP, "paper_share": 0.80},
    {"id": "muon_grows_weights_derf", "family": "coupling paper, secondary", "claim": "Muon grows the weights faster",
     "condition": "under Derf", "statement": "Muon grows the weights faster, which saturates the bounded norm",
     "metric": SPECTRAL, "contrast": {"difference": ["derf_muon", "derf_adamw"]}},
    {"id": "muon_grows_weights_rmsnorm", "family": "coupling paper, secondary",
     "claim": "Muon grows the weights faster", "condition": "under RMSNorm",
     "statement": "Muon grows the weights faster, which saturates the bounded norm",
     "metric": SPECTRAL, "contrast": {"difference": ["rmsnorm_muon", "rmsnorm_adamw"]}},
]
CAVEATS = [
    "The paper's statements are paraphrased from its text (not quoted); its sizes are nats per token at 1B "
    "parameters and 1000 steps, here nats per byte at 4M parameters and 600 steps, so no claim has a paper effect "
    "size to power against: each reports the effect it detects.",
    "Each cell runs at its own lr, chosen by plan.py's rule on seeds 100-101, which the study does not use.",
]


def sweep_lines(path: Path) -> list[dict[str, str]]:
    """sweep_cells.txt's cells: one dict of flags a line (comments and blank lines skipped)."""
    cells = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            cells.append(dict(word.split("=", 1) for word in line.split()))
    return cells


def run_tag(flags: dict[str, str], seed: int) -> str:
    """The RUN_TAG that study.py gave the run of these flags and seed: the lookup study.py makes itself, so that a
    line does not also match the runs of a line that adds a flag to it (NORM=derf and NORM=derf NORM_ALPHA=0.3)."""
    return "_".join(f"{key}-{value}" for key, value in {**flags, "SEED": str(seed)}.items()).lower()


def identity(flags: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """A sweep cell's flags without its lr."""
    return tuple(sorted((k, v) for k, v in flags.items() if k not in LR_KEYS))


def final_loss(run) -> float | None:
    """A run's final val loss; inf when it diverged (a non-finite loss: that lr lost); None when it did not end."""
    if run.problem is None:
        return run.final_loss
    return math.inf if "non-finite" in run.problem else None


def lr_table(runs: list, lines: list[dict[str, str]]) -> dict[tuple, dict]:
    """Per sweep cell: {lr: final losses by seed}, its lr key, the chosen lr or why there is none. runs: every
    parsed log, the unusable ones included."""
    by_tag = {validate.config_value(run, "run_tag"): run for run in runs if final_loss(run) is not None}
    table: dict[tuple, dict] = {}
    for flags in lines:
        (lr_key,) = [k for k in flags if k in LR_KEYS]
        entry = table.setdefault(identity(flags), {"lr_key": lr_key, "losses": {}})
        entry["losses"][float(flags[lr_key])] = {seed: final_loss(by_tag[run_tag(flags, seed)])
                                                 for seed in SWEEP_SEEDS if run_tag(flags, seed) in by_tag}
    for entry in table.values():
        lrs = sorted(entry["losses"])
        missing = [lr for lr in lrs if len(entry["losses"][lr]) < len(SWEEP_SEEDS)]
        if missing:
            entry["why_not"] = f"not every seed has run at {', '.join(f'{lr:g}' for lr in missing)}"
            continue
        means = {lr: float(np.mean(list(entry["losses"][lr].values()))) for lr in lrs}
        best = min(means, key=means.get)
        entry["means"], entry["best"] = means, best
        if len(lrs) > 1 and best in (lrs[0], lrs[-1]):
            add = lrs[0] / 2 if best == lrs[0] else lrs[-1] * 2
            entry["why_not"] = f"the best lr {best:g} is at the grid's edge: add {add:g} on seeds {SWEEP_SEEDS}"
    return table


def seeds_needed(sigma2: float, delta: float) -> dict:
    """n a cell for POWER at delta (normal approximation of the one-sided test of a 2x2 interaction whose variance
    is 4 sigma^2 / n), clipped to [N_MIN, N_MAX], with the power and the 80% detectable effect at that n."""
    z = stats.norm.ppf(1 - ALPHA) + stats.norm.ppf(POWER)
    wanted = math.inf if delta == 0 else math.ceil(4 * sigma2 * z ** 2 / delta ** 2)
    n = int(min(max(wanted, N_MIN), N_MAX))
    se = math.sqrt(4 * sigma2 / n)
    return {"sigma2": sigma2, "delta": delta, "n_for_power": wanted, "n": n, "capped": wanted > N_MAX,
            "power_at_delta": float(stats.norm.cdf(abs(delta) / se - stats.norm.ppf(1 - ALPHA))),
            "detectable_at_80": z * se}


def plan(sweep_dir: Path) -> dict:
    """The lr table, each study cell's flags with its lr (or why a cell is not ready), and the seeds."""
    runs = [validate.parse_log(path) for path in sorted((sweep_dir / "logs").glob("*.txt"))]
    table = lr_table(runs, sweep_lines(HERE / "sweep_cells.txt"))
    cells, not_ready = {}, {}
    for name, flags in STUDY_CELLS.items():
        entry = table.get(tuple(sorted(flags.items())))
        if entry is None:
            raise SystemExit(f"plan.py: study cell {name} ({flags}) is no line of sweep_cells.txt")
        if "why_not" in entry:
            not_ready[name] = entry["why_not"]
        else:
            cells[name] = {**flags, entry["lr_key"]: f"{entry['best']:g}"}
    result = {"table": table, "cells": cells, "not_ready": not_ready}
    if not not_ready:
        losses = {name: list(table[tuple(sorted(STUDY_CELLS[name].items()))]["losses"][float(flags[key])].values())
                  for name, flags in cells.items() for key in LR_KEYS if key in flags}
        sigma2 = float(np.mean([np.var(values, ddof=1) for values in losses.values()]))
        (high, low), (adam_high, adam_low) = CLAIMS[0]["contrast"]["interaction"]
        mean = lambda name: float(np.mean(losses[name]))
        delta = (mean(high) - mean(low)) - (mean(adam_high) - mean(adam_low))
        result["seeds"] = seeds_needed(sigma2, delta)
    return result


def claims_document(cells: dict[str, dict[str, str]]) -> dict:
    """claims.json for records/claims.py: the fixed claims over the cells at their chosen lrs."""
    return {"registered": "pre-registered: the claims, the lr rule and the seed rule are plan.py's, committed before "
                          "any log of the study (git log shows the order); the lrs and the seeds come from the sweep "
                          "by those rules",
            "logs": ["logs"], "caveats": CAVEATS,
            "cells": {name: {k: (float(v) if k in LR_KEYS + tuple(UNSET_DEFAULTS) else v)
                             for k, v in {**UNSET_DEFAULTS, **flags}.items()} for name, flags in cells.items()},
            "claims": [{"paper": PAPER, "metric": "final_val_loss", "direction": "greater", "paper_effect": None,
                        **claim} for claim in CLAIMS]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write cells.txt and claims.json when every cell is ready")
    parser.add_argument("--sweep", type=Path, default=HERE / "sweep", help="stage 1's folder (default: sweep/)")
    args = parser.parse_args(argv)
    result = plan(args.sweep)
    for key, entry in result["table"].items():
        means = entry.get("means", {})
        grid = "  ".join(f"{lr:g}:" + (f"{means[lr]:.4f}" if lr in means else
                                        f"{len(entry['losses'][lr])}/{len(SWEEP_SEEDS)} seeds")
                         for lr in sorted(entry["losses"]))
        chosen = entry.get("why_not") or f"best {entry['best']:g}"
        print(f"{' '.join(f'{k}={v}' for k, v in key):60} {entry['lr_key']:16} {grid}  -> {chosen}")
    if result["not_ready"]:
        print("plan: not ready: " + "; ".join(f"{name}: {why}" for name, why in result["not_ready"].items()))
        return 1
    seeds = result["seeds"]
    print(f"plan: sigma^2 {seeds['sigma2']:.3g} (pooled, seeds {SWEEP_SEEDS}), pilot interaction "
          f"{seeds['delta']:+.4f}: {seeds['n_for_power']} seeds a cell for {POWER:.0%} power, running {seeds['n']}"
          + (f" (capped: power {seeds['power_at_delta']:.0%} at the pilot's interaction; "
             f"{seeds['detectable_at_80']:.3f} detectable at 80%)" if seeds["capped"] else ""))
    if args.write:
        (HERE / "cells.txt").write_text("# The study's cells at their lrs, written by plan.py --write from sweep/\n"
                                        + "".join(" ".join(f"{k}={v}" for k, v in flags.items()) + "\n"
                                                  for flags in result["cells"].values()))
        (HERE / "claims.json").write_text(json.dumps(claims_document(result["cells"]), indent=1) + "\n")
        (HERE / "plan.json").write_text(json.dumps({"seeds": seeds, "cells": result["cells"]}, indent=1) + "\n")
        print(f"plan: wrote cells.txt, claims.json and plan.json; stage 3: seeds 0-{seeds['n'] - 1} (README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
