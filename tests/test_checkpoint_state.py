"""Checkpoint promises pinned one by one: every piece of state a resume restores, every setting a resume refuses,
the checkpoint RESUME picks in a folder, and the steps where a checkpoint may be saved.

The bit-for-bit resume runs of test_checkpoint.py compare loss lines and final tensors. A piece of state slips past
them when the run happens not to read it after the resume point (no random draw after setup, Adam stepping every
step, one checkpoint in the folder), so here each piece is compared on its own, in process: a `test`-preset state
trained a few steps, saved, and loaded into a fresh state built by the same setup."""

import dataclasses
import typing
from pathlib import Path

import pytest
import torch

import train_gpt as T
from conftest import BOS, preset_env, synthetic_tokens, write_test_shard

# ---- the checkpoint entry points under test, in one place: a rename in train_gpt.py is an edit here ----

CPU = torch.device("cpu")


def build_state(env: dict[str, str]) -> T.TrainState:
    """What main() builds before it loads a checkpoint: the model, optimizers, Momo and loader of `env`."""
    hp, launch = T.parse_env(env, cuda_available=False)
    return T.setup(T.resolve_auto(hp, CPU), launch, CPU)


def save(state: T.TrainState, step: int, train_ms: float, tokens: int, folder: Path) -> Path:
    """SAVE_CHECKPOINT's save of `state` at `step` into `folder`; returns the step folder it wrote."""
    log = T.RunLog(state.hp, T.Launch(), CPU, f"saved_at_{step}")
    try:
        T.Checkpointer(state.hp, folder, 0).save(state, step, train_ms, tokens, log)
    finally:
        log.close()
    (path,) = folder.iterdir()
    return path


def load(state: T.TrainState, path: Path) -> dict[str, object]:
    """RESUME's load of `path` into `state`; returns where the loop goes on: step, train time, tokens seen."""
    step, train_ms, tokens = T.load_checkpoint(state, path)
    return {"step": step, "train_ms": train_ms, "tokens": tokens}


def pick_checkpoint(resume: Path) -> Path:
    """The step folder RESUME=resume loads."""
    return T.find_checkpoint(str(resume))


def check_resume(meta: dict, hp: T.Hyperparameters, train_files: list[str]) -> None:
    """ConfigError unless a run of `hp` on `train_files` may continue the checkpoint described by `meta`."""
    T.check_resume(Path("checkpoints/step_000004"), meta, hp, train_files)


def checkpoint_meta(hp: T.Hyperparameters, train_files: list[str]) -> dict:
    """The meta.json of a checkpoint written by a world-1 run of `hp` on `train_files` (the keys check_resume reads)."""
    return {"step": 4, "world_size": 1, "config": T.hp_as_dict(hp), "log": "the_run",
            "train_shards": [Path(f).name for f in train_files]}


def may_save_on_stop(hp: T.Hyperparameters, last_saved: int, step: int) -> bool:
    """Whether a SIGINT/SIGTERM before training step `step` saves a checkpoint (newest one at `last_saved`)."""
    return T.Checkpointer(hp, Path("unused"), last_saved).can_save_at(step)


def saves_periodically(hp: T.Hyperparameters, last_saved: int, step: int) -> bool:
    """Whether the loop saves a checkpoint (CHECKPOINT_EVERY, the end) before training step `step`."""
    return T.Checkpointer(hp, Path("unused"), last_saved).due(step)


def valid_for_field(f: dataclasses.Field, value: object) -> bool:
    """Whether `value` passes the field's own rule (its choices and check), as an env override must."""
    try:
        T._check_field(f, value)
    except T.ConfigError:
        return False
    return True


def write_step_folder(folder: Path, step: int, finished: bool = True) -> Path:
    """A step folder as SAVE_CHECKPOINT=1 names it; finished: with its meta.json, written last by a save."""
    path = folder / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"")
    if finished:
        (path / T.CHECKPOINT_META).write_text("{}")
    return path


# ---- every piece of state a resume restores ----

