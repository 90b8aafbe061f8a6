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


def plot(arms: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axis = plt.subplots(figsize=(8, 5))
    for arm, points in sorted(arms.items()):
        finite = [(lr, loss) for lr, loss in points if loss is not None]
        style = "-" if " momo " not in arm else ("--" if "lb=0 " in arm else ":")  # no Momo / bound 0 / tight bound
        color = "tab:blue" if arm.startswith("rmsnorm muon ") else "tab:red"
        axis.plot([lr for lr, _ in finite], [loss for _, loss in finite], style, color=color, marker="o",
                  label=arm.rsplit(" ", 1)[0])
    axis.set_xscale("log", base=2)
    axis.set_xlabel("matrix lr (MUON_LR, MUONMAX_LR)")
    axis.set_ylabel("final val loss (research preset, 200 steps, bytes)")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(log_dir: str, out_dir: str) -> None:
    paths = sorted(Path(log_dir).glob("*.txt")) + sorted((SWEEP / "logs").glob("*.txt"))
    runs = [run for run in map(sweep.read, paths) if run is not None and wanted(run)]
    text, arms = sweep.table(runs)
    out = Path(out_dir)
    (out / "table.txt").write_text(text)
    print(text, end="")
    plot(arms, out / "sensitivity.png")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
