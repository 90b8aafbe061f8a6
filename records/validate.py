#!/usr/bin/env python3
"""Validate speedrun results: final losses, the record t-test, comparisons, factorial tables and plots.

Usage (each PATH is a log file or a folder; a folder contributes its *.txt files, not recursively):

    python records/validate.py logs/                         # record? mean final val loss < 3.28 at p < 0.01
    python records/validate.py --target 3.28 --alpha 0.01 a.txt b.txt c.txt
    python records/validate.py --compare records/old/ records/new/   # Welch t-tests of losses and times, B vs A
    python records/validate.py --by NORM,OPTIMIZER logs/     # factorial table and 2x2 interaction contrasts
    python records/validate.py --plot curves.png logs/       # val-loss curves (+ diagnostics); needs matplotlib
    python records/validate.py --json logs/                  # the same results as one JSON document on stdout
    python records/validate.py --pool logs/                  # pool runs of different configurations anyway

Logs: this project's logs (source of train_gpt.py, a line of 100 '=', then `config: {json}`, step lines,
optional `diag: {json}` lines, `peak memory ...` and `final: {json}` or, for a run that diverged, was interrupted
or met a bad shard, `stopped: {json}`) and the public modded-nanogpt logs (source, then step lines only; the final
val loss is the val_loss logged at step N of `step:N/N`). Only lines after the first separator line are parsed,
and a step line must match the whole step-line pattern from its first character, so source code that mentions
"step:" is never read as data.
A log that did not finish, diverged, or holds a NaN/inf loss is named on stderr with the reason and left out.
A log whose `resumed:` line names another log (RESUME=...) continues it: the pair counts as one run.
Runs whose `config:` lines differ in anything but PER_RUN_KEYS (seed, run_tag, log_dir, git_commit, and the
checkpoint and timeout flags) are not pooled into one test: each --compare set and the record set must be one
configuration, or validate.py names the differing keys and exits 2 (--pool pools them anyway, with a warning).
--by splits its cells by every other key that differs (e.g. `--by NORM,OPTIMIZER` over runs of NORM_ALPHA 0.5 and
0.3 gives cells per NORM_ALPHA value too, and contrasts only between cells of one NORM_ALPHA), so a --by cell is
always one configuration.

Exit codes: 0 the test passed (default mode: p < alpha, a record; --compare: the final losses differ at
p < alpha; --by: the table was computed), 1 it did not, 2 unusable input (bad arguments, an unreadable or missing
path, too few usable runs, runs of different configurations, final losses that do not vary), with a message that
names the input and the fix.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:
    from scipy import stats
except ImportError:  # reported by main() with the fix, so that the import itself never fails
    stats = None

EXIT_PASS, EXIT_FAIL, EXIT_UNUSABLE = 0, 1, 2
DEFAULT_TARGET = 3.28
DEFAULT_ALPHA = 0.01
CONFIDENCE = 0.95
SEPARATOR = "=" * 100
# `config:` keys that vary from run to run of one configuration: the seeds (what a set of runs varies: the init's,
# and the data order's when study.py --shuffle-data sets DATA_SEED = SEED), the tag and log folder (names), the
# commit (runs may straddle a commit that changed no behaviour), and the checkpoint and timeout flags (saving is
# outside the train time; a resumed run continues its run exactly). Every other key, device, world size and torch
# version included, is configuration: it changes the loss or the time, so runs that differ in one are not pooled
# into one test (--by gives them cells of their own) unless --pool is given.
PER_RUN_KEYS = ("seed", "data_seed", "run_tag", "log_dir", "git_commit", "resume", "save_checkpoint",
                "checkpoint_every", "checkpoint_dir", "checkpoint_keep", "dist_timeout")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
STEP_LINE = re.compile(
    rf"^step:(?P<step>\d+)/(?P<total>\d+)"
    rf"(?: val_loss:(?P<val_loss>{_NUMBER}))?(?: train_loss:(?P<train_loss>{_NUMBER}))?"
    rf" train_time:(?P<train_time>{_NUMBER})ms step_avg:{_NUMBER}ms(?: \S+:\S+)*\s*$",
    re.IGNORECASE,
)


class InputError(Exception):
    """Unusable input: the message names the input and the fix; main() turns it into exit code 2."""


@dataclass
class Run:
    """One training log: what it reports and, when it cannot be used, why not."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    final_loss: float | None = None
    final_step: int | None = None
    train_time_ms: float | None = None
    problem: str | None = None
    notes: list[str] = field(default_factory=list)
    resumed_from: str | None = None  # RESUME: the log name (no .txt) of the run this one continues
    resume_step: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The run's figures for the report (times in seconds)."""
        return {"path": str(self.path), "final_val_loss": self.final_loss, "step": self.final_step,
                "train_time_s": None if self.train_time_ms is None else self.train_time_ms / 1000,
                "config": self.config}


