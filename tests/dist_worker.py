"""Run by the distributed tests under torchrun (or plain python for world size 1): trains a few steps of the
`test` preset through the real setup/train_step path, once per case, and saves rank 0's parameters and losses.

`python tests/dist_worker.py OUT_DIR CASES_JSON`: CASES_JSON maps a case name to {"steps": n, "env": {...}}, the
env flags it sets on top of this process's environment; each case is a fresh setup() (seeded model, new optimizers
and loader) and writes OUT_DIR/<name>.pt. One process serves every case because starting one (importing torch,
joining the process group) costs more than the few steps a case trains."""

import importlib.util
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as T  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_smoke", os.path.join(os.path.dirname(T.__file__), "bench",
                                                                           "smoke.py"))
smoke = importlib.util.module_from_spec(_spec)  # its perturb(): the same noise the smoke's gradient check adds
_spec.loader.exec_module(smoke)


def main() -> None:
    out_dir, cases = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    launch = T.parse_env(os.environ, cuda_available=False)[1]
    device = T.init_distributed(launch)
    for name, case in cases.items():
        hp = T.parse_env({**os.environ, **case["env"]}, cuda_available=False)[0]
        state = T.setup(T.resolve_auto(hp, device), launch, device)
        if case.get("perturb"):  # seeded noise on every parameter, equal on every rank: no zero-initialized matrix
            smoke.perturb(state.model, scale=case["perturb"])
        start = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        losses = [T.read_train_loss(T.train_step(state, step)) for step in range(case["steps"])]
        if launch.rank == 0:
            torch.save({"start": start, "params": {k: v.detach().clone() for k, v in state.model.state_dict().items()},
                        "losses": losses}, os.path.join(out_dir, f"{name}.pt"))
    if T.dist.is_initialized():
        T.dist.destroy_process_group()


if __name__ == "__main__":
    main()
