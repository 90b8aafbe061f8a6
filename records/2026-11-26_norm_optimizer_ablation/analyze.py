"""The study's table and figures from its logs (this project's log format, read by records/validate.py's parser).

    python analyze.py LOGDIR OUTDIR       # writes OUTDIR/table.txt, loss.png, saturation.png, growth.png

table.txt: per cell (NORM, OPTIMIZER, NORM_ALPHA) the seeds' final val losses, mean, std and time; Derf's and
DyT's gap to RMSNorm under each optimizer with a 95% Welch CI; the growth of the gap from AdamW to Muon (the
interaction); and the share of the Muon gap that each remedy recovers. The figures average the seeds of a cell.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path

from scipy import stats

VALIDATE = Path(__file__).resolve().parents[1] / "validate.py"
_spec = importlib.util.spec_from_file_location("validate", VALIDATE)
validate = importlib.util.module_from_spec(_spec)
sys.modules["validate"] = validate  # its dataclasses look the module up here
_spec.loader.exec_module(validate)

MATRICES = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_fc", "mlp_proj")


def adam_settings(config: dict) -> str:
    """'' for the speedrun's Adam settings (beta1 0.65, no lr warmup; logs older than LR_WARMUP_STEPS have none),
    else ' b1=<beta1>,wu=<warmup steps>': an arm of its own, never pooled with the other (they apply to every Adam
    group, so they change the embeddings' and head's training too)."""
    beta1, warmup = float(config["adam_beta1"]), int(config.get("lr_warmup_steps", 0))
    return "" if (beta1, warmup) == (0.65, 0) else f" b1={beta1:g},wu={warmup}"


# the matrix lr of each optimizer, and the value this study's runs had (the cpu and research presets' own): a run at
# another lr is a cell of its own ("adamw lr=0.001")
MATRIX_LR = {"adamw": ("adamw_matrix_lr", 0.002), "muon": ("muon_lr", 0.012), "normuon": ("muon_lr", 0.012)}


def cell_of(run) -> tuple[str, str, float | None]:
    """(NORM, OPTIMIZER with its Adam settings if not the speedrun's and its matrix lr if not the presets', NORM_ALPHA);
    alpha None for rmsnorm."""
    config = run.config
    alpha = float(config["norm_alpha"]) if config["norm"] != "rmsnorm" else None
    key, usual = MATRIX_LR[config["optimizer"]]
    lr = "" if float(config[key]) == usual else f" lr={float(config[key]):g}"
    return config["norm"], config["optimizer"] + adam_settings(config) + lr, alpha


def label(cell: tuple[str, str, float | None]) -> str:
    norm, optimizer, alpha = cell
    extra = f" alpha {alpha:g}" if alpha not in (None, 0.5) else ""
    return f"{norm}{extra} / {optimizer}"


def train_curve(run, field: str = "train_loss") -> list[tuple[int, float]]:
    """(step, value) of every step line that carries `field` ("train_loss", or "val_loss" for the validations)."""
    points = []
    for line in run.path.read_text().splitlines():
        match = validate.STEP_LINE.match(line)
        if match and match[field] is not None:
            points.append((int(match["step"]), float(match[field])))
    return points


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its 95% Welch CI."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.mean(a) - statistics.mean(b)
    if va + vb == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    return diff, diff - half, diff + half


def seed_mean(series: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Pointwise mean over seeds of (step, value) series (steps present in every seed)."""
    common = set.intersection(*({step for step, _ in s} for s in series))
    return [(step, statistics.mean(dict(s)[step] for s in series)) for step in sorted(common)]


