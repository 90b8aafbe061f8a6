"""Run by the distributed tests under torchrun (or plain python for world size 1): trains a few steps of the
`test` preset through the real setup/train_step path and saves rank 0's parameters to argv[1]."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as T  # noqa: E402


def main() -> None:
    out, steps = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    hp, launch = T.parse_env(os.environ, cuda_available=False)
    device = T.init_distributed(launch)
    hp = T.resolve_auto(hp, device)
    state = T.setup(hp, launch, device)
    losses = [T.read_train_loss(T.train_step(state, step)) for step in range(steps)]
    if launch.rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in state.model.state_dict().items()},
                    "losses": losses}, out)
    if T.dist.is_initialized():
        T.dist.destroy_process_group()


if __name__ == "__main__":
    main()
