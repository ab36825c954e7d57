r"""LLR — "learning the learning rate" online (Massé & Ollivier, *Speed learning on the fly*, arXiv 1511.02540).

The step size is itself learned by gradient descent on the cumulative online loss Σ_t ℓ_t(θ_t), with the
gradient of the whole trajectory with respect to the step size carried forward in real time (like RTRL). The
paper's full text was not read for this implementation: the equations below are the derivation in our notes
(``shared/papers/llr.md``), written in minimisation form.

Notation (per parameter group): g_t = ∇ℓ_t(θ_t), H_t = ∇²ℓ_t(θ_t), λ = log η the log step size (so η stays
positive and the meta step μ = ``hyper_lr`` is scale-free), h_t = ∂θ_t/∂λ the sensitivity of the parameters to
λ (h_0 = 0), γ = ``forget``. Algorithm, one call of :meth:`LLR.step` (the order matters)::

    g_t ← ∇ℓ_t(θ_t) + wd · θ_t                                      (closure, or .grad; L2 weight decay)
    if any of g_t (or H_t h_t) is not finite: skip the step, warn, skipped_steps += 1
    d_t ← g_t·h_t                                                   (normalize=False: the paper's rule)
    d_t ← clip(g_t·h_t / (‖h_t‖ ρ_{t−1}), −1, K),  ρ_t² = ½ρ_{t−1}² + ½‖g_t‖²     (normalize=True, ours)
    λ_t ← clip(λ_{t−1} − μ d_t, log min_lr, log max_lr);   η_t = exp(λ_t)  → param_group["lr"]
    c_t ← H_t h_t + wd · h_t            exact: double backward; finite_difference: see below; hessian_free: 0
    base update u_t, preconditioner P_t (treated as a constant of λ):
        sgd:      u_t = g_t,                         P_t = 1,                  c'_t = c_t
        adagrad:  v_t = v_{t−1} + g_t²,              P_t = 1/(√v_t + ε),       u_t = P_t g_t,  c'_t = P_t c_t
        adam:     m_t = β₁m_{t−1} + (1−β₁)g_t,  v_t = β₂v_{t−1} + (1−β₂)g_t²,  s_t = β₁s_{t−1} + (1−β₁)c_t,
                  P_t = 1/(√(v_t/(1−β₂^t)) + ε),    u_t = P_t m_t/(1−β₁^t),   c'_t = P_t s_t/(1−β₁^t)
    θ_{t+1} ← θ_t − η_t u_t
    h_{t+1} ← (1 − γ) h_t − η_t u_t − η_t c'_t

The λ update uses g_t·h_t — the gradient at the current point against the sensitivity that produced it (the
notes' λ_{t+1} = λ_t − μ g_{t+1}·h_{t+1}, one index shifted) — so η_t already reflects the newest gradient when
θ moves. The sensitivity recursion is the derivative of the base optimizer's update map with respect to λ:
∂(η u)/∂λ = η u + η ∂u/∂λ, with ∂g/∂λ = H h and P held constant. When η is too small successive gradients
stay correlated, d_t < 0 and η grows; when η is too large the trajectory oscillates, d_t > 0 and η shrinks.

Variants (how c_t = H_t h_t is obtained):

* ``"exact"`` — Hessian-vector product by double backward (the closure builds the graph of the gradient).
* ``"finite_difference"`` — H_t h_t ≈ (∇ℓ_t(θ_t + εh_t) − ∇ℓ_t(θ_t))/ε on the same minibatch, one extra
  closure call, with ε chosen per group so that ‖εh_t‖ = ``fd_eps`` · (1 + ‖θ_t‖).
* ``"hessian_free"`` (default) — curvature dropped; forgetting γ keeps h_t a discounted sum of past steps.
  With γ = 1, base sgd and ``normalize=False`` this is the multiplicative form of hypergradient descent
  (Baydin et al. 2018): λ_t = λ_{t−1} + μ η_{t−1} g_t·g_{t−1}.

``normalize=True`` (default) is **our extension, not the paper's**. Since h ∝ η, the raw product g·h makes a
tiny η₀ grow only imperceptibly and a large one collapse; we divide it by ‖h_t‖ and by ρ_{t−1}, a short running
RMS of ‖g‖ (decay ``NORM_DECAY`` = 0.5). Then d_t = cos(g_t, h_t)·‖g_t‖/ρ_{t−1} is invariant to the scale of
the loss and of θ (μ is scale-free), η grows by at most a factor e^μ per step (d ≥ −1), and when the gradient
norm jumps above its recent RMS — an unstable η — it may shrink by up to e^{μK} per step (K = ``MAX_SHRINK`` =
30) before the trajectory blows up. Where the gradients are steady (‖g_t‖ ≈ ρ) the rule is the paper's
g·h up to a slowly varying positive factor, so it has the same fixed points. ``normalize=False`` is the raw rule.

Defaults (``hyper_lr`` = 0.03, ``forget`` = 0.1) were chosen on a noisy ill-conditioned linear regression
(batch 1), a deterministic quadratic, a full-batch MLP and Rosenbrock as the most robust pair: no divergence
on any of them. On the noisy online problems of the paper, μ = 0.1 with γ = 0.01 tracked the best fixed step
more closely (final loss ≈ 1.2× the best-tuned SGD from every η₀ in 1e-5 … 3e-2, 6000 steps) but diverged on full-batch
training; without curvature (``hessian_free``) h must forget faster than the gradients decay to follow the
recent trajectory, which is why deterministic problems want the larger γ.

Closure contract (as :class:`torch.optim.LBFGS`): ``closure()`` clears the gradients, evaluates the loss on the
*current* minibatch, calls ``loss.backward()`` and returns the loss; it must be deterministic (same dropout mask,
same batch) across calls within one step. ``"finite_difference"`` calls it twice per step (at θ_t and at
θ_t + εh_t; the parameters are restored bit for bit and ``.grad`` is left holding ∇ℓ_t(θ_t)).
``"exact"`` calls it once and needs the graph of the gradient: the closure must call
``loss.backward(create_graph=True)`` (the AdaHessian idiom); after the step ``.grad`` is detached.
``"hessian_free"`` needs no closure: it reads ``.grad`` like SGD.

Weight decay is L2 (coupled, as in ``torch.optim.SGD/Adagrad/Adam``): it is part of the objective, so it enters
g_t and the curvature (+wd·h_t), and ``hyper_lr=0`` reproduces those optimizers exactly.

Non-finite gradients (or curvature products): the whole step is skipped — parameters, η and state untouched —
a ``RuntimeWarning`` is issued and every group's ``"skipped_steps"`` counter is incremented.

Distributed data parallel: η_t is a deterministic function of the gradients, the curvature products and state
that every rank updates identically, so once those are averaged over the ranks every rank computes the same η_t
and the same step; the scalars of the λ update need no communication of their own. What each variant needs:

* ``"hessian_free"`` under ``DistributedDataParallel``: nothing beyond DDP's own gradient all-reduce.
* ``"finite_difference"`` under DDP: the probe's backward pass is a second DDP backward, so DDP all-reduces the
  probe gradient too — two gradient all-reduces per step, no change to the training code.
* ``"exact"``: DDP cannot backpropagate with ``create_graph=True`` (it raises), so run the closure's forward and
  backward inside ``ddp_model.no_sync()`` and pass ``process_group`` (e.g. ``torch.distributed.group.WORLD``):
  LLR then averages the local gradients and Hessian-vector products in one all-reduce of twice the parameter
  size (the average of local H h is the global H h, since the loss is a mean over the ranks' equal batches).

``process_group`` works the same way for the other variants when no DDP wrapper does the averaging (one
all-reduce per gradient evaluation). Every rank must produce gradients for the same parameters.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from triptych._validation import check_choice, check_real

VARIANTS = ("exact", "finite_difference", "hessian_free")
BASES = ("sgd", "adagrad", "adam")
DEFAULT_HYPER_LR = 0.03
DEFAULT_FORGET = 0.1
DEFAULT_FD_EPS = 1e-3
MAX_GROW = 1.0  # η grows by at most e^μ per step
MAX_SHRINK = 30.0  # K: an unstable η may shrink by up to e^{μK} per step
NORM_DECAY = 0.5  # decay of ρ², the running mean square of ‖g‖ used by normalize=True

Closure = Callable[[], torch.Tensor]


def _checked_group_options(group: dict[str, Any]) -> dict[str, Any]:
    """Validate one param group's hyperparameters; return them normalised (floats, tuple betas)."""
    options = {
        "variant": check_choice("variant", group["variant"], VARIANTS),
        "base": check_choice("base", group["base"], BASES),
        "hyper_lr": check_real("hyper_lr", group["hyper_lr"], low=0.0),
        "forget": check_real("forget", group["forget"], low=0.0, high=1.0),
        "min_lr": check_real("min_lr", group["min_lr"], low=0.0, low_inclusive=False),
        "eps": check_real("eps", group["eps"], low=0.0),
        "weight_decay": check_real("weight_decay", group["weight_decay"], low=0.0),
        "fd_eps": check_real("fd_eps", group["fd_eps"], low=0.0, low_inclusive=False),
    }
    if not isinstance(group["normalize"], bool):
        raise TypeError(f"normalize must be a bool, got {group['normalize']!r}")
    options["normalize"] = group["normalize"]
    options["max_lr"] = check_real("max_lr", group["max_lr"], low=options["min_lr"])
    options["lr"] = check_real("lr", group["lr"], low=options["min_lr"], high=options["max_lr"])
    betas = group["betas"]
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    options["betas"] = (
        check_real("betas[0]", betas[0], low=0.0, high=1.0, high_inclusive=False),
        check_real("betas[1]", betas[1], low=0.0, high=1.0, high_inclusive=False),
    )
    return options


