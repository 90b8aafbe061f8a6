"""Setup and every bad input refused before work: run.sh's choice of Python (with a stand-in python3, no network),
its help, shard sizes that the headers tell, a bad shard met during training, signals, and world-size-2 launches."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as T
from conftest import signal_everywhere, synthetic_tokens, write_test_shard

REPO = Path(T.__file__).resolve().parent

# ---- run.sh with a stand-in python3 ----

# A python3 that logs every call and answers run.sh's probes from FAKE_* variables: a distribution's Python
# (EXTERNALLY-MANAGED, pip visible or not, ensurepip or not) or, copied into .venv/bin by `-m venv`, a venv's.
FAKE_PYTHON = '''#!{python}
import json, os, sys
from pathlib import Path

me = Path(sys.argv[0]).absolute()
role = "venv" if me.parent.parent.name == ".venv" else "system"
state = Path(os.environ["FAKE_STATE"])
args = sys.argv[1:]
flag = lambda name: os.environ.get(name) == "1"
with open(state / "calls.log", "a") as log:
    log.write(role + " " + " ".join(args) + "\\n")
system_site = role == "system" or "include-system-site-packages = true" in (me.parent.parent / "pyvenv.cfg").read_text()
modules = set(filter(None, os.environ.get("FAKE_SYSTEM_MODULES", "").split(","))) if system_site else set()
if (state / (role + "-installed")).exists():
    modules |= {{"torch", "numpy", "tiktoken", "huggingface_hub", "scipy", "pytest", "matplotlib"}}
code = args[1] if args[:1] == ["-c"] else None
if code is not None and "EXTERNALLY-MANAGED" in code:
    sys.exit(0 if role == "system" and flag("FAKE_EXTERNALLY_MANAGED") and not flag("FAKE_IN_VENV") else 1)
if code is not None and "base_prefix" in code:
    sys.exit(0 if role == "venv" or flag("FAKE_IN_VENV") else 1)
if code is not None and "version_info" in code:
    print(os.environ.get("FAKE_VERSION", "3.11.7"))
    sys.exit(0)
if code == "":
    sys.exit(0)
if code is not None and "device_count" in code:
    print(0)
    sys.exit(0)
if code is not None and code.startswith("import "):
    sys.exit(0 if {{name.strip() for name in code[7:].split(",")}} <= modules else 1)
if args[:1] == ["-"]:  # run.sh's torch version check, on stdin
    sys.stdin.read()
    sys.exit(0 if "torch" in modules else 1)
if args[:2] == ["-m", "venv"]:
    if flag("FAKE_NO_VENV"):
        sys.exit("Error: Command '-m venv' returned non-zero exit status 1 (no venv module)")
    target = Path(args[-1])
    (target / "bin").mkdir(parents=True)
    (target / "pyvenv.cfg").write_text(
        "include-system-site-packages = " + ("true" if "--system-site-packages" in args else "false") + "\\n")
    (target / "bin" / "python").write_text(me.read_text())
    (target / "bin" / "python").chmod(0o755)
    sys.exit(0)
if args[:3] == ["-m", "pip", "--version"]:
    sys.exit(0 if (flag("FAKE_SYSTEM_PIP") and system_site) or (state / (role + "-pip")).exists() else 1)
if args[:2] == ["-m", "ensurepip"]:
    if not flag("FAKE_ENSUREPIP"):
        sys.exit("No module named ensurepip")
    (state / (role + "-pip")).touch()
    sys.exit(0)
if args[:3] == ["-m", "pip", "install"]:
    if role == "system" and flag("FAKE_EXTERNALLY_MANAGED") and not flag("FAKE_IN_VENV"):
        sys.exit("error: externally-managed-environment")
    lines = Path(args[args.index("-r") + 1]).read_text().splitlines()
    wanted = [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
    with open(state / "calls.log", "a") as log:
        log.write(role + " installs: " + " ".join(wanted) + "\\n")
    (state / (role + "-installed")).touch()
    sys.exit(0)
if args[:2] == ["-m", "pytest"]:
    print("stand-in pytest ran", json.dumps(args[2:]))  # json: an argument with a space stays one argument
    sys.exit(0)
if args[:2] == ["train_gpt.py", "--help"]:
    print("stand-in train_gpt.py help: NUM_ITERATIONS ...")
    sys.exit(0)
if args[:2] == ["train_gpt.py", "--check"]:
    sys.exit(2 if flag("FAKE_BAD_FLAG") else 0)
print("stand-in python ran", *args)
'''


@pytest.fixture
def stand_in(tmp_path: Path):
    """A copy of run.sh and its requirement files in tmp_path/repo, and run(args, **fake_env) that runs it with a
    stand-in python3 first on PATH; returns (CompletedProcess, the calls the stand-in saw)."""
    repo, bin_dir, state = tmp_path / "repo", tmp_path / "bin", tmp_path / "state"
    for folder in (repo / "tests", bin_dir, state):
        folder.mkdir(parents=True)
    for name in ("run.sh", "requirements.txt", "tests/requirements.txt"):
        shutil.copy2(REPO / name, repo / name)
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)

    def run(*args: str, **fake_env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_STATE": str(state),
               **{k: v for k, v in fake_env.items() if k != "PYTHON"}}
        if "PYTHON" in fake_env:
            env["PYTHON"] = str(fake) if fake_env["PYTHON"] == "stand-in" else fake_env["PYTHON"]
        result = subprocess.run(["bash", "run.sh", *args], cwd=repo, env=env, capture_output=True, text=True,
                                timeout=60)
        log = state / "calls.log"
        return result, log.read_text().splitlines() if log.exists() else []

    run.repo = repo
    return run


DISTRIBUTION = dict(FAKE_EXTERNALLY_MANAGED="1", FAKE_SYSTEM_PIP="1")  # Debian/Ubuntu python3 with python3-pip


def pip_calls(calls: list[str]) -> list[str]:
    return [call for call in calls if " -m pip" in call or "ensurepip" in call or "installs:" in call]


def test_distribution_python_gets_a_project_venv_with_system_site_packages(stand_in):
    result, calls = stand_in("test", **DISTRIBUTION)
    assert result.returncode == 0, result.stderr
    assert "system -m venv --system-site-packages --without-pip .venv" in calls
    assert "venv installs: torch==2.13.0" in " ".join(calls)  # the pin, from requirements.txt
    assert "venv -m pytest -q" in calls and "stand-in pytest ran" in result.stdout
    assert not [call for call in calls if call.startswith("system") and "pip install" in call]


def test_an_installed_torch_is_reused_and_only_the_rest_installed(stand_in):
    result, calls = stand_in("test", FAKE_SYSTEM_MODULES="torch", **DISTRIBUTION)
    assert result.returncode == 0, result.stderr
    installs = [call for call in calls if "installs:" in call]
    assert installs[0].startswith("venv installs: numpy==") and "torch" not in installs[0]
    assert "keeping the installed torch" in result.stdout


def test_nothing_installed_when_everything_is_there(stand_in):
    modules = "torch,numpy,tiktoken,huggingface_hub,scipy,pytest,matplotlib"
    result, calls = stand_in("test", FAKE_SYSTEM_MODULES=modules, **DISTRIBUTION)
    assert result.returncode == 0, result.stderr
    assert not pip_calls(calls)
    assert (stand_in.repo / ".venv" / "pyvenv.cfg").read_text().strip() == "include-system-site-packages = true"
    again, calls = stand_in("test", FAKE_SYSTEM_MODULES=modules, **DISTRIBUTION)
    assert again.returncode == 0 and calls.count("system -m venv --system-site-packages --without-pip .venv") == 1


def test_without_pip_and_ensurepip_one_line_names_python3_venv(stand_in):
    result, calls = stand_in("test", FAKE_EXTERNALLY_MANAGED="1", FAKE_SYSTEM_PIP="0", FAKE_ENSUREPIP="0")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "apt install python3-venv" in result.stderr
    assert not [call for call in calls if "pip install" in call]  # never the system Python, never at all


def test_ensurepip_bootstraps_pip_into_the_venv(stand_in):
    result, calls = stand_in("test", FAKE_EXTERNALLY_MANAGED="1", FAKE_SYSTEM_PIP="0", FAKE_ENSUREPIP="1")
    assert result.returncode == 0, result.stderr
    assert calls.index("venv -m ensurepip --default-pip") < calls.index("venv -m pip install -q -r requirements.txt")


def test_missing_venv_module_one_line(stand_in):
    result, calls = stand_in("test", FAKE_NO_VENV="1", **DISTRIBUTION)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "python3-venv" in result.stderr and not (stand_in.repo / ".venv").exists()
    assert not [call for call in calls if "pip install" in call]


@pytest.mark.parametrize("version", ["3.10.13", "3.14.0", "2.7.18"])
@pytest.mark.parametrize("via", ["python3", "PYTHON"])
def test_unsupported_python_gets_one_line_before_anything_is_made(stand_in, version, via):
    result, calls = stand_in("test", FAKE_VERSION=version, **DISTRIBUTION, **({"PYTHON": "stand-in"} if via == "PYTHON"
                                                                              else {}))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert f"is Python {version}; train_gpt.py supports Python 3.11 to 3.13" in result.stderr
    assert not (stand_in.repo / ".venv").exists() and pip_calls(calls) == []


@pytest.mark.parametrize("version", ["3.11.2", "3.13.0"])
def test_supported_python_versions_pass_the_check(stand_in, version):
    result, _ = stand_in("test", FAKE_VERSION=version, **DISTRIBUTION)
    assert result.returncode == 0, result.stderr


def test_python_pointing_at_an_externally_managed_interpreter_is_refused(stand_in):
    result, calls = stand_in("test", PYTHON="stand-in", **DISTRIBUTION)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "externally managed (PEP 668)" in result.stderr and "unset PYTHON" in result.stderr
    assert not [call for call in calls if "pip install" in call] and not (stand_in.repo / ".venv").exists()


def test_python_pointing_at_a_usable_interpreter_is_used_as_it_is(stand_in):
    result, calls = stand_in("test", PYTHON="stand-in", FAKE_SYSTEM_PIP="1")
    assert result.returncode == 0, result.stderr
    assert "system -m pip install -q -r requirements.txt" in calls and not (stand_in.repo / ".venv").exists()


def test_an_active_venv_is_used_instead_of_dot_venv(stand_in):
    result, calls = stand_in("test", FAKE_IN_VENV="1", FAKE_SYSTEM_PIP="1")
    assert result.returncode == 0, result.stderr
    assert "system -m pytest -q" in calls and not (stand_in.repo / ".venv").exists()


def pytest_arguments(result: subprocess.CompletedProcess) -> list[list[str]]:
    """The argument lists the stand-in's pytest got, in order."""
    prefix = "stand-in pytest ran "
    return [json.loads(line[len(prefix):]) for line in result.stdout.splitlines() if line.startswith(prefix)]


