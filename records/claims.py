#!/usr/bin/env python3
"""Verdicts on papers' claims, computed from a study's logs and its `claims.json`, never written by hand.

    python records/claims.py records/<study>               # the table: estimate, CI, p, Holm p, power, verdict
    python records/claims.py records/<study> --markdown    # the same as markdown (what the READMEs hold)
    python records/claims.py --readme                      # rewrite the generated claims sections of README.md and
                                                           # records/README.md from every records/*/claims.json
    python records/claims.py --readme --check              # exit 1, naming the command, when they are stale

Each claim in claims.json is one contrast of cells of runs (a difference of two cells, or a 2x2 interaction), a
direction the paper states, and a family. For each claim:
    estimate, SE, df    a difference: validate.welch_test's df, SE = sqrt(s_a^2/n_a + s_b^2/n_b); an interaction:
                        validate.interaction_contrast (Welch-Satterthwaite over its four cells)
    95% CI              estimate +- t_{0.975, df} * SE
    p                   one-sided, in the paper's direction: P(T_df >= t) for "greater", P(T_df <= t) for "less",
                        t = estimate / SE; p_opposite is the other tail
    Holm p              Holm's step-down adjustment of p within the claim's family (the testable claims of the
                        family in this claims.json); p_opposite is adjusted the same way, as its own family
    power               with the paper's effect size (in the metric's units): P(reject | true effect = it), the
                        noncentral t with noncentrality effect / SE, one-sided at ALPHA, unadjusted; without one, the
                        smallest effect detectable at POWER with the same test
    share               a claim with `share_of` (a "recovers X%" claim): estimate / the share_of contrast's
                        estimate, printed only when that denominator's 95% CI excludes 0 (otherwise the output says
                        the ratio is refused and why: a ratio over a denominator that may be 0 says nothing)

The verdict rule, fixed before looking at any estimate:
    supported      Holm-adjusted one-sided p in the paper's direction < ALPHA
    contradicted   Holm-adjusted one-sided p in the opposite direction < ALPHA
    inconclusive   neither; the output gives the power at the paper's effect or the smallest detectable effect. A
                   claim that cannot be tested (a cell with fewer than two runs, or no spread in any of its cells)
                   is inconclusive too, with the reason, and takes no part in its family's Holm adjustment.
Since p + p_opposite = 1, at most one of the first two holds. Holm keeps the family-wise error of each kind of
verdict at ALPHA. A claims.json marked "registered": "post hoc" was written after its runs: its verdicts are
a re-reading of data already seen, and every text generated from it says so. A "pre-registered" claims.json whose
log folders hold no log yet is pending: the table and the markdown say so and name its claims; the README summary
takes nothing from it.

claims.json (in the study folder; keys of cells are config keys, matched case-insensitively, values compared as
numbers when both are numbers):
    {"registered": "post hoc: ..." | "pre-registered: ...",
     "logs": ["logs", "../other_study/logs"],          # folders of *.txt logs, relative to the study folder
     "caveats": ["...", ...],                          # printed with the study's claims
     "cells": {"derf_muon": {"NORM": "derf", "OPTIMIZER": "muon", "MUON_LR": 0.012}, ...},
     "claims": [{"id": "...", "paper": "...", "statement": "what the paper says", "verbatim": true (its own words),
                 "claim": "the claim in a few words", "condition": "the arm this contrast tests it in" (optional),
                 "metric": "final_val_loss" | {"diagnostic": "layers.*_spectral (mean)", "step": 200},
                 "contrast": {"difference": ["a", "b"]} | {"interaction": [["a1", "a2"], ["b1", "b2"]]},
                 "direction": "greater" | "less", "paper_effect": 0.66 | null, "family": "...",
                 "share_of": <a contrast> (optional), "paper_share": 0.84 (optional),
                 "caveats": ["...", ...] (optional)}]}
A difference [a, b] is mean(a) - mean(b); an interaction [[a1, a2], [b1, b2]] is (a1 - a2) - (b1 - b2). A
diagnostic metric is the mean, at that step, of validate.diagnostic_series' fields whose names match the pattern
(fnmatch). A cell must match runs of one configuration (validate.config_differences): the error names the keys that
differ so that the cell can name them.

Exit codes: 0 done (--check: the READMEs are current), 1 --check found them stale, 2 unusable input (a claims.json
that is missing or malformed, a cell that matches no run or runs of several configurations), with a message that
names the file, the field and the fix.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:
    from scipy import optimize, stats
except ImportError:  # reported by main() with the fix, so that importing this module never fails
    optimize = stats = None

RECORDS = Path(__file__).resolve().parent
REPO = RECORDS.parent
if "validate" in sys.modules:  # the tests load validate.py under this name too: one module, one Run class
    validate = sys.modules["validate"]
else:
    _spec = importlib.util.spec_from_file_location("validate", RECORDS / "validate.py")
    validate = importlib.util.module_from_spec(_spec)
    sys.modules["validate"] = validate  # its dataclasses look their module up here
    _spec.loader.exec_module(validate)

ALPHA = 0.05
POWER = 0.80
CONFIDENCE = 0.95
VERDICTS = ("supported", "contradicted", "inconclusive")
DIRECTIONS = ("greater", "less")
FINAL_VAL_LOSS = "final_val_loss"
EXIT_OK, EXIT_STALE, EXIT_UNUSABLE = 0, 1, 2
MAX_LINE = 120  # the READMEs' line limit (tests/test_readme.py)
# The generated blocks of the two READMEs: the text between these lines is claims.py's, rewritten by --readme.
SUMMARY_BEGIN, SUMMARY_END = "<!-- generated: records/claims.py --readme -->", "<!-- /claims -->"
SECTION_BEGIN, SECTION_END = "<!-- claims: python records/claims.py --readme -->", "<!-- /claims -->"
README = REPO / "README.md"
RECORDS_README = RECORDS / "README.md"


class ClaimsError(Exception):
    """A claims.json that cannot be used: the message names the file, the field and the fix."""


# ---- statistics (pure functions) ----

def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input's order: with p_(1) <= ... <= p_(m),
    adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). The running max keeps the adjusted values in the
    order of the raw ones (a hypothesis is rejected only after every smaller p was)."""
    order = sorted(range(len(p_values)), key=lambda index: p_values[index])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def one_sided_p(estimate: float, se: float, df: float, direction: str) -> float:
    """P-value of the one-sided t-test of H1: effect > 0 ("greater") or effect < 0 ("less"), t = estimate / SE."""
    t = estimate / se
    return float(stats.t.sf(t, df) if direction == "greater" else stats.t.cdf(t, df))


