"""LLR: lockstep with the flat reference, reduction to the base optimizers, robustness and the optimizer suite."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from triptych.optim import BASES, LLR, VARIANTS
from triptych.optim.reference import ReferenceLLR

DTYPE = torch.float64


# ---------------------------------------------------------------- problems

class _Problem:
    """A small non-quadratic regression with two parameter tensors, also expressible on a flat vector."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(16, 4, generator=g, dtype=DTYPE)
        self.y = torch.randn(16, 3, generator=g, dtype=DTYPE)
        self.weight = torch.nn.Parameter(0.5 * torch.randn(3, 4, generator=g, dtype=DTYPE))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(3, generator=g, dtype=DTYPE))

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.weight, self.bias]

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def loss_of(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        pred = torch.tanh(self.x @ weight.T + bias)
        return ((pred - self.y) ** 2).mean() + 0.05 * (weight**4).sum()

    def loss(self) -> torch.Tensor:
        return self.loss_of(self.weight, self.bias)

    def flat_loss(self, theta: torch.Tensor) -> torch.Tensor:
        return self.loss_of(theta[:12].reshape(3, 4), theta[12:])


def _closure(opt: torch.optim.Optimizer, loss_fn, variant: str):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward(create_graph=variant == "exact")
        return loss
    return closure


def _step(opt: LLR, loss_fn, variant: str) -> None:
    closure = _closure(opt, loss_fn, variant)
    if variant == "hessian_free":
        closure()
        opt.step()
    else:
        opt.step(closure)


# ---------------------------------------------------------------- lockstep with the reference

@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_fast_path_agrees_with_reference_every_step(variant, base, normalize):
    problem = _Problem()
    options = {"lr": 0.05, "hyper_lr": 0.1 if normalize else 2.0, "variant": variant, "base": base,
               "normalize": normalize, "forget": 0.1, "weight_decay": 0.01}
    opt = LLR(problem.params, **options)
    ref = ReferenceLLR(problem.flat(), **options)
    for _ in range(25):
        _step(opt, problem.loss, variant)
        ref.step(problem.flat_loss)
        torch.testing.assert_close(problem.flat(), ref.theta, rtol=1e-9, atol=1e-12)
        assert opt.param_groups[0]["lr"] == pytest.approx(ref.lr, rel=1e-9)
        sens = torch.cat([opt.state[p]["h"].reshape(-1) for p in problem.params])
        torch.testing.assert_close(sens, ref.h, rtol=1e-7, atol=1e-10 * float(ref.h.abs().max()))
    assert ref.lr != options["lr"], "the step size never moved: the test would not see a wrong λ update"


def test_reference_with_full_forgetting_is_multiplicative_hypergradient_descent():
    problem = _Problem()
    ref = ReferenceLLR(problem.flat(), lr=0.05, hyper_lr=3.0, normalize=False, forget=1.0)
    previous_grad = None
    for _ in range(5):
        grad = ref.gradient(problem.flat_loss, ref.theta)
        expected = ref.lr if previous_grad is None else ref.lr * math.exp(3.0 * ref.lr * float(grad @ previous_grad))
        ref.step(problem.flat_loss)
        assert ref.lr == pytest.approx(expected, rel=1e-12)
        previous_grad = grad


# ---------------------------------------------------------------- hyper_lr = 0 is the base optimizer

@pytest.mark.parametrize("base, torch_opt, options", [
    ("sgd", torch.optim.SGD, {"lr": 0.05, "weight_decay": 0.01}),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.05, "eps": 1e-10, "weight_decay": 0.01}),
    ("adam", torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.01}),
])
@pytest.mark.parametrize("variant", ["hessian_free", "finite_difference"])
def test_zero_hyper_lr_reproduces_torch_optimizer_bit_for_bit(base, torch_opt, options, variant):
    ours, theirs = _Problem(), _Problem()
    opt = LLR(ours.params, hyper_lr=0.0, base=base, variant=variant, **options)
    ref = torch_opt(theirs.params, **options)
    for _ in range(20):
        _step(opt, ours.loss, variant)
        ref.zero_grad()
        theirs.loss().backward()
        ref.step()
        for p, q in zip(ours.params, theirs.params, strict=True):
            assert torch.equal(p, q)
    assert opt.param_groups[0]["lr"] == options["lr"]