def test_test_fast_runs_the_tests_not_marked_slow_and_ci_the_whole_suite(stand_in):
    """./run.sh test --fast reaches pytest as -m "not slow" (one argument), the args after it go on to pytest;
    ./run.sh test (CI's .ci/run) selects nothing, and --fast anywhere but first is pytest's own business."""
    venv = dict(FAKE_IN_VENV="1", FAKE_SYSTEM_PIP="1")
    fast, _ = stand_in("test", "--fast", "-k", "loader", **venv)
    assert fast.returncode == 0, fast.stderr
    assert pytest_arguments(fast) == [["-q", "-m", "not slow", "-k", "loader"]]
    full, _ = stand_in("test", "-k", "loader", **venv)
    assert pytest_arguments(full) == [["-q", "-k", "loader"]]
    later, _ = stand_in("test", "-x", "--fast", **venv)
    assert pytest_arguments(later) == [["-q", "-x", "--fast"]]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if "run.sh" in line and not line.startswith("#")] == ["./run.sh test"]


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["help"]])
def test_help_prints_the_commands_and_runs_no_python(stand_in, args):
    result, calls = stand_in(*args)
    assert result.returncode == 0 and calls == []
    for command in ("train", "test", "data", "bench", "validate", "help", "PYTHON="):
        assert command in result.stdout