def confidence_interval(estimate: float, se: float, df: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided t interval: estimate +- t_{(1 + confidence) / 2, df} * SE."""
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * se
    return estimate - half, estimate + half


def power(effect: float, se: float, df: float, alpha: float = ALPHA) -> float:
    """Power of the one-sided t-test at level alpha against a true effect of `effect` (> 0, in the test's
    direction) when the estimate has standard error `se` and `df` degrees of freedom: P(T' > t_{1-alpha, df}) for
    T' noncentral t with noncentrality effect / se."""
    critical = float(stats.t.ppf(1 - alpha, df))
    return float(stats.nct.sf(critical, df, effect / se))


def detectable_effect(se: float, df: float, target: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest effect that the one-sided t-test at level alpha detects with probability `target`."""
    critical = float(stats.t.ppf(1 - alpha, df))
    noncentrality = optimize.brentq(lambda nc: stats.nct.sf(critical, df, nc) - target, 0.0, 1e3)
    return float(noncentrality) * se


def difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """mean(a) - mean(b), its Welch SE and df (validate.welch_test's, which computes b - a of its second set)."""
    welch = validate.welch_test(b, a)
    se = math.sqrt(sum(validate.summarize(x)["std"] ** 2 / len(x) for x in (a, b)))
    return {"estimate": welch["diff_b_minus_a"], "se": se, "df": welch["df"]}


def interaction(a1: Sequence[float], a2: Sequence[float], b1: Sequence[float], b2: Sequence[float]) -> dict[str, float]:
    """(a1 - a2) - (b1 - b2), its SE and Welch-Satterthwaite df, by validate.interaction_contrast, whose table is
    (y11, y12, y21, y22) with contrast (m12 - m22) - (m11 - m21): y12 = a1, y22 = a2, y11 = b1, y21 = b2."""
    result = validate.interaction_contrast([b1, a1, b2, a2])
    return {"estimate": result["contrast"], "se": result["se"], "df": result["df"]}


# ---- claims.json ----

def _fail(path: Path, where: str, problem: str, fix: str) -> ClaimsError:
    return ClaimsError(f"{path}: {where}: {problem}; {fix}")


def contrast_cells(contrast: Any, path: Path, where: str) -> list[str]:
    """The cell names of a contrast ({"difference": [a, b]} or {"interaction": [[a1, a2], [b1, b2]]}), checked."""
    if isinstance(contrast, dict) and set(contrast) == {"difference"}:
        names = contrast["difference"]
        if isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) for n in names):
            return names
    elif isinstance(contrast, dict) and set(contrast) == {"interaction"}:
        pairs = contrast["interaction"]
        if (isinstance(pairs, list) and len(pairs) == 2 and all(isinstance(p, list) and len(p) == 2 for p in pairs)
                and all(isinstance(n, str) for p in pairs for n in p)):
            return [pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1]]
    raise _fail(path, where, f"{json.dumps(contrast)} is not a contrast",
                'write {"difference": ["a", "b"]} (a - b) or {"interaction": [["a1", "a2"], ["b1", "b2"]]} '
                "((a1 - a2) - (b1 - b2)), naming cells of the file's \"cells\"")


def cell_names(contrast: dict[str, Any]) -> list[str]:
    """The cell names of a checked contrast, in the order the statistics take them: [a, b] or [a1, a2, b1, b2]."""
    if "difference" in contrast:
        return list(contrast["difference"])
    return [name for pair in contrast["interaction"] for name in pair]


def contrast_label(contrast: dict[str, Any]) -> str:
    """"a - b" or "(a1 - a2) - (b1 - b2)"."""
    if "difference" in contrast:
        return " - ".join(contrast["difference"])
    (a1, a2), (b1, b2) = contrast["interaction"]
    return f"({a1} - {a2}) - ({b1} - {b2})"


def metric_label(metric: Any) -> str:
    return FINAL_VAL_LOSS if metric == FINAL_VAL_LOSS else f"{metric['diagnostic']} at step {metric['step']}"


def _check_metric(metric: Any, path: Path, where: str) -> None:
    if metric == FINAL_VAL_LOSS:
        return
    if (isinstance(metric, dict) and set(metric) == {"diagnostic", "step"} and isinstance(metric["diagnostic"], str)
            and isinstance(metric["step"], int) and not isinstance(metric["step"], bool)):
        return
    raise _fail(path, where, f"{json.dumps(metric)} is not a metric",
                f'write "{FINAL_VAL_LOSS}" or {{"diagnostic": "layers.*_spectral (mean)", "step": 200}}')


CLAIM_FIELDS = {"id": str, "paper": str, "statement": str, "claim": str, "family": str, "direction": str}
OPTIONAL_FIELDS = ("condition", "verbatim", "paper_effect", "share_of", "paper_share", "caveats")


def load_claims(study: Path) -> dict[str, Any]:
    """The study's claims.json, every field checked; ClaimsError naming the file and the field otherwise."""
    path = study / "claims.json"
    try:
        spec = json.loads(path.read_text())
    except OSError as exc:
        raise ClaimsError(f"{path}: cannot read it ({exc.strerror}); a study's claims live in <study>/claims.json "
                          "(see records/claims.py's docstring for the format)") from exc
    except json.JSONDecodeError as exc:
        raise ClaimsError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}); fix the syntax") from exc
    if not isinstance(spec, dict):
        raise _fail(path, "top level", f"a {type(spec).__name__}", "write a JSON object with registered, logs, cells "
                    "and claims")
    for key, kind in (("registered", str), ("logs", list), ("cells", dict), ("claims", list)):
        if not isinstance(spec.get(key), kind):
            raise _fail(path, key, f"{json.dumps(spec.get(key))} is not a {kind.__name__}", "see records/claims.py's "
                        "docstring for the format")
    if not all(isinstance(folder, str) for folder in spec["logs"]) or not spec["logs"]:
        raise _fail(path, "logs", f"{json.dumps(spec['logs'])}", 'list folders of logs, e.g. ["logs"]')
    if not all(isinstance(text, str) for text in spec.get("caveats", [])):
        raise _fail(path, "caveats", "not a list of strings", 'write ["caveat one", "caveat two"]')
    for name, cell in spec["cells"].items():
        if not isinstance(cell, dict) or not cell:
            raise _fail(path, f"cells.{name}", f"{json.dumps(cell)} is not a non-empty object",
                        'write {"NORM": "derf", "OPTIMIZER": "muon"}')
    seen = set()
    for index, claim in enumerate(spec["claims"]):
        where = f"claims[{index}]"
        if not isinstance(claim, dict):
            raise _fail(path, where, "not an object", "write one object per claim")
        for key, kind in CLAIM_FIELDS.items():
            if not isinstance(claim.get(key), kind) or not claim[key]:
                raise _fail(path, f"{where}.{key}", f"{json.dumps(claim.get(key))} is not a non-empty string",
                            f"give the claim its {key}")
        unknown = set(claim) - set(CLAIM_FIELDS) - set(OPTIONAL_FIELDS) - {"metric", "contrast"}
        if unknown:
            raise _fail(path, where, f"unknown field(s) {', '.join(sorted(unknown))}",
                        f"use only {', '.join([*CLAIM_FIELDS, 'metric', 'contrast', *OPTIONAL_FIELDS])}")
        where = f"claims[{index}] ({claim['id']})"
        if claim["id"] in seen:
            raise _fail(path, f"{where}.id", "used twice", "give every claim its own id")
        seen.add(claim["id"])
        if claim["direction"] not in DIRECTIONS:
            raise _fail(path, f"{where}.direction", f"{claim['direction']!r} is not one of {', '.join(DIRECTIONS)}",
                        "write the sign of the contrast that the paper predicts")
        _check_metric(claim.get("metric"), path, f"{where}.metric")
        contrasts = [("contrast", claim.get("contrast"))] + ([("share_of", claim["share_of"])]
                                                             if "share_of" in claim else [])
        for field_name, contrast in contrasts:
            for name in contrast_cells(contrast, path, f"{where}.{field_name}"):
                if name not in spec["cells"]:
                    raise _fail(path, f"{where}.{field_name}", f"cell {name!r} is not among the cells "
                                f"({', '.join(spec['cells'])})", "define it under \"cells\" or fix the name")
        effect = claim.get("paper_effect")
        if effect is not None and (not isinstance(effect, (int, float)) or isinstance(effect, bool) or effect <= 0):
            raise _fail(path, f"{where}.paper_effect", f"{json.dumps(effect)} is not a positive number or null",
                        "give the paper's effect's size in the metric's units (its sign is the direction), or null")
        if not isinstance(claim.get("condition", ""), str):
            raise _fail(path, f"{where}.condition", f"{json.dumps(claim['condition'])} is not a string",
                        'write the arm this contrast tests the claim in, e.g. "against Adam at 0.001"')
        if not isinstance(claim.get("verbatim", False), bool):
            raise _fail(path, f"{where}.verbatim", f"{json.dumps(claim['verbatim'])} is not true or false",
                        "true when the statement is the paper's own words (it is then printed in quotes)")
        if "paper_share" in claim and "share_of" not in claim:
            raise _fail(path, f"{where}.paper_share", "given without share_of", "add the share's denominator")
        if not all(isinstance(text, str) for text in claim.get("caveats", [])):
            raise _fail(path, f"{where}.caveats", "not a list of strings", 'write ["caveat one", "caveat two"]')
    return spec


