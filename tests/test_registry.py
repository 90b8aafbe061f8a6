"""ATTENTION, NORMS and OPTIMIZERS: an entry registered from outside train_gpt.py is a valid flag value and trains;
the refusals name the registered choices; a norm's optional abilities are called on whatever norm has them; an
optimizer's own defaults (MuonMax's Adam betas and bias correction) sit over the preset and under the env."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import train_gpt as T
from conftest import REPO, preset_env, signal_everywhere, write_shards

sys.path.insert(0, str(REPO / "scripts"))
from same_logs import kept_lines  # noqa: E402  (the step/val/final lines without their timings)

# A script outside train_gpt.py: registers a norm (a subclass of the rmsnorm entry that counts its forwards), an
# attention kernel (the dense entry, counting its calls) and the muon entry under a new name, then runs
# train_gpt.main() with the env it was given.
REGISTERING_SCRIPT = textwrap.dedent("""
    import json, sys
    import train_gpt

    class CountedRMSNorm(train_gpt.NORMS["rmsnorm"]):
        forwards = 0

        def forward(self, x):
            type(self).forwards += 1
            return super().forward(x)

    class CountedDense(train_gpt.ATTENTION["dense"]):
        calls = 0

        @staticmethod
        def attend(q, k, v, mask, scale):
            CountedDense.calls += 1
            return train_gpt.ATTENTION["dense"].attend(q, k, v, mask, scale)

    train_gpt.NORMS["counted_rmsnorm"] = CountedRMSNorm
    train_gpt.ATTENTION["counted_dense"] = CountedDense
    train_gpt.OPTIMIZERS["muon_again"] = train_gpt.OPTIMIZERS["muon"]
    code = train_gpt.main([])
    print("result: " + json.dumps({"code": code, "forwards": CountedRMSNorm.forwards, "calls": CountedDense.calls}))
    sys.exit(code)