SAVE_AT = 6  # training steps before the checkpoint: past the window change at step 4, and into the second shard
TRAIN_MS = 1234.5
COMMON = dict(NUM_ITERATIONS=8, BATCH_SCHEDULE="64,128", LONG_WINDOWS="1,2", SAVE_CHECKPOINT=1)
CASES = {
    # NorMuon (its second moments), DistAdam stepping every 2nd step (its step count), NORM=derf_ema's running
    # scales (a model buffer), and the diagnostics' power-iteration vectors, update RMS and generator
    "normuon": dict(ADAM_STEP_EVERY=2, NORM="derf_ema", DIAGNOSTICS=1, DIAG_EVERY=2),
    "muon": dict(OPTIMIZER="muon"),  # NorMuon's momentum without the second moment
    "muonmax_momo": dict(OPTIMIZER="muonmax", MOMO=1),  # MuonMax's momentum; Momo's averages and directions
    "adamw": dict(OPTIMIZER="adamw"),  # DistAdam for the matrices too
}
PIECES = {  # {test id: what it is}
    "rng": "the CPU RNG (the next draw)",
    "model": "the model's parameters and buffers",
    "rotary": "the rotary/YaRN tables and the attention windows",
    "matrix_optimizer": "the matrix optimizer's state",
    "adam": "DistAdam's state",
    "momo": "Momo's averages and directions",
    "diagnostics": "the diagnostics' vectors, update RMS and generator (and the next diag record)",
    "val_loss": "the validation loss (every piece the forward reads)",
    "loader": "the loader's position (and the next batch)",
    "progress": "the step, train time and tokens seen",
}
ONLY_WITH = {"momo": "MOMO", "diagnostics": "DIAGNOSTICS"}  # pieces that a case has only with this flag
MATRIX_OPTIMIZER = {"normuon": "NorMuon", "muon": "NorMuon", "muonmax_momo": "MuonMax", "adamw": "DistAdam"}


def clone(value: object) -> object:
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone(v) for v in value)
    return value


def diag_batch(state: T.TrainState) -> torch.Tensor:
    """The validation tokens a diag line is collected on (as train() picks them)."""
    return state.val_sequences[0][:state.geometry.chunk_tokens(state.hp.batch_schedule[0]) + 1]


def observe(state: T.TrainState) -> dict[str, dict[str, object]]:
    """{piece: {key: value}}: each owner's state, and what the next steps read from it (the next random draw, the
    validation loss, the next diag record, the next batch). Draws from the RNG and the loader: call it once, right
    after a save or a load."""
    out = {"rng": {"next draw": torch.rand(8)}}
    model = state.model
    out["model"] = clone(model.state_dict())
    rotary = model.rotary
    out["rotary"] = clone({
        "freqs": rotary.freqs, "scale_factor": rotary.scale_factor, "window": rotary.window, "cos": rotary.cos,
        "sin": rotary.sin, "model windows": model.windows})
    names = {p: name for name, p in model.named_parameters()}
    matrices, adam = state.optimizers
    for piece, optimizer in (("matrix_optimizer", matrices), ("adam", adam)):
        out[piece] = clone({f"{names[p]}/{key}": value for p, param_state in optimizer.state.items()
                            for key, value in param_state.items()})
    momo = state.momo
    out["momo"] = {} if momo is None else clone({
        "steps": momo.steps, "loss_avg": momo.loss_avg, "gamma": momo.gamma,
        **{f"direction/{key}": value for key, value in momo.directions.items()}})
    diagnostics = state.diagnostics
    out["diagnostics"] = {} if diagnostics is None else {
        "state()": clone(diagnostics.state()), "power-iteration vectors": clone(diagnostics.vectors),
        "update RMS": clone(diagnostics.update_rms), "generator": diagnostics.generator.get_state(),
        "next diag record": diagnostics.collect(SAVE_AT, diag_batch(state))}
    out["val_loss"] = {"val_loss": T.evaluate(state)}
    out["loader"] = {"shard": state.loader.shard, "document": state.loader.document}
    chunks = state.loader.next_step(state.geometry.chunk_tokens(T.schedule_phase(SAVE_AT, state.hp)[0]),
                                    state.geometry.accum_steps)
    out["loader"].update({f"next chunk {i}": chunk for i, chunk in enumerate(chunks)})
    return out


