"""LLR written out equation by equation on one flat parameter vector — slow, obvious, the tests' oracle.

This module is deliberately naive: one flat tensor ``θ`` of shape ``(D,)``, one step size, no foreach, no
in-place tricks. :class:`triptych.optim.LLR` must agree with it step for step (``tests/optim``). The
equations are the derivation in ``triptych.optim.llr`` (see that module's docstring); read the two side by side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from triptych.optim.llr import MAX_GROW, MAX_SHRINK, NORM_DECAY

LossFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ReferenceLLR:
    """State and hyperparameters of LLR on a flat parameter vector ``θ`` of shape ``(D,)``.

    ``loss_fn(θ) -> ℓ_t(θ)`` must be a pure function of its argument evaluated on the current minibatch;
    :meth:`step` differentiates it itself (and, for ``variant="exact"``, twice).
    """

    theta: torch.Tensor
    lr: float
    hyper_lr: float
    variant: str = "hessian_free"
    base: str = "sgd"
    normalize: bool = True
    forget: float = 0.0
    min_lr: float = 1e-10
    max_lr: float = 1e3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    fd_eps: float = 1e-3
    h: torch.Tensor = field(init=False)  # h_t = ∂θ_t/∂λ, (D,)
    t: int = field(init=False, default=0)
    grad_sq_avg: float = field(init=False, default=0.0)  # ρ²

    def __post_init__(self) -> None:
        self.theta = self.theta.detach().clone()
        self.h = torch.zeros_like(self.theta)
        self.v = torch.zeros_like(self.theta)  # AdaGrad: Σ g²; Adam: second moment
        self.m = torch.zeros_like(self.theta)  # Adam: first moment
        self.s = torch.zeros_like(self.theta)  # Adam: ∂m/∂λ

    def gradient(self, loss_fn: LossFn, theta: torch.Tensor) -> torch.Tensor:
        """∇ℓ_t(θ), shape ``(D,)`` (without weight decay)."""
        x = theta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(x), x)
        return grad

    def curvature(self, loss_fn: LossFn) -> torch.Tensor:
        """H_t h_t for the data loss plus ``weight_decay · h_t`` for the L2 term; 0 for ``hessian_free``."""
        if self.variant == "hessian_free" or not bool(self.h.any()):
            return torch.zeros_like(self.theta)
        if self.variant == "exact":
            x = self.theta.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
                (hvp,) = torch.autograd.grad(grad, x, grad_outputs=self.h)
        else:
            # H h ≈ (∇ℓ(θ + ε h) − ∇ℓ(θ)) / ε, with ‖ε h‖ = fd_eps · (1 + ‖θ‖).
            epsilon = self.fd_eps * (1.0 + float(self.theta.norm())) / float(self.h.norm())
            grad_plus = self.gradient(loss_fn, self.theta + epsilon * self.h)
            hvp = (grad_plus - self.gradient(loss_fn, self.theta)) / epsilon
        return hvp + self.weight_decay * self.h

    def step(self, loss_fn: LossFn) -> None:
        """One LLR step on ``ℓ_t = loss_fn``: λ with g_t·h_t, then θ and h with the new η_t."""
        g = self.gradient(loss_fn, self.theta) + self.weight_decay * self.theta
        hvp = self.curvature(loss_fn)

        # λ_t = clip(λ_{t−1} − μ d_t), d_t = g_t·h_t
        # normalize=True: d_t = clip(g_t·h_t / (‖h_t‖ ρ_{t−1}), −1, K), ρ² = running mean of ‖g‖²
        dot = float(g @ self.h)
        if self.normalize:
            grad_sq = float(g @ g)
            norms = float(self.h.norm()) * math.sqrt(self.grad_sq_avg)
            dot = min(max(dot / norms, -MAX_GROW), MAX_SHRINK) if norms > 0 else 0.0
            decay = NORM_DECAY if self.grad_sq_avg > 0 else 0.0
            self.grad_sq_avg = decay * self.grad_sq_avg + (1 - decay) * grad_sq
        lam = math.log(self.lr) - self.hyper_lr * dot
        if self.hyper_lr * dot == 0:
            eta = self.lr
        elif lam <= math.log(self.min_lr):
            eta = self.min_lr
        elif lam >= math.log(self.max_lr):
            eta = self.max_lr
        else:
            eta = math.exp(lam)
        eta = min(max(eta, self.min_lr), self.max_lr)
        self.lr = eta

        # base update direction u_t, preconditioner P_t and the curvature term c_t = P_t · (H h or ∂m/∂λ)
        self.t += 1
        if self.base == "sgd":
            u = g
            c = hvp
        elif self.base == "adagrad":
            self.v = self.v + g * g
            precond = 1.0 / (self.v.sqrt() + self.eps)
            u = precond * g
            c = precond * hvp
        else:
            beta1, beta2 = self.betas
            self.m = beta1 * self.m + (1 - beta1) * g
            self.v = beta2 * self.v + (1 - beta2) * g * g
            self.s = beta1 * self.s + (1 - beta1) * hvp
            m_hat = self.m / (1 - beta1**self.t)
            v_hat = self.v / (1 - beta2**self.t)
            precond = 1.0 / (v_hat.sqrt() + self.eps)
            u = precond * m_hat
            c = precond * self.s / (1 - beta1**self.t)

        # θ_{t+1} = θ_t − η_t u_t ;  h_{t+1} = (1 − γ) h_t − η_t u_t − η_t c_t
        self.theta = self.theta - eta * u
        self.h = (1 - self.forget) * self.h - eta * u - eta * c