""")


def parse(**flags: str) -> T.Hyperparameters:
    return T.parse_env({"PRESET": "test", **flags}, False)[0]


@pytest.mark.slow  # two training runs
def test_a_norm_an_attention_and_an_optimizer_registered_outside_the_file_train_as_their_entries(tmp_path):
    """NORM=counted_rmsnorm ATTENTION=counted_dense OPTIMIZER=muon_again from a script that registers them gives the
    step lines of NORM=rmsnorm ATTENTION=dense OPTIMIZER=muon (the same math), the log's config names them, and the
    registered classes ran."""
    script = tmp_path / "register_and_train.py"
    script.write_text(REGISTERING_SCRIPT)
    data = write_shards(tmp_path)
    runs = {"registered": dict(NORM="counted_rmsnorm", ATTENTION="counted_dense", OPTIMIZER="muon_again"),
            "builtin": dict(NORM="rmsnorm", ATTENTION="dense", OPTIMIZER="muon")}
    processes = {name: subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env={
                                            **preset_env(data, tmp_path / name), "NUM_ITERATIONS": "3",
                                            "VAL_EVERY": "0", **flags})
                 for name, flags in runs.items()}  # side by side: the suite's machine has 2 cores
    logs = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        result = json.loads(out.split("result: ")[1])
        # the registered subclasses ran, there only
        assert (result["forwards"] > 0) == (result["calls"] > 0) == (name == "registered"), result
        (log,) = (tmp_path / name).glob("*.txt")
        logs[name] = log.read_text()
    config = {name: json.loads(next(line for line in log.splitlines() if line.startswith("config: "))[8:])
              for name, log in logs.items()}
    assert [config["registered"][key] for key in ("norm", "attention", "optimizer")] == [
        "counted_rmsnorm", "counted_dense", "muon_again"]
    registered_lines, builtin_lines = kept_lines(logs["registered"]), kept_lines(logs["builtin"])
    assert len(builtin_lines) == 6 and registered_lines == builtin_lines  # 2 val, 3 train steps, final


def test_flag_checks_errors_and_help_read_the_registries_when_called(monkeypatch):
    monkeypatch.setitem(T.ATTENTION, "mine_three", T.DenseAttention)
    assert parse(ATTENTION="mine_three").attention == "mine_three" and parse(ATTENTION="AUTO").attention is None
    with pytest.raises(T.ConfigError, match="^ATTENTION=flash: expected one of dense, flex, mine_three, auto$"):
        parse(ATTENTION="flash")
    assert "[dense|flex|mine_three]" in T.help_text()
    monkeypatch.setitem(T.NORMS, "mine", T.RMSNorm)
    monkeypatch.setitem(T.OPTIMIZERS, "mine_too", T.OPTIMIZERS["muon"])
    assert parse(NORM="mine", OPTIMIZER="mine_too").norm == "mine"
    with pytest.raises(T.ConfigError, match="^NORM=drf: expected one of rmsnorm, dyt, derf, derf_ema, mine$"):
        parse(NORM="drf")
    with pytest.raises(T.ConfigError, match="^OPTIMIZER=adam: expected one of normuon, muon, adamw, muonmax, "
                                            "mine_too$"):
        parse(OPTIMIZER="adam")
    text = T.help_text()
    assert "[rmsnorm|dyt|derf|derf_ema|mine]" in text and "[normuon|muon|adamw|muonmax|mine_too]" in text


def test_auto_attention_is_flex_on_cuda_and_dense_elsewhere_and_flex_is_refused_on_a_cpu():
    assert T.attention_kernel(None, torch.device("cuda")) is T.FlexAttention
    assert T.attention_kernel(None, torch.device("cpu")) is T.DenseAttention
    assert T.attention_kernel("dense", torch.device("cuda")) is T.DenseAttention
    assert T.resolve_auto(parse(), torch.device("cpu")).attention == "dense"
    with pytest.raises(T.ConfigError, match="^ATTENTION=flex: FlexAttention has no backward on this device; set "
                                            "ATTENTION=dense"):
        T.resolve_auto(parse(ATTENTION="flex"), torch.device("cpu"))
    with pytest.raises(T.ConfigError, match="^ATTENTION=gone: expected one of dense, flex$"):
        T.attention_kernel("gone", torch.device("cpu"))


def test_a_kernel_with_a_tile_gets_padded_sequences_and_the_same_losses(monkeypatch):
    """A kernel whose tile does not divide the sequence sees it padded at the end (BOS tokens, targets ignored), as
    FlexAttention on CUDA: the real tokens' losses are the unpadded run's, and the rotary table covers whole tiles."""
    lengths = []

    class TiledDense(T.DenseAttention):
        tile = 48

        @staticmethod
        def attend(q, k, v, mask, scale):
            lengths.append(q.size(1))
            return T.dense_attention(q, k, v, mask, scale)

    monkeypatch.setitem(T.ATTENTION, "tiled", TiledDense)
    hp = parse()
    model = signal_everywhere(T.GPT(T.model_config(hp)), torch.Generator().manual_seed(0)).eval()
    assert model.rotary.cos.size(0) % 48 == 0 and model.rotary.cos.size(0) % T.FLEX_BLOCK == 0
    idx = torch.randint(1, hp.vocab_size, (70,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(idx, idx.roll(-1), "none")
        model.config = T.dataclasses.replace(model.config, attention="tiled")
        tiled = model(idx, idx.roll(-1), "none")
    assert set(lengths) == {96}  # 70 tokens padded to two tiles of 48
    torch.testing.assert_close(tiled[:70], plain, rtol=1e-5, atol=1e-5)
    assert tiled.size(0) == 96 and (tiled[70:] == 0).all()  # the padding's targets are ignored


def test_factories_refuse_an_unregistered_name_with_the_choices():
    """A Hyperparameters made in code skips the flag checks: make_norm and build_optimizers refuse by themselves."""
    hp = parse()
    with pytest.raises(T.ConfigError, match="^NORM=gone: expected one of rmsnorm, dyt, derf, derf_ema$"):
        T.make_norm(T.dataclasses.replace(hp, norm="gone"))
    model = T.GPT(T.model_config(hp))
    with pytest.raises(T.ConfigError, match="^OPTIMIZER=gone: expected one of normuon, muon, adamw, muonmax$"):
        T.build_optimizers(model, T.dataclasses.replace(hp, optimizer="gone"))


def test_the_model_calls_a_norms_optional_abilities_on_whatever_norm_has_them(monkeypatch):
    """update_running_scales once per call with every site of the class; diagnostics' figures after the RMS."""
    calls = []

    class ScaledNorm(T.RMSNorm):
        @classmethod
        def update_running_scales(cls, sites):
            calls.append(list(sites))

        def diagnostics(self, x):
            return {"mean": x.mean()}

    monkeypatch.setitem(T.NORMS, "scaled", ScaledNorm)
    model = T.GPT(T.model_config(parse(NORM="scaled")))
    model.update_norm_scales()
    sites = list(model.norm_sites().values())
    assert len(calls) == 1 and len(sites) > 1 and all(a is b for a, b in zip(calls[0], sites, strict=True))
    assert all(type(site) is ScaledNorm for site in sites)
    x = torch.tensor([1.0, -3.0])
    assert T.norm_input_stats(sites[0], x) == {"rms": torch.tensor(5.0).sqrt(), "mean": torch.tensor(-1.0)}


