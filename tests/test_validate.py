"""Tests for records/validate.py on synthetic logs written in tmp dirs (hermetic, CPU, a few seconds)."""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

SCRIPT = Path(__file__).resolve().parents[1] / "records" / "validate.py"
_spec = importlib.util.spec_from_file_location("validate", SCRIPT)
validate = importlib.util.module_from_spec(_spec)
sys.modules["validate"] = validate  # dataclasses look their module up here
_spec.loader.exec_module(validate)

# Published figures of modded-nanogpt record #48 (records/track_1_short/2025-12-11_NorMuonOptimsAndFixes/README.md):
# the prior record as baseline (p = 0.0632) and the submission "Mine + PreMul-O" (p = 0.0024).
SEED_BASELINE_LOSSES = [3.2796, 3.2781, 3.2798, 3.2793]
SEED_BASELINE_TIMES = [132.5520, 132.8170, 132.7390, 132.7790]
SEED_RECORD_LOSSES = [3.2758, 3.2807, 3.2776, 3.2757, 3.2793, 3.2764, 3.2795, 3.2788, 3.2785, 3.2748]
SEED_RECORD_TIMES = [131.2380, 131.2910, 131.1550, 131.1570, 131.2540, 131.3040, 131.1550, 131.1300, 131.1570,
                     131.2650]

# Source code at the top of a log: it holds lines that look like log lines and must never be parsed as data.
FAKE_SOURCE = '''"""Fake trainer.
step:2160/2160 val_loss:0.1000 train_time:1ms step_avg:1.00ms
final: {"val_loss": 0.1, "step": 2160, "train_time_ms": 1.0, "status": "complete"}
stopped: {"reason": "looks like a log line", "step": 1}
"""
print0(f"step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{t:.0f}ms step_avg:{t / step:.2f}ms")
'''


