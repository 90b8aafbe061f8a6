"""The speedrun's schedules against record #48's own formulas (written out here, independently of train_gpt.py),
YaRN in the middle of its ramp, the attention scale each window change leaves, and the final validation's
windows."""

import math

import pytest
import torch

import train_gpt as T

SCHEDULED, TOTAL = 2120, 2160  # #48: num_scheduled_iterations, + 40 extension steps


def lr_48(step):
    """#48's get_lr."""
    if step > SCHEDULED:
        return 0.1
    x = step / SCHEDULED
    lr_max = 1.0
    if x > 0.33:
        lr_max = 1.51
    if x > 0.66:
        lr_max = 1.93
    if x >= 1 - 0.55:
        w = (1 - x) / 0.55
        return lr_max * w + (1 - w) * 0.1
    return lr_max


def momentum_48(step):
    """#48's get_muon_momentum (warmup 300 steps from 0.85 to 0.95, cooldown over the last 50)."""
    cooldown_start = TOTAL - 50
    if step < 300:
        return 0.85 + step / 300 * 0.1
    if step > cooldown_start:
        return 0.95 - (step - cooldown_start) / 50 * 0.1
    return 0.95


def batch_and_window_48(step):
    """#48's get_bs and get_ws: (global batch tokens, (short window, long window))."""
    if step >= SCHEDULED:
        return 24 * 2048 * 8, (13 // 2, 13)
    index = int(3 * step / SCHEDULED)
    return (8 * 2048 * 8, 16 * 2048 * 8, 24 * 2048 * 8)[index], ((3, 7, 11)[index] // 2, (3, 7, 11)[index])


@pytest.fixture(scope="module")
def speedrun():
    return T.parse_env({"PRESET": "speedrun"}, cuda_available=True)[0]


def test_every_step_of_the_schedules_is_record_48s(speedrun):
    for step in range(TOTAL):
        assert math.isclose(T.lr_multiplier(step, speedrun), lr_48(step), rel_tol=1e-12, abs_tol=1e-12), step
        assert math.isclose(T.muon_momentum(step, speedrun), momentum_48(step), rel_tol=1e-12), step
        batch, (short, long) = batch_and_window_48(step)
        assert T.schedule_phase(step, speedrun) == (batch, long), step
        assert long // 2 == short


@pytest.mark.parametrize("step, lr", [
    (0, 1.0), (699, 1.0), (700, 1.51),                      # x > 0.33 from step 700 (699.6)
    (953, 1.51), (955, 1.51 * (1 - 955 / 2120) / 0.55 + 0.1 * (1 - (1 - 955 / 2120) / 0.55)),  # cooldown at 954
    (1399, 1.51 * (1 - 1399 / 2120) / 0.55 + 0.1 * (1 - (1 - 1399 / 2120) / 0.55)),
    (1400, 1.93 * (1 - 1400 / 2120) / 0.55 + 0.1 * (1 - (1 - 1400 / 2120) / 0.55)),  # x > 0.66 from 1400
    (2119, 1.93 * (1 / 2120) / 0.55 + 0.1 * (1 - (1 / 2120) / 0.55)), (2120, 0.1), (2159, 0.1),
])
def test_lr_at_the_switch_steps(speedrun, step, lr):
    assert math.isclose(T.lr_multiplier(step, speedrun), lr, rel_tol=1e-12)


@pytest.mark.parametrize("step, batch, window", [
    (0, 131072, 3), (706, 131072, 3), (707, 262144, 7), (1413, 262144, 7), (1414, 393216, 11),
    (2119, 393216, 11), (2120, 393216, 13), (2159, 393216, 13),
])
def test_batch_and_window_switch_at_the_thirds_and_the_extension(speedrun, step, batch, window):
    assert T.schedule_phase(step, speedrun) == (batch, window)


@pytest.mark.parametrize("step, momentum", [(0, 0.85), (150, 0.90), (299, 0.85 + 0.1 * 299 / 300), (300, 0.95),
                                            (2110, 0.95), (2111, 0.948), (2159, 0.95 - 0.1 * 49 / 50)])
def test_momentum_at_the_switch_steps(speedrun, step, momentum):
    assert math.isclose(T.muon_momentum(step, speedrun), momentum, rel_tol=1e-12)


def test_yarn_frequencies_in_the_middle_of_the_ramp():
    """#48's Yarn.apply: rotations = 128 * w_old * f / 2pi, ramp = clamp((rotations - 1) / 31, 0, 1),
    f *= s + ramp * (1 - s), s = w_old / w_new. Checked at 3 -> 7 on head_dim 128 (32 rotating frequencies)."""
    rotary = T.Rotary(head_dim=128, rows=16, initial_window=3, block_tokens=128)
    before = rotary.freqs.double().clone()
    rotary.grow_window(7)
    checked = 0
    for f_old, f_new in zip(before.tolist(), rotary.freqs.double().tolist()):
        rotations = 128 * 3 * f_old / (2 * math.pi)
        ramp = min(1.0, max(0.0, (rotations - 1) / 31))
        assert math.isclose(f_new, f_old * (3 / 7 + ramp * (1 - 3 / 7)), rel_tol=1e-6, abs_tol=1e-12)
        checked += 0 < ramp < 1
    assert checked >= 10  # most frequencies are mid-ramp, not at either end
    expected_cos = torch.cos(torch.arange(16, dtype=torch.float64)[:, None] * rotary.freqs.double())
    torch.testing.assert_close(rotary.cos.double(), expected_cos, rtol=0, atol=4e-3)  # bf16 table


def tiny_model(**overrides):
    env = {"PRESET": "test", "LONG_WINDOWS": "3,7,11", "EXTENSION_WINDOW": "13", "FINAL_WINDOW": "20",
           "WINDOW_BLOCK_TOKENS": "8", **overrides}
    return T.GPT(T.model_config(T.parse_env(env, False)[0]))


def effective_scales(model, monkeypatch):
    """The softmax scale each attention call really applies: the kernel's scale times q's RMS (q is RMS-normed, so
    its RMS is the factor multiplied into it), recorded through a forward."""
    seen = []
    real = T.dense_attention

    def record(q, k, v, mask, scale):
        seen.append(scale * q.float().square().mean(-1).sqrt().mean().item())
        return real(q, k, v, mask, scale)

    monkeypatch.setattr(T, "dense_attention", record)
    idx = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(idx, idx)
    return seen


def test_attention_scale_after_each_window_change(monkeypatch):
    """0.1 at window 3, then times 1 + 0.2 ln(new / old) at every schedule change, and nothing more for the final
    validation's window 20 (#48 sets ws_long = 20 without yarn.apply)."""
    model = tiny_model()
    expected = 0.1
    assert all(math.isclose(s, expected, rel_tol=3e-3) for s in effective_scales(model, monkeypatch))
    for old, new in ((3, 7), (7, 11), (11, 13)):
        model.set_training_window(new)
        expected *= 1 + 0.2 * math.log(new / old)
        scales = effective_scales(model, monkeypatch)
        assert len(scales) == 2 and all(math.isclose(s, expected, rel_tol=3e-3) for s in scales)
        assert model.windows == (new // 2, new)
    freqs = model.rotary.freqs.clone()
    model.set_final_windows(20)
    assert model.windows == (6, 20) and torch.equal(model.rotary.freqs, freqs)
    assert all(math.isclose(s, expected, rel_tol=3e-3) for s in effective_scales(model, monkeypatch))


def test_train_loop_validates_with_the_schedule_windows_and_the_final_ones(run_env, monkeypatch):
    """Through T.train: each validation sees the windows and YaRN factor of its step, the last one (6, 20)
    style: the extension's short window, FINAL_WINDOW as the long one, and no YaRN step for it."""
    env = {**run_env, "NUM_ITERATIONS": "8", "EXTENSION_ITERATIONS": "2", "VAL_EVERY": "2", "LONG_WINDOWS": "1,2,4",
           "EXTENSION_WINDOW": "5", "FINAL_WINDOW": "9", "OPTIMIZER": "adamw"}
    hp, launch = T.parse_env(env, False)
    device = torch.device("cpu")
    state = T.setup(T.resolve_auto(hp, device), launch, device)
    seen = []
    monkeypatch.setattr(T, "evaluate", lambda s: seen.append((s.model.windows, s.model.rotary.scale_factor.item()))
                        or 5.0)
    log = T.RunLog(state.hp, launch, device)
    assert T.train(state, log) == 0
    log.close()
    # scheduled steps 0..5 in thirds (1, 2, 4), extension steps 6, 7 (5); validations at 0, 2, 4, 6, 8
    factor = lambda old, new: 1 + 0.2 * math.log(new / old)
    f4, f5 = factor(1, 2) * factor(2, 4), factor(1, 2) * factor(2, 4) * factor(4, 5)
    expected = [((0, 1), 1.0), ((1, 2), factor(1, 2)), ((2, 4), f4), ((2, 5), f5), ((2, 9), f5)]
    assert [w for w, _ in seen] == [w for w, _ in expected]
    for (_, got), (_, want) in zip(seen, expected):
        assert math.isclose(got, want, rel_tol=1e-6)


def test_lr_warmup_ramps_every_lr_from_zero_then_hands_over_to_the_schedule():
    plain = T.parse_env({"PRESET": "cpu"}, False)[0]
    warm = T.parse_env({"PRESET": "cpu", "LR_WARMUP_STEPS": "9"}, False)[0]
    assert warm.lr_warmup_steps == 9 and plain.lr_warmup_steps == 0  # #48 has none
    # (step + 1) / 10 of the schedule at steps 0..8, the schedule itself from step 9 on
    assert T.lr_multiplier(0, warm) == pytest.approx(T.lr_multiplier(0, plain) / 10, rel=1e-12)
    assert T.lr_multiplier(4, warm) == pytest.approx(T.lr_multiplier(4, plain) / 2, rel=1e-12)
    assert T.lr_multiplier(8, warm) == pytest.approx(T.lr_multiplier(8, plain) * 0.9, rel=1e-12)
    for step in (9, 10, 100, plain.num_iterations - 1):
        assert T.lr_multiplier(step, warm) == T.lr_multiplier(step, plain)
    # every optimizer's groups get it: the multiplier set_schedule hands to each one at step 0
    model = T.GPT(T.model_config(warm))
    optimizers = T.build_optimizers(model, warm)
    T.set_schedule(optimizers, 0, warm, grad_scale=1.0)
    assert {group["schedule"] for opt in optimizers for group in opt.param_groups} == {T.lr_multiplier(0, warm)}
    with pytest.raises(T.ConfigError, match="LR_WARMUP_STEPS"):
        T.parse_env({"LR_WARMUP_STEPS": "-1"}, False)


def test_lr_warmup_multiplies_the_boosted_and_cooling_schedule_at_each_step():
    """A warmup as long as most of the run (10 of 12 steps) overlaps the second and third boosts and the cooldown:
    at each warmup step the lr is (step + 1) / 11 of the schedule's value at that step, the schedule written out
    here (boosts 1, 1.5, 2 from x > 1/3 and 2/3; linear decay to 0.1 over the last half)."""
    hp = T.parse_env({"PRESET": "test", "NUM_ITERATIONS": "12", "LR_BOOSTS": "1,1.5,2", "LR_BOOST_AT": "0.33,0.66",
                      "COOLDOWN_FRAC": "0.5", "FINAL_LR_FRAC": "0.1", "LR_WARMUP_STEPS": "10"}, False)[0]

    def scheduled(step):
        x = step / 12
        peak = 2.0 if x > 0.66 else 1.5 if x > 0.33 else 1.0
        if x < 0.5:
            return peak
        w = (1 - x) / 0.5
        return peak * w + 0.1 * (1 - w)

    assert {scheduled(step) for step in range(10)} > {1.0, 1.5} and scheduled(9) not in (1.0, 1.5, 2.0)
    for step in range(10):
        assert T.lr_multiplier(step, hp) == pytest.approx((step + 1) / 11 * scheduled(step), rel=1e-12), step
    for step in (10, 11):
        assert T.lr_multiplier(step, hp) == pytest.approx(scheduled(step), rel=1e-12), step