def same(a: object, b: object) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and bool(torch.equal(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def differences(expected: dict[str, object], found: dict[str, object]) -> list[str]:
    """The keys of `expected` that `found` lacks, has in excess or holds another value under."""
    missing = [f"{key} missing" for key in expected if key not in found]
    extra = [f"{key} unexpected" for key in found if key not in expected]
    differ = [f"{key} differs" for key in expected if key in found and not same(expected[key], found[key])]
    return missing + extra + differ


SMALL_VOCAB = dict(VOCAB_SIZE=512, BOS_ID=500)  # the shards' ids: a 512-row embedding, ten times faster than 50304


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Three short train shards (a run reaches the second by step SAVE_AT, so the shard index is state) and a val
    shard, of ids below 500 with BOS 500 (SMALL_VOCAB)."""
    data = tmp_path_factory.mktemp("state_shards")
    for name, count, seed in (("train_000000.bin", 1500, 10), ("train_000001.bin", 1500, 11),
                              ("train_000002.bin", 1500, 12), ("val_000000.bin", 2000, 3)):
        tokens = synthetic_tokens(count, seed=seed, vocab=SMALL_VOCAB["BOS_ID"])
        tokens[tokens == BOS] = SMALL_VOCAB["BOS_ID"]
        write_test_shard(data / name, tokens)
    return data


def state_env(shards: Path, root: Path, **extra: object) -> dict[str, str]:
    """The env of a `test`-preset run on `shards` with SMALL_VOCAB and `extra`, logging into root/logs."""
    return {**preset_env(shards, root / "logs"), **{k: str(v) for k, v in {**SMALL_VOCAB, **extra}.items()}}


@pytest.fixture(scope="module")
def round_trips(shards, tmp_path_factory):
    """round_trips(case) -> {"saved", "fresh", "restored"}: observe() of the CASES[case] state at SAVE_AT right
    after its save, of a fresh state of the same setup, and of another fresh state after loading the checkpoint.
    Each case runs once per module."""
    done: dict[str, dict] = {}

    def trip(case: str) -> dict:
        if case in done:
            return done[case]
        root = tmp_path_factory.mktemp(case)
        env = state_env(shards, root, **COMMON, **CASES[case])
        threads, rng = torch.get_num_threads(), torch.get_rng_state()
        torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1): the CPUs are shared
        try:
            state = build_state(env)
            assert type(state.optimizers[0]).__name__ == MATRIX_OPTIMIZER[case]
            if state.hp.diagnostics:  # as train() makes it
                state.diagnostics = T.Diagnostics(state.model, state.hp)
            tokens = 0
            for step in range(SAVE_AT):
                if state.diagnostics is not None and T.diagnoses_at(step, state.hp):
                    state.diagnostics.collect(step, diag_batch(state))
                T.train_step(state, step)
                tokens += T.schedule_phase(step, state.hp)[0]
            assert state.loader.shard > 0, "the run should be past its first train shard when it saves"
            assert state.model.rotary.window > state.hp.long_windows[0], "the window should have grown (YaRN)"
            # training draws no random numbers: a run that did leaves the RNG where setup does not put it
            torch.manual_seed(1234)
            path = save(state, SAVE_AT, TRAIN_MS, tokens, root / "checkpoints")
            saved = {**observe(state), "progress": {"step": SAVE_AT, "train_ms": TRAIN_MS, "tokens": tokens}}
            fresh_state = build_state(env)
            fresh = {**observe(fresh_state), "progress": {
                "step": fresh_state.start_step, "train_ms": fresh_state.start_train_ms,
                "tokens": fresh_state.start_tokens}}
            resumed_state = build_state(env)
            progress = load(resumed_state, path)
            restored = {**observe(resumed_state), "progress": progress}
        finally:
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)  # the other tests' RNG as it was
        done[case] = {"saved": saved, "fresh": fresh, "restored": restored}
        return done[case]

    return trip


@pytest.mark.parametrize("case, piece", [(case, piece) for case in CASES for piece in PIECES
                                         if ONLY_WITH.get(piece, "") in ("", *CASES[case])])
def test_a_resume_restores_every_piece_of_state(round_trips, case, piece):
    """Each piece compared on its own: a piece the checkpoint drops fails here under its own name, whether or not
    the rest of the run would have noticed."""
    trip = round_trips(case)
    saved, fresh, restored = trip["saved"][piece], trip["fresh"][piece], trip["restored"][piece]
    what = f"{case}: {PIECES[piece]}"
    assert differences(saved, fresh), (f"{what}: a fresh state already holds what step {SAVE_AT} holds, so this "
                                       f"round trip cannot tell whether the checkpoint restores it")
    assert differences(saved, restored) == [], f"{what}: not restored by the checkpoint"


@pytest.mark.parametrize("case", ["normuon", "muonmax_momo"])
def test_each_owner_restores_itself_from_its_own_state(shards, tmp_path, case):
    """Each owner's load_state(state()) on its own, no checkpoint file between (the loop above goes through
    checkpoint_state and torch.distributed.checkpoint): what an owner's state() leaves out, or its load_state() does
    not put back, fails here under the owner's name."""
    env = state_env(shards, tmp_path, **COMMON, **CASES[case])
    threads, rng_before = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    try:
        trained, fresh = build_state(env), build_state(env)
        for step in range(SAVE_AT):
            T.train_step(trained, step)
        if trained.hp.diagnostics:
            trained.diagnostics, fresh.diagnostics = T.Diagnostics(trained.model, trained.hp), T.Diagnostics(
                fresh.model, fresh.hp)
            trained.diagnostics.collect(SAVE_AT, diag_batch(trained))
        names = {p: name for name, p in trained.model.named_parameters()}
        fresh_params = dict(fresh.model.named_parameters())
        owners = {"rotary": (trained.model.rotary, fresh.model.rotary), "loader": (trained.loader, fresh.loader)}
        if trained.momo is not None:
            owners["momo"] = (trained.momo, fresh.momo)
        if trained.diagnostics is not None:
            owners["diagnostics"] = (trained.diagnostics, fresh.diagnostics)
        for name, (source, target) in owners.items():
            saved = source.state()
            if name == "momo":
                target.load_state(saved, CPU)  # Momo keeps no device of its own
            else:
                target.load_state(saved)
            assert differences(clone(saved), clone(target.state())) == [], f"{case}: {name}"
        chunk_tokens = trained.geometry.chunk_tokens(T.schedule_phase(SAVE_AT, trained.hp)[0])
        assert same(trained.loader.next_step(chunk_tokens, 1), fresh.loader.next_step(chunk_tokens, 1)), "loader"
        rotary, restored = trained.model.rotary, fresh.model.rotary
        assert same([rotary.cos, rotary.sin], [restored.cos, restored.sin]), "rotary: the tables are not refilled"
        for i, (source, target) in enumerate(zip(trained.optimizers, fresh.optimizers)):
            target.load_saved_state(source.saved_state(names), fresh_params)
            fresh_names = {p: name for name, p in fresh_params.items()}
            assert differences(source.saved_state(names), target.saved_state(fresh_names)) == [], f"optimizer {i}"
            assert target.state, f"optimizer {i}: nothing was restored"
        torch.manual_seed(7)
        rng = T.rng_state(CPU)
        expected = torch.rand(4)
        torch.manual_seed(8)
        T.load_rng_state(rng, CPU)
        assert torch.equal(torch.rand(4), expected), "rng"
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng_before)  # the other tests' RNG as it was