# ---------------------------------------------------------------- curvature variants

def test_exact_and_finite_difference_sensitivities_agree_on_a_quadratic():
    a = torch.linspace(0.5, 4.0, 6, dtype=DTYPE)
    sens = {}
    for variant in ("exact", "finite_difference"):
        theta = torch.nn.Parameter(torch.ones(6, dtype=DTYPE))
        opt = LLR([theta], lr=0.05, hyper_lr=0.05, variant=variant, forget=0.0)
        for _ in range(15):
            _step(opt, lambda theta=theta: 0.5 * (a * theta**2).sum(), variant)
        sens[variant] = opt.state[theta]["h"].clone()
    # the analytic sensitivity with η fixed would be −t η a (1 − η a)^{t−1} θ_0; here η moves, so compare the two
    assert sens["exact"].abs().min() > 1e-3
    torch.testing.assert_close(sens["finite_difference"], sens["exact"], rtol=1e-6, atol=0.0)


def test_exact_sensitivity_matches_closed_form_when_step_size_is_fixed():
    a = torch.tensor([0.5, 2.0, 3.0], dtype=DTYPE)
    theta = torch.nn.Parameter(torch.ones(3, dtype=DTYPE))
    eta, steps = 0.1, 8
    opt = LLR([theta], lr=eta, hyper_lr=0.0, variant="exact", forget=0.0)
    for _ in range(steps):
        _step(opt, lambda: 0.5 * (a * theta**2).sum(), "exact")
    expected = -steps * eta * a * (1 - eta * a) ** (steps - 1)  # ∂θ_t/∂λ for θ_t = (1 − e^λ a)^t θ_0
    torch.testing.assert_close(opt.state[theta]["h"], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", ["exact", "finite_difference"])
def test_variants_needing_curvature_refuse_a_missing_closure(variant):
    theta = torch.nn.Parameter(torch.ones(3))
    opt = LLR([theta], variant=variant)
    (theta**2).sum().backward()
    with pytest.raises(ValueError, match=f"variant='{variant}'.* needs a closure"):
        opt.step()


def test_exact_variant_says_when_the_gradient_has_no_graph():
    theta = torch.nn.Parameter(torch.ones(3))
    opt = LLR([theta], variant="exact")
    with pytest.raises(ValueError, match=r"loss.backward\(create_graph=True\)"):
        opt.step(_closure(opt, lambda: (theta**3).sum(), "hessian_free"))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_exact_step_leaves_detached_gradients():
    theta = torch.nn.Parameter(torch.ones(3))
    opt = LLR([theta], variant="exact")
    opt.step(_closure(opt, lambda: (theta**3).sum(), "exact"))
    assert theta.grad is not None and not theta.grad.requires_grad


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_exact_variant_with_param_groups_sharing_one_graph():
    layer = torch.nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    opt = LLR([{"params": [layer.weight]}, {"params": [layer.bias], "lr": 1e-2}], lr=1e-3, variant="exact")
    for _ in range(3):  # the second step is the first with h != 0 in both groups, hence two products
        opt.step(_closure(opt, lambda: (layer(x) - y).pow(2).mean(), "exact"))
    assert [group["lr"] for group in opt.param_groups] != [1e-3, 1e-2]


def test_finite_difference_leaves_gradient_at_current_point_and_calls_closure_twice():
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=DTYPE))
    opt = LLR([theta], lr=0.1, variant="finite_difference")
    calls = []

    def closure():
        calls.append(theta.detach().clone())
        opt.zero_grad(set_to_none=False)  # zeroing in place must not corrupt ∇ℓ(θ_t)
        loss = (theta**4).sum()
        loss.backward()
        return loss

    opt.step(closure)  # h = 0: no probe needed
    assert len(calls) == 1
    before = theta.detach().clone()
    opt.step(closure)
    assert len(calls) == 3 and not torch.equal(calls[2], before)  # second call at θ + εh
    torch.testing.assert_close(theta.grad, 4 * before**3)
    expected = before - opt.param_groups[0]["lr"] * 4 * before**3
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-15, atol=0.0)


