"""The lr-sensitivity study's table and figure: the final val loss against the lr for Muon and MuonMax under
RMSNorm, without Momo (the lr sweep's runs, records/2026-12-02_research_lr_sweep) and with Momo at each lower bound
(this study's runs), with each curve's best lr and flatness (factors of 2 of lr around the best within 0.05 nats),
as the lr sweep's analyze.py computes them. Writes OUT/table.txt and OUT/sensitivity.png.
Usage: python analyze.py LOGDIR OUT"""

import importlib.util
import sys
from pathlib import Path

SWEEP = Path(__file__).resolve().parents[1] / "2026-12-02_research_lr_sweep"
_spec = importlib.util.spec_from_file_location("sweep_analyze", SWEEP / "analyze.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

def wanted(run: dict) -> bool:
    """Muon's and MuonMax's own lr curves under RMSNorm (not NorMuon, AdamW, Derf, or the Adam lr arm)."""
    norm, optimizer = run["arm"].split(" ")[:2]
    return norm == "rmsnorm" and optimizer in ("muon", "muonmax") and not run["arm"].endswith("ADAM_LR")


def style(arm: str) -> tuple[str, dict]:
    """Blue Muon, red MuonMax; solid without Momo, dashed with bound 0, dotted with the tight bound."""
    fmt = "-" if " momo " not in arm else ("--" if "lb=0 " in arm else ":")
    color = "tab:blue" if arm.startswith("rmsnorm muon ") else "tab:red"
    return fmt, {"color": color, "label": arm.rsplit(" ", 1)[0]}


def main(log_dir: str, out_dir: str) -> None:
    paths = sorted(Path(log_dir).glob("*.txt")) + sorted((SWEEP / "logs").glob("*.txt"))
    runs = [run for run in map(sweep.read, paths) if run is not None and wanted(run)]
    text, arms = sweep.table(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # a new folder is fine: the table and figures go there
    (out / "table.txt").write_text(text)
    print(text, end="")
    sweep.plot(arms, out / "sensitivity.png", relative=False, style=style, xlabel="matrix lr (MUON_LR, MUONMAX_LR)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