def test_muonmax_brings_its_adam_betas_and_no_bias_correction_and_an_explicit_beta_is_honoured():
    muonmax = parse(OPTIMIZER="muonmax")
    assert (muonmax.adam_beta1, muonmax.adam_beta2, muonmax.adam_bias_correction) == (0.95, 0.95, False)
    assert {k: T.hp_as_dict(muonmax)[k] for k in ("adam_beta1", "adam_beta2", "adam_bias_correction")} == {
        "adam_beta1": 0.95, "adam_beta2": 0.95, "adam_bias_correction": False}  # the log's config line
    normuon = parse()
    assert (normuon.adam_beta1, normuon.adam_beta2, normuon.adam_bias_correction) == (0.65, 0.95, True)
    explicit = parse(OPTIMIZER="muonmax", ADAM_BETA1="0.8", ADAM_BIAS_CORRECTION="1")
    assert (explicit.adam_beta1, explicit.adam_beta2, explicit.adam_bias_correction) == (0.8, 0.95, True)
    for hp, betas, corrected in ((muonmax, (0.95, 0.95), False), (explicit, (0.8, 0.95), True)):
        matrices, adam = T.build_optimizers(T.GPT(T.model_config(hp)), hp)
        assert type(matrices) is T.MuonMax
        assert adam.bias_correction is corrected and all(g["betas"] == betas for g in adam.param_groups)
    text = T.help_text()
    assert "DistAdam beta1 (OPTIMIZER=muonmax: 0.95)" in text and "Adam (OPTIMIZER=muonmax: False)" in text


def test_an_optimizers_defaults_go_over_the_preset_and_under_the_env(monkeypatch):
    monkeypatch.setitem(T.OPTIMIZERS, "fast_muon", T.OptimizerEntry(T.OPTIMIZERS["muon"].build,
                                                                    defaults=dict(muon_lr=0.5)))
    cpu = dict(PRESET="cpu", OPTIMIZER="fast_muon")  # the cpu preset sets muon_lr=0.012
    assert T.parse_env(cpu, False)[0].muon_lr == 0.5
    assert T.parse_env({**cpu, "MUON_LR": "0.3"}, False)[0].muon_lr == 0.3
    assert T.parse_env({"PRESET": "cpu", "OPTIMIZER": "muon"}, False)[0].muon_lr == 0.012
