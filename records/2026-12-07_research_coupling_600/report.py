#!/usr/bin/env python3
"""Stage 4 of this study, computed from its logs (logs/) and claims.json: each cell's final val loss, and the
primary claim's 2x2 interaction at every validation (every 50 steps) with its 95% CI, as a table and a figure.

    python records/2026-12-07_research_coupling_600/report.py           # the tables, printed
    python records/2026-12-07_research_coupling_600/report.py --write   # also trajectory.png and README.md's block
    python records/2026-12-07_research_coupling_600/report.py --check   # exit 1 when README.md's block is stale

The interaction at a step is records/claims.py's (validate.interaction_contrast: Welch-Satterthwaite over the four
cells' val losses at that step), its CI estimate +- t_{0.975, df} * SE. The verdicts are claims.py's alone
(python records/claims.py --readme); this file only shows the numbers they come from and how they moved.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RECORDS = HERE.parent
if "claims" in sys.modules:  # one module whoever loaded it first (the tests load it under this name)
    claims = sys.modules["claims"]
else:
    _spec = importlib.util.spec_from_file_location("claims", RECORDS / "claims.py")
    claims = importlib.util.module_from_spec(_spec)
    sys.modules["claims"] = claims
    _spec.loader.exec_module(claims)
validate = claims.validate

BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
LR_KEYS = ("muon_lr", "adamw_matrix_lr")


def load(study: Path) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """claims.json and the usable runs of each of its cells."""
    spec = claims.load_claims(study)
    runs, _ = validate.load_runs([str(study / folder) for folder in spec["logs"]])
    return spec, claims.cell_runs(runs, spec["cells"], study / "claims.json")


def cell_rows(spec: dict[str, Any], runs_of: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Per cell, in claims.json's order: its lr, n, the mean and SD of the final val loss, the mean's 95% CI."""
    rows = []
    for name, cell in spec["cells"].items():
        losses = [run.final_loss for run in runs_of[name]]
        n, mean = len(losses), float(np.mean(losses))
        sd = float(np.std(losses, ddof=1)) if n > 1 else math.nan
        low, high = claims.confidence_interval(mean, sd / math.sqrt(n), n - 1) if n > 1 else (math.nan, math.nan)
        lr = next((f"{key} {cell[key.upper()]:g}" for key in LR_KEYS if key.upper() in cell), "")
        rows.append({"cell": name, "lr": lr, "n": n, "mean": mean, "sd": sd, "low": low, "high": high})
    return rows


def trajectory(runs_of: dict[str, list[Any]], interaction: list[list[str]]) -> list[dict[str, float]]:
    """The interaction (a1 - a2) - (b1 - b2) of val loss at every step that every run of the four cells validated,
    interaction = [[a1, a2], [b1, b2]] as in claims.json."""
    (a1, a2), (b1, b2) = interaction
    cells = (a1, a2, b1, b2)
    curves = {name: [dict(run.val_curve) for run in runs_of[name]] for name in cells}  # step -> loss, each run
    steps = sorted(set.intersection(*(set(curve) for name in cells for curve in curves[name])))
    points = []
    for step in steps:
        result = claims.interaction(*([curve[step] for curve in curves[name]] for name in cells))
        low, high = claims.confidence_interval(result["estimate"], result["se"], result["df"])
        points.append({"step": step, **result, "low": low, "high": high})
    return points


def primary(spec: dict[str, Any]) -> dict[str, Any]:
    """The first claim whose contrast is an interaction: the primary test (plan.py lists it first)."""
    return next(claim for claim in spec["claims"] if "interaction" in claim["contrast"])


def markdown(rows: list[dict[str, Any]], points: list[dict[str, float]], claim: dict[str, Any]) -> str:
    (a1, a2), (b1, b2) = claim["contrast"]["interaction"]
    lines = ["Final val loss (nats per byte) of each cell, at its own lr (plan.py), 95% CI of the mean:", "",
             "| cell | lr | n | mean | SD | 95% CI |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['cell']} | {r['lr']} | {r['n']} | {r['mean']:.4f} | {r['sd']:.4f} | "
              f"[{r['low']:.4f}, {r['high']:.4f}] |" for r in rows]
    lines += ["", f"{claim['claim']}: ({a1} - {a2}) - ({b1} - {b2}) at each validation (positive: the paper's sign), "
                  "95% CI (trajectory.png):", "", "| step | interaction | 95% CI | df |", "|---|---|---|---|"]
    lines += [f"| {p['step']} | {p['estimate']:+.4f} | [{p['low']:+.4f}, {p['high']:+.4f}] | {p['df']:.1f} |"
              for p in points]
    return "\n".join(lines)


def plot(points: list[dict[str, float]], claim: dict[str, Any], path: Path) -> None:
    """The interaction over the steps with its CI band, written to path (PNG)."""
    import matplotlib
    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt
    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(steps, [p["low"] for p in points], [p["high"] for p in points], alpha=0.25, label="95% CI")
    ax.plot(steps, [p["estimate"] for p in points], marker="o", label="interaction")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss interaction (nats per byte)")
    ax.set_title(claim["claim"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=HERE, help="the study's folder (default: this one)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="write trajectory.png and README.md's report block")
    action.add_argument("--check", action="store_true", help="exit 1 when README.md's report block is stale")
    args = parser.parse_args(argv)
    try:
        spec, runs_of = load(args.study)
    except (claims.ClaimsError, validate.InputError) as exc:
        print(f"report.py: {exc}", file=sys.stderr)
        return 2
    claim = primary(spec)
    points = trajectory(runs_of, claim["contrast"]["interaction"])
    text = markdown(cell_rows(spec, runs_of), points, claim)
    readme = args.study / "README.md"
    if args.check or args.write:
        current = readme.read_text()
        if BEGIN not in current or END not in current:
            print(f"report.py: {readme} has no report block: put the line {BEGIN} and, below it, the line {END} "
                  "where the tables go, then rerun with --write", file=sys.stderr)
            return 2
        wanted = claims.with_block(current, BEGIN, END, text, readme)
        if args.check:
            if wanted != current:
                print(f"report.py: {readme} is stale: run python {readme.parent.name}/report.py --write",
                      file=sys.stderr)
                return 1
            return 0
        readme.write_text(wanted)
        plot(points, claim, args.study / "trajectory.png")
        print(f"report.py: wrote {readme} and {args.study / 'trajectory.png'}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
