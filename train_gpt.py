"""GPT speedrun trainer: a 124M-class GPT on GPT-2-tokenized FineWeb to val loss 3.28, in one file.

Launch recipes (every hyperparameter is an env var of its upper-case field name, see Hyperparameters):

    ./run.sh                                                  # sets up, then picks one of the lines below
    python train_gpt.py                                       # CPU: the `cpu` preset on the embedded corpus
    python train_gpt.py                                       # 1 GPU: the `speedrun` preset, 8x grad accumulation
    torchrun --standalone --nproc_per_node=8 train_gpt.py     # 8 GPUs: the speedrun (record #48 config)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=RUN \\
        train_gpt.py                                          # 2 nodes: the same command on each
    NORM=derf OPTIMIZER=adamw torchrun --standalone --nproc_per_node=8 train_gpt.py   # an ablation
    SAVE_CHECKPOINT=1 CHECKPOINT_EVERY=250 python train_gpt.py   # checkpoints in logs/<log name>/step_NNNNNN/
    RESUME=logs/<log name>/ python train_gpt.py               # continue from its newest checkpoint
    PRESET=test NUM_ITERATIONS=20 python train_gpt.py         # the tiny shapes the tests use

Every run writes logs/<UTC timestamp>_<tag>_<run id>.txt (rank 0 only): this source, a `config:` json line (a
resumed run: then a `resumed:` line naming the log it continues), the speedrun step lines (`checkpoint:` lines
where one was saved), peak memory and a `final:` json line, or a `stopped:` line saying why it ended early.
`python records/validate.py logs/` tests a set of runs.

Sections, in the order a reader meets the ideas: hyperparameters and presets, kernels, distributed (the
collectives the optimizers use), optimizers, norms, model, data, training loop; then the infrastructure: logging,
checkpoints, flag checks and the command line, main. Importing this file runs nothing (it only sets
PYTORCH_ALLOC_CONF's default): no CUDA, no network, no file writes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import enum
import functools
import glob
import importlib
import json
import math
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
import typing
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

# #48's allocator setting (fewer fragmentation stalls as the batch grows). Set before torch is imported, so that it is
# in place before anything (this file, a test, a benchmark) touches CUDA; a value the user set wins.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# ---- hyperparameters ----


BOS_ID = 50256  # GPT-2's <|endoftext|>, which starts every document in FineWeb's and the embedded corpus's shards
BYTE_BOS_ID = 256  # byte-level shards (data/build_corpus.py --bytes): ids 0-255 are UTF-8 bytes, 256 starts a document


def env_name(field_name: str) -> str:
    """The env var that sets a Hyperparameters field: its name in upper case (num_iterations: NUM_ITERATIONS)."""
    return field_name.upper()


class ConfigError(ValueError):
    """A bad env override or an inconsistent configuration; main() prints it and exits with code 2."""


def _hp(default, help: str, choices: Sequence[str] | Mapping[str, object] | None = None, check: Callable | None = None,
        rule: str = ""):
    """A Hyperparameters field with its help text, allowed choices (a registry: its names when flags are parsed) and a
    validity check (with its rule in words)."""
    return field(default=default, metadata={"help": help, "choices": choices, "check": check, "rule": rule})


# The swappable parts, name -> what builds it: ATTENTION (an Attention subclass) is filled in the kernels section,
# NORMS (a Norm subclass) in the norms section, OPTIMIZERS (an OptimizerEntry) in the optimizers section. The flags'
# choices are these dicts themselves, so the flag checks, their errors, --help and the factories all read them when
# flags are parsed: a script that registers one more entry before calling main() has made it a valid value, with no
# other edit.
ATTENTION: dict[str, type[Attention]] = {}
NORMS: dict[str, type[Norm]] = {}
OPTIMIZERS: dict[str, OptimizerEntry] = {}


def registered(registry: Mapping[str, object], flag: str, name: str) -> typing.Any:
    """registry[name], or a ConfigError naming the flag, the value and every registered choice."""
    if name not in registry:
        raise ConfigError(f"{flag}={name}: expected one of {', '.join(registry)}")
    return registry[name]


_positive = (lambda v: v > 0, "a number > 0")
_non_negative = (lambda v: v >= 0, "a number >= 0")
_fraction = (lambda v: 0 <= v < 1, "a number in [0, 1)")
_positive_all = (lambda v: len(v) > 0 and all(x > 0 for x in v), "a comma-separated list of numbers > 0")
_increasing_fractions = (lambda v: all(0 < x < 1 for x in v) and all(a < b for a, b in zip(v, v[1:])),
                         "an increasing comma-separated list (may be empty) of numbers in (0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    """What GPT and its modules read, and nothing else: the architecture, its norm and the rotary table's length.
    The defaults are record #48's 124M model; the Hyperparameters flags of the same names take their defaults from
    here, and model_config(hp) builds one from a run's flags. GPT(ModelConfig(num_layers=4, ...)) needs no run."""

    vocab_size: int = 50304  # GPT-2's 50,257 tokens padded to a multiple of 128
    bos_id: int = BOS_ID
    num_layers: int = 12
    model_dim: int = 768
    num_heads: int = 6
    head_dim: int = 128
    mlp_ratio: int = 4
    gate_input_dim: int = 12
    num_value_embeds: int = 3
    logit_cap: float = 30.0
    logit_temperature: float = 7.5
    attn_scale: float = 0.1
    window_block_tokens: int = 128
    initial_window: int = 3  # the first long window in blocks (#48's first third); the loop grows it as scheduled
    # rows of the rotary table: the longest packed sequence a forward will see (#48: a 262,144-token validation
    # sequence at 8 GPUs, the most at any world size); GPT rounds it up to whole tiles of every attention kernel
    rotary_tokens: int = 262144
    norm: str = "rmsnorm"
    norm_alpha: float = 0.5
    norm_ema: float = 0.9
    attention: str | None = None  # an ATTENTION name; None (auto): flex on CUDA, dense elsewhere, per forward


@dataclass
class Hyperparameters:
    """The only config. Every field is overridable by the env var of its upper-case name (NUM_ITERATIONS=50).

    Defaults below are the `speedrun` preset (record #48); PRESETS holds what the `cpu`, `ablation` and `test`
    presets change.
    Fields typed `bool | None` are "auto" when None: resolved from the hardware in resolve_auto().
    """

    preset: str = _hp("speedrun", "defaults to start from", choices=("speedrun", "cpu", "ablation", "research", "test"))
    train_files: str = _hp("data/fineweb10B/fineweb_train_*.bin", "glob of training shards")
    val_files: str = _hp("data/fineweb10B/fineweb_val_*.bin", "glob of validation shards")
    log_dir: str = _hp("logs", "folder for the run's log file")
    run_tag: str = _hp("", "tag in the log file name (default: the preset)")
    seed: int = _hp(0, "seed of the model init (the data order is DATA_SEED's)")
    data_seed: int = _hp(-1, "seed of a shuffle of the training documents' order within each shard, the same at "
                         "every world size (-1: the shards' own order, as #48); the validation set never moves",
                         check=(lambda v: v >= -1, "-1 (the shards' order) or a seed >= 0"))
    # model: the defaults are ModelConfig's (#48's), written there only
    vocab_size: int = _hp(ModelConfig.vocab_size, "embedding rows: GPT-2's 50257 padded to a multiple of 128 "
                          "(research: 384, bytes and their BOS padded)", check=_positive)
    bos_id: int = _hp(ModelConfig.bos_id, "the token that starts every document: a property of the shards "
                      f"(GPT-2's <|endoftext|> {BOS_ID}; byte-level shards: {BYTE_BOS_ID})", check=_non_negative)
    num_layers: int = _hp(ModelConfig.num_layers, "transformer layers (the per-layer table is derived from it)",
                          check=(lambda v: v >= 2, "an integer >= 2"))
    model_dim: int = _hp(ModelConfig.model_dim, "residual width", check=_positive)
    num_heads: int = _hp(ModelConfig.num_heads, "attention heads", check=_positive)
    head_dim: int = _hp(ModelConfig.head_dim, "width of one head (num_heads * head_dim must equal model_dim)",
                        check=(lambda v: v > 0 and v % 4 == 0, "a multiple of 4"))
    mlp_ratio: int = _hp(ModelConfig.mlp_ratio, "MLP hidden width / model_dim", check=_positive)
    gate_input_dim: int = _hp(ModelConfig.gate_input_dim, "leading residual channels read by the smear and "
                              "attention gates", check=_positive)
    num_value_embeds: int = _hp(ModelConfig.num_value_embeds, "value-embedding tables", check=_positive)
    logit_cap: float = _hp(ModelConfig.logit_cap, "logits = cap * sigmoid(logits / temperature)", check=_positive)
    logit_temperature: float = _hp(ModelConfig.logit_temperature, "see logit_cap", check=_positive)
    attn_scale: float = _hp(ModelConfig.attn_scale, "attention softmax scale (instead of 1/sqrt(head_dim))",
                            check=_positive)
    window_block_tokens: int = _hp(ModelConfig.window_block_tokens, "attention windows are counted in blocks of "
                                   "this many tokens", check=_positive)
    long_windows: tuple[int, ...] = _hp((3, 7, 11), "long window (blocks) in each third of the scheduled steps",
                                        check=_positive_all)
    extension_window: int = _hp(13, "long window in the extension steps", check=_positive)
    final_window: int = _hp(20, "long window for the final validation", check=_positive)
    fp8: bool | None = _hp(None, "FP8 lm_head matmul in training (auto: on with CUDA sm90+)")
    attention: str | None = _hp(ModelConfig.attention, "attention kernel (auto: flex on CUDA, dense elsewhere; dense "
                                "holds (T, T) scores: short sequences only; flex trains on CUDA only)",
                                choices=ATTENTION)
    # data and schedule
    max_seq_len: int = _hp(2048, "longest piece of one document in a packed training chunk (longer ones are cut)",
                           check=_positive)
    batch_chunks: int = _hp(8, "packed chunks per step: at world sizes dividing it each rank runs batch_chunks / world "
                            "forwards of global batch / batch_chunks tokens (#48: 8, one forward per GPU); at larger "
                            "world sizes one forward of global batch / world", check=_positive)
    batch_schedule: tuple[int, ...] = _hp((131072, 262144, 393216), "global batch tokens in each third",
                                          check=_positive_all)
    num_iterations: int = _hp(2160, "optimizer steps, extension included", check=_positive)
    extension_iterations: int = _hp(40, "steps after the schedule at the final lr", check=_non_negative)
    val_every: int = _hp(250, "validate every this many steps (0: only at the start and the end)",
                         check=_non_negative)
    val_tokens: int = _hp(10485760, "validation tokens (a multiple of VAL_BATCH_TOKENS)", check=_positive)
    val_batch_tokens: int = _hp(2097152, "validation tokens per global validation step, cut into consecutive "
                                "sequences of val_batch_tokens / max(world, batch_chunks)", check=_positive)
    train_log_every: int = _hp(50, "read the train loss (a host sync) and log it every this many steps",
                               check=_positive)
    warmup: bool = _hp(True, "run the step on every schedule phase, then restore state and start the clock")
    compile: bool | None = _hp(None, "torch.compile the model (auto: on with CUDA)")
    # learning-rate schedule (x = step / scheduled steps)
    lr_boosts: tuple[float, ...] = _hp((1.0, 1.51, 1.93), "peak lr multiplier in each third", check=_positive_all)
    lr_boost_at: tuple[float, ...] = _hp((0.33, 0.66), "fractions of the scheduled steps where the next boost starts",
                                         check=_increasing_fractions)
    cooldown_frac: float = _hp(0.55, "last fraction of the schedule that decays linearly",
                               check=(lambda v: 0 < v <= 1, "a number in (0, 1]"))
    final_lr_frac: float = _hp(0.1, "lr multiplier at the end of the decay and in the extension",
                               check=_non_negative)
    lr_warmup_steps: int = _hp(0, "linear warmup of every lr over the first N steps: step s < N takes (s + 1) / "
                               "(N + 1) of it (#48: none)",
                               check=_non_negative)
    # DistAdam: embeddings, value embeddings, scalars, head
    adam_lr: float = _hp(0.008, "DistAdam base lr", check=_positive)
    adam_beta1: float = _hp(0.65, "DistAdam beta1", check=_fraction)
    adam_beta2: float = _hp(0.95, "DistAdam beta2", check=_fraction)
    adam_bias_correction: bool = _hp(True, "DistAdam divides its moments by 1 - beta**step, as Kingma & Ba's Adam")
    adam_eps: float = _hp(1e-8, "DistAdam eps", check=_positive)
    adam_wd: float = _hp(0.0, "DistAdam decoupled weight decay", check=_non_negative)
    embed_lr_mul: float = _hp(75.0, "lr_mul of the embedding and value embeddings", check=_positive)
    scalar_lr_mul: float = _hp(5.0, "lr_mul of the scalars", check=_positive)
    head_lr_mul: float = _hp(1.0, "lr_mul of lm_head", check=_positive)
    adam_step_every: int = _hp(2, "Adam groups step every this many steps, on the summed gradients", check=_positive)
    adamw_matrix_wd: float = _hp(0.0, "OPTIMIZER=adamw: decoupled weight decay of the hidden matrices and gates, "
                                 "scaled by lr as ADAM_WD (0: Adam, as the studies before 2026-12-07 ran)",
                                 check=_non_negative)
    adamw_matrix_lr: float = _hp(0.002, "OPTIMIZER=adamw: DistAdam lr of the hidden matrices and gates "
                                 "(swept on the cpu preset: 0.001-0.002 best, 0.008 worse; see README)",
                                 check=_positive)
    # matrix optimizer
    optimizer: str = _hp("normuon", "optimizer of the hidden matrices and gates (muonmax: the MuonMax/Momo paper's "
                         "regularized max-norm method, its own lr MUONMAX_LR)",
                         choices=OPTIMIZERS)
    muonmax_lr: float = _hp(0.05, "OPTIMIZER=muonmax: lr of the matrices (the step is lr * the summed dual norm "
                            "of the per-token-mean momentum, ~0.5-2 on the cpu preset, so not Muon's scale)",
                            check=_positive)
    momo: bool = _hp(False, "Momo model truncation of the joint step, on top of any OPTIMIZER (needs "
                     "ADAM_STEP_EVERY=1)")
    momo_lb: float = _hp(0.0, "Momo's lower bound on the per-token mean train loss")
    momo_beta: float = _hp(0.9, "Momo's EMA factor for the loss, gradient and <gradient, weights> averages",
                           check=_fraction)
    ortho: str = _hp("polar", "orthogonalization: Polar Express or Newton-Schulz quintic", choices=("polar", "ns5"))
    cwd: bool = _hp(True, "cautious weight decay (off: plain decoupled decay)")
    muon_lr: float = _hp(0.023, "NorMuon/Muon lr", check=_positive)
    muon_momentum: float = _hp(0.95, "momentum after warmup", check=_fraction)
    muon_momentum_start: float = _hp(0.85, "momentum at step 0 and at the end of the cooldown", check=_fraction)
    momentum_warmup_steps: int = _hp(300, "steps of linear momentum warmup", check=_non_negative)
    momentum_cooldown_steps: int = _hp(50, "last steps of linear momentum cooldown", check=_non_negative)
    muon_wd: float = _hp(1.2, "NorMuon weight decay (scaled by lr)", check=_non_negative)
    normuon_beta2: float = _hp(0.95, "beta2 of NorMuon's second-moment buffer", check=_fraction)
    c_proj_lr_mul: float = _hp(2.0, "lr_mul of the MLP output matrix", check=_positive)
    # normalization
    norm: str = _hp(ModelConfig.norm, "block and final normalization", choices=NORMS)
    norm_alpha: float = _hp(ModelConfig.norm_alpha, "initial alpha of DyT/Derf", check=_positive)
    norm_ema: float = _hp(ModelConfig.norm_ema, "lambda of the Derf EMA-blend scale", check=_fraction)
    diagnostics: bool = _hp(False, "per-layer diagnostics at each validation")
    diag_every: int = _hp(0, "DIAGNOSTICS=1: also collect them every this many steps (0: only at validations)",
                          check=_non_negative)
    # checkpoints and faults
    save_checkpoint: bool = _hp(False, "save a checkpoint (torch.distributed.checkpoint, every rank its own shard) "
                                "every CHECKPOINT_EVERY steps, at the end, and when SIGINT/SIGTERM stops the run "
                                "(at a step that ends an ADAM_STEP_EVERY cycle)")
    checkpoint_every: int = _hp(0, "steps between checkpoints (0: only at the end and on a stop); a multiple of "
                                "ADAM_STEP_EVERY", check=_non_negative)
    checkpoint_dir: str = _hp("", "folder of this run's checkpoints, one step_NNNNNN subfolder each (default: "
                              "LOG_DIR/<log file name>/; resumed: the folder of the checkpoint it resumes)")
    checkpoint_keep: int = _hp(0, "keep only the newest this many checkpoints in CHECKPOINT_DIR (0: keep all)",
                               check=_non_negative)
    resume: str = _hp("", "continue the run saved in this checkpoint: a step_NNNNNN folder, or a checkpoint folder "
                      "(its newest complete step)")
    dist_timeout: float = _hp(600.0, "seconds a collective waits for the other ranks before the job ends with an "
                              "error (a rank that died or hangs); 600 is torch's NCCL default, and leaves room for the "
                              "first step, where ranks compile different optimizer graphs while others wait",
                              check=_positive)

    @property
    def scheduled_iterations(self) -> int:
        return self.num_iterations - self.extension_iterations


PRESETS: dict[str, dict[str, object]] = {
    "speedrun": {},
    "cpu": dict(
        train_files="data/embedded/train_*.bin", val_files="data/embedded/val_*.bin",
        num_layers=4, model_dim=128, num_heads=1, max_seq_len=1024, batch_chunks=1,
        batch_schedule=(1024,), long_windows=(2,), extension_window=2, final_window=2,
        num_iterations=150, extension_iterations=0, val_every=50, val_tokens=16384, val_batch_tokens=2048,
        lr_boosts=(1.0,), lr_boost_at=(), train_log_every=10, adam_step_every=1, warmup=False,
        momentum_warmup_steps=50, momentum_cooldown_steps=10,
        adam_lr=0.004, muon_lr=0.012,  # half the speedrun's: better val loss at every validation (README)
    ),
    "test": dict(
        train_files="", val_files="",
        num_layers=4, model_dim=32, num_heads=1, head_dim=32, max_seq_len=48, batch_chunks=2,
        batch_schedule=(128,), long_windows=(2,), extension_window=2, final_window=2, window_block_tokens=16,
        num_iterations=8, extension_iterations=0, val_every=4, val_tokens=1024, val_batch_tokens=256,
        lr_boosts=(1.0,), lr_boost_at=(), train_log_every=1, adam_step_every=1, warmup=False,
        momentum_warmup_steps=4, momentum_cooldown_steps=2,
    ),
}
# The cpu preset made fit for seeded comparisons (records/2026-11-26_norm_optimizer_ablation/): 100 steps, and a
# validation of 64K tokens (~11 documents instead of ~3) run only at the start and the end, because on CPU the
# (2048, 50304) logits of one validation sequence cost about half a training step; with DIAGNOSTICS=1 the diag
# lines come every 10 steps instead.
PRESETS["ablation"] = {**PRESETS["cpu"], "num_iterations": 100, "val_every": 0, "val_tokens": 65536,
                       "diag_every": 10}
# The research preset: the same corpus as byte-level tokens (python data/build_corpus.py --bytes), so that the
# hidden matrices hold most of the parameters (~3.7M of ~4.2M at dim 256; GPT-2's 50,304-row tables hold ~98% of
# the cpu preset's) and the matrix optimizer shows in the loss; #48's architecture otherwise. One 1024-token chunk a
# step, 200 steps (measured 3m42s alone on a 2-core AVX-only CPU), validation on 64K bytes at start, middle and end.
PRESETS["research"] = {**PRESETS["cpu"], "train_files": "data/embedded_bytes/train_*.bin",
                       "val_files": "data/embedded_bytes/val_*.bin", "vocab_size": 384, "bos_id": BYTE_BOS_ID,
                       "num_layers": 6, "model_dim": 256, "num_heads": 2, "long_windows": (4,), "extension_window": 4,
                       "final_window": 4, "num_iterations": 200, "val_every": 100, "val_tokens": 65536,
                       "val_batch_tokens": 1024}


@dataclass(frozen=True)
class BatchGeometry:
    """How a global batch splits over ranks and forwards (#48's layout, generalized to any world size).

    Every step is chunks packed sequences; chunk c of a step runs on rank c % world in micro-step c // world, so
    the set of chunks in a step is the same at every world size up to batch_chunks.
    """

    chunks: int  # packed sequences per global step: max(world, batch_chunks)
    accum_steps: int  # forwards per rank per step: chunks / world

    def chunk_tokens(self, global_tokens: int) -> int:
        return global_tokens // self.chunks


def batch_geometry(hp: Hyperparameters, world_size: int) -> BatchGeometry:
    chunks = max(world_size, hp.batch_chunks)
    return BatchGeometry(chunks=chunks, accum_steps=chunks // world_size)


def max_sequence_tokens(hp: Hyperparameters, world_size: int) -> int:
    """The longest packed sequence a forward sees: the largest training chunk or a validation sequence."""
    geometry = batch_geometry(hp, world_size)
    return max(geometry.chunk_tokens(max(hp.batch_schedule)), geometry.chunk_tokens(hp.val_batch_tokens))


def model_config(hp: Hyperparameters, world_size: int = 1) -> ModelConfig:
    """The model part of a run's flags, with a rotary table as long as the longest sequence at this world size."""
    same_names = {f.name: getattr(hp, f.name) for f in dataclasses.fields(ModelConfig) if hasattr(hp, f.name)}
    return ModelConfig(**same_names, initial_window=hp.long_windows[0],
                       rotary_tokens=max_sequence_tokens(hp, world_size))


# ---- kernels ----


def document_ids(tokens: Tensor, bos_id: int = BOS_ID) -> Tensor:
    """Per-token document index of a packed sequence (T,): a new document starts at every BOS token. Tokens before
    the first BOS (a validation sequence starts mid-document) are document 0. Non-decreasing, shape (T,)."""
    return (tokens == bos_id).cumsum(0)


def document_window_mask(docs: Tensor, window_tokens: int) -> Tensor:
    """Dense attention mask (T, T) of one packed sequence, docs (T,) its document ids: query q sees key k iff
    q - window_tokens <= k <= q (token-exact, as flash-attention's window_size=(window_tokens, 0) in #48) and both
    lie in one document."""
    positions = torch.arange(docs.size(0), device=docs.device)
    distance = positions[:, None] - positions[None, :]  # q - k
    return (distance >= 0) & (distance <= window_tokens) & (docs[:, None] == docs[None, :])


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Portable attention with a dense boolean mask (T, T): softmax(q k^T * scale, masked) v, written out.
    q, k, v: (1, T, H, D) -> (1, T, H, D). On CPU this is faster than F.scaled_dot_product_attention with an
    arbitrary mask (measured 2-6x for T = 1024, one head of 128, forward + backward), and it is the reference the
    FlexAttention path is held to. Every query sees at least itself, so no row of the softmax is empty."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (1, H, T, D)
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (1, H, T, T)
    # a finite fill, not -inf: exp(fill - row max) is still exactly 0, but a fused kernel that reduces a row in
    # pieces (vector lanes, tiles) never meets exp(-inf - (-inf)) = NaN in a piece that holds no visible key
    weights = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1).type_as(v)
    return (weights @ v).transpose(1, 2)