# ---------------------------------------------------------------- the learned step size

@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("lr0", [1e-5, 1e-3, 1e-1, 10.0])
def test_step_size_ends_near_best_constant_step_on_a_quadratic(variant, lr0):
    # gradient descent on ½ Σ a_i θ_i²: the best constant step is 2 / (a_min + a_max) (equal contraction)
    a = torch.tensor([1.0, 3.0, 10.0], dtype=DTYPE)
    best = 2.0 / (a.min() + a.max()).item()
    theta = torch.nn.Parameter(torch.ones(3, dtype=DTYPE))
    # this problem converges by ~0.8 per step: h must forget faster than the default (γ = 0.01) for it to
    # describe the recent trajectory rather than the first steps
    opt = LLR([theta], lr=lr0, variant=variant, hyper_lr=0.1, forget=0.3)
    lrs = []
    for _ in range(400):
        _step(opt, lambda: 0.5 * (a * theta**2).sum(), variant)
        lrs.append(opt.param_groups[0]["lr"])
    final = math.exp(sum(math.log(x) for x in lrs[-50:]) / 50)
    assert best / 1.5 < final < best * 1.5, f"η_0={lr0}: η ended at {final:.3g}, best {best:.3g}"
    assert opt.param_groups[0]["skipped_steps"] == 0


def test_step_size_bounds_are_respected():
    theta = torch.nn.Parameter(torch.ones(4))
    opt = LLR([theta], lr=5e-3, hyper_lr=5.0, min_lr=1e-3, max_lr=1e-2)
    for t in range(30):
        opt.zero_grad()
        ((theta - (-1) ** t) ** 2).sum().backward()  # alternating target: g·h flips sign
        opt.step()
        assert 1e-3 <= opt.param_groups[0]["lr"] <= 1e-2
    assert opt.param_groups[0]["lr"] in (1e-3, 1e-2)


def test_a_step_size_written_by_a_scheduler_is_honoured():
    ours, theirs = _Problem(), _Problem()
    opt = LLR(ours.params, lr=0.1, hyper_lr=0.0)
    ref = torch.optim.SGD(theirs.params, lr=0.1)
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.5) for o in (opt, ref)]
    for _ in range(4):
        for o, problem in ((opt, ours), (ref, theirs)):
            o.zero_grad()
            problem.loss().backward()
            o.step()
        for scheduler in schedulers:
            scheduler.step()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.1 * 0.5**4
    for p, q in zip(ours.params, theirs.params, strict=True):
        assert torch.equal(p, q)


def test_learning_continues_from_a_step_size_written_by_hand():
    theta = torch.nn.Parameter(torch.ones(3))
    opt = LLR([theta], lr=1e-3, max_lr=1e3)
    for _ in range(3):
        opt.zero_grad()
        (theta**2).sum().backward()
        opt.step()
    opt.param_groups[0]["lr"] = 5e4  # above max_lr: clipped, then learned from
    opt.zero_grad()
    (theta**2).sum().backward()
    opt.step()
    assert opt.param_groups[0]["lr"] == 1e3


# ---------------------------------------------------------------- non-finite gradients

@pytest.mark.parametrize("warmup_steps", [0, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_step(warmup_steps, bad):
    problem = _Problem()
    opt = LLR(problem.params, lr=0.05, base="adam")
    for _ in range(warmup_steps):
        _step(opt, problem.loss, "hessian_free")
    params_before = [p.detach().clone() for p in problem.params]
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    problem.loss().backward()
    problem.bias.grad[1] = bad
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(problem.params, params_before, strict=True))
    state_after = opt.state_dict()
    assert state_after["param_groups"][0].pop("skipped_steps") == 1
    assert state_before["param_groups"][0].pop("skipped_steps") == 0
    assert state_after["param_groups"] == state_before["param_groups"]
    assert state_after["state"].keys() == state_before["state"].keys()
    for key, values in state_before["state"].items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(state_after["state"][key][name]), torch.as_tensor(value))