# ---- parsing ----

def log_section(text: str) -> list[tuple[int, str]]:
    """The (line number, line) pairs after the first separator line; the whole file when there is none."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.rstrip() == SEPARATOR:
            return list(enumerate(lines[index + 1:], start=index + 2))
    return list(enumerate(lines, start=1))


def _json_payload(line: str, prefix: str, number: int) -> dict[str, Any]:
    """Parse the JSON object after `prefix` on a log line; ValueError names the line when it is malformed."""
    try:
        payload = json.loads(line[len(prefix):])
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {number}: malformed `{prefix.strip()}` JSON ({exc.msg})") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"line {number}: `{prefix.strip()}` holds {type(payload).__name__}, not a JSON object")
    return payload


def parse_log(path: Path) -> Run:
    """Read one log into a Run; a log that cannot be used gets `problem` set. Raises InputError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read log {path}: {exc.strerror}; check the path and its permissions") from exc
    run = Run(path=path)
    steps: list[re.Match[str]] = []
    final: dict[str, Any] | None = None
    stopped: dict[str, Any] | None = None
    try:
        for number, line in log_section(text):
            if line.startswith("config: "):
                run.config = _json_payload(line, "config: ", number)
            elif line.startswith("final: "):
                final = _json_payload(line, "final: ", number)
            elif line.startswith("stopped: "):
                stopped = _json_payload(line, "stopped: ", number)
            elif line.startswith("resumed: "):
                resumed = _json_payload(line, "resumed: ", number)
                if not isinstance(resumed.get("from_log"), str) or not isinstance(resumed.get("step"), int):
                    raise ValueError(f"line {number}: `resumed:` needs from_log (a log name) and step (an integer)")
                run.resumed_from, run.resume_step = resumed["from_log"], resumed["step"]
            elif line.startswith("diag: "):
                try:
                    run.diagnostics.append(_json_payload(line, "diag: ", number))
                except ValueError as exc:
                    run.notes.append(f"{exc}; diagnostics line skipped")
            elif match := STEP_LINE.match(line):
                steps.append(match)
    except ValueError as exc:
        run.problem = str(exc)
        return run
    run.val_curve = [(int(m["step"]), float(m["val_loss"])) for m in steps if m["val_loss"] is not None]
    run.problem = _find_problem(steps, stopped) or _set_final(run, steps, final)
    return run


def _find_problem(steps: list[re.Match[str]], stopped: dict[str, Any] | None) -> str | None:
    """Why the run cannot count whatever its last lines say: it stopped, or it logged a non-finite loss."""
    if stopped is not None:
        return (f"run stopped at step {stopped.get('step', '?')}: {stopped.get('reason', 'no reason given')} "
                f"(last finite loss {stopped.get('last_finite_loss', '?')})")
    for match in steps:
        for kind in ("val_loss", "train_loss"):
            if match[kind] is not None and not math.isfinite(float(match[kind])):
                return f"non-finite {kind} {match[kind]} at step {match['step']}/{match['total']}"
    return None


def _set_final(run: Run, steps: list[re.Match[str]], final: dict[str, Any] | None) -> str | None:
    """Fill the final loss, step and time from the `final:` line or else from the step:N/N val line."""
    if final is not None:
        return _set_from_final_line(run, final)
    if not steps:
        return "no step lines (`step:i/N ... train_time:...ms`) after the source code; is this a training log?"
    total = int(steps[-1]["total"])
    last = [m for m in steps if m["val_loss"] is not None and int(m["step"]) == total]
    if not last:
        return (f"no val_loss at step {total}/{total} (last step logged: {steps[-1]['step']}); "
                "the run did not finish: rerun it or leave the log out")
    run.final_loss, run.final_step = float(last[-1]["val_loss"]), total
    run.train_time_ms = float(last[-1]["train_time"])
    return None


def _set_from_final_line(run: Run, final: dict[str, Any]) -> str | None:
    """Take the figures from this project's `final: {json}` line, checking its fields."""
    try:
        loss, step, time_ms = float(final["val_loss"]), int(final["step"]), float(final["train_time_ms"])
    except (KeyError, TypeError, ValueError) as exc:
        return f"malformed `final:` line ({exc!r}); expected val_loss, step and train_time_ms"
    if final.get("status", "complete") != "complete":
        return f"final status is {final['status']!r}, not 'complete'"
    if not math.isfinite(loss):
        return f"non-finite final val_loss {loss}"
    run.final_loss, run.final_step, run.train_time_ms = loss, step, time_ms
    return None


