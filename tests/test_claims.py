"""Tests for records/claims.py: its statistics on planted data (a known interaction, Holm by hand, the one-sided p
against scipy's own test, power against a simulation and the normal limit), its refusals (a ratio over a denominator
whose CI spans 0, an untestable claim, a malformed claims.json), and the READMEs' generated claims blocks."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

RECORDS = Path(__file__).resolve().parents[1] / "records"
if "validate" not in sys.modules:  # one validate module for claims.py and test_validate.py: one Run class
    _validate_spec = importlib.util.spec_from_file_location("validate", RECORDS / "validate.py")
    sys.modules["validate"] = importlib.util.module_from_spec(_validate_spec)
    _validate_spec.loader.exec_module(sys.modules["validate"])
_spec = importlib.util.spec_from_file_location("claims", RECORDS / "claims.py")
claims = importlib.util.module_from_spec(_spec)
sys.modules["claims"] = claims
_spec.loader.exec_module(claims)

# Deviations with mean 0 and a known sample std: a cell's values are its planted mean plus SPREAD * these.
DEVIATIONS = np.array([-1.5, -0.5, 0.5, 1.5])


def planted(mean: float, spread: float = 0.01) -> list[float]:
    return list(mean + spread * DEVIATIONS)


def write_log(path: Path, config: dict, loss: float, diag: dict | None = None) -> None:
    """A minimal log of this project's format: separator, config, an optional diag line, the final line."""
    lines = ["print('the source would be here')", "=" * 100, "config: " + json.dumps(config)]
    if diag is not None:
        lines.append("diag: " + json.dumps(diag))
    lines.append("final: " + json.dumps({"val_loss": loss, "step": 10, "train_time_ms": 1000.0, "status": "complete"}))
    path.write_text("\n".join(lines) + "\n")


def claim(claim_id: str, contrast: dict, direction: str = "greater", family: str = "f", **extra) -> dict:
    return {"id": claim_id, "paper": "A. Author, arXiv 0000.00000", "statement": "X beats Y", "claim": claim_id,
            "metric": "final_val_loss", "contrast": contrast, "direction": direction, "paper_effect": None,
            "family": family, **extra}


def plant_study(folder: Path, cell_values: dict[str, list[float]], claim_list: list[dict], **spec) -> Path:
    """A study folder: one log per value, each cell a NORM value (with a distinct seed), and its claims.json."""
    (folder / "logs").mkdir(parents=True)
    for name, values in cell_values.items():
        for seed, value in enumerate(values):
            write_log(folder / "logs" / f"{name}_{seed}.txt", {"norm": name, "seed": seed}, value)
    document = {"registered": "post hoc", "logs": ["logs"], "caveats": ["planted data"],
                "cells": {name: {"NORM": name} for name in cell_values}, "claims": claim_list, **spec}
    (folder / "claims.json").write_text(json.dumps(document))
    return folder


def by_id(results: list[dict]) -> dict[str, dict]:
    return {result["claim"]["id"]: result for result in results}


# ---- the statistics ----

def test_known_interaction_recovered_from_logs(tmp_path):
    # (a1 - a2) - (b1 - b2) = (1.5 - 1.0) - (2.0 - 1.8) = +0.3; the main effects differ, so a swapped cell order
    # gives another number (the transposed table gives -0.3)
    cells = {"a1": planted(1.5), "a2": planted(1.0), "b1": planted(2.0), "b2": planted(1.8)}
    interaction = {"interaction": [["a1", "a2"], ["b1", "b2"]]}
    study = plant_study(tmp_path, cells, [claim("paper_sign", interaction, "greater", family="one"),
                                         claim("other_sign", interaction, "less", family="two")])
    _, results = claims.study_results(study)
    found = by_id(results)["paper_sign"]
    assert found["estimate"] == pytest.approx(0.3, abs=1e-12)
    se = math.sqrt(4 * np.var(cells["a1"], ddof=1) / 4)  # four cells of equal variance and n = 4
    assert found["se"] == pytest.approx(se) and found["df"] == pytest.approx(12.0)
    half = stats.t.ppf(0.975, 12) * se
    assert found["ci"] == pytest.approx([0.3 - half, 0.3 + half])
    assert found["verdict"] == "supported" and by_id(results)["other_sign"]["verdict"] == "contradicted"


def test_holm_against_hand_computation():
    # sorted: 0.01 x 4 = 0.04; 0.03 x 3 = 0.09; 0.04 x 2 = 0.08, raised to 0.09 by the step-down's running max;
    # 0.20 x 1 = 0.20
    assert claims.holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert claims.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # 1.2 capped at 1; 0.7 raised to it
    assert claims.holm([0.02]) == pytest.approx([0.02])


