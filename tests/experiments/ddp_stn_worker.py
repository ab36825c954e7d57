"""A tiny Table 1 run under ``torchrun --nproc-per-node 2 ddp_stn_worker.py OUT``: rank 0 writes OUT's files.

Run with ``world == 1`` (plain ``python ddp_stn_worker.py OUT``) it is the single-process reference.
"""

import sys
from pathlib import Path

import torch

from triptych.experiments import stn

CELLS = (("R", "FCN"), ("R", "ST-CNN Aff"))


def tiny_config() -> stn.STNConfig:
    """Two cells, a few steps, small validation and test sets: seconds on a CPU."""
    return stn.STNConfig(scale="quick", seed=0, cells=CELLS, iterations=4, batch_size=16, lr=0.01,
                         schedule="cosine", validation_size=500, eval_every=2, curve_validation_size=100,
                         test_size=200, device="cpu")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    report = stn.run(tiny_config(), out)
    rank, world = stn.data_parallel()
    (out / f"rank{rank}.txt").write_text("report" if report is not None else "none")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
