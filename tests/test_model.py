"""The model: the per-layer table, the attention mask, rotary/YaRN, and the step-0 loss."""

import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as T
from conftest import signal_everywhere


def hp(**overrides):
    return T.parse_env({"PRESET": "test", **{k.upper(): str(v) for k, v in overrides.items()}}, False)[0]


def test_layer_plan_at_12_is_record_48():
    plan = T.layer_plan(12, 3)
    assert [i for i, a in enumerate(plan.attn) if not a] == [0, 7]
    assert [i for i, m in enumerate(plan.mlp) if not m] == [0]
    windows = ["-" if not a else "L" if long else "S" for a, long in zip(plan.attn, plan.long_window)]
    assert "".join(windows) == "-SSSLSS-SSSL"
    assert {i: t for i, t in enumerate(plan.value_embed) if t is not None} == {1: 1, 2: 2, 9: 0, 10: 1, 11: 2}
    assert (plan.skip_source, plan.skip_target, plan.backout_layer) == (4, 7, 8)


@pytest.mark.parametrize("depth", [4, 6, 8, 16])
def test_layer_plan_other_depths_are_consistent(depth):
    plan = T.layer_plan(depth, 3)
    assert len(plan.attn) == depth and not plan.attn[0] and not plan.mlp[0]
    assert 0 < plan.skip_source < plan.skip_target < depth and plan.backout_layer < depth
    assert all(plan.attn[i] for i, t in enumerate(plan.value_embed) if t is not None)
    assert sum(plan.attn) >= 2


def naive_mask(docs, window_tokens):
    """The mask by its definition, one position pair at a time: k <= q, q - k <= window, one document."""
    seq = docs.size(0)
    mask = torch.zeros(seq, seq, dtype=torch.bool)
    for q in range(seq):
        for k in range(seq):
            mask[q, k] = k <= q and q - k <= window_tokens and docs[q] == docs[k]
    return mask


def packed_docs(seq, seed, mean_doc=40, first_is_bos=True):
    """Document ids of a packed sequence with random document lengths (a validation sequence starts mid-document
    when first_is_bos is False)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (seq,), generator=gen)
    tokens[torch.rand(seq, generator=gen) < 1 / mean_doc] = T.BOS_ID
    tokens[0] = T.BOS_ID if first_is_bos else 0
    return T.document_ids(tokens)


@pytest.mark.parametrize("window_tokens", [0, 1, 7, 16, 33, 200])
def test_mask_equals_naive_per_position_loop(window_tokens):
    docs = packed_docs(64, seed=window_tokens, mean_doc=10, first_is_bos=False)
    assert docs[0] == 0 and docs.max() >= 2
    assert torch.equal(T.document_window_mask(docs, window_tokens), naive_mask(docs, window_tokens))


def test_window_is_token_exact_not_blockwise():
    """#48's window_size=(w * 128, 0): query q sees exactly keys q - w*128 .. q, whatever the 128-blocks."""
    docs = torch.zeros(300, dtype=torch.long)
    mask = T.document_window_mask(docs, 128)
    assert mask[200].nonzero().flatten().tolist() == list(range(72, 201))
    assert mask[130].nonzero().flatten().tolist() == list(range(2, 131))