def test_holm_within_each_family_and_untestable_claims_left_out():
    samples = {"x": planted(1.0), "y": planted(1.02), "z": planted(1.0, spread=0.0)[:1]}
    spec = {"claims": [claim("f1", {"difference": ["y", "x"]}, family="f"),
                       claim("f2", {"difference": ["x", "y"]}, "less", family="f"),
                       claim("g1", {"difference": ["y", "x"]}, family="g"),
                       claim("g_untestable", {"difference": ["y", "z"]}, family="g")]}
    results = by_id(claims.evaluate(spec, {c["id"]: samples for c in spec["claims"]}))
    p = results["f1"]["p"]
    assert results["f2"]["p"] == pytest.approx(p)  # the same one-sided test, stated from the other side
    assert results["f1"]["p_holm"] == pytest.approx(min(1, 2 * p)) and results["f1"]["family_size"] == 2
    assert results["g1"]["p_holm"] == pytest.approx(p) and results["g1"]["family_size"] == 1
    untestable = results["g_untestable"]
    assert untestable["verdict"] == "inconclusive" and "p_holm" not in untestable
    assert "a single run in z" in untestable["untestable"]
    assert untestable["estimate"] == pytest.approx(np.mean(samples["y"]) - samples["z"][0])


@pytest.mark.parametrize("direction", ["greater", "less"])
def test_one_sided_p_on_the_stated_side(direction):
    # y is 0.01 above x: for "greater" (the paper says y - x > 0) the effect lies on the paper's side, for "less"
    # against it; the p is scipy's own one-sided Welch test on that side
    rng = np.random.default_rng(0)
    x, y = list(1.0 + 0.01 * rng.standard_normal(5)), list(1.01 + 0.01 * rng.standard_normal(5))
    spec = {"claims": [claim("c", {"difference": ["y", "x"]}, direction)]}
    result = claims.evaluate(spec, {"c": {"x": x, "y": y}})[0]
    reference = stats.ttest_ind(y, x, equal_var=False, alternative=direction).pvalue
    other = stats.ttest_ind(y, x, equal_var=False, alternative="less" if direction == "greater" else "greater")
    assert result["p"] == pytest.approx(reference) and result["p_opposite"] == pytest.approx(other.pvalue)
    assert result["estimate"] > 0 and (result["p"] < 0.05) == (direction == "greater")
    assert result["verdict"] == ("supported" if direction == "greater" else "contradicted")


def test_power_against_simulation_and_the_normal_limit():
    # the normal limit (df -> infinity): power = Phi(effect / se - z_0.95), detectable = (z_0.95 + z_0.80) * se
    z95, z80 = 1.6448536269514722, 0.8416212335729143
    assert claims.power(2.0, 1.0, 1e9) == pytest.approx(0.5 * math.erfc(-(2.0 - z95) / math.sqrt(2)), abs=1e-6)
    assert claims.detectable_effect(0.5, 1e9) == pytest.approx((z95 + z80) * 0.5, abs=1e-5)
    # small n: a two-sample t-test of n = 4 a side, sigma 1, true difference 1.5, simulated
    n, sigma, effect, trials = 4, 1.0, 1.5, 200_000
    rng = np.random.default_rng(1)
    a, b = rng.normal(effect, sigma, (trials, n)), rng.normal(0.0, sigma, (trials, n))
    pooled = np.sqrt((a.var(axis=1, ddof=1) + b.var(axis=1, ddof=1)) / 2)
    t = (a.mean(axis=1) - b.mean(axis=1)) / (pooled * math.sqrt(2 / n))
    simulated = float(np.mean(t > stats.t.ppf(0.95, 2 * n - 2)))
    computed = claims.power(effect, sigma * math.sqrt(2 / n), 2 * n - 2)
    assert computed == pytest.approx(simulated, abs=0.005)
    detectable = claims.detectable_effect(0.2, 6)
    assert claims.power(detectable, 0.2, 6) == pytest.approx(0.80, abs=1e-6)


def test_power_reported_at_the_papers_effect_otherwise_the_detectable_effect():
    samples = {"x": planted(1.0), "y": planted(1.005)}
    spec = {"claims": [claim("with", {"difference": ["y", "x"]}, paper_effect=0.01),
                       claim("without", {"difference": ["y", "x"]}, family="g")]}
    results = by_id(claims.evaluate(spec, {c["id"]: samples for c in spec["claims"]}))
    se, df = results["with"]["se"], results["with"]["df"]
    assert results["with"]["power"] == pytest.approx(claims.power(0.01, se, df))
    assert "power" not in results["without"]
    assert claims.detail(results["with"]).startswith("power ") and "0.01" in claims.detail(results["with"])
    assert claims.detail(results["without"]).startswith("detectable at 80% power")


