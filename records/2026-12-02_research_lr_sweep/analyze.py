"""The research preset's learning-rate sweep, from its logs' `config:` and `final:` / `stopped:` lines: one row per
arm (norm, optimizer, Momo and its bound if on, and which lr was swept), the final val loss at each lr, the best lr,
whether it lies at an edge of the range (then the range must grow), and the flatness: how many factors of 2 of lr
around the best stay within FLAT_NATS of it. A diverged run (`stopped:` for a non-finite loss) shows as "div".
Writes table.txt and sweep.png into OUT. Usage: python analyze.py LOGDIR OUT [MORE_LOGDIRS...] (the lr-sensitivity
study reads this sweep's logs with its own)."""

import json
import math
import sys
from pathlib import Path

# the swept flag of each arm: the matrix optimizer's own lr, or the Adam lr of embeddings, head and scalars
MATRIX_LR = {"normuon": "muon_lr", "muon": "muon_lr", "adamw": "adamw_matrix_lr", "muonmax": "muonmax_lr"}
PRESET_ADAM_LR = 0.004  # the research preset's ADAM_LR (the cpu preset's); the matrix arms keep it
SPEEDRUN_ADAM = (0.65, 0)  # (ADAM_BETA1, LR_WARMUP_STEPS) of #48, which the research preset keeps
FLAT_NATS = 0.05  # the MuonMax/Momo paper's question is how wide the good lr range is: within 0.05 nats of the best


def read(path: Path) -> dict | None:
    """One run: its arm, swept lr and final val loss (None when it diverged); None for a log that did not end."""
    config = end = None
    for line in path.read_text().splitlines():
        if line.startswith("config: "):
            config = json.loads(line.removeprefix("config: "))
        elif line.startswith(("final: ", "stopped: ")):
            end = line
    if config is None or end is None:
        return None
    if end.startswith("final: "):
        loss = json.loads(end.removeprefix("final: "))["val_loss"]
    elif json.loads(end.removeprefix("stopped: "))["reason"].startswith("non-finite"):
        loss = None
    else:  # stopped by a signal or a data error: not a result
        return None
    optimizer = config["optimizer"] + (f" momo lb={config['momo_lb']:g}" if config["momo"] else "")
    # the AdamW arms differ in the Adam settings of every group: the speedrun's, or beta1 0.9 with a warmup
    tuned = "" if (config["adam_beta1"], config["lr_warmup_steps"]) == SPEEDRUN_ADAM else \
        f" b1={config['adam_beta1']:g},wu={config['lr_warmup_steps']}"
    swept = MATRIX_LR[config["optimizer"]]
    if config["adam_lr"] != PRESET_ADAM_LR:  # the Adam lr arm, at one matrix lr (NorMuon at the preset's)
        return dict(arm=f"{config['norm']} {optimizer}{tuned} ADAM_LR", lr=config["adam_lr"], loss=loss,
                    matrix_lr=config[swept])
    return dict(arm=f"{config['norm']} {optimizer}{tuned} {swept.upper()}", lr=config[swept], loss=loss)


def with_preset_adam_lr(runs: list[dict]) -> list[dict]:
    """The Adam lr arm's runs change ADAM_LR only; its point at the preset's ADAM_LR is the matrix arm's run at the
    same matrix lr, which is added to it here (so that its best and flatness see that point)."""
    matrix_lrs = {(run["arm"], run["matrix_lr"]) for run in runs if "matrix_lr" in run}
    added = [dict(arm=adam_arm, lr=PRESET_ADAM_LR, loss=run["loss"]) for run in runs
             for adam_arm, matrix_lr in matrix_lrs
             if "matrix_lr" not in run and run["arm"].rsplit(" ", 1)[0] == adam_arm.rsplit(" ", 1)[0]
             and run["lr"] == matrix_lr]
    return runs + added


def flatness(points: list[tuple[float, float | None]]) -> float:
    """log2(highest lr / lowest lr) of the unbroken stretch of the sorted points, around the best, whose every loss
    is within FLAT_NATS of the best: 0 when both neighbours of the best are worse than that (or missing), 2 when
    the best and one neighbour on each side a factor of 2 away are within it. A diverged run breaks the stretch."""
    finite = [i for i, (_, loss) in enumerate(points) if loss is not None]
    best = min(finite, key=lambda i: points[i][1])
    limit = points[best][1] + FLAT_NATS

    def within(i: int) -> bool:
        return 0 <= i < len(points) and points[i][1] is not None and points[i][1] <= limit

    low = high = best
    while within(low - 1):
        low -= 1
    while within(high + 1):
        high += 1
    return math.log2(points[high][0] / points[low][0])


def table(runs: list[dict]) -> tuple[str, dict[str, list[tuple[float, float | None]]]]:
    arms: dict[str, list[tuple[float, float | None]]] = {}
    for run in runs:
        arms.setdefault(run["arm"], []).append((run["lr"], run["loss"]))
    lines = []
    for arm, points in sorted(arms.items()):
        points.sort()
        finite = [(loss, lr) for lr, loss in points if loss is not None]
        cells = "  ".join(f"{lr:g}:{'div' if loss is None else f'{loss:.4f}'}" for lr, loss in points)
        if finite:
            best_loss, best_lr = min(finite)
            edge = best_lr in (points[0][0], points[-1][0])
            lines.append(f"{arm:32} best {best_lr:g} ({best_loss:.4f}{', AT AN EDGE' if edge else ''}), "
                         f"flat {flatness(points):.1f}  {cells}")
        else:
            lines.append(f"{arm:32} every run diverged  {cells}")
    return "\n".join(lines) + "\n", arms


def plot(arms: dict[str, list[tuple[float, float | None]]], out: Path, relative: bool = True, style=None,
         xlabel: str = "lr / the arm's best lr") -> None:
    """Final val loss against lr, one curve per arm. relative: x is lr / the arm's best lr, so arms on different lr
    scales share one axis; else the lr itself. style(arm) -> (matplotlib format, keyword arguments) of its curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axis = plt.subplots(figsize=(8, 5))
    for arm, points in sorted(arms.items()):
        finite = [(lr, loss) for lr, loss in points if loss is not None]
        if finite:
            scale = min(finite, key=lambda point: point[1])[0] if relative else 1.0
            fmt, kwargs = style(arm) if style else ("-", {"label": arm})
            axis.plot([lr / scale for lr, _ in finite], [loss for _, loss in finite], fmt, marker="o", **kwargs)
    axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("final val loss (research preset, 200 steps, bytes)")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(log_dir: str, out_dir: str, *more_log_dirs: str) -> None:
    paths = [path for folder in (log_dir, *more_log_dirs) for path in sorted(Path(folder).glob("*.txt"))]
    runs = with_preset_adam_lr([run for run in map(read, paths) if run is not None])
    text, arms = table(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # a new folder is fine: the table and figures go there
    (out / "table.txt").write_text(text)
    print(text, end="")
    plot(arms, out / "sweep.png")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
