"""Train a small model with LLR on every rank: ``torchrun --nproc-per-node 2 ddp_llr_worker.py OUT``.

Each case trains for ``STEPS`` steps on the global batches of :func:`global_batch`, every rank on its contiguous
share, and rank ``r`` writes ``OUT/rank{r}.pt``: ``{case: {"params": [...], "lrs": [...]}}``. Run in one process
(:func:`run_case` with ``world=1``) it is the single-process reference the distributed runs must equal.
"""

import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from triptych.optim import LLR

STEPS = 8
GLOBAL_BATCH = 8
# (variant, base, how the ranks average): "ddp" = DistributedDataParallel's hooks; "group" = LLR(process_group=...);
# "none" (not a case: the control) = each rank alone on its share
CASES = [("hessian_free", "sgd", "ddp"), ("finite_difference", "sgd", "ddp"), ("finite_difference", "adam", "ddp"),
         ("exact", "sgd", "group"), ("exact", "adam", "group"), ("hessian_free", "adagrad", "group")]


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(GLOBAL_BATCH, 5)`` and targets ``(GLOBAL_BATCH, 1)`` of one step, the same on every rank."""
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=generator, dtype=torch.float64)
    return x, x.sum(1, keepdim=True).sin()


def run_case(variant: str, base: str, averaging: str, rank: int = 0, world: int = 1) -> dict[str, list]:
    """Parameters and step sizes after each of ``STEPS`` LLR steps on this rank's share of the global batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    net, group = model, None
    if world > 1 and averaging == "ddp":
        net = nn.parallel.DistributedDataParallel(model)
    elif world > 1 and averaging == "group":
        group = torch.distributed.group.WORLD
    optimizer = LLR(model.parameters(), lr=0.05, hyper_lr=0.1, variant=variant, base=base, weight_decay=1e-3,
                    process_group=group)
    share = GLOBAL_BATCH // world
    lrs = []
    for step in range(STEPS):
        x, y = global_batch(step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = ((net(x) - y) ** 2).mean()
            loss.backward(create_graph=variant == "exact")
            return loss

        with net.no_sync() if isinstance(net, nn.parallel.DistributedDataParallel) and group else nullcontext():
            optimizer.step(closure)
        lrs.append(optimizer.param_groups[0]["lr"])
    return {"params": [p.detach().clone() for p in model.parameters()], "lrs": lrs}


def main(out: Path) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = {case: run_case(*case, rank=rank, world=world) for case in CASES}
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
