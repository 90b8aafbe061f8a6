"""The NorMuon vs Muon vs AdamW study's table and figure from its logs (read by records/validate.py's parser).

    python analyze.py LOGDIR OUTDIR       # writes OUTDIR/table.txt and OUTDIR/loss.png

table.txt: per optimizer the seeds' final val losses, their mean and std and the time per run; then every pair's
difference of means with its 95% Welch CI (Welch-Satterthwaite df, as the norm x optimizer study computes its gaps)
and the two-sided Welch p (validate.py's welch_test). loss.png: each optimizer's train loss (logged every few
steps) and val loss minus Muon's at the same step, seed means, and every seed's final val loss.
"""

from __future__ import annotations

import importlib.util
import itertools
import statistics
import sys
from pathlib import Path

RECORDS = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("norm_analyze",
                                               RECORDS / "2026-11-26_norm_optimizer_ablation" / "analyze.py")
norm_analyze = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(norm_analyze)  # loads validate.py as norm_analyze.validate
validate = norm_analyze.validate

ORDER = ("normuon", "muon", "adamw")  # the paper's order: its method, its baseline, AdamW


def group(runs) -> dict[str, list]:
    """{optimizer: its runs in seed order}; a run of another norm, matrix lr or Adam settings is refused (this study
    compares the optimizers at one setting each: pooling two settings would hide the difference)."""
    groups: dict[str, list] = {}
    settings: dict[str, tuple] = {}
    for run in sorted(runs, key=lambda r: int(r.config["seed"])):
        norm, arm, _ = norm_analyze.cell_of(run)  # arm: the optimizer, plus its lr or Adam settings if not the usual
        optimizer = run.config["optimizer"]
        if settings.setdefault(optimizer, (norm, arm)) != (norm, arm):
            raise SystemExit(f"analyze.py: {run.path}: {norm} / {arm}, but other {optimizer} runs are "
                             f"{' / '.join(settings[optimizer])}; move one setting's logs to another folder")
        groups.setdefault(optimizer, []).append(run)
    return {name: groups[name] for name in sorted(groups, key=lambda n: (ORDER + (n,)).index(n))}


def table(groups: dict[str, list]) -> list[str]:
    lines = [f"{'optimizer':10} {'n':>2} {'mean':>8} {'std':>8} {'time/run':>9}   final val losses (seeds in order)"]
    losses = {name: [run.final_loss for run in runs] for name, runs in groups.items()}
    for name, runs in groups.items():
        std = statistics.stdev(losses[name]) if len(runs) > 1 else float("nan")
        minutes = statistics.mean(run.train_time_ms for run in runs) / 60000
        seeds = " ".join(f"{run.config['seed']}:{loss:.4f}" for run, loss in zip(runs, losses[name]))
        lines.append(f"{name:10} {len(runs):>2} {statistics.mean(losses[name]):8.4f} {std:8.4f} {minutes:7.2f}m   "
                     + seeds)
    lines += ["", "differences of means, row minus column optimizer (95% Welch CI, two-sided Welch p):"]
    for a, b in itertools.combinations(groups, 2):
        if len(losses[a]) < 2 or len(losses[b]) < 2:
            lines.append(f"  {a} - {b}: needs two runs of each for a CI")
            continue
        diff, low, high = norm_analyze.welch(losses[a], losses[b])
        p = validate.welch_test(losses[b], losses[a])["p"]  # its B - A is a - b here; the two-sided p is symmetric
        lines.append(f"  {a + ' - ' + b:18} {diff:+.4f}  [{low:+.4f}, {high:+.4f}]  p={p:.2g}")
    return lines


def val_curve(run) -> list[tuple[int, float]]:
    """(step, val loss) of every validation in the log."""
    return norm_analyze.train_curve(run, "val_loss")


def figure(groups: dict[str, list], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, finals) = plt.subplots(1, 2, figsize=(12, 4.5))
    # Every run sees the same batches in the same order (SEED changes only the initialization), so one chunk's
    # loss swings by +-0.5 nats from step to step alike in every run: the difference to Muon's loss on the same
    # step cancels that and leaves the optimizers' difference.
    base = {"train": dict(norm_analyze.seed_mean([norm_analyze.train_curve(r) for r in groups["muon"]])),
            "val": dict(norm_analyze.seed_mean([val_curve(r) for r in groups["muon"]]))}
    for i, (name, runs) in enumerate(groups.items()):
        color = f"C{i}"
        for kind, reader, fmt in (("train", norm_analyze.train_curve, "-"), ("val", val_curve, "o--")):
            mean = norm_analyze.seed_mean([reader(r) for r in runs])
            curves.plot([s for s, _ in mean], [v - base[kind][s] for s, v in mean], fmt, color=color,
                        alpha=0.6 if kind == "train" else 1.0, label=f"{name} {kind}")
        losses = [run.final_loss for run in runs]
        finals.scatter([i] * len(losses), losses, color=color, s=18)
        finals.errorbar(i + 0.15, statistics.mean(losses), yerr=statistics.stdev(losses) if len(losses) > 1 else 0,
                        fmt="_", color="k", capsize=3)
    curves.set_xlabel("step")
    curves.set_ylabel("loss minus Muon's at the same step (seed means)")
    curves.set_ylim(-0.3, 0.6)  # the first steps (losses near 5.9, differences of several nats) would hide the rest
    curves.axhline(0, color="k", lw=0.5)
    curves.legend(fontsize=8)
    finals.set_xticks(range(len(groups)), list(groups))
    finals.set_ylabel("final val loss (dots: seeds; bar: mean +- std)")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=90)
    plt.close(fig)


def main(log_dir: str, out_dir: str) -> None:
    runs, _ = validate.load_runs([log_dir])
    groups = group(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # a new folder is fine: the table and figures go there
    text = "\n".join(table(groups)) + "\n"
    (out / "table.txt").write_text(text)
    print(text, end="")
    figure(groups, out)
    print(f"figure: {out / 'loss.png'}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