# ---- every setting a resume refuses ----

# The settings a resumed run may change: where things go, how often they are logged or saved. Written out here (not
# read from train_gpt.RESUMABLE_KEYS) so that adding a key there is a change a test notices.
RESUMABLE = {"log_dir", "run_tag", "train_files", "val_files", "train_log_every", "diagnostics", "diag_every",
             "warmup", "save_checkpoint", "checkpoint_every", "checkpoint_dir", "checkpoint_keep", "resume",
             "dist_timeout"}
FIELDS = {f.name: f for f in dataclasses.fields(T.Hyperparameters)}
HINTS = typing.get_type_hints(T.Hyperparameters)
TRAIN_FILES = ["data/train_000000.bin", "data/train_000001.bin"]


def another_valid_value(name: str, value: object) -> object:
    """A value of the field other than `value` that its own rule accepts: one a user could set by env."""
    kind, choices = HINTS[name], FIELDS[name].metadata.get("choices")
    if choices:
        candidates = list(choices)
    elif kind is bool:
        candidates = [not value]
    elif kind == (bool | None):
        candidates = [True, False, None]
    elif kind is int:
        candidates = [value + 1, value + 4, value * 2]
    elif kind is float:
        candidates = [value / 2, value + 0.5, value + 1.0]
    elif kind is str:
        candidates = [value + "_other"]
    else:  # a tuple of numbers
        last = value[-1] if value else 0
        candidates = [value + (last,), value + ((last + 1) / 2,), value[:-1], (1,)]
    for candidate in candidates:
        if candidate != value and valid_for_field(FIELDS[name], candidate):
            return candidate
    raise AssertionError(f"no other valid value of {name} from {value!r}: extend another_valid_value")