EVAL_HEAD_TOKENS = 32768  # evaluation computes the head and loss on slices of this many tokens (see GPT.forward)
FLEX_BLOCK = 128  # FlexAttention's tile: the block mask says, per (query tile, key tile), none / some / all


def flex_block_mask(docs: Tensor, window_tokens: int):
    """The FlexAttention BlockMask equal to document_window_mask(docs, window_tokens), built from tile-level
    document ranges with tensor ops only (no (T, T) tensor, no host sync, traceable inside the compiled model).

    docs: (T,) non-decreasing, T a multiple of FLEX_BLOCK. For query tile i and key tile j (j <= i), with each
    tile's first and last document id (lo, hi): some pair may attend iff hi[j] >= lo[i] (a shared document) and
    the closest pair is within the window; every pair attends iff j < i, one document spans both tiles
    (lo[j] == hi[i]) and the farthest pair is within the window. Tiles of the first kind only are evaluated
    element-wise by mask_mod; full tiles skip it.
    """
    from torch.nn.attention.flex_attention import BlockMask
    tiles = docs.size(0) // FLEX_BLOCK
    tile_docs = docs.view(tiles, FLEX_BLOCK)
    lo, hi = tile_docs[:, 0], tile_docs[:, -1]
    index = torch.arange(tiles, device=docs.device)
    tile_gap = index[:, None] - index[None, :]  # i - j for query tile i (rows), key tile j (columns)
    any_pair = ((tile_gap >= 0) & (hi[None, :] >= lo[:, None])
                & ((tile_gap - 1) * FLEX_BLOCK + 1 <= window_tokens))  # closest pair: q = i*B, k = j*B + B - 1
    full = ((tile_gap > 0) & (lo[None, :] == hi[:, None])
            & ((tile_gap + 1) * FLEX_BLOCK - 1 <= window_tokens))  # farthest pair: q = i*B + B - 1, k = j*B
    partial = any_pair & ~full

    def kv_blocks(selected: Tensor) -> tuple[Tensor, Tensor]:
        # (1, 1, tiles) counts and (1, 1, tiles, tiles) key tile indices, the selected ones first
        counts = selected.sum(-1, dtype=torch.int32)
        order = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - window_tokens <= kv_idx) & (kv_idx <= q_idx) & (docs[q_idx] == docs[kv_idx])

    return BlockMask.from_kv_blocks(*kv_blocks(partial), *kv_blocks(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod)


COMPILE_RECOMPILE_LIMIT = 64  # above the variants one run compiles (torch's default of 8 is not; see below)


def raise_recompile_limit() -> None:
    """Lets every compiled function of a run keep up to COMPILE_RECOMPILE_LIMIT variants. Past torch's default of 8
    dynamo silently runs the function eagerly, and one run meets more: the model at each (batch, window) phase and
    validation window; the Flex kernel at about 16 (length, window, grad mode) variants even with COMPILE=0, where
    eager Flex materializes the full score matrices (at a 262K-token validation sequence, far beyond any GPU); the
    FP8 head's op bodies at each chunk length."""
    torch._dynamo.config.recompile_limit = max(COMPILE_RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
    torch._dynamo.config.accumulated_recompile_limit = max(COMPILE_RECOMPILE_LIMIT * 4,
                                                           torch._dynamo.config.accumulated_recompile_limit)


class Attention:
    """The contract between the model and an attention kernel, written once. A new kernel is a subclass and one
    ATTENTION line; ATTENTION=<name> picks it (auto: flex on CUDA, dense elsewhere).

    - tile: a forward pads its sequence at the end to a multiple of this many tokens (GPT.forward).
    - prepare(device): once in setup, before any forward (e.g. compiling the kernel).
    - mask(docs, window_tokens): what attend takes for one window, from a packed sequence's document ids (T,):
      query q sees key k iff q - window_tokens <= k <= q and both lie in one document.
    - attend(q, k, v, mask, scale): q, k, v (1, T, H, D) -> (1, T, H, D).
    """

    tile = 1

    @staticmethod
    def prepare(device: torch.device) -> None:
        pass


class DenseAttention(Attention):
    """ATTENTION=dense: a (T, T) boolean mask and dense_attention, on any device (the CPU's kernel: FlexAttention
    has no backward there)."""

    @staticmethod
    def mask(docs: Tensor, window_tokens: int) -> Tensor:
        return document_window_mask(docs, window_tokens)

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
        return dense_attention(q, k, v, mask, scale)


_flex_kernel: Callable | None = None


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float) -> Tensor:
    """FlexAttention with a BlockMask from flex_block_mask. q, k, v: (1, T, H, D) -> (1, T, H, D). Uses the
    compiled kernel from FlexAttention.prepare() when there is one, else the eager op (CPU tests: forward only)."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    kernel = _flex_kernel or flex
    out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale)
    return out.transpose(1, 2)


class FlexAttention(Attention):
    """ATTENTION=flex, CUDA's kernel (#48 runs flash attention; FlexAttention computes the same): a BlockMask from
    flex_block_mask on whole FLEX_BLOCK tiles, and the FlexAttention kernel compiled once by prepare()."""

    tile = FLEX_BLOCK

    @staticmethod
    def prepare(device: torch.device) -> None:
        """Compiles FlexAttention once, whatever COMPILE says: it is only fast (and only fits in memory) as a
        compiled kernel. Nothing on a CPU (forward-only tests run the eager op)."""
        global _flex_kernel
        if device.type == "cuda" and _flex_kernel is None:
            from torch.nn.attention.flex_attention import flex_attention as flex
            raise_recompile_limit()
            _flex_kernel = torch.compile(flex, dynamic=False)

    @staticmethod
    def mask(docs: Tensor, window_tokens: int):
        return flex_block_mask(docs, window_tokens)

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
        return flex_attention(q, k, v, mask, scale)


def attention_kernel(name: str | None, device: torch.device) -> type[Attention]:
    """ATTENTION's kernel; None (auto): flex on CUDA, dense elsewhere."""
    return registered(ATTENTION, "ATTENTION", name or ("flex" if device.type == "cuda" else "dense"))


ATTENTION.update(dense=DenseAttention, flex=FlexAttention)


FP8_X_SCALE_NUMERATOR = 448.0  # e4m3's largest normal value; x scale = sqrt(model_dim) / 448
FP8_W_SCALE = 2.0 ** -9
FP8_GRAD_SCALE = 1.0 / 448


def fp8_quantize(t: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """t / scale rounded to an FP8 dtype (values beyond its range saturate, as the speedrun's casts)."""
    limit = torch.finfo(dtype).max
    return (t.float() / scale).clamp(-limit, limit).to(dtype)


def _fp8_matmul(a: Tensor, b: Tensor, scale_a: float, scale_b: float, out_dtype: torch.dtype,
                fast_accum: bool) -> Tensor:
    """(a * scale_a) @ (b * scale_b) for FP8 a (N, K) and b (K, M). On CUDA torch._scaled_mm, which wants a
    row-major and b column-major (callers pass b as a transposed row-major tensor); elsewhere the same product of
    the dequantized operands in fp32, so the op below runs (and is tested) on the CPU too."""
    if a.is_cuda:
        one = lambda s: torch.full((), s, dtype=torch.float32, device=a.device)  # no host-to-device copy
        return torch._scaled_mm(a, b, scale_a=one(scale_a), scale_b=one(scale_b), out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)


def _fp8_forward_body(x: Tensor, w: Tensor, x_scale: float, w_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """fp8_linear_op's work: x (N, K), w (M, K) -> (out (N, M) bf16, x_f8 (N, K), w_f8 (M, K) e4m3)."""
    x_f8 = fp8_quantize(x, x_scale, torch.float8_e4m3fn)
    w_f8 = fp8_quantize(w, w_scale, torch.float8_e4m3fn)
    out = _fp8_matmul(x_f8, w_f8.T, x_scale, w_scale, torch.bfloat16, fast_accum=True)  # w_f8.T: column-major
    return out, x_f8, w_f8


def _fp8_backward_body(grad: Tensor, x_f8: Tensor, w_f8: Tensor, x_scale: float, w_scale: float,
                       grad_scale: float) -> tuple[Tensor, Tensor]:
    """fp8_linear_backward_op's work: grad (N, M), x_f8 (N, K), w_f8 (M, K) -> (grad_x (N, K) bf16, grad_w (M, K)
    fp32), grad rounded to float8_e5m2 (more range, less precision than the forward's e4m3)."""
    g_f8 = fp8_quantize(grad, grad_scale, torch.float8_e5m2)
    # grad_x = g @ w: w_f8 (M, K) made column-major by .T.contiguous().T
    grad_x = _fp8_matmul(g_f8, w_f8.T.contiguous().T, grad_scale, w_scale, torch.bfloat16, fast_accum=False)
    # grad_w^T = x^T @ g, then transposed back: #48 measured this order faster than g^T @ x for the (50304, 768)
    # head (the wide vocab dim lands on the column-major second operand)
    grad_w = _fp8_matmul(x_f8.T.contiguous(), g_f8.T.contiguous().T, x_scale, grad_scale, torch.float32,
                         fast_accum=False).T
    return grad_x, grad_w


@functools.cache
def _compiled_fp8_bodies() -> tuple[Callable, Callable]:
    """The two op bodies compiled, made at their first call (importing compiles nothing). Inside an opaque custom
    op the model's own compile never sees them, and eager they cost four kernels and two fp32 copies of the
    (tokens, vocab) operand each: divide, clamp, cast, matmul. Compiled, the scaling and cast fuse into one pass,
    as #48's @torch.compile impls do. Always compiled, whatever COMPILE says (it only names the model's graph)."""
    raise_recompile_limit()  # one variant per chunk length and scale
    return (torch.compile(_fp8_forward_body, dynamic=False, fullgraph=True),
            torch.compile(_fp8_backward_body, dynamic=False, fullgraph=True))


# The FP8 head as two custom ops (as #48): torch.compile sees each as one opaque call with a fake (shape-only)
# twin, so Inductor never chooses the operand layouts that torch._scaled_mm's row-/column-major rule depends on.
@torch.library.custom_op("speedrun::fp8_linear", mutates_args=())
def fp8_linear_op(x: Tensor, w: Tensor, x_scale: float, w_scale: float, grad_scale: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, K) @ w (M, K)^T with both operands in float8_e4m3fn; returns (out (N, M) bf16, x_f8, w_f8), the FP8
    operands kept for the backward. grad_scale is the backward's (the gradient is divided by it before its e5m2
    cast)."""
    return _compiled_fp8_bodies()[0](x, w, x_scale, w_scale)


@fp8_linear_op.register_fake
def _(x: Tensor, w: Tensor, x_scale: float, w_scale: float, grad_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty((x.size(0), w.size(0)), dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.float8_e4m3fn),
            torch.empty_like(w, dtype=torch.float8_e4m3fn))


@torch.library.custom_op("speedrun::fp8_linear_backward", mutates_args=())
def fp8_linear_backward_op(grad: Tensor, x_f8: Tensor, w_f8: Tensor, x_scale: float, w_scale: float,
                           grad_scale: float) -> tuple[Tensor, Tensor]:
    """The gradients (grad_x (N, K) bf16, grad_w (M, K) fp32) of fp8_linear_op for grad (N, M)."""
    return _compiled_fp8_bodies()[1](grad, x_f8, w_f8, x_scale, w_scale, grad_scale)


@fp8_linear_backward_op.register_fake
def _(grad: Tensor, x_f8: Tensor, w_f8: Tensor, x_scale: float, w_scale: float, grad_scale: float
      ) -> tuple[Tensor, Tensor]:
    return (grad.new_empty(x_f8.shape, dtype=torch.bfloat16),
            grad.new_empty((w_f8.size(1), w_f8.size(0)), dtype=torch.float32).T)


def _fp8_linear_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, w, x_scale, w_scale, grad_scale = inputs
    _, x_f8, w_f8 = output
    ctx.save_for_backward(x_f8, w_f8)
    ctx.scales, ctx.dtypes = (x_scale, w_scale, grad_scale), (x.dtype, w.dtype)
    # the FP8 operands are outputs that nothing differentiates: their gradients stay None instead of two zero
    # tensors of x's and w's shapes made for every backward (#48 does the same)
    ctx.set_materialize_grads(False)


def _fp8_linear_backward(ctx, grad: Tensor | None, *_unused_fp8_operand_grads: Tensor | None) -> tuple:
    if grad is None:  # out did not reach the loss (not materialized: see setup_context)
        return None, None, None, None, None
    x_f8, w_f8 = ctx.saved_tensors
    grad_x, grad_w = fp8_linear_backward_op(grad, x_f8, w_f8, *ctx.scales)
    return grad_x.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None, None


fp8_linear_op.register_autograd(_fp8_linear_backward, setup_context=_fp8_linear_setup_context)


def fp8_linear_reference(x: Tensor, w: Tensor, x_scale: float, w_scale: float, grad_scale: float) -> Tensor:
    """CPU twin of the FP8 head: the same FP8 rounding of x and w, matmul in fp32 (gradients not quantized)."""
    x_q = fp8_quantize(x, x_scale, torch.float8_e4m3fn).float() * x_scale
    w_q = fp8_quantize(w, w_scale, torch.float8_e4m3fn).float() * w_scale
    return (x_q @ w_q.T).to(torch.bfloat16)


def fp8_linear(x: Tensor, w: Tensor, x_scale: float, w_scale: float, grad_scale: float) -> Tensor:
    """FP8 x @ w^T for 2-D x (N, K) and w (M, K); the fast kernel on CUDA, the reference elsewhere."""
    if x.is_cuda:
        return fp8_linear_op(x, w, x_scale, w_scale, grad_scale)[0]
    return fp8_linear_reference(x, w, x_scale, w_scale, grad_scale)


# ---- distributed ----


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job, from torchrun's env (a plain `python train_gpt.py` is rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def pick_device(launch: Launch) -> torch.device:
    """This rank's GPU (LOCAL_RANK), or the CPU without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if launch.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={launch.local_rank}: this machine has {torch.cuda.device_count()} GPU(s); "
                          f"launch at most that many processes per node (torchrun --nproc_per_node)")
    return torch.device("cuda", launch.local_rank)


def join_process_group(backend: str, **kwargs) -> None:
    """dist.init_process_group(backend, **kwargs), and the one import that must come before it: torch._dynamo
    (imported by the first optimizer and by torch.compile) imports torch.distributed.nn.functional, whose
    `group=group.WORLD` defaults would keep a group that exists at that moment alive, so that destroy_process_group
    could not free it. Its gloo workers would then run on into interpreter shutdown, where one freeing the last
    collective's tensors waits for the GIL and aborts the rank ('terminate called without an active exception')."""
    import torch._dynamo  # noqa: F401
    dist.init_process_group(backend, **kwargs)


def init_distributed(launch: Launch, timeout_s: float = 600.0) -> torch.device:
    """Picks the device (LOCAL_RANK's GPU: the GPU index on this node, whatever the node) and, for world size > 1,
    joins the process group (NCCL on CUDA, gloo on CPU). timeout_s bounds every collective: when a rank dies or
    hangs, the others raise after that long instead of waiting forever (NCCL's watchdog, gloo's transport), and
    torchrun then ends the job."""
    device = pick_device(launch)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        join_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                           timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """In-place mean over ranks (nothing at world size 1)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
    return tensor


def all_reduce_sum(tensor: Tensor) -> Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# torch 2.13 renamed the single-tensor collectives (*_single) and made the old names warn on every rank at every
# call site; TORCH_MIN (2.11) has only the old names. Chosen here once; the optimizers call these two.
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def wait_for(pending: dict, key: object, launch: Callable[[], None]) -> Tensor:
    """The output of the async collective pending[key] (popped), calling launch() first when no backward hook
    launched it (then the result is correct but the communication did not overlap the backward)."""
    if key not in pending:
        launch()
    work, out = pending.pop(key)
    work.wait()
    return out


# ---- optimizers ----


def adam_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: bool = True) -> None:
    """One bias-corrected Adam step with decoupled weight decay, in place (Kingma & Ba; Loshchilov & Hutter).

    param, grad: any shape, equal; exp_avg, exp_avg_sq: the same shape, any float dtype (bf16 in DistAdam); the
    moments are updated in fp32 and stored back in their own dtype. step and lr may be numbers or 0-D tensors (the
    compiled DistAdam passes tensors so that a new step or lr does not recompile). bias_correction=False divides
    by neither 1 - beta1**step nor 1 - beta2**step (MuonMax's Adam part).
    """
    grad = grad.float()
    m = exp_avg.float().lerp_(grad, 1 - beta1)
    v = exp_avg_sq.float().lerp_(grad.square(), 1 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    m_hat = m / (1 - beta1 ** step) if bias_correction else m
    v_hat = v / (1 - beta2 ** step) if bias_correction else v
    update = m_hat / (v_hat.sqrt() + eps)
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    param.sub_((update * lr).to(param.dtype))


@dataclass
class LocalUpdate:
    """Parameters that this rank updates in a step, as prepare() leaves them: value (their current values: a view
    of DistAdam's rows, or a stack of NorMuon's whole matrices), grad (their rank-averaged gradient) and delta
    (the full update, new value - value), all one shape; commit(new) writes the new values (and launches their
    all-gather). Keys are stable from step to step, so Momo can keep state per key."""

    key: object
    value: Tensor
    grad: Tensor
    delta: Tensor
    commit: Callable[[Tensor], None]


class LoopOptimizer(torch.optim.Optimizer):
    """The contract between the training loop and every optimizer here, written once.

    A new optimizer touches these places, and no others (Momo, the loop, checkpoints and diagnostics take it as it
    is): (1) a class deriving from this one, with prepare() and _commit_all() (a faster step() if it likes; state
    kept outside self.state needs its own saved_state/load_saved_state); (2) its OPTIMIZERS line, an OptimizerEntry
    with the function that builds it and any defaults it brings (which is all a script outside this file needs);
    in this file also (3) its lr field if it has one; (4) a check_consistency rule for any flag it cannot run with;
    (5) `python scripts/readme_flags.py` for the flag list.

    - step_every (constructor): the loop steps the optimizer after the backward of each step with
      (step + 1) % step_every == 0 and after the last step; in between, gradients accumulate in .grad (two steps'
      gradients for #48's Adam).
    - reduce_in_backward(on): the loop turns it on exactly for the last backward before a step, so that
      post-accumulate-grad hooks may launch the gradient reduce-scatters while the backward goes on.
    - set_schedule(lr_multiplier, momentum, grad_scale), before every step: the schedule's lr multiplier and
      momentum go into every param group ("schedule"; "momentum" where a group has one); grad_scale is how many
      times the gradients exceed those of the per-token mean loss (the loop sums each chunk's token losses, as
      #48), for the updates whose size follows the gradient's size (MuonMax, Momo).
    - step(): the whole update; afterwards every rank holds the new parameters and the grads are cleared.
    - prepare() -> [LocalUpdate], then apply(updates, scale): the same update in two halves, scale (a 0-D device
      tensor, or None for 1) multiplying every delta; Momo scales the joint step of all optimizers this way.
    """

    def __init__(self, param_groups: list[dict], defaults: dict, step_every: int = 1):
        super().__init__(param_groups, defaults)
        self.world, self.rank = world_size(), rank()
        self.step_every = step_every
        self._reduce_now = False  # the hooks launch reduces only while this is on: see reduce_in_backward
        self.grad_scale = 1.0

    def reduce_in_backward(self, on: bool) -> None:
        """On: the next backward is the last before a step, and each gradient's reduce starts as soon as it is
        ready. Off: gradients only accumulate (an earlier micro-batch, or a step this optimizer skips)."""
        self._reduce_now = on

    def set_schedule(self, lr_multiplier: float, momentum: float, grad_scale: float) -> None:
        for group in self.param_groups:
            group["schedule"] = lr_multiplier
            if "momentum" in group:
                group["momentum"] = momentum
        self.grad_scale = grad_scale

    @torch.no_grad()
    def step(self) -> None:
        self.apply(self.prepare(), None)

    def prepare(self) -> list[LocalUpdate]:
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, updates: list[LocalUpdate], scale: Tensor | None) -> None:
        for update in updates:
            update.commit(update.value + (update.delta if scale is None else scale * update.delta))
        self._commit_all()

    def _commit_all(self) -> None:
        """Waits for the all-gathers that commit() launched, copies their results in, clears the grads."""
        raise NotImplementedError

    def _clear_grads(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def saved_state(self, names: Mapping[Tensor, str]) -> dict[str, Tensor]:
        """This rank's per-parameter state as flat tensors for a checkpoint, keyed "<parameter name>/<field>".
        (Not `state`: torch's Optimizer already names its per-parameter dict so.)"""
        # DistAdam's step count is an int: a 0-D integer tensor here, an int again in load_saved_state
        return {f"{names[p]}/{key}": value.detach() if torch.is_tensor(value) else torch.tensor(value)
                for p, param_state in self.state.items() for key, value in param_state.items()}

    def load_saved_state(self, saved: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
        """Puts saved_state()'s tensors back, each onto its parameter's device; params: name -> parameter."""
        for key, value in saved.items():
            name, _, field_name = key.rpartition("/")
            p = params[name]
            is_count = value.dim() == 0 and not value.is_floating_point()
            self.state[p][field_name] = int(value) if is_count else value.to(p.device)


class DistAdam(LoopOptimizer):
    """Adam whose state is sharded by rows over the ranks (ZeRO-1 style), the same code at every world size.

    Each parameter's post-accumulate-grad hook, when `sync` is set for the backward pass, launches an async
    reduce_scatter_tensor(AVG) of its gradient (rows padded to a multiple of the world size), so communication
    overlaps the rest of the backward. step() waits per parameter, updates its own rows with bf16 moments, and
    all-gathers the rows back. At world size 1 no collective is called and the hook does nothing.
    Group keys: lr, lr_mul, schedule (the per-step multiplier set by the loop), betas, eps, weight_decay.
    bias_correction=False (ADAM_BIAS_CORRECTION=0, MuonMax's default): no division by 1 - beta**step.
    """

    def __init__(self, param_groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float = 0.0, state_dtype: torch.dtype = torch.bfloat16, compile: bool = False,
                 bias_correction: bool = True, step_every: int = 1):
        defaults = dict(lr=lr, lr_mul=1.0, schedule=1.0, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(param_groups, defaults, step_every)
        self.state_dtype = state_dtype
        self.bias_correction = bias_correction
        # compiled: one fused kernel per parameter shape (#48 compiles its Adam step too); step and lr then go in
        # as 0-D CPU tensors so that they do not specialize the graph
        self.compiled = compile
        self.update = torch.compile(adam_update, dynamic=False) if compile else adam_update
        self._pending: dict[Tensor, tuple[dist.Work, Tensor]] = {}
        self._gathers: list[tuple[dist.Work, Tensor, Tensor | None]] = []  # (work, param, padded buffer or None)
        for group in self.param_groups:
            for p in group["params"]:
                p.register_post_accumulate_grad_hook(self._grad_ready)

    def _rows(self, p: Tensor) -> tuple[int, int, int]:
        """(chunk, lo, hi): this rank owns rows lo:hi of p, chunk rows after padding to a multiple of world."""
        chunk = -(-p.shape[0] // self.world)
        lo = min(p.shape[0], self.rank * chunk)
        return chunk, lo, min(p.shape[0], lo + chunk)

    def _grad_ready(self, p: Tensor) -> None:
        if self._reduce_now and self.world > 1:
            self._launch_reduce(p)

    def _launch_reduce(self, p: Tensor) -> None:
        chunk, _, _ = self._rows(p)
        grad = p.grad
        if grad.shape[0] != chunk * self.world:
            grad = torch.cat([grad, grad.new_zeros((chunk * self.world - grad.shape[0],) + grad.shape[1:])])
        out = grad.new_empty((chunk,) + grad.shape[1:])
        work = reduce_scatter_single(out, grad.contiguous(), op=dist.ReduceOp.AVG, async_op=True)
        self._pending[p] = (work, out)

    def _local_grad(self, p: Tensor) -> Tensor | None:
        """This rank's rows of the rank-averaged gradient (the whole gradient at world size 1)."""
        if self.world == 1 or (p.grad is None and p not in self._pending):
            return p.grad
        return wait_for(self._pending, p, lambda: self._launch_reduce(p))

    @torch.no_grad()
    def step(self) -> None:
        """The fast path: every parameter's rows updated in place and their all-gather launched at once."""
        for group in self.param_groups:
            for p in group["params"]:
                grad = self._local_grad(p)
                if grad is not None:
                    _, lo, hi = self._rows(p)
                    self._adam_rows(group, p, grad, p.data[lo:hi])
                    self._launch_gather(p)
        self._commit_all()

    @torch.no_grad()
    def prepare(self) -> list[LocalUpdate]:
        updates = []
        for index, group in enumerate(self.param_groups):
            for position, p in enumerate(group["params"]):
                grad = self._local_grad(p)
                if grad is None:
                    continue
                _, lo, hi = self._rows(p)
                value = p.data[lo:hi]
                new = value.clone()
                self._adam_rows(group, p, grad, new)
                updates.append(LocalUpdate((index, position), value, grad[:hi - lo], new - value,
                                           functools.partial(self._commit_rows, p)))
        return updates

    def _adam_rows(self, group: dict, p: Tensor, grad: Tensor, rows_out: Tensor) -> None:
        """One Adam step of this rank's rows of p, written into rows_out (p's rows themselves, or a copy)."""
        chunk, lo, hi = self._rows(p)
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros((chunk,) + p.shape[1:], dtype=self.state_dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["step"] += 1
        rows = hi - lo
        beta1, beta2 = group["betas"]
        lr = group["lr"] * group["lr_mul"] * group["schedule"]
        step, step_lr = ((torch.tensor(float(state["step"])), torch.tensor(lr)) if self.compiled
                         else (state["step"], lr))
        self.update(rows_out, grad[:rows], state["exp_avg"][:rows], state["exp_avg_sq"][:rows], step, step_lr,
                    beta1, beta2, group["eps"], group["weight_decay"], self.bias_correction)

    def _commit_rows(self, p: Tensor, new_rows: Tensor) -> None:
        _, lo, hi = self._rows(p)
        p.data[lo:hi] = new_rows
        self._launch_gather(p)

    def _commit_all(self) -> None:
        for work, p, full in self._gathers:
            work.wait()
            if full is not None:  # gathered into a padded buffer, not into p itself
                p.data.copy_(full[:p.shape[0]])
        self._gathers = []
        self._clear_grads()

    def _launch_gather(self, p: Tensor) -> None:
        """Sends this rank's new rows of p to every rank (nothing at world size 1)."""
        if self.world == 1:
            return
        chunk, lo, hi = self._rows(p)
        if chunk * self.world == p.shape[0] and p.data.is_contiguous():
            # rows divide evenly (the embeddings and head): gather straight into p, whose own rows are the input
            # (as #48), so there is no buffer to fill and no copy back
            self._gathers.append((all_gather_single(p.data, p.data[lo:hi], async_op=True), p, None))
            return
        shard = p.data.new_empty((chunk,) + p.shape[1:])
        shard[:hi - lo] = p.data[lo:hi]
        shard[hi - lo:].zero_()  # only the padding rows past p's end (gathered, then dropped)
        full = p.data.new_empty((chunk * self.world,) + p.shape[1:])
        self._gathers.append((all_gather_single(full, shard, async_op=True), p, full))


POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NEWTON_SCHULZ5_COEFFICIENTS = ((3.4445, -4.7750, 2.0315),) * 5


def _odd_polynomial_iteration(g: Tensor, coefficients: Sequence[tuple[float, float, float]], scale: float,
                              eps: float) -> Tensor:
    """Runs X <- a X + (b A + c A^2) X with A = X X^T in bf16 on the wide orientation of g (..., m, n).

    CPUs without bf16 matrix units run bf16 GEMMs ~40x slower than fp32 (measured here), so the CPU twin keeps
    values in bf16 but multiplies in fp32 and rounds each product back to bf16: the rounding points of a GPU
    bf16 GEMM with fp32 accumulation. A cuda test holds the two against each other.
    """
    on_gpu = g.is_cuda
    dtype = torch.bfloat16 if on_gpu else torch.float32
    to_bf16 = (lambda t: t) if on_gpu else (lambda t: t.bfloat16().float())
    x = to_bf16(g.reshape(-1, g.size(-2), g.size(-1)).to(dtype))
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = to_bf16(x / (x.norm(dim=(-2, -1), keepdim=True) * scale + eps))
    for a, b, c in coefficients:
        gram = to_bf16(x @ x.mT)
        x = to_bf16(torch.baddbmm(x, to_bf16(torch.baddbmm(gram, gram, gram, beta=b, alpha=c)), x, beta=a))
    return (x.mT if tall else x).reshape(g.shape).bfloat16()


def polar_express(g: Tensor) -> Tensor:
    """Approximate polar factor U V^T of g = U S V^T (..., m, n), bf16: Polar Express, 5 steps with the
    minimax-optimal coefficients of Amsel, Persson, Musco & Gower (arXiv 2505.16932); g is first divided by
    its Frobenius norm * 1.02 + 1e-6 so that its spectrum lies in [0, 1)."""
    return _odd_polynomial_iteration(g, POLAR_EXPRESS_COEFFICIENTS, 1.02, 1e-6)


def newton_schulz5(g: Tensor) -> Tensor:
    """The classic Muon orthogonalization (Jordan et al. 2024): 5 steps of the quintic with (3.4445, -4.7750,
    2.0315), after dividing by the Frobenius norm (+1e-7, as torch.optim.Muon). (..., m, n) -> bf16."""
    return _odd_polynomial_iteration(g, NEWTON_SCHULZ5_COEFFICIENTS, 1.0, 1e-7)


def variance_reduce_dim(shape: Sequence[int], is_gate: bool) -> int:
    """NorMuon's reduce dim (record #48): the last dim for gates and for rows >= cols, else the second-to-last."""
    return -1 if is_gate or shape[-2] >= shape[-1] else -2


def variance_normalize(v: Tensor, second_moment: Tensor, beta2: Tensor, reduce_dim: int) -> tuple[Tensor, Tensor]:
    """NorMuon's per-neuron normalization (Li et al., arXiv 2510.05491, as fixed in speedrun record #48).

    v: orthogonalized update (..., m, n); second_moment: v's shape with reduce_dim of size 1. The mean square of
    v over reduce_dim is lerp'd into the buffer with beta2, v is divided by the buffer's square root (floored at
    1e-10) and rescaled to its Frobenius norm before. Returns (normalized v in fp32, new second moment).
    """
    v = v.float()
    norm_before = v.norm(dim=(-2, -1), keepdim=True)
    second_moment = second_moment.lerp(v.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2)
    v = v * second_moment.clamp_min(1e-10).rsqrt()
    v = v * (norm_before / v.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    return v, second_moment


def cautious_update(param: Tensor, update: Tensor, lr: Tensor, decay: Tensor, cautious: bool) -> Tensor:
    """param - lr * decay * mask * param - lr * update, the new value (Chen et al., "Cautious Weight Decay",
    arXiv 2510.12402): mask = (update * param >= 0) decays only the entries that the update also shrinks; with
    cautious=False the mask is all ones (plain decoupled decay). lr, decay: 0-D tensors (no recompiles)."""
    update = update.to(param.dtype)
    decayed = param * decay * lr
    if cautious:
        decayed = decayed * (update * param >= 0)
    return param - decayed - lr * update


NORMUON_BUCKETS_PER_SHAPE = 2  # a shape's matrices go out in this many reduce-scatters (#48's pipeline)


@dataclass
class StepScratch:
    """What one NorMuon/MuonMax step shares between its batched updates, made afresh each step."""

    scalars: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)  # (group, rows, cols)
    # -> 0-D (lr, decay) tensors, made once a step: a new Python float would recompile the compiled helper
    dual_sum: Tensor | float = 0.0  # MuonMax: this rank's sum of the blocks' dual norms


class NorMuon(LoopOptimizer):
    """NorMuon (Muon + per-neuron variance normalization; variance_norm=False: Muon) for the hidden matrices and
    gates, 1..N ranks. A bucket (same-shape matrices) goes out in one reduce-scatter from the backward's hooks,
    each rank updates its own whole matrices in one batched call per param group, and an all-gather brings every
    rank the new values; at world size 1 no collective is called. Group keys: lr, lr_mul, schedule and momentum
    (set per step by the loop), weight_decay, blocks (rows split into this many square blocks, 4 for qkvo_w),
    is_gate."""

    def __init__(self, param_groups: list[dict], lr: float, momentum: float, weight_decay: float, beta2: float,
                 variance_norm: bool = True, ortho: str = "polar", cautious: bool = True, compile: bool = False):
        defaults = dict(lr=lr, lr_mul=1.0, schedule=1.0, momentum=momentum, weight_decay=weight_decay, blocks=1,
                        is_gate=False)
        super().__init__(param_groups, defaults)
        self.variance_norm, self.cautious = variance_norm, cautious
        self._beta2 = torch.tensor(beta2)  # 0-D CPU tensor: the compiled helper is not specialized on it
        orthogonalize = polar_express if ortho == "polar" else newton_schulz5
        maybe_compile = (lambda fn: torch.compile(fn, dynamic=False)) if compile else (lambda fn: fn)
        self.orthogonalize = maybe_compile(orthogonalize)
        self.variance_normalize = maybe_compile(variance_normalize)
        self.cautious_update = maybe_compile(cautious_update)
        # indices, not the dicts: load_state_dict replaces the group dicts
        self.group_index = {p: i for i, group in enumerate(self.param_groups) for p in group["params"]}
        shapes: dict[tuple[int, ...], list[Tensor]] = {}
        # reverse registration order: the backward produces the last layers' gradients first, so their bucket is
        # complete (and its reduce launched) earliest
        for p in reversed(list(self.group_index)):
            shapes.setdefault(tuple(p.shape), []).append(p)
        self.buckets: list[list[Tensor]] = []
        for params in shapes.values():
            per_rank = -(-len(params) // self.world)
            count = NORMUON_BUCKETS_PER_SHAPE if self.world > 1 and per_rank >= NORMUON_BUCKETS_PER_SHAPE else 1
            # a multiple of the world size: whole matrices per rank. At 8 GPUs this is #48's pipeline: the 32 (3072,
            # 768) matrices go out as two reduce-scatters of 16, and the first bucket's update runs while the second
            # is in flight
            size = self.world * -(-per_rank // count)
            self.buckets += [params[start:start + size] for start in range(0, len(params), size)]
        self.bucket_of = {p: i for i, params in enumerate(self.buckets) for p in params}
        self._ready = [0] * len(self.buckets)  # per bucket: how many of its gradients the backward has produced
        self._pending: dict[int, tuple[dist.Work, Tensor]] = {}
        self._gathers: list[tuple[dist.Work, list[Tensor], Tensor]] = []
        self._index_tensors: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}
        self.bytes_sent = 0  # per-rank bytes that the collectives of this optimizer sent (ring algorithm)
        for p in self.group_index:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _per_rank(self, index: int) -> int:
        """Matrices per rank in bucket `index` (after padding to a multiple of the world size)."""
        return -(-len(self.buckets[index]) // self.world)

    def _grad_ready(self, p: Tensor) -> None:
        if not self._reduce_now or self.world == 1:
            return
        index = self.bucket_of[p]
        self._ready[index] += 1
        if self._ready[index] == len(self.buckets[index]):
            self._launch_reduce(index)

    def _launch_reduce(self, index: int) -> None:
        params = self.buckets[index]
        per_rank = self._per_rank(index)
        grads = torch.empty((per_rank * self.world,) + params[0].shape, dtype=params[0].dtype,
                            device=params[0].device)
        for i, p in enumerate(params):
            grads[i] = p.grad if p.grad is not None else 0
        grads[len(params):].zero_()  # only the padding matrices, up to a multiple of the world size
        out = grads.new_empty((per_rank,) + params[0].shape)  # rank r gets matrices r * per_rank onwards
        self.bytes_sent += grads.numel() * grads.element_size() * (self.world - 1) // self.world
        self._pending[index] = (reduce_scatter_single(out, grads, op=dist.ReduceOp.AVG, async_op=True), out)
        self._ready[index] = 0

    @torch.no_grad()
    def step(self) -> None:
        """The fast path, pipelined as #48: each bucket's all-gather is launched as soon as its update is done, while
        the next bucket's reduce-scatter may still be in flight."""
        scratch = StepScratch()
        for index in range(len(self.buckets)):
            updated = self._update_bucket(index, scratch)
            if updated is not None:
                mine, _, new = updated
                self._commit_bucket(index, mine, new)
        self._commit_all()

    @torch.no_grad()
    def prepare(self) -> list[LocalUpdate]:
        return self._prepare_all(StepScratch())

    def _prepare_all(self, scratch: StepScratch) -> list[LocalUpdate]:
        """Every bucket's update of this rank's own matrices, computed and not yet committed."""
        updates = []
        for index in range(len(self.buckets)):
            updated = self._update_bucket(index, scratch)
            if updated is None:
                continue
            mine, grads, new = updated
            value = torch.stack(mine) if mine else new
            updates.append(LocalUpdate(index, value, grads, new - value,
                                       functools.partial(self._commit_bucket, index, mine)))
        return updates

    def _update_bucket(self, index: int, scratch: StepScratch) -> tuple[list[Tensor], Tensor, Tensor] | None:
        """This rank's own matrices of bucket `index`, their rank-averaged gradients (k, rows, cols) and new values
        (k, rows, cols); k = 0 on a padded tail, None when there is nothing to do at all."""
        params = self.buckets[index]
        if self.world == 1:
            mine = [p for p in params if p.grad is not None]
            if not mine:
                return None
            grads = torch.stack([p.grad for p in mine])
        else:
            grads = wait_for(self._pending, index, lambda: self._launch_reduce(index))  # (per_rank, rows, cols)
            mine = params[self.rank * grads.size(0):(self.rank + 1) * grads.size(0)]  # fewer on a padded tail
            grads = grads[:len(mine)]
        if not mine:  # a padded tail: this rank still takes part in the all-gather, with nothing of its own
            return mine, grads[:0], grads[:0]
        return mine, grads, self._update_own(mine, grads, scratch)

    def _commit_bucket(self, index: int, mine: list[Tensor], new: Tensor) -> None:
        """Writes this rank's new values (k, rows, cols) of bucket `index`: in place at world size 1, else through
        an async all-gather that _commit_all waits for."""
        if self.world == 1:
            torch._foreach_copy_(mine, list(new.unbind(0)))
            return
        params = self.buckets[index]
        per_rank = self._per_rank(index)
        updated = new.contiguous()  # (per_rank, rows, cols) as it is, unless the padded tail left it short
        if len(mine) < per_rank:  # the padding past the last matrix is gathered, then dropped
            updated = torch.cat([new, new.new_zeros((per_rank - len(mine),) + params[0].shape)])
        full = updated.new_empty((per_rank * self.world,) + updated.shape[1:])
        self.bytes_sent += updated.numel() * updated.element_size() * (self.world - 1)
        self._gathers.append((all_gather_single(full, updated, async_op=True), params, full))

    def _commit_all(self) -> None:
        for work, params, full in self._gathers:
            work.wait()
            torch._foreach_copy_(params, list(full[:len(params)].unbind(0)))
        self._gathers = []
        self._clear_grads()

    def _update_own(self, params: list[Tensor], grads: Tensor, scratch: StepScratch) -> Tensor:
        """New values (k, rows, cols) of k same-shape matrices from their rank-averaged gradients grads (k, rows,
        cols): one batched update per param group among them (a bucket may mix qkvo_w, c_fc and c_proj)."""
        by_group: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            by_group.setdefault(self.group_index[p], []).append(i)
        if len(by_group) == 1:
            (group_index,) = by_group
            return self._update_batch(params, grads, group_index, scratch)
        out = torch.empty_like(grads)
        for group_index, members in by_group.items():
            rows = self._index_tensor(members, grads.device)
            out[rows] = self._update_batch([params[i] for i in members], grads[rows], group_index, scratch)
        return out

    def _index_tensor(self, members: list[int], device: torch.device) -> Tensor:
        """members as a device index tensor, made once (a host-to-device copy waits for the device)."""
        key = (tuple(members), device)
        if key not in self._index_tensors:
            self._index_tensors[key] = torch.tensor(members, device=device)
        return self._index_tensors[key]

    def _momentum(self, states: list[dict], grads: Tensor, momentum: float) -> Tensor:
        """The k matrices' momentum buffers (k, rows, cols) after this step's grads (k, rows, cols) went in (an EMA
        with factor `momentum`), stored back into their per-parameter state."""
        for state in states:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grads[0])
        buffers = torch.stack([state["momentum_buffer"] for state in states])
        buffers.lerp_(grads, 1 - momentum)
        torch._foreach_copy_([state["momentum_buffer"] for state in states], list(buffers.unbind(0)))
        return buffers

    def _update_batch(self, params: list[Tensor], grads: Tensor, group_index: int, scratch: StepScratch) -> Tensor:
        """New values (k, rows, cols) of k matrices of one param group. Per-parameter state: momentum_buffer
        (rows, cols) and second_moment (blocks, rows / blocks, 1) or (blocks, 1, cols)."""
        group = self.param_groups[group_index]
        k, rows, cols = grads.shape
        blocks = group["blocks"]
        block_shape = (blocks, rows // blocks, cols)
        reduce_dim = variance_reduce_dim(block_shape, group["is_gate"])
        states = [self.state[p] for p in params]
        if self.variance_norm:
            for state in states:
                if "second_moment" not in state:
                    moment_shape = list(block_shape)
                    moment_shape[reduce_dim] = 1  # one second moment per neuron of each block
                    state["second_moment"] = torch.zeros(moment_shape, device=grads.device)
        buffers = self._momentum(states, grads, group["momentum"])
        # Nesterov in lerp form; every block of every matrix is one matrix of the batch: (k * blocks, rows/blocks, cols)
        update = self.orthogonalize(grads.lerp(buffers, group["momentum"]).view(k * blocks, rows // blocks, cols))
        if self.variance_norm:
            moments = torch.cat([state["second_moment"] for state in states])
            update, moments = self.variance_normalize(update, moments, self._beta2, reduce_dim)
            torch._foreach_copy_([state["second_moment"] for state in states], list(moments.split(blocks)))
        key = (group_index, rows, cols)
        if key not in scratch.scalars:
            lr = group["lr"] * group["schedule"]
            eff_lr = lr * max(1.0, rows / cols) ** 0.5 * group["lr_mul"]  # rows/cols of the stored parameter
            scratch.scalars[key] = (torch.tensor(eff_lr), torch.tensor(group["weight_decay"] * lr))
        eff_lr, decay = scratch.scalars[key]
        return self.cautious_update(torch.stack(params), update.view(k, rows, cols), eff_lr, decay, self.cautious)


class MuonMax(NorMuon):
    """OPTIMIZER=muonmax: regularized steepest descent in a max-of-layers norm (Crawshaw, Modi, Liu & Gower, "An
    Exploration of Non-Euclidean Gradient Descent: Muon and its Many Variants", arXiv 2510.09827), as we read it
    (the paper's own equations were not available to us): W_l <- W_l - lr * (sum_j s_j ||M_j||_nuc) * s_l polar(M_l)
    for every matrix block l, M the momentum; the derivation is at the lines. No weight decay; the other parameters
    take Adam with the paper's betas and without bias correction (its OPTIMIZERS entry's defaults)."""

    def __init__(self, param_groups: list[dict], lr: float, momentum: float, ortho: str = "polar",
                 compile: bool = False):
        super().__init__(param_groups, lr=lr, momentum=momentum, weight_decay=0.0, beta2=0.95, variance_norm=False,
                         ortho=ortho, cautious=False, compile=compile)
        self.dual_norm: Tensor | None = None  # the last step's sum of dual norms (device scalar), for diagnostics

    @torch.no_grad()
    def step(self) -> None:
        """prepare() then apply(), not NorMuon's pipelined step: every update waits for the global dual-norm sum."""
        self.apply(self.prepare(), None)

    @torch.no_grad()
    def prepare(self) -> list[LocalUpdate]:
        device = next(iter(self.group_index)).device
        scratch = StepScratch(dual_sum=torch.zeros((), device=device))
        updates = self._prepare_all(scratch)
        # The deltas so far are the unit directions -s_l polar(M_l); scratch.dual_sum has this rank's sum. Steepest
        # descent with a quadratic regularizer in the max over blocks of ||W_l||_op / s_l moves every block along
        # its own unit direction by the same amount: lr times the dual norm of the momentum, which for a max of
        # norms is the SUM of the blocks' dual norms. One scalar for all blocks on all ranks, so the whole step
        # waits for this all-reduce (no pipelining as NorMuon's).
        self.dual_norm = all_reduce_sum(scratch.dual_sum)
        group = self.param_groups[0]  # one lr and schedule for every group (lr_mul lives in s_l)
        step_size = group["lr"] * group["schedule"] * self.dual_norm
        for update in updates:
            update.delta.mul_(step_size)
        return updates

    def _update_batch(self, params: list[Tensor], grads: Tensor, group_index: int, scratch: StepScratch) -> Tensor:
        """The unit step (k, rows, cols) of k matrices: value - s_l polar(M_l) per block; adds the blocks' dual
        norms s_l <M_l, polar(M_l)> to scratch.dual_sum."""
        group = self.param_groups[group_index]
        k, rows, cols = grads.shape
        blocks = group["blocks"]
        # an EMA of the per-token-mean gradients (no Nesterov): scaled before averaging, so that a batch-size
        # change (a new grad_scale) does not mix gradients of two scales in the buffer; so the step grows with the
        # gradient, unlike Muon's, and lr is on another scale than Muon's
        buffers = self._momentum([self.state[p] for p in params], grads / self.grad_scale, group["momentum"])
        momentum = buffers.view(k * blocks, rows // blocks, cols)  # every block its own matrix
        polar = self.orthogonalize(momentum).float()
        # s_l: Muon's shape factor (rows/cols of the stored parameter) times lr_mul; the block's norm is ||W||_op / s_l
        shape_scale = max(1.0, rows / cols) ** 0.5 * group["lr_mul"]
        # its dual norm s_l ||M_l||_nuc, with ||M||_nuc = <M, polar(M)> from the same Polar Express call (its
        # singular values lie within ~15% of 1, so the sum is that close too)
        scratch.dual_sum += shape_scale * (momentum.float() * polar).sum()
        return torch.stack(params) - shape_scale * polar.view(k, rows, cols).to(grads.dtype)


@dataclass(frozen=True)
class OptimizerEntry:
    """One OPTIMIZERS line: OPTIMIZER=<name>'s optimizer of the hidden matrices and gates.

    build(groups, hp): the LoopOptimizer of groups["qkvo"], ["c_fc"], ["c_proj"] and ["gates"] (GPT.param_groups());
    the embeddings, scalars and head always take DistAdam (build_optimizers). defaults: the Hyperparameters fields
    this optimizer sets unless the env does (over the preset, under the env), e.g. the Adam part's betas; --help
    lists them and the log's config line holds the values the run took.
    """

    build: Callable[[Mapping[str, list[nn.Parameter]], Hyperparameters], LoopOptimizer]
    defaults: Mapping[str, object] = field(default_factory=dict)


def matrix_groups(groups: Mapping[str, list[nn.Parameter]], hp: Hyperparameters) -> list[dict]:
    """The hidden matrices as NorMuon and MuonMax take them: qkvo as its 4 row blocks (q, k, v, o), c_proj with its
    lr_mul, the gates flagged (their variance normalization reduces another dim)."""
    return [dict(params=groups["qkvo"], blocks=4), dict(params=groups["c_fc"]),
            dict(params=groups["c_proj"], lr_mul=hp.c_proj_lr_mul), dict(params=groups["gates"], is_gate=True)]


def build_normuon(groups: Mapping[str, list[nn.Parameter]], hp: Hyperparameters, variance_norm: bool = True
                  ) -> NorMuon:
    """OPTIMIZER=normuon, and with variance_norm=False OPTIMIZER=muon (the same step without NorMuon's second
    moment)."""
    return NorMuon(matrix_groups(groups, hp), lr=hp.muon_lr, momentum=hp.muon_momentum_start, weight_decay=hp.muon_wd,
                   beta2=hp.normuon_beta2, variance_norm=variance_norm, ortho=hp.ortho, cautious=hp.cwd,
                   compile=bool(hp.compile))


def build_muonmax(groups: Mapping[str, list[nn.Parameter]], hp: Hyperparameters) -> MuonMax:
    return MuonMax(matrix_groups(groups, hp), lr=hp.muonmax_lr, momentum=hp.muon_momentum_start, ortho=hp.ortho,
                   compile=bool(hp.compile))


def build_adamw(groups: Mapping[str, list[nn.Parameter]], hp: Hyperparameters) -> DistAdam:
    """OPTIMIZER=adamw: DistAdam on the matrices and gates too, with the Adam part's betas and eps, its own lr and
    decay."""
    return DistAdam([dict(params=groups["qkvo"] + groups["c_fc"] + groups["gates"]),
                     dict(params=groups["c_proj"], lr_mul=hp.c_proj_lr_mul)],
                    lr=hp.adamw_matrix_lr, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps,
                    weight_decay=hp.adamw_matrix_wd, compile=bool(hp.compile), bias_correction=hp.adam_bias_correction)


OPTIMIZERS.update({
    "normuon": OptimizerEntry(build_normuon),
    "muon": OptimizerEntry(functools.partial(build_normuon, variance_norm=False)),
    "adamw": OptimizerEntry(build_adamw),
    # the MuonMax/Momo paper's setting of the Adam part: betas 0.95, 0.95 and no bias correction
    "muonmax": OptimizerEntry(build_muonmax, defaults=dict(adam_beta1=0.95, adam_beta2=0.95,
                                                           adam_bias_correction=False)),
})


class Momo:
    """MOMO=1: model truncation of the joint step of every optimizer here (Schaipp, Ohana, Eickenberg, Defazio &
    Gower, "MoMo: Momentum Models for Adaptive Learning Rates", 2023), as the MuonMax/Momo paper combines it with
    non-Euclidean methods. The averages and their bias correction follow the authors' reference code
    (fabian-sp/MoMo, momo.py and momo_adam.py). State: EMAs of the loss, of <g, x> and, per update key, of the
    gradient (one fp32 copy of this rank's shards). One all-reduce of 4 numbers a step, no host sync."""

    def __init__(self, lower_bound: float, beta: float):
        self.lower_bound, self.beta = lower_bound, beta
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.loss_avg: Tensor | float = 0.0
        self.gamma: Tensor | float = 0.0
        self.directions: dict[str, Tensor] = {}  # "<optimizer index>/<update key>" -> this rank's EMA of d
        self.last_scale: Tensor | None = None

    def state(self) -> dict[str, Tensor]:
        """This rank's averages as flat tensors, for a checkpoint."""
        out = {"steps": torch.tensor(self.steps), "loss_avg": torch.as_tensor(self.loss_avg, dtype=torch.float32),
               "gamma": torch.as_tensor(self.gamma, dtype=torch.float32)}
        out.update({f"direction/{key}": value for key, value in self.directions.items()})
        return out

    def load_state(self, saved: Mapping[str, Tensor], device: torch.device) -> None:
        self.reset()
        self.steps = int(saved.get("steps", torch.tensor(0)))
        if self.steps:  # before the first step the averages stay the Python zeros of reset()
            self.loss_avg = saved["loss_avg"].to(device)
            self.gamma = saved["gamma"].to(device)
        prefix = "direction/"
        self.directions = {k[len(prefix):]: v.to(device) for k, v in saved.items() if k.startswith(prefix)}

    @torch.no_grad()
    def step(self, optimizers: list[LoopOptimizer], loss: Tensor) -> None:
        """One truncated step of `optimizers` (those that step now); loss: this rank's mean loss per token."""
        prepared = [(i, opt, opt.prepare()) for i, opt in enumerate(optimizers)]
        self.steps += 1
        terms = [loss.float() / world_size()]  # summed over ranks below: the mean loss over ranks
        for i, opt, updates in prepared:
            for update in updates:
                grad = update.grad.float() / opt.grad_scale  # the per-token mean loss's (the loop sums token losses)
                key = f"{i}/{update.key}"  # a string: checkpoints store the directions under it
                if key not in self.directions:
                    self.directions[key] = torch.zeros_like(grad)
                direction = self.directions[key]  # d: the EMA of the gradient
                direction.lerp_(grad, 1 - self.beta)
                value = update.value.float()
                # <g, x>, <d, x> and <d, delta> of this piece; each is summed over all parameters of all ranks below
                terms += [(grad * value).sum(), (direction * value).sum(), (direction * update.delta.float()).sum()]
        sums = torch.zeros(4, device=loss.device)
        sums[0] = terms[0]
        for j, term in enumerate(terms[1:]):
            sums[1 + j % 3] += term
        all_reduce_sum(sums)
        loss_mean, grad_dot_x, direction_dot_x, direction_dot_delta = sums.unbind()
        self.loss_avg = self.beta * self.loss_avg + (1 - self.beta) * loss_mean
        self.gamma = self.beta * self.gamma + (1 - self.beta) * grad_dot_x
        rho = 1 - self.beta ** self.steps  # the EMAs start at 0 (Momo's bias correction)
        # the model of the loss is the running average of linearizations, f(x) ~ F + <d, x> - gamma (gamma the EMA
        # of <g, x>); h = its value now above the lower bound MOMO_LB
        model_gap = (self.loss_avg + direction_dot_x - self.gamma) / rho - self.lower_bound
        decrease = -direction_dot_delta / rho  # what the linear model says the full step gains
        # alpha = min(1, max(0, h) / -<d, delta>): the largest fraction of the full step that the model truncated at
        # the bound still takes. For a step lr * ||d||_* dir(d) (MuonMax; Adam in its diagonal norm) this is Momo's
        # min(lr, h / ||d||_*^2); for a constrained step of radius lr (Muon, NorMuon) min(lr, h / ||d||_*).
        # 1 when the step does not decrease the model; 0 when the model says the bound is reached.
        scale = torch.where(decrease > 0, model_gap.clamp_min(0) / decrease.clamp_min(1e-30), torch.ones_like(decrease))
        scale = torch.where(model_gap > 0, scale.clamp_max(1.0), torch.zeros_like(scale))
        self.last_scale = scale
        for _, opt, updates in prepared:
            opt.apply(updates, scale)


def _scheduled_lr(step: int, hp: Hyperparameters) -> float:
    if step >= hp.scheduled_iterations:
        return hp.final_lr_frac
    x = step / hp.scheduled_iterations
    peak = hp.lr_boosts[sum(x > at for at in hp.lr_boost_at)]
    if x < 1 - hp.cooldown_frac:
        return peak
    w = (1 - x) / hp.cooldown_frac
    return peak * w + hp.final_lr_frac * (1 - w)


def lr_multiplier(step: int, hp: Hyperparameters) -> float:
    """The speedrun lr schedule: a boosted peak per third, linear decay over the last cooldown_frac, then flat;
    times a linear warmup over the first lr_warmup_steps steps when that is set."""
    if step < hp.lr_warmup_steps:
        # a ramp from 0 at step -1 to the full schedule at step lr_warmup_steps: step 0 already moves the weights
        return (step + 1) / (hp.lr_warmup_steps + 1) * _scheduled_lr(step, hp)
    return _scheduled_lr(step, hp)


def muon_momentum(step: int, hp: Hyperparameters) -> float:
    """Linear warmup from muon_momentum_start over the first steps, linear cooldown back over the last ones."""
    start, peak = hp.muon_momentum_start, hp.muon_momentum
    warm = min(1.0, step / hp.momentum_warmup_steps) if hp.momentum_warmup_steps else 1.0
    momentum = start + (peak - start) * warm
    steps_left = hp.num_iterations - step
    if hp.momentum_cooldown_steps and steps_left < hp.momentum_cooldown_steps:
        cool = steps_left / hp.momentum_cooldown_steps
        momentum = start + (momentum - start) * cool
    return momentum


# ---- norms ----


def rms_norm(x: Tensor) -> Tensor:
    """Parameter-free RMS norm over the last dim (eps: torch's default for the dtype)."""
    return F.rms_norm(x, (x.size(-1),))


class Norm(nn.Module):
    """The contract between the model, the loop and a block/final norm, written once. A new norm is a subclass and
    one NORMS line (its parameters join Adam's scalar group by themselves: GPT.param_groups); a script outside this
    file may register one before calling main().

    - build(config), a classmethod: one site's module from the ModelConfig (every site is built apart).
    - forward(x) -> x's shape.
    Optional abilities, called on every norm (these defaults do nothing):
    - diagnostics(x) -> {name: 0-D tensor}: DIAGNOSTICS=1's figures of a site's fp32 input, beyond its RMS.
    - update_running_scales(sites), a classmethod: once per optimizer step, outside the compiled forward, with every
      site of its class in the model (so that the sites can share one collective); the same call on every rank.
    """

    @classmethod
    def build(cls, config: ModelConfig) -> Norm:
        return cls()

    def diagnostics(self, x: Tensor) -> dict[str, Tensor]:
        return {}

    @classmethod
    def update_running_scales(cls, sites: Sequence[Norm]) -> None:
        pass


class RMSNorm(Norm):
    """The record's block and final norm: parameter-free RMS norm."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x)


def dyt(x: Tensor, alpha: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """Dynamic Tanh, gamma * tanh(alpha * x) + beta (Zhu, Chen, He, LeCun & Liu, "Transformers without
    Normalization", arXiv 2503.10622). x: (..., C); alpha: (1,); gamma, beta: (C,) -> x's shape."""
    return gamma * torch.tanh(alpha * x) + beta


def derf(x: Tensor, alpha: Tensor, shift: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """Dynamic erf, gamma * erf(alpha * x + shift) + beta (Chen, Lu, Zhu, Sun & Liu, "Stronger Normalization-Free
    Transformers", arXiv 2512.10938). x: (..., C); alpha, shift: (1,); gamma, beta: (C,) -> x's shape."""
    return gamma * torch.erf(alpha * x + shift) + beta


def derf_ema(x: Tensor, alpha: Tensor, shift: Tensor, gamma: Tensor, beta: Tensor, sigma_hat: Tensor) -> Tensor:
    """Derf on x divided by a running RMS scale: gamma * erf(alpha * x / sigma_hat + shift) + beta (the scale
    folds into alpha, so the elementwise cost is Derf's). Shapes as derf; sigma_hat: (1,), carries no gradient."""
    return derf(x, alpha / sigma_hat, shift, gamma, beta)


def ema_blend_scale(sigma_hat: Tensor, batch_rms: Tensor, ema: float) -> Tensor:
    """The Derf EMA-blend's running scale after one optimizer step: ema * sigma_hat + (1 - ema) * RMS(x).

    This is our reading of the coupling paper's "EMA-blend that reintroduces running scale estimates" ("Does Your
    Optimizer Care How You Normalize?"); its exact blend is not available to us. batch_rms is the RMS of the norm
    input over the step's tokens on all ranks (mean square averaged over micro-batches and ranks, then sqrt).
    Another reading (an EMA of the mean square instead of the RMS, or a blend of the running scale with the
    current batch's RMS inside the forward) is a change to this function and DerfEMA only. Shapes: (1,).
    """
    return ema * sigma_hat + (1 - ema) * batch_rms


def _upcast_apply(fn: Callable, x: Tensor, *params: Tensor) -> Tensor:
    return fn(x.to(torch.promote_types(x.dtype, torch.float32)), *params).to(x.dtype)


_compiled_bounded: dict[Callable, Callable] = {}


def bounded_kernel(fn: Callable, x: Tensor) -> Callable:
    """The one place that picks how a bounded norm runs: fn(x, *params) computed in (at least) fp32 and returned
    in x's dtype, compiled by torch.compile into one fused elementwise kernel on CUDA (cached per function),
    eager elsewhere (on CPU the eager ops are the reference and compiling costs more than it saves)."""
    if not x.is_cuda or torch.compiler.is_compiling():  # inside a compiled model the outer graph fuses it
        return functools.partial(_upcast_apply, fn)
    if fn not in _compiled_bounded:
        _compiled_bounded[fn] = torch.compile(functools.partial(_upcast_apply, fn), dynamic=False)
    return _compiled_bounded[fn]


def percentile(t: Tensor, q: float) -> Tensor:
    """The q-quantile (0 < q <= 1) of t's elements, lower value (kthvalue has no size limit, unlike quantile)."""
    flat = t.flatten()
    return flat.kthvalue(max(1, math.ceil(q * flat.numel()))).values


class BoundedNorm(Norm):
    """A norm gamma * squash(argument(x)) + beta (DyT, Derf): the squash bounds it, so its diagnostics are how much
    of its input saturates the squash, and its learned scalars."""

    squash: Callable[[Tensor], Tensor]
    logged_scalars: tuple[str, ...] = ("alpha",)  # the (1,) tensors that the diag line shows, in this order

    @classmethod
    def build(cls, config: ModelConfig) -> BoundedNorm:
        return cls(config.model_dim, config.norm_alpha)

    def argument(self, x: Tensor) -> Tensor:
        """What the squash function sees."""
        raise NotImplementedError

    def diagnostics(self, x: Tensor) -> dict[str, Tensor]:
        """The fraction of squash outputs (before gamma/beta) with magnitude > 0.99 and > 0.95, the mean and 99th
        percentile of the squash argument and of its magnitude, and the learned scalars."""
        arg = self.argument(x).float()
        squashed = self.squash(arg).abs()
        stats = dict(sat99=(squashed > 0.99).float().mean(), sat95=(squashed > 0.95).float().mean(),
                     arg_mean=arg.mean(), arg_p99=percentile(arg, 0.99), arg_abs_p99=percentile(arg.abs(), 0.99))
        stats.update({name: getattr(self, name).float().squeeze() for name in self.logged_scalars})
        return stats


class DyT(BoundedNorm):
    """NORM=dyt: gamma * tanh(alpha * x) + beta with a scalar alpha and per-channel gamma (1) and beta (0).
    Scalars are (1,) tensors, not 0-D, because DistAdam shards every parameter by rows."""

    squash = staticmethod(torch.tanh)

    def __init__(self, dim: int, alpha: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), alpha))
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def argument(self, x: Tensor) -> Tensor:
        return self.alpha * x

    def forward(self, x: Tensor) -> Tensor:
        return bounded_kernel(dyt, x)(x, self.alpha, self.gamma, self.beta)


class Derf(BoundedNorm):
    """NORM=derf: gamma * erf(alpha * x + shift) + beta; scalar alpha and shift (init 0), per-channel gamma, beta."""

    squash = staticmethod(torch.erf)
    logged_scalars = ("alpha", "shift")

    def __init__(self, dim: int, alpha: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), alpha))
        self.shift = nn.Parameter(torch.zeros(1))
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def argument(self, x: Tensor) -> Tensor:
        return self.alpha * x + self.shift

    def forward(self, x: Tensor) -> Tensor:
        return bounded_kernel(derf, x)(x, self.alpha, self.shift, self.gamma, self.beta)


class DerfEMA(Derf):
    """NORM=derf_ema: Derf of x / sigma_hat, sigma_hat a running RMS of this site's input (ema_blend_scale).

    sigma_hat is a persistent buffer (in the state_dict, so checkpoints and warmup's restore carry it), initial
    value 1.0: in this model every norm input starts near RMS 1 (the embedding is RMS-normed and every sublayer's
    output projection is zero-init; only lambda_a's 1.1 per layer scales it), and step 0 is then plain Derf.
    A training forward with gradients adds its input's mean square to `scale_stats` (sum, count); the loop calls
    update_running_scales once per optimizer step (it averages the stats over ranks and moves
    sigma_hat).
    Eval and no-grad forwards leave both untouched.
    """

    logged_scalars = ("alpha", "shift", "sigma_hat")

    def __init__(self, dim: int, alpha: float, ema: float):
        super().__init__(dim, alpha)
        self.ema = ema
        self.register_buffer("sigma_hat", torch.ones(1))
        self.register_buffer("scale_stats", torch.zeros(2), persistent=False)

    @classmethod
    def build(cls, config: ModelConfig) -> DerfEMA:
        return cls(config.model_dim, config.norm_alpha, config.norm_ema)

    @classmethod
    @torch.no_grad()
    def update_running_scales(cls, norms: Sequence[DerfEMA]) -> None:
        """Moves every DerfEMA site's sigma_hat once by ema_blend_scale and clears the stats: one all-reduce (AVG) of
        all sites' (sum of micro-batch mean squares, micro-batch count) stacked, so every rank ends with the same
        scales, and a handful of batched ops (no per-site kernels, no host sync). A site that saw no training forward
        keeps its scale. Nothing is called without such sites; no collective at world size 1."""
        if not norms:
            return
        emas = {norm.ema for norm in norms}
        if len(emas) != 1:
            raise ValueError(f"DerfEMA sites with different ema values {sorted(emas)}: expected one NORM_EMA")
        stats = all_reduce_mean(torch.stack([norm.scale_stats for norm in norms]))
        sigma_hat = torch.cat([norm.sigma_hat for norm in norms])
        batch_rms = (stats[:, 0] / stats[:, 1].clamp_min(1)).sqrt()
        moved = torch.where(stats[:, 1] > 0, ema_blend_scale(sigma_hat, batch_rms, emas.pop()), sigma_hat)
        torch._foreach_copy_([norm.sigma_hat for norm in norms], list(moved.split(1)))
        torch._foreach_zero_([norm.scale_stats for norm in norms])

    def argument(self, x: Tensor) -> Tensor:
        return self.alpha * x / self.sigma_hat + self.shift

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            mean_square = x.detach().float().square().mean()
            self.scale_stats.add_(torch.stack((mean_square, torch.ones_like(mean_square))))
        return bounded_kernel(derf_ema, x)(x, self.alpha, self.shift, self.gamma, self.beta, self.sigma_hat)



def make_norm(config: ModelConfig) -> Norm:
    """One block/final norm site of the class that NORM names in NORMS. A new norm touches: its kernel function and
    its Norm subclass here, its NORMS line below, any init flag (a Hyperparameters field and the ModelConfig field
    of the same name, which model_config copies), and `python scripts/readme_flags.py`."""
    return registered(NORMS, "NORM", config.norm).build(config)


NORMS.update(rmsnorm=RMSNorm, dyt=DyT, derf=Derf, derf_ema=DerfEMA)


# ---- model ----


@dataclass(frozen=True)
class LayerPlan:
    """Which sublayers, window and value embedding each layer has, derived from depth in one place.

    At 12 layers this is record #48's table: layer 0 empty, no attention in layer 7, long windows in layers 4 and
    11, value embeddings (1, 2, 0, 1, 2) at layers 1, 2, 9, 10, 11, U-net skip 4 -> 7, backout after layer 8.
    Other depths keep the same fractions of depth (4/12, 7/12, 8/12), rounded half up.
    """

    attn: tuple[bool, ...]
    mlp: tuple[bool, ...]
    long_window: tuple[bool, ...]
    value_embed: tuple[int | None, ...]
    skip_source: int
    skip_target: int
    backout_layer: int


def layer_plan(num_layers: int, num_value_embeds: int) -> LayerPlan:
    n = num_layers
    at_fraction = lambda twelfths: int(n * twelfths / 12 + 0.5)
    skip_source, skip_target, backout_layer = at_fraction(4), at_fraction(7), at_fraction(8)
    attn = tuple(0 < i != skip_target for i in range(n))
    value_embed: dict[int, int] = {}
    for table, layer in enumerate(range(1, num_value_embeds)):
        value_embed[layer] = table + 1
    for table, layer in enumerate(range(n - num_value_embeds, n)):
        value_embed[layer] = table
    return LayerPlan(
        attn=attn,
        mlp=tuple(i > 0 for i in range(n)),
        long_window=tuple(i in (skip_source, n - 1) for i in range(n)),
        value_embed=tuple(value_embed.get(i) if attn[i] else None for i in range(n)),
        skip_source=skip_source, skip_target=skip_target, backout_layer=backout_layer)


def window_pair(long_window: int) -> tuple[int, int]:
    """(short, long) attention windows in blocks: the short layers see half the long window (#48)."""
    return long_window // 2, long_window


def yarn_frequencies(freqs: Tensor, old_window: int, new_window: int, block_tokens: int) -> Tensor:
    """YaRN rescaling of rotary frequencies when the attention window grows (Peng et al., arXiv 2309.00071).

    Frequencies that turn more than 32 times over the old window are kept, those under once are scaled by
    old/new, with a linear ramp between. freqs: (head_dim / 2,).
    """
    rotations = block_tokens * old_window * freqs / (2 * math.pi)
    ramp = ((rotations - 1) / (32 - 1)).clamp(0, 1)
    s = old_window / new_window
    return freqs * (s + ramp * (1 - s))


def yarn_attention_factor(old_window: int, new_window: int) -> float:
    return 1 + 0.2 * math.log(new_window / old_window)


class Rotary(nn.Module):
    """Half-truncated rotary embedding: head_dim/4 frequencies (1/1024)**linspace(0, 1) then head_dim/4 zeros
    (those pairs do not rotate); cos/sin computed in fp32, stored in bf16, one row per position of a packed
    sequence (rows: ModelConfig.rotary_tokens, the longest training chunk or validation sequence, 262,144 at 8 GPUs
    as #48); YaRN-rescaled when the training schedule grows the long window."""

    def __init__(self, head_dim: int, rows: int, initial_window: int, block_tokens: int):
        super().__init__()
        quarter = head_dim // 4
        base = (1 / 1024) ** torch.linspace(0, 1, quarter)
        self.register_buffer("base_freqs", torch.cat([base, base.new_zeros(quarter)]), persistent=False)
        self.register_buffer("freqs", self.base_freqs.clone(), persistent=False)
        self.register_buffer("cos", torch.empty(rows, head_dim // 2, dtype=torch.bfloat16), persistent=False)
        self.register_buffer("sin", torch.empty_like(self.cos), persistent=False)
        # YaRN's attention scale factor as a 0-D tensor, not a float: the compiled model reads its value instead of
        # baking it in, so a window change does not recompile
        self.register_buffer("scale_factor", torch.ones(()), persistent=False)
        self.initial_window, self.block_tokens = initial_window, block_tokens
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        self.freqs.copy_(self.base_freqs)
        self.window = self.initial_window
        self.scale_factor.fill_(1.0)
        self._fill_tables()

    @torch.no_grad()
    def grow_window(self, new_window: int) -> None:
        if new_window <= self.window:
            return
        self.freqs.copy_(yarn_frequencies(self.freqs, self.window, new_window, self.block_tokens))
        self.scale_factor.mul_(yarn_attention_factor(self.window, new_window))
        self.window = new_window
        self._fill_tables()

    def state(self) -> dict[str, Tensor]:
        """The YaRN-rescaled frequencies and factor as they are now: a checkpoint saves them rather than replaying
        every window change."""
        return {"freqs": self.freqs, "scale_factor": self.scale_factor, "window": torch.tensor(self.window)}

    @torch.no_grad()
    def load_state(self, saved: Mapping[str, Tensor]) -> None:
        self.freqs.copy_(saved["freqs"])
        self.scale_factor.copy_(saved["scale_factor"])
        self.window = int(saved["window"])
        self._fill_tables()

    def _fill_tables(self) -> None:
        theta = torch.outer(torch.arange(self.cos.size(0), dtype=torch.float32, device=self.freqs.device), self.freqs)
        self.cos.copy_(theta.cos())
        self.sin.copy_(theta.sin())


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates the pairs (x[..., i], x[..., i + D/2]). x: (B, T, H, D); cos, sin: (T, D/2)."""
    cos, sin = cos[None, :x.size(1), None, :].type_as(x), sin[None, :x.size(1), None, :].type_as(x)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


@dataclass
class AttnInputs:
    """What every attention layer of one forward shares: rotary tables (T, head_dim / 2), the softmax scale and
    YaRN's factor on it (0-D tensor), and the attention kernel (its masks come with each layer's window)."""

    cos: Tensor
    sin: Tensor
    scale: float
    yarn_factor: Tensor
    kernel: type[Attention]


class CausalSelfAttention(nn.Module):
    """Attention with a fused fp32 qkvo_w (Q, K, V, O stacked on rows), QK RMS norm, half rotary, value
    embeddings, scale attn_scale, and a sigmoid output gate per head read from the first gate_input_dim channels."""

    def __init__(self, config: ModelConfig, gate_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        width = config.num_heads * config.head_dim
        bound = math.sqrt(3) * 0.5 / math.sqrt(config.model_dim)  # uniform(-b, b) has std b / sqrt(3): 0.5/sqrt(dim)
        qkvo = torch.empty(4 * width, config.model_dim).uniform_(-bound, bound)
        qkvo[3 * width:].zero_()  # O zero (#48): every attention starts as a no-op on the residual stream
        self.qkvo_w = nn.Parameter(qkvo)
        # bf16 on CUDA as #48 (NorMuon updates it in bf16); the embeddings' dtype in general
        self.attn_gate = nn.Parameter(torch.zeros(config.num_heads, config.gate_input_dim, dtype=gate_dtype))

    def forward(self, x: Tensor, value_embed: Tensor | None, sa_lambdas: Tensor, mask, shared: AttnInputs) -> Tensor:
        """x: (1, T, model_dim); value_embed: (1, T, model_dim) or None; mask: from shared.kernel.mask()."""
        batch, seq, _ = x.shape
        width = self.num_heads * self.head_dim
        w = self.qkvo_w.type_as(x)
        qkv = F.linear(x, w[:3 * width] * sa_lambdas[0])  # w already in x's dtype; the 0-D fp32 factor keeps it
        q, k, v = qkv.view(batch, seq, 3, self.num_heads, self.head_dim).unbind(2)
        # YaRN's scale factor multiplies q, which is the same as multiplying the softmax scale
        q = apply_rotary(rms_norm(q), shared.cos, shared.sin) * shared.yarn_factor  # 0-D fp32, unrounded (#48)
        k = apply_rotary(rms_norm(k), shared.cos, shared.sin)
        if value_embed is not None:
            v = v + value_embed.view_as(v)
        y = shared.kernel.attend(q, k, v, mask, shared.scale)
        gate = torch.sigmoid(F.linear(x[..., :self.attn_gate.size(1)], self.attn_gate.type_as(x)))
        y = (y * gate.unsqueeze(-1)).reshape(batch, seq, width)
        return F.linear(y, w[3 * width:] * sa_lambdas[1])


class MLP(nn.Module):
    """relu(x @ c_fc^T)**2 @ c_proj, both stored (hidden, model_dim) in fp32; c_proj zero-init."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.model_dim
        bound = math.sqrt(3) * 0.5 / math.sqrt(config.model_dim)  # std 0.5 / sqrt(dim), as qkvo_w
        self.c_fc = nn.Parameter(torch.empty(hidden, config.model_dim).uniform_(-bound, bound))
        # stored (hidden, dim) like c_fc, not (dim, hidden): NorMuon batches the two as one shape
        self.c_proj = nn.Parameter(torch.zeros(hidden, config.model_dim))

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.relu(F.linear(x, self.c_fc.type_as(x))).square()
        return hidden @ self.c_proj.type_as(x)


class Block(nn.Module):
    """x = lambda_a * x + lambda_b * x0; x += attn(norm(x)); x += mlp(norm(x)) (each sublayer where the plan has it)."""

    def __init__(self, config: ModelConfig, has_attn: bool, has_mlp: bool,
                 gate_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.attn = CausalSelfAttention(config, gate_dtype) if has_attn else None
        self.attn_norm = make_norm(config) if has_attn else None
        self.mlp = MLP(config) if has_mlp else None
        self.mlp_norm = make_norm(config) if has_mlp else None

    def forward(self, x: Tensor, x0: Tensor, lambdas: Tensor, sa_lambdas: Tensor, value_embed: Tensor | None,
                mask, shared: AttnInputs) -> Tensor:
        x = lambdas[0] * x + lambdas[1] * x0  # fp32 0-D scalars: bf16 products, unrounded factors (#48)
        if self.attn is not None:
            x = x + self.attn(self.attn_norm(x), value_embed, sa_lambdas, mask, shared)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class GPT(nn.Module):
    """Record #48's GPT: smeared embedding, value embeddings, U-net skip, backout, soft-capped zero-init head.

    The scalars (block lambdas, sa_lambdas, skip weight, smear and backout lambdas) live in one fp32 vector,
    `scalars`, laid out by `scalar_slices`. config: everything the model reads (model_config(hp) for a run).
    embed_dtype is the storage dtype of the embeddings, head and gates (bf16 on CUDA as the record; fp32 on CPU,
    where bf16 matmuls are slow); activations follow it. accum_steps: forwards per rank per step (the FP8 head's
    gradient scale follows it).

    Windows: `windows` = (short, long) in blocks of window_block_tokens, read by every forward.
    set_training_window() follows the schedule (YaRN at each change of the long window, as #48);
    set_final_windows() widens the long window for the last validation without a YaRN step (#48 sets ws_long = 20
    there without yarn.apply).
    """

    def __init__(self, config: ModelConfig, embed_dtype: torch.dtype = torch.float32, accum_steps: int = 1):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"GPT takes a ModelConfig, not {type(config).__name__}: GPT(model_config(hp)) for a run's "
                            "flags, or GPT(ModelConfig(num_layers=..., ...))")
        self.config = config
        # The loop divides each chunk's loss by the accumulation steps before its backward (as #48), so on one GPU
        # (8 steps) the head's gradient is 8x smaller than on 8 GPUs (1 step). The FP8 head's e5m2 gradient scale
        # shrinks by the same factor, so its cast sees #48's 8-GPU values, away from e5m2's subnormals.
        self.fp8_grad_scale = FP8_GRAD_SCALE / accum_steps
        self.plan = layer_plan(config.num_layers, config.num_value_embeds)
        n = config.num_layers
        self.embed = nn.Embedding(config.vocab_size, config.model_dim, dtype=embed_dtype)
        self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, config.model_dim, dtype=embed_dtype)
                                          for _ in range(config.num_value_embeds))
        # the gates are stored like the embeddings (bf16 on CUDA, as #48's)
        self.smear_gate = nn.Parameter(torch.zeros(1, config.gate_input_dim, dtype=embed_dtype))
        self.blocks = nn.ModuleList(Block(config, self.plan.attn[i], self.plan.mlp[i], embed_dtype)
                                    for i in range(n))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Parameter(torch.zeros(config.vocab_size, config.model_dim, dtype=embed_dtype))
        # single scalars by int index, not 1-element slices: a 0-D fp32 tensor times a bf16 activation stays bf16
        # (a (1,) one would promote the product to fp32)
        self.scalar_slices = {"lambdas": slice(0, 2 * n), "sa_lambdas": slice(2 * n, 4 * n),
                              "skip": 4 * n, "smear": 4 * n + 1, "backout": 4 * n + 2}
        # #48's initial values: per layer lambdas (1.1 on x, 0 on x0) and sa_lambdas (0.5 on qkv, 1 on o); then
        # skip -1.5 (its sigmoid gate starts at 0.18), smear 0, backout 0.5
        scalars = torch.cat([torch.tensor([1.1, 0.0]).repeat(n), torch.tensor([0.5, 1.0]).repeat(n),
                             torch.tensor([-1.5, 0.0, 0.5])])
        self.scalars = nn.Parameter(scalars)
        # rounded up to whole tiles of every attention kernel: forward pads a sequence to its kernel's tile
        tile = math.lcm(*(kernel.tile for kernel in ATTENTION.values()))
        rotary_len = -(-config.rotary_tokens // tile) * tile
        self.rotary = Rotary(config.head_dim, rotary_len, config.initial_window, config.window_block_tokens)
        self.windows = window_pair(config.initial_window)

    def set_training_window(self, long_window: int) -> None:
        """The schedule's long window (blocks) for the next forwards, short = long // 2; a change YaRN-rescales the
        rotary table and the attention scale."""
        self.rotary.grow_window(long_window)
        self.windows = window_pair(long_window)

    def set_final_windows(self, long_window: int) -> None:
        """The final validation's long window: the short window and the rotary stay as the last training step left
        them (no YaRN step, as #48)."""
        self.windows = (self.windows[0], long_window)

    def reset_schedule_state(self) -> None:
        self.rotary.reset()
        self.windows = window_pair(self.config.initial_window)

    def update_norm_scales(self) -> None:
        """Once per optimizer step, outside the compiled forward: each norm class moves the running scales of its
        sites (Norm.update_running_scales; only NORM=derf_ema has any)."""
        sites = list(self.norm_sites().values())
        for kind in dict.fromkeys(type(site) for site in sites):
            kind.update_running_scales([site for site in sites if type(site) is kind])

    def norm_sites(self) -> dict[str, nn.Module]:
        """Every block and final norm by name: '<layer>.attn_norm', '<layer>.mlp_norm', then 'final_norm'."""
        sites = {f"{i}.{name}": getattr(block, name) for i, block in enumerate(self.blocks)
                 for name in ("attn_norm", "mlp_norm") if getattr(block, name) is not None}
        return {**sites, "final_norm": self.final_norm}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The model's parameters by optimizer role."""
        blocks = list(self.blocks)
        gates = [b.attn.attn_gate for b in blocks if b.attn] + [self.smear_gate]
        norm_params = [p for norm in self.norm_sites().values() for p in norm.parameters()]
        return {"embed": [self.embed.weight] + [e.weight for e in self.value_embeds],
                "scalar": [self.scalars] + norm_params, "head": [self.lm_head],
                "qkvo": [b.attn.qkvo_w for b in blocks if b.attn], "c_fc": [b.mlp.c_fc for b in blocks if b.mlp],
                "c_proj": [b.mlp.c_proj for b in blocks if b.mlp], "gates": gates}

    def forward(self, idx: Tensor, targets: Tensor, reduction: str = "sum", fp8: bool = False) -> Tensor:
        """Cross-entropy of the next-token prediction over one packed sequence. idx, targets: (T,) int64.

        Documents start at BOS tokens and never see each other. The attention kernel (ATTENTION; auto: flex on
        CUDA, dense elsewhere) works on whole tiles (flex: FLEX_BLOCK tokens): a sequence of another length is padded
        at its end with BOS tokens (each its own document, after every real token, so no real token sees them) whose
        targets are ignored.
        """
        config, plan = self.config, self.plan
        kernel = attention_kernel(config.attention, idx.device)
        if idx.size(0) % kernel.tile:
            pad = kernel.tile - idx.size(0) % kernel.tile
            idx = F.pad(idx, (0, pad), value=config.bos_id)
            targets = F.pad(targets, (0, pad), value=-100)  # cross_entropy's ignore_index
        if idx.size(0) > self.rotary.cos.size(0):
            raise ValueError(f"a sequence of {idx.size(0)} tokens is longer than the rotary table "
                             f"({self.rotary.cos.size(0)} rows): build GPT with a ModelConfig whose rotary_tokens >= "
                             "the longest sequence")
        scalars = {name: self.scalars[s] for name, s in self.scalar_slices.items()}
        x = self.embed(idx)[None]  # (1, T, model_dim)
        # smear (#48): every position but the first adds a gated share of the previous token's embedding
        gate = torch.sigmoid(F.linear(x[:, 1:, :config.gate_input_dim], self.smear_gate.type_as(x)))
        # fp32 0-D scalars multiply bf16 activations as they are (#48): rounding them to bf16 first (.type_as) would
        # shift e.g. YaRN's attention factor by up to 0.2%; the products stay bf16
        x = torch.cat([x[:, :1], x[:, 1:] + scalars["smear"] * gate * x[:, :-1]], dim=1)
        x = x0 = rms_norm(x)  # x0: the normed embedding that every block mixes back in (lambdas[1])
        value_embeds = [table(idx)[None] for table in self.value_embeds]
        shared = AttnInputs(cos=self.rotary.cos, sin=self.rotary.sin, scale=config.attn_scale,
                            yarn_factor=self.rotary.scale_factor, kernel=kernel)
        # one mask per distinct window per forward (two: short and long), shared by every layer that uses it
        docs = document_ids(idx, config.bos_id)
        masks = {w: kernel.mask(docs, w * config.window_block_tokens) for w in sorted(set(self.windows))}
        skip = backout = None
        for i, block in enumerate(self.blocks):
            if block.attn is None and block.mlp is None:
                continue
            if i == plan.skip_target and skip is not None:  # U-net skip: an early layer's output, gated
                x = x + torch.sigmoid(scalars["skip"]) * skip
            ve = value_embeds[plan.value_embed[i]] if plan.value_embed[i] is not None else None
            window = self.windows[int(plan.long_window[i])]  # int(): torch 2.11's dynamo refuses a bool index
            x = block(x, x0, scalars["lambdas"][2 * i:2 * i + 2], scalars["sa_lambdas"][2 * i:2 * i + 2], ve,
                      masks[window], shared)
            if i == plan.skip_source:
                skip = x
            if i == plan.backout_layer:
                backout = x
        if backout is not None:  # backout (#48): a share of a middle layer's output leaves before the head
            x = x - scalars["backout"] * backout
        x = self.final_norm(x)[0]  # (T, model_dim)
        if self.training:
            return F.cross_entropy(self.logits(x, fp8), targets, reduction=reduction)
        # Evaluation: a validation sequence is 262,144 tokens at any world size (#48's layout), whose (T, 50304)
        # logits would take 26 GB in bf16 and twice that in fp32; the head and the loss run on slices of
        # EVAL_HEAD_TOKENS instead, in fp32, which gives the same per-token losses.
        losses = torch.cat([F.cross_entropy(self.logits(x[start:start + EVAL_HEAD_TOKENS], False).float(),
                                            targets[start:start + EVAL_HEAD_TOKENS], reduction="none")
                            for start in range(0, x.size(0), EVAL_HEAD_TOKENS)])
        if reduction == "none":
            return losses
        return losses.sum() if reduction == "sum" else losses.sum() / (targets != -100).sum()

    def logits(self, x: Tensor, fp8: bool) -> Tensor:
        """Soft-capped logits (T, vocab) of final-normed x (T, model_dim), in the head's dtype (bf16 on CUDA) as #48;
        with fp8 the head matmul runs in FP8 (training only)."""
        config = self.config
        if fp8:
            logits = fp8_linear(x, self.lm_head, math.sqrt(config.model_dim) / FP8_X_SCALE_NUMERATOR,
                                FP8_W_SCALE, self.fp8_grad_scale)
        else:
            logits = F.linear(x, self.lm_head.type_as(x))
        return config.logit_cap * torch.sigmoid(logits * (1 / config.logit_temperature))


# ---- data ----


SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
DATA_HINT = ("HINT: fetch FineWeb again with `python data/cached_fineweb10B.py`, or rebuild the embedded corpus with "
             "`python data/build_corpus.py` (`./run.sh data` does the right one for this machine)")


class ShardError(ValueError):
    """A shard file that cannot be used: the message names the file, what is wrong and what to do."""


def read_shard_header(path: str) -> int:
    """Checks a shard's header and size (llm.c / speedrun format: 256 int32 header, then uint16 tokens); returns
    the token count."""
    try:
        header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
        actual = os.path.getsize(path)
    except OSError as error:
        raise ShardError(f"{path}: cannot read it ({error.strerror or error}). {DATA_HINT}") from None
    if header.size < SHARD_HEADER_INTS:
        raise ShardError(f"{path}: shorter than the {SHARD_HEADER_INTS * 4}-byte header. {DATA_HINT}")
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: magic number {header[0]}, expected {SHARD_MAGIC}; not a token shard. {DATA_HINT}")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: version {header[1]}, expected {SHARD_VERSION}. {DATA_HINT}")
    num_tokens = int(header[2])
    expected = SHARD_HEADER_INTS * 4 + 2 * num_tokens
    if num_tokens < 0 or actual != expected:
        raise ShardError(f"{path}: {actual} bytes, but its header promises {num_tokens} tokens = {expected} bytes "
                         f"(truncated or padded). {DATA_HINT}")
    return num_tokens


def read_shard(path: str, vocab_size: int) -> np.ndarray:
    """The tokens of a shard (uint16), after the header checks and a check that every id is below vocab_size."""
    num_tokens = read_shard_header(path)
    try:
        tokens = np.fromfile(path, dtype=np.uint16, offset=SHARD_HEADER_INTS * 4, count=num_tokens)
    except OSError as error:
        raise ShardError(f"{path}: cannot read it ({error.strerror or error}). {DATA_HINT}") from None
    if tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise ShardError(f"{path}: token id {int(tokens[bad])} at position {bad} is >= the vocab size {vocab_size}; "
                         f"not a GPT-2 shard. {DATA_HINT}")
    return tokens


def find_shards(pattern: str, variable: str) -> list[str]:
    """The files a TRAIN_FILES/VAL_FILES glob names, sorted, each with a valid header."""
    files = sorted(glob.glob(pattern))
    if not files and "embedded_bytes" in pattern:  # PRESET=research's byte shards: not what ./run.sh data builds
        raise ShardError(f"{variable}={pattern}: no file matches. HINT: build the byte-level corpus with `python "
                         f"data/build_corpus.py --bytes`, or point {variable} at your shards")
    if not files:
        raise ShardError(f"{variable}={pattern}: no file matches. {DATA_HINT}, or point {variable} at your shards")
    folders = [path for path in files if os.path.isdir(path)]
    if folders:
        example = os.path.join(folders[0], f"*{variable.split('_')[0].lower()}_*.bin")
        raise ShardError(f"{variable}={pattern}: {folders[0]} is a folder; {variable} takes a glob of shard files, "
                         f"e.g. {variable}='{example}'")
    for path in files:
        read_shard_header(path)
    return files


def check_shard_sizes(hp: Hyperparameters, geometry: BatchGeometry, train_files: list[str],
                      val_files: list[str]) -> None:
    """What the shard headers tell, checked before any training (the loader reads train shards one by one as
    training goes): every train shard holds the largest training chunk, which the loader never splits over two
    shards, and the val shards together hold VAL_TOKENS + 1 tokens."""
    batch = max(hp.batch_schedule)
    chunk_tokens = geometry.chunk_tokens(batch)
    for path in train_files:
        count = read_shard_header(path)
        if count < chunk_tokens + 1:
            raise ShardError(f"BATCH_SCHEDULE={','.join(map(str, hp.batch_schedule))}: a training chunk is {batch} / "
                             f"{geometry.chunks} chunks + 1 = {chunk_tokens + 1} tokens, but {path} holds {count} "
                             f"(its header); lower BATCH_SCHEDULE, raise BATCH_CHUNKS, or use bigger shards")
    total = sum(read_shard_header(path) for path in val_files)
    if total < hp.val_tokens + 1:
        raise ShardError(f"VAL_TOKENS={hp.val_tokens}: the val files hold only {total} tokens (their headers); "
                         f"lower VAL_TOKENS (and VAL_BATCH_TOKENS with it) or add val shards")
    # the kind of tokens: every builder starts a split's first shard with a document, so its first token is the BOS
    for path in (train_files[0], val_files[0]):
        head = np.fromfile(path, dtype=np.uint16, count=1, offset=SHARD_HEADER_INTS * 4)
        first = int(head[0]) if head.size else hp.bos_id  # an empty shard has no kind
        if first != hp.bos_id:
            kind = {BOS_ID: "GPT-2 tokens", BYTE_BOS_ID: "byte-level tokens"}.get(first, f"first token {first}")
            raise ShardError(f"{path}: starts with token {first} ({kind}), but BOS_ID={hp.bos_id} (PRESET="
                             f"{hp.preset}): point TRAIN_FILES/VAL_FILES at shards of this preset's kind "
                             f"(byte-level: python data/build_corpus.py --bytes) or set BOS_ID to theirs")


def read_shard_with_documents(path: str, vocab_size: int, bos_id: int = BOS_ID) -> tuple[np.ndarray, np.ndarray]:
    """A shard's tokens (uint16) and the positions of its BOS tokens (int64), the work of the loader's thread."""
    tokens = read_shard(path, vocab_size)
    return tokens, np.flatnonzero(tokens == bos_id)


class PackedLoader:
    """Training chunks packed as #48 packs them, one stream for every world size.

    A chunk of n tokens is ONE flat sequence of n + 1 tokens (inputs, and targets shifted by one): whole documents,
    each from its BOS, each cut at max_seq_len tokens, the last one cut to fill; the next chunk starts at the next
    document. Chunk c of a step runs on rank c % world in micro-step c // world, so every world size walks the same
    chunks (each rank only copies its own). A chunk that would run past the last document of a shard is built
    from the start of the next shard instead (#48 drops the whole micro-step's chunks there, which depends on the
    world size); after the last file the stream starts over. Shards are read in sorted order; within a shard the
    documents come in the file's order, or with data_seed >= 0 in a permutation seeded by (data_seed, shard index):
    the same on every rank, so the stream stays one for every world size.

    Shards are read, checked and BOS-indexed in a background thread, the next one while the current one trains,
    so no disk read or BOS scan happens inside a step; chunks go to the GPU from pinned memory.
    """

    def __init__(self, files: list[str], vocab_size: int, max_seq_len: int, rank: int, world_size: int,
                 pin_memory: bool = False, bos_id: int = BOS_ID, data_seed: int = -1):
        self.files, self.vocab_size, self.max_seq_len, self.bos_id = files, vocab_size, max_seq_len, bos_id
        self.data_seed = data_seed
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-reader")
        self.reset()

    def reset(self) -> None:
        """Back to the first document of the first shard (read now, so that its errors surface in setup)."""
        self.shard = 0
        self.tokens, self.bos, self.ends = self._read(0)
        self.document = 0  # index into self.bos (and self.ends) of the next chunk's first document
        self._prefetch()

    def _read(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shard `shard`'s tokens and its documents' starts (its BOS positions) and ends, in the order the loader
        walks them. Runs in the reader thread for the next shard."""
        tokens, bos = read_shard_with_documents(self.files[shard], self.vocab_size, self.bos_id)
        ends = np.append(bos[1:], tokens.size)  # a document ends where the file's next one starts
        if self.data_seed >= 0:
            order = np.random.default_rng((self.data_seed, shard)).permutation(bos.size)
            bos, ends = bos[order], ends[order]
        return tokens, bos, ends

    def state(self) -> dict[str, Tensor]:
        """The position of the next chunk: its shard, and its first document's index into that shard's BOS list."""
        return {"shard": torch.tensor(self.shard), "document": torch.tensor(self.document)}

    def load_state(self, saved: Mapping[str, Tensor]) -> None:
        self.restore(int(saved["shard"]), int(saved["document"]))

    def restore(self, shard: int, document: int) -> None:
        """Continues from a checkpoint's position: the next chunk starts at document `document` of shard `shard`."""
        if shard != self.shard:
            self._next.cancel()
            self.shard = shard
            self.tokens, self.bos, self.ends = self._read(shard)
            self._prefetch()
        self.document = document

    def _prefetch(self) -> None:
        self._next = self._reader.submit(self._read, (self.shard + 1) % len(self.files))

    def _advance_shard(self) -> None:
        self.shard = (self.shard + 1) % len(self.files)
        self.tokens, self.bos, self.ends = self._next.result()  # a ShardError raised in the thread surfaces here
        self.document = 0
        self._prefetch()

    def _chunk_ranges(self, chunk_tokens: int) -> list[tuple[int, int]]:
        """[start, end) token ranges of the next chunk (chunk_tokens + 1 tokens in all), moving past it."""
        while True:  # the rest of this shard, then a fresh one
            ranges, have, document = [], 0, self.document
            while have < chunk_tokens + 1 and document < self.bos.size:
                start = int(self.bos[document])
                end = min(int(self.ends[document]), start + self.max_seq_len, start + chunk_tokens + 1 - have)
                ranges.append((start, end))
                have += end - start
                document += 1
            if have == chunk_tokens + 1:
                self.document = document
                return ranges
            if self.document == 0:  # a whole shard, from its first document, is too short
                raise ShardError(f"{self.files[self.shard]}: too few documents for one chunk of {chunk_tokens + 1} "
                                 f"tokens; use bigger shards or a smaller batch. {DATA_HINT}")
            self._advance_shard()

    def next_step(self, chunk_tokens: int, accum_steps: int) -> list[Tensor]:
        """This rank's chunks of the next step, one per micro-step: accum_steps tensors (chunk_tokens + 1,) int32
        on the CPU (pinned when pin_memory)."""
        mine = []
        for chunk in range(accum_steps * self.world_size):
            ranges = self._chunk_ranges(chunk_tokens)
            if chunk % self.world_size == self.rank:
                tokens = torch.from_numpy(np.concatenate([self.tokens[a:b] for a, b in ranges]).astype(np.int32))
                mine.append(tokens.pin_memory() if self.pin_memory else tokens)
        return mine


def load_val_sequences(files: list[str], val_tokens: int, sequence_tokens: int, vocab_size: int, rank: int,
                       world_size: int) -> Tensor:
    """This rank's validation sequences, as #48: the first val_tokens tokens of the val files cut into consecutive
    sequences of sequence_tokens (+1 target token), NOT aligned to documents (documents are masked by their BOS
    inside a sequence and never cut at max_seq_len); sequence c to rank c % world_size, in order.
    Returns (val_tokens / sequence_tokens / world_size, sequence_tokens + 1) int32."""
    parts, have = [], 0
    for path in files:
        if have > val_tokens:
            break
        parts.append(read_shard(path, vocab_size))
        have += parts[-1].size
    if have < val_tokens + 1:
        raise ShardError(f"VAL_TOKENS={val_tokens}: the val files hold only {have} tokens; lower VAL_TOKENS "
                         f"or add val shards")
    stream = np.concatenate(parts)
    starts = range(rank * sequence_tokens, val_tokens, world_size * sequence_tokens)
    return torch.from_numpy(np.stack([stream[s:s + sequence_tokens + 1] for s in starts]).astype(np.int32))


# ---- the step: schedule, diagnostics, one optimizer step, validation, warmup ----


def build_optimizers(model: GPT, hp: Hyperparameters) -> list[LoopOptimizer]:
    """The matrix optimizer that OPTIMIZER's entry builds (every step) and DistAdam for embeddings, scalars and head
    (every adam_step_every). Each follows LoopOptimizer's contract (its docstring lists what a new optimizer
    touches)."""
    groups = model.param_groups()
    entry = registered(OPTIMIZERS, "OPTIMIZER", hp.optimizer)
    adam = DistAdam([dict(params=groups["embed"], lr_mul=hp.embed_lr_mul),
                     dict(params=groups["scalar"], lr_mul=hp.scalar_lr_mul),
                     dict(params=groups["head"], lr_mul=hp.head_lr_mul)],
                    lr=hp.adam_lr, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps, weight_decay=hp.adam_wd,
                    compile=bool(hp.compile), bias_correction=hp.adam_bias_correction, step_every=hp.adam_step_every)
    return [entry.build(groups, hp), adam]


def steps_now(optimizer: LoopOptimizer, step: int, hp: Hyperparameters) -> bool:
    return (step + 1) % optimizer.step_every == 0 or step == hp.num_iterations - 1


def set_schedule(optimizers: list[LoopOptimizer], step: int, hp: Hyperparameters, grad_scale: float) -> None:
    """This step's lr multiplier, momentum and gradient scale into every optimizer (LoopOptimizer.set_schedule)."""
    for optimizer in optimizers:
        optimizer.set_schedule(lr_multiplier(step, hp), muon_momentum(step, hp), grad_scale)


def schedule_phase(step: int, hp: Hyperparameters) -> tuple[int, int]:
    """(global batch tokens, long window in blocks) at a step: per third of the scheduled steps, then extension."""
    if step >= hp.scheduled_iterations:
        return hp.batch_schedule[-1], hp.extension_window
    pick = lambda values: values[min(len(values) - 1, step * len(values) // hp.scheduled_iterations)]
    return pick(hp.batch_schedule), pick(hp.long_windows)


def validates_at(step: int, hp: Hyperparameters) -> bool:
    """Whether the loop validates before training step `step`: at 0, every val_every steps and at the end."""
    return step in (0, hp.num_iterations) or bool(hp.val_every and step % hp.val_every == 0)


def diagnoses_at(step: int, hp: Hyperparameters) -> bool:
    """Whether DIAGNOSTICS=1 writes a diag line before training step `step`: at each validation and every
    diag_every steps."""
    return validates_at(step, hp) or bool(hp.diag_every and step % hp.diag_every == 0)


SPECTRAL_POWER_ITERATIONS = 8  # warm-started from the previous validation's vector, so a few suffice


def spectral_norm(w: Tensor, v: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Largest singular value of w (m, n) by power iteration on w^T w from v (n,); returns (sigma, unit v)."""
    w = w.float()
    for _ in range(iterations):
        v = w.T @ (w @ v)
        v = v / v.norm().clamp_min(1e-30)
    return (w @ v).norm(), v


def norm_input_stats(norm: Norm, x: Tensor) -> dict[str, Tensor]:
    """Diagnostics of one norm site from its input x (..., C): the input RMS, then the norm's own figures
    (Norm.diagnostics; a bounded norm's saturation and learned scalars)."""
    x = x.float()
    return {"rms": x.square().mean().sqrt(), **norm.diagnostics(x)}


class Diagnostics:
    """DIAGNOSTICS=1 (rank 0 only): per-layer figures for a `diag: {json}` line at each validation and every
    DIAG_EVERY steps.

    Activations come from forward hooks on every norm site during one eager, eval-mode forward of the start of
    the first validation sequence (the same tokens each time). Matrices (qkvo_w as its q, k, v, o row blocks, c_fc,
    c_proj): the spectral norm by warm-started power iteration, and the update RMS of the last optimizer step
    before the validation, RMS(W_after - W_before), from a snapshot taken only before that step.
    """

    def __init__(self, model: GPT, hp: Hyperparameters):
        self.model, self.hp = model, hp
        self.vectors: dict[str, Tensor] = {}
        self.snapshot: dict[str, Tensor] | None = None
        self.update_rms: dict[str, Tensor] = {}
        self.generator = torch.Generator().manual_seed(0)

    def matrices(self) -> dict[str, Tensor]:
        """'<layer>.<name>' -> a view of each hidden matrix (qkvo_w split into its row blocks)."""
        out = {}
        for i, block in enumerate(self.model.blocks):
            if block.attn is not None:
                width = block.attn.num_heads * block.attn.head_dim
                for j, name in enumerate("qkvo"):
                    out[f"{i}.attn_{name}"] = block.attn.qkvo_w[j * width:(j + 1) * width]
            if block.mlp is not None:
                out[f"{i}.mlp_fc"], out[f"{i}.mlp_proj"] = block.mlp.c_fc, block.mlp.c_proj
        return out

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Snapshots the matrices before the optimizer step that precedes a validation (no copy otherwise)."""
        if diagnoses_at(step + 1, self.hp):
            self.snapshot = {key: w.detach().clone() for key, w in self.matrices().items()}

    @torch.no_grad()
    def after_step(self) -> None:
        if self.snapshot is None:
            return
        self.update_rms = {key: (w.float() - self.snapshot[key].float()).square().mean().sqrt()
                           for key, w in self.matrices().items()}
        self.snapshot = None

    def state(self) -> dict[str, Tensor]:
        """What the next diag line depends on besides the model: for checkpoints."""
        out = {f"vector/{key}": v for key, v in self.vectors.items()}
        out.update({f"update_rms/{key}": v for key, v in self.update_rms.items()})
        out["generator"] = self.generator.get_state()
        return out

    def load_state(self, saved: dict[str, Tensor]) -> None:
        device = next(self.model.parameters()).device
        self.vectors = {k.removeprefix("vector/"): v.to(device) for k, v in saved.items() if k.startswith("vector/")}
        self.update_rms = {k.removeprefix("update_rms/"): v for k, v in saved.items() if k.startswith("update_rms/")}
        if "generator" in saved:
            self.generator.set_state(saved["generator"])

    def _spectral(self, key: str, w: Tensor) -> float:
        v = self.vectors.get(key)
        if v is None:
            v = torch.randn(w.size(1), generator=self.generator).to(w.device)
        sigma, v = spectral_norm(w, v, SPECTRAL_POWER_ITERATIONS)
        if torch.isfinite(v).all() and v.norm() > 0:  # a zero matrix (zero-init o, c_proj) gives no direction
            self.vectors[key] = v
        else:
            self.vectors.pop(key, None)
        return sigma.item()

    @torch.no_grad()
    def collect(self, step: int, batch: Tensor) -> dict:
        """The diag record at `step` from one packed sequence (T + 1,) of validation tokens."""
        model = self.model
        sites = model.norm_sites()
        activations: dict[str, dict[str, Tensor]] = {}

        def hook(key: str) -> Callable:
            return lambda module, inputs, output: activations.__setitem__(key, norm_input_stats(module, inputs[0]))

        handles = [norm.register_forward_hook(hook(key)) for key, norm in sites.items()]
        was_training = model.training
        model.eval()
        try:
            model(batch[:-1].long(), batch[1:].long(), "sum")
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
        layers: dict[int, dict[str, object]] = {}
        record: dict[str, object] = {"step": step}
        for key, stats in activations.items():
            layer, _, site = key.rpartition(".")
            target = layers.setdefault(int(layer), {}) if layer else record
            target.update({f"{site}_{name}": value.item() for name, value in stats.items()})
        for key, w in self.matrices().items():
            layer, _, name = key.partition(".")
            layers.setdefault(int(layer), {})[f"{name}_spectral"] = self._spectral(key, w)
            if key in self.update_rms:
                layers[int(layer)][f"{name}_update_rms"] = self.update_rms[key].item()
        record["layers"] = [{"block": f"blocks.{i}", **layers[i]} for i in sorted(layers)]
        return record


@dataclass
class TrainState:
    """Everything one training step touches."""

    hp: Hyperparameters
    model: GPT
    step_model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    loader: PackedLoader
    val_sequences: Tensor  # this rank's validation sequences on the device: (n, T + 1) int32
    geometry: BatchGeometry
    device: torch.device
    momo: Momo | None = None
    diagnostics: Diagnostics | None = None
    # where the loop starts: 0, or a resumed checkpoint's step, train time and tokens seen
    start_step: int = 0
    start_train_ms: float = 0.0
    start_tokens: int = 0
    current_step: int = 0  # the loop's step, for the `stopped:` line of a run that ends on an exception
    graphs_compiled: int = 0  # torch.compile's graphs so far: more at a validation than after warmup is a recompile


def train_step(state: TrainState, step: int) -> Tensor:
    """One optimizer step on one global batch. Returns this rank's mean train loss per token as a device scalar:
    nothing here waits for the device (read_train_loss does, on the steps that log)."""
    hp, model, geometry = state.hp, state.model, state.geometry
    batch_tokens, window = schedule_phase(step, hp)
    model.set_training_window(window)
    chunk_tokens = geometry.chunk_tokens(batch_tokens)
    chunks = state.loader.next_step(chunk_tokens, geometry.accum_steps)
    stepping = [steps_now(opt, step, hp) for opt in state.optimizers]
    loss_sum = torch.zeros((), device=state.device)
    for m, chunk in enumerate(chunks):
        chunk = chunk.to(state.device, non_blocking=True).long()
        for optimizer, now in zip(state.optimizers, stepping):
            optimizer.reduce_in_backward(now and m == len(chunks) - 1)  # the last backward before its step
        loss = state.step_model(chunk[:-1], chunk[1:], "sum", hp.fp8)
        # As #48: each chunk's summed loss / accumulation steps, averaged over ranks by the reduce-scatters, so the
        # gradient is the mean over the step's chunks of each chunk's summed loss at every world size.
        (loss / geometry.accum_steps).backward()
        loss_sum += loss.detach()
    # the gradient is the mean over chunks of each chunk's summed loss: chunk_tokens times the per-token mean's
    set_schedule(state.optimizers, step, hp, grad_scale=chunk_tokens)
    if state.diagnostics is not None:
        state.diagnostics.before_step(step)
    mean_loss = loss_sum / (len(chunks) * chunk_tokens)
    if state.momo is not None:
        state.momo.step([opt for opt, now in zip(state.optimizers, stepping) if now], mean_loss)
    else:
        for optimizer, now in zip(state.optimizers, stepping):
            if now:
                optimizer.step()
    model.update_norm_scales()
    if state.diagnostics is not None:
        state.diagnostics.after_step()
    return mean_loss


@torch.no_grad()
def evaluate(state: TrainState) -> float:
    """Mean cross-entropy per token over the validation sequences of all ranks."""
    model = state.model
    model.eval()
    totals = torch.zeros(2, device=state.device, dtype=torch.float64)
    for sequence in state.val_sequences:
        totals[0] += state.step_model(sequence[:-1].long(), sequence[1:].long(), "sum").double()
        totals[1] += sequence.size(0) - 1
    model.train()
    all_reduce_sum(totals)
    return (totals[0] / totals[1]).item()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def validation_windows(hp: Hyperparameters) -> list[tuple[int, int]]:
    """The distinct (short, long) windows of every validation of a run, in order (the last one is the final's)."""
    windows = []
    for step in range(hp.num_iterations):
        if validates_at(step, hp):
            long_window = schedule_phase(step, hp)[1]
            windows.append(window_pair(long_window))
    last_long = schedule_phase(hp.num_iterations - 1, hp)[1]
    windows.append((window_pair(last_long)[0], hp.final_window))  # the final validation: short stays
    return list(dict.fromkeys(windows))


def compiled_graphs() -> int:
    """How many graphs torch.compile has built in this process so far (a rise after warmup is a recompile)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def warmup(state: TrainState) -> None:
    """Compiles every shape the run will see, then restores the initial model, optimizer and data state, so the
    clock starts on a model that has seen nothing: two steps in every schedule phase (the Adam groups step on
    every second one), and one validation forward for each window that a validation will use."""
    hp = state.hp
    model_state = copy.deepcopy(state.model.state_dict())
    optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in state.optimizers]
    phase_steps: dict[tuple[int, int], list[int]] = {}
    for step in range(hp.num_iterations):
        steps = phase_steps.setdefault(schedule_phase(step, hp), [])
        if len(steps) < 2:
            steps.append(step)
    for steps in phase_steps.values():
        for step in steps:
            train_step(state, step)
    sequence = state.val_sequences[0]
    state.model.eval()
    with torch.no_grad():
        for windows in validation_windows(hp):
            state.model.windows = windows
            state.step_model(sequence[:-1].long(), sequence[1:].long(), "sum")
    state.model.train()
    state.model.load_state_dict(model_state)
    for optimizer, saved in zip(state.optimizers, optimizer_states):
        optimizer.load_state_dict(saved)
    for p in state.model.parameters():
        p.grad = None
    state.model.reset_schedule_state()
    state.loader.reset()
    if state.momo is not None:
        state.momo.reset()


# ---- logging ----


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_log_dir(log_dir: str) -> None:
    """ConfigError unless LOG_DIR is, or can be made as, a writable folder: checked before any work, writing
    nothing (RunLog makes the folder)."""
    path = Path(log_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())  # exists() is False under a regular file
    if not existing.is_dir():
        raise ConfigError(f"LOG_DIR={log_dir}: {existing} is a file, not a folder; point LOG_DIR at a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"LOG_DIR={log_dir}: cannot write in {existing}; point LOG_DIR at a folder you can write")


def hp_as_dict(hp: Hyperparameters) -> dict:
    """The hyperparameters as JSON-ready values (tuples as lists): the log's config line and a checkpoint's."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(hp).items()}


def run_name(hp: Hyperparameters) -> str:
    """<UTC timestamp>_<tag>_<run id>: the log file's name without .txt."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}_{hp.run_tag or hp.preset}_{uuid.uuid4().hex[:8]}"


def agreed_run_name(hp: Hyperparameters) -> str:
    """Rank 0's run_name on every rank."""
    names = [run_name(hp) if rank() == 0 else ""]
    if world_size() > 1:
        dist.broadcast_object_list(names, src=0)
    return names[0]


class RunLog:
    """Rank 0's log file logs/<UTC timestamp>_<tag>_<run id>.txt, flushed each line; other ranks write nothing.

    Opens with this file's source and a line of '=' (the speedrun convention), then `config: {json}`.
    """

    def __init__(self, hp: Hyperparameters, launch: Launch, device: torch.device, name: str | None = None):
        self.enabled = launch.rank == 0
        self.file = None
        self.name = name or run_name(hp)  # every rank knows it (the default checkpoint folder is named after it)
        if not self.enabled:
            return
        Path(hp.log_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(hp.log_dir) / f"{self.name}.txt"
        self.file = open(self.path, "x")
        self.file.write(Path(__file__).read_text() + "\n" + "=" * 100 + "\n")
        config = hp_as_dict(hp)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        config.update(world_size=launch.world_size, device=device_name, torch_version=torch.__version__,
                      python_version=sys.version.split()[0], git_commit=git_commit())
        self.line("config: " + json.dumps(config), console=False)
        print(f"logging to {self.path}", flush=True)

    def line(self, text: str, console: bool = True, console_suffix: str = "") -> None:
        if not self.enabled:
            return
        self.file.write(text + "\n")
        self.file.flush()
        if console:
            print(text + console_suffix, flush=True)

    def stopped(self, reason: str, step: int, last_finite_loss: float) -> None:
        """The last line of a run that did not finish (records/validate.py leaves such a run out, with the reason):
        why, the steps done, and the last finite train loss logged."""
        self.line("stopped: " + json.dumps({"reason": reason, "step": step, "last_finite_loss":
                                            last_finite_loss if math.isfinite(last_finite_loss) else None}))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def peak_memory_line(device: torch.device) -> str:
    """The speedrun's memory line; on CPU both figures are the process's peak resident set size."""
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device) // 2**20
        reserved = torch.cuda.max_memory_reserved(device) // 2**20
    else:
        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return f"peak memory allocated: {allocated} MiB reserved: {reserved} MiB"


# ---- checkpoints ----


CHECKPOINT_META = "meta.json"  # written last, by rank 0: a step folder without it is an unfinished checkpoint
# Hyperparameters a resumed run may set differently: where things go and how often they are logged or saved. Any
# other difference (shapes, schedule, optimizer, data order, seed) would make the continuation another run.
RESUMABLE_KEYS = ("log_dir", "run_tag", "train_files", "val_files", "train_log_every", "diagnostics", "diag_every",
                  "warmup", "save_checkpoint", "checkpoint_every", "checkpoint_dir", "checkpoint_keep", "resume",
                  "dist_timeout")


def flags_before_they_existed() -> dict[str, object]:
    """The flags added after the first checkpoints (2026-11-26) could be written, each with the value that gives the
    behaviour from before it: a checkpoint whose config lacks one ran so. ATTENTION's is auto's on the device that
    pick_device gives this process: FlexAttention with CUDA, dense attention without."""
    return {"adam_bias_correction": True, "adamw_matrix_wd": 0.0, "data_seed": -1,
            "attention": "flex" if torch.cuda.is_available() else "dense"}


def checkpoint_exception() -> type:
    """torch.distributed.checkpoint's error type: it wraps every rank's failures and derives from BaseException,
    so `except Exception` does not catch it."""
    from torch.distributed.checkpoint import CheckpointException
    return CheckpointException


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """torch.distributed.checkpoint warns at every save and load without a process group (world size 1)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank_prefix(r: int) -> str:
    return f"rank{r}/"


def prefixed(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + key: value for key, value in tensors.items()}


def unprefixed(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def rng_state(device: torch.device) -> dict[str, Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def load_rng_state(saved: Mapping[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(saved["cpu"])
    if device.type == "cuda" and "cuda" in saved:
        torch.cuda.set_rng_state(saved["cuda"], device)


def checkpoint_state(state: TrainState, step: int, train_ms: float, tokens: int) -> dict[str, Tensor]:
    """Everything the run needs to go on at `step`, as a flat {key: tensor} (no pickled objects), each owner's
    state() under its prefix. Keys without a rank{r}/ prefix hold the same value on every rank
    (torch.distributed.checkpoint writes them once); keys with it are this rank's own: its Adam row shards, its
    NorMuon matrices' buffers, its Momo directions, its RNG."""
    model, own = state.model, _rank_prefix(rank())
    out = prefixed("model/", {k: v.detach() for k, v in model.state_dict().items()})
    out.update(prefixed("rotary/", model.rotary.state()))
    out.update(prefixed("loader/", state.loader.state()))
    out.update({"schedule/windows": torch.tensor(model.windows),
                "schedule/batch_tokens": torch.tensor(schedule_phase(max(step - 1, 0), state.hp)[0]),
                "progress/step": torch.tensor(step), "progress/tokens": torch.tensor(tokens),
                "progress/train_ms": torch.tensor(train_ms, dtype=torch.float64)})
    out.update(prefixed(own + "rng/", rng_state(state.device)))
    names = {p: name for name, p in model.named_parameters()}
    for i, optimizer in enumerate(state.optimizers):
        out.update(prefixed(f"{own}optim{i}/", optimizer.saved_state(names)))
    if state.diagnostics is not None:  # rank 0's power-iteration vectors and last update RMS, for equal diag lines
        out.update(prefixed(own + "diag/", state.diagnostics.state()))
    if state.momo is not None:
        out.update(prefixed(own + "momo/", state.momo.state()))
    return out


def checkpoint_meta(state: TrainState, step: int, log: RunLog, hp_dict: dict) -> dict:
    """The JSON side of a checkpoint: what the resume checks before it loads any tensor."""
    return {"step": step, "world_size": world_size(), "config": hp_dict, "log": log.name,
            "train_shards": [Path(f).name for f in state.loader.files], "torch_version": torch.__version__,
            "written_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def checkpoint_steps(folder: Path) -> list[Path]:
    """The complete step folders of a checkpoint folder, oldest first."""
    found = [path for path in folder.glob("step_*")
             if path.name.removeprefix("step_").isdigit() and (path / CHECKPOINT_META).is_file()]
    # by step number, not name: past 999,999 steps the 6-digit padding no longer keeps names in step order
    return sorted(found, key=lambda path: int(path.name.removeprefix("step_")))


class Checkpointer:
    """SAVE_CHECKPOINT=1: one step_NNNNNN folder per checkpoint in `folder`, written by every rank at once with
    torch.distributed.checkpoint (each rank its own file, nothing gathered), then meta.json by rank 0."""

    def __init__(self, hp: Hyperparameters, folder: Path, start_step: int):
        self.hp, self.folder, self.last_saved = hp, folder, start_step

    def due(self, step: int) -> bool:
        if step <= self.last_saved:
            return False
        return step == self.hp.num_iterations or bool(self.hp.checkpoint_every and step % self.hp.checkpoint_every == 0)

    def can_save_at(self, step: int) -> bool:
        """Only between whole optimizer cycles: with ADAM_STEP_EVERY=2 an odd step holds Adam gradients that were
        accumulated but not applied, which a checkpoint does not keep."""
        return step > self.last_saved and (step % self.hp.adam_step_every == 0 or step == self.hp.num_iterations)

    def save(self, state: TrainState, step: int, train_ms: float, tokens: int, log: RunLog) -> None:
        from torch.distributed import checkpoint as dcp
        t0 = time.perf_counter()
        path = self.folder / f"step_{step:06d}"
        if rank() == 0:
            if path.exists():  # e.g. from a run that went on past this step: never mix its files with these
                shutil.rmtree(path)
            path.mkdir(parents=True)
        if world_size() > 1:
            dist.barrier()  # the folder exists before any rank writes into it
        with quiet_single_process():
            dcp.save(checkpoint_state(state, step, train_ms, tokens), storage_writer=dcp.FileSystemWriter(path),
                     no_dist=world_size() == 1)
        if rank() == 0:
            temporary = path / (CHECKPOINT_META + ".tmp")
            temporary.write_text(json.dumps(checkpoint_meta(state, step, log, hp_as_dict(self.hp)), indent=1))
            temporary.replace(path / CHECKPOINT_META)  # atomic: a reader never sees half of it
            removed = self.prune(step)
            size = sum(f.stat().st_size for f in path.iterdir())
            log.line("checkpoint: " + json.dumps({"step": step, "path": str(path), "bytes": size,
                                                  "save_s": round(time.perf_counter() - t0, 3),
                                                  "pruned": [p.name for p in removed]}))
        self.last_saved = step

    def prune(self, step: int) -> list[Path]:
        """Deletes all but the newest CHECKPOINT_KEEP complete checkpoints up to `step` (0 keeps all); a later one
        in the folder (from another run) is left alone."""
        if not self.hp.checkpoint_keep:
            return []
        ours = [path for path in checkpoint_steps(self.folder) if int(path.name.removeprefix("step_")) <= step]
        old = ours[:-self.hp.checkpoint_keep]
        for path in old:
            shutil.rmtree(path)
        return old


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint stores its `.metadata` file with pickle, and pickle.load runs whatever a file
    names. This unpickler resolves only the classes such a file is made of (the checkpoint metadata dataclasses,
    torch dtypes and sizes, paths) and refuses any other name, so a crafted file cannot run code."""

    SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str) -> object:
        if module in self.SAFE_MODULES and self.metadata_class(module, name) is not None:
            return self.metadata_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) in (("torch.serialization", "_get_layout"), ("collections", "OrderedDict")):
            return getattr(importlib.import_module(module), name)
        # Python 3.13 pickles paths as pathlib._local.PosixPath, older ones as pathlib.PosixPath: either name
        # resolves to pathlib's own class, so a checkpoint loads under any supported Python
        if module in ("pathlib", "pathlib._local") and name in ("PosixPath", "WindowsPath", "PurePosixPath"):
            return getattr(importlib.import_module("pathlib"), name)
        # Some Pythons (Debian 12's 3.11.2) pickle an Enum member as getattr(EnumClass, "NAME"); protocols < 3
        # spell the module __builtin__. Only the guarded stand-in below is handed out, never getattr itself.
        if module in ("builtins", "__builtin__") and name == "getattr":
            return self.enum_member
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")

    @classmethod
    def metadata_class(cls, module: str, name: str) -> type | None:
        """The class `name` of a SAFE_MODULES module when it is defined there (not a planner class imported into
        it) and is plain data (a dataclass or an enum); None otherwise."""
        found = getattr(sys.modules.get(module), name, None)
        if (isinstance(found, type) and found.__module__ == module
                and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum))):
            return found
        return None

    @classmethod
    def enum_member(cls, owner: object, name: object) -> enum.Enum:
        """getattr(owner, name) when owner is one of the metadata enums find_class resolves and name one of its
        members; anything else (a module, a function, another class, a non-member attribute) is refused before
        any attribute is looked up."""
        if (isinstance(owner, type) and issubclass(owner, enum.Enum) and owner.__module__ in cls.SAFE_MODULES
                and cls.metadata_class(owner.__module__, owner.__name__) is owner
                and isinstance(name, str) and name in owner.__members__):
            return owner[name]
        described = getattr(owner, "__qualname__", type(owner).__qualname__)
        raise pickle.UnpicklingError(f"builtins.getattr({described}, {name!r}) is not part of a checkpoint's "
                                     "metadata (only a member of its own enums is)")


def read_checkpoint_metadata(path: Path):
    """The torch.distributed.checkpoint Metadata of `path`, read with _MetadataUnpickler."""
    import torch.distributed.checkpoint.filesystem  # noqa: F401 (its classes must be importable by name)
    with open(path / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load()


def safe_reader(path: Path):
    """A FileSystemReader whose metadata goes through _MetadataUnpickler (its tensors are read by torch.load with
    weights_only=True already)."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata = read_checkpoint_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata
    return SafeReader(path)


def find_checkpoint(resume: str) -> Path:
    """RESUME's step folder: the folder itself when it is a complete checkpoint, else its newest complete one."""
    path = Path(resume)
    if (path / CHECKPOINT_META).is_file():
        return path
    if path.is_dir() and path.name.startswith("step_"):
        raise ConfigError(f"RESUME={resume}: an incomplete checkpoint (no {CHECKPOINT_META}: it was cut off while "
                          f"saving); point RESUME at its folder ({path.parent}) for the newest complete one")
    if path.is_dir() and checkpoint_steps(path):
        return checkpoint_steps(path)[-1]
    if path.is_dir() and any(path.glob("step_*")):
        raise ConfigError(f"RESUME={resume}: no complete checkpoint there (a step_* folder without {CHECKPOINT_META} "
                          f"was cut off while saving); point RESUME at a complete step folder")
    raise ConfigError(f"RESUME={resume}: not a checkpoint (no {CHECKPOINT_META}) nor a folder of step_* checkpoints; "
                      f"point it at a folder that SAVE_CHECKPOINT=1 wrote")


META_KEYS = ("step", "world_size", "config", "log", "train_shards")  # what check_resume and the log's resumed: use


def read_checkpoint_meta(path: Path) -> dict:
    """The step folder's meta.json, or a ConfigError naming it when it is not what SAVE_CHECKPOINT=1 wrote."""
    where = path / CHECKPOINT_META
    try:
        meta = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"RESUME: {where} cannot be read ({type(error).__name__}: {error}); the checkpoint is "
                          f"damaged: point RESUME at another step folder of {path.parent}") from None
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ConfigError(f"RESUME: {where} lacks {', '.join(missing)}; it was not written by train_gpt.py's "
                          f"SAVE_CHECKPOINT=1: point RESUME at another step folder")
    return meta


def check_checkpoint_files(path: Path) -> None:
    """ConfigError unless every data file the checkpoint's index names is there and long enough: a checkpoint cut
    off while copying fails here, before any work, instead of deep inside the load after warmup."""
    try:
        metadata = read_checkpoint_metadata(path)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as error:
        raise ConfigError(f"RESUME: {path / '.metadata'} cannot be read ({type(error).__name__}: {error}); "
                          f"the checkpoint is damaged or was not written by train_gpt.py: point RESUME at another "
                          f"step folder") from None
    needed: dict[str, int] = {}  # file -> the end of the last byte range the index reads from it
    for item in (getattr(metadata, "storage_data", None) or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, end in sorted(needed.items()):
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size is None or size < end:
            state = "is missing" if size is None else f"is truncated ({size} bytes, the index reads up to {end})"
            raise ConfigError(f"RESUME: {file} {state}; the checkpoint was cut off while saving or copying: "
                              f"point RESUME at another step folder of {path.parent}, or copy it again")


def checkpoint_folder(hp: Hyperparameters, resume_from: Path | None, name: str) -> Path:
    """Where SAVE_CHECKPOINT=1 writes: CHECKPOINT_DIR, else the resumed checkpoint's folder when this run continues
    its newest checkpoint, else LOG_DIR/<run name> (a branch off an older checkpoint starts a folder of its own)."""
    if hp.checkpoint_dir:
        return Path(hp.checkpoint_dir)
    if resume_from is not None and checkpoint_steps(resume_from.parent)[-1] == resume_from:
        return resume_from.parent
    return Path(hp.log_dir) / name


def probe_checkpoint_folder(folder: Path, hp: Hyperparameters) -> None:
    """Creates `folder` and writes (then removes) a file in it on every rank, since every rank writes its own
    shard file; ConfigError on every rank when any rank cannot, so a bad path stops the run before training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe_rank{rank()}_{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
        problem = ""
    except OSError as error:
        problem = f"{type(error).__name__}: {error.strerror or error}"
    problems = [problem]
    if world_size() > 1:  # every rank learns of any rank's failure, so none waits for the others at the first save
        problems = [""] * world_size()
        dist.all_gather_object(problems, problem)
    failed = [(r, text) for r, text in enumerate(problems) if text]
    if failed:
        r, text = failed[0]
        named = f"CHECKPOINT_DIR={hp.checkpoint_dir}" if hp.checkpoint_dir else f"checkpoint folder {folder}"
        fix = "CHECKPOINT_DIR" if hp.checkpoint_dir else "LOG_DIR (or CHECKPOINT_DIR)"
        on_rank = f" on rank {r}" if world_size() > 1 else ""
        raise ConfigError(f"SAVE_CHECKPOINT=1: cannot create or write {named}{on_rank} ({text}); point {fix} at a "
                          "writable folder")


def check_resume(path: Path, meta: dict, hp: Hyperparameters, train_files: list[str]) -> None:
    """ConfigError unless this run can continue the checkpoint: same world size, same configuration apart from
    RESUMABLE_KEYS, same training shards."""
    where = f"RESUME={hp.resume}"
    if meta["world_size"] != world_size():
        raise ConfigError(f"{where}: written by {meta['world_size']} rank(s), this run has {world_size()}; the "
                          f"optimizer state is sharded by rank, so resume with the same world size "
                          f"(torchrun --nproc_per_node={meta['world_size']}, or plain python for 1)")
    ours = hp_as_dict(hp)
    saved = {**flags_before_they_existed(), **meta["config"]}  # an older checkpoint ran as these flags' old values
    differing = sorted(k for k in set(ours) | set(saved) if k not in RESUMABLE_KEYS
                       and ours.get(k, "(absent)") != saved.get(k, "(absent)"))
    if differing:
        described = ", ".join(f"{env_name(k)}={saved.get(k, '(absent)')} in the checkpoint, "
                              f"{ours.get(k, '(absent)')} now" for k in differing)
        raise ConfigError(f"{where}: the checkpoint's run differs in {described}; resume with the same settings "
                          f"(only {', '.join(env_name(k) for k in RESUMABLE_KEYS)} may change)")
    names = [Path(f).name for f in train_files]
    if names != meta["train_shards"]:
        raise ConfigError(f"{where}: the checkpoint was trained on the shards {meta['train_shards'][:3]}... "
                          f"({len(meta['train_shards'])}), TRAIN_FILES now gives {names[:3]}... ({len(names)}); "
                          "point TRAIN_FILES at the same shards")


def load_checkpoint(state: TrainState, path: Path) -> tuple[int, float, int]:
    """Loads `path` into the model, optimizers, schedule, loader, Momo and RNG; returns (step, train_ms, tokens).
    Each rank reads the shared keys and its own rank{r}/ keys, into tensors made from the saved shapes."""
    from torch.distributed import checkpoint as dcp
    metadata = read_checkpoint_metadata(path)
    own = _rank_prefix(rank())
    target = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("rank") and not key.startswith(own):
            continue
        if not hasattr(item, "size"):
            raise ConfigError(f"RESUME={path}: {key} is not a tensor; this file was not written by train_gpt.py")
        target[key] = torch.empty(item.size, dtype=item.properties.dtype)
    with quiet_single_process():
        dcp.load(target, storage_reader=safe_reader(path), no_dist=world_size() == 1)
    model, device = state.model, state.device
    model.load_state_dict(unprefixed("model/", target), strict=True)
    model.rotary.load_state(unprefixed("rotary/", target))
    model.windows = tuple(int(w) for w in target["schedule/windows"])
    step = int(target["progress/step"])
    if int(target["schedule/batch_tokens"]) != schedule_phase(max(step - 1, 0), state.hp)[0]:
        raise ConfigError(f"RESUME={path}: its batch phase ({int(target['schedule/batch_tokens'])} tokens at step "
                          f"{step}) is not this schedule's; the checkpoint does not belong to this configuration")
    state.loader.load_state(unprefixed("loader/", target))
    load_rng_state(unprefixed(own + "rng/", target), device)
    params = dict(model.named_parameters())
    for i, optimizer in enumerate(state.optimizers):
        optimizer.load_saved_state(unprefixed(f"{own}optim{i}/", target), params)
    if state.momo is not None:
        state.momo.load_state(unprefixed(own + "momo/", target), device)
    if state.diagnostics is not None or (state.hp.diagnostics and rank() == 0):
        state.diagnostics = state.diagnostics or Diagnostics(model, state.hp)
        state.diagnostics.load_state(unprefixed(own + "diag/", target))
    return step, float(target["progress/train_ms"]), int(target["progress/tokens"])


# ---- flag checks and the command line ----


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_value(name: str, raw: str, kind: object) -> object:
    """Parses one env value by the field's type; raises ConfigError naming the variable, value and what it takes."""
    text = raw.strip()
    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{name}={raw}: expected {expected}")
    if kind is bool or kind == (bool | None):
        lowered = text.lower()
        if kind != bool and lowered == "auto":
            return None
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        fail("one of " + ", ".join(_TRUE + _FALSE) + ("" if kind is bool else ", auto"))
    if kind is int:
        try:
            return int(text)
        except ValueError:
            fail("an integer")
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            fail("a number")
        if not math.isfinite(value):
            fail("a finite number")
        return value
    if kind is str:
        return text
    if kind == (str | None):  # a name from a registry, or auto
        return None if text.lower() == "auto" else text
    item = typing.get_args(kind)[0]
    try:
        return tuple(item(part) for part in text.split(",") if part.strip())
    except ValueError:
        fail(f"a comma-separated list of {item.__name__}s")


def _check_field(f: dataclasses.Field, value: object) -> None:
    name = env_name(f.name)
    choices = f.metadata.get("choices")
    if choices is not None and value is not None and value not in choices:  # None: auto, where the type allows it
        auto = ", auto" if f.default is None else ""
        raise ConfigError(f"{name}={value}: expected one of {', '.join(choices)}{auto}")
    check = f.metadata.get("check")
    if check is not None and value is not None:
        predicate, rule = check
        if not predicate(value):
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise ConfigError(f"{name}={shown}: expected {rule}")


# Flags of earlier versions, refused with what replaced them.
RENAMED_FLAGS = {
    "SEQ_LEN": ("MAX_SEQ_LEN", "which only cuts documents in a packed training chunk; a chunk is BATCH_SCHEDULE / "
                "max(world size, BATCH_CHUNKS) tokens"),
    "MICRO_BATCH_ROWS": ("BATCH_CHUNKS", "packed chunks per step; forwards per rank = BATCH_CHUNKS / world size"),
}
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and swaps of two neighbours each
    cost 1 (NROM -> NORM is 1)."""
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(rows[i - 1][j] + 1, row[j - 1] + 1, rows[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[i - 2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def typo_tolerance(name: str) -> int:
    """Edits a misspelling of `name` may hold: none for 3 letters (PWD is not CWD), 1 up to 9, 2 above. Real
    machine variables (PATH, HOME, TERM, CUDA_VISIBLE_DEVICES, NCCL_*, TORCH_*) are further than that from every
    flag, so only typos trip it."""
    return 0 if len(name) <= 3 else 1 if len(name) <= 9 else 2


def check_flag_names(environ: Mapping[str, str]) -> None:
    """ConfigError naming every env var that looks meant for this trainer but is not a flag: a renamed flag, a
    flag name in another case (norm=derf), or a close misspelling (NROM=derf)."""
    fields = [env_name(f.name) for f in dataclasses.fields(Hyperparameters)]
    known = set(fields) | set(LAUNCH_VARS)
    problems = []
    for var in sorted(environ):
        if var in known:
            continue
        setting = f"{var}={environ[var]}"
        if var in RENAMED_FLAGS:
            replacement, meaning = RENAMED_FLAGS[var]
            problems.append(f"{setting}: renamed {replacement} ({meaning}); unset {var}")
            continue
        upper = var.upper()
        # the length test first: it bounds the distance from below and spares most distance computations
        near = [(edit_distance(upper, name), name) for name in fields + list(RENAMED_FLAGS)
                if abs(len(upper) - len(name)) <= typo_tolerance(name)]
        near = [(distance, name) for distance, name in near if distance <= typo_tolerance(name)]
        if not near:
            continue
        close = min(near)[1]
        hint = f" (now {RENAMED_FLAGS[close][0]})" if close in RENAMED_FLAGS else ""
        kind = "flags are upper case" if upper == close else "not a flag"
        problems.append(f"{setting}: {kind}; did you mean {close}?{hint}")
    if problems:
        raise ConfigError("; ".join(problems))


def _parse_launch(environ: Mapping[str, str], key: str, default: int) -> int:
    raw = environ.get(key)
    if raw is None:
        return default
    value = _parse_value(key, raw, int)
    if value < (1 if key == "WORLD_SIZE" else 0):
        raise ConfigError(f"{key}={raw}: expected a valid torchrun value; launch with torchrun or unset it")
    return value


def check_launch(environ: Mapping[str, str], launch: Launch) -> None:
    """A world of several processes needs a rendezvous (torchrun sets MASTER_ADDR/MASTER_PORT for every rank); a
    plain `python train_gpt.py` under WORLD_SIZE=2 would wait in init_process_group for a rank that never comes."""
    torchrun = (f"launch with torchrun (torchrun --standalone --nproc_per_node={max(launch.world_size, 2)} "
                f"train_gpt.py), or unset RANK, LOCAL_RANK and WORLD_SIZE")
    if launch.rank >= launch.world_size:
        raise ConfigError(f"RANK={launch.rank}: expected less than WORLD_SIZE={launch.world_size}"
                          f"{'' if 'WORLD_SIZE' in environ else ' (unset)'}; {torchrun}")
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(key)]
    if launch.world_size > 1 and missing:
        raise ConfigError(f"WORLD_SIZE={launch.world_size} without {' and '.join(missing)}: one process cannot "
                          f"start a world of {launch.world_size}; {torchrun}")


def check_consistency(hp: Hyperparameters, world_size: int) -> None:
    """Checks that span fields, all in one error: raising one size often breaks two rules at once, so the error
    names every field that must change together, with a value that fits. A world size that does not divide the
    global batch is an error, never a change."""
    problems = []
    if hp.num_heads * hp.head_dim != hp.model_dim:
        problems.append(f"NUM_HEADS={hp.num_heads} * HEAD_DIM={hp.head_dim} != MODEL_DIM={hp.model_dim}: "
                        "set them so that the product equals the model width")
    if hp.bos_id >= hp.vocab_size:
        problems.append(f"BOS_ID={hp.bos_id}: expected below VOCAB_SIZE={hp.vocab_size} (the shards' ids, BOS "
                        "included, index the embedding)")
    if hp.gate_input_dim > hp.model_dim:
        problems.append(f"GATE_INPUT_DIM={hp.gate_input_dim}: expected at most MODEL_DIM={hp.model_dim}")
    if hp.extension_iterations >= hp.num_iterations:
        problems.append(f"EXTENSION_ITERATIONS={hp.extension_iterations}: expected fewer than "
                        f"NUM_ITERATIONS={hp.num_iterations}")
    if len(hp.lr_boosts) != len(hp.lr_boost_at) + 1:
        problems.append(f"LR_BOOSTS has {len(hp.lr_boosts)} values: expected one more than LR_BOOST_AT "
                        f"({len(hp.lr_boost_at)} values)")
    if hp.momo and hp.adam_step_every != 1:
        problems.append(f"MOMO=1 with ADAM_STEP_EVERY={hp.adam_step_every}: Momo's model takes one gradient per "
                        f"step for every parameter; set ADAM_STEP_EVERY=1")
    if hp.save_checkpoint and hp.checkpoint_every % hp.adam_step_every:
        every = -(-hp.checkpoint_every // hp.adam_step_every) * hp.adam_step_every
        problems.append(f"CHECKPOINT_EVERY={hp.checkpoint_every}: expected a multiple of ADAM_STEP_EVERY="
                        f"{hp.adam_step_every} (a checkpoint in between would lose Adam's accumulated gradients), "
                        f"e.g. CHECKPOINT_EVERY={every}")
    if world_size < hp.batch_chunks and hp.batch_chunks % world_size:
        problems.append(f"world size {world_size} does not divide BATCH_CHUNKS={hp.batch_chunks}: launch a world "
                        f"size that divides it (gradient accumulation), or one that is a multiple of it")
    chunks = max(world_size, hp.batch_chunks)
    unit = chunks * hp.window_block_tokens  # a batch is `chunks` sequences of whole attention blocks
    round_up = lambda tokens, multiple: max(multiple, -(-tokens // multiple) * multiple)
    split = lambda pieces: (f"{chunks} {pieces} (max(world size {world_size}, BATCH_CHUNKS={hp.batch_chunks})) of a "
                            f"multiple of WINDOW_BLOCK_TOKENS={hp.window_block_tokens} tokens")
    uneven = [batch for batch in hp.batch_schedule if batch % unit]
    if uneven:
        fitted = ",".join(str(round_up(batch, unit)) for batch in hp.batch_schedule)
        problems.append(f"BATCH_SCHEDULE={','.join(map(str, hp.batch_schedule))}: {uneven[0]} tokens do not split "
                        f"into {split('chunks')}; use multiples of {unit} (e.g. BATCH_SCHEDULE={fitted}), or change "
                        f"BATCH_CHUNKS, WINDOW_BLOCK_TOKENS or the world size")
    val_batch_tokens = hp.val_batch_tokens
    if val_batch_tokens % unit:
        val_batch_tokens = round_up(val_batch_tokens, unit)
        problems.append(f"VAL_BATCH_TOKENS={hp.val_batch_tokens}: expected a multiple of {unit}, to split into "
                        f"{split('sequences')} (e.g. VAL_BATCH_TOKENS={val_batch_tokens})")
    if hp.val_tokens % val_batch_tokens:
        fitted = f"VAL_TOKENS={round_up(hp.val_tokens, val_batch_tokens)}"
        if val_batch_tokens == hp.val_batch_tokens:
            problems.append(f"VAL_TOKENS={hp.val_tokens}: expected a multiple of VAL_BATCH_TOKENS={val_batch_tokens} "
                            f"(e.g. {fitted})")
        else:
            problems.append(f"VAL_TOKENS={hp.val_tokens}: expected a multiple of VAL_BATCH_TOKENS (e.g. {fitted} "
                            f"with VAL_BATCH_TOKENS={val_batch_tokens})")
    if problems:
        raise ConfigError("; ".join(problems))


def parse_env(environ: Mapping[str, str], cuda_available: bool | None = None) -> tuple[Hyperparameters, Launch]:
    """The one place that reads the environment: hyperparameter overrides and torchrun's RANK/WORLD_SIZE."""
    check_flag_names(environ)
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    hints = typing.get_type_hints(Hyperparameters)
    by_name = {f.name: f for f in dataclasses.fields(Hyperparameters)}
    preset = environ.get("PRESET", "speedrun" if cuda_available else "cpu").strip()
    _check_field(by_name["preset"], preset)
    values: dict[str, object] = {**PRESETS[preset], "preset": preset}
    overrides = {name: _parse_value(env_name(name), environ[env_name(name)], hints[name]) for name in by_name
                 if env_name(name) in environ and name != "preset"}
    # the optimizer's own defaults (OptimizerEntry.defaults) go over the preset's and under the env's; an unknown
    # OPTIMIZER brings none and is refused below with the other fields' checks
    optimizer = overrides.get("optimizer", values.get("optimizer", by_name["optimizer"].default))
    values.update(OPTIMIZERS[optimizer].defaults if optimizer in OPTIMIZERS else {})
    values.update(overrides)
    hp = Hyperparameters(**values)
    for f in dataclasses.fields(hp):
        _check_field(f, getattr(hp, f.name))
    launch = Launch(*(_parse_launch(environ, key, default) for key, default in
                      (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))))
    check_launch(environ, launch)
    check_consistency(hp, launch.world_size)
    return hp, launch


def resolve_auto(hp: Hyperparameters, device: torch.device) -> Hyperparameters:
    """Fills the `auto` (None) fields from the hardware: FP8 on sm90+, compile and FlexAttention on CUDA."""
    on_cuda = device.type == "cuda"
    fp8 = hp.fp8 if hp.fp8 is not None else (on_cuda and torch.cuda.get_device_capability(device) >= (9, 0))
    if fp8 and (hp.vocab_size % 16 or hp.model_dim % 16):
        raise ConfigError(f"FP8 head with VOCAB_SIZE={hp.vocab_size}, MODEL_DIM={hp.model_dim}: torch._scaled_mm "
                          f"needs both to be multiples of 16; round them up or set FP8=0")
    if fp8 and not on_cuda:
        raise ConfigError("FP8=1: the FP8 lm_head needs a CUDA GPU (sm90+); set FP8=0 on this machine")
    compile_model = hp.compile if hp.compile is not None else on_cuda
    attention = hp.attention or ("flex" if on_cuda else "dense")
    if attention == "flex" and not on_cuda:
        raise ConfigError("ATTENTION=flex: FlexAttention has no backward on this device; set ATTENTION=dense (or "
                          "auto) here")
    return dataclasses.replace(hp, fp8=fp8, compile=compile_model, attention=attention)


def help_text() -> str:
    """One line per flag with its speedrun default, for `python train_gpt.py --help`."""
    lines = ["Env flags (speedrun defaults; PRESET=cpu|ablation|research|test changes some: README, Flags):"]
    for f in dataclasses.fields(Hyperparameters):
        default = "auto" if f.default is None else f.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        choices = f" [{'|'.join(f.metadata['choices'])}]" if f.metadata.get("choices") else ""
        # the defaults that an optimizer's entry brings, e.g. " (OPTIMIZER=muonmax: 0.95)"
        brought = [f"OPTIMIZER={name}: {entry.defaults[f.name]}" for name, entry in OPTIMIZERS.items()
                   if f.name in entry.defaults]
        brought_text = f" ({'; '.join(brought)})" if brought else ""
        lines.append(f"  {env_name(f.name):24} {str(default):36} {f.metadata['help']}{brought_text}{choices}")
    lines += ["Any other env var that looks meant as a flag (another case, a close misspelling, a renamed one: "
              + ", ".join(RENAMED_FLAGS) + ") stops the run.",
              "Arguments: --help (this), --check (check the flags and LOG_DIR, then exit). Exit codes: 0 finished, "
              "1 non-finite loss, 2 bad input, 130/143 stopped by SIGINT/SIGTERM."]
    return "\n".join(lines)


# ---- stop signals ----


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_SIGNAL_S = 1.0  # a signal this soon after the first is the same request (Ctrl-C under torchrun: one from the
                       # terminal, one forwarded by torchrun); a later one stops at once


class StopSignal:
    """SIGINT/SIGTERM ask the run to stop. The loop stops at the next step boundary where every rank agrees, so no
    rank waits in a collective that the others left and no optimizer hook is cut in half; the log ends with a
    `stopped:` line and the exit code is 128 + the signal (130, 143). A second signal stops at once (no log line)."""

    def __init__(self):
        self.signum, self.agreed_signum, self.first_at = 0, 0, 0.0
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """The handlers from before install() (main() may run inside another program, a test)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum and time.monotonic() - self.first_at > REPEAT_SIGNAL_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not self.signum:
            self.signum, self.first_at = signum, time.monotonic()
            if rank() == 0:  # os.write: print() may be mid-write in the interrupted frame
                os.write(2, f"\n{signal.Signals(signum).name}: stopping at the next step (again to stop at once)\n"
                            .encode())

    def agree(self, requested: list[int]) -> None:
        """The signals any rank was asked to stop by, as read_logged_values' all-reduce found them: every rank
        takes the same one, so every rank stops before the same step."""
        if requested:
            self.agreed_signum = self.signum if self.signum in requested else requested[0]

    def agreed(self) -> bool:
        """Whether to stop before the next step. At world size 1 as soon as signalled; across ranks once a logging
        step's read (read_logged_values, already the step's host sync) has told every rank of any rank's signal,
        so that no collective is added for it."""
        if world_size() == 1:
            return bool(self.signum)
        if self.agreed_signum:
            self.signum = self.agreed_signum
        return bool(self.agreed_signum)

    def end_run(self, log: RunLog, step: int, last_finite_loss: float) -> int:
        log.stopped(f"interrupted by {signal.Signals(self.signum).name}", step, last_finite_loss)
        return 128 + self.signum


# ---- the loop ----


def read_logged_values(loss: Tensor, stop: StopSignal | None = None, momo: Momo | None = None
                       ) -> tuple[float, float | None]:
    """What a logging step reads, in one all-reduce and one host read (the only host sync of a step): the mean train
    loss over ranks, whether any rank was asked to stop (handed to `stop`), and Momo's last step scale.
    Returns (train loss, Momo scale or None)."""
    parts = [loss.detach().float().reshape(1)]
    if stop is not None:  # made on the device from Python numbers: no host-to-device copy
        parts.append(torch.full((len(STOP_SIGNALS),), 0.0, device=loss.device))
        for i, signum in enumerate(STOP_SIGNALS):
            if stop.signum == signum:
                parts[-1][i] = 1.0
    has_scale = momo is not None and momo.last_scale is not None
    if has_scale:  # the same on every rank (Momo's scalars are all-reduced), so the mean is that value
        parts.append(momo.last_scale.detach().float().reshape(1))
    values = all_reduce_mean(torch.cat(parts)).tolist()  # a mean of 0/1 flags is > 0 when any rank was asked
    if stop is not None:
        stop.agree([signum for i, signum in enumerate(STOP_SIGNALS) if values[1 + i] > 0])
    return values[0], values[-1] if has_scale else None


def read_train_loss(loss: Tensor) -> float:
    """The mean train loss per token over all ranks: a collective and a host sync, so only on the steps that log."""
    return read_logged_values(loss)[0]


def format_duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class TrainClock:
    """train_time in ms, as #48 counts it: it runs during training steps and stops (after a device sync) while the
    loop validates, writes diagnostics or saves a checkpoint."""

    def __init__(self, device: torch.device, start_ms: float):
        self.device, self.banked_ms = device, start_ms
        synchronize(device)
        self.started = time.perf_counter()

    def ms(self) -> float:
        return self.banked_ms + 1000 * (time.perf_counter() - self.started)

    @contextlib.contextmanager
    def paused(self) -> Iterator[float]:
        """Stops the clock for the body, which gets the train time so far; restarts it after a device sync."""
        synchronize(self.device)  # queued training work belongs to the time before the pause
        self.banked_ms = self.ms()
        yield self.banked_ms
        synchronize(self.device)  # the body's queued work (a validation) is not train time
        self.started = time.perf_counter()


def validate_and_diagnose(state: TrainState, log: RunLog, step: int, train_ms: float) -> float | None:
    """What the loop does before step `step` with the clock paused: the validation (its `val_loss:` line) and the
    DIAGNOSTICS=1 `diag:` line, where they fall. Returns the val loss, or None when this step does not validate."""
    hp = state.hp
    val_loss = None
    if validates_at(step, hp):
        val_loss = evaluate(state)
        log.line(f"step:{step}/{hp.num_iterations} val_loss:{val_loss:.4f} train_time:{train_ms:.0f}ms "
                 f"step_avg:{train_ms / max(step, 1):.2f}ms")
    if state.diagnostics is not None and diagnoses_at(step, hp):
        diag_tokens = state.geometry.chunk_tokens(hp.batch_schedule[0])  # the first phase's chunk: one shape
        record = state.diagnostics.collect(step, state.val_sequences[0][:diag_tokens + 1])
        log.line("diag: " + json.dumps(record), console=False)
    if val_loss is not None and hp.compile and compiled_graphs() > state.graphs_compiled:
        log.line(f"warning: {compiled_graphs() - state.graphs_compiled} graph(s) compiled after warmup "
                 f"(step {step}): a shape or window that warmup did not cover; the timing includes it")
        state.graphs_compiled = compiled_graphs()
    return val_loss


def log_step(log: RunLog, step: int, steps: int, elapsed_ms: float, tokens_seen: int, train_loss: float | None,
             momo_scale: float | None) -> None:
    """#48's `step:i/N [train_loss:..] train_time:.. step_avg:..` line after training step i - 1; on the console
    only when the loss was read, with tokens/s and the ETA."""
    loss_text = f" train_loss:{train_loss:.4f}" if train_loss is not None else ""
    # the step size Momo chose, as a fraction of the scheduled lr (1: not truncated)
    extra = f" momo_scale:{momo_scale:.4f}" if momo_scale is not None else ""
    rate = tokens_seen / (elapsed_ms / 1000)
    eta = (steps - step) * elapsed_ms / step / 1000
    log.line(f"step:{step}/{steps}{loss_text} train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / step:.2f}ms{extra}",
             console=train_loss is not None, console_suffix=f"  ({rate:,.0f} tok/s, eta {format_duration(eta)})")


def stop_nonfinite(log: RunLog, step: int, which: str, last_finite: float) -> int:
    log.stopped(f"non-finite {which}", step, last_finite)
    return 1


def stop_on_data_error(log: RunLog, step: int, error: ShardError, last_finite_loss: float) -> int:
    """A train shard read in the background turned out bad: every rank reads every shard in the same order, so
    every rank stops here at the same step, with exit code 2 as for any data error found at setup."""
    print(f"error: {error}", file=sys.stderr)
    log.stopped(f"data error: {error}", step, last_finite_loss)
    return 2


class LoopRun:
    """What train() carries from step to step besides TrainState: the log, the stop signal and the checkpointer
    around the run (each may be absent), the train clock, the tokens seen and the last finite train loss."""

    def __init__(self, state: TrainState, log: RunLog, stop: StopSignal | None, checkpointer: Checkpointer | None):
        self.log, self.stop, self.checkpointer = log, stop, checkpointer
        self.clock = TrainClock(state.device, state.start_train_ms)
        self.tokens_seen, self.last_finite = state.start_tokens, float("nan")

    def stop_here(self, state: TrainState, step: int) -> int | None:
        """Before step `step`: when a stop signal was agreed, keeps the work done so far (a checkpoint at `step` when
        SAVE_CHECKPOINT=1 and the step ends a whole optimizer cycle, else a line naming the newest) and returns the
        exit code; else None."""
        if self.stop is None or not self.stop.agreed():
            return None
        checkpointer = self.checkpointer
        if checkpointer is not None and step > checkpointer.last_saved:
            if checkpointer.can_save_at(step):
                synchronize(state.device)
                checkpointer.save(state, step, self.clock.ms(), self.tokens_seen, self.log)
            else:
                newest = (f"the newest is step {checkpointer.last_saved}" if checkpointer.last_saved
                          else "none was saved")
                self.log.line(f"checkpoint: none at step {step} (Adam holds gradients of an unfinished "
                              f"ADAM_STEP_EVERY={state.hp.adam_step_every} cycle); {newest}")
        return self.stop.end_run(self.log, step, self.last_finite)

    def save_if_due(self, state: TrainState, step: int) -> None:
        """The CHECKPOINT_EVERY and final checkpoints, with the clock paused (saving is not train time)."""
        if self.checkpointer is not None and self.checkpointer.due(step):
            with self.clock.paused() as train_ms:
                self.checkpointer.save(state, step, train_ms, self.tokens_seen, self.log)


def train(state: TrainState, log: RunLog, stop: StopSignal | None = None, checkpointer: Checkpointer | None = None
          ) -> int:
    """The speedrun loop: validate at step 0, every val_every steps and at the end; train_time excludes
    validation. Every step writes #48's step line; every train_log_every steps the loss is read (the only host
    sync of a step). Returns the exit code (1 when the loss stops being finite, 2 on a bad train shard,
    128 + signal when `stop` was signalled)."""
    hp, steps = state.hp, state.hp.num_iterations
    if state.diagnostics is None and hp.diagnostics and rank() == 0:  # a resumed run has its saved one
        state.diagnostics = Diagnostics(state.model, hp)
    state.graphs_compiled = compiled_graphs()
    run, val_loss = LoopRun(state, log, stop, checkpointer), float("nan")
    for step in range(state.start_step, steps + 1):
        state.current_step = step
        if (code := run.stop_here(state, step)) is not None:
            return code
        run.save_if_due(state, step)
        if step == steps:
            state.model.set_final_windows(hp.final_window)
        else:  # as #48: a validation sees this step's training window
            state.model.set_training_window(schedule_phase(step, hp)[1])
        if validates_at(step, hp) or (state.diagnostics is not None and diagnoses_at(step, hp)):
            with run.clock.paused() as train_ms:  # neither counts as train time
                measured = validate_and_diagnose(state, log, step, train_ms)
            if measured is not None:
                val_loss = measured
                if not math.isfinite(val_loss):
                    return stop_nonfinite(log, step, "val_loss", run.last_finite)
        if step == steps:
            break
        try:
            loss = train_step(state, step)
        except ShardError as error:  # a train shard the loader read in the background
            return stop_on_data_error(log, step, error, run.last_finite)
        run.tokens_seen += schedule_phase(step, hp)[0]
        reads_loss = (step + 1) % hp.train_log_every == 0 or step + 1 == steps
        train_loss, momo_scale = read_logged_values(loss, stop, state.momo) if reads_loss else (None, None)
        if train_loss is not None and not math.isfinite(train_loss):
            return stop_nonfinite(log, step + 1, "train_loss", run.last_finite)
        run.last_finite = train_loss if train_loss is not None else run.last_finite
        log_step(log, step + 1, steps, run.clock.ms(), run.tokens_seen, train_loss, momo_scale)
    log.line(peak_memory_line(state.device))
    train_ms = run.clock.banked_ms  # paused at the final validation
    log.line("final: " + json.dumps({"val_loss": round(val_loss, 6), "step": steps, "num_iterations": steps,
                                     "train_time_ms": round(train_ms, 1), "step_avg_ms": round(train_ms / steps, 2),
                                     "tokens": run.tokens_seen, "status": "complete"}))
    return 0


# ---- main ----


def setup(hp: Hyperparameters, launch: Launch, device: torch.device) -> TrainState:
    """Builds the model, optimizers and data; every data error surfaces here, before any training."""
    geometry = batch_geometry(hp, launch.world_size)
    train_files = find_shards(hp.train_files, "TRAIN_FILES")
    val_files = find_shards(hp.val_files, "VAL_FILES")
    check_shard_sizes(hp, geometry, train_files, val_files)
    val_sequences = load_val_sequences(val_files, hp.val_tokens, geometry.chunk_tokens(hp.val_batch_tokens),
                                       hp.vocab_size, launch.rank, launch.world_size).to(device)
    loader = PackedLoader(train_files, hp.vocab_size, hp.max_seq_len, launch.rank, launch.world_size,
                          pin_memory=device.type == "cuda", bos_id=hp.bos_id, data_seed=hp.data_seed)
    if hp.compile:
        raise_recompile_limit()
    attention_kernel(hp.attention, device).prepare(device)
    torch.manual_seed(hp.seed)
    embed_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = GPT(model_config(hp, launch.world_size), embed_dtype, geometry.accum_steps).to(device)
    optimizers = build_optimizers(model, hp)
    step_model = torch.compile(model, dynamic=False, fullgraph=True) if hp.compile else model
    momo = Momo(hp.momo_lb, hp.momo_beta) if hp.momo else None
    return TrainState(hp, model, step_model, optimizers, loader, val_sequences, geometry, device, momo)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 finished, 1 the loss stopped being finite, 2 a bad flag, launch, path or shard (one line on
    stderr; before any work, or a `stopped:` line for a shard read later), 128 + signal when SIGINT/SIGTERM stopped
    it. `--check` checks the env flags and LOG_DIR, then exits (run.sh runs it before it fetches any data)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(__doc__ + "\n" + help_text())
        return 0
    if argv not in ([], ["--check"]):
        bad = argv[0] if argv[0] not in ("-h", "--help", "--check") else argv[1]
        print(f"error: {bad}: not an argument of train_gpt.py; its flags are env vars (NORM=derf python train_gpt.py), "
              f"listed by --help; --check checks them and exits", file=sys.stderr)
        return 2
    stop = StopSignal()
    try:
        hp, launch = parse_env(os.environ)
        if launch.rank == 0:
            check_log_dir(hp.log_dir)
        if argv == ["--check"]:
            resolve_auto(hp, pick_device(launch))
            return 0
        device = init_distributed(launch, hp.dist_timeout)
        stop.install()
        hp = resolve_auto(hp, device)
        resume_from = find_checkpoint(hp.resume) if hp.resume else None
        if resume_from is not None:  # every checkpoint input is checked here, before any work
            resume_meta = read_checkpoint_meta(resume_from)
            check_checkpoint_files(resume_from)
        name = agreed_run_name(hp)
        folder = checkpoint_folder(hp, resume_from, name) if hp.save_checkpoint else None
        if folder is not None:
            probe_checkpoint_folder(folder, hp)
        state = setup(hp, launch, device)
        if resume_from is not None:
            check_resume(resume_from, resume_meta, hp, state.loader.files)
    except (ConfigError, ShardError) as error:
        print(f"error: {error}", file=sys.stderr)
        stop.restore()
        close_distributed()
        return 2
    log = RunLog(hp, launch, device, name)
    try:
        if hp.warmup:
            warmup(state)
        if resume_from is not None:  # after warmup, which puts the initial state back when it is done
            t0 = time.perf_counter()
            try:
                state.start_step, state.start_train_ms, state.start_tokens = load_checkpoint(state, resume_from)
            except (Exception, checkpoint_exception()) as error:  # a damaged file, a missing key, a crafted pickle
                print(f"error: RESUME={hp.resume}: cannot load {resume_from}: {type(error).__name__}: "
                      f"{str(error)[:2000]}", file=sys.stderr)
                log.stopped(f"resume failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}",
                            resume_meta["step"], float("nan"))
                return 2
            log.line("resumed: " + json.dumps({"from_log": resume_meta["log"], "checkpoint": str(resume_from),
                                               "step": state.start_step, "load_s": round(time.perf_counter() - t0, 3)}))
        checkpointer = Checkpointer(hp, folder, state.start_step) if folder is not None else None
        return train(state, log, stop, checkpointer)
    except ShardError as error:  # a train shard read in the background during warmup
        return stop_on_data_error(log, 0, error, float("nan"))
    except (Exception, checkpoint_exception()) as error:
        # e.g. a collective that failed because another rank died or hung past DIST_TIMEOUT (gloo), or a checkpoint
        # that could not be written: the log says why it ended; the traceback follows on stderr, and torchrun ends
        # the other ranks
        log.stopped(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500],
                    state.current_step, float("nan"))
        raise
    finally:
        log.close()
        stop.restore()
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
