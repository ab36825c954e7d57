import dataclasses
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triptych.data.distorted_mnist import DISTORTIONS
from triptych.experiments import stn

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(
    not (SHARED / "SHA256SUMS.raw").is_file() and not os.environ.get("TRIPTYCH_MNIST_DIR"),
    reason="no local MNIST copy")
TINY_CELLS = (("R", "FCN"), ("R", "ST-FCN Aff"))


def _tiny_config(**changes) -> stn.STNConfig:
    config = stn.STNConfig(scale="quick", seed=0, cells=TINY_CELLS, iterations=3, batch_size=16, lr=0.01,
                           validation_size=500, eval_every=2, curve_validation_size=100, test_size=200, device="cpu")
    return dataclasses.replace(config, **changes)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not os.environ.get("TRIPTYCH_MNIST_DIR") and SHARED.is_dir():
        os.environ["TRIPTYCH_MNIST_DIR"] = str(SHARED.resolve())
    out = tmp_path_factory.mktemp("stn")
    report = stn.run(_tiny_config(), out)
    return out, report


def test_configs_cover_the_table_and_refuse_unknown_scales():
    quick, full, paper = (stn.make_config(s) for s in ("quick", "full", "paper"))
    assert quick.cells == (("RTS", "CNN"), ("RTS", "ST-CNN Aff"))
    assert len(full.cells) == 26 and len(set(full.cells)) == 26
    assert {m for _, m in full.cells} == set(stn.TABLE_MODELS)
    assert [m for d, m in full.cells if d == "TC"] == ["CNN", "ST-CNN Aff"]
    assert paper.iterations == 150_000 and paper.batch_size == 256 and paper.cells == full.cells
    assert (paper.lr, paper.momentum, paper.schedule, paper.workers) == (0.01, 0.0, "step", 1)  # the paper's recipe
    assert full.iterations > quick.iterations and full.schedule == quick.schedule == "cosine"
    same_recipe = {"scale", "cells", "iterations", "eval_every", "workers", "loc_lr_factor"}
    assert {k: v for k, v in dataclasses.asdict(full).items() if k not in same_recipe} == {
        k: v for k, v in dataclasses.asdict(quick).items() if k not in same_recipe}
    assert quick.cells == tuple(c for c in full.cells if c in quick.cells)  # quick's cells are full's RTS cells
    assert quick.workers == min(torch.get_num_threads(), 2)
    with pytest.raises(ValueError, match="scale must be one of"):
        stn.make_config("huge")


def _rates(optimizers, schedulers, steps):
    """The learning rate of every optimiser at each of ``steps`` steps."""
    rates = []
    for _ in range(steps):
        rates.append([optimizer.param_groups[0]["lr"] for optimizer in optimizers])
        for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
            optimizer.step()
            scheduler.step()
    return rates


def test_optimizers_give_the_localisation_net_its_own_rate_and_drop_by_ten():
    torch.manual_seed(0)
    model = stn.new_model("ST-FCN Aff", "R", seed=0)
    optimizers, schedulers = stn.make_optimizers(model, _tiny_config(iterations=9, lr=0.1, loc_lr_factor=0.25))
    main, loc = (optimizer.param_groups[0]["params"] for optimizer in optimizers)
    assert {id(p) for p in loc} == {id(p) for p in model.transformer.parameters()}
    assert len(main) + len(loc) == len(list(model.parameters()))
    assert all(isinstance(optimizer, torch.optim.SGD) for optimizer in optimizers)
    rates = _rates(optimizers, schedulers, 9)
    assert rates[0] == pytest.approx([0.1, 0.025])
    assert rates[3] == pytest.approx([0.01, 0.0025]) and rates[2] == pytest.approx([0.1, 0.025])
    assert rates[6] == pytest.approx([0.001, 0.00025]) and rates[5] == pytest.approx([0.01, 0.0025])


def test_cosine_schedule_decays_both_optimizers_to_zero_over_the_budget():
    model = stn.new_model("ST-FCN Aff", "R", seed=0)
    rates = _rates(*stn.make_optimizers(model, _tiny_config(iterations=8, lr=0.1, loc_lr_factor=0.5,
                                                            schedule="cosine")), 9)
    assert rates[0] == pytest.approx([0.1, 0.05])
    assert rates[4] == pytest.approx([0.05, 0.025])  # half way: half the rate
    assert rates[2] == pytest.approx([0.1 * (1 + 2 ** -0.5) / 2, 0.05 * (1 + 2 ** -0.5) / 2])
    assert rates[8] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_adam_trains_only_the_transformer_and_plain_models_get_one_sgd():
    config = _tiny_config(lr=0.1, loc_lr_factor=0.02, loc_optimizer="adam")
    model = stn.new_model("ST-FCN Aff", "R", seed=0)
    (main, loc), _ = stn.make_optimizers(model, config)
    assert isinstance(main, torch.optim.SGD) and main.param_groups[0]["momentum"] == config.momentum
    assert isinstance(loc, torch.optim.Adam) and loc.param_groups[0]["lr"] == pytest.approx(0.002)
    assert {id(p) for p in loc.param_groups[0]["params"]} == {id(p) for p in model.transformer.parameters()}
    optimizers, _ = stn.make_optimizers(stn.new_model("CNN", "R", seed=0), config)
    assert len(optimizers) == 1 and isinstance(optimizers[0], torch.optim.SGD)
    assert "loc_optimizer" not in config.fingerprint("CNN")
    assert config.fingerprint("ST-CNN Aff")["loc_optimizer"] == "adam"
    with pytest.raises(ValueError, match="loc_optimizer must be one of"):
        _tiny_config(loc_optimizer="rmsprop")


