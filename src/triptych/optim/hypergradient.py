"""SGD-HD: hypergradient descent on the step size (Baydin et al., ICLR 2018, arXiv 1703.04782) — an anchor for LLR.

Per param group, with g_t = ∇ℓ_t(θ_t) and β = ``hyper_lr``::

    α_t = α_{t−1} + β · g_t·g_{t−1}        (g_{−1} = 0, so α_0 is the initial lr)
    θ_{t+1} = θ_t − α_t g_t

This is the additive rule of the paper, without clipping: α may leave the positive range if β is too large —
that is part of what LLR's log-parametrisation fixes. Same conventions as :class:`triptych.optim.LLR`: α_t is
always ``param_group["lr"]`` (a value written there by a scheduler is honoured), a step with a non-finite
gradient is skipped with a warning and counted in ``param_group["skipped_steps"]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from triptych._validation import check_real


class SGDHD(Optimizer):
    """SGD whose step size α follows hypergradient descent, α_t = α_{t−1} + β g_t·g_{t−1}.

    Args:
        params: parameters or param groups.
        lr: initial step size α₀.
        hyper_lr: β, the (additive) learning rate of α; 0 gives plain SGD.
    """

    def __init__(self, params: Iterable[Any], lr: float, *, hyper_lr: float) -> None:
        defaults = {"lr": lr, "hyper_lr": hyper_lr}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validating ``lr`` and ``hyper_lr``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["lr"] = check_real("lr", group["lr"], low=0.0, low_inclusive=False)
        group["hyper_lr"] = check_real("hyper_lr", group["hyper_lr"], low=0.0)
        group.setdefault("skipped_steps", 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One SGD-HD step; ``closure`` (optional) re-evaluates the loss and calls backward, as for SGD."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad.detach() for p in params]
            pairs = [(g, self.state[p]["prev_grad"]) for p, g in zip(params, grads, strict=True)
                     if "prev_grad" in self.state[p]]
            dot = (torch.stack([torch.dot(g.reshape(-1), q.reshape(-1)).double() for g, q in pairs]).sum()
                   if pairs else None)
            norms = torch.stack(torch._foreach_norm(grads)).double().sum() if grads else None
            gathered.append((params, grads, dot, norms))
        scalars = [[float(x) if x is not None else 0.0 for x in (dot, norm)] for _, _, dot, norm in gathered]
        if not all(math.isfinite(x) for row in scalars for x in row):
            for group in self.param_groups:
                group["skipped_steps"] += 1
            warnings.warn("SGDHD: non-finite gradient; step skipped (parameters, step size and state unchanged)",
                          RuntimeWarning, stacklevel=3)
            return loss
        for group, (params, grads, _, _), (dot, _) in zip(self.param_groups, gathered, scalars, strict=True):
            if not params:
                continue
            group["lr"] = group["lr"] + group["hyper_lr"] * dot
            torch._foreach_add_(params, grads, alpha=-group["lr"])
            for p, g in zip(params, grads, strict=True):
                if "prev_grad" in self.state[p]:
                    self.state[p]["prev_grad"].copy_(g)
                else:
                    self.state[p]["prev_grad"] = g.clone(memory_format=torch.preserve_format)
        return loss
