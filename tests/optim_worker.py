"""The optimizer scenarios of tests/test_optim_math.py, and their world-2 runner.

Run as `python tests/optim_worker.py OUT_DIR RANK WORLD_SIZE`, one process per rank: DistAdam and NorMuon at world
size 2 (gloo), each rank with its own gradients, produced by loss.backward() so that the post-accumulate-grad hooks
launch the reductions. The ranks meet through a file store in OUT_DIR (no TCP port that another job on the machine
could take). Each rank saves to OUT_DIR/rank<r>.pt, per scenario, the gradient targets it used (the loss is
sum(p * target), so p.grad == target exactly) and its final parameters; the test rebuilds the rank-averaged
reference from the same definitions, imported from here.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as T  # noqa: E402

# 2-D and 1-D; rows 5, 7 and 1 do not divide by 2 (padded shards), and (1, 4) leaves rank 1 no rows at all
ADAM_SHAPES = [(6, 4), (5, 3), (7,), (1, 4)]
# the 1-D param's gradients are the size of eps (1e-8), so its update depends on their scale: a SUM where the mean
# belongs or eps in the wrong place shows there (Adam is otherwise scale-invariant)
ADAM_GRAD_SCALES = [1.0, 1.0, 1e-8, 1.0]
ADAM_HP = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8)
ADAM_LR_MUL = 3.0  # of the 1-D param's group
ADAM_WD = 0.1

# three (4d, d) matrices in one shape group (chunk 2 at world 2: rank 1 gets one real matrix and one pad), two
# attention gates and the smear gate (a shape group of one: rank 1 holds only padding)
MUON_SHAPES = [(32, 8), (32, 8), (32, 8), (2, 6), (2, 6), (1, 6)]
# the smear gate's gradient norm is below Polar Express's eps (1e-6), so its update depends on the gradient's scale
MUON_GRAD_SCALES = [1.0, 1.0, 1.0, 1.0, 1.0, 1e-7]


def initial_params(shapes, seed: int, scale: float = 0.5) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen) * scale) for shape in shapes]


def targets(shapes, seed: int, scales=None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = scales or [1.0] * len(shapes)
    return [torch.randn(shape, generator=gen) * scale for shape, scale in zip(shapes, scales)]


def backward(params, target_list) -> None:
    """loss = sum(p * target): a real backward (the grad hooks fire) whose gradient is exactly target."""
    sum((p * t).sum() for p, t in zip(params, target_list)).backward()


def adam_groups(params, lr_mul: float = ADAM_LR_MUL, wd: tuple[float, float] = (ADAM_WD, ADAM_WD)) -> list[dict]:
    """Group 0: every param but the 1-D one; group 1: the 1-D one, with lr_mul and its own decay."""
    return [dict(params=params[:2] + params[3:], weight_decay=wd[0]),
            dict(params=params[2:3], lr_mul=lr_mul, weight_decay=wd[1])]


def adam_schedule(step: int) -> float:
    return 1.0 - 0.2 * step


def normuon(params) -> T.NorMuon:
    return T.NorMuon([dict(params=params[:1], blocks=4), dict(params=params[1:2]),
                      dict(params=params[2:3], lr_mul=2.0), dict(params=params[3:], is_gate=True)],
                     lr=0.03, momentum=0.9, weight_decay=1.2, beta2=0.95)


def run_adam(mode: str, rank: int, steps: int) -> dict:
    """mode: 'sync' (one backward with sync set), 'accumulate' (a backward without sync, then one with it: the
    every-second-step mode) or 'late' (no sync at all: step() launches the reductions itself)."""
    params = initial_params(ADAM_SHAPES, seed=0)
    opt = T.DistAdam(adam_groups(params), **ADAM_HP, state_dtype=torch.float32)
    used = []
    for step in range(steps):
        for group in opt.param_groups:
            group["schedule"] = adam_schedule(step)
        passes = 2 if mode == "accumulate" else 1
        step_targets = []
        for i in range(passes):
            opt.reduce_in_backward(mode != "late" and i == passes - 1)
            target_list = targets(ADAM_SHAPES, seed=1000 * rank + 10 * step + i, scales=ADAM_GRAD_SCALES)
            backward(params, target_list)
            step_targets.append(target_list)
        used.append(step_targets)
        opt.step()
        assert all(p.grad is None for p in params)
    return dict(targets=used, params=[p.detach().clone() for p in params])


def run_muon(rank: int, steps: int) -> dict:
    params = initial_params(MUON_SHAPES, seed=1)
    opt = normuon(params)
    used = []
    for step in range(steps):
        opt.reduce_in_backward(True)
        target_list = targets(MUON_SHAPES, seed=5000 + 1000 * rank + step, scales=MUON_GRAD_SCALES)
        backward(params, target_list)
        used.append(target_list)
        opt.step()
    return dict(targets=used, params=[p.detach().clone() for p in params])


def main() -> None:
    out_dir, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    T.join_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                         world_size=world)  # imports torch._dynamo first: else the group outlives close_distributed
    assert T.world_size() == 2 and T.rank() == rank
    result = {mode: run_adam(mode, rank, steps=4) for mode in ("sync", "accumulate", "late")}
    result["muon"] = run_muon(rank, steps=3)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    T.close_distributed()


if __name__ == "__main__":
    main()