def test_config_refuses_unknown_schedules_and_fingerprints_only_what_a_cell_depends_on():
    with pytest.raises(ValueError, match="schedule must be one of"):
        _tiny_config(schedule="linear")
    with pytest.raises(ValueError, match="workers"):
        _tiny_config(workers=0)
    cosine = _tiny_config(schedule="cosine")
    assert "lr_drops" not in cosine.fingerprint("ST-FCN Aff") and "lr_drops" in _tiny_config().fingerprint("FCN")
    assert "loc_lr_factor" not in cosine.fingerprint("FCN") and cosine.fingerprint("FCN")["schedule"] == "cosine"
    assert "workers" not in cosine.fingerprint("ST-FCN Aff")  # where a cell trained does not change it


def test_targets_are_computed_from_the_numbers():
    def record(distortion, model, error):
        return {"distortion": distortion, "model": model, "test_error": error}

    records = [record("R", "CNN", 2.0), record("R", "ST-CNN Aff", 1.0), record("R", "ST-CNN TPS", 3.0),
               record("P", "CNN", 1.0), record("P", "ST-CNN Aff", 1.5), record("TC", "CNN", 5.0),
               record("TC", "ST-CNN Aff", 3.5)]
    checks = {c["target"]: c["met"] for c in stn.targets(records)}
    assert checks["ST-CNN beats CNN on R"] is True  # the best ST-CNN variant counts
    assert checks["ST-CNN beats CNN on P"] is False
    assert checks["ST-CNN Aff on R within 2× the paper"] is True  # 1.0 <= 2 * 0.7
    assert checks["ST-CNN TPS on R within 2× the paper"] is False  # 3.0 > 2 * 0.7
    assert checks["ST-CNN Aff on TC ≤ 3%"] is False
    assert not any("FCN" in target for target in checks)  # no FCN cells, no FCN target


def test_cuda_request_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA device"):
        stn.resolve_device("cuda")
    assert stn.resolve_device("auto") == torch.device("cpu")


@needs_mnist
def test_tiny_run_writes_cells_table_and_figures(tiny_run):
    out, report = tiny_run
    for distortion, model in TINY_CELLS:
        cell = json.loads((out / "cells" / f"{stn.cell_name(distortion, model)}.json").read_text())
        assert cell["fingerprint"] == _tiny_config().fingerprint(model)
        assert 0.0 <= cell["test_error"] <= 100.0 and 0.0 <= cell["validation_error"] <= 100.0
        assert cell["curve"]["iteration"] == [2, 3] and len(cell["curve"]["train_loss"]) == 2
        assert (out / "cells" / f"{stn.cell_name(distortion, model)}.pt").is_file()
    table = json.loads((out / "table1.json").read_text())
    assert set(table) == {"budget", "errors"} and "3 SGD steps of batch 16" in table["budget"]
    assert set(table["errors"]) == {"FCN", "ST-FCN Aff"} and set(table["errors"]["FCN"]) == {"R"}
    assert all(set(row) <= set(DISTORTIONS) and all(isinstance(v, float) for v in row.values())
               for row in table["errors"].values())
    assert set(table["errors"]) <= set(stn.PAPER_ERRORS)
    for figure in report.figures:
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
    assert "stn_mean_pose.png" in report.figures and "## Targets" in "\n".join(report.sections)


