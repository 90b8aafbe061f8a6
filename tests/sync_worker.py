"""Run under torchrun by tests/test_sync.py: the real train() loop of the `test` preset, counting the collectives
and host reads it makes outside train_step and evaluate, and the gradient reduce-scatters inside each train_step;
rank 1 is 'signalled' (SIGTERM) during step STOP_AT. Before the loop, one step of the same run with one micro-batch
a step (BATCH_CHUNKS = world size) counts the reduce-scatters that a step needs. Writes {all_reduce, host_reads,
step_host_reads, logging_steps, exit_code, log, scatters_per_step, scatters_one_micro_batch, accum_steps, buckets}
to argv[1].rank<r>.json."""

import dataclasses
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as T  # noqa: E402


def main() -> None:
    out, stop_at = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    hp, launch = T.parse_env(os.environ, cuda_available=False)
    device = T.init_distributed(launch)
    hp = T.resolve_auto(hp, device)
    state = T.setup(hp, launch, device)
    log = T.RunLog(hp, launch, device, T.agreed_run_name(hp))  # before counting: its name is broadcast once
    counts = {"all_reduce": 0, "host_reads": 0, "step_host_reads": 0}
    inside = []  # non-empty while train_step or evaluate runs

    def counting(name, real):
        def wrapper(*args, **kwargs):
            if not inside:
                counts[name] += 1
            elif inside[-1] == "step" and name == "host_reads":
                counts["step_host_reads"] += 1
            return real(*args, **kwargs)
        return wrapper

    scatters = []  # per train_step: the gradient reduce-scatters it launched, whatever the micro-batch
    real_scatter = T.reduce_scatter_single

    def scatter(*args, **kwargs):
        if inside and inside[-1] == "step":
            scatters[-1] += 1
        return real_scatter(*args, **kwargs)

    T.reduce_scatter_single = scatter
    one_micro_batch = T.setup(dataclasses.replace(hp, batch_chunks=launch.world_size), launch, device)
    assert one_micro_batch.geometry.accum_steps == 1
    inside.append("step")
    scatters.append(0)
    T.train_step(one_micro_batch, 0)
    inside.pop()
    scatters_one_micro_batch = scatters.pop()
    del one_micro_batch
    T.dist.all_reduce = counting("all_reduce", T.dist.all_reduce)
    torch.Tensor.item = counting("host_reads", torch.Tensor.item)
    torch.Tensor.tolist = counting("host_reads", torch.Tensor.tolist)
    stop = T.StopSignal()
    real_step, real_evaluate = T.train_step, T.evaluate

    def step(state, i):
        inside.append("step")
        scatters.append(0)
        try:
            return real_step(state, i)
        finally:
            inside.pop()
            if i == stop_at and launch.rank == 1:
                stop.signum = signal.SIGTERM  # as the handler sets it, on one rank only

    def evaluate(state):
        inside.append("evaluate")
        try:
            return real_evaluate(state)
        finally:
            inside.pop()

    T.train_step, T.evaluate = step, evaluate
    code = T.train(state, log, stop)
    log.close()
    logging_steps = (sum(1 for line in log.path.read_text().splitlines()
                         if line.startswith("step:") and " train_loss:" in line)
                     if launch.rank == 0 else None)
    with open(f"{out}.rank{launch.rank}.json", "w") as f:
        json.dump({**counts, "exit_code": code, "logging_steps": logging_steps,
                   "log": str(log.path) if launch.rank == 0 else None, "scatters_per_step": scatters,
                   "scatters_one_micro_batch": scatters_one_micro_batch, "accum_steps": state.geometry.accum_steps,
                   "buckets": len(state.optimizers[0].buckets)}, f)
    T.close_distributed()


if __name__ == "__main__":
    main()