def test_train_help_builds_no_data_and_installs_nothing(stand_in):
    result, calls = stand_in("train", "--help", FAKE_SYSTEM_MODULES="torch,numpy", **DISTRIBUTION)
    assert result.returncode == 0 and "stand-in train_gpt.py help" in result.stdout
    assert not pip_calls(calls) and not [call for call in calls if "data/" in call]
    bare, calls = stand_in("train", "-h", **DISTRIBUTION)  # no torch anywhere: the usage and where the flags are
    assert bare.returncode == 0 and "README.md" in bare.stdout and "train (default)" in bare.stdout
    assert not pip_calls(calls) and not [call for call in calls if "data/" in call]


def test_train_refuses_arguments_and_bad_flags_before_data(stand_in):
    result, calls = stand_in("train", "--foo", **DISTRIBUTION)
    assert result.returncode == 2 and "'--foo'" in result.stderr and calls == []
    modules = "torch,numpy,tiktoken,huggingface_hub,scipy"
    bad, calls = stand_in("train", FAKE_BAD_FLAG="1", FAKE_SYSTEM_MODULES=modules, **DISTRIBUTION)
    assert bad.returncode == 2 and "venv train_gpt.py --check" in calls
    assert not [call for call in calls if "data/" in call]
    unknown, _ = stand_in("trian")
    assert unknown.returncode == 2 and "unknown command 'trian'" in unknown.stderr