class LLR(Optimizer):
    r"""Online step-size learning (LLR) on top of SGD, AdaGrad or Adam; see the module docstring.

    Args:
        params: parameters or param groups; every option below can be set per group.
        lr: initial step size η₀; the current η_t is always ``param_group["lr"]`` (written by each step, and a
            value written there by a user or scheduler is taken as the new η).
        hyper_lr: μ, the learning rate of λ = log η. ``0`` freezes η (plain base optimizer).
        variant: how H_t h_t is obtained: ``"exact"``, ``"finite_difference"`` or ``"hessian_free"``.
            One variant for all groups.
        base: ``"sgd"``, ``"adagrad"`` or ``"adam"``.
        normalize: use the scale-free hypergradient d_t (our extension, see the module docstring); ``False`` is
            the paper's raw g_t·h_t.
        forget: γ ∈ [0, 1], forgetting of the sensitivity h (1 − γ per step).
        min_lr, max_lr: bounds of η (λ is clipped to [log min_lr, log max_lr]).
        betas: Adam's (β₁, β₂); ignored by other bases.
        eps: ε of AdaGrad/Adam's denominator.
        weight_decay: L2 penalty coefficient (coupled, as in ``torch.optim.Adam``).
        fd_eps: relative size of the finite-difference probe, ‖εh‖ = fd_eps · (1 + ‖θ‖).
        process_group: ``None`` (gradients are used as they are: single process, or already averaged by DDP), or a
            ``torch.distributed`` process group over which LLR averages the gradients (and the curvature products)
            itself, as data parallelism without DDP's hooks needs — required for ``variant="exact"`` under DDP,
            see the module docstring.

    Raises:
        ValueError / TypeError: an invalid hyperparameter, named with its value.

    Example::

        opt = LLR(model.parameters(), lr=1e-3)          # hessian_free, base sgd: use like torch.optim.SGD
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        print(opt.param_groups[0]["lr"])                # the learned η_t
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, *, hyper_lr: float = DEFAULT_HYPER_LR,
                 variant: str = "hessian_free", base: str = "sgd", normalize: bool = True,
                 forget: float = DEFAULT_FORGET, min_lr: float = 1e-10, max_lr: float = 1e3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 fd_eps: float = DEFAULT_FD_EPS, process_group: Any = None) -> None:
        defaults = {"lr": lr, "hyper_lr": hyper_lr, "variant": variant, "base": base, "normalize": normalize,
                    "forget": forget, "min_lr": min_lr, "max_lr": max_lr, "betas": betas, "eps": eps,
                    "weight_decay": weight_decay, "fd_eps": fd_eps}
        _checked_group_options(defaults)
        if process_group is not None and not torch.distributed.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group first, or pass process_group=None")
        self.process_group = process_group
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validating its options) with its own η and ``skipped_steps`` counter."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.update(_checked_group_options(group))
        group.setdefault("skipped_steps", 0)
        group.setdefault("grad_sq_avg", 0.0)
        if group["variant"] != self.param_groups[0]["variant"]:
            raise ValueError(f"variant must be the same in every param group; got {group['variant']!r} "
                             f"after {self.param_groups[0]['variant']!r}")

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | None:
        """One LLR step; returns the closure's loss (or ``None``). See the module docstring for the contract."""
        variant = self.param_groups[0]["variant"]
        if closure is None and variant != "hessian_free":
            raise ValueError(f"LLR(variant={variant!r}) needs a closure: call step(closure) where closure() "
                             "clears the gradients, evaluates the loss on the current minibatch, calls "
                             "loss.backward(" + ("create_graph=True" if variant == "exact" else "")
                             + ") and returns the loss")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if variant != "exact":
            self._average_over_ranks(self._grads())
        groups = [self._gather(group) for group in self.param_groups]
        if variant == "exact":  # the local graph gives the local H h; average it with g in one all-reduce
            curvatures = self._exact_curvature(groups)
            _detach_graph_grads(groups)
            if self._average_over_ranks(self._grads() + [c for curv in curvatures if curv for c in curv]):
                groups = [self._gather(group) for group in self.param_groups]  # g + wd·θ from the averaged g
            for gathered, curv in zip(groups, curvatures, strict=True):
                gathered["curv"] = curv
        stats = self._statistics(groups)
        if not _all_finite(stats):
            return self._skip(loss)
        if variant == "finite_difference" and not self._finite_difference_curvature(groups, stats, closure):
            return self._skip(loss)
        for group, gathered in zip(self.param_groups, groups, strict=True):
            _add_weight_decay_curvature(group, gathered)

        for group, gathered, group_stats in zip(self.param_groups, groups, stats, strict=True):
            if not gathered["params"]:
                continue
            group["lr"] = _next_lr(group, group_stats)
            self._init_state(group, gathered)
            _base_update(group, gathered, self.state)
        return loss

    def _grads(self) -> list[torch.Tensor]:
        """Every ``.grad`` of every group, in group and parameter order."""
        return [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _average_over_ranks(self, tensors: list[torch.Tensor]) -> bool:
        """Average ``tensors`` in place over ``process_group``'s ranks; ``False`` (and nothing done) without one."""
        if self.process_group is None:
            return False
        average_over_ranks(tensors, self.process_group)
        return True

    def _gather(self, group: dict[str, Any]) -> dict[str, Any]:
        """Lists of one group's params with a gradient, their effective gradients g + wd·θ and sensitivities."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("LLR does not support sparse gradients")
        raw_grads = [p.grad for p in params]
        grads = [g.detach() for g in raw_grads]
        if group["weight_decay"] != 0 and grads:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        sens = [self.state[p]["h"] if p in self.state and "h" in self.state[p] else None for p in params]
        return {"params": params, "raw_grads": raw_grads, "grads": grads, "sens": sens, "curv": None,
                "variant": group["variant"]}

    def _exact_curvature(self, groups: list[dict[str, Any]]) -> list[list[torch.Tensor] | None]:
        """H_t h_t by double backward through the gradients' graph, per group (``None`` where h = 0)."""
        if not any(g.requires_grad for gathered in groups for g in gathered["raw_grads"]):
            raise ValueError("LLR(variant='exact') needs the graph of the gradient: the closure must call "
                             "loss.backward(create_graph=True)")
        group_pairs = [[(g, p, h) for g, p, h in zip(gathered["raw_grads"], gathered["params"], gathered["sens"],
                                                     strict=True) if h is not None and g.requires_grad]
                       for gathered in groups]
        last = max((i for i, pairs in enumerate(group_pairs) if pairs), default=-1)
        out = []
        for i, (gathered, pairs) in enumerate(zip(groups, group_pairs, strict=True)):
            if not pairs:
                out.append(None)
                continue
            # Groups may share one graph (weights and biases of one layer): keep it until the last product.
            with torch.enable_grad():
                hvps = torch.autograd.grad([g for g, _, _ in pairs], [p for _, p, _ in pairs],
                                           grad_outputs=[h for _, _, h in pairs], allow_unused=True,
                                           retain_graph=i < last)
            by_param = {id(p): v for (_, p, _), v in zip(pairs, hvps, strict=True)}
            out.append([by_param.get(id(p)) if by_param.get(id(p)) is not None else torch.zeros_like(p)
                        for p in gathered["params"]])
        return out

    def _statistics(self, groups: list[dict[str, Any]]) -> list[list[float]]:
        """Per group [g·h, ‖g‖², ‖h‖², ‖θ‖², ‖c‖²] as floats, from one batch of reductions and one device sync.

        ‖θ‖² is only computed for the finite-difference probe and ‖c‖² only for exact curvature (else 0).
        """
        norm_lists: list[list[torch.Tensor]] = []  # per group: grads, sensitivities, params, curvatures
        dot_pairs: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for gathered in groups:
            pairs = [(g, h) for g, h in zip(gathered["grads"], gathered["sens"], strict=True) if h is not None]
            probe = pairs and gathered["variant"] == "finite_difference"
            norm_lists.append([gathered["grads"], [h for _, h in pairs], gathered["params"] if probe else [],
                               gathered["curv"] or []])
            dot_pairs.append(pairs)
        flat_norms = [t for lists in norm_lists for tensors in lists for t in tensors]
        scalars = list(torch._foreach_norm(flat_norms)) if flat_norms else []
        scalars += [torch.dot(g.reshape(-1), h.reshape(-1)) for pairs in dot_pairs for g, h in pairs]
        values = iter(torch.stack(scalars).tolist() if scalars else [])
        norm_sq = [[math.fsum(next(values) ** 2 for _ in tensors) for tensors in lists] for lists in norm_lists]
        return [[math.fsum(next(values) for _ in pairs), *squares] for pairs, squares in
                zip(dot_pairs, norm_sq, strict=True)]

    def _finite_difference_curvature(self, groups: list[dict[str, Any]], stats: list[list[float]],
                                     closure: Closure) -> bool:
        """Set H_t h_t ≈ (∇ℓ(θ + εh) − ∇ℓ(θ))/ε for every group; ``False`` if the probe is not finite."""
        probes = [(gathered, self.param_groups[i]["fd_eps"] * (1.0 + math.sqrt(row[3])) / math.sqrt(row[2]))
                  for i, (gathered, row) in enumerate(zip(groups, stats, strict=True)) if row[2] > 0]
        if not probes:
            return True
        moved = [(p, h, eps) for gathered, eps in probes for p, h in zip(gathered["params"], gathered["sens"],
                                                                          strict=True) if h is not None]
        saved_params = [p.detach().clone() for p, _, _ in moved]
        saved_grads = {p: p.grad for group in self.param_groups for p in group["params"]}
        for p, h, eps in moved:
            p.add_(h, alpha=eps)
        for p in saved_grads:
            p.grad = None  # so that a closure zeroing in place cannot overwrite ∇ℓ(θ_t)
        try:
            with torch.enable_grad():
                closure()
            probe_grads = {p: p.grad for p, _, _ in moved}
            self._average_over_ranks([g for g in probe_grads.values() if g is not None])
        finally:
            torch._foreach_copy_([p for p, _, _ in moved], saved_params)
            for p, grad in saved_grads.items():
                p.grad = grad
        finite = True
        for gathered, eps in probes:
            curv = []
            for p, g, h in zip(gathered["params"], gathered["raw_grads"], gathered["sens"], strict=True):
                g_plus = probe_grads.get(p) if h is not None else None
                curv.append(torch.zeros_like(p) if g_plus is None else (g_plus - g.detach()).div_(eps))
            finite = finite and bool(torch.isfinite(_sum_sq(curv)))
            gathered["curv"] = curv
        return finite

    def _init_state(self, group: dict[str, Any], gathered: dict[str, Any]) -> None:
        """Lazily create h = 0, the step count and the base optimizer's buffers."""
        for i, p in enumerate(gathered["params"]):
            state = self.state[p]
            if "h" in state:
                continue
            state["step"] = 0
            state["h"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            gathered["sens"][i] = state["h"]
            if group["base"] == "adagrad":
                state["sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif group["base"] == "adam":
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["variant"] != "hessian_free":
                    state["exp_avg_sensitivity"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _skip(self, loss: torch.Tensor | None) -> torch.Tensor | None:
        """Leave parameters, η and state as they are; warn and count the skipped step in every group."""
        for group in self.param_groups:
            group["skipped_steps"] += 1
        warnings.warn("LLR: non-finite gradient or curvature product; step skipped (parameters, step size "
                      "and state unchanged)", RuntimeWarning, stacklevel=3)
        return loss


def _sum_sq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ‖x‖² over a list of tensors, as a float64 scalar."""
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum()


def _all_finite(stats: list[list[float]]) -> bool:
    return all(math.isfinite(x) for row in stats for x in row)


def _detach_graph_grads(groups: list[dict[str, Any]]) -> None:
    """Drop the gradients' graph (``.grad`` would otherwise keep it alive); the gathered lists follow."""
    for gathered in groups:
        for p in gathered["params"]:
            p.grad = p.grad.detach()
        gathered["raw_grads"] = [p.grad for p in gathered["params"]]


def average_over_ranks(tensors: list[torch.Tensor], process_group: Any) -> None:
    """Replace every tensor by its mean over the ranks of ``process_group``: one all-reduce per dtype and device.

    Args:
        tensors: tensors of any shapes; every rank passes the same shapes in the same order.
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for all ranks).
    """
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    world = torch.distributed.get_world_size(process_group)
    for same in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        torch.distributed.all_reduce(flat, group=process_group)
        flat.div_(world)
        torch._foreach_copy_(same, [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in same]),
                                                                           same, strict=True)])


def _add_weight_decay_curvature(group: dict[str, Any], gathered: dict[str, Any]) -> None:
    """c_t += wd · h_t: the Hessian of the L2 term (the closure's gradients do not include it)."""
    if gathered["curv"] is None or group["weight_decay"] == 0:
        return
    for i, h in enumerate(gathered["sens"]):
        if h is not None:
            gathered["curv"][i].add_(h, alpha=group["weight_decay"])


def _next_lr(group: dict[str, Any], stats: list[float]) -> float:
    """η_t = exp(clip(λ_{t−1} − μ d_t)) from ``stats`` = [g·h, ‖g‖², ‖h‖², ...]; η unchanged when μ d_t = 0.

    With ``normalize`` it also advances the group's running mean square ρ² of ‖g‖ (``group["grad_sq_avg"]``).
    """
    dot, grad_sq, sens_sq = stats[0], stats[1], stats[2]
    if group["normalize"]:
        dot = _normalized_hypergradient(dot, grad_sq, sens_sq, group["grad_sq_avg"])
        previous = group["grad_sq_avg"]
        group["grad_sq_avg"] = grad_sq if previous == 0 else NORM_DECAY * previous + (1 - NORM_DECAY) * grad_sq
    delta = group["hyper_lr"] * dot
    lr = group["lr"]
    if delta != 0:
        lr = _clipped_exp(math.log(lr) - delta, group["min_lr"], group["max_lr"])
    return min(max(lr, group["min_lr"]), group["max_lr"])


def _clipped_exp(lam: float, min_lr: float, max_lr: float) -> float:
    """exp(clip(λ, log min_lr, log max_lr)), returning the bound itself (not exp(log(bound))) when clipped."""
    if lam <= math.log(min_lr):
        return min_lr
    if lam >= math.log(max_lr):
        return max_lr
    return math.exp(lam)


def _normalized_hypergradient(dot: float, grad_sq: float, sens_sq: float, grad_sq_avg: float) -> float:
    """d_t = clip(g_t·h_t / (‖h_t‖ ρ_{t−1}), −1, MAX_SHRINK) — our scale-free hypergradient (0 while h = 0).

    = cos(g_t, h_t) · ‖g_t‖/ρ_{t−1}: invariant to the scale of the loss and of θ, so μ is scale-free; η grows by
    at most e^μ per step; when the gradient norm jumps above its running RMS ρ (an unstable η) it can shrink by
    up to e^{μ·MAX_SHRINK} per step, before the trajectory blows up.
    """
    if sens_sq == 0 or grad_sq_avg == 0:
        return 0.0
    return min(max(dot / (math.sqrt(sens_sq) * math.sqrt(grad_sq_avg)), -MAX_GROW), MAX_SHRINK)


def _base_update(group: dict[str, Any], gathered: dict[str, Any], state: dict[torch.Tensor, Any]) -> None:
    """Apply θ_{t+1} = θ_t − η u_t and h_{t+1} = (1−γ) h_t − η u_t − η c'_t for the group's base optimizer."""
    params, grads, sens, curv = gathered["params"], gathered["grads"], gathered["sens"], gathered["curv"]
    for p in params:
        state[p]["step"] += 1
    lr, forget = group["lr"], group["forget"]
    if group["base"] == "sgd":
        llr_sgd(params, grads, sens, curv, lr=lr, forget=forget)
    elif group["base"] == "adagrad":
        llr_adagrad(params, grads, sens, curv, [state[p]["sum"] for p in params], lr=lr, forget=forget,
                    eps=group["eps"])
    else:
        llr_adam(params, grads, sens, curv, [state[p]["exp_avg"] for p in params],
                 [state[p]["exp_avg_sq"] for p in params],
                 [state[p]["exp_avg_sensitivity"] for p in params] if curv is not None else None,
                 [state[p]["step"] for p in params], lr=lr, forget=forget, betas=group["betas"], eps=group["eps"])


def llr_sgd(params: list[torch.Tensor], grads: list[torch.Tensor], sens: list[torch.Tensor],
            curv: list[torch.Tensor] | None, *, lr: float, forget: float) -> None:
    """SGD base: θ ← θ − η g ; h ← (1−γ) h − η g − η H h (``curv`` = H h, ``None`` for hessian-free)."""
    torch._foreach_add_(params, grads, alpha=-lr)
    if forget != 0:
        torch._foreach_mul_(sens, 1.0 - forget)
    torch._foreach_add_(sens, grads, alpha=-lr)
    if curv is not None:
        torch._foreach_add_(sens, curv, alpha=-lr)


def llr_adagrad(params: list[torch.Tensor], grads: list[torch.Tensor], sens: list[torch.Tensor],
                curv: list[torch.Tensor] | None, sums: list[torch.Tensor], *, lr: float, forget: float,
                eps: float) -> None:
    """AdaGrad base: v ← v + g², P = 1/(√v + ε); θ ← θ − η P g ; h ← (1−γ) h − η P g − η P H h."""
    torch._foreach_addcmul_(sums, grads, grads, value=1)
    std = torch._foreach_sqrt(sums)
    torch._foreach_add_(std, eps)
    torch._foreach_addcdiv_(params, grads, std, value=-lr)
    if forget != 0:
        torch._foreach_mul_(sens, 1.0 - forget)
    torch._foreach_addcdiv_(sens, grads, std, value=-lr)
    if curv is not None:
        torch._foreach_addcdiv_(sens, curv, std, value=-lr)


def llr_adam(params: list[torch.Tensor], grads: list[torch.Tensor], sens: list[torch.Tensor],
             curv: list[torch.Tensor] | None, exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
             exp_avg_sens: list[torch.Tensor] | None, steps: list[int], *, lr: float, forget: float,
             betas: tuple[float, float], eps: float) -> None:
    """Adam base (after this step's count ``steps``): θ ← θ − η m̂/(√v̂ + ε) ; h ← (1−γ) h − η u − η P ŝ.

    ``exp_avg_sens`` is s = ∂m/∂λ, updated as s ← β₁ s + (1−β₁) H h when ``curv`` is given.
    """
    beta1, beta2 = betas
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    neg_step_sizes = [-(lr / (1 - beta1**step)) for step in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2**step) ** 0.5 for step in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, neg_step_sizes)
    if forget != 0:
        torch._foreach_mul_(sens, 1.0 - forget)
    torch._foreach_addcdiv_(sens, exp_avgs, denom, neg_step_sizes)
    if curv is not None and exp_avg_sens is not None:
        torch._foreach_lerp_(exp_avg_sens, curv, 1 - beta1)
        torch._foreach_addcdiv_(sens, exp_avg_sens, denom, neg_step_sizes)
