"""Final validation loss against the matrix learning rate for each optimizer of the sweep (from the logs'
`config:` and `final:` lines); prints the table and writes the plot. Usage: python plot.py LOGDIR OUT.png"""

import json
import sys
from pathlib import Path


def read(path: Path) -> dict | None:
    config = final = None
    for line in path.read_text().splitlines():
        if line.startswith("config: "):
            config = json.loads(line.removeprefix("config: "))
        elif line.startswith("final: "):
            final = json.loads(line.removeprefix("final: "))
    if config is None or final is None:
        return None
    lr = config["muonmax_lr"] if config["optimizer"] == "muonmax" else config["muon_lr"]
    name = config["optimizer"] + (f" + momo lb {config['momo_lb']:g}" if config["momo"] else "")
    return dict(name=name, lr=lr, loss=final["val_loss"])


def main(log_dir: str, out: str) -> None:
    runs = [r for r in map(read, sorted(Path(log_dir).glob("*.txt"))) if r is not None]
    series: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        series.setdefault(run["name"], []).append((run["lr"], run["loss"]))
    print(f"{'optimizer':16} " + "  ".join(f"{'lr':>8} {'val':>7}" for _ in range(4)))
    for name, points in sorted(series.items()):
        points.sort()
        spread = max(loss for _, loss in points) - min(loss for _, loss in points)
        print(f"{name:16} " + "  ".join(f"{lr:8.4g} {loss:7.4f}" for lr, loss in points) + f"   spread {spread:.4f}")
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, family in zip(axes, ("muon", "muonmax")):
        for name, points in sorted(series.items()):
            if name.split()[0] == family:
                lrs, losses = zip(*sorted(points))
                axis.plot(lrs, losses, marker="o", label=name)
        axis.set_xscale("log")
        family_lrs = sorted({lr for name, points in series.items() if name.split()[0] == family for lr, _ in points})
        axis.set_xticks(family_lrs, [f"{lr:g}" for lr in family_lrs])
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel(f"{'MUONMAX_LR' if family == 'muonmax' else 'MUON_LR'} (matrix lr)")
        axis.legend()
    axes[0].set_ylabel("final val loss (cpu preset)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"plot: {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
