"""Tests of the LLR reproduction (`triptych reproduce llr`): protocol, runner, oracle and the report."""

import json
import math
from dataclasses import replace

import pytest
import torch

from triptych.data.streams import linear_regression_stream
from triptych.experiments import llr
from triptych.experiments.report import set_quiet, write_report
from triptych.optim import LLR


@pytest.fixture(autouse=True)
def _quiet():
    set_quiet(True)
    yield
    set_quiet(False)


def tiny_config(**overrides) -> llr.LLRConfig:
    """A seconds-long configuration: few steps, a three-point grid (the test's own scale, not the library's)."""
    config = replace(llr.make_config("quick", seed=0), experiments=("E1", "E2-jump"), n_steps=60,
                     lr_grid=(1e-3, 1e-1, 10.0), baseline_lr_grid=(1e-3, 1e-2, 1e-1, 10.0),
                     hyper_lr_grid=(2e-3, 2e-2, 2e-1), default_hyper_lr=2e-2, hd_hyper_lr_grid=(1e-3,),
                     n_heldout=200, mnist_samples=48, mnist_heldout=20, mnist_lr_grid=(1e-2, 1e-1), mnist_hidden=8,
                     n_records=20, target_lr_range=(1e-3, 1e-1), aim_lr_range=(1e-3, 10.0), variant_lr_grid=(1e-1,),
                     workers=1)
    return replace(config, **overrides)


def _run(stream, specs):
    initial, forward = llr.initial_parameters(stream, hidden=8, seed=0)
    return llr.run_online(stream, specs, initial=initial, forward=forward, n_records=10)


def test_online_loss_is_taken_before_the_update():
    stream = linear_regression_stream(2, dim=3, seed=0)
    eta = 0.5
    grid = _run(stream, [llr.RunSpec("SGD", {"lr0": eta})])
    x0, y0 = stream.inputs[0, 0], stream.targets[0, 0]
    theta1 = -eta * (0.0 - y0) * x0  # one SGD step from θ_0 = 0 on ½(xᵀθ − y)²
    x1, y1 = stream.inputs[1, 0], stream.targets[1, 0]
    before = 0.5 * y0**2 + 0.5 * (x1 @ theta1 - y1) ** 2  # ℓ_0(θ_0) + ℓ_1(θ_1)
    theta2 = theta1 - eta * (x1 @ theta1 - y1) * x1
    after = 0.5 * (x0 @ theta1 - y0) ** 2 + 0.5 * (x1 @ theta2 - y1) ** 2  # ℓ_t(θ_{t+1}): the wrong protocol
    assert grid.runs[0].cumulative_loss == pytest.approx(float(before), rel=1e-12)
    assert not math.isclose(grid.runs[0].cumulative_loss, float(after), rel_tol=1e-6)
    final = 0.5 * float((stream.heldout_inputs @ theta2 - stream.heldout_targets).square().mean())
    assert grid.runs[0].final_loss == pytest.approx(final, rel=1e-10)