@pytest.fixture(scope="module")
def checkpoint_hp() -> T.Hyperparameters:
    return T.parse_env({"PRESET": "test", "TRAIN_FILES": "data/train_*.bin", "VAL_FILES": "data/val_*.bin"},
                       cuda_available=False)[0]


def test_the_resumable_settings_are_where_things_go_and_how_often():
    assert set(T.RESUMABLE_KEYS) == RESUMABLE
    assert RESUMABLE <= set(FIELDS)


@pytest.mark.parametrize("name", sorted(set(FIELDS) - RESUMABLE))
def test_resume_refuses_every_other_setting_changed(checkpoint_hp, name):
    changed = dataclasses.replace(checkpoint_hp, **{name: another_valid_value(name, getattr(checkpoint_hp, name))})
    with pytest.raises(T.ConfigError) as error:
        check_resume(checkpoint_meta(checkpoint_hp, TRAIN_FILES), changed, TRAIN_FILES)
    assert f"differs in {name.upper()}=" in str(error.value) and "in the checkpoint" in str(error.value)


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_resume_accepts_each_resumable_setting_changed(checkpoint_hp, name):
    changed = dataclasses.replace(checkpoint_hp, **{name: another_valid_value(name, getattr(checkpoint_hp, name))})
    check_resume(checkpoint_meta(checkpoint_hp, TRAIN_FILES), changed, TRAIN_FILES)


def test_resume_accepts_every_resumable_setting_changed_at_once(checkpoint_hp):
    changed = dataclasses.replace(checkpoint_hp, **{name: another_valid_value(name, getattr(checkpoint_hp, name))
                                                    for name in RESUMABLE})
    check_resume(checkpoint_meta(checkpoint_hp, TRAIN_FILES), changed, TRAIN_FILES)


def test_resume_refuses_a_setting_only_one_side_knows(checkpoint_hp):
    """A checkpoint of another version of the trainer: a flag it had that this one lacks, or the other way."""
    meta = checkpoint_meta(checkpoint_hp, TRAIN_FILES)
    meta["config"]["retired_flag"] = 1
    with pytest.raises(T.ConfigError, match=r"RETIRED_FLAG=1 in the checkpoint, \(absent\) now"):
        check_resume(meta, checkpoint_hp, TRAIN_FILES)
    meta = checkpoint_meta(checkpoint_hp, TRAIN_FILES)
    del meta["config"]["momo_beta"]
    with pytest.raises(T.ConfigError, match=r"MOMO_BETA=\(absent\) in the checkpoint, 0.9 now"):
        check_resume(meta, checkpoint_hp, TRAIN_FILES)


def test_a_checkpoint_from_before_a_flag_existed_resumes_as_that_flags_old_behaviour(checkpoint_hp):
    """A checkpoint written before DATA_SEED, ADAMW_MATRIX_WD, ADAM_BIAS_CORRECTION and ATTENTION existed ran as -1,
    0.0, True and the device's auto kernel: a run with those values resumes it, one with another value is refused."""
    resolved = T.resolve_auto(checkpoint_hp, torch.device("cpu"))  # as main() has it, and as a run saves it
    assert resolved.attention == "dense" and not torch.cuda.is_available()
    meta = checkpoint_meta(resolved, TRAIN_FILES)
    for key in ("data_seed", "adamw_matrix_wd", "adam_bias_correction", "attention"):
        del meta["config"][key]
    check_resume(meta, resolved, TRAIN_FILES)
    with pytest.raises(T.ConfigError, match=r"DATA_SEED=-1 in the checkpoint, 3 now"):
        check_resume(meta, dataclasses.replace(resolved, data_seed=3), TRAIN_FILES)