# ---- cells of runs ----

def same_value(actual: str, wanted: Any) -> bool:
    """Whether a config value (validate.config_value's text) is the cell's value: numbers compare as numbers
    (0.012 in claims.json is "0.012" in one log and "0.0120" in none), booleans and text as the log writes them."""
    if isinstance(wanted, bool):
        return actual == json.dumps(wanted)
    try:
        return float(actual) == float(wanted)
    except (TypeError, ValueError):
        return actual == (wanted if isinstance(wanted, str) else json.dumps(wanted))


def cell_runs(runs: Sequence[Any], cells: dict[str, dict[str, Any]], path: Path) -> dict[str, list[Any]]:
    """The runs of every cell; ClaimsError for a cell that matches none or runs of several configurations."""
    matched: dict[str, list[Any]] = {}
    for name, cell in cells.items():
        found = [run for run in runs
                 if all((value := validate.config_value(run, key)) is not None and same_value(value, wanted)
                        for key, wanted in cell.items())]
        if not found:
            raise _fail(path, f"cells.{name}", f"{json.dumps(cell)} matches no usable run in the logs",
                        "check the keys and values against the logs' `config:` lines (and that the logs finished)")
        differences = validate.config_differences(found)
        if differences:
            described = "; ".join(f"{key}: " + ", ".join(f"{value} ({len(group)} runs)"
                                                          for value, group in values.items())
                                  for key, values in differences.items())
            raise _fail(path, f"cells.{name}", f"matches runs of several configurations ({described})",
                        f"add {', '.join(key.upper() for key in differences)} to the cell to pick one")
        matched[name] = found
    return matched