def test_non_finite_finite_difference_probe_skips_the_step():
    theta = torch.nn.Parameter(torch.ones(2, dtype=DTYPE))
    opt = LLR([theta], lr=0.1, variant="finite_difference")

    def closure():
        opt.zero_grad()
        loss = (theta**2).sum() if bool((theta < 0.99).any()) is False else torch.sqrt(-theta).sum()
        loss.backward()
        return loss

    opt.step(closure)
    before = theta.detach().clone()
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step(closure)  # the probe θ + εh lies where the loss is NaN
    assert torch.equal(theta.detach(), before)
    assert opt.param_groups[0]["skipped_steps"] == 1


# ---------------------------------------------------------------- state_dict round trip

@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("base", BASES)
def test_state_dict_clone_continues_bit_for_bit(variant, base):
    first = _Problem()
    opt = LLR(first.params, lr=0.05, hyper_lr=0.1, variant=variant, base=base)
    for _ in range(5):
        _step(opt, first.loss, variant)
    second = _Problem()
    with torch.no_grad():
        for p, q in zip(second.params, first.params, strict=True):
            p.copy_(q)
    clone = LLR(second.params, lr=1.0, variant=variant, base=base)
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(5):
        _step(opt, first.loss, variant)
        _step(clone, second.loss, variant)
        assert clone.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for p, q in zip(first.params, second.params, strict=True):
            assert torch.equal(p, q)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("options, error, message", [
    ({"lr": -1.0}, ValueError, r"^lr must be >= 1e-10, got -1.0"),
    ({"lr": 1e4}, ValueError, r"^lr must be <= 1000.0, got 10000.0"),
    ({"hyper_lr": -0.1}, ValueError, r"hyper_lr must be >= 0.0, got -0.1"),
    ({"forget": 1.5}, ValueError, r"forget must be <= 1.0, got 1.5"),
    ({"variant": "newton"}, ValueError, r"variant must be one of .*'hessian_free'; got 'newton'"),
    ({"base": "rmsprop"}, ValueError, r"base must be one of .*; got 'rmsprop'"),
    ({"betas": (1.0, 0.9)}, ValueError, r"betas\[0\] must be < 1.0, got 1.0"),
    ({"betas": (0.9,)}, ValueError, r"betas must be a pair"),
    ({"eps": -1e-8}, ValueError, r"eps must be >= 0.0, got -1e-08"),
    ({"weight_decay": -0.1}, ValueError, r"weight_decay must be >= 0.0, got -0.1"),
    ({"fd_eps": 0.0}, ValueError, r"fd_eps must be > 0.0, got 0.0"),
    ({"min_lr": 0.0}, ValueError, r"min_lr must be > 0.0, got 0.0"),
    ({"min_lr": 1e-2, "max_lr": 1e-3}, ValueError, r"max_lr must be >= 0.01, got 0.001"),
    ({"hyper_lr": float("nan")}, ValueError, r"hyper_lr must be finite"),
    ({"normalize": "yes"}, TypeError, r"normalize must be a bool, got 'yes'"),
    ({"lr": "0.1"}, TypeError, r"lr must be a real number"),
])
def test_invalid_hyperparameters_are_named(options, error, message):
    with pytest.raises(error, match=message):
        LLR([torch.nn.Parameter(torch.ones(2))], **options)


def test_invalid_option_in_a_param_group_is_named():
    with pytest.raises(ValueError, match=r"forget must be >= 0.0, got -1.0"):
        LLR([{"params": [torch.nn.Parameter(torch.ones(2))], "forget": -1.0}])


def test_param_groups_must_share_the_variant():
    with pytest.raises(ValueError, match="variant must be the same in every param group"):
        LLR([{"params": [torch.nn.Parameter(torch.ones(2))]},
             {"params": [torch.nn.Parameter(torch.ones(2))], "variant": "exact"}])