def collect_log_paths(inputs: Sequence[str]) -> list[Path]:
    """Expand files and folders (their *.txt, sorted) into log paths, each once; InputError on a bad path."""
    paths: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.glob("*.txt"))
            if not found:
                raise InputError(f"folder {path} holds no *.txt logs; pass the folder the trainer wrote its logs "
                                 "to (LOG_DIR, default logs/) or the log files themselves")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise InputError(f"{path} is neither a log file nor a folder; check the path")
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def join_resumed(runs: list[Run]) -> list[Run]:
    """A run resumed from a checkpoint (RESUME=...) writes a new log whose `resumed:` line names the log it
    continues; the pair (or chain) is one run: the continuation's final loss and total train time (the train
    clock resumes from the checkpoint), with the earlier log's validations before the resume step in its curve.
    Returns the runs without the continued logs, each named in a note on stderr; InputError when one log is
    continued by two (a branch would count its seed twice)."""
    by_name = {run.path.stem: run for run in runs}
    continuations: dict[str, list[Run]] = {}
    for run in runs:
        if run.resumed_from is not None:
            continuations.setdefault(run.resumed_from, []).append(run)
    branched = {name: found for name, found in continuations.items() if len(found) > 1}
    if branched:
        name, found = next(iter(branched.items()))
        raise InputError(f"{name} is continued by {len(found)} logs ({', '.join(r.path.name for r in found)}): "
                         "runs resumed twice from one run would count its seed twice; keep one continuation")
    continued = set()
    for run in sorted((r for r in runs if r.resumed_from is not None), key=lambda r: r.resume_step):
        earlier = by_name.get(run.resumed_from)
        if earlier is None:
            print(f"validate.py: note: {run.path.name} continues {run.resumed_from}, which is not among the inputs: "
                  f"counted alone (its curve starts at step {run.resume_step})", file=sys.stderr)
            continue
        continued.add(earlier.path)
        run.val_curve = [point for point in earlier.val_curve if point[0] < run.resume_step] + run.val_curve
        run.diagnostics = [d for d in earlier.diagnostics if d.get("step", 0) < run.resume_step] + run.diagnostics
        # the run's configuration is its first log's: a continuation may change only names, logging and
        # checkpoint settings, which must not split it from its sibling runs
        run.config = earlier.config or run.config
        print(f"validate.py: note: {earlier.path.name} continues in {run.path.name} (resumed at step "
              f"{run.resume_step}); the pair counts as one run", file=sys.stderr)
    return [run for run in runs if run.path not in continued]


def load_runs(inputs: Sequence[str]) -> tuple[list[Run], list[Run]]:
    """Parse every log under `inputs`; return (usable runs, excluded runs), warning on stderr for each exclusion."""
    runs = join_resumed([parse_log(path) for path in collect_log_paths(inputs)])
    for run in runs:
        for note in run.notes:
            print(f"validate.py: warning: {run.path}: {note}", file=sys.stderr)
        if run.problem is not None:
            print(f"validate.py: warning: excluded {run.path}: {run.problem}", file=sys.stderr)
    return [r for r in runs if r.problem is None], [r for r in runs if r.problem is not None]


# ---- statistics ----

def summarize(values: Sequence[float]) -> dict[str, Any]:
    """n, mean and sample standard deviation (ddof=1; None below two values)."""
    array = np.asarray(values, dtype=float)
    return {"n": int(array.size), "mean": float(array.mean()),
            "std": float(array.std(ddof=1)) if array.size > 1 else None}


def one_sample_test(losses: Sequence[float], target: float) -> dict[str, Any]:
    """One-sided `scipy.stats.ttest_1samp(losses, target, alternative='less')`: H1 is mean < target."""
    result = stats.ttest_1samp(np.asarray(losses, dtype=float), target, alternative="less")
    return {"target": target, "t": float(result.statistic), "df": float(result.df), "p": float(result.pvalue)}


def welch_test(group_a: Sequence[float], group_b: Sequence[float]) -> dict[str, Any]:
    """Welch t-test (`scipy.stats.ttest_ind(b, a, equal_var=False)`) with both means and b - a: p two-sided, and
    p_less one-sided, H1: mean B < mean A (the speedrun's rule for a lower loss or a faster run than the previous
    record: half the two-sided p when B is below A)."""
    a, b = np.asarray(group_a, dtype=float), np.asarray(group_b, dtype=float)
    result = stats.ttest_ind(b, a, equal_var=False)
    less = stats.ttest_ind(b, a, equal_var=False, alternative="less")
    return {"mean_a": float(a.mean()), "mean_b": float(b.mean()), "diff_b_minus_a": float(b.mean() - a.mean()),
            "t": float(result.statistic), "df": float(result.df), "p": float(result.pvalue),
            "p_less": float(less.pvalue)}