def metric_value(run: Any, metric: Any, path: Path) -> float:
    """The run's value of the metric: its final val loss, or the mean of the matching diagnostics at the step."""
    if metric == FINAL_VAL_LOSS:
        return float(run.final_loss)
    series = validate.diagnostic_series(run.diagnostics)
    names = fnmatch.filter(sorted(series), metric["diagnostic"])
    if not names:
        raise _fail(path, "metric", f"no diagnostic of {run.path.name} matches {metric['diagnostic']!r} (it has: "
                    f"{', '.join(sorted(series)[:8])}{', ...' if len(series) > 8 else ''})",
                    "use a name or fnmatch pattern of validate.diagnostic_series' fields")
    values = []
    for name in names:
        at_step = [value for step, value in series[name] if step == metric["step"]]
        if not at_step:
            raise _fail(path, "metric", f"{run.path.name} logged {name} at steps "
                        f"{[step for step, _ in series[name]]}, not at {metric['step']}", "use a logged step")
        values.append(at_step[-1])
    return float(np.mean(values))


# ---- evaluation ----

def estimate(contrast: dict[str, Any], samples: dict[str, list[float]]) -> dict[str, Any]:
    """The contrast's estimate, SE, df and CI; or {"untestable": why} when a cell has fewer than two runs or no cell
    varies (a t statistic needs a variance)."""
    names = cell_names(contrast)
    groups = [samples[name] for name in names]
    means = [float(np.mean(group)) for group in groups]
    # the point estimate from the means, which an untestable contrast still reports: a - b, or (a1 - a2) - (b1 - b2)
    point = means[0] - means[1] if len(means) == 2 else (means[0] - means[1]) - (means[2] - means[3])
    single = [name for name in names if len(samples[name]) < 2]  # cell_runs gave every cell at least one run
    if single:
        return {"estimate": point, "untestable": f"a single run in {', '.join(dict.fromkeys(single))}: "
                                                 "no variance, no test"}
    if all(np.ptp(group) == 0 for group in groups):
        return {"estimate": point, "untestable": "no cell varies (each repeats one value): no variance, no test"}
    result = difference(*groups) if "difference" in contrast else interaction(*groups)
    result["ci"] = list(confidence_interval(result["estimate"], result["se"], result["df"]))
    result["means"] = dict(zip(names, means))
    result["n"] = {name: len(samples[name]) for name in names}
    return result