def write_project_log(path: Path, loss: float, time_s: float, config: dict | None = None, total: int = 2160,
                      finished: bool = True, stopped: bool = False, diagnostics: bool = False) -> Path:
    """A log in this project's format: source, separator, config, step lines, final (or stopped) line."""
    config = {"norm": "rmsnorm", "optimizer": "normuon", "seed": 0, "num_iterations": total, **(config or {})}
    lines = [FAKE_SOURCE, "=" * 100, "config: " + json.dumps(config),
             f"step:0/{total} val_loss:10.8258 train_time:0ms step_avg:0.00ms"]
    last = total if finished else total // 2
    for step in range(1, last + 1, max(1, total // 8)):
        lines.append(f"step:{step}/{total} train_loss:{5.0 - step / total:.4f} train_time:{step * 60}ms "
                     f"step_avg:60.00ms")
    if diagnostics:
        lines.append('diag: {"step": 250, "grad_norm": 1.5, "layers": [{"rms_in": 1.0}, {"rms_in": 3.0}]}')
    if stopped:
        lines.append('stopped: {"reason": "non-finite loss", "step": 17, "last_finite_loss": 4.31}')
    elif finished:
        lines.append(f"step:{total}/{total} val_loss:{loss:.4f} train_time:{time_s * 1000:.0f}ms step_avg:60.00ms")
        lines.append("peak memory allocated: 1234 MiB reserved: 2345 MiB")
        lines.append("final: " + json.dumps({"val_loss": loss, "step": total, "num_iterations": total,
                                             "train_time_ms": time_s * 1000, "step_avg_ms": 60.0,
                                             "status": "complete"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_public_log(path: Path, loss: float | str, time_s: float, total: int = 1770, last: int | None = None,
                     old_format: bool = False) -> Path:
    """A public speedrun log: source, separator, step lines only (the val line at N after the train line)."""
    train_loss = " train_loss:4.0000" if old_format else ""
    lines = [FAKE_SOURCE, "=" * 100, "nvidia-smi output would be here", "=" * 100,
             f"step:0/{total} val_loss:10.8258 train_time:0ms step_avg:nanms"]
    last = total if last is None else last
    for step in range(1, last + 1, max(1, total // 8)):
        lines.append(f"step:{step}/{total}{train_loss} train_time:{step * 60}ms step_avg:60.00ms")
    if last == total:
        lines.append(f"step:{total}/{total}{train_loss} train_time:{time_s * 1000 - 90:.0f}ms step_avg:60.00ms")
        value = loss if isinstance(loss, str) else f"{loss:.4f}"
        lines.append(f"step:{total}/{total} val_loss:{value} train_time:{time_s * 1000:.0f}ms step_avg:60.72ms")
        lines.append("peak memory allocated: 29816 MiB reserved: 44176 MiB")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run validate.py as a user would (a fresh interpreter: about 2 s of scipy import, so used sparingly)."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def run_main(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """Run validate.main in this process, returning what run_cli would."""
    code = validate.main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def test_seed_baseline_pvalue(tmp_path: Path) -> None:
    for index, (loss, time_s) in enumerate(zip(SEED_BASELINE_LOSSES, SEED_BASELINE_TIMES)):
        write_project_log(tmp_path / f"baseline_{index}.txt", loss, time_s)
    result = run_cli(str(tmp_path))
    assert "p=0.06323" in result.stdout
    assert "n=4  loss mean=3.27920" in result.stdout
    assert "time mean=132.722s" in result.stdout
    assert result.returncode == validate.EXIT_FAIL


def test_seed_record_pvalue_public_logs(tmp_path: Path) -> None:
    paths = [write_public_log(tmp_path / f"record {i}.txt", loss, time_s)
             for i, (loss, time_s) in enumerate(zip(SEED_RECORD_LOSSES, SEED_RECORD_TIMES))]
    result = run_cli(*map(str, paths))
    assert "p=0.002439" in result.stdout
    assert "record 0.txt" in result.stdout
    assert result.returncode == validate.EXIT_PASS


def test_one_sample_test_matches_published_digits() -> None:
    assert f"{validate.one_sample_test(SEED_BASELINE_LOSSES, 3.28)['p']:.4g}" == "0.06323"
    assert f"{validate.one_sample_test(SEED_RECORD_LOSSES, 3.28)['p']:.4g}" == "0.002439"
    assert validate.one_sample_test(SEED_RECORD_LOSSES, 3.28)["df"] == 9


def test_target_flag_changes_the_test(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for index, loss in enumerate(SEED_BASELINE_LOSSES):
        write_project_log(tmp_path / f"b{index}.txt", loss, 130.0)
    result = run_main(capsys, "--target", "3.281", "--json", str(tmp_path))
    report = json.loads(result.stdout)
    expected = stats.ttest_1samp(SEED_BASELINE_LOSSES, 3.281, alternative="less").pvalue
    assert report["test"]["p"] == pytest.approx(expected, rel=1e-6)
    assert result.returncode == validate.EXIT_PASS


def test_welch_matches_scipy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    folder_a.mkdir(), folder_b.mkdir()
    for index, (loss, time_s) in enumerate(zip(SEED_BASELINE_LOSSES, SEED_BASELINE_TIMES)):
        write_project_log(folder_a / f"{index}.txt", loss, time_s)
    for index, (loss, time_s) in enumerate(zip(SEED_RECORD_LOSSES, SEED_RECORD_TIMES)):
        write_public_log(folder_b / f"{index}.txt", loss, time_s)
    result = run_main(capsys, "--compare", str(folder_a), str(folder_b), "--json")
    report = json.loads(result.stdout)
    loss_ref = stats.ttest_ind(SEED_RECORD_LOSSES, SEED_BASELINE_LOSSES, equal_var=False)
    time_ref = stats.ttest_ind(SEED_RECORD_TIMES, SEED_BASELINE_TIMES, equal_var=False)
    assert report["welch"]["loss"]["p"] == pytest.approx(loss_ref.pvalue, rel=1e-6)
    assert report["welch"]["loss"]["df"] == pytest.approx(loss_ref.df, rel=1e-6)
    assert report["welch"]["time_s"]["p"] == pytest.approx(time_ref.pvalue, rel=1e-4)
    assert report["welch"]["loss"]["diff_b_minus_a"] == pytest.approx(3.27771 - 3.2792, abs=1e-9)
    # one-sided, H1: B below A, from the t distribution's CDF at Welch's t and df (B is below A here: half the
    # two-sided p)
    for key, ref in (("loss", loss_ref), ("time_s", time_ref)):
        assert report["welch"][key]["p_less"] == pytest.approx(stats.t.cdf(ref.statistic, ref.df), rel=1e-9)
    assert report["welch"]["loss"]["p_less"] == pytest.approx(loss_ref.pvalue / 2, rel=1e-9)
    assert result.returncode == (validate.EXIT_PASS if loss_ref.pvalue < 0.01 else validate.EXIT_FAIL)
    text = run_main(capsys, "--compare", str(folder_a), str(folder_b)).stdout
    assert "B - A=-0.00149" in text and "train time" in text
    assert f"(one-sided, B below A: p={loss_ref.pvalue / 2:.4g})" in text


def test_interaction_contrast_known_answer() -> None:
    # cell means 1.1, 2.1, 3.1, 5.1; each cell var 0.02 with n=2 -> SE^2 = 4 * 0.01, df = 0.04^2 / (4 * 0.01^2) = 4
    cells = [[1.0, 1.2], [2.0, 2.2], [3.0, 3.2], [5.0, 5.2]]
    result = validate.interaction_contrast(cells)
    assert result["contrast"] == pytest.approx((2.1 - 5.1) - (1.1 - 3.1))
    assert result["se"] == pytest.approx(0.2)
    assert result["df"] == pytest.approx(4.0)
    t_975_4 = 2.7764451051977987  # Student t quantile, 97.5%, 4 degrees of freedom
    assert result["ci"] == pytest.approx([-1 - t_975_4 * 0.2, -1 + t_975_4 * 0.2])


def test_interaction_contrast_unequal_cells_welch_satterthwaite() -> None:
    cells = [[1.0, 1.1, 1.3], [2.0, 2.4], [0.5, 0.6, 0.9, 0.7], [1.0, 1.0, 1.6]]
    errors = [stats.tvar(c) / len(c) for c in cells]
    df = sum(errors) ** 2 / sum(e ** 2 / (len(c) - 1) for e, c in zip(errors, cells))
    result = validate.interaction_contrast(cells)
    assert result["df"] == pytest.approx(df)
    assert result["se"] == pytest.approx(math.sqrt(sum(errors)))
    half = stats.t.ppf(0.975, df) * math.sqrt(sum(errors))
    assert result["ci"][1] - result["ci"][0] == pytest.approx(2 * half)
    with pytest.raises(ValueError):
        validate.interaction_contrast([[1.0], [2.0, 2.1], [3.0, 3.1], [4.0, 4.1]])


def test_by_factorial_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = {("derf", "adamw"): 3.40, ("derf", "muon"): 3.30, ("rmsnorm", "adamw"): 3.35, ("rmsnorm", "muon"): 3.28}
    for (norm, optimizer), mean in base.items():
        for seed, offset in enumerate((-0.001, 0.001)):
            write_project_log(tmp_path / f"{norm}_{optimizer}_{seed}.txt", mean + offset, 100.0,
                              config={"norm": norm, "optimizer": optimizer, "seed": seed})
    write_public_log(tmp_path / "public.txt", 3.279, 130.0)
    result = run_main(capsys, "--by", "NORM,OPTIMIZER", "--json", str(tmp_path))
    report = json.loads(result.stdout)
    assert [g["loss"]["n"] for g in report["groups"]] == [2, 2, 2, 2]
    (entry,) = report["interactions"]
    assert entry["label"] == "(derf - rmsnorm | optimizer=muon) - (derf - rmsnorm | optimizer=adamw)"
    assert entry["contrast"] == pytest.approx((3.30 - 3.28) - (3.40 - 3.35), abs=1e-9)
    assert entry["ci"][0] < entry["contrast"] < entry["ci"][1]
    assert "public.txt" in result.stderr and "config" in result.stderr
    assert result.returncode == validate.EXIT_PASS
    assert "interaction contrasts" in run_main(capsys, "--by", "norm,Optimizer", str(tmp_path)).stdout


def test_bad_logs_are_named_and_excluded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for index, loss in enumerate([3.270, 3.271, 3.272]):
        write_project_log(tmp_path / f"good_{index}.txt", loss, 100.0)
    write_project_log(tmp_path / "truncated.txt", 3.27, 100.0, finished=False)
    write_project_log(tmp_path / "diverged.txt", 3.27, 100.0, stopped=True)
    write_public_log(tmp_path / "nan.txt", "nan", 100.0)
    write_public_log(tmp_path / "public_truncated.txt", 3.27, 100.0, last=900)
    (tmp_path / "notes.txt").write_text("not a log at all\n")
    with (tmp_path / "good_0.txt").open("a") as good:
        good.write('diag: {"step": 2160, "layers": [\n')
    bad_final = write_project_log(tmp_path / "bad_final.txt", 3.27, 100.0)
    bad_final.write_text(bad_final.read_text().replace('final: {"val_loss"', 'final: {"val_loss" 3.2'))
    result = run_main(capsys, "--json", str(tmp_path))
    report = json.loads(result.stdout)
    reasons = {Path(e["path"]).name: e["reason"] for e in report["excluded"]}
    assert set(reasons) == {"truncated.txt", "diverged.txt", "nan.txt", "public_truncated.txt", "notes.txt",
                            "bad_final.txt"}
    assert "did not finish" in reasons["truncated.txt"] and "1770/1770" in reasons["public_truncated.txt"]
    assert "non-finite loss" in reasons["diverged.txt"] and "step 17" in reasons["diverged.txt"]
    assert "non-finite val_loss" in reasons["nan.txt"]
    assert "malformed `final:`" in reasons["bad_final.txt"]
    for name in reasons:
        assert f"excluded {tmp_path / name}" in result.stderr
    assert report["groups"][0]["loss"]["n"] == 3
    assert "good_0.txt: line" in result.stderr and "diagnostics line skipped" in result.stderr
    assert result.returncode == validate.EXIT_PASS


def test_unusable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_project_log(tmp_path / "truncated.txt", 3.27, 100.0, finished=False)
    only_bad = run_cli(str(tmp_path))
    assert only_bad.returncode == validate.EXIT_UNUSABLE
    assert "0 usable run" in only_bad.stderr and str(tmp_path) in only_bad.stderr
    missing = run_main(capsys, str(tmp_path / "nope.txt"))
    assert missing.returncode == validate.EXIT_UNUSABLE and "nope.txt" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert validate.main([str(empty)]) == validate.EXIT_UNUSABLE
    assert validate.main(["--alpha", "2", str(tmp_path)]) == validate.EXIT_UNUSABLE
    assert validate.main([]) == validate.EXIT_UNUSABLE
    for index in range(3):
        write_project_log(empty / f"{index}.txt", 3.28, 100.0)
    assert validate.main([str(empty)]) == validate.EXIT_UNUSABLE
    assert "a t-test needs spread" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        validate.main(["--compare", str(tmp_path)])
    assert exit_info.value.code == 2


def test_public_log_parsing(tmp_path: Path) -> None:
    run = validate.parse_log(write_public_log(tmp_path / "old.txt", 3.2794, 200.0, old_format=True))
    assert run.problem is None
    assert (run.final_loss, run.final_step, run.train_time_ms) == (3.2794, 1770, 200000.0)
    assert run.val_curve == [(0, 10.8258), (1770, 3.2794)]


def test_code_lookalike_lines_are_ignored(tmp_path: Path) -> None:
    run = validate.parse_log(write_project_log(tmp_path / "run.txt", 3.2777, 131.5, diagnostics=True))
    assert run.problem is None
    assert run.final_loss == 3.2777 and run.train_time_ms == pytest.approx(131500.0)
    assert all(loss > 1 for _, loss in run.val_curve)
    assert run.config["norm"] == "rmsnorm" and len(run.diagnostics) == 1


def test_diagnostic_series() -> None:
    series = validate.diagnostic_series([{"step": 250, "grad_norm": 1.5, "layers": [{"rms": 1.0}, {"rms": 3.0}]},
                                         {"step": 500, "layers": [{"rms": 2.0, "flag": True}]}])
    assert series == {"grad_norm": [(250, 1.5)], "layers.rms (mean)": [(250, 2.0), (500, 2.0)]}


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for index, loss in enumerate([3.27, 3.28]):
        write_project_log(tmp_path / f"{index}.txt", loss, 100.0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert validate.main(["--plot", str(tmp_path / "out.png"), str(tmp_path)]) == validate.EXIT_UNUSABLE
    assert "pip install matplotlib" in capsys.readouterr().err


def test_plot_with_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for index, loss in enumerate([3.27, 3.28]):
        write_project_log(tmp_path / f"{index}.txt", loss, 100.0, diagnostics=True)
    out = tmp_path / "curves.png"
    assert validate.main(["--plot", str(out), str(tmp_path)]) in (validate.EXIT_PASS, validate.EXIT_FAIL)
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the PNG signature


# ---- the statistics, each against a reference computed here (scipy.stats, statistics), not against the code ----

def write_runs(folder: Path, losses: list[float], times_s: list[float], config: dict | None = None,
               prefix: str = "run") -> Path:
    """One project log per (loss, time) in `folder` (created); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (loss, time_s) in enumerate(zip(losses, times_s)):
        write_project_log(folder / f"{prefix}_{index}.txt", loss, time_s, config=config)
    return folder


def test_alpha_flag_decides_the_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    losses = [3.2762, 3.2772, 3.2782, 3.2792, 3.2802]  # mean 3.2782: one-sided p = 0.032 against 3.28
    folder = write_runs(tmp_path, losses, [130.0, 130.5, 131.0, 129.5, 130.2])
    expected = stats.ttest_1samp(losses, 3.28, alternative="less").pvalue
    assert 0.01 < expected < 0.05
    at_05 = run_main(capsys, "--alpha", "0.05", "--json", str(folder))
    report = json.loads(at_05.stdout)
    assert report["test"]["p"] == pytest.approx(expected, rel=1e-9) and report["alpha"] == 0.05
    assert report["passed"] is True and at_05.returncode == validate.EXIT_PASS
    default = run_main(capsys, str(folder))
    assert f"p={expected:.4g}" in default.stdout and "not a record: p >= alpha=0.01" in default.stdout
    assert default.returncode == validate.EXIT_FAIL


def test_std_is_the_sample_std_of_losses_and_times(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    losses, times_s = [3.2751, 3.2802, 3.2779, 3.2760], [131.2, 133.9, 130.4, 132.0]
    folder = write_runs(tmp_path, losses, times_s)
    report = json.loads(run_main(capsys, "--json", str(folder)).stdout)
    (group,) = report["groups"]
    assert group["loss"]["n"] == 4 and group["loss"]["mean"] == pytest.approx(statistics.mean(losses), rel=1e-12)
    assert group["loss"]["std"] == pytest.approx(statistics.stdev(losses), rel=1e-9)  # ddof=1
    assert group["time_s"]["std"] == pytest.approx(statistics.stdev(times_s), rel=1e-9)
    assert group["time_s"]["mean"] == pytest.approx(statistics.mean(times_s), rel=1e-12)
    text = run_main(capsys, str(folder)).stdout
    assert f"std={statistics.stdev(losses):.5f}" in text and f"std={statistics.stdev(times_s):.3f}s" in text


def test_compare_welch_statistic_sign_and_p(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    losses_a, times_a = [3.2771, 3.2780, 3.2768, 3.2790, 3.2775], [131.0, 131.4, 130.8, 131.9, 131.1]
    losses_b, times_b = [3.2801, 3.2789, 3.2812, 3.2795], [128.3, 129.0, 128.1, 128.8]
    folder_a = write_runs(tmp_path / "a", losses_a, times_a)
    folder_b = write_runs(tmp_path / "b", losses_b, times_b)
    result = run_main(capsys, "--compare", str(folder_a), str(folder_b), "--alpha", "0.05", "--json")
    welch = json.loads(result.stdout)["welch"]
    # documented: B against A, t = (mean B - mean A) / SE, so A lower than B gives t > 0
    standard_error = math.sqrt(statistics.variance(losses_a) / 5 + statistics.variance(losses_b) / 4)
    by_hand = (statistics.mean(losses_b) - statistics.mean(losses_a)) / standard_error
    loss_ref = stats.ttest_ind(losses_b, losses_a, equal_var=False)
    assert welch["loss"]["t"] == pytest.approx(by_hand, rel=1e-9) == pytest.approx(loss_ref.statistic, rel=1e-9)
    assert welch["loss"]["t"] > 0 and welch["loss"]["diff_b_minus_a"] > 0
    assert welch["loss"]["p"] == pytest.approx(loss_ref.pvalue, rel=1e-9)
    assert welch["loss"]["df"] == pytest.approx(loss_ref.df, rel=1e-9)
    time_ref = stats.ttest_ind(times_b, times_a, equal_var=False)
    assert welch["time_s"]["t"] == pytest.approx(time_ref.statistic, rel=1e-6) and welch["time_s"]["t"] < 0
    assert welch["time_s"]["p"] == pytest.approx(time_ref.pvalue, rel=1e-6)
    assert 0.01 < loss_ref.pvalue < 0.05 and result.returncode == validate.EXIT_PASS
    assert validate.main(["--compare", str(folder_a), str(folder_b)]) == validate.EXIT_FAIL  # alpha 0.01


def test_by_interaction_two_sided_p_and_ci(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cells = {("derf", "adamw"): [3.40, 3.43, 3.41], ("derf", "muon"): [3.30, 3.33, 3.31],
             ("rmsnorm", "adamw"): [3.35, 3.33, 3.36, 3.34], ("rmsnorm", "muon"): [3.27, 3.30]}
    for (norm, optimizer), losses in cells.items():
        write_runs(tmp_path, losses, [100.0 + i for i in range(len(losses))],
                   config={"norm": norm, "optimizer": optimizer}, prefix=f"{norm}_{optimizer}")
    result = run_main(capsys, "--by", "norm,optimizer", "--json", str(tmp_path))
    (entry,) = json.loads(result.stdout)["interactions"]
    assert entry["label"] == "(derf - rmsnorm | optimizer=muon) - (derf - rmsnorm | optimizer=adamw)"
    mean = {key: statistics.mean(losses) for key, losses in cells.items()}
    contrast = ((mean["derf", "muon"] - mean["rmsnorm", "muon"])
                - (mean["derf", "adamw"] - mean["rmsnorm", "adamw"]))  # (a - b) - (c - d)
    squared_errors = [statistics.variance(losses) / len(losses) for losses in cells.values()]
    standard_error = math.sqrt(sum(squared_errors))
    df = sum(squared_errors) ** 2 / sum(e ** 2 / (len(losses) - 1)
                                        for e, losses in zip(squared_errors, cells.values()))
    two_sided_p = 2 * stats.t.sf(abs(contrast) / standard_error, df)
    half_width = stats.t.ppf(0.975, df) * standard_error
    assert entry["contrast"] == pytest.approx(contrast, rel=1e-9) and contrast < 0
    assert entry["se"] == pytest.approx(standard_error, rel=1e-9) and entry["df"] == pytest.approx(df, rel=1e-9)
    assert 0.05 < two_sided_p < 0.9  # where a one-sided p (half of it) cannot pass for it
    assert entry["p"] == pytest.approx(two_sided_p, rel=1e-9)
    assert entry["ci"] == pytest.approx([contrast - half_width, contrast + half_width], rel=1e-9)
    assert entry["ci"][0] < 0 < entry["ci"][1]  # p > 0.05 and a 95% CI that holds 0 go together
    assert result.returncode == validate.EXIT_PASS


def test_nan_runs_are_reported_not_pooled(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    losses = [3.2761, 3.2790, 3.2772]
    write_runs(tmp_path, losses, [130.0, 131.0, 132.0])
    write_public_log(tmp_path / "public_nan.txt", "nan", 130.0)
    write_project_log(tmp_path / "project_nan.txt", float("nan"), 130.0)
    final_only = write_project_log(tmp_path / "final_inf.txt", 3.2700, 130.0)  # finite step line, inf final line
    final_only.write_text(final_only.read_text().replace('final: {"val_loss": 3.27', 'final: {"val_loss": Infinity'))
    result = run_main(capsys, "--json", str(tmp_path))
    report = json.loads(result.stdout)
    reasons = {Path(e["path"]).name: e["reason"] for e in report["excluded"]}
    assert set(reasons) == {"public_nan.txt", "project_nan.txt", "final_inf.txt"}
    assert all("non-finite" in reason for reason in reasons.values())
    assert all(f"excluded {tmp_path / name}" in result.stderr for name in reasons)
    assert report["groups"][0]["loss"]["n"] == 3
    assert report["groups"][0]["loss"]["mean"] == pytest.approx(statistics.mean(losses), rel=1e-12)
    expected = stats.ttest_1samp(losses, 3.28, alternative="less")
    assert report["test"]["p"] == pytest.approx(expected.pvalue, rel=1e-9) and report["test"]["df"] == 2


@pytest.mark.filterwarnings("ignore:Precision loss occurred")  # scipy, on the one set without spread
def test_identical_losses_are_not_a_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # two runs of one seed on deterministic kernels: zero spread, where scipy reports t = -inf and p = 0
    folder = write_runs(tmp_path / "same", [3.2777, 3.2777], [130.0, 130.4])
    result = run_main(capsys, str(folder))
    assert result.returncode == validate.EXIT_UNUSABLE
    assert "do not vary" in result.stderr and "2 x 3.2777" in result.stderr and "other seeds" in result.stderr
    other = write_runs(tmp_path / "other", [3.2790, 3.2790], [131.0, 131.2])
    assert validate.main(["--compare", str(folder), str(other)]) == validate.EXIT_UNUSABLE
    spread = write_runs(tmp_path / "spread", [3.2790, 3.2795, 3.2785], [131.0, 131.2, 130.9])
    assert validate.main(["--compare", str(folder), str(spread)]) in (validate.EXIT_PASS, validate.EXIT_FAIL)


# ---- runs of different configurations are not pooled ----

def test_runs_of_different_configurations_are_refused_naming_the_keys(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    write_runs(tmp_path, [3.2761, 3.2790], [130.0, 131.0], config={"num_iterations": 4, "world_size": 1},
               prefix="short")
    write_runs(tmp_path, [3.2772, 3.2780], [130.5, 131.5], config={"num_iterations": 20, "world_size": 2},
               prefix="long")
    result = run_main(capsys, str(tmp_path))
    assert result.returncode == validate.EXIT_UNUSABLE and result.stdout == ""
    (line,) = [line for line in result.stderr.splitlines() if "error" in line]
    assert "mixes configurations" in line and "num_iterations: 20 (2 run(s), e.g. long_0.txt), 4" in line
    assert "world_size: 2 (2 run(s), e.g. long_0.txt), 1 (2 run(s), e.g. short_0.txt)" in line
    assert "--by NUM_ITERATIONS,WORLD_SIZE" in line and "--pool" in line
    pooled = run_main(capsys, "--pool", "--json", str(tmp_path))
    report = json.loads(pooled.stdout)
    assert report["groups"][0]["loss"]["n"] == 4 and report["pooled_over"] == ["num_iterations", "world_size"]
    assert "--pool" in pooled.stderr and "num_iterations" in pooled.stderr
    grouped = run_main(capsys, "--by", "NUM_ITERATIONS,WORLD_SIZE", "--json", str(tmp_path))
    assert grouped.returncode == validate.EXIT_PASS
    assert [g["loss"]["n"] for g in json.loads(grouped.stdout)["groups"]] == [2, 2]


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_a_log_from_before_a_flag_counts_as_that_flags_old_value(device: str) -> None:
    """An older log without DATA_SEED, ADAMW_MATRIX_WD, ADAM_BIAS_CORRECTION or ATTENTION ran as -1, 0.0, True and
    the device's auto kernel: pooled with newer logs at those values, refused beside another value."""
    old = validate.Run(path=Path("old.txt"), config={"device": device, "norm": "rmsnorm"})
    kernel = "flex" if device.startswith("cuda") else "dense"
    new = validate.Run(path=Path("new.txt"), config={"device": device, "norm": "rmsnorm", "data_seed": -1,
                                                     "adamw_matrix_wd": 0.0, "adam_bias_correction": True,
                                                     "attention": kernel})
    assert validate.config_differences([old, new]) == {}
    other = validate.Run(path=Path("other.txt"), config={**new.config, "attention": "mine", "adamw_matrix_wd": 0.1})
    differences = validate.config_differences([old, other])
    assert set(differences) == {"attention", "adamw_matrix_wd"}
    assert set(differences["attention"]) == {json.dumps(kernel), '"mine"'}
    import train_gpt as T  # here only: the rest of this file runs without torch
    flags = T.flags_before_they_existed()  # the same values train_gpt's resume check fills in (CPU here)
    assert {key: validate.value_before_flag(old, key) for key in flags if key != "attention"} == {
        key: value for key, value in flags.items() if key != "attention"}
    assert validate.value_before_flag(old, "momo_beta") is None  # a flag as old as the logs: absent stays absent


def test_per_run_keys_differ_freely(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for index, loss in enumerate([3.2761, 3.2790, 3.2772]):
        write_project_log(tmp_path / f"{index}.txt", loss, 130.0,
                          config={"seed": index, "data_seed": index, "run_tag": f"t{index}", "log_dir": f"logs{index}",
                                  "git_commit": f"{index:040d}"})
    result = run_main(capsys, "--json", str(tmp_path))
    assert result.returncode in (validate.EXIT_PASS, validate.EXIT_FAIL), result.stderr
    assert json.loads(result.stdout)["pooled_over"] == []
    assert set(validate.PER_RUN_KEYS) == {"seed", "data_seed", "run_tag", "log_dir", "git_commit", "resume",
                                          "save_checkpoint", "checkpoint_every", "checkpoint_dir", "checkpoint_keep",
                                          "dist_timeout"}


def test_device_torch_version_and_a_missing_key_count_as_configuration(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    write_project_log(tmp_path / "a.txt", 3.2761, 130.0, config={"device": "NVIDIA H100 80GB HBM3"})
    write_project_log(tmp_path / "b.txt", 3.2790, 130.0, config={"device": "NVIDIA H100 PCIe", "momo": False})
    result = run_main(capsys, str(tmp_path))
    assert result.returncode == validate.EXIT_UNUSABLE
    assert "device: " in result.stderr and "momo: (absent) (1 run(s), e.g. a.txt), false" in result.stderr


def test_compare_checks_each_set_but_not_across_sets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder_a = write_runs(tmp_path / "a", [3.2771, 3.2780, 3.2768], [131.0, 131.4, 130.8], config={"norm": "derf"})
    folder_b = write_runs(tmp_path / "b", [3.2801, 3.2789, 3.2812], [128.3, 129.0, 128.1])
    assert run_main(capsys, "--compare", str(folder_a), str(folder_b)).returncode in (0, 1)  # norm differs: fine
    write_project_log(folder_b / "odd.txt", 3.2795, 128.5, config={"max_seq_len": 64})
    mixed = run_main(capsys, "--compare", str(folder_a), str(folder_b))
    assert mixed.returncode == validate.EXIT_UNUSABLE and f"set B ({folder_b}) mixes configurations" in mixed.stderr
    assert "max_seq_len" in mixed.stderr


def test_by_splits_cells_by_a_difference_outside_its_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # the study's layout: a 2x2 at NORM_ALPHA 0.5 and one more cell, derf/muon at NORM_ALPHA 0.3
    cells = {("derf", "adamw", 0.5): [3.40, 3.43, 3.41], ("derf", "muon", 0.5): [3.30, 3.33, 3.31],
             ("rmsnorm", "adamw", 0.5): [3.35, 3.33, 3.36], ("rmsnorm", "muon", 0.5): [3.27, 3.30, 3.28],
             ("derf", "muon", 0.3): [3.10, 3.12, 3.11]}
    for (norm, optimizer, alpha), losses in cells.items():
        write_runs(tmp_path, losses, [100.0] * len(losses),
                   config={"norm": norm, "optimizer": optimizer, "norm_alpha": alpha},
                   prefix=f"{norm}{optimizer}{alpha}")
    result = run_main(capsys, "--by", "NORM,OPTIMIZER", "--json", str(tmp_path))
    assert result.returncode == validate.EXIT_PASS and "cells also split by NORM_ALPHA" in result.stderr
    report = json.loads(result.stdout)
    assert report["keys"] == ["norm", "optimizer", "norm_alpha"] and report["pooled_over"] == []
    groups = {tuple(g["levels"]): g["loss"] for g in report["groups"]}
    assert set(groups) == {(n, o, str(a)) for n, o, a in cells}  # five cells: 0.3 is not pooled into 0.5
    for (norm, optimizer, alpha), losses in cells.items():
        assert groups[norm, optimizer, str(alpha)]["mean"] == pytest.approx(statistics.mean(losses), rel=1e-12)
    contrasts = {entry["label"]: entry for entry in report["interactions"]}
    (full,) = [e for e in contrasts.values() if "skipped" not in e]  # only NORM_ALPHA=0.5 holds a whole 2x2
    assert full["stratum"] == {"norm_alpha": "0.5"}
    assert full["contrast"] == pytest.approx((statistics.mean(cells["derf", "muon", 0.5])
                                              - statistics.mean(cells["rmsnorm", "muon", 0.5]))
                                             - (statistics.mean(cells["derf", "adamw", 0.5])
                                                - statistics.mean(cells["rmsnorm", "adamw", 0.5])), rel=1e-9)
    text = run_main(capsys, "--by", "NORM,OPTIMIZER", str(tmp_path)).stdout
    assert "norm_alpha" in text and "[norm_alpha=0.5]" in text
    pooled = run_main(capsys, "--by", "NORM,OPTIMIZER", "--pool", "--json", str(tmp_path))
    assert json.loads(pooled.stdout)["pooled_over"] == ["norm_alpha"] and "--pool" in pooled.stderr
    assert len(json.loads(pooled.stdout)["groups"]) == 4


def test_by_names_the_cells_a_skipped_contrast_lacks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # a grid without one corner (derf/adamw never run) and one corner short of seeds (rmsnorm/muon: one run)
    cells = {("derf", "muon"): [3.30, 3.33, 3.31], ("rmsnorm", "adamw"): [3.35, 3.33, 3.36],
             ("rmsnorm", "muon"): [3.27]}
    for (norm, optimizer), losses in cells.items():
        write_runs(tmp_path, losses, [100.0] * len(losses), config={"norm": norm, "optimizer": optimizer},
                   prefix=f"{norm}{optimizer}")
    result = run_main(capsys, "--by", "NORM,OPTIMIZER", "--json", str(tmp_path))
    (entry,) = json.loads(result.stdout)["interactions"]
    assert entry["skipped"].startswith("every cell needs at least two runs")
    assert "norm=derf, optimizer=adamw (0 run(s))" in entry["skipped"]
    assert "norm=rmsnorm, optimizer=muon (1 run(s))" in entry["skipped"]
    assert "norm=derf, optimizer=muon" not in entry["skipped"] and "rmsnorm, optimizer=adamw" not in entry["skipped"]


def test_public_logs_without_config_still_pool(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for index, loss in enumerate(SEED_RECORD_LOSSES[:4]):
        write_public_log(tmp_path / f"public_{index}.txt", loss, 131.0 + index)
    result = run_main(capsys, str(tmp_path))
    assert result.returncode in (validate.EXIT_PASS, validate.EXIT_FAIL) and "warning" not in result.stderr
    write_project_log(tmp_path / "ours.txt", 3.2790, 130.0)
    mixed = run_main(capsys, str(tmp_path))
    assert mixed.returncode in (validate.EXIT_PASS, validate.EXIT_FAIL)
    assert "4 log(s) without a `config:` line" in mixed.stderr


# ---- a resumed run (RESUME=...) and the log it continues count as one run ----

def test_a_resumed_log_and_the_log_it_continues_are_one_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    interrupted = write_project_log(tmp_path / "a_first.txt", 3.30, 0.0, finished=False)
    first_val = "step:0/2160 val_loss:10.8258 train_time:0ms step_avg:0.00ms"
    text = interrupted.read_text().replace(first_val, first_val + "\nstep:270/2160 val_loss:4.5000 "
                                           "train_time:16200ms step_avg:60.00ms")
    interrupted.write_text(text + 'stopped: {"reason": "interrupted by SIGTERM", "step": 1080}\n')
    continuation = write_project_log(tmp_path / "b_second.txt", 3.2770, 131.0,
                                     config={"resume": "logs/a_first/step_001080"})
    lines = continuation.read_text().splitlines()
    config_at = next(i for i, line in enumerate(lines) if line.startswith("config: "))
    lines.insert(config_at + 1, 'resumed: {"from_log": "a_first", "checkpoint": "x", "step": 1080}')
    lines = [line for line in lines if not line.startswith("step:0/")]  # a continuation starts at its step
    continuation.write_text("\n".join(lines) + "\n")
    write_runs(tmp_path, [3.2761, 3.2790], [130.0, 131.0])
    result = run_main(capsys, "--json", str(tmp_path))
    report = json.loads(result.stdout)
    names = [Path(r["path"]).name for r in report["groups"][0]["runs"]]
    assert "b_second.txt" in names and "a_first.txt" not in names and len(names) == 3
    assert report["excluded"] == []  # the interrupted half is not a failed run: its continuation counts
    assert "a_first.txt continues in b_second.txt (resumed at step 1080); the pair counts as one run" in result.stderr
    assert report["groups"][0]["loss"]["mean"] == pytest.approx(statistics.mean([3.2770, 3.2761, 3.2790]))
    runs, _ = validate.load_runs([str(tmp_path)])
    joined = next(r for r in runs if r.path.name == "b_second.txt")
    assert joined.val_curve[:2] == [(0, 10.8258), (270, 4.5)]  # the earlier log's validations, then its own
    assert joined.train_time_ms == 131000.0


def test_resumed_logs_edge_cases(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def continuation(path: Path, loss: float, from_log: str, step: object) -> Path:
        write_project_log(path, loss, 131.0, config={"resume": f"logs/{from_log}", "train_log_every": 7})
        lines = path.read_text().splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("config: ")) + 1
        lines.insert(at, "resumed: " + json.dumps({"from_log": from_log, "checkpoint": "x", "step": step}))
        path.write_text("\n".join(lines) + "\n")
        return path
    first = write_project_log(tmp_path / "first.txt", 3.30, 0.0, finished=False)
    continuation(tmp_path / "second.txt", 3.2770, "first", 1080)
    write_runs(tmp_path, [3.2761, 3.2790], [130.0, 131.0])
    # a setting a continuation may change (TRAIN_LOG_EVERY here) does not split it from its siblings: the pair
    # takes the first log's config
    result = run_main(capsys, "--json", str(tmp_path))
    assert result.returncode in (0, 1) and json.loads(result.stdout)["groups"][0]["loss"]["n"] == 3
    # a continuation whose first log is missing counts alone, with a note
    first.unlink()
    alone = run_main(capsys, "--json", "--pool", str(tmp_path))
    assert "second.txt continues first, which is not among the inputs" in alone.stderr
    # one log continued twice (two branches): refused, naming both
    write_project_log(tmp_path / "first.txt", 3.30, 0.0, finished=False)
    continuation(tmp_path / "third.txt", 3.2775, "first", 540)
    branched = run_main(capsys, str(tmp_path))
    assert branched.returncode == validate.EXIT_UNUSABLE
    assert "first is continued by 2 logs (second.txt, third.txt)" in branched.stderr
    (tmp_path / "third.txt").unlink()
    continuation(tmp_path / "fourth.txt", 3.2775, "other", None)  # malformed: step null
    malformed = run_main(capsys, str(tmp_path))
    assert "fourth.txt" in malformed.stderr and "`resumed:` needs from_log" in malformed.stderr


def write_resumable_log(path: Path, vals: dict[int, float], total: int = 12, resumed: tuple[str, int] | None = None,
                        finished: bool = True) -> Path:
    """A project log whose validations are `vals` ({step: val_loss}), each followed by a diag line of that step
    carrying the same loss; with `resumed` (the log it continues, the step), a RESUME run's `resumed:` line.
    Unfinished: it ends without a final line, as a run killed mid-way."""
    lines = [FAKE_SOURCE, "=" * 100, "config: " + json.dumps({"norm": "rmsnorm", "seed": 0, "num_iterations": total})]
    if resumed is not None:
        lines.append("resumed: " + json.dumps({"from_log": resumed[0], "checkpoint": "x", "step": resumed[1]}))
    for step, loss in sorted(vals.items()):
        lines.append(f"step:{step}/{total} val_loss:{loss:.4f} train_time:{step * 60}ms step_avg:60.00ms")
        lines.append("diag: " + json.dumps({"step": step, "val_loss": loss}))
    if finished:
        lines.append("final: " + json.dumps({"val_loss": vals[total], "step": total, "num_iterations": total,
                                             "train_time_ms": total * 60.0, "status": "complete"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def joined_run(folder: Path) -> validate.Run:
    (run,) = validate.join_resumed([validate.parse_log(path) for path in sorted(folder.glob("*.txt"))])
    return run


def curves(run: validate.Run) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(the val curve, the diag lines as (step, val_loss)) of a run."""
    return run.val_curve, [(d["step"], d["val_loss"]) for d in run.diagnostics]


# The first run validated at 6 and saved its checkpoint there, went on to validate at 9, and was killed; its
# continuation resumed from step 6 validates at 6 again. In a real pair the two step-6 losses are equal; here they
# differ by 0.01, so that a point tells which log it came from.
FIRST = {0: 10.8, 3: 5.0, 6: 4.61, 9: 4.41}
JOINED = [(0, 10.8), (3, 5.0), (6, 4.6), (9, 4.3), (12, 4.1)]


def test_a_resumed_pair_counts_the_resume_steps_validation_once_from_the_continuation(tmp_path: Path) -> None:
    write_resumable_log(tmp_path / "a_first.txt", FIRST, finished=False)
    write_resumable_log(tmp_path / "b_second.txt", {6: 4.6, 9: 4.3, 12: 4.1}, resumed=("a_first", 6))
    run = joined_run(tmp_path)
    assert run.path.name == "b_second.txt" and run.final_loss == 4.1
    assert curves(run) == (JOINED, JOINED)  # step 6 once, the continuation's; the first run's step 9 left out


def test_a_chain_of_resumes_joins_each_log_at_its_own_resume_step(tmp_path: Path) -> None:
    # the second log, resumed at 6, was killed after its validation at 9, where it had saved; the third resumed
    # there. Named against the chain's order, so that the order of the inputs is not the order of the joins.
    write_resumable_log(tmp_path / "c_first.txt", FIRST, finished=False)
    write_resumable_log(tmp_path / "b_second.txt", {6: 4.6, 9: 4.31}, resumed=("c_first", 6), finished=False)
    write_resumable_log(tmp_path / "a_third.txt", {9: 4.3, 12: 4.1}, resumed=("b_second", 9))
    run = joined_run(tmp_path)
    assert run.path.name == "a_third.txt"
    assert curves(run) == (JOINED, JOINED)


def test_a_continuation_alone_starts_its_curve_at_the_resume_step(tmp_path: Path) -> None:
    write_resumable_log(tmp_path / "b_second.txt", {6: 4.6, 9: 4.3, 12: 4.1}, resumed=("a_first", 6))
    assert curves(joined_run(tmp_path)) == (JOINED[2:], JOINED[2:])


@pytest.mark.parametrize("b_above_a", [False, True])
def test_compare_one_sided_p_on_either_side(tmp_path: Path, capsys: pytest.CaptureFixture, b_above_a: bool) -> None:
    """p_less is P(T_df <= t) of Welch's t (H1: B below A), from t and df computed here by hand: half the two-sided
    p when B is below A, and 1 - half of it when B is above A (then above 0.5), in the JSON and in the text."""
    low, high = [3.2771, 3.2780, 3.2768, 3.2790, 3.2775], [3.2801, 3.2789, 3.2812, 3.2795]
    losses_a, losses_b = (low, high) if b_above_a else (high, low)
    folder_a = write_runs(tmp_path / "a", losses_a, [131.0 + i for i in range(len(losses_a))])
    folder_b = write_runs(tmp_path / "b", losses_b, [130.0 + i for i in range(len(losses_b))])
    var_a, var_b = statistics.variance(losses_a) / len(losses_a), statistics.variance(losses_b) / len(losses_b)
    t = (statistics.mean(losses_b) - statistics.mean(losses_a)) / math.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(losses_a) - 1) + var_b ** 2 / (len(losses_b) - 1))
    two_sided, one_sided = 2 * stats.t.sf(abs(t), df), stats.t.cdf(t, df)
    assert (t > 0) == b_above_a and (one_sided > 0.5) == b_above_a
    loss = json.loads(run_main(capsys, "--compare", str(folder_a), str(folder_b), "--json").stdout)["welch"]["loss"]
    assert loss["p"] == pytest.approx(two_sided, rel=1e-9)
    assert loss["p_less"] == pytest.approx(one_sided, rel=1e-9)
    assert loss["p_less"] == pytest.approx(1 - two_sided / 2 if b_above_a else two_sided / 2, rel=1e-9)
    text = run_main(capsys, "--compare", str(folder_a), str(folder_b)).stdout
    line = next(line for line in text.splitlines() if line.startswith("final val loss:"))
    assert line.endswith(f"p={two_sided:.4g} (one-sided, B below A: p={one_sided:.4g})"), line


def test_by_contrasts_each_stratum_over_its_own_levels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A stratum that lacks a level of the first key: NORM_ALPHA 0.5 holds rmsnorm and derf, 0.3 holds derf and
    dyt (each under both optimizers). Each stratum gets the one 2x2 its own levels make, computed; no contrast of a
    level the stratum never had (a skipped entry naming a cell of 0 runs would read as seeds missing)."""
    cells = {("rmsnorm", "adamw", 0.5): [3.35, 3.33, 3.36], ("rmsnorm", "muon", 0.5): [3.27, 3.30, 3.28],
             ("derf", "adamw", 0.5): [3.40, 3.43, 3.41], ("derf", "muon", 0.5): [3.30, 3.33, 3.31],
             ("derf", "adamw", 0.3): [3.38, 3.36, 3.39], ("derf", "muon", 0.3): [3.10, 3.12, 3.11],
             ("dyt", "adamw", 0.3): [3.45, 3.41, 3.44], ("dyt", "muon", 0.3): [3.21, 3.25, 3.22]}
    for (norm, optimizer, alpha), losses in cells.items():
        write_runs(tmp_path, losses, [100.0] * len(losses),
                   config={"norm": norm, "optimizer": optimizer, "norm_alpha": alpha},
                   prefix=f"{norm}{optimizer}{alpha}")
    mean = {cell: statistics.mean(losses) for cell, losses in cells.items()}
    expected = {
        "(derf - rmsnorm | optimizer=muon) - (derf - rmsnorm | optimizer=adamw) [norm_alpha=0.5]":
            (mean["derf", "muon", 0.5] - mean["rmsnorm", "muon", 0.5])
            - (mean["derf", "adamw", 0.5] - mean["rmsnorm", "adamw", 0.5]),
        "(derf - dyt | optimizer=muon) - (derf - dyt | optimizer=adamw) [norm_alpha=0.3]":
            (mean["derf", "muon", 0.3] - mean["dyt", "muon", 0.3])
            - (mean["derf", "adamw", 0.3] - mean["dyt", "adamw", 0.3]),
    }
    result = run_main(capsys, "--by", "NORM,OPTIMIZER", "--json", str(tmp_path))
    assert result.returncode == validate.EXIT_PASS, result.stderr
    found = {entry["label"]: entry for entry in json.loads(result.stdout)["interactions"]}
    assert set(found) == set(expected)
    for label, contrast in expected.items():
        assert "skipped" not in found[label] and found[label]["contrast"] == pytest.approx(contrast, rel=1e-9)
    text = run_main(capsys, "--by", "NORM,OPTIMIZER", str(tmp_path)).stdout
    assert "skipped" not in text and all(label in text for label in expected)