# ---------------------------------------------------------------- the optimizer suite (timm-style)

@pytest.mark.parametrize("base, lr", [("sgd", 1e-2), ("adagrad", 1e-2), ("adam", 1e-3)])
def test_loss_falls_on_a_small_network(base, lr):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = LLR(model.parameters(), lr=lr, base=base)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert opt.param_groups[0]["lr"] > lr, "from a small η₀ the learned step size should grow"


def test_param_groups_keep_their_own_options_and_step_sizes():
    problem = _Problem()
    opt = LLR([{"params": [problem.weight], "base": "adam", "hyper_lr": 0.0},
               {"params": [problem.bias], "lr": 1e-2, "forget": 0.5}], lr=0.02, hyper_lr=0.1)
    for _ in range(20):
        _step(opt, problem.loss, "hessian_free")
    frozen, learned = opt.param_groups
    assert frozen["lr"] == 0.02 and frozen["base"] == "adam" and "exp_avg" in opt.state[problem.weight]
    assert learned["lr"] != 1e-2 and learned["forget"] == 0.5 and "exp_avg" not in opt.state[problem.bias]


def test_non_contiguous_parameters_match_contiguous_ones():
    base = torch.randn(4, 3, dtype=DTYPE)
    strided = torch.nn.Parameter(base.clone().t())  # (3, 4), non-contiguous
    dense = torch.nn.Parameter(base.clone().t().contiguous())
    assert not strided.is_contiguous()
    target = torch.randn(3, 4, dtype=DTYPE)
    opts = [LLR([p], lr=0.05, base="adam") for p in (strided, dense)]
    for _ in range(10):
        for opt, p in zip(opts, (strided, dense), strict=True):
            opt.zero_grad()
            ((p - target) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(strided.detach(), dense.detach(), rtol=0.0, atol=0.0)
    assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"]


@pytest.mark.parametrize("base, torch_opt, lr", [("sgd", torch.optim.SGD, 1e-5), ("adam", torch.optim.Adam, 1e-3)])
def test_rosenbrock_beats_the_base_optimizer_at_the_same_initial_step(base, torch_opt, lr):
    def rosenbrock(xy):
        return (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2

    finals = []
    for make in (lambda p: LLR(p, lr=lr, base=base), lambda p: torch_opt(p, lr=lr)):
        xy = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=DTYPE))
        opt = make([xy])
        for _ in range(1000):
            opt.zero_grad()
            rosenbrock(xy).backward()
            opt.step()
        finals.append(rosenbrock(xy).item())
    llr_final, base_final = finals
    assert math.isfinite(llr_final) and llr_final < 0.1 * base_final


@pytest.mark.slow
@pytest.mark.parametrize("lr0", [1e-5, 1e-3, 3e-2])
def test_noisy_online_regression_final_risk_near_best_fixed_sgd(lr0):
    # E1 in miniature: d = 20, input variances over two decades, noise σ = 0.1, batch 1, 6000 steps, with the
    # online settings measured in the module docstring (μ = 0.1, γ = 0.01)
    g = torch.Generator().manual_seed(0)
    variances = torch.logspace(-1, 1, 20)
    x = torch.randn(6000, 20, generator=g) * variances.sqrt()
    theta_star = torch.randn(20, generator=g)
    y = x @ theta_star + 0.1 * torch.randn(6000, generator=g)

    def final_risk(make) -> float:
        w = torch.nn.Parameter(torch.zeros(20))
        opt = make([w])
        for xt, yt in zip(x, y, strict=True):
            opt.zero_grad()
            (0.5 * (xt @ w - yt) ** 2).backward()
            opt.step()
        error = w.detach() - theta_star
        return float(0.5 * (error * variances * error).sum()) + 0.5 * 0.1**2  # expected loss on a new sample

    best = min(final_risk(lambda p, lr=lr: torch.optim.SGD(p, lr=lr)) for lr in (2e-3, 5e-3, 1e-2))
    assert final_risk(lambda p: LLR(p, lr=lr0, hyper_lr=0.1, forget=0.01)) < 1.5 * best
