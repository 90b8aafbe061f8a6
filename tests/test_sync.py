"""The loop's host syncs: one small all-reduce and one host read per logging step, which also carries the stop
agreement across ranks (no collective of its own); none inside a training step."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.slow
def test_one_all_reduce_and_one_host_read_per_logging_step_at_world2(run_env, tmp_path):
    env = {**run_env, "OPTIMIZER": "normuon", "NUM_ITERATIONS": "12", "TRAIN_LOG_EVERY": "2", "VAL_EVERY": "0",
           "WARMUP": "0", "BATCH_CHUNKS": "4"}  # 2 micro-batches a step at world 2
    out = tmp_path / "counts"
    result = subprocess.run(TORCHRUN + ["tests/sync_worker.py", str(out), "4"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    # rank 1 was signalled during step 4; the read after step index 3 (step 4 logs at every 2nd step: steps 2, 4)
    # comes before it, so the read at step 6 carries it and both ranks stop before step index 6
    assert [r["exit_code"] for r in ranks] == [143, 143]
    lines = Path(ranks[0]["log"]).read_text().splitlines()
    assert json.loads(lines[-1].removeprefix("stopped: "))["step"] == 6
    logging_steps = ranks[0]["logging_steps"]
    assert logging_steps == 3  # steps 2, 4, 6
    for counts in ranks:
        assert counts["all_reduce"] == logging_steps, counts  # the stop agreement adds none
        assert counts["host_reads"] == logging_steps, counts
        assert counts["step_host_reads"] == 0, counts
    # gradient accumulation: one reduce-scatter per bucket a step (NorMuon's buckets, each DistAdam parameter),
    # launched by the last micro-batch's backward, as many as a step of one micro-batch needs; not one per micro-batch
    for counts in ranks:
        assert counts["accum_steps"] == 2 and len(counts["scatters_per_step"]) == 6, counts  # steps 0-5
        assert counts["scatters_one_micro_batch"] > counts["buckets"] > 0, counts
        assert set(counts["scatters_per_step"]) == {counts["scatters_one_micro_batch"]}, counts