def interaction_contrast(cells: Sequence[Sequence[float]], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Interaction contrast of a 2x2 table and its confidence interval.

    `cells` = (y11, y12, y21, y22): y_ij holds the final losses at level i of the first key and level j of the
    second, m_ij and s_ij^2 their mean and sample variance (ddof=1), n_ij their count. The contrast is the
    difference (level 1 - level 2 of the first key) under level 2 of the second key minus the same difference
    under level 1, e.g. (derf - rmsnorm | optimizer=muon) - (derf - rmsnorm | optimizer=adamw):
        C = (m12 - m22) - (m11 - m21),
        SE = sqrt(sum_c s_c^2 / n_c)          (c runs over the four cells; independent, unequal variances),
        df = (sum_c s_c^2 / n_c)^2 / sum_c ((s_c^2 / n_c)^2 / (n_c - 1))   (Welch-Satterthwaite),
        CI = C +- t_{(1 + confidence) / 2, df} * SE,   p = 2 * P(T_df > |C| / SE).
    Every cell needs at least two runs; when all four cells have zero variance, SE = 0 and df, CI and p are None.
    """
    if any(len(cell) < 2 for cell in cells):
        raise ValueError("every cell of a 2x2 table needs at least two runs to estimate its variance")
    arrays = [np.asarray(cell, dtype=float) for cell in cells]
    means = [float(a.mean()) for a in arrays]
    squared_errors = [float(a.var(ddof=1)) / a.size for a in arrays]
    contrast = (means[1] - means[3]) - (means[0] - means[2])
    variance = sum(squared_errors)
    result: dict[str, Any] = {"contrast": contrast, "se": math.sqrt(variance), "df": None, "ci": None, "p": None,
                              "confidence": confidence}
    if variance > 0:
        df = variance ** 2 / sum(e ** 2 / (a.size - 1) for e, a in zip(squared_errors, arrays))
        half_width = float(stats.t.ppf((1 + confidence) / 2, df)) * result["se"]
        result.update(df=df, ci=[contrast - half_width, contrast + half_width],
                      p=float(2 * stats.t.sf(abs(contrast) / result["se"], df)))
    return result


# ---- grouping (--by) ----

def config_value(run: Run, key: str) -> str | None:
    """The run's config value for `key` (matched case-insensitively) as text, None when the key is absent."""
    for name, value in run.config.items():
        if name.lower() == key.lower():
            return value if isinstance(value, str) else json.dumps(value)
    return None


def group_by(runs: Sequence[Run], keys: Sequence[str],
             split_keys: Sequence[str] = ()) -> tuple[dict[tuple[str, ...], list[Run]], list[Run]]:
    """Cells of runs keyed by their config values of `keys` and then `split_keys` (sorted), and the runs that lack
    one of `keys`. A run without a split key gets the value "(absent)" there (it differs from the runs that have
    one, which is why the key splits the cells)."""
    cells: dict[tuple[str, ...], list[Run]] = {}
    missing: list[Run] = []
    for run in runs:
        values = tuple(config_value(run, key) for key in keys)
        if None not in values:
            values += tuple(config_value(run, key) or "(absent)" for key in split_keys)
        else:
            absent = [key for key, value in zip(keys, values) if value is None]
            run.problem = f"config has no {', '.join(absent)} (a public speedrun log has no config line)"
            print(f"validate.py: warning: excluded {run.path} from --by: {run.problem}", file=sys.stderr)
            missing.append(run)
            continue
        cells.setdefault(values, []).append(run)
    return dict(sorted(cells.items())), missing


def interactions(cells: dict[tuple[str, ...], list[Run]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Interaction contrasts of every 2x2 sub-table: two levels of keys[0] x two levels of keys[1], within
    each combination of the remaining keys' values. A sub-table with a cell of fewer than two runs is listed
    with the reason instead of a contrast."""
    if len(keys) < 2:
        return []
    losses = {values: [r.final_loss for r in runs] for values, runs in cells.items()}
    results = []
    strata = sorted({values[2:] for values in cells})
    for stratum in strata:
        first_levels = sorted({v[0] for v in cells if v[2:] == stratum})
        second_levels = sorted({v[1] for v in cells if v[2:] == stratum})
        for (a1, a2), (b1, b2) in itertools.product(itertools.combinations(first_levels, 2),
                                                    itertools.combinations(second_levels, 2)):
            label = (f"({a1} - {a2} | {keys[1]}={b2}) - ({a1} - {a2} | {keys[1]}={b1})"
                     + "".join(f" [{k}={v}]" for k, v in zip(keys[2:], stratum)))
            entry: dict[str, Any] = {"label": label, "first": [a1, a2], "second": [b1, b2],
                                     "stratum": dict(zip(keys[2:], stratum))}
            corners = [(a, b) for a in (a1, a2) for b in (b1, b2)]
            table = [losses.get(corner + stratum, []) for corner in corners]
            short = [f"{keys[0]}={a}, {keys[1]}={b} ({len(cell)} run(s))"
                     for (a, b), cell in zip(corners, table) if len(cell) < 2]
            if short:  # named, so that a cell the grid never had reads differently from one short of seeds
                entry["skipped"] = "every cell needs at least two runs to estimate its variance: " + "; ".join(short)
            else:
                entry.update(interaction_contrast(table))
            results.append(entry)
    return results


# ---- plotting ----

def load_pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend; InputError with the fix when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError as exc:
        raise InputError("--plot needs matplotlib, which is not installed: `pip install matplotlib` (optional, so "
                         "pinned in tests/requirements.txt, not in requirements.txt), or leave out --plot") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def diagnostic_series(diagnostics: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Per numeric diagnostic, its (step, value) series: top-level numbers as they are, and each numeric field
    of the per-layer dicts in `layers` averaged over the layers (`layers.<name> (mean)`)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in diagnostics:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(name, []).append((step, float(value)))
        layers = [layer for layer in record.get("layers", []) if isinstance(layer, dict)]
        names = sorted({n for layer in layers for n, v in layer.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for name in names:
            values = [float(layer[name]) for layer in layers if isinstance(layer.get(name), (int, float))]
            series.setdefault(f"layers.{name} (mean)", []).append((step, float(np.mean(values))))
    return series


def plot_groups(groups: dict[str, list[Run]], out: Path) -> None:
    """Val-loss curves, one colour per group, and one subplot per diagnostic when any run logged `diag:` lines."""
    pyplot = load_pyplot()
    per_run = {id(run): diagnostic_series(run.diagnostics) for runs in groups.values() for run in runs}
    metrics = sorted({name for series in per_run.values() for name in series})
    figure, axes = pyplot.subplots(1 + len(metrics), 1, figsize=(9, 4 + 3 * len(metrics)), squeeze=False)
    colours = pyplot.get_cmap("tab10")
    for index, (name, runs) in enumerate(groups.items()):
        for position, run in enumerate(runs):
            label = name if position == 0 else None
            if run.val_curve:
                steps, losses = zip(*run.val_curve)
                axes[0][0].plot(steps, losses, marker=".", color=colours(index % 10), label=label, alpha=0.8)
            for row, metric in enumerate(metrics, start=1):
                if metric in per_run[id(run)]:
                    steps, values = zip(*per_run[id(run)][metric])
                    axes[row][0].plot(steps, values, marker=".", color=colours(index % 10), label=label,
                                      alpha=0.8)
    axes[0][0].set(yscale="log", xlabel="step", ylabel="val loss", title="validation loss")
    for row, metric in enumerate(metrics, start=1):
        axes[row][0].set(xlabel="step", title=metric)
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    try:
        figure.savefig(out)
    except OSError as exc:
        raise InputError(f"cannot write plot {out}: {exc.strerror}; check the folder exists and is writable") from exc
    pyplot.close(figure)


# ---- reports ----

def group_report(name: str, runs: Sequence[Run]) -> dict[str, Any]:
    """Runs, loss summary and time summary (seconds) of one set of runs."""
    return {"name": name, "runs": [run.as_dict() for run in runs],
            "loss": summarize([run.final_loss for run in runs]),
            "time_s": summarize([run.train_time_ms / 1000 for run in runs])}


def require_runs(runs: Sequence[Run], minimum: int, what: str) -> None:
    """InputError unless `runs` holds at least `minimum` usable runs."""
    if len(runs) < minimum:
        raise InputError(f"{what} has {len(runs)} usable run(s), {minimum} needed for a t-test; "
                         "add finished logs (see the warnings above for the ones left out)")


def require_spread(sets: dict[str, Sequence[float]]) -> None:
    """InputError when no set's final losses vary: the t statistic's standard error is then zero, and scipy would
    report t = -inf, p = 0 (a "record" from two runs of one seed) or, at the target itself, p = nan."""
    if all(len(set(losses)) == 1 for losses in sets.values()):
        described = "; ".join(f"{name}: {len(losses)} x {losses[0]}" for name, losses in sets.items())
        raise InputError(f"the final losses do not vary ({described}); a t-test needs spread: add runs with other "
                         "seeds (runs of one seed on deterministic kernels repeat one sample)")


def value_before_flag(run: Run, key: str) -> Any:
    """The value that a log written before train_gpt.py had the flag `key` ran as (the behaviour from before it, as
    train_gpt's flags_before_they_existed says for checkpoints), or None for a key with no such value. ATTENTION's
    was auto's: FlexAttention on CUDA, dense attention elsewhere (the log's device)."""
    if key == "attention":
        return "flex" if str(run.config.get("device", "")).startswith("cuda") else "dense"
    return {"adam_bias_correction": True, "adamw_matrix_wd": 0.0, "data_seed": -1}.get(key)


def config_differences(runs: Sequence[Run], ignore: Sequence[str] = ()) -> dict[str, dict[str, list[Run]]]:
    """The `config:` keys whose values differ between runs (PER_RUN_KEYS and `ignore` left out), each as
    {value as JSON: runs}; a key missing from a run's config counts as the value it ran as when the flag came later
    (value_before_flag), else as "(absent)". Runs without a config line (public speedrun logs) are not compared."""
    configured = [run for run in runs if run.config]
    skipped = {key.lower() for key in (*PER_RUN_KEYS, *ignore)}
    differences: dict[str, dict[str, list[Run]]] = {}
    for key in sorted({key for run in configured for key in run.config if key.lower() not in skipped}):
        values: dict[str, list[Run]] = {}
        for run in configured:
            before = value_before_flag(run, key) if key not in run.config else None
            value = (json.dumps(run.config[key], sort_keys=True) if key in run.config
                     else "(absent)" if before is None else json.dumps(before))
            values.setdefault(value, []).append(run)
        if len(values) > 1:
            differences[key] = values
    return differences


def require_one_config(runs: Sequence[Run], what: str, pool: bool, by: Sequence[str] = ()) -> list[str]:
    """InputError naming the differing keys, values and a run of each, when `runs` mix configurations (beyond the
    --by keys); with `pool`, a warning instead. Returns the differing keys."""
    differences = config_differences(runs, by)
    unchecked = [run for run in runs if not run.config]
    if unchecked and len(unchecked) < len(runs):
        print(f"validate.py: warning: {what}: {len(unchecked)} log(s) without a `config:` line (public speedrun "
              f"logs, e.g. {unchecked[0].path}) pooled unchecked", file=sys.stderr)
    if not differences:
        return []
    shown = lambda value: value if len(value) <= 40 else value[:37] + "..."
    described = "; ".join(f"{key}: " + ", ".join(f"{shown(value)} ({len(group)} run(s), e.g. {group[0].path.name})"
                                                 for value, group in values.items())
                          for key, values in differences.items())
    if pool:
        print(f"validate.py: warning: --pool: {what} pools runs of different configurations ({described})",
              file=sys.stderr)
        return list(differences)
    grouping = ",".join([key.upper() for key in by] + [key.upper() for key in differences])
    raise InputError(f"{what} mixes configurations ({described}); a t-test needs runs of one configuration: "
                     f"split them into folders, group them with --by {grouping}, or pass --pool to pool them anyway")


def record_report(inputs: Sequence[str], target: float, alpha: float,
                  pool: bool = False) -> tuple[dict[str, Any], dict[str, list[Run]]]:
    """Default mode: every run, then the one-sided t-test of the mean final loss against `target`."""
    runs, excluded = load_runs(inputs)
    require_runs(runs, 2, "the input " + " ".join(inputs))
    pooled = require_one_config(runs, "the input " + " ".join(inputs), pool)
    require_spread({"the input " + " ".join(inputs): [r.final_loss for r in runs]})
    report = {"mode": "record", "alpha": alpha, "groups": [group_report("all", runs)],
              "excluded": [{"path": str(r.path), "reason": r.problem} for r in excluded],
              "test": one_sample_test([r.final_loss for r in runs], target), "pooled_over": pooled}
    report["passed"] = report["test"]["p"] < alpha
    return report, {str(run.path): [run] for run in runs}


def compare_report(path_a: str, path_b: str, alpha: float,
                   pool: bool = False) -> tuple[dict[str, Any], dict[str, list[Run]]]:
    """--compare: Welch t-tests of final losses and of train times, set B against set A (each of one
    configuration; the two may differ, that is the comparison)."""
    runs_a, excluded_a = load_runs([path_a])
    runs_b, excluded_b = load_runs([path_b])
    require_runs(runs_a, 2, f"set A ({path_a})")
    require_runs(runs_b, 2, f"set B ({path_b})")
    pooled = sorted(set(require_one_config(runs_a, f"set A ({path_a})", pool))
                    | set(require_one_config(runs_b, f"set B ({path_b})", pool)))
    require_spread({f"set A ({path_a})": [r.final_loss for r in runs_a],
                    f"set B ({path_b})": [r.final_loss for r in runs_b]})
    loss = welch_test([r.final_loss for r in runs_a], [r.final_loss for r in runs_b])
    time = welch_test([r.train_time_ms / 1000 for r in runs_a], [r.train_time_ms / 1000 for r in runs_b])
    report = {"mode": "compare", "alpha": alpha,
              "groups": [group_report(f"A: {path_a}", runs_a), group_report(f"B: {path_b}", runs_b)],
              "excluded": [{"path": str(r.path), "reason": r.problem} for r in excluded_a + excluded_b],
              "welch": {"loss": loss, "time_s": time}, "passed": loss["p"] < alpha, "pooled_over": pooled}
    return report, {f"A: {path_a}": runs_a, f"B: {path_b}": runs_b}


def by_report(inputs: Sequence[str], keys: Sequence[str], alpha: float,
              pool: bool = False) -> tuple[dict[str, Any], dict[str, list[Run]]]:
    """--by: runs grouped by config values, per-cell mean/std/n, and the 2x2 interaction contrasts. A config key
    that differs between the runs but is not among the --by keys (PER_RUN_KEYS apart) splits the cells too, as an
    extra key after them: runs that differ in anything are never pooled into one cell (with `pool`, they are, and
    the differing keys are named). Contrasts compare cells of equal extra-key values only."""
    runs, excluded = load_runs(inputs)
    if not runs:
        raise InputError(f"no usable run in {' '.join(inputs)}; see the warnings above for why each log was left out")
    with_keys = [run for run in runs if None not in (config_value(run, key) for key in keys)]
    split_keys = [] if pool else sorted(config_differences(with_keys, keys))
    if split_keys:
        print(f"validate.py: note: --by {','.join(keys).upper()}: cells also split by {', '.join(split_keys).upper()}"
              " (differing between the runs); contrasts compare cells with equal values of those only",
              file=sys.stderr)
    cells, missing = group_by(runs, keys, split_keys)
    if not cells:
        raise InputError(f"no usable run has config keys {', '.join(keys)}; --by needs this project's logs "
                         "(with a `config:` line) and keys among their hyperparameter names")
    keys = list(keys) + split_keys
    pooled = require_one_config([run for cell in cells.values() for run in cell], "--by " + ",".join(keys), pool,
                                by=keys)
    labels = {values: ", ".join(f"{k}={v}" for k, v in zip(keys, values)) for values in cells}
    report = {"mode": "by", "alpha": alpha, "keys": list(keys), "pooled_over": pooled,
              "groups": [dict(group_report(labels[values], cell), levels=list(values))
                         for values, cell in cells.items()],
              "excluded": [{"path": str(r.path), "reason": r.problem} for r in excluded + missing],
              "interactions": interactions(cells, keys), "passed": True}
    return report, {labels[values]: cell for values, cell in cells.items()}


def _number(value: float | None, digits: int = 5) -> str:
    """A fixed-point number, or '-' for None."""
    return "-" if value is None else f"{value:.{digits}f}"


def runs_text(group: dict[str, Any]) -> list[str]:
    """Per-run table lines: file, final val loss, steps, train time."""
    width = max([len("run")] + [len(run["path"]) for run in group["runs"]])
    lines = [f"{'run':<{width}}  {'val_loss':>8}  {'steps':>6}  {'train_time':>11}"]
    for run in group["runs"]:
        lines.append(f"{run['path']:<{width}}  {run['final_val_loss']:>8.4f}  {run['step']:>6}  "
                     f"{run['train_time_s']:>10.3f}s")
    return lines


def summary_text(group: dict[str, Any]) -> str:
    """One line: n, loss mean/std, time mean/std."""
    loss, time = group["loss"], group["time_s"]
    return (f"n={loss['n']}  loss mean={_number(loss['mean'])} std={_number(loss['std'])}  "
            f"time mean={_number(time['mean'], 3)}s std={_number(time['std'], 3)}s")


def welch_text(name: str, result: dict[str, Any], unit: str) -> str:
    """One line of a Welch comparison."""
    return (f"{name}: mean A={result['mean_a']:.5f}{unit}  mean B={result['mean_b']:.5f}{unit}  "
            f"B - A={result['diff_b_minus_a']:+.5f}{unit}  t={result['t']:.4f} df={result['df']:.2f} "
            f"p={result['p']:.4g} (one-sided, B below A: p={result['p_less']:.4g})")


def by_text(report: dict[str, Any]) -> list[str]:
    """The factorial table and the interaction contrasts."""
    keys = report["keys"]
    widths = [max([len(k)] + [len(g["levels"][i]) for g in report["groups"]]) for i, k in enumerate(keys)]
    lines = ["  ".join(f"{k:<{w}}" for k, w in zip(keys, widths)) + f"  {'n':>3}  {'mean':>8}  {'std':>8}  time"]
    for group in report["groups"]:
        lines.append("  ".join(f"{v:<{w}}" for v, w in zip(group["levels"], widths))
                     + f"  {group['loss']['n']:>3}  {_number(group['loss']['mean']):>8}  "
                     f"{_number(group['loss']['std']):>8}  {_number(group['time_s']['mean'], 3)}s")
    if report["interactions"]:
        lines.append(f"interaction contrasts ({CONFIDENCE:.0%} CI, Welch-Satterthwaite df):")
    for entry in report["interactions"]:
        if "skipped" in entry:
            lines.append(f"  {entry['label']}: skipped, {entry['skipped']}")
        elif entry["ci"] is None:
            lines.append(f"  {entry['label']} = {entry['contrast']:+.5f}  (zero variance in all four cells; no CI)")
        else:
            low, high = entry["ci"]
            lines.append(f"  {entry['label']} = {entry['contrast']:+.5f}  CI [{low:+.5f}, {high:+.5f}]  "
                         f"df={entry['df']:.1f}  p={entry['p']:.4g}")
    return lines


def report_text(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines: list[str] = []
    for group in report["groups"]:
        if report["mode"] != "record":
            lines.append(group["name"])
        lines += runs_text(group) + [summary_text(group), ""]
    if report["mode"] == "record":
        test = report["test"]
        verdict = "record" if report["passed"] else "not a record"
        lines += [f"one-sided t-test, H1: mean < {test['target']}: t={test['t']:.4f} df={test['df']:.0f} "
                  f"p={test['p']:.4g}",
                  f"{verdict}: p {'<' if report['passed'] else '>='} alpha={report['alpha']}"]
    elif report["mode"] == "compare":
        lines += ["Welch t-test (two-sided, unequal variances), B against A:",
                  welch_text("final val loss", report["welch"]["loss"], ""),
                  welch_text("train time", report["welch"]["time_s"], "s"),
                  f"losses {'differ' if report['passed'] else 'do not differ'} at alpha={report['alpha']}"]
    else:
        lines += by_text(report)
    if report.get("pooled_over"):
        lines.append(f"--pool: runs pooled over differing config keys {', '.join(report['pooled_over'])}")
    if "plot" in report:
        lines.append(f"plot written to {report['plot']}")
    if report["excluded"]:
        lines.append(f"excluded {len(report['excluded'])} log(s): " + "; ".join(
            f"{e['path']} ({e['reason']})" for e in report["excluded"]))
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """`value` with NaN/inf replaced by None, so that the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ---- command line ----

def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; see the module docstring for examples."""
    parser = argparse.ArgumentParser(
        prog="validate.py", description="Final val losses of speedrun logs and the record t-test (scipy).",
        epilog="Exit codes: 0 test passed, 1 not passed, 2 unusable input.")
    parser.add_argument("paths", nargs="*", metavar="PATH", help="log files, or folders of *.txt logs")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET,
                        help=f"val loss the mean must beat (default {DEFAULT_TARGET})")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"significance level (default {DEFAULT_ALPHA})")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="Welch t-tests of losses and times of set B against set A (each a file or folder)")
    parser.add_argument("--by", metavar="KEY[,KEY]",
                        help="group runs by config keys (case-insensitive), e.g. NORM,OPTIMIZER")
    parser.add_argument("--plot", type=Path, metavar="OUT.png",
                        help="write val-loss curves (and diagnostics) to this file; needs matplotlib")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    parser.add_argument("--pool", action="store_true",
                        help="pool runs whose `config:` lines differ (beyond seed, run_tag, log_dir, git_commit, the "
                             "checkpoint and timeout flags, and the --by keys) instead of refusing them; the "
                             "differing keys are still named on stderr")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """InputError for argument combinations and values that cannot work."""
    if stats is None:
        raise InputError("validate.py needs scipy: `pip install -r tests/requirements.txt`")
    if not 0 < args.alpha < 1:
        raise InputError(f"--alpha {args.alpha}: expected a number between 0 and 1, e.g. 0.01")
    if not math.isfinite(args.target):
        raise InputError(f"--target {args.target}: expected a finite loss, e.g. 3.28")
    if args.compare and (args.paths or args.by):
        raise InputError("--compare A B takes its two sets as its own arguments; drop the other paths and --by")
    if not args.compare and not args.paths:
        raise InputError("no logs given; pass log files or folders, e.g. `python records/validate.py logs/`")
    if args.by is not None and not [k for k in args.by.split(",") if k.strip()]:
        raise InputError(f"--by {args.by!r}: expected config keys separated by commas, e.g. NORM,OPTIMIZER")
    if args.plot is not None:
        load_pyplot()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if args.compare:
            report, groups = compare_report(*args.compare, alpha=args.alpha, pool=args.pool)
        elif args.by:
            keys = [key.strip().lower() for key in args.by.split(",") if key.strip()]
            report, groups = by_report(args.paths, keys, args.alpha, pool=args.pool)
        else:
            report, groups = record_report(args.paths, args.target, args.alpha, pool=args.pool)
        if args.plot is not None:
            plot_groups(groups, args.plot)
    except InputError as exc:
        print(f"validate.py: error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    if args.plot is not None:
        report["plot"] = str(args.plot)
    print(json.dumps(json_safe(report), indent=2) if args.json else report_text(report))
    return EXIT_PASS if report["passed"] else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