def test_research_preset_builds_its_byte_shards_then_trains(stand_in):
    """PRESET=research ./run.sh: the byte-level corpus (not the GPT-2 one that ./run.sh data builds), then one
    python train_gpt.py."""
    modules = "torch,numpy,tiktoken,huggingface_hub,scipy"
    result, _ = stand_in("train", PRESET="research", FAKE_SYSTEM_MODULES=modules, **DISTRIBUTION)
    assert result.returncode == 0, result.stderr
    ran = [line for line in result.stdout.splitlines() if line.startswith("stand-in python ran")]
    assert ran == ["stand-in python ran data/build_corpus.py --bytes", "stand-in python ran train_gpt.py"]


@pytest.mark.slow
def test_train_help_with_the_real_python(tmp_path):
    """The real path: .venv made from this interpreter (or this venv used), train_gpt.py's flag list printed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("run.sh", "train_gpt.py", "requirements.txt"):
        shutil.copy2(REPO / name, repo / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a symlink would lose a venv
    (bin_dir / "python3").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(["bash", "run.sh", "train", "--help"], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "NUM_ITERATIONS" in result.stdout and "MAX_SEQ_LEN" in result.stdout
    assert not (repo / "data").exists() and not (repo / "logs").exists()
    if sys.prefix == sys.base_prefix:  # this python3 is no venv: run.sh made one that sees its packages
        assert "include-system-site-packages = true" in (repo / ".venv" / "pyvenv.cfg").read_text()


def test_smoke_without_a_gpu_is_one_line_and_exit_0(tmp_path):
    """`./run.sh smoke` on a machine with no GPU: set up, then one line saying there is nothing to check."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    for name in ("run.sh", "train_gpt.py", "requirements.txt", "bench/smoke.py", "bench/step.py"):
        shutil.copy2(REPO / name, repo / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", "run.sh", "smoke"], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("smoke: no CUDA GPU here: nothing to check")
    assert not (repo / "data").exists() and not (repo / "logs").exists()


def test_smoke_on_a_gpu_machine_never_runs_pip(tmp_path):
    """`./run.sh smoke` where torch sees a GPU (a lent machine: minutes, maybe no network) installs and fetches
    nothing: a `pip` module first on PYTHONPATH records any call, and with no tokenizer on disk the corpus step
    gives up at once (no pip download of the ranks file) and says the smoke trains on random documents. The GPU is
    faked for run.sh alone (its one-line GPU count); smoke.py itself then sees none and says so."""
    repo = tmp_path / "repo"
    for name in ("run.sh", "train_gpt.py", "requirements.txt", "bench/smoke.py", "bench/step.py",
                 "data/build_corpus.py", "data/tokenizer.py", "data/shards.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    calls = tmp_path / "pip_calls"
    fake_pip = tmp_path / "fake_pip" / "pip"
    fake_pip.mkdir(parents=True)
    (fake_pip / "__init__.py").write_text("")
    (fake_pip / "__main__.py").write_text(f"import sys\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv) + '\\n')\n"
                                          "sys.exit(1)\n")
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/bash
case "$*" in *device_count*) echo 1; exit 0;; esac  # run.sh's GPU count: one GPU
exec "{sys.executable}" "$@"
""")
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(python), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(tmp_path / "fake_pip"), "TIKTOKEN_CACHE_DIR": str(tmp_path / "no_tiktoken_cache")}
    result = subprocess.run(["bash", "run.sh", "smoke"], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not calls.exists(), calls.read_text()
    assert "no embedded corpus offline (error: GPT-2 tokenizer unavailable" in result.stdout, result.stdout
    assert "the smoke trains on random documents" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("smoke: no CUDA GPU here")
    assert not (repo / "data" / "cache").exists() and not (repo / "data" / "embedded").exists()


# ---- data: what the headers tell, at setup; a bad shard met during training ----


def byte_shards(folder: Path) -> Path:
    """Two train shards and a val shard of byte-level documents (bytes 0-255, each led by 256)."""
    folder.mkdir()
    for name, count, seed in (("train_000000.bin", 5000, 1), ("train_000001.bin", 5000, 2),
                              ("val_000000.bin", 3000, 3)):
        write_test_shard(folder / name, np.where(synthetic_tokens(count, seed=seed) == T.BOS_ID, T.BYTE_BOS_ID,
                                                 synthetic_tokens(count, seed=seed) % 256).astype(np.uint16))
    return folder


def test_a_shard_of_the_wrong_kind_is_refused_at_setup_in_one_line(run_env, tmp_path):
    """GPT-2 shards under the byte-level research preset, and byte-level shards under a GPT-2 preset: a ShardError
    naming the file, both ids and the fix, before anything trains."""
    small = dict(NUM_ITERATIONS="2", VAL_TOKENS="1024", VAL_BATCH_TOKENS="1024")
    hp, launch = T.parse_env({**run_env, **small, "PRESET": "research"}, False)  # run_env's GPT-2 shards
    with pytest.raises(T.ShardError) as error:
        T.setup(hp, launch, torch.device("cpu"))
    message = str(error.value)
    assert "train_000000.bin: starts with token 50256 (GPT-2 tokens), but BOS_ID=256 (PRESET=research)" in message
    assert "python data/build_corpus.py --bytes" in message and "\n" not in message
    data = byte_shards(tmp_path / "bytes")
    env = {**run_env, "TRAIN_FILES": str(data / "train_*.bin"), "VAL_FILES": str(data / "val_*.bin")}
    hp, launch = T.parse_env(env, False)  # the test preset: GPT-2 ids
    with pytest.raises(T.ShardError, match="starts with token 256 \\(byte-level tokens\\), but BOS_ID=50256"):
        T.setup(hp, launch, torch.device("cpu"))
    # the research preset on byte-level shards trains: documents found at 256, a finite, falling loss
    hp, launch = T.parse_env({**env, **small, "PRESET": "research", "NUM_LAYERS": "2", "MODEL_DIM": "128",
                              "NUM_HEADS": "1", "BATCH_SCHEDULE": "256", "MAX_SEQ_LEN": "256"}, False)
    state = T.setup(hp, launch, torch.device("cpu"))
    assert state.loader.bos.size > 10 and (state.loader.tokens[state.loader.bos] == 256).all()
    losses = [T.read_train_loss(T.train_step(state, step)) for step in range(2)]
    assert all(math.isfinite(loss) for loss in losses) and losses[0] == pytest.approx(math.log(384), abs=0.05)


def test_a_validation_shard_of_the_wrong_kind_is_refused_as_a_training_shard_is(run_env, tmp_path):
    """Byte-level train shards with a GPT-2 val shard under PRESET=research: refused at setup, naming the val file
    (a check of the train shards alone would let the run validate on the wrong ids)."""
    data = byte_shards(tmp_path / "bytes")
    write_test_shard(data / "val_000000.bin", synthetic_tokens(3000, seed=3))  # GPT-2 ids, led by 50256
    env = {**run_env, "PRESET": "research", "TRAIN_FILES": str(data / "train_*.bin"),
           "VAL_FILES": str(data / "val_*.bin"), "VAL_TOKENS": "1024", "VAL_BATCH_TOKENS": "1024"}
    hp, launch = T.parse_env(env, False)
    with pytest.raises(T.ShardError, match="val_000000.bin: starts with token 50256 \\(GPT-2 tokens\\), but "
                                           "BOS_ID=256 \\(PRESET=research\\)"):
        T.setup(hp, launch, torch.device("cpu"))


def test_a_byte_level_chunk_is_cut_into_documents_at_bos_256(tmp_path):
    """PRESET=research's BOS 256 through the loader and the model: the loader's chunk of byte-level shards is whole
    documents, each led by 256; their document ids step up at each 256 and nowhere else; and through the model
    (every zero-initialized weight made random) the second document's losses do not change when every token of the
    first but its last does (the smear carries that one across, as #48)."""
    hp = T.parse_env({"PRESET": "research"}, False)[0]
    assert hp.bos_id == T.BYTE_BOS_ID == 256
    files = sorted(str(p) for p in byte_shards(tmp_path / "bytes").glob("train_*.bin"))
    loader = T.PackedLoader(files, hp.vocab_size, hp.max_seq_len, 0, 1, bos_id=hp.bos_id)
    chunk = loader.next_step(511, 1)[0].long()
    starts = (chunk == 256).nonzero().flatten().tolist()
    assert starts[0] == 0 and len(starts) >= 3  # whole documents from their BOS, several in one chunk
    expected = torch.tensor([sum(1 for s in starts if s <= i) for i in range(chunk.numel())])
    assert torch.equal(T.document_ids(chunk, hp.bos_id), expected)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = signal_everywhere(T.GPT(T.model_config(hp)), generator).eval()
    first, second = starts[1], starts[2]  # the second document runs from `first` to `second`
    tokens = chunk[:second + 1]
    changed = tokens.clone()
    changed[:first - 1] = torch.randint(0, 256, (first - 1,), generator=generator)
    changed[0] = 256
    with torch.no_grad():
        before = model(tokens[:-1], tokens[1:], reduction="none")
        after = model(changed[:-1], changed[1:], reduction="none")
    assert (before[:first - 2] - after[:first - 2]).abs().max() > 1e-3  # the first document did change
    torch.testing.assert_close(after[first:], before[first:], rtol=0, atol=1e-5)


def test_a_chunk_longer_than_a_train_shard_stops_setup(run_env, shard_dir):
    write_test_shard(shard_dir / "train_000002.bin", synthetic_tokens(100, seed=4))  # one short shard, last
    hp, launch = T.parse_env({**run_env, "BATCH_SCHEDULE": "256"}, False)  # chunks of 128 + 1 tokens
    with pytest.raises(T.ShardError) as error:
        T.setup(hp, launch, torch.device("cpu"))
    assert "train_000002.bin holds 100" in str(error.value) and "129 tokens" in str(error.value)
    assert "BATCH_SCHEDULE" in str(error.value)


def test_val_tokens_beyond_the_val_shards_stop_setup_from_the_headers(run_env, monkeypatch):
    hp, launch = T.parse_env({**run_env, "VAL_TOKENS": "8192", "VAL_BATCH_TOKENS": "256"}, False)
    monkeypatch.setattr(T, "read_shard", lambda *a: pytest.fail("the val tokens were read"))
    with pytest.raises(T.ShardError, match="VAL_TOKENS=8192: the val files hold only 8000 tokens"):
        T.setup(hp, launch, torch.device("cpu"))


def test_a_folder_or_unreadable_shard_is_one_line(shard_dir):
    with pytest.raises(T.ShardError, match="is a folder; TRAIN_FILES takes a glob of shard files"):
        T.find_shards(str(shard_dir), "TRAIN_FILES")
    with pytest.raises(T.ShardError, match="cannot read it"):
        T.read_shard_header(str(shard_dir))


def test_both_shard_readers_refuse_a_folder_the_same_way(tmp_path):
    sys.path.insert(0, str(REPO / "data"))
    import shards
    for read in (T.read_shard_header, shards.shard_token_count):
        with pytest.raises(ValueError, match=f"{tmp_path}: cannot read it \\(Is a directory\\)"):
            read(str(tmp_path))


def bad_later_shard_env(run_env, tmp_path):
    """Train shards of which the second holds a token id past the vocab: met after a few steps."""
    data = tmp_path / "bad"
    data.mkdir()
    write_test_shard(data / "train_000000.bin", synthetic_tokens(700, seed=1))
    tokens = synthetic_tokens(700, seed=2)
    tokens[300] = 60000
    write_test_shard(data / "train_000001.bin", tokens)
    write_test_shard(data / "val_000000.bin", synthetic_tokens(2000, seed=3))
    return {**run_env, "TRAIN_FILES": str(data / "train_*.bin"), "VAL_FILES": str(data / "val_*.bin"),
            "NUM_ITERATIONS": "20"}


def last_log_line(folder: Path) -> dict:
    (log,) = folder.glob("*.txt")
    line = log.read_text().splitlines()[-1]
    assert line.startswith("stopped: "), line
    return json.loads(line.removeprefix("stopped: "))


@pytest.mark.slow
def test_bad_token_in_a_later_shard_stops_every_rank_with_exit_2(run_env, tmp_path):
    """Two ranks launched as torchrun would (each gets its own exit code), both stop at the same step."""
    env = {**bad_later_shard_env(run_env, tmp_path), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29400 + os.getpid() % 500)}
    ranks = [subprocess.Popen([sys.executable, "train_gpt.py"], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    results = [rank.communicate(timeout=180) for rank in ranks]
    for rank, (out, err) in zip(ranks, results):
        assert rank.returncode == 2, err[-2000:]
        assert "train_000001.bin: token id 60000 at position 300" in err and "Traceback" not in err
    stopped = last_log_line(tmp_path / "logs")
    assert stopped["reason"].startswith("data error: ") and "train_000001.bin" in stopped["reason"]
    assert stopped["step"] >= 1 and stopped["last_finite_loss"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_log_with_a_stopped_line(run_env, tmp_path, signum):
    env = {**run_env, "NUM_ITERATIONS": "1000"}
    run = subprocess.Popen([sys.executable, "train_gpt.py"], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    for line in run.stdout:
        if line.startswith("step:2/"):
            break
    run.send_signal(signum)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    stopped = last_log_line(tmp_path / "logs")
    assert stopped["reason"] == f"interrupted by {signal.Signals(signum).name}"
    assert stopped["step"] >= 2 and stopped["last_finite_loss"] > 0


def test_stop_signal_restores_the_handlers_it_replaced():
    stop = T.StopSignal()
    before = signal.getsignal(signal.SIGINT)
    stop.install()
    assert signal.getsignal(signal.SIGINT) == stop._handle
    os.kill(os.getpid(), signal.SIGTERM)  # caught: only a flag
    assert stop.signum == signal.SIGTERM and stop.agreed()
    stop.restore()
    assert signal.getsignal(signal.SIGINT) == before


# ---- two processes ----


@pytest.mark.slow
@pytest.mark.skipif("dist.reduce_scatter_tensor(" in (REPO / "train_gpt.py").read_text(),
                    reason="the optimizers still call the deprecated collectives (switch them to the "
                           "reduce_scatter_single / all_gather_single chosen in the distributed section)")
def test_two_rank_run_prints_no_deprecation_warning(run_env):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(torchrun + ["train_gpt.py"], cwd=REPO, env={**run_env, "NUM_ITERATIONS": "2"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]