# ---- the ratio ----

def recovery_claim() -> dict:
    return claim("recovers", {"difference": ["derf", "remedy"]}, share_of={"difference": ["derf", "rms"]},
                 paper_share=0.84)


def test_ratio_refused_when_the_denominators_ci_spans_zero():
    # Derf 0.10 above RMSNorm with a seed spread of 0.5: the gap's CI spans 0, so "recovers X%" means nothing
    samples = {"rms": planted(1.0), "derf": planted(1.10, spread=0.5), "remedy": planted(1.04)}
    result = claims.evaluate({"claims": [recovery_claim()]}, {"recovers": samples})[0]
    assert "ratio" not in result["share"] and "includes 0" in result["share"]["refused"]
    assert claims.share_text(result).startswith("share refused: its denominator derf - rms = +0.100")


def test_ratio_printed_when_the_denominators_ci_excludes_zero():
    samples = {"rms": planted(1.0), "derf": planted(1.10), "remedy": planted(1.04)}
    result = claims.evaluate({"claims": [recovery_claim()]}, {"recovers": samples})[0]
    assert result["share"]["ratio"] == pytest.approx(0.06 / 0.10)
    assert claims.share_text(result) == "share 60% of derf - rms (paper: 84%)"


# ---- claims.json and the cells ----

def test_a_diagnostic_metric_is_the_mean_of_the_matching_fields_at_its_step(tmp_path):
    (tmp_path / "logs").mkdir()
    for seed, scale in enumerate((1.0, 1.1, 1.3)):
        for name, offset in (("x", 0.0), ("y", 1.0)):
            diag = {"step": 20, "layers": [{"q_spectral": scale + offset, "k_spectral": 3 * scale + offset,
                                            "q_update_rms": 99.0}, {"q_spectral": scale + offset,
                                                                    "k_spectral": 3 * scale + offset}]}
            write_log(tmp_path / "logs" / f"{name}{seed}.txt", {"norm": name, "seed": seed}, 2.0, diag)
    metric = {"diagnostic": "layers.*_spectral (mean)", "step": 20}
    document = {"registered": "post hoc", "logs": ["logs"], "cells": {"x": {"NORM": "x"}, "y": {"NORM": "y"}},
                "claims": [dict(claim("c", {"difference": ["y", "x"]}), metric=metric)]}
    (tmp_path / "claims.json").write_text(json.dumps(document))
    _, results = claims.study_results(tmp_path)
    assert results[0]["estimate"] == pytest.approx(1.0)  # mean(q, k) of y minus x; update_rms left out
    runs, _ = claims.validate.load_runs([str(tmp_path / "logs")])
    with pytest.raises(claims.ClaimsError, match="not at 40"):
        claims.metric_value(runs[0], {"diagnostic": "layers.*_spectral (mean)", "step": 40}, tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["claims"][0].update(direction="up"), r"claims\[0\] \(c\)\.direction: 'up' is not one of greater"),
    (lambda d: d["claims"][0].update(contrast={"difference": ["x", "w"]}), r"cell 'w' is not among the cells"),
    (lambda d: d["claims"][0].update(contrast={"ratio": ["x", "y"]}), r"is not a contrast"),
    (lambda d: d["claims"][0].update(metric="loss"), r"claims\[0\] \(c\)\.metric: \"loss\" is not a metric"),
    (lambda d: d["claims"][0].update(paper_effect=-1), r"paper_effect: -1 is not a positive number"),
    (lambda d: d["claims"][0].pop("family"), r"claims\[0\]\.family: null is not a non-empty string"),
    (lambda d: d["claims"].append(dict(d["claims"][0])), r"\.id: used twice"),
    (lambda d: d.pop("registered"), r"registered: null is not a str"),
])
def test_a_malformed_claims_json_names_the_file_and_the_field(tmp_path, change, message):
    document = {"registered": "post hoc", "logs": ["logs"], "cells": {"x": {"NORM": "x"}, "y": {"NORM": "y"}},
                "claims": [claim("c", {"difference": ["y", "x"]})]}
    change(document)
    (tmp_path / "claims.json").write_text(json.dumps(document))
    with pytest.raises(claims.ClaimsError, match=message) as raised:
        claims.load_claims(tmp_path)
    assert str(raised.value).startswith(str(tmp_path / "claims.json"))