def test_resume_refuses_another_world_size_or_other_shards(checkpoint_hp):
    meta = {**checkpoint_meta(checkpoint_hp, TRAIN_FILES), "world_size": 2}
    with pytest.raises(T.ConfigError, match=r"written by 2 rank\(s\), this run has 1"):
        check_resume(meta, checkpoint_hp, TRAIN_FILES)
    meta = checkpoint_meta(checkpoint_hp, TRAIN_FILES)
    for other in (TRAIN_FILES[:1], TRAIN_FILES[::-1], TRAIN_FILES + ["data/train_000002.bin"]):
        with pytest.raises(T.ConfigError, match="point TRAIN_FILES at the same shards"):
            check_resume(meta, checkpoint_hp, other)
    check_resume(meta, checkpoint_hp, ["elsewhere/" + Path(f).name for f in TRAIN_FILES])  # the names count


# ---- the checkpoint RESUME picks in a folder ----

def test_resume_picks_the_newest_finished_checkpoint_of_a_folder(tmp_path):
    # made out of order (neither creation order nor mtime is the step order); step 8 and step 12 were cut off
    # while saving (no meta.json), step 12 after every finished one
    for step, finished in ((10, True), (2, True), (12, False), (4, True), (8, False)):
        write_step_folder(tmp_path, step, finished)
    assert pick_checkpoint(tmp_path) == tmp_path / "step_000010"
    assert pick_checkpoint(tmp_path / "step_000004") == tmp_path / "step_000004"  # a step folder is itself
    with pytest.raises(T.ConfigError, match="an incomplete checkpoint"):
        pick_checkpoint(tmp_path / "step_000012")


def test_resume_picks_the_newest_checkpoint_past_a_million_steps(tmp_path):
    """Step folders sort by number: by name, step_1000000 came before step_999998 (RESUME took an older checkpoint
    and CHECKPOINT_KEEP pruned the newest)."""
    for step in (999_998, 1_000_000):
        write_step_folder(tmp_path, step)
    assert pick_checkpoint(tmp_path) == tmp_path / "step_1000000"


# ---- the steps where a checkpoint may be saved: never inside an ADAM_STEP_EVERY cycle ----

def stop_hp(adam_step_every: int, num_iterations: int) -> T.Hyperparameters:
    return T.parse_env({"PRESET": "test", "SAVE_CHECKPOINT": "1", "ADAM_STEP_EVERY": str(adam_step_every),
                        "NUM_ITERATIONS": str(num_iterations)}, cuda_available=False)[0]


# (ADAM_STEP_EVERY, NUM_ITERATIONS, the steps after which Adam holds no unapplied gradient): Adam steps after every
# ADAM_STEP_EVERY-th training step and after the last one, so a checkpoint before training step s is whole when s
# is a multiple of ADAM_STEP_EVERY or the end
ADAM_CYCLES = [(2, 7, [2, 4, 6, 7]), (2, 8, [2, 4, 6, 8]), (3, 8, [3, 6, 8]), (1, 4, [1, 2, 3, 4])]
CYCLE_IDS = [f"adam_every_{every}_of_{steps}" for every, steps, _ in ADAM_CYCLES]


@pytest.mark.parametrize("adam_step_every, num_iterations, whole", ADAM_CYCLES, ids=CYCLE_IDS)
def test_a_stop_saves_only_where_adam_has_just_stepped(adam_step_every, num_iterations, whole):
    hp = stop_hp(adam_step_every, num_iterations)
    assert [s for s in range(num_iterations + 1) if may_save_on_stop(hp, 0, s)] == whole
    # resumed at the first whole step: nothing until the next one (that checkpoint exists already)
    resumed_at = whole[0]
    assert [s for s in range(num_iterations + 1) if may_save_on_stop(hp, resumed_at, s)] == whole[1:]


@pytest.mark.parametrize("adam_step_every, num_iterations, whole", ADAM_CYCLES, ids=CYCLE_IDS)
def test_periodic_checkpoints_fall_only_where_adam_has_just_stepped(adam_step_every, num_iterations, whole):
    """Every CHECKPOINT_EVERY the flag check lets through saves only at whole steps; the others are refused."""
    for every in range(num_iterations + 2):
        hp = dataclasses.replace(stop_hp(adam_step_every, num_iterations), checkpoint_every=every)
        try:
            T.check_consistency(hp, 1)
        except T.ConfigError as error:
            assert every % adam_step_every and "CHECKPOINT_EVERY" in str(error)
            continue
        due = [s for s in range(num_iterations + 1) if saves_periodically(hp, 0, s)]
        assert set(due) <= set(whole) and num_iterations in due, (every, due)
        assert not saves_periodically(hp, num_iterations, num_iterations)  # never twice at one step