def diag_series(run, key: str, sites: tuple[str, ...] | None = None) -> dict[str, list[tuple[int, float]]]:
    """{site: [(step, value)]} of `key` ('sat99', 'arg_abs_p99', 'rms', 'spectral') from the diag lines: the
    per-layer sites '<layer>.attn_norm', '<layer>.mlp_norm' and 'final_norm' (norm keys), or the matrices."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in run.diagnostics:
        step = record["step"]
        if f"final_norm_{key}" in record:
            out.setdefault("final", []).append((step, record[f"final_norm_{key}"]))
        for layer in record["layers"]:
            index = layer["block"].split(".")[1]
            for name in (sites or ("attn_norm", "mlp_norm")):
                if f"{name}_{key}" in layer:
                    out.setdefault(f"L{index} {name.replace('_norm', '')}", []).append((step, layer[f"{name}_{key}"]))
    return out


def mean_over_seeds(runs, key: str, sites=None) -> dict[str, list[tuple[int, float]]]:
    per_run = [diag_series(run, key, sites) for run in runs]
    names = set.intersection(*(set(s) for s in per_run)) if per_run else set()
    return {name: seed_mean([s[name] for s in per_run]) for name in sorted(names)}


def table(cells: dict) -> list[str]:
    width = max([28] + [len(label(cell)) for cell in cells])  # the cell column fits the longest label
    lines = [f"{'cell':{width}} {'n':>2} {'mean':>8} {'std':>8} {'min':>8} {'max':>8} {'time/run':>9}"
             "   final val losses"]
    for cell, runs in cells.items():
        losses = [r.final_loss for r in runs]
        std = statistics.stdev(losses) if len(losses) > 1 else math.nan
        minutes = statistics.mean(r.train_time_ms for r in runs) / 60000
        lines.append(f"{label(cell):{width}} {len(runs):>2} {statistics.mean(losses):8.4f} {std:8.4f} "
                     f"{min(losses):8.4f} {max(losses):8.4f} {minutes:7.2f}m   "
                     + " ".join(f"{x:.4f}" for x in losses))
    losses = {cell: [r.final_loss for r in runs] for cell, runs in cells.items()}
    lines += ["", "gap to rmsnorm under the same optimizer (mean difference, 95% Welch CI):"]
    gaps = {}
    for cell in losses:
        norm, optimizer, _ = cell
        base = losses.get(("rmsnorm", optimizer, None))
        if norm != "rmsnorm" and base and len(base) > 1 and len(losses[cell]) > 1:
            gaps[cell] = welch(losses[cell], base)
            diff, low, high = gaps[cell]
            lines.append(f"  {label(cell):{width}} {diff:+.4f}  [{low:+.4f}, {high:+.4f}]")
    derf_adamw = next((v for k, v in gaps.items() if k[:2] == ("derf", "adamw") and k[2] == 0.5), None)
    derf_muon = next((v for k, v in gaps.items() if k[:2] == ("derf", "muon") and k[2] == 0.5), None)
    if derf_adamw and derf_muon:
        lines += ["", f"Derf gap under Muon minus under AdamW (the interaction; CI from validate.py --by): "
                      f"{derf_muon[0] - derf_adamw[0]:+.4f}"]
    if derf_muon and derf_muon[0] > 0:
        # a share is a ratio over Derf's gap: printed only when that gap's CI excludes 0 (records/claims.py's rule)
        shares = derf_muon[1] > 0
        lines += ["", "share of Derf's Muon gap that a remedy recovers, 1 - gap(remedy) / gap(derf), from the means"
                      + (":" if shares else f" (refused: Derf's gap's 95% CI [{derf_muon[1]:+.4f}, "
                                            f"{derf_muon[2]:+.4f}] includes 0):")]
        for cell, (diff, low, high) in gaps.items():
            if cell[1] == "muon" and cell != ("derf", "muon", 0.5) and cell[0] != "dyt":
                change, change_low, change_high = welch(losses[cell], losses[("derf", "muon", 0.5)])
                share = f"{1 - diff / derf_muon[0]:6.1%}" if shares else f"{'-':>6}"
                lines.append(f"  {label(cell):{width}} {share}  (its gap {diff:+.4f} "
                             f"[{low:+.4f}, {high:+.4f}] against derf's {derf_muon[0]:+.4f} "
                             f"[{derf_muon[1]:+.4f}, {derf_muon[2]:+.4f}]; it minus derf: {change:+.4f} "
                             f"[{change_low:+.4f}, {change_high:+.4f}])")
    return lines


def figures(cells: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {cell: f"C{i}" for i, cell in enumerate(cells)}
    # 1: train loss (seed mean of the logged points, one every TRAIN_LOG_EVERY steps) and final val loss per seed
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for cell, runs in cells.items():
        curve = seed_mean([train_curve(r) for r in runs])
        left.plot(*zip(*curve), "-" if cell[1] == "muon" else "--", color=colors[cell], label=label(cell))
    left.set_xlabel("step")
    left.set_ylabel("train loss (seed mean; muon solid, adamw dashed)")
    left.set_ylim(top=8)
    left.legend(fontsize=7)
    for i, (cell, runs) in enumerate(cells.items()):
        losses = [r.final_loss for r in runs]
        right.scatter([i] * len(losses), losses, color=colors[cell], s=18)
        right.errorbar(i + 0.15, statistics.mean(losses), yerr=statistics.stdev(losses) if len(losses) > 1 else 0,
                       fmt="_", color="k", capsize=3)
    right.set_xticks(range(len(cells)), [label(c) for c in cells], rotation=35, ha="right", fontsize=7)
    right.set_ylabel("final val loss (dots: seeds; bar: mean +- std)")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=90)
    plt.close(fig)

    # 2: saturation and squash-argument scale of every norm site over training, bounded cells only
    bounded = [cell for cell in cells if cell[0] != "rmsnorm"]
    fig, axes = plt.subplots(len(bounded), 2, figsize=(12, 2.6 * len(bounded)), squeeze=False)
    for row, cell in zip(axes, bounded):
        for axis, key, title in zip(row, ("sat99", "arg_abs_p99"),
                                    ("fraction of |squash| > 0.99", "99th pct of |alpha x + s| (squash argument)")):
            for i, (site, series) in enumerate(mean_over_seeds(cells[cell], key).items()):
                style = "-" if "mlp" in site else "--" if "attn" in site else ":"
                axis.plot(*zip(*series), style, color="k" if site == "final" else f"C{i // 2}", label=site)
            axis.set_title(f"{label(cell)}: {title}", fontsize=9)
            if key == "arg_abs_p99":
                axis.set_yscale("log")
        row[0].legend(fontsize=6, ncol=4)
    axes[-1][0].set_xlabel("step")
    axes[-1][1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "saturation.png", dpi=80)
    plt.close(fig)

    # 3: weight growth: mean spectral norm of the hidden matrices, the residual RMS at the final norm, and the
    # RMS of the last MLP norm's input
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for cell, runs in cells.items():
        spectral = mean_over_seeds(runs, "spectral", MATRICES)
        steps = sorted(set.intersection(*(set(s for s, _ in v) for v in spectral.values())))
        mean_sigma = [statistics.mean(dict(v)[s] for v in spectral.values()) for s in steps]
        style = "-" if cell[1] == "muon" else "--"
        axes[0].plot(steps, mean_sigma, style, color=colors[cell], label=label(cell))
        final_rms = mean_over_seeds(runs, "rms").get("final")
        if final_rms:
            axes[1].plot(*zip(*final_rms), style, color=colors[cell], label=label(cell))
        proj = mean_over_seeds(runs, "spectral", ("mlp_proj",))
        if proj:
            last = sorted(proj)[-1]
            axes[2].plot(*zip(*proj[last]), style, color=colors[cell], label=label(cell))
    axes[0].set_title("mean spectral norm of the hidden matrices", fontsize=9)
    axes[1].set_title("RMS of the final norm's input (residual stream)", fontsize=9)
    axes[1].set_yscale("log")
    axes[2].set_title("spectral norm of the last layer's MLP output matrix", fontsize=9)
    for axis in axes:
        axis.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "growth.png", dpi=90)
    plt.close(fig)


def main(log_dir: str, out_dir: str) -> None:
    runs, excluded = validate.load_runs([log_dir])
    cells: dict = {}
    order = {"rmsnorm": 0, "derf": 1, "derf_ema": 2, "dyt": 3}
    for run in sorted(runs, key=lambda r: (cell_of(r)[1], order[r.config["norm"]],
                                           -float(r.config["norm_alpha"]), r.config["seed"])):
        cells.setdefault(cell_of(run), []).append(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # a new folder is fine: the table and figures go there
    text = "\n".join(table(cells)) + "\n"
    (out / "table.txt").write_text(text)
    print(text)
    figures(cells, out)
    print(f"figures: {out / 'loss.png'}, {out / 'saturation.png'}, {out / 'growth.png'}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