def share(claim: dict[str, Any], result: dict[str, Any], samples: dict[str, list[float]]) -> dict[str, Any]:
    """The "recovers X%" ratio: estimate / the share_of contrast's estimate, or the reason it is refused."""
    denominator = estimate(claim["share_of"], samples)
    label = contrast_label(claim["share_of"])
    if "untestable" in denominator:
        return {"refused": f"its denominator {label} has no CI ({denominator['untestable']})"}
    low, high = denominator["ci"]
    if low <= 0 <= high:
        return {"refused": f"its denominator {label} = {denominator['estimate']:+.3f} [{low:+.3f}, {high:+.3f}] "
                           "includes 0", "denominator": denominator}
    if "untestable" in result:
        return {"refused": f"its numerator is untestable ({result['untestable']})"}
    return {"ratio": result["estimate"] / denominator["estimate"], "denominator": denominator}


def evaluate(spec: dict[str, Any], samples_of: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Every claim's estimate, one-sided p, Holm p within its family, power, share and verdict (the rule in the
    module docstring). samples_of[claim id] maps each cell name to the claim's metric in that cell's runs."""
    results = []
    for claim in spec["claims"]:
        samples = samples_of[claim["id"]]
        result = {"claim": claim, "metric": metric_label(claim["metric"]),
                  "contrast": contrast_label(claim["contrast"])}
        result.update(estimate(claim["contrast"], samples))
        if "untestable" not in result:
            result["p"] = one_sided_p(result["estimate"], result["se"], result["df"], claim["direction"])
            opposite = DIRECTIONS[1 - DIRECTIONS.index(claim["direction"])]
            result["p_opposite"] = one_sided_p(result["estimate"], result["se"], result["df"], opposite)
            if claim.get("paper_effect") is not None:
                result["power"] = power(claim["paper_effect"], result["se"], result["df"])
            result["detectable"] = detectable_effect(result["se"], result["df"])
        if "share_of" in claim:
            result["share"] = share(claim, result, samples)
        results.append(result)
    for family in dict.fromkeys(claim["family"] for claim in spec["claims"]):
        members = [r for r in results if r["claim"]["family"] == family and "untestable" not in r]
        for key in ("p", "p_opposite"):
            for member, adjusted in zip(members, holm([m[key] for m in members])):
                member[f"{key}_holm"] = adjusted
        for member in members:
            member["family_size"] = len(members)
    for result in results:
        result["verdict"] = verdict(result)
    return results


def verdict(result: dict[str, Any]) -> str:
    """The module docstring's rule: supported / contradicted / inconclusive."""
    if "untestable" in result:
        return "inconclusive"
    if result["p_holm"] < ALPHA:
        return "supported"
    if result["p_opposite_holm"] < ALPHA:
        return "contradicted"
    return "inconclusive"


