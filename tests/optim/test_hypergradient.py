"""SGD-HD (Baydin et al. 2018), the hypergradient-descent anchor for LLR."""

from __future__ import annotations

import copy

import pytest
import torch

from triptych.optim import SGDHD


def _quadratic_step(opt: torch.optim.Optimizer, theta: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    (0.5 * (a * theta**2).sum()).backward()
    grad = theta.grad.clone()
    opt.step()
    return grad


def test_step_size_follows_the_additive_hypergradient_rule():
    a = torch.tensor([1.0, 4.0], dtype=torch.float64)
    theta = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    opt = SGDHD([theta], lr=0.1, hyper_lr=0.01)
    alpha, previous = 0.1, None
    for _ in range(5):
        before = theta.detach().clone()
        grad = _quadratic_step(opt, theta, a)
        if previous is not None:
            alpha += 0.01 * float(grad @ previous)  # α_t = α_{t−1} + β g_t·g_{t−1}
        assert opt.param_groups[0]["lr"] == pytest.approx(alpha, rel=1e-12)
        torch.testing.assert_close(theta.detach(), before - alpha * grad, rtol=1e-14, atol=0.0)
        previous = grad


def test_zero_hyper_lr_is_sgd():
    theta, ref = (torch.nn.Parameter(torch.tensor([1.0, -2.0])) for _ in range(2))
    a = torch.tensor([1.0, 3.0])
    opts = [SGDHD([theta], lr=0.1, hyper_lr=0.0), torch.optim.SGD([ref], lr=0.1)]
    for _ in range(5):
        for opt, p in zip(opts, (theta, ref), strict=True):
            _quadratic_step(opt, p, a)
    assert torch.equal(theta, ref)


def test_step_size_grows_when_gradients_stay_correlated():
    theta = torch.nn.Parameter(torch.ones(3))
    opt = SGDHD([theta], lr=1e-3, hyper_lr=1e-2)
    for _ in range(20):
        _quadratic_step(opt, theta, torch.ones(3))
    assert opt.param_groups[0]["lr"] > 1e-3


def test_non_finite_gradient_skips_the_step():
    theta = torch.nn.Parameter(torch.ones(2))
    opt = SGDHD([theta], lr=0.1, hyper_lr=0.01)
    _quadratic_step(opt, theta, torch.ones(2))
    before, state = theta.detach().clone(), copy.deepcopy(opt.state_dict())
    theta.grad = torch.tensor([float("nan"), 1.0])
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert torch.equal(theta.detach(), before)
    assert opt.param_groups[0]["skipped_steps"] == 1 and opt.param_groups[0]["lr"] == state["param_groups"][0]["lr"]
    assert torch.equal(opt.state[theta]["prev_grad"], state["state"][0]["prev_grad"])


@pytest.mark.parametrize("options, message", [
    ({"lr": 0.0, "hyper_lr": 0.1}, r"lr must be > 0.0, got 0.0"),
    ({"lr": 0.1, "hyper_lr": -1.0}, r"hyper_lr must be >= 0.0, got -1.0"),
])
def test_invalid_hyperparameters_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        SGDHD([torch.nn.Parameter(torch.ones(2))], **options)