def test_vectorised_sgd_and_schedule_match_torch_sgd():
    stream = linear_regression_stream(40, dim=4, seed=1)
    t0 = 5.0
    specs = [llr.RunSpec("SGD", {"lr0": 0.05}), llr.RunSpec("SGD 1/t", {"lr0": 0.2, "t0": t0})]
    grid = _run(stream, specs)
    for run, (lr0, schedule) in zip(grid.runs, [(0.05, lambda t: 1.0), (0.2, lambda t: 1 / (1 + t / t0))],
                                    strict=True):
        theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.SGD([theta], lr=lr0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        total = 0.0
        for t in range(stream.n_steps):
            loss = 0.5 * (stream.inputs[t] @ theta - stream.targets[t]).square().mean()
            total += float(loss.detach())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        assert run.cumulative_loss == pytest.approx(total, rel=1e-12)


def test_runs_sharing_one_optimizer_match_separate_optimizers():
    stream = linear_regression_stream(50, dim=5, seed=2)
    def specs(shareable):
        return [llr.RunSpec("LLR", {"lr0": lr0}, LLR, {"lr": lr0, "hyper_lr": 0.05}, shareable=shareable,
                            track_lr=True) for lr0 in (1e-3, 1e-1)]
    together, apart = _run(stream, specs(True)), _run(stream, specs(False))
    for a, b in zip(together.runs, apart.runs, strict=True):
        assert a.cumulative_loss == pytest.approx(b.cumulative_loss, rel=1e-12)
        assert a.lr_trace == pytest.approx(b.lr_trace, rel=1e-12)
    assert together.runs[0].lr_trace[-1] > 1e-3  # η grew from a too-small start


def test_curvature_variants_agree_on_a_quadratic_and_differ_from_hessian_free():
    # On ½(xᵀθ − y)² the gradient is linear in θ, so the finite-difference H_t h_t is exact: the two variants
    # (each with its own closure through the runs' parameter views) must follow the same trajectory.
    stream = linear_regression_stream(60, dim=4, seed=5)
    config = tiny_config(lr_grid=(1e-2, 1e-1), variant_lr_grid=(1e-2, 1e-1))
    specs = [spec for spec in llr.method_grid(config, config.lr_grid, config.lr_grid, 60, {},
                                              ("finite_difference", "exact"))
             if spec.method.startswith("LLR") and spec.hparams["hyper_lr"] == config.default_hyper_lr]
    grid = _run(stream, specs)
    by_method = {}
    for run in grid.runs:
        by_method.setdefault(run.method, []).append(run)
    assert set(by_method) == {"LLR", "LLR finite_difference", "LLR exact"}
    for fd, exact in zip(by_method["LLR finite_difference"], by_method["LLR exact"], strict=True):
        assert fd.cumulative_loss == pytest.approx(exact.cumulative_loss, rel=1e-6)
        assert fd.lr_trace == pytest.approx(exact.lr_trace, rel=1e-3)
    # with η_0 = 0.1 the curvature term η H h is a sizeable part of the sensitivity recursion
    free, exact = by_method["LLR"][-1], by_method["LLR exact"][-1]
    assert free.hparams["lr0"] == 0.1
    assert abs(math.log(free.lr_trace[-1] / exact.lr_trace[-1])) > 0.01


def test_divergence_is_counted_and_does_not_disturb_other_runs():
    stream = linear_regression_stream(200, dim=5, seed=3)
    stable = llr.RunSpec("SGD", {"lr0": 0.05})
    grid = _run(stream, [llr.RunSpec("SGD", {"lr0": 50.0}), stable,
                         llr.RunSpec("LLR", {"lr0": 50.0, "hyper_lr": 0.0}, LLR, {"lr": 50.0, "hyper_lr": 0.0},
                                     track_lr=True)])
    blown, kept, blown_llr = grid.runs
    assert blown.diverged_at is not None and blown.diverged_at < 50
    assert blown_llr.diverged_at is not None
    assert math.isinf(blown.cumulative_loss) and math.isinf(blown.final_loss)
    assert math.isnan(blown_llr.lr_trace[-1])
    alone = _run(stream, [stable]).runs[0]
    assert kept.diverged_at is None and kept.cumulative_loss == pytest.approx(alone.cumulative_loss, rel=1e-12)
    summary = llr.summarise(grid, tiny_config(hyper_lr_grid=(0.0,), default_hyper_lr=0.0,
                                              target_lr_range=(50.0, 50.0)))
    assert summary["methods"]["SGD"]["diverged"] == 1 and summary["methods"]["LLR"]["diverged"] == 1


def test_recursive_least_squares_recovers_the_parameter_without_noise():
    stream = linear_regression_stream(200, dim=6, noise_std=0.0, variance_decades=1.0, seed=4)
    cumulative, final = llr.recursive_least_squares(stream, delta=1e-8)
    assert final < 1e-10
    assert cumulative > 0.5 * float(stream.targets[0, 0] ** 2) * 0.999  # the first prediction is θ_0ᵀx = 0


def test_eta_spread_measures_the_ratio_of_the_extreme_curves():
    run = lambda lr0, trace: llr.RunResult("LLR", {"lr0": lr0, "hyper_lr": 0.1}, 1.0, 1.0, lr_trace=trace)  # noqa: E731
    grid = llr.GridResult([run(1e-3, [1e-3, 1e-2, 0.1, 0.1]), run(1.0, [1.0, 0.5, 0.15, 0.12])],
                          record_steps=[0, 10, 20, 30], loss_trace=torch.zeros(2, 4), initial_loss=1.0, n_steps=40)
    spread = llr.eta_spread(grid, 0.1)
    assert spread["spread"] == pytest.approx([1000.0, 50.0, 1.5, 1.2])
    assert spread["first_within_2"] == 20 and spread["spread_at_end"] == pytest.approx(1.2)
    assert spread["spread_at_10pct"] == pytest.approx(50.0)  # the first record at t ≥ 0.1·T = 4 is t = 10
    assert spread["n_curves"] == 2


def test_make_config_scales():
    full = llr.make_config("full")
    assert math.log10(max(full.lr_grid) / min(full.lr_grid)) >= 6
    assert math.log10(max(full.hyper_lr_grid) / min(full.hyper_lr_grid)) >= 3
    assert full.default_hyper_lr in full.hyper_lr_grid and set(full.lr_grid) <= set(full.baseline_lr_grid)
    assert full.n_steps >= 20_000 and llr.make_config("quick").n_steps < full.n_steps
    with pytest.raises(ValueError, match="paper"):
        llr.make_config("paper")
    with pytest.raises(ValueError, match="scale must be one of"):
        llr.make_config("huge")


def test_tiny_end_to_end_report(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(0)

    def fake_mnist(split):  # E4's path without the download: random images, labels from a fixed rule
        n = 64 if split == "train" else 32
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
        return images, (images[:, 14, 14] % 10).to(torch.uint8)

    monkeypatch.setattr(llr, "load_mnist", fake_mnist)
    config = tiny_config(experiments=("E1", "E2-jump", "E4"))
    report = llr.run(config, tmp_path)
    write_report(report, tmp_path, config=config, command="test")
    text = (tmp_path / "report.md").read_text()
    for heading in ("## Targets", "## Method", "## Results", "### E1", "### E2-jump", "### E4", "## Figures",
                    "our derivation"):
        assert heading in text
    assert len(report.figures) == 4
    for figure in report.figures:
        assert (tmp_path / figure).stat().st_size > 1000
        assert f"]({figure})" in text
    summaries = report.results["summaries"]
    e1 = summaries["E1"]
    best_lr = e1["best_sgd"]["final_lr"]
    rows = {row["lr0"]: row for row in e1["per_lr"]}
    if best_lr in rows:
        assert rows[best_lr]["sgd_final"] == pytest.approx(1.0)
    assert all(row["sgd_final"] >= 1.0 - 1e-12 for row in e1["per_lr"])  # ratios to the best in hindsight
    assert e1["methods"]["SGD"]["diverged"] >= 1  # η = 10 diverges on these inputs
    assert {"SGD", "SGD 1/t", "SGD-HD", "LLR", "LLR exact", "LLR finite_difference"} <= set(e1["methods"])
    assert "LLR test accuracy" in text and "LLR test accuracy" not in text.split("### E4")[0]
    assert "curvature variants" in text and "LLR exact" not in summaries["E2-jump"]["methods"]
    assert "rls" in e1 and e1["rls"]["cumulative_ratio"] > 0
    targets = report.results["targets"]
    assert {t["experiment"] for t in targets} == {"E1", "E2-jump", "E4"}
    assert all(isinstance(t["met"], bool) for t in targets)
    assert any("E2" in t["experiment"] and "cumulative" in t["target"] for t in targets)
    json.loads((tmp_path / "results.json").read_text())


@pytest.mark.slow
def test_parallel_workers_give_the_same_results():
    config = tiny_config(experiments=("E1", "E3"))
    sequential = llr.run_experiments(config)
    parallel = llr.run_experiments(replace(config, workers=2))
    assert list(parallel) == ["E1", "E3"]
    for name in ("E1", "E3"):
        for a, b in zip(sequential[name][0].runs, parallel[name][0].runs, strict=True):
            assert (a.method, a.hparams) == (b.method, b.hparams)
            assert a.cumulative_loss == b.cumulative_loss and a.final_loss == b.final_loss
