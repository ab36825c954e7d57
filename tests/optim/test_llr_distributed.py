"""LLR under data parallelism: 2 CPU processes (gloo, started by torchrun) against one process on the same data."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triptych.optim import LLR

WORKER = Path(__file__).with_name("ddp_llr_worker.py")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
               str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_every_variant_under_data_parallelism_equals_one_process_on_the_global_batches(two_ranks, one_thread):
    worker = runpy.run_path(str(WORKER))
    for case in worker["CASES"]:
        alone = worker["run_case"](*case)
        for rank in two_ranks:
            result = rank[case]
            assert result["lrs"] == pytest.approx(alone["lrs"], rel=1e-9), case
            assert len(set(result["lrs"])) > 1, case  # η moved, so the check is not vacuous
            for p, q in zip(result["params"], alone["params"], strict=True):
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=str(case))


def test_ranks_that_do_not_average_drift_apart(two_ranks, one_thread):
    """Each rank alone on its half of the batch: a different η, so the equality above is not automatic."""
    worker = runpy.run_path(str(WORKER))
    half = worker["run_case"]("hessian_free", "sgd", "none", rank=0, world=2)
    assert half["lrs"] != pytest.approx(two_ranks[0][("hessian_free", "sgd", "ddp")]["lrs"], rel=1e-6)


def test_process_group_needs_an_initialised_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        LLR([torch.zeros(2, requires_grad=True)], process_group=object())