def test_dense_attention_matches_explicit_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=gen) for _ in range(3))
    docs = torch.tensor([0] * 10 + [1] * 22)
    out = T.dense_attention(q, k, v, T.document_window_mask(docs, 12), 0.1)
    mask = naive_mask(docs, 12)
    scores = torch.einsum("qhd,khd->hqk", q[0], k[0]) * 0.1
    expected = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v[0])
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window_tokens", [0, 100, 128, 300, 1000])
@pytest.mark.parametrize("first_is_bos, mean_doc", [(True, 200), (False, 200), (True, 2000)])
def test_flex_block_mask_forward_matches_dense_attention_on_packed_sequences(window_tokens, first_is_bos, mean_doc):
    """Documents longer than the window (mean 200 or 2000 tokens, windows down to 0) and windows longer than
    documents; the tile-level mask has empty, partial and full tiles."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    gen = torch.Generator().manual_seed(window_tokens)
    q, k, v = (torch.randn(1, 640, 2, 32, generator=gen) for _ in range(3))
    docs = packed_docs(640, seed=window_tokens + 1, mean_doc=mean_doc, first_is_bos=first_is_bos)
    block_mask = T.flex_block_mask(docs, window_tokens)
    dense = T.document_window_mask(docs, window_tokens)
    # the tile classification itself: a tile is listed iff some pair in it may attend
    tiles = docs.size(0) // T.FLEX_BLOCK
    some = dense.view(tiles, T.FLEX_BLOCK, tiles, T.FLEX_BLOCK).any(3).any(1)
    listed = block_mask.to_dense()[0, 0].bool()
    assert torch.equal(listed, some)
    flex = T.flex_attention(q, k, v, block_mask, 0.1)
    torch.testing.assert_close(flex, T.dense_attention(q, k, v, dense, 0.1), rtol=2e-4, atol=2e-4)


def test_rotary_tables_and_yarn():
    rotary = T.Rotary(head_dim=32, rows=64, initial_window=3, block_tokens=128)
    assert torch.equal(rotary.freqs[8:], torch.zeros(8))  # half the pairs do not rotate
    assert rotary.freqs[0] == 1 and math.isclose(rotary.freqs[7].item(), 1 / 1024, rel_tol=1e-5)
    assert rotary.cos.dtype == torch.bfloat16
    before = rotary.freqs.clone()
    rotary.grow_window(7)
    assert math.isclose(rotary.scale_factor.item(), 1 + 0.2 * math.log(7 / 3), rel_tol=1e-6)
    assert rotary.freqs[0] == before[0]  # fast rotations are kept
    assert math.isclose(rotary.freqs[7].item(), before[7].item() * 3 / 7, rel_tol=1e-5)  # slow ones scaled by s
    rotary.grow_window(5)  # shrinking is not a growth: nothing changes
    assert rotary.window == 7
    rotary.reset()
    assert torch.equal(rotary.freqs, before) and rotary.scale_factor.item() == 1.0


def test_rotary_is_a_rotation_that_depends_on_relative_position():
    rotary = T.Rotary(head_dim=16, rows=32, initial_window=2, block_tokens=16)
    x = torch.randn(1, 32, 1, 16)
    y = T.apply_rotary(x, rotary.cos.float(), rotary.sin.float())
    # bf16 tables round cos and sin to ~3 significant digits, so norms hold to that precision
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=4e-3, atol=0)
    q, k = torch.randn(16), torch.randn(16)
    same = torch.stack([q, k] * 16)[None, :, None, :]  # q at even positions, k at odd ones
    rotated = T.apply_rotary(same, rotary.cos.float(), rotary.sin.float())[0, :, 0]
    dots = (rotated[0::2] * rotated[1::2]).sum(-1)  # q at 2i against k at 2i+1: offset 1 everywhere
    torch.testing.assert_close(dots, dots[:1].expand_as(dots), rtol=2e-2, atol=2e-2)


def test_gpt_builds_from_a_model_config_alone_and_a_runs_flags_give_the_same_model():
    """GPT(ModelConfig(...)) needs no Hyperparameters; model_config(hp) carries every model flag, and the same seed
    gives the same weights either way."""
    config = T.ModelConfig(vocab_size=64, bos_id=0, num_layers=4, model_dim=32, num_heads=1, head_dim=32,
                           window_block_tokens=16, initial_window=2, rotary_tokens=128, norm="dyt", norm_alpha=0.3)
    torch.manual_seed(0)
    by_hand = T.GPT(config)
    assert by_hand.rotary.cos.size(0) == 128 and by_hand.windows == (1, 2)
    assert type(by_hand.final_norm) is T.DyT and by_hand.final_norm.alpha.item() == pytest.approx(0.3)
    idx = torch.randint(1, 64, (40,))
    assert torch.isfinite(by_hand(idx, idx.roll(-1)))
    flags = hp(vocab_size=64, bos_id=0, long_windows="2", norm="dyt", norm_alpha=0.3, val_batch_tokens=256)
    assert T.model_config(flags) == T.dataclasses.replace(config, rotary_tokens=128)
    torch.manual_seed(0)
    from_flags = T.GPT(T.model_config(flags))
    assert all(torch.equal(a, b) for a, b in zip(by_hand.state_dict().values(), from_flags.state_dict().values(),
                                                 strict=True))


def test_model_config_defaults_are_record_48s_and_the_flags_defaults():
    """One place holds the model's defaults: ModelConfig's, which the flags read; #48's first long window and
    262,144-token validation sequence at 8 GPUs."""
    speedrun = T.Hyperparameters()
    assert T.model_config(speedrun, world_size=8) == T.ModelConfig()
    assert T.ModelConfig().initial_window == speedrun.long_windows[0] == 3
    assert (T.ModelConfig().num_layers, T.ModelConfig().model_dim, T.ModelConfig().vocab_size) == (12, 768, 50304)


def test_gpt_refuses_hyperparameters_and_names_the_fix():
    with pytest.raises(TypeError, match=r"GPT takes a ModelConfig, not Hyperparameters: GPT\(model_config\(hp\)\)"):
        T.GPT(hp())


def test_step0_val_loss_is_ln_vocab():
    model = T.GPT(T.model_config(hp()))
    idx = torch.randint(0, 50257, (64,))
    with torch.no_grad():
        loss = model(idx, torch.roll(idx, -1), reduction="mean")
    assert abs(loss.item() - math.log(50304)) < 1e-4


def test_forward_backward_reaches_every_parameter_but_zero_inits():
    model = T.GPT(T.model_config(hp()))
    idx = torch.randint(0, 50257, (64,))
    model(idx, torch.roll(idx, -1)).backward()
    # with the zero head only the head gets a gradient at step 0; nothing is NaN
    assert model.lm_head.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    groups = model.param_groups()
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))


def test_fp8_reference_rounds_like_fp8():
    x, w = torch.randn(16, 32), torch.randn(24, 32) * 0.01
    out = T.fp8_linear_reference(x, w, math.sqrt(32) / 448, 2 ** -9, 1 / 448)
    torch.testing.assert_close(out.float(), x @ w.T, rtol=0.15, atol=0.05)


@pytest.mark.cuda
def test_fp8_kernel_matches_cpu_twin():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a CUDA GPU with sm90+")
    x = torch.randn(256, 768, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(512, 768, device="cuda") * 0.01).bfloat16()
    scales = (math.sqrt(768) / 448, 2 ** -9, 1 / 448)
    fast = T.fp8_linear(x, w, *scales)
    twin = T.fp8_linear_reference(x, w, *scales)
    torch.testing.assert_close(fast.float(), twin.float(), rtol=2e-2, atol=2e-2)


FP8_SCALES = (math.sqrt(768) / 448, 2 ** -9, 1 / 448)


def fp8_reference_grads(x, w, grad, scales):
    """float64 gradients of the FP8 head: x and w rounded to e4m3 and the incoming gradient to e5m2, as the kernel
    sees them, then exact matmuls."""
    x_scale, w_scale, grad_scale = scales
    dequantize = lambda t, scale, dtype: T.fp8_quantize(t, scale, dtype).double() * scale
    x_q, w_q = dequantize(x, x_scale, torch.float8_e4m3fn), dequantize(w, w_scale, torch.float8_e4m3fn)
    g_q = dequantize(grad, grad_scale, torch.float8_e5m2)
    return g_q @ w_q, g_q.T @ x_q


def fp8_inputs(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 768, generator=gen).bfloat16().to(device).requires_grad_()
    w = (torch.randn(256, 768, generator=gen) * 0.01).bfloat16().to(device).requires_grad_()
    grad = (torch.randn(64, 256, generator=gen) * 0.1).bfloat16().to(device)
    return x, w, grad


def test_fp8_custom_op_registration_is_consistent():
    """torch.library.opcheck: the fake (shape-only) twins match the real outputs' shapes, dtypes and strides, and
    the autograd registration is sound, which is what torch.compile relies on."""
    x, w, grad = fp8_inputs()
    # fake and autograd checks only: opcheck's schema and AOT checks reduce or perturb the float8 outputs
    # arithmetically, which float8 tensors do not support on the CPU (the compiled test below traces the op instead)
    torch.library.opcheck(T.fp8_linear_op, (x, w, *FP8_SCALES), test_utils=("test_faketensor",
                                                                            "test_autograd_registration"))
    x_f8 = T.fp8_quantize(x.detach(), FP8_SCALES[0], torch.float8_e4m3fn)
    w_f8 = T.fp8_quantize(w.detach(), FP8_SCALES[1], torch.float8_e4m3fn)
    torch.library.opcheck(T.fp8_linear_backward_op, (grad, x_f8, w_f8, *FP8_SCALES), test_utils="test_faketensor")


@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_custom_op_forward_and_backward_against_float64(compiled):
    """The op's forward equals the CPU twin (the same FP8 rounding); its backward, with e5m2 gradients, equals a
    float64 reference; compiled (fullgraph, through the fake twins) it gives the same as eager."""
    x, w, grad = fp8_inputs()
    head = lambda x, w: T.fp8_linear_op(x, w, *FP8_SCALES)[0]
    if compiled:
        head = torch.compile(head, backend="aot_eager", fullgraph=True)
    out = head(x, w)
    assert out.dtype == torch.bfloat16 and out.shape == (64, 256)
    assert torch.equal(out, T.fp8_linear_reference(x.detach(), w.detach(), *FP8_SCALES))
    out.backward(grad)
    grad_x, grad_w = fp8_reference_grads(x.detach(), w.detach(), grad, FP8_SCALES)
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), grad_x, rtol=1e-2, atol=1e-5)  # bf16 output rounding only
    torch.testing.assert_close(w.grad.double(), grad_w, rtol=1e-2, atol=1e-5)


def test_fp8_op_bodies_run_compiled():
    """The op bodies run as compiled graphs (as #48's @torch.compile impls), not as eager divide/clamp/cast/matmul
    kernels: a call at a chunk length not seen before compiles one new graph forward and one backward, and a second
    call at that length compiles nothing (and gives what the CPU twin gives)."""
    from torch._dynamo.utils import counters
    x = torch.randn(40, 768).bfloat16().requires_grad_()  # 40 rows: a shape no other test compiles
    w = (torch.randn(256, 768) * 0.01).bfloat16().requires_grad_()
    graphs = lambda: counters["stats"]["unique_graphs"]
    before = graphs()
    out = T.fp8_linear_op(x, w, *FP8_SCALES)[0]
    after_forward = graphs()
    out.backward(torch.ones_like(out))
    assert (after_forward - before, graphs() - after_forward) == (1, 1)
    again = T.fp8_linear_op(x, w, *FP8_SCALES)[0].detach()
    assert graphs() == before + 2 and torch.equal(again, T.fp8_linear_reference(x.detach(), w.detach(), *FP8_SCALES))


def fp8_backward_inputs(monkeypatch, accum_steps: int) -> torch.Tensor:
    """What the FP8 head's backward op divides and casts to e5m2 (grad / grad_scale) in one step of a test-preset
    GPT built for accum_steps, its chunk loss divided by accum_steps before backward as the loop does. The op runs
    on the CPU here (on CUDA it is the only path); a dispatch mode records its arguments."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.speedrun.fp8_linear_backward.default:
                grad, *_, grad_scale = args
                seen.append(grad.float() / grad_scale)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(T, "fp8_linear", lambda x, w, *scales: T.fp8_linear_op(x, w, *scales)[0])
    torch.manual_seed(0)
    model = T.GPT(T.model_config(hp()), accum_steps=accum_steps)
    with torch.no_grad():
        model.lm_head.normal_(std=0.02)  # a nonzero head: the logits' gradient depends on it
    idx = torch.randint(0, 50257, (65,))
    loss = model(idx[:-1], idx[1:], "sum", fp8=True)
    with Record():
        (loss / accum_steps).backward()
    assert len(seen) == 1
    return seen[0]


def test_fp8_gradient_scale_folds_the_accumulation(monkeypatch):
    """On one GPU (8 accumulation steps) each chunk's loss is divided by 8 before backward; the head's e5m2 cast must
    still see the values it sees on 8 GPUs (1 step), #48's ranges: grad / grad_scale equal at both."""
    one_gpu, eight_gpus = fp8_backward_inputs(monkeypatch, 8), fp8_backward_inputs(monkeypatch, 1)
    assert eight_gpus.abs().max() > 1  # a gradient of the e5m2 range's scale, not a zero
    torch.testing.assert_close(one_gpu, eight_gpus, rtol=1e-6, atol=0)


def test_setup_builds_the_model_with_its_accumulation_steps(run_env):
    """setup() hands the world's accumulation steps to GPT: the test preset's 2 chunks on one process are 2 steps."""
    hp_, launch = T.parse_env(run_env, False)
    state = T.setup(hp_, launch, torch.device("cpu"))
    assert state.geometry.accum_steps == 2
    assert state.model.fp8_grad_scale == T.FP8_GRAD_SCALE / 2


def test_flex_attention_raises_the_recompile_limit_without_compile(monkeypatch):
    """With COMPILE=0 on CUDA the Flex kernel is still compiled and meets ~16 (length, window, grad mode) variants:
    preparing it raises dynamo's recompile limit (torch's default of 8 would make it fall back to eager Flex, whose
    full score matrices do not fit at a validation sequence). Preparing builds the wrapper only: no CUDA is touched."""
    monkeypatch.setattr(T, "_flex_kernel", None)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    monkeypatch.setattr(torch._dynamo.config, "accumulated_recompile_limit", 8)
    T.FlexAttention.prepare(torch.device("cpu"))
    assert torch._dynamo.config.recompile_limit == 8  # the CPU runs dense attention: nothing compiled or raised
    T.FlexAttention.prepare(torch.device("cuda"))
    assert T._flex_kernel is not None
    assert torch._dynamo.config.recompile_limit == T.COMPILE_RECOMPILE_LIMIT >= 16
    assert torch._dynamo.config.accumulated_recompile_limit >= 4 * T.COMPILE_RECOMPILE_LIMIT


@pytest.mark.cuda
def test_fp8_kernel_backward_matches_float64_reference():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a CUDA GPU with sm90+")
    x, w, grad = fp8_inputs("cuda")
    out = T.fp8_linear(x, w, *FP8_SCALES)
    out.backward(grad)
    grad_x, grad_w = fp8_reference_grads(x.detach().cpu(), w.detach().cpu(), grad.cpu(), FP8_SCALES)
    # _scaled_mm accumulates in fp32 and rounds grad_x to bf16: a few bf16 ulps off the float64 reference
    torch.testing.assert_close(x.grad.double().cpu(), grad_x, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(w.grad.double().cpu(), grad_w, rtol=2e-2, atol=1e-4)


@pytest.mark.cuda
def test_flex_attention_matches_dense_attention_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    T.FlexAttention.prepare(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 1024, 2, 64, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    docs = packed_docs(1024, seed=3, mean_doc=300).cuda()
    for window in (0, 384, 896):
        flex = T.flex_attention(q, k, v, T.flex_block_mask(docs, window), 0.1)
        dense = T.dense_attention(q, k, v, T.document_window_mask(docs, window), 0.1)
        torch.testing.assert_close(flex, dense, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_flex_attention_backward_matches_dense_attention_inside_a_compiled_graph_on_cuda():
    """The speedrun's attention shapes (6 heads of 128, a 2048-token packed sequence): the BlockMask built from the
    document ids inside a compiled fullgraph function, as the compiled model builds it, forward and the gradients of
    q, k and v against dense attention in fp32 on the same bf16 inputs."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    T.FlexAttention.prepare(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(1, 2048, 6, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
                     for _ in range(4))
    docs = packed_docs(2048, seed=4, mean_doc=500).cuda()
    for window in (384, 1408):  # #48's short and long windows of the first phase, in tokens (3 and 11 blocks)
        flex = torch.compile(lambda q, k, v, docs: T.flex_attention(q, k, v, T.flex_block_mask(docs, window), 0.1),
                             fullgraph=True, dynamic=False)
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        flex(*inputs, docs).backward(grad)
        reference = [t.float().requires_grad_() for t in (q, k, v)]
        dense = T.dense_attention(*reference, T.document_window_mask(docs, window), 0.1)
        dense.backward(grad.float())
        torch.testing.assert_close(flex(q, k, v, docs).float(), dense, rtol=2e-2, atol=2e-2)
        for got, want in zip(inputs, reference):  # bf16 gradients: a few bf16 ulps of fp32's
            torch.testing.assert_close(got.grad.float(), want.grad, rtol=2e-2, atol=2e-2)


def trained_like_model(smear=True):
    """The test-preset model with every zero-initialized weight (head, output projections, gates) made random, so
    that every path carries signal; smear=False zeroes the smear lambda (the one path from a token to the next
    position, which #48 applies across document boundaries too)."""
    config = T.model_config(hp(window_block_tokens=8, long_windows="3"))
    model = signal_everywhere(T.GPT(config), torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.scalars[model.scalar_slices["smear"]] = 0.5 if smear else 0.0
    return model.eval()


def doc_tokens(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.tensor([T.BOS_ID]), torch.randint(0, 50000, (n - 1,), generator=gen)]) for n in lengths]
    return torch.cat(docs)


def test_documents_do_not_see_each_other_through_the_whole_model():
    """Changing every token of document A but its last (which the smear carries into B's first position, as #48)
    leaves the per-token loss of the later document B unchanged; documents are longer than the windows (8 * 3 =
    24 tokens long, 12 short) so that both masks matter. A model that ignores boundaries fails this."""
    model = trained_like_model()
    tokens = doc_tokens([40, 50], seed=1)
    changed = tokens.clone()
    changed[1:39] = doc_tokens([39], seed=2)[1:]
    with torch.no_grad():
        before = model(tokens[:-1], tokens[1:], reduction="none")
        after = model(changed[:-1], changed[1:], reduction="none")
    assert (before[:38] - after[:38]).abs().max() > 1e-3  # document A itself did change
    torch.testing.assert_close(after[40:], before[40:], rtol=0, atol=1e-5)


def test_packed_validation_loss_equals_naive_per_document_loss():
    """A validation sequence starts mid-document and packs several documents; its summed loss equals the sum over
    documents of each one run alone (smear off: it is the only path across documents). Rotary positions differ
    (packed vs from 0), which only the bf16 tables' rounding sees."""
    model = trained_like_model(smear=False)
    sequence = doc_tokens([30, 45, 20, 33], seed=3)[7:]  # starts inside the first document; 121 tokens
    inputs, targets = sequence[:-1], sequence[1:]
    with torch.no_grad():
        packed = model(inputs, targets, reduction="sum")
        starts = [0] + (inputs == T.BOS_ID).nonzero().flatten().tolist() + [inputs.size(0)]
        naive = sum(model(inputs[a:b], targets[a:b], reduction="sum") for a, b in zip(starts[:-1], starts[1:]) if b > a)
    assert len(starts) == 5  # a partial document, then three whole ones
    torch.testing.assert_close(packed, naive, rtol=1e-4, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_evaluation_head_on_slices_equals_the_whole_sequence(monkeypatch, reduction):
    """Evaluation runs the head and loss on slices of EVAL_HEAD_TOKENS tokens; with slices of 24 (not dividing the
    sequence) the losses equal the training path's single-shot ones, ignored targets (-100) included."""
    model = trained_like_model()
    tokens = doc_tokens([40, 30, 31], seed=7)
    targets = tokens[1:].clone()
    targets[-5:] = -100
    with torch.no_grad():
        whole = model.train()(tokens[:-1], targets, reduction=reduction)
        monkeypatch.setattr(T, "EVAL_HEAD_TOKENS", 24)
        sliced = model.eval()(tokens[:-1], targets, reduction=reduction)
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)


def test_rotary_table_covers_sequences_padded_to_flex_tiles():
    """On CUDA a sequence is padded to whole 128-token FlexAttention tiles, so the rotary table has that many rows
    even when no sequence of the run is that long (the test preset's are 64 and 128 tokens)."""
    model = T.GPT(T.model_config(hp(val_batch_tokens=128)))
    assert model.rotary.cos.size(0) % T.FLEX_BLOCK == 0 and model.rotary.cos.size(0) >= 64


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op of a forward/backward with its input and output tensors' (dtype, shape)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = lambda xs: [(t.dtype, tuple(t.shape)) for t in torch.utils._pytree.tree_leaves(xs)
                              if isinstance(t, torch.Tensor)]
        self.ops.append((str(func.overloadpacket.__name__), tensors((args, kwargs)), tensors(out)))
        return out


def test_bf16_model_multiplies_by_unrounded_fp32_scalars_and_stays_bf16():
    """As #48 on CUDA: bf16 activations times the fp32 0-D scalars (block lambdas, sa_lambdas, smear, skip, backout,
    YaRN's attention factor); no scalar is rounded to bf16 first, and no product is promoted to fp32. The gates are
    stored in bf16 like the embeddings."""
    config = hp(num_layers=4)
    torch.manual_seed(0)
    model = T.GPT(T.model_config(config), torch.bfloat16).train()
    with torch.no_grad():
        model.lm_head.normal_(0, 0.02)  # a zero head would leave most gradients exactly zero
    assert model.smear_gate.dtype == torch.bfloat16
    assert all(b.attn.attn_gate.dtype == torch.bfloat16 for b in model.blocks if b.attn is not None)
    model.set_training_window(config.long_windows[0] + 3)  # a YaRN step: a scale factor that bf16 cannot hold exactly
    assert float(model.rotary.scale_factor) != float(model.rotary.scale_factor.bfloat16())
    tokens = packed_docs(97, seed=1)
    recorder = _RecordOps()
    with recorder:
        model(tokens[:-1], tokens[1:]).backward()
    rounded = [op for op in recorder.ops if op[0] in ("_to_copy", "to") and op[1] and op[1][0] == (torch.float32, ())
               and op[2] and op[2][0][0] == torch.bfloat16]
    assert rounded == [], f"0-D fp32 scalars rounded to bf16: {rounded[:3]}"
    scalar_products = [op for op in recorder.ops if op[0] == "mul" and (torch.float32, ()) in op[1]
                       and any(dtype == torch.bfloat16 and len(shape) >= 2 for dtype, shape in op[1])]
    assert len(scalar_products) >= 8  # lambdas, sa_lambdas, smear, skip, backout, YaRN at least once each
    assert all(op[2][0][0] == torch.bfloat16 for op in scalar_products), scalar_products[:3]
    promoted = [op for op in recorder.ops if op[0] in ("mul", "add", "sub") and op[2] and op[2][0][0] == torch.float32
                and len(op[2][0][1]) >= 2 and any(dtype == torch.bfloat16 for dtype, _ in op[1])
                and any(dtype == torch.float32 and shape == (1,) for dtype, shape in op[1])]
    assert promoted == [], f"a 1-element fp32 slice promoted an activation: {promoted[:3]}"
    assert model.smear_gate.grad is not None and model.smear_gate.grad.dtype == torch.bfloat16