@needs_mnist
def test_saved_cells_are_reused_and_only_missing_or_stale_cells_train(tiny_run, monkeypatch, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    saved = {p.name: p.read_bytes() for p in (out / "cells").iterdir()}
    trained = []

    def fake_train(distortion, model_name, splits, config, device):
        trained.append((distortion, model_name))
        record = json.loads(saved[f"{stn.cell_name(distortion, model_name)}.json"])
        return {**record, "fingerprint": config.fingerprint(model_name)}, stn.new_model(model_name, distortion, 0)

    monkeypatch.setattr(stn, "train_cell", fake_train)
    records, _ = stn.run_cells(_tiny_config(), out)
    assert trained == [] and [(r["distortion"], r["model"]) for r in records] == list(TINY_CELLS)
    assert {p.name: p.read_bytes() for p in (out / "cells").iterdir()} == saved  # untouched
    (out / "cells" / f"{stn.cell_name(*TINY_CELLS[0])}.pt").unlink()  # weights only feed the figures
    stn.run_cells(_tiny_config(), out)
    assert trained == []

    (out / "cells" / f"{stn.cell_name(*TINY_CELLS[1])}.json").unlink()  # a run stopped before its last cell
    stn.run_cells(_tiny_config(), out)
    assert trained == [TINY_CELLS[1]]

    stn.run_cells(_tiny_config(loc_lr_factor=0.5), out)  # only the transformer model depends on its rate
    assert trained == [TINY_CELLS[1]] * 2

    trained.clear()
    stn.run_cells(_tiny_config(iterations=4), out)  # another budget: every cell is stale
    assert trained == list(TINY_CELLS)
    assert not [p for p in (out / "cells").iterdir() if p.name.endswith(".tmp")]


def test_transformer_motion_is_zero_at_identity_and_measures_a_shift_in_pixels():
    model = stn.new_model("ST-CNN Aff", "R", seed=0)
    images = torch.rand(8, 1, 28, 28)
    assert stn.transformer_motion(model, images) == pytest.approx({"displacement": 0.0, "spread": 0.0}, abs=1e-5)
    with torch.no_grad():
        model.transformer.regression.bias[2] += 0.5  # θ = [[1, 0, 0.5], [0, 1, 0]]: sample 0.5 · 14 = 7 px to the right
    assert stn.transformer_motion(model, images) == pytest.approx({"displacement": 7.0, "spread": 0.0}, abs=1e-4)


@needs_mnist
def test_report_of_a_run_cut_short_trains_nothing_and_names_the_missing_cells(tiny_run, monkeypatch, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    (out / "cells" / f"{stn.cell_name(*TINY_CELLS[1])}.json").unlink()
    monkeypatch.setattr(stn, "train_cell", lambda *a, **k: pytest.fail("train=False must not train"))
    report = stn.run(_tiny_config(), out, train=False)
    text = "\n".join(report.sections)
    assert "1 of the 2 cells" in text and "**Not trained**" in text and "R ST-FCN Aff." in text
    assert set(json.loads((out / "table1.json").read_text())["errors"]) == {"FCN"}
    with pytest.raises(ValueError, match="no cell of this configuration"):
        stn.run(_tiny_config(iterations=5), out, train=False)


@needs_mnist
def test_cells_trained_side_by_side_equal_cells_trained_one_after_another(tiny_run, one_thread, tmp_path):
    side_by_side, _ = stn.run_cells(_tiny_config(workers=2), tmp_path)
    sequential = [json.loads((tiny_run[0] / "cells" / f"{stn.cell_name(*cell)}.json").read_text())
                  for cell in TINY_CELLS]
    assert [(r["distortion"], r["model"]) for r in side_by_side] == list(TINY_CELLS)
    for parallel, alone in zip(side_by_side, sequential, strict=True):
        assert parallel["curve"]["train_loss"] == pytest.approx(alone["curve"]["train_loss"], rel=1e-5)
        assert parallel["test_error"] == alone["test_error"]
    assert {p.name for p in (tmp_path / "cells").iterdir()} == {
        f"{stn.cell_name(*cell)}{ext}" for cell in TINY_CELLS for ext in (".json", ".pt")}


@needs_mnist
def test_training_under_torchrun_writes_the_files_of_one_process(tmp_path):
    worker = Path(__file__).with_name("ddp_stn_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not env.get("TRIPTYCH_MNIST_DIR"):
        env["TRIPTYCH_MNIST_DIR"] = str(SHARED.resolve())
    env.pop("WORLD_SIZE", None)
    runs = {"alone": [sys.executable, str(worker)],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         str(worker)]}
    for name, command in runs.items():
        done = subprocess.run([*command, str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "torchrun" / "rank0.txt").read_text() == "report"
    assert (tmp_path / "torchrun" / "rank1.txt").read_text() == "none"  # one writer
    files = sorted(p.name for p in (tmp_path / "alone").iterdir())
    assert sorted(p.name for p in (tmp_path / "torchrun").iterdir() if p.name != "rank1.txt") == files
    for distortion, model in runpy.run_path(str(worker))["CELLS"]:
        name = stn.cell_name(distortion, model)
        alone, together = (json.loads((tmp_path / run / "cells" / f"{name}.json").read_text()) for run in runs)
        assert together["device"] == "cpu × 2 processes (torchrun)"
        assert together["curve"]["train_loss"] == pytest.approx(alone["curve"]["train_loss"], rel=1e-5)
        assert together["test_error"] == pytest.approx(alone["test_error"], abs=0.51)  # ≤ 1 of 200 digits flips
        weights = [torch.load(tmp_path / run / "cells" / f"{name}.pt", weights_only=True) for run in runs]
        for key, tensor in weights[0].items():
            torch.testing.assert_close(weights[1][key], tensor, rtol=1e-4, atol=1e-6)