def test_a_cell_of_several_configurations_or_none_is_refused(tmp_path):
    (tmp_path / "logs").mkdir()
    for seed in range(2):
        for alpha in (0.5, 0.3):
            write_log(tmp_path / "logs" / f"d{alpha}_{seed}.txt", {"norm": "derf", "norm_alpha": alpha, "seed": seed},
                      2.0 + seed)
    runs, _ = claims.validate.load_runs([str(tmp_path / "logs")])
    with pytest.raises(claims.ClaimsError, match=r"cells\.derf: matches runs of several .*add NORM_ALPHA"):
        claims.cell_runs(runs, {"derf": {"NORM": "derf"}}, tmp_path / "claims.json")
    with pytest.raises(claims.ClaimsError, match=r"cells\.dyt: .* matches no usable run"):
        claims.cell_runs(runs, {"dyt": {"NORM": "dyt"}}, tmp_path / "claims.json")
    picked = claims.cell_runs(runs, {"derf": {"NORM": "derf", "NORM_ALPHA": "0.30"}}, tmp_path / "claims.json")
    assert sorted(run.config["seed"] for run in picked["derf"]) == [0, 1]  # "0.30" is the number 0.3


def test_cli_prints_the_table_and_exits_2_on_a_bad_study(tmp_path, capsys):
    study = plant_study(tmp_path / "s", {"x": planted(1.0), "y": planted(1.1)},
                        [claim("y_above_x", {"difference": ["y", "x"]})])
    assert claims.main([str(study)]) == 0
    out = capsys.readouterr().out
    assert "y_above_x" in out and "supported" in out and "caveat: planted data" in out
    assert claims.main([str(study), "--markdown"]) == 0
    assert "**supported**" in capsys.readouterr().out
    assert claims.main([str(tmp_path / "missing")]) == 2
    assert "claims.json: cannot read it" in capsys.readouterr().err
    for wrong in (["--check"], ["--readme", str(study)]):  # --check alone, or --readme over a subset of studies
        with pytest.raises(SystemExit):
            claims.main(wrong)


# ---- the READMEs ----

def test_generated_markdown_fits_the_readmes_lines(tmp_path):
    study = plant_study(tmp_path, {"x": planted(1.0), "y": planted(1.1), "z": [1.0]},
                        [claim("y_above_x", {"difference": ["y", "x"]}, caveats=["a caveat " * 20], verbatim=True,
                               condition="in the planted arm"),
                         claim("z_above_x", {"difference": ["z", "x"]})])
    spec, results = claims.study_results(study)
    text = claims.markdown(study, spec, results)
    assert all(len(line) <= claims.MAX_LINE for line in text.splitlines())
    assert "**inconclusive**" in text and "no variance, no test" in text and "registered post hoc." in text
    assert '**y_above_x**, in the planted arm (A. Author, arXiv 0000.00000: "X beats Y")' in " ".join(text.split())
    assert "(A. Author, arXiv 0000.00000: X beats Y)" in " ".join(text.split())  # not verbatim: no quotes


def test_readme_blocks_are_generated_from_the_claims():
    for path, text in claims.readme_texts().items():
        assert path.read_text() == text, f"{path}'s claims block is stale: run python records/claims.py --readme"


def test_missing_readme_markers_are_an_error(tmp_path):
    with pytest.raises(claims.ClaimsError, match="no generated claims block"):
        claims.with_block("no markers\n", claims.SECTION_BEGIN, claims.SECTION_END, "block", tmp_path / "R.md")
    text = f"intro\n{claims.SECTION_BEGIN}\nold\n{claims.SECTION_END}\nend\n"
    assert claims.with_block(text, claims.SECTION_BEGIN, claims.SECTION_END, "new", tmp_path) == (
        f"intro\n{claims.SECTION_BEGIN}\nnew\n{claims.SECTION_END}\nend\n")


def test_a_pre_registered_study_without_runs_is_pending_and_a_post_hoc_one_is_refused(tmp_path, capsys):
    """A claims.json committed before its runs (pre-registered) reads as pending, naming the claims it will test,
    in the table and the markdown; the README summary takes nothing from it. Post hoc, the same empty folder is the
    usual error (a logs folder without logs)."""
    study = tmp_path / "study"
    (study / "logs").mkdir(parents=True)
    document = {"registered": "pre-registered: before its runs", "logs": ["logs"],
                "cells": {"a": {"NORM": "a"}, "b": {"NORM": "b"}},
                "claims": [claim("a_beats_b", {"difference": ["a", "b"]}, condition="under X")]}
    (study / "claims.json").write_text(json.dumps(document))
    spec, results = claims.study_results(study)
    assert results == []
    assert "No runs yet: its 1 claims await them (a_beats_b, under X)." in claims.markdown(study, spec, results)
    assert claims.main([str(study)]) == 0 and "No runs yet" in capsys.readouterr().out
    assert claims.summary([(study, spec, results)]) == ""
    (study / "claims.json").write_text(json.dumps({**document, "registered": "post hoc"}))
    assert claims.main([str(study)]) == 2 and "logs: folder" in capsys.readouterr().err