def study_results(study: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """claims.json and its evaluated claims, from the logs it names."""
    spec = load_claims(study)
    path = study / "claims.json"
    folders = [str(study / folder) for folder in spec["logs"]]
    if spec["registered"].startswith("pre-registered") and not any(
            (study / folder).is_dir() and any((study / folder).glob("*.txt")) for folder in spec["logs"]):
        return spec, []  # registered before its runs, none yet: pending (a post hoc one without logs is an error)
    try:
        runs, _ = validate.load_runs(folders)
    except validate.InputError as exc:
        raise _fail(path, "logs", str(exc), "fix the folders listed under \"logs\"") from exc
    runs_of = cell_runs(runs, spec["cells"], path)
    samples_of = {}
    for claim in spec["claims"]:
        names = cell_names(claim["contrast"]) + (cell_names(claim["share_of"]) if "share_of" in claim else [])
        samples_of[claim["id"]] = {name: [metric_value(run, claim["metric"], path) for run in runs_of[name]]
                                   for name in names}
    return spec, evaluate(spec, samples_of)


# ---- text ----

def _interval(result: dict[str, Any]) -> str:
    low, high = result["ci"]
    return f"{result['estimate']:+.3f} [{low:+.3f}, {high:+.3f}]"


def _p(value: float) -> str:
    return f"{value:.2g}" if value < 0.01 else f"{value:.2f}"


def detail(result: dict[str, Any]) -> str:
    """Why the verdict: what an inconclusive test could have seen, or nothing for a verdict the p carries."""
    if "untestable" in result:
        return f"untestable: {result['untestable']}"
    if result["verdict"] != "inconclusive":
        return ""
    if "power" in result:
        return f"power {result['power']:.0%} at the paper's {result['claim']['paper_effect']:g}"
    return f"detectable at 80% power: {result['detectable']:.3f}"


def share_text(result: dict[str, Any]) -> str:
    if "share" not in result:
        return ""
    paper = result["claim"].get("paper_share")
    against = f" (paper: {paper:.0%})" if paper is not None else ""
    if "ratio" in result["share"]:
        return f"share {result['share']['ratio']:.0%} of {contrast_label(result['claim']['share_of'])}{against}"
    return f"share refused: {result['share']['refused']}"


def table_text(study: Path, spec: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The CLI's table: one row a claim, then its contrast, share and caveats."""
    if not results:
        return f"{study}: registered: {spec['registered']}\n{pending_text(spec)}"
    width = max(len(r["claim"]["id"]) for r in results)
    lines = [f"{study}: {len(results)} claims, registered: {spec['registered']}",
             f"{'id':<{width}} {'estimate [95% CI]':<26} {'p':>7} {'Holm p':>7}  {'verdict':<13} detail"]
    for r in results:
        tested = "untestable" not in r
        shown = _interval(r) if tested else f"{r['estimate']:+.3f} (no CI)"
        lines.append(f"{r['claim']['id']:<{width}} {shown:<26} "
                     f"{_p(r['p']) if tested else '-':>7} {_p(r['p_holm']) if tested else '-':>7}  "
                     f"{r['verdict']:<13} {detail(r)}")
        lines.append(f"{'':<{width}} {r['contrast']} ({r['metric']}; paper: {r['claim']['direction']}, "
                     f"family {r['claim']['family']!r})")
        if "share" in r:
            lines.append(f"{'':<{width}} {share_text(r)}")
    for caveat in spec.get("caveats", []):
        lines.append(f"caveat: {caveat}")
    return "\n".join(lines)


def wrap(text: str, indent: str = "") -> str:
    """text in lines of at most MAX_LINE characters (the READMEs' limit), continued under `indent`."""
    return "\n".join(textwrap.wrap(text, width=MAX_LINE, subsequent_indent=indent, break_long_words=False,
                                   break_on_hyphens=False))


def statement_text(claim: dict[str, Any]) -> str:
    """The paper's statement, in quotes when it is the paper's own words."""
    return f"\"{claim['statement']}\"" if claim.get("verbatim") else claim["statement"]


def markdown(study: Path, spec: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The study's claims as markdown: a line on the study, then a bullet per claim (what records/README.md holds)."""
    lines = [wrap(f"`{study.name}/`, registered {spec['registered']}."
                  + "".join(f" {caveat}" for caveat in spec.get("caveats", []))), ""]
    if not results:
        return "\n".join(lines + [wrap(pending_text(spec))])
    for r in results:
        claim = r["claim"]
        condition = f", {claim['condition']}" if claim.get("condition") else ""
        head = f"- **{claim['claim']}**{condition} ({claim['paper']}: {statement_text(claim)}): **{r['verdict']}**."
        if "untestable" in r:
            body = f"`{r['contrast']}` = {r['estimate']:+.3f} (`{r['metric']}`), {detail(r)}."
        else:
            against = (f", against the paper's direction Holm p = {_p(r['p_opposite_holm'])}"
                       if r["verdict"] == "contradicted" else "")
            body = (f"`{r['contrast']}` = {_interval(r)} (`{r['metric']}`), one-sided p = {_p(r['p'])}, Holm p = "
                    f"{_p(r['p_holm'])}{against} (family of {r['family_size']})"
                    + (f"; {detail(r)}" if detail(r) else "") + ".")
        extra = ([share_text(r) + "."] if "share" in r else []) + claim.get("caveats", [])
        lines.append(wrap(" ".join([head, body, *extra]), "  "))
    return "\n".join(lines)


def pending_text(spec: dict[str, Any]) -> str:
    """What a registered study without runs yet says: that it has none, and the claims it will test."""
    return (f"No runs yet: its {len(spec['claims'])} claims await them ("
            + "; ".join(claim["claim"] + (f", {claim['condition']}" if claim.get("condition") else "")
                        for claim in spec["claims"]) + ").")


def summary(results_of: list[tuple[Path, dict[str, Any], list[dict[str, Any]]]]) -> str:
    """README.md's sentences: each claim with its verdicts, and the arms (conditions) each verdict holds in when its
    contrasts disagree; an inconclusive verdict of claims that could not be tested says so. Claims with the same
    verdicts share one sentence (README.md has a word limit)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for _, _, results in results_of:
        for r in results:
            groups.setdefault(r["claim"]["claim"], []).append(r)
    verdicts_of: dict[str, list[str]] = {}  # verdict text -> the claims it holds for, merged into one sentence
    for name, members in groups.items():
        parts = []
        for verdict_name in VERDICTS:
            found = [r for r in members if r["verdict"] == verdict_name]
            if not found:
                continue
            conditions = [r["claim"].get("condition") for r in found]
            notes = (["; ".join(conditions)] if len(found) < len(members) and all(conditions) else []) + (
                ["untestable"] if all("untestable" in r for r in found) else [])
            parts.append(verdict_name + (f" ({', '.join(notes)})" if notes else ""))
        verdicts_of.setdefault(", ".join(parts), []).append(name)
    return " ".join(f"{'; '.join(names)}: {text}." for text, names in verdicts_of.items())


# ---- README blocks ----

def studies_with_claims() -> list[Path]:
    return sorted(path.parent for path in RECORDS.glob("*/claims.json"))


def with_block(text: str, begin: str, end: str, block: str, where: Path) -> str:
    """text with the lines from `begin` to `end` replaced by begin, block, end."""
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    if start < 0 or stop < 0:
        raise ClaimsError(f"{where}: no generated claims block; put the line {begin!r} and, below it, the line "
                          f"{end!r} where the claims go, then rerun python records/claims.py --readme")
    return text[:start] + begin + "\n" + block + "\n" + text[stop:]


def readme_texts() -> dict[Path, str]:
    """README.md and records/README.md as --readme would write them, from every records/*/claims.json."""
    results_of = [(study, *study_results(study)) for study in studies_with_claims()]
    post_hoc = all(spec["registered"].startswith("post hoc") for _, spec, results in results_of if results)
    intro = f"{'Post hoc v' if post_hoc else 'V'}erdicts (`records/claims.py`): "
    section = "\n\n".join(markdown(study, spec, results) for study, spec, results in results_of)
    return {README: with_block(README.read_text(), SUMMARY_BEGIN, SUMMARY_END, wrap(intro + summary(results_of)),
                               README),
            RECORDS_README: with_block(RECORDS_README.read_text(), SECTION_BEGIN, SECTION_END, section,
                                       RECORDS_README)}


# ---- command line ----

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="claims.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit codes: 0 done, 1 --check found the READMEs stale, 2 unusable input.")
    parser.add_argument("studies", nargs="*", type=Path, metavar="STUDY", help="study folders holding claims.json")
    parser.add_argument("--markdown", action="store_true", help="print markdown instead of the table")
    parser.add_argument("--readme", action="store_true",
                        help="rewrite the generated claims blocks of README.md and records/README.md")
    parser.add_argument("--check", action="store_true", help="with --readme: exit 1 when the blocks are stale")
    args = parser.parse_args(argv)
    if args.readme and args.studies:
        parser.error("--readme reads every records/*/claims.json; give it no study folders")
    if args.check and not args.readme:
        parser.error("--check goes with --readme")
    try:
        if stats is None:
            raise ClaimsError("claims.py needs scipy: `pip install -r tests/requirements.txt`")
        if args.readme:
            texts = readme_texts()
            stale = [path for path, text in texts.items() if path.read_text() != text]
            if args.check:
                for path in stale:
                    print(f"{path}: its claims block is stale: run python records/claims.py --readme")
                return EXIT_STALE if stale else EXIT_OK
            for path in stale:
                path.write_text(texts[path])
            return EXIT_OK
        if not args.studies:
            parser.error("give study folders (records/<study>) or --readme")
        for study in args.studies:
            spec, results = study_results(study)
            print(markdown(study, spec, results) if args.markdown else table_text(study, spec, results), end="\n\n")
    except ClaimsError as exc:
        print(f"claims.py: error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