def test_whole_steps_are_where_adam_holds_no_gradient(shards, tmp_path):
    """The rule of the two tests above, held against the loop itself: after each training step of an
    ADAM_STEP_EVERY=2 run, a stop may save exactly when no Adam parameter holds an accumulated gradient."""
    adam_step_every, num_iterations, whole = ADAM_CYCLES[0]
    env = state_env(shards, tmp_path, ADAM_STEP_EVERY=adam_step_every, NUM_ITERATIONS=num_iterations,
                    SAVE_CHECKPOINT=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = build_state(env)
        adam = state.optimizers[1]
        adam_params = [p for group in adam.param_groups for p in group["params"]]
        holds_no_gradient = []
        for step in range(num_iterations):
            T.train_step(state, step)
            holds_no_gradient.append(all(p.grad is None for p in adam_params))
    finally:
        torch.set_num_threads(threads)
    assert [s + 1 for s, clean in enumerate(holds_no_gradient) if clean] == whole
    assert [s for s in range(1, num_iterations + 1) if may_save_on_stop(state.hp, 0, s)] == whole


# ---- round trips at awkward points: Momo after its first step, the loader in a later shard ----

def momo_state(momo: T.Momo) -> dict[str, object]:
    return clone({"steps": momo.steps, "loss_avg": momo.loss_avg, "gamma": momo.gamma, "last_scale": momo.last_scale,
                  **{f"direction/{key}": value for key, value in momo.directions.items()}})


def test_momo_saved_right_after_its_first_step_resumes_as_if_never_stopped(shards, tmp_path):
    """After one step Momo's averages are device tensors (before it, Python zeros): saved at step 1 and loaded
    into a fresh state, they come back, and the next step takes the same truncation as the uninterrupted state."""
    env = state_env(shards, tmp_path, **COMMON, OPTIMIZER="muonmax", MOMO=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = build_state(env)
        T.train_step(trained, 0)
        saved = momo_state(trained.momo)
        assert saved["steps"] == 1 and torch.is_tensor(saved["loss_avg"]) and saved["loss_avg"] != 0
        path = save(trained, 1, TRAIN_MS, 0, tmp_path / "checkpoints")
        restored = build_state(env)
        load(restored, path)
        assert differences({k: v for k, v in saved.items() if k != "last_scale"},
                           {k: v for k, v in momo_state(restored.momo).items() if k != "last_scale"}) == []
        T.train_step(trained, 1)
        T.train_step(restored, 1)
        assert differences(momo_state(trained.momo), momo_state(restored.momo)) == []
    finally:
        torch.set_num_threads(threads)


def test_a_loader_restored_into_a_later_shard_crosses_into_the_next_one_with_the_right_tokens(shards):
    """A loader restored at a document of shard 1 (not the first shard, whose successor a fresh loader has already
    prefetched) walks on into shard 2 chunk for chunk as the loader it was saved from, and the first chunk there
    starts with shard 2's first document."""
    files = sorted(str(path) for path in shards.glob("train_*.bin"))
    vocab, bos = SMALL_VOCAB["VOCAB_SIZE"], SMALL_VOCAB["BOS_ID"]
    walked = T.PackedLoader(files, vocab, 48, 0, 1, bos_id=bos)
    chunk_tokens = 63
    while walked.shard == 0:
        walked.next_step(chunk_tokens, 1)
    walked.next_step(chunk_tokens, 1)  # a document inside shard 1, not its first
    assert walked.shard == 1 and walked.document > 0
    restored = T.PackedLoader(files, vocab, 48, 0, 1, bos_id=bos)
    restored.load_state(clone(walked.state()))
    crossed = False
    while not crossed:
        expected, found = walked.next_step(chunk_tokens, 1), restored.next_step(chunk_tokens, 1)
        assert same(expected, found) and restored.shard == walked.shard
        crossed = walked.shard == 2
    third = T.read_shard(files[2], vocab)
    first_document = int((third == bos).nonzero()[0][0])
    assert torch.equal(found[0][:10], torch.from_numpy(third[first_document:first_document + 10].astype("int32")))
