"""Reproduction of "Speed learning on the fly" (Massé & Ollivier, arXiv 1511.02540): experiments E1–E4.

The paper learns the step size online ("LLR", learning the learning rate). We could not read its full text; the
optimizer (:class:`triptych.optim.LLR`) implements our own derivation from its description (minimisation form,
log step size ``λ_t = log η_t``, sensitivity ``h_t = ∂θ_t/∂λ``)::

    θ_{t+1} = θ_t − η_t g_t
    h_{t+1} = h_t − η_t H_t h_t − η_t g_t        (the Hessian-free variant drops H_t h_t and forgets: (1−γ) h_t)
    λ_{t+1} = λ_t − μ g_{t+1}·h_{t+1}

Protocol (the same for every optimizer):

- Online (prequential) loss: at step ``t`` the loss ``ℓ_t(θ_t)`` of the minibatch ``(x_t, y_t)`` is recorded
  BEFORE the update that uses its gradient; the cumulative online loss is ``Σ_t ℓ_t(θ_t)`` (batch means).
- Final loss: the loss of the final parameters ``θ_T`` on a fresh held-out sample of the distribution in force at
  the end of the stream (10,000 samples for E1–E3, the MNIST test set for E4).
- Divergence: a run whose online loss is non-finite or exceeds ``divergence_factor`` × the loss of the initial
  parameters is stopped and counted; its losses are then infinite.
- Every optimizer of a grid is stepped on the same stream from the same initial parameters. The runs are
  independent problems solved side by side in one process: their parameters are rows of one stacked tensor
  (one forward/backward for all), and each run has its own optimizer instance on a view of its row.

Experiments: E1 stationary linear regression (ill-conditioned inputs, batch 1), E2 the same with a jump of the
true parameter at T/2 and with a random-walk parameter, E3 online logistic regression, E4 an MLP trained online
on one pass of MNIST. Baselines: fixed-η SGD at every η_0 (and the best in hindsight), the schedule
``η_t = η_0 / (1 + t/t_0)``, hypergradient descent (SGD-HD, Baydin et al. 2018), recursive least squares (E1
oracle), and Prodigy, D-Adaptation and Schedule-Free SGD when their packages are installed.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing
import statistics
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from triptych._validation import check_choice, check_int
from triptych.data.mnist import load_mnist
from triptych.data.streams import OnlineStream, linear_regression_stream, logistic_regression_stream, mnist_stream
from triptych.experiments.report import Report, markdown_table, progress, save_figure, set_quiet
from triptych.optim import LLR, SGDHD
from triptych.optim.llr import DEFAULT_HYPER_LR

log = logging.getLogger(__name__)

EXPERIMENTS = ("E1", "E2-jump", "E2-walk", "E3", "E4")
DESCRIPTIONS = {
    "E1": "stationary linear regression",
    "E2-jump": "linear regression, true parameter jumps at T/2",
    "E2-walk": "linear regression, random-walk true parameter",
    "E3": "online logistic regression",
    "E4": "MLP on one pass of MNIST",
}
# Methods in the order of the report tables.
LLR_NAME, SGD_NAME, INVT_NAME, HD_NAME = "LLR", "SGD", "SGD 1/t", "SGD-HD"
PEERS = {  # report name -> (module, class); optional imports, omitted when absent
    "Prodigy": ("prodigyopt", "Prodigy"),
    "D-Adaptation": ("dadaptation", "DAdaptSGD"),
    "Schedule-Free": ("schedulefree", "SGDScheduleFree"),
}


# --------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class LLRConfig:
    """Everything that defines one reproduction run (saved next to its results).

    Attributes:
        scale: ``"quick"`` or ``"full"``.
        seed: seed of the streams and of the MLP initialisation.
        experiments: which of ``E1, E2-jump, E2-walk, E3, E4`` to run.
        n_steps: ``T`` for E1–E3 (batch 1).
        lr_grid: LLR's initial step sizes ``η_0`` (also SGD-HD's and Schedule-Free's grid).
        baseline_lr_grid: the step sizes of fixed-η SGD and of the 1/t schedule (finer: these runs are cheap, and
            a finely tuned best SGD is the reference of every ratio); it contains ``lr_grid``.
        hyper_lr_grid: LLR's hyper learning rates ``μ``.
        default_hyper_lr: the ``μ`` the headline tables and the targets use (the optimizer's default).
        hd_hyper_lr_grid: SGD-HD's hypergradient rates ``β`` (tried at every ``η_0``).
        inverse_time_t0: ``t_0`` of the schedule ``η_0 / (1 + t/t_0)``, as fractions of ``T``.
        divergence_factor: a run diverges when its online loss exceeds this multiple of the initial loss.
        regression_dim, logistic_dim: ``d`` of E1–E2 and of E3.
        variance_decades: input variances span this many decades (E1–E3).
        noise_std: label noise ``σ`` of E1–E2.
        walk_scale: total random-walk displacement (standard deviation per coordinate) of E2-walk.
        n_heldout: held-out sample size of E1–E3.
        mnist_samples: training images streamed in E4 (one pass, ``None`` = all 60,000).
        mnist_heldout: test images used for E4's final loss (``None`` = all 10,000).
        mnist_batch: E4 minibatch size.
        mnist_hidden: hidden units of E4's MLP (784 → hidden → 10, ReLU).
        mnist_lr_grid: ``η_0`` grid of E4 for every method (E4's runs are costlier).
        n_records: how many points of ``η_t`` and of the running loss are kept per run.
        target_lr_range: the ``η_0`` range the issue's targets require, and the range they aim for.
        curvature_variants: LLR's variants with curvature (``"finite_difference"``, ``"exact"``) run at the
            default μ from each ``η_0`` of ``variant_lr_grid`` in the experiments ``variant_experiments``, against
            the default Hessian-free variant.
        workers: experiments run in parallel processes (each one deterministic, so the results do not depend
            on it); :func:`make_config` uses one per torch thread (``--threads``).
    """

    scale: str
    seed: int
    experiments: tuple[str, ...]
    n_steps: int
    lr_grid: tuple[float, ...]
    baseline_lr_grid: tuple[float, ...]
    hyper_lr_grid: tuple[float, ...]
    default_hyper_lr: float
    hd_hyper_lr_grid: tuple[float, ...]
    inverse_time_t0: tuple[float, ...]
    mnist_samples: int | None
    mnist_heldout: int | None
    mnist_lr_grid: tuple[float, ...]
    mnist_hidden: int = 100
    mnist_batch: int = 32
    divergence_factor: float = 1e6
    regression_dim: int = 20
    logistic_dim: int = 50
    variance_decades: float = 2.0
    noise_std: float = 0.1
    walk_scale: float = 1.0
    n_heldout: int = 10_000
    n_records: int = 200
    target_lr_range: tuple[float, float] = (1e-4, 1.0)
    aim_lr_range: tuple[float, float] = (1e-5, 10.0)
    curvature_variants: tuple[str, ...] = ("finite_difference", "exact")
    variant_lr_grid: tuple[float, ...] = (1e-4, 1e-2, 1.0)
    variant_experiments: tuple[str, ...] = ("E1",)
    workers: int = 1


def _log_grid(low_exp: float, high_exp: float, per_decade: int) -> tuple[float, ...]:
    """``10^e`` for ``e`` from ``low_exp`` to ``high_exp`` in steps of ``1/per_decade`` (rounded for display)."""
    n = int(round((high_exp - low_exp) * per_decade)) + 1
    return tuple(float(f"{10 ** (low_exp + i / per_decade):.3g}") for i in range(n))


def make_config(scale: str = "quick", seed: int = 0) -> LLRConfig:
    """The configuration of a ``quick`` (≤ 5 min on 2 cores) or ``full`` (≈ 20–30 min) reproduction.

    Raises:
        ValueError: for ``scale="paper"`` (the paper's exact budgets are unknown: its text was not read).
    """
    check_choice("scale", scale, ("quick", "full", "paper"))
    seed = check_int("seed", seed, low=0)
    if scale == "paper":
        raise ValueError("scale 'paper' is not supported for llr: the paper's experimental budgets are not known "
                         "(its full text was not available); use 'quick' or 'full'")
    common = {"scale": scale, "seed": seed, "experiments": EXPERIMENTS, "lr_grid": _log_grid(-5, 1, 1),
              "hyper_lr_grid": tuple(float(f"{DEFAULT_HYPER_LR * 10.0 ** k:.3g}") for k in (-2, 0, 1)),
              "default_hyper_lr": DEFAULT_HYPER_LR, "workers": max(1, torch.get_num_threads())}
    if scale == "quick":
        return LLRConfig(**common, n_steps=600, baseline_lr_grid=_log_grid(-5, 1, 2), hd_hyper_lr_grid=(1e-3,),
                         inverse_time_t0=(0.1,), mnist_samples=1600, mnist_heldout=2000,
                         mnist_lr_grid=_log_grid(-5, 1, 1), mnist_hidden=32, variant_lr_grid=(1e-2,))
    return LLRConfig(**common, n_steps=20_000, baseline_lr_grid=_log_grid(-5, 1, 4),
                     hd_hyper_lr_grid=(1e-4, 1e-3, 1e-2), inverse_time_t0=(0.01, 0.1), mnist_samples=None,
                     mnist_heldout=None, mnist_lr_grid=_log_grid(-5, 1, 1))


# --------------------------------------------------------------------------------------------------- models
Forward = Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]


def linear_forward(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Outputs ``(K, B)`` of ``K`` linear models ``xᵀθ_k``; ``params = [θ (K, d)]``, ``x (B, d)``."""
    (theta,) = params
    return theta @ x.T


def mlp_forward(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits ``(K, B, C)`` of ``K`` one-hidden-layer ReLU MLPs.

    ``params = [W1 (K, D, H), b1 (K, H), W2 (K, H, C), b2 (K, C)]``, ``x (B, D)``.
    """
    w1, b1, w2, b2 = params
    hidden = torch.relu(torch.einsum("bd,kdh->kbh", x, w1) + b1.unsqueeze(1))
    return torch.baddbmm(b2.unsqueeze(1), hidden, w2)


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Per-sample losses ``(K, B)`` from outputs ``(K, B)`` or logits ``(K, B, C)`` and targets ``(B,)``.

    ``"regression"``: ½(ŷ − y)²; ``"logistic"``: binary cross-entropy on the logit; ``"classification"``:
    cross-entropy.
    """
    if task == "regression":
        return 0.5 * (outputs - targets).square()
    if task == "logistic":
        return F.binary_cross_entropy_with_logits(outputs, targets.expand_as(outputs), reduction="none")
    n_runs, batch, n_classes = outputs.shape
    return F.cross_entropy(outputs.reshape(-1, n_classes), targets.repeat(n_runs),
                           reduction="none").view(n_runs, batch)


@dataclass
class StackedParameters:
    """``K`` independent copies of one model's parameters, stacked for one forward/backward.

    ``stacked[j]`` is a leaf ``(K, *shape_j)``; ``per_run[k][j]`` is a leaf view of row ``k`` that shares its
    storage, so run ``k``'s optimizer updates the stacked tensor in place. :meth:`set_grads` backpropagates once
    and points each live run's ``.grad`` at its row of the fresh gradients ``grads[j]`` (no copy).
    """

    stacked: list[torch.Tensor]
    per_run: list[list[torch.Tensor]]
    live: list[int]
    grads: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def replicate(cls, initial: Sequence[torch.Tensor], n_runs: int) -> StackedParameters:
        """``n_runs`` copies of the parameters ``initial`` (each run starts from the same point)."""
        stacked = [p.detach().unsqueeze(0).repeat(n_runs, *([1] * p.dim())).requires_grad_() for p in initial]
        per_run = [[p.detach()[k].requires_grad_() for p in stacked] for k in range(n_runs)]
        return cls(stacked, per_run, list(range(n_runs)))

    def set_grads(self, total_loss: torch.Tensor) -> None:
        """Backpropagate ``total_loss`` (the sum of the runs' losses) into every live run's ``.grad``."""
        self.grads = list(torch.autograd.grad(total_loss, self.stacked))
        for k in self.live:
            for view, grad in zip(self.per_run[k], self.grads, strict=True):
                view.grad = grad[k]

    def stop(self, k: int) -> None:
        """Stop run ``k``: no gradient from now on (optimizers skip it), parameters parked at 0 (finite)."""
        self.live.remove(k)
        for view in self.per_run[k]:
            view.grad = None
            view.detach().zero_()
        for grad in self.grads:
            grad[k].zero_()


def initial_parameters(stream: OnlineStream, hidden: int, seed: int) -> tuple[list[torch.Tensor], Forward]:
    """The common starting point and forward function: ``θ_0 = 0`` for E1–E3, PyTorch's default init for E4."""
    if stream.task != "classification":
        return [torch.zeros(stream.dim, dtype=stream.inputs.dtype)], linear_forward
    generator = torch.Generator().manual_seed(seed)
    n_classes = int(stream.heldout_targets.max()) + 1

    def uniform(fan_in: int, *shape: int) -> torch.Tensor:  # torch.nn.Linear's default initialisation
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(*shape, generator=generator) * 2 - 1) * bound

    params = [uniform(stream.dim, stream.dim, hidden), uniform(stream.dim, hidden),
              uniform(hidden, hidden, n_classes), uniform(hidden, n_classes)]
    return params, mlp_forward


# -------------------------------------------------------------------------------------------------- methods
@dataclass
class RunSpec:
    """One optimizer configuration of a grid.

    Attributes:
        method: report name (``"LLR"``, ``"SGD"``, ...).
        hparams: the hyperparameters that distinguish this run (``lr0``, ``hyper_lr``, ``t0`` ...).
        factory: ``param_groups -> optimizer``; ``None`` for plain SGD with the step size
            ``η_t = lr0 / (1 + t/t0)`` (``t0 = inf``: fixed), which the runner applies to all such runs at once as
            ``θ ← θ − η_t g`` (the update of ``torch.optim.SGD`` without momentum, without its per-run overhead).
        options: this run's param-group options (``lr``, ``hyper_lr`` ...).
        shareable: the optimizer treats param groups independently, so the runs with the same ``factory`` may be
            groups of ONE instance (one Python call per step instead of one per run). ``False`` for optimizers
            with state shared across groups (Prodigy's and D-Adaptation's distance estimate).
        schedule_free: call ``.train()`` before the first step and ``.eval()`` before the final evaluation.
        track_lr: record ``param_group["lr"]`` (the adapted step size ``η_t``).
        closure: ``None``, or how the optimizer's closure backpropagates: ``"backward"`` (LLR's
            finite-difference variant) or ``"create_graph"`` (its exact variant, which differentiates ``.grad``).
    """

    method: str
    hparams: dict[str, float]
    factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None
    options: dict[str, float] = field(default_factory=dict)
    shareable: bool = True
    schedule_free: bool = False
    track_lr: bool = False
    closure: str | None = None


def _llr_finite_difference(param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """LLR with H_t h_t by finite differences of the gradient (one extra closure call per step)."""
    return LLR(param_groups, variant="finite_difference")


def _llr_exact(param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """LLR with the exact Hessian-vector product H_t h_t (double backward)."""
    return LLR(param_groups, variant="exact")


# LLR's curvature variants compared in `config.variant_experiments`: name -> (factory, closure kind, shareable).
# The exact variant gets one optimizer per run: it differentiates each group's gradients separately, which
# cannot be done twice through one graph shared by several groups.
CURVATURE_VARIANTS = {
    "finite_difference": (_llr_finite_difference, "backward", True),
    "exact": (_llr_exact, "create_graph", False),
}


def _sgdhd(param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """SGD-HD over param groups that each carry their own ``lr`` and ``hyper_lr``."""
    return SGDHD(param_groups, lr=1.0, hyper_lr=0.0)


def _optional_class(module: str, name: str) -> type | None:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def available_peers() -> dict[str, type]:
    """The peer optimizers whose packages are installed (the ``bench`` extra)."""
    found = {label: _optional_class(module, name) for label, (module, name) in PEERS.items()}
    return {label: cls for label, cls in found.items() if cls is not None}


def method_grid(config: LLRConfig, lr_grid: Sequence[float], baseline_lr_grid: Sequence[float], n_steps: int,
                peers: dict[str, type], variants: Sequence[str] = ()) -> list[RunSpec]:
    """Every run of one experiment: LLR over η_0 × μ, fixed SGD, 1/t, SGD-HD, and the installed peers.

    ``variants`` adds LLR's curvature variants (``"finite_difference"``, ``"exact"``) at the default μ from each
    ``η_0`` of ``config.variant_lr_grid``, reported as methods ``"LLR exact"`` etc. (``"LLR"`` alone is the
    default, Hessian-free).
    """
    specs = [RunSpec(LLR_NAME, {"lr0": lr0, "hyper_lr": mu}, LLR, {"lr": lr0, "hyper_lr": mu}, track_lr=True)
             for mu in config.hyper_lr_grid for lr0 in lr_grid]
    for variant in variants:
        factory, closure, shareable = CURVATURE_VARIANTS[variant]
        mu = config.default_hyper_lr
        specs += [RunSpec(f"{LLR_NAME} {variant}", {"lr0": lr0, "hyper_lr": mu}, factory,
                          {"lr": lr0, "hyper_lr": mu}, shareable=shareable, track_lr=True, closure=closure)
                  for lr0 in config.variant_lr_grid]
    specs += [RunSpec(SGD_NAME, {"lr0": lr0}) for lr0 in baseline_lr_grid]
    for fraction in config.inverse_time_t0:
        t0 = max(1.0, fraction * n_steps)
        specs += [RunSpec(INVT_NAME, {"lr0": lr0, "t0": t0}) for lr0 in baseline_lr_grid]
    specs += [RunSpec(HD_NAME, {"lr0": lr0, "hyper_lr": beta}, _sgdhd, {"lr": lr0, "hyper_lr": beta}, track_lr=True)
              for beta in config.hd_hyper_lr_grid for lr0 in lr_grid]
    for label, cls in peers.items():
        if label == "Schedule-Free":
            specs += [RunSpec(label, {"lr0": lr0}, cls, {"lr": lr0}, schedule_free=True) for lr0 in lr_grid]
        else:  # parameter-free: their default lr = 1 multiplies the estimated step
            specs.append(RunSpec(label, {}, cls, shareable=False))
    return specs


# --------------------------------------------------------------------------------------------------- runner
@dataclass
class RunResult:
    """What one run produced. Losses are ``inf`` for a diverged run."""

    method: str
    hparams: dict[str, float]
    cumulative_loss: float
    final_loss: float
    final_accuracy: float | None = None
    diverged_at: int | None = None
    lr_trace: list[float] = field(default_factory=list)


@dataclass
class GridResult:
    """All runs of one experiment on one stream.

    Attributes:
        record_steps: the steps ``t`` at which ``lr_trace`` and ``loss_trace`` were recorded.
        loss_trace: ``(K, R)`` cumulative online loss at each recorded step (before that step's loss is added).
        initial_loss: held-out loss of the initial parameters (the divergence reference).
    """

    runs: list[RunResult]
    record_steps: list[int]
    loss_trace: torch.Tensor
    initial_loss: float
    n_steps: int


def _evaluate(forward: Forward, params: Sequence[torch.Tensor], stream: OnlineStream,
              chunk: int = 2000) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Held-out mean loss ``(K,)`` (and accuracy ``(K,)`` for classification) of the stacked parameters."""
    losses, correct = [], []
    with torch.no_grad():
        for start in range(0, stream.heldout_inputs.shape[0], chunk):
            x = stream.heldout_inputs[start:start + chunk]
            y = stream.heldout_targets[start:start + chunk]
            outputs = forward(params, x)
            losses.append(per_sample_loss(outputs, y, stream.task).sum(dim=1))
            if stream.task == "classification":
                correct.append((outputs.argmax(dim=-1) == y).sum(dim=1))
    n = stream.heldout_inputs.shape[0]
    loss = torch.stack(losses).sum(dim=0) / n
    accuracy = torch.stack(correct).sum(dim=0).double() / n if correct else None
    return loss, accuracy


def _closure(forward: Forward, params: StackedParameters, runs: Sequence[int], x: torch.Tensor, y: torch.Tensor,
             task: str, kind: str) -> Callable[[], torch.Tensor]:
    """The usual ``closure()`` for the optimizer of ``runs``: their minibatch loss at the CURRENT parameters.

    The forward goes through the runs' own parameter views (stacked), so ``.grad`` lands on them and, with
    ``kind="create_graph"``, keeps the graph the exact variant differentiates.
    """
    def closure() -> torch.Tensor:
        live = [k for k in runs if k in params.live]
        for k in live:
            for view in params.per_run[k]:
                view.grad = None
        stacked = [torch.stack(views) for views in zip(*(params.per_run[k] for k in live), strict=True)]
        loss = per_sample_loss(forward(stacked, x), y, task).mean(dim=1).sum()
        if kind == "create_graph":
            with warnings.catch_warnings():  # LLR detaches .grad after its step: no parameter-gradient cycle
                warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True", UserWarning)
                loss.backward(create_graph=True)
        else:
            loss.backward()
        return loss
    return closure


def _build_optimizers(specs: Sequence[RunSpec],
                      params: StackedParameters) -> list[tuple[torch.optim.Optimizer, list[int]]]:
    """One optimizer per factory for shareable runs (a param group per run), one per run otherwise.

    Returns:
        ``(optimizer, runs)`` pairs; ``runs[i]`` is the run whose parameters are ``param_groups[i]``.
    """
    shared: dict[Any, list[int]] = {}
    alone: list[list[int]] = []
    for k, spec in enumerate(specs):
        if spec.factory is None:
            continue
        if spec.shareable:
            shared.setdefault(spec.factory, []).append(k)
        else:
            alone.append([k])
    instances = []
    for runs in [*shared.values(), *alone]:
        factory = specs[runs[0]].factory
        groups = [{"params": params.per_run[k], **specs[k].options} for k in runs]
        instances.append((factory(groups), runs))
    return instances


def run_online(stream: OnlineStream, specs: Sequence[RunSpec], *, initial: Sequence[torch.Tensor],
               forward: Forward, divergence_factor: float = 1e6, n_records: int = 200,
               desc: str = "online") -> GridResult:
    """Run every spec on ``stream`` side by side, recording the prequential loss before each update.

    At step ``t`` every live run ``k`` incurs ``ℓ_t(θ_t^k)`` — the minibatch mean loss at its CURRENT parameters —
    and only then takes its optimizer step with that minibatch's gradient.

    Args:
        stream: the data; all runs see the same minibatches.
        specs: the ``K`` runs.
        initial: the starting parameters, shared by all runs.
        forward: batched forward, ``(params stacked over K, x (B, d)) -> outputs (K, B[, C])``.
        divergence_factor: a run is stopped once its online loss is non-finite or above this multiple of the
            initial held-out loss.
        n_records: number of recorded points of ``η_t`` and of the cumulative loss.
    """
    n_runs, n_steps = len(specs), stream.n_steps
    params = StackedParameters.replicate(initial, n_runs)
    instances = _build_optimizers(specs, params)
    group_of = {k: (optimizer, i) for optimizer, runs in instances for i, k in enumerate(runs)}
    schedule_free = [optimizer for optimizer, runs in instances if specs[runs[0]].schedule_free]
    for optimizer in schedule_free:
        optimizer.train()
    # Plain-SGD runs: η_t = lr0 / (1 + t · inv_t0), all updated by one vectorised step.
    plain = torch.tensor([k for k, spec in enumerate(specs) if spec.factory is None], dtype=torch.long)
    plain_lr0 = torch.tensor([specs[k].hparams["lr0"] for k in plain.tolist()], dtype=torch.float64)
    plain_inv_t0 = torch.tensor([1.0 / specs[k].hparams.get("t0", math.inf) for k in plain.tolist()],
                                dtype=torch.float64)
    initial_loss = float(_evaluate(forward, [p[:1] for p in params.stacked], stream)[0][0])
    threshold = divergence_factor * initial_loss
    record_every = max(1, n_steps // n_records)
    record_steps = list(range(0, n_steps, record_every))
    traces: list[list[float]] = [[] for _ in specs]
    tracked = [k for k, spec in enumerate(specs) if spec.track_lr]
    cumulative = torch.zeros(n_runs, dtype=torch.float64)
    snapshots = []
    alive = torch.ones(n_runs, dtype=torch.bool)
    active = list(instances)
    diverged_at: dict[int, int] = {}
    for t in progress(range(n_steps), desc=desc, total=n_steps):
        x, y = stream.inputs[t], stream.targets[t]
        if t % record_every == 0:
            snapshots.append(cumulative.clone())
            for k in tracked:
                optimizer, i = group_of[k]
                lr = float(optimizer.param_groups[i]["lr"]) if k not in diverged_at else math.nan
                traces[k].append(float(f"{lr:.4g}"))  # 4 digits: a plot and a ratio, not a checkpoint
        losses = per_sample_loss(forward(params.stacked, x), y, stream.task).mean(dim=1)  # (K,) at θ_t
        observed = losses.detach().double()
        failed = alive & ~(observed <= threshold)  # NaN compares False: counted as failed
        newly_failed = failed.nonzero().flatten().tolist() if bool(failed.any()) else []
        if newly_failed:
            diverged_at.update((k, t) for k in newly_failed)
            alive &= ~failed
            losses = torch.where(alive, losses, 0.0)
        cumulative += torch.where(alive, observed, 0.0)
        params.set_grads(losses.sum())
        if newly_failed:
            for k in newly_failed:
                params.stop(k)
            active = [(optimizer, runs) for optimizer, runs in active if any(alive[k] for k in runs)]
        if len(plain):
            lr = plain_lr0 / (1.0 + t * plain_inv_t0) * alive[plain]
            for theta, grad in zip(params.stacked, params.grads, strict=True):
                step = grad.index_select(0, plain) * lr.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
                theta.detach().index_add_(0, plain, step, alpha=-1.0)
        for optimizer, runs in active:
            kind = specs[runs[0]].closure
            optimizer.step(None if kind is None else _closure(forward, params, runs, x, y, stream.task, kind))
    for optimizer in schedule_free:
        optimizer.eval()  # Schedule-Free's output is its averaged iterate
    final, accuracy = _evaluate(forward, params.stacked, stream)
    runs = []
    for k, spec in enumerate(specs):
        failed = k in diverged_at or not math.isfinite(float(final[k]))
        runs.append(RunResult(
            method=spec.method, hparams=dict(spec.hparams),
            cumulative_loss=math.inf if failed else float(cumulative[k]),
            final_loss=math.inf if failed else float(final[k]),
            final_accuracy=None if accuracy is None or failed else float(accuracy[k]),
            diverged_at=diverged_at.get(k, n_steps if failed else None), lr_trace=traces[k]))
    return GridResult(runs, record_steps, torch.stack(snapshots, dim=1), initial_loss, n_steps)


def recursive_least_squares(stream: OnlineStream, delta: float = 1e-3) -> tuple[float, float]:
    """The E1 oracle: recursive least squares from ``θ_0 = 0``, ``P_0 = I/δ``; batch-1 streams only.

    ``k_t = P_t x_t / (1 + x_tᵀP_t x_t)``, ``θ_{t+1} = θ_t + k_t (y_t − x_tᵀθ_t)``, ``P_{t+1} = P_t − k_t x_tᵀP_t``;
    the prequential loss ½(x_tᵀθ_t − y_t)² is taken before each update.

    Returns:
        ``(cumulative online loss, held-out loss of θ_T)``.
    """
    x_all = stream.inputs[:, 0].double()
    y_all = stream.targets[:, 0].double()
    theta = torch.zeros(stream.dim, dtype=torch.float64)
    precision_inv = torch.eye(stream.dim, dtype=torch.float64) / delta
    residuals = torch.empty(stream.n_steps, dtype=torch.float64)
    for t in range(stream.n_steps):
        x = x_all[t]
        residual = y_all[t] - x @ theta
        residuals[t] = residual
        px = precision_inv @ x
        gain = px / (1.0 + x @ px)
        theta += gain * residual
        precision_inv -= torch.outer(gain, px)
    cumulative = float(0.5 * residuals.square().sum())
    final = 0.5 * float((stream.heldout_inputs.double() @ theta - stream.heldout_targets.double()).square().mean())
    return cumulative, final


# ------------------------------------------------------------------------------------------------- analysis
def _select(runs: Sequence[RunResult], method: str, **hparams: float) -> list[RunResult]:
    return [r for r in runs if r.method == method and all(r.hparams.get(k) == v for k, v in hparams.items())]


def best_fixed_sgd(runs: Sequence[RunResult]) -> dict[str, float]:
    """The best-in-hindsight fixed-η SGD, separately for cumulative and final loss (with its η)."""
    sgd = _select(runs, SGD_NAME)
    by_cum = min(sgd, key=lambda r: r.cumulative_loss)
    by_final = min(sgd, key=lambda r: r.final_loss)
    return {"cumulative_loss": by_cum.cumulative_loss, "cumulative_lr": by_cum.hparams["lr0"],
            "final_loss": by_final.final_loss, "final_lr": by_final.hparams["lr0"]}


def _ratio(value: float, reference: float) -> float:
    return value / reference if math.isfinite(value) and reference > 0 else math.inf


def _in_range(lr0: float, lr_range: Sequence[float]) -> bool:
    return lr_range[0] * (1 - 1e-9) <= lr0 <= lr_range[1] * (1 + 1e-9)


def eta_spread(grid: GridResult, hyper_lr: float, lr_range: Sequence[float] | None = None) -> dict[str, Any]:
    """How close the LLR ``η_t`` curves from different ``η_0`` are: ``max_k η_t / min_k η_t`` over live runs.

    Returns:
        ``spread`` per recorded step, ``spread_at_10pct`` (at the first recorded step ≥ 0.1 T) and
        ``first_within_2`` (first recorded step from which the spread stays ≤ 2; ``None`` if never).
    """
    runs = [r for r in _select(grid.runs, LLR_NAME, hyper_lr=hyper_lr)
            if lr_range is None or _in_range(r.hparams["lr0"], lr_range)]
    curves = torch.tensor([r.lr_trace for r in runs if r.diverged_at is None], dtype=torch.float64)
    if curves.numel() == 0:
        return {"spread": [], "spread_at_10pct": math.inf, "spread_at_end": math.inf, "first_within_2": None,
                "n_curves": 0}
    spread = curves.max(dim=0).values / curves.min(dim=0).values
    steps = grid.record_steps
    at_10 = next((i for i, step in enumerate(steps) if step >= 0.1 * grid.n_steps), len(steps) - 1)
    above = (spread > 2).nonzero().flatten().tolist()
    first = 0 if not above else (above[-1] + 1 if above[-1] + 1 < len(steps) else None)
    return {"spread": spread.tolist(), "spread_at_10pct": float(spread[at_10]), "spread_at_end": float(spread[-1]),
            "first_within_2": None if first is None else steps[first], "n_curves": len(curves)}


def summarise(grid: GridResult, config: LLRConfig) -> dict[str, Any]:
    """Ratios to the best fixed SGD, per-method best-in-hindsight, divergence counts and η_t spread."""
    best = best_fixed_sgd(grid.runs)
    mu = config.default_hyper_lr
    per_lr = []
    llr_lrs = sorted({r.hparams["lr0"] for r in _select(grid.runs, LLR_NAME)})
    for lr0 in llr_lrs:
        (sgd,) = _select(grid.runs, SGD_NAME, lr0=lr0)
        row = {"lr0": lr0, "sgd_cumulative": _ratio(sgd.cumulative_loss, best["cumulative_loss"]),
               "sgd_final": _ratio(sgd.final_loss, best["final_loss"]), "sgd_accuracy": sgd.final_accuracy}
        for llr in _select(grid.runs, LLR_NAME, lr0=lr0):
            key = f"mu={llr.hparams['hyper_lr']:g}"
            row[f"llr_cumulative[{key}]"] = _ratio(llr.cumulative_loss, best["cumulative_loss"])
            row[f"llr_final[{key}]"] = _ratio(llr.final_loss, best["final_loss"])
            row[f"llr_accuracy[{key}]"] = llr.final_accuracy
        per_lr.append(row)
    methods = {}
    for method in dict.fromkeys(r.method for r in grid.runs):
        runs = _select(grid.runs, method)
        by_cum = min(runs, key=lambda r: r.cumulative_loss)
        by_final = min(runs, key=lambda r: r.final_loss)
        methods[method] = {
            "best_cumulative": _ratio(by_cum.cumulative_loss, best["cumulative_loss"]),
            "best_cumulative_hparams": by_cum.hparams,
            "best_final": _ratio(by_final.final_loss, best["final_loss"]),
            "best_final_hparams": by_final.hparams,
            "diverged": sum(r.diverged_at is not None for r in runs), "runs": len(runs)}
    per_mu = {}
    for hyper_lr in config.hyper_lr_grid:
        runs = [r for r in _select(grid.runs, LLR_NAME, hyper_lr=hyper_lr)
                if _in_range(r.hparams["lr0"], config.target_lr_range)]
        finals = [_ratio(r.final_loss, best["final_loss"]) for r in runs]
        cums = [_ratio(r.cumulative_loss, best["cumulative_loss"]) for r in runs]
        per_mu[f"{hyper_lr:g}"] = {"worst_final": max(finals), "median_final": statistics.median(finals),
                                   "worst_cumulative": max(cums), "median_cumulative": statistics.median(cums),
                                   "diverged": sum(r.diverged_at is not None for r in _select(
                                       grid.runs, LLR_NAME, hyper_lr=hyper_lr))}
    variants = {}
    for method in dict.fromkeys(r.method for r in grid.runs if r.method.startswith(f"{LLR_NAME} ")):
        variants[method] = [{"lr0": r.hparams["lr0"], "cumulative": _ratio(r.cumulative_loss, best["cumulative_loss"]),
                             "final": _ratio(r.final_loss, best["final_loss"])}
                            for r in _select(grid.runs, method)]
    spread = eta_spread(grid, mu)
    return {"best_sgd": best, "per_lr": per_lr, "variants": variants, "methods": methods, "per_hyper_lr": per_mu,
            "initial_loss": grid.initial_loss,
            "eta_spread": {k: v for k, v in spread.items() if k != "spread"},
            "eta_spread_target_range": {k: v for k, v in eta_spread(grid, mu, config.target_lr_range).items()
                                        if k != "spread"}}


def check_targets(summaries: dict[str, dict[str, Any]], config: LLRConfig) -> list[dict[str, Any]]:
    """The issue's targets, each as ``{target, experiment, met, measured}`` from the measured numbers."""
    mu = config.default_hyper_lr
    key = f"mu={mu:g}"
    checks = []
    for name, summary in summaries.items():
        if name == "E4":
            continue
        for label, lr_range in (("required", config.target_lr_range), ("aim", config.aim_lr_range)):
            ratios = [(row["lr0"], row[f"llr_final[{key}]"]) for row in summary["per_lr"]
                      if _in_range(row["lr0"], lr_range)]
            worst_lr, worst = max(ratios, key=lambda item: item[1])
            checks.append({"target": f"final loss ≤ 1.1× best SGD for every η_0 in "
                                     f"[{lr_range[0]:g}, {lr_range[1]:g}] ({label}, μ = {mu:g})",
                           "experiment": name, "met": worst <= 1.1,
                           "measured": f"worst ratio {worst:.3g} at η_0 = {worst_lr:g}"})
        llr = summary["methods"][LLR_NAME]
        checks.append({"target": "no divergence on the whole LLR grid (every η_0 × μ)", "experiment": name,
                       "met": llr["diverged"] == 0, "measured": f"{llr['diverged']} of {llr['runs']} runs diverged"})
    for name, summary in summaries.items():
        if not name.startswith("E2"):
            continue
        llr_cums = [(row["lr0"], row[f"llr_cumulative[{key}]"]) for row in summary["per_lr"]
                    if _in_range(row["lr0"], config.target_lr_range)]
        worst_lr, worst = max(llr_cums, key=lambda item: item[1])
        best_llr = min(ratio for _, ratio in llr_cums)
        rivals = {m: v["best_cumulative"] for m, v in summary["methods"].items() if not m.startswith(LLR_NAME)}
        best_rival = min(rivals, key=rivals.get)
        checks.append({"target": "LLR beats the best fixed η and every tuned anchor on cumulative online loss "
                                 f"(worst η_0 in [{config.target_lr_range[0]:g}, {config.target_lr_range[1]:g}], "
                                 f"μ = {mu:g})",
                       "experiment": name, "met": worst < rivals[best_rival],
                       "measured": f"LLR worst {worst:.3g} (η_0 = {worst_lr:g}), best {best_llr:.3g}; best rival "
                                   f"{best_rival} {rivals[best_rival]:.3g} (ratios to best fixed SGD)"})
    for name, summary in summaries.items():
        spread, in_range = summary["eta_spread"], summary["eta_spread_target_range"]
        first = spread["first_within_2"]
        checks.append({"target": "η_t curves from all η_0 within a factor 2 of each other within the first 10 % "
                                 f"of steps (μ = {mu:g})",
                       "experiment": name, "met": spread["spread_at_10pct"] <= 2.0,
                       "measured": f"max/min η at 10 % = {spread['spread_at_10pct']:.3g} over "
                                   f"{spread['n_curves']} curves (η_0 in [{config.target_lr_range[0]:g}, "
                                   f"{config.target_lr_range[1]:g}]: {in_range['spread_at_10pct']:.3g}); "
                                   f"{spread['spread_at_end']:.3g} at the end; "
                                   + (f"≤ 2 for good from step {first} of {summary['n_steps']}" if first is not None
                                      else "above 2 again later")})
    return checks


# -------------------------------------------------------------------------------------------------- figures
def _panels(n_cols: int, n_rows: int = 1) -> tuple[plt.Figure, Any]:
    """A figure of ``n_rows × n_cols`` panels, spaced so that titles and labels stay apart."""
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.9 * n_cols + 1.5, 3.6 * n_rows), squeeze=False)
    fig.subplots_adjust(wspace=0.35, hspace=0.45, top=0.85 if n_rows == 1 else 0.91)
    return fig, axes


def _lr_colors(lr_grid: Sequence[float]) -> dict[float, Any]:
    cmap = plt.get_cmap("viridis")
    return {lr0: cmap(i / max(1, len(lr_grid) - 1)) for i, lr0 in enumerate(lr_grid)}


def plot_eta(grids: dict[str, GridResult], config: LLRConfig, out_dir: Path) -> str:
    """One panel per experiment: LLR's ``η_t`` from every ``η_0`` (default μ), log y; dashed: best fixed η."""
    fig, axes = _panels(len(grids))
    for ax, (name, grid) in zip(axes[0], grids.items(), strict=True):
        runs = _select(grid.runs, LLR_NAME, hyper_lr=config.default_hyper_lr)
        colors = _lr_colors([r.hparams["lr0"] for r in runs])
        for run in runs:
            ax.plot(grid.record_steps, run.lr_trace, color=colors[run.hparams["lr0"]], lw=1.2,
                    label=f"η_0={run.hparams['lr0']:g}" + (" (div.)" if run.diverged_at is not None else ""))
        ax.axhline(best_fixed_sgd(grid.runs)["cumulative_lr"], color="k", ls="--", lw=1, label="best fixed η")
        ax.axvline(0.1 * grid.n_steps, color="grey", ls=":", lw=1)
        ax.set(yscale="log", xlabel="step t", ylabel="η_t", title=name)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"LLR step size η_t from every η_0 (μ = {config.default_hyper_lr:g}); dotted: 10 % of steps")
    return save_figure(fig, out_dir, "eta_trajectories.png")


def plot_loss_vs_lr0(summaries: dict[str, dict[str, Any]], config: LLRConfig, out_dir: Path) -> str:
    """Ratios to the best fixed SGD versus ``η_0``: SGD and LLR (every μ), cumulative (top) and final (bottom)."""
    fig, axes = _panels(len(summaries), 2)
    for col, (name, summary) in enumerate(summaries.items()):
        rows = summary["per_lr"]
        lrs = [row["lr0"] for row in rows]
        for r, metric in enumerate(("cumulative", "final")):
            ax = axes[r][col]
            ax.plot(lrs, [row[f"sgd_{metric}"] for row in rows], "k-o", ms=3, label="fixed-η SGD")
            for mu in config.hyper_lr_grid:
                style = "-s" if mu == config.default_hyper_lr else "--"
                ax.plot(lrs, [row[f"llr_{metric}[mu={mu:g}]"] for row in rows], style, ms=3, label=f"LLR μ={mu:g}")
            ax.axhline(1.1, color="grey", ls=":", lw=1)
            ax.set(xscale="log", yscale="log", xlabel="η_0", ylabel=f"{metric} loss / best SGD", title=name)
            ax.set_ylim(0.5, 1e3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Loss relative to the best fixed-η SGD (diverged runs are off the chart); dotted: 1.1")
    return save_figure(fig, out_dir, "loss_vs_lr0.png")


def plot_loss_vs_hyper_lr(grids: dict[str, GridResult], summaries: dict[str, dict[str, Any]],
                          config: LLRConfig, out_dir: Path) -> str:
    """Final-loss ratio to the best SGD versus LLR's μ, one line per ``η_0``, one panel per experiment."""
    fig, axes = _panels(len(grids))
    for ax, (name, grid) in zip(axes[0], grids.items(), strict=True):
        best = summaries[name]["best_sgd"]["final_loss"]
        lrs = sorted({r.hparams["lr0"] for r in _select(grid.runs, LLR_NAME)})
        colors = _lr_colors(lrs)
        for lr0 in lrs:
            runs = sorted(_select(grid.runs, LLR_NAME, lr0=lr0), key=lambda r: r.hparams["hyper_lr"])
            ax.plot([r.hparams["hyper_lr"] for r in runs], [_ratio(r.final_loss, best) for r in runs], "-o", ms=3,
                    color=colors[lr0], label=f"η_0={lr0:g}")
        ax.axhline(1.1, color="grey", ls=":", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="hyper learning rate μ", ylabel="final loss / best SGD",
               title=name)
        ax.set_ylim(0.5, 1e3)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("LLR final loss versus its hyper learning rate μ")
    return save_figure(fig, out_dir, "loss_vs_hyper_lr.png")


def plot_online_loss(grids: dict[str, GridResult], config: LLRConfig, out_dir: Path) -> str:
    """Running online loss (mean over windows of ~T/40 steps) of LLR, the best fixed SGD and the tuned anchors."""
    fig, axes = _panels(len(grids))
    for ax, (name, grid) in zip(axes[0], grids.items(), strict=True):
        stride = max(1, len(grid.record_steps) // 40)
        steps = grid.record_steps[::stride]
        trace = grid.loss_trace[:, ::stride]
        window = torch.diff(trace, dim=1) / torch.diff(torch.tensor(steps, dtype=torch.float64))
        curves = {f"LLR η_0={lr0:g}": _select(grid.runs, LLR_NAME, lr0=lr0, hyper_lr=config.default_hyper_lr)
                  for lr0 in (min(config.target_lr_range), max(config.target_lr_range))}
        for method in dict.fromkeys(r.method for r in grid.runs):
            if method != LLR_NAME:
                curves[f"best {method}"] = [min(_select(grid.runs, method), key=lambda r: r.cumulative_loss)]
        for label, runs in curves.items():
            if runs and runs[0].diverged_at is None:
                k = grid.runs.index(runs[0])
                ax.plot(steps[1:], window[k].tolist(), lw=2 if label.startswith(LLR_NAME) else 1, label=label)
        ax.set(yscale="log", xlabel="step t", ylabel="online loss (window mean)", title=name)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Online (prequential) loss, best-in-hindsight setting of each method")
    return save_figure(fig, out_dir, "online_loss.png")


# --------------------------------------------------------------------------------------------------- report
def _fmt(value: float) -> str:
    return "div." if not math.isfinite(value) else f"{value:.3g}"


def _accuracy(value: float | None) -> str:
    return "div." if value is None else f"{100 * value:.1f} %"


def _hparams(hparams: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in hparams.items()) or "defaults"


def experiment_section(name: str, summary: dict[str, Any], config: LLRConfig) -> str:
    """Markdown for one experiment: per-η_0 table, best-in-hindsight per method, μ sensitivity."""
    mu = config.default_hyper_lr
    key = f"mu={mu:g}"
    best = summary["best_sgd"]
    lines = [f"### {name}: {DESCRIPTIONS[name]} (T = {summary['n_steps']}, batch {summary['batch_size']})",
             f"Best fixed-η SGD: cumulative online loss {best['cumulative_loss']:.4g} (η = {best['cumulative_lr']:g}), "
             f"final loss {best['final_loss']:.4g} (η = {best['final_lr']:g}). Initial loss "
             f"{summary['initial_loss']:.3g}."
             + (f" Bayes (noise-floor) held-out loss {summary['bayes_loss']:.4g}." if summary["bayes_loss"] else "")
             + (f" Oracle RLS: cumulative {summary['rls']['cumulative_loss']:.4g} "
                f"({summary['rls']['cumulative_ratio']:.3g}× best SGD), final {summary['rls']['final_loss']:.4g} "
                f"({summary['rls']['final_ratio']:.3g}×)." if "rls" in summary else ""),
             "",
             f"Ratios to the best fixed SGD, per η_0 (LLR at μ = {mu:g}; `div.` = diverged):", ""]
    headers = ["η_0", "SGD cumulative", "LLR cumulative", "SGD final", "LLR final"]
    rows = [[f"{row['lr0']:g}", _fmt(row["sgd_cumulative"]), _fmt(row[f"llr_cumulative[{key}]"]),
             _fmt(row["sgd_final"]), _fmt(row[f"llr_final[{key}]"])] for row in summary["per_lr"]]
    if any(row["sgd_accuracy"] is not None for row in summary["per_lr"]):
        headers += ["SGD test accuracy", "LLR test accuracy"]
        for cells, row in zip(rows, summary["per_lr"], strict=True):
            cells += [_accuracy(row["sgd_accuracy"]), _accuracy(row[f"llr_accuracy[{key}]"])]
    lines.append(markdown_table(headers, rows))
    lines += ["", "Each method at its best setting in hindsight (separately for each column), and divergences:", ""]
    rows = [(method, _fmt(v["best_cumulative"]), _hparams(v["best_cumulative_hparams"]), _fmt(v["best_final"]),
             _hparams(v["best_final_hparams"]), f"{v['diverged']}/{v['runs']}")
            for method, v in summary["methods"].items()]
    lines.append(markdown_table(["method", "cumulative / best SGD", "at", "final / best SGD", "at", "diverged"], rows))
    lo, hi = config.target_lr_range
    lines += ["", f"LLR sensitivity to μ (over η_0 in [{lo:g}, {hi:g}]; divergences over the whole η_0 grid):", ""]
    rows = [(m, _fmt(v["median_cumulative"]), _fmt(v["worst_cumulative"]), _fmt(v["median_final"]),
             _fmt(v["worst_final"]), v["diverged"]) for m, v in summary["per_hyper_lr"].items()]
    lines.append(markdown_table(["μ", "median cumulative", "worst cumulative", "median final", "worst final",
                                 "diverged"], rows))
    if summary["variants"]:
        lines += ["", f"LLR's curvature variants at μ = {mu:g} (ratios to the best fixed SGD; `LLR` is the default "
                  "Hessian-free variant):", ""]
        columns = {"LLR": {row["lr0"]: (row[f"llr_cumulative[{key}]"], row[f"llr_final[{key}]"])
                           for row in summary["per_lr"]}}
        columns.update({m: {row["lr0"]: (row["cumulative"], row["final"]) for row in rows}
                        for m, rows in summary["variants"].items()})
        headers = ["η_0"] + [f"{m} {metric}" for m in columns for metric in ("cumulative", "final")]
        variant_lrs = sorted({row["lr0"] for rows in summary["variants"].values() for row in rows})
        rows = [[f"{lr0:g}"] + [_fmt(v) for m in columns for v in columns[m][lr0]] for lr0 in variant_lrs]
        lines.append(markdown_table(headers, rows))
    return "\n".join(lines)


def _method_notes(config: LLRConfig, peers: dict[str, type], missing: list[str]) -> str:
    t0s = ", ".join(f"{f:g}·T" for f in config.inverse_time_t0)
    lines = [
        "## Method",
        "The LLR update rules used here are **our derivation** from the paper's description (its full text could "
        "not be read): log step size λ = log η, forward sensitivity h = ∂θ/∂λ, "
        "λ_{t+1} = λ_t − μ g_{t+1}·h_{t+1}; variant `hessian_free` (the optimizer's default), base SGD, "
        "normalised hypergradient (our extension, see `triptych.optim.LLR`).",
        "- **Online loss**: ℓ_t(θ_t) on minibatch t is recorded *before* the update that uses it; the cumulative "
        "online loss is Σ_t ℓ_t(θ_t) (minibatch means).",
        "- **Final loss**: loss of the final parameters on a fresh held-out sample from the distribution in force "
        f"at the end of the stream ({config.n_heldout} samples for E1–E3; the MNIST test set for E4). For "
        "Schedule-Free it is the averaged iterate x_T (its online loss is taken at the gradient point y_t).",
        f"- **Divergence**: online loss non-finite or above {config.divergence_factor:g}× the initial held-out loss; "
        "the run is stopped and its losses count as infinite (`div.`).",
        f"- **Grids**: η_0 ∈ {{{', '.join(f'{v:g}' for v in config.lr_grid)}}} for LLR, SGD-HD and Schedule-Free; "
        f"fixed-η SGD and SGD 1/t on the finer grid {{{', '.join(f'{v:g}' for v in config.baseline_lr_grid)}}} "
        f"(E4: every method on {{{', '.join(f'{v:g}' for v in config.mnist_lr_grid)}}}); LLR μ ∈ "
        f"{{{', '.join(f'{v:g}' for v in config.hyper_lr_grid)}}} (headline μ = {config.default_hyper_lr:g}); "
        f"SGD 1/t: η_t = η_0/(1 + t/t_0), t_0 ∈ {{{t0s}}}, every η_0; SGD-HD (additive hypergradient, "
        f"α_t = α_{{t−1}} + β g_t·g_{{t−1}}): β ∈ {{{', '.join(f'{v:g}' for v in config.hd_hyper_lr_grid)}}}, "
        "every η_0; Schedule-Free SGD: lr = every η_0; Prodigy and D-Adaptation (SGD) at their defaults.",
        "- **Ratios**: every loss is divided by the best fixed-η SGD in hindsight (best cumulative for cumulative "
        "ratios, best final for final ratios); < 1 is better than the best tuned constant step.",
        f"- **Data**: E1–E2 d = {config.regression_dim}, input variances log-spaced from 1 to "
        f"10^-{config.variance_decades:g}, noise σ = {config.noise_std:g}, batch 1, loss ½(xᵀθ − y)², θ_0 = 0; "
        f"E2-jump redraws θ* at T/2; E2-walk moves θ* by a Gaussian random walk of total standard deviation "
        f"{config.walk_scale:g} per coordinate; E3 d = {config.logistic_dim}, same inputs, labels from "
        "σ(xᵀw*) with logit standard deviation 4; E4 MLP 784–"
        f"{config.mnist_hidden}–10 (ReLU), batch {config.mnist_batch}, "
        f"{'all 60,000' if config.mnist_samples is None else config.mnist_samples} training images once.",
    ]
    if missing:
        lines.append(f"- Not installed, omitted: {', '.join(missing)} (install the `bench` extra to include them).")
    return "\n".join(lines)


def _targets_section(checks: list[dict[str, Any]]) -> str:
    rows = [(c["experiment"], c["target"], "met" if c["met"] else "**missed**", c["measured"]) for c in checks]
    met = sum(c["met"] for c in checks)
    return "\n".join(["## Targets", f"{met} of {len(checks)} checks met (computed from the numbers above).", "",
                      markdown_table(["experiment", "target", "status", "measured"], rows)])


def build_stream(name: str, config: LLRConfig) -> OnlineStream:
    """The stream of experiment ``name`` (seeded by ``config.seed``)."""
    seed = config.seed
    common = {"dim": config.regression_dim, "variance_decades": config.variance_decades,
              "noise_std": config.noise_std, "n_heldout": config.n_heldout}
    if name == "E1":
        return linear_regression_stream(config.n_steps, seed=seed, **common)
    if name == "E2-jump":
        return linear_regression_stream(config.n_steps, drift="jump", seed=seed + 1, **common)
    if name == "E2-walk":
        return linear_regression_stream(config.n_steps, drift="random_walk", drift_scale=config.walk_scale,
                                        seed=seed + 2, **common)
    if name == "E3":
        return logistic_regression_stream(config.n_steps, dim=config.logistic_dim,
                                          variance_decades=config.variance_decades, n_heldout=config.n_heldout,
                                          seed=seed + 3)
    train_images, train_labels = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    return mnist_stream(train_images, train_labels, test_images, test_labels, batch_size=config.mnist_batch,
                        n_samples=config.mnist_samples, n_heldout=config.mnist_heldout, seed=seed)


def run_experiment(name: str, config: LLRConfig, quiet: bool = False) -> tuple[GridResult, dict[str, Any]]:
    """Run every method of experiment ``name`` on its stream; return the grid and its summary.

    Args:
        quiet: no progress bar (set in worker processes, whose bars would garble the terminal).
    """
    check_choice("experiment", name, EXPERIMENTS)
    if quiet:
        set_quiet(True)
    peers = available_peers()
    stream = build_stream(name, config)
    lr_grid = config.mnist_lr_grid if name == "E4" else config.lr_grid
    baseline_grid = config.mnist_lr_grid if name == "E4" else config.baseline_lr_grid
    variants = config.curvature_variants if name in config.variant_experiments else ()
    specs = method_grid(config, lr_grid, baseline_grid, stream.n_steps, peers, variants)
    initial, forward = initial_parameters(stream, config.mnist_hidden, config.seed)
    log.info("%s: %d runs × %d steps", name, len(specs), stream.n_steps)
    grid = run_online(stream, specs, initial=initial, forward=forward, divergence_factor=config.divergence_factor,
                      n_records=config.n_records, desc=f"llr {name} ({len(specs)} runs)")
    summary = summarise(grid, config)
    summary.update(n_steps=stream.n_steps, batch_size=stream.batch_size, bayes_loss=stream.bayes_heldout_loss)
    if name == "E1":
        cumulative, final = recursive_least_squares(stream)
        best = summary["best_sgd"]
        summary["rls"] = {"cumulative_loss": cumulative, "final_loss": final,
                          "cumulative_ratio": cumulative / best["cumulative_loss"],
                          "final_ratio": final / best["final_loss"]}
    return grid, summary


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_experiments(config: LLRConfig) -> dict[str, tuple[GridResult, dict[str, Any]]]:
    """Run the configured experiments, ``config.workers`` at a time (independent processes, same results)."""
    for name in config.experiments:
        check_choice("experiment", name, EXPERIMENTS)
    if config.workers == 1 or len(config.experiments) == 1:
        return {name: run_experiment(name, config) for name in config.experiments}
    workers = min(config.workers, len(config.experiments))
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold OpenMP threads
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(run_experiment, name, config, True): name for name in config.experiments}
        done = {}
        for future in progress(as_completed(futures), desc=f"llr experiments ({workers} processes)",
                               total=len(futures)):
            done[futures[future]] = future.result()
            log.info("%s done", futures[future])
    return {name: done[name] for name in config.experiments}


def run(config: LLRConfig, out_dir: Path) -> Report:
    """Run the configured experiments and build the report (figures saved into ``out_dir``)."""
    out_dir = Path(out_dir)
    peers = available_peers()
    missing = [label for label in PEERS if label not in peers]
    outcomes = run_experiments(config)
    grids = {name: grid for name, (grid, _) in outcomes.items()}
    summaries = {name: summary for name, (_, summary) in outcomes.items()}
    checks = check_targets(summaries, config)
    figures = [plot_eta(grids, config, out_dir), plot_loss_vs_lr0(summaries, config, out_dir),
               plot_loss_vs_hyper_lr(grids, summaries, config, out_dir), plot_online_loss(grids, config, out_dir)]
    sections = [
        "Reproduction of Massé & Ollivier, *Speed learning on the fly* (arXiv 1511.02540), experiments E1–E4 of "
        "`shared/papers/llr.md`: the step size learned online (LLR) against fixed, scheduled and adaptive steps.",
        _targets_section(checks),
        _method_notes(config, peers, missing),
        "## Results",
        *(experiment_section(name, summary, config) for name, summary in summaries.items()),
        "## Figures",
        *(f"![{figure}]({figure})" for figure in figures),
    ]
    results = {"summaries": summaries, "targets": checks, "peers": sorted(peers), "missing_peers": missing,
               "runs": {name: [asdict(r) for r in grid.runs] for name, grid in grids.items()},
               "record_steps": {name: grid.record_steps for name, grid in grids.items()}}
    return Report(title="LLR — Speed learning on the fly (Massé & Ollivier 2015)", sections=sections,
                  results=results, figures=figures)


__all__ = ["EXPERIMENTS", "GridResult", "LLRConfig", "RunResult", "RunSpec", "StackedParameters", "available_peers",
           "best_fixed_sgd", "check_targets", "eta_spread", "initial_parameters", "linear_forward", "make_config",
           "method_grid", "mlp_forward", "per_sample_loss", "recursive_least_squares", "run", "run_experiment",
           "run_experiments", "run_online", "summarise"]
