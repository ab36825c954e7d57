"""Seeded online data streams for the step-size experiments of "Speed learning on the fly" (E1–E4).

A stream is the whole sequence of minibatches ``(x_t, y_t)``, ``t = 0 … T−1``, generated up front from one seed,
plus a held-out sample drawn from the distribution in force at the END of the stream (the one the final
parameters should fit). Generating everything first keeps the training loop free of sampling cost and makes
every optimizer see exactly the same data.

Streams:

- :func:`linear_regression_stream` — ``y = xᵀθ*_t + σ ε`` with ``x ~ N(0, diag(s²))`` whose variances ``s_i²``
  are spread log-uniformly over ``variance_decades`` decades (from 1 down to ``10^-variance_decades``), so the
  problem is ill-conditioned. ``drift`` makes ``θ*_t`` stationary (E1), jump to a fresh draw at ``jump_at · T``
  (E2) or follow a Gaussian random walk (E2).
- :func:`logistic_regression_stream` — ``P(y = 1 | x) = σ(xᵀw*)`` (E3).
- :func:`mnist_stream` — one shuffled pass over MNIST in minibatches, the test set held out (E4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from triptych._validation import check_choice, check_int, check_real, check_tensor

DRIFTS = ("none", "jump", "random_walk")
TASKS = ("regression", "logistic", "classification")
# MNIST normalisation (mean and standard deviation of the training pixels in [0, 1]).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class OnlineStream:
    """A fixed sequence of minibatches and a held-out sample from the final distribution.

    Attributes:
        inputs: ``(T, B, d)`` the inputs ``x_t``.
        targets: ``(T, B)`` the targets ``y_t``: real for ``"regression"``, 0/1 floats for ``"logistic"``,
            int64 class indices for ``"classification"``.
        heldout_inputs: ``(N, d)`` fresh inputs from the distribution in force at the last step.
        heldout_targets: ``(N,)`` their targets.
        task: ``"regression"`` (loss ½(xᵀθ − y)²), ``"logistic"`` (binary cross-entropy on the logit xᵀθ)
            or ``"classification"`` (multi-class cross-entropy).
        theta_star: ``(T, d)`` the true parameter ``θ*_t`` at each step, or ``None`` for real data.
        bayes_heldout_loss: loss of the true final parameter on the held-out sample (the floor a learner can
            reach), or ``None`` for real data.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    heldout_inputs: torch.Tensor
    heldout_targets: torch.Tensor
    task: str
    theta_star: torch.Tensor | None = None
    bayes_heldout_loss: float | None = None

    @property
    def n_steps(self) -> int:
        """``T``, the number of minibatches."""
        return self.inputs.shape[0]

    @property
    def batch_size(self) -> int:
        """``B``, the minibatch size."""
        return self.inputs.shape[1]

    @property
    def dim(self) -> int:
        """``d``, the input dimension."""
        return self.inputs.shape[2]


def feature_scales(dim: int, variance_decades: float, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard deviations ``s_i`` whose variances ``s_i²`` run log-uniformly from 1 to ``10^-variance_decades``.

    Returns:
        ``(d,)`` tensor, ``s_0 = 1`` and ``s_{d-1}² = 10^-variance_decades``.
    """
    dim = check_int("dim", dim, low=1)
    variance_decades = check_real("variance_decades", variance_decades, low=0.0)
    exponents = torch.linspace(0.0, -variance_decades, dim, dtype=torch.float64) if dim > 1 else torch.zeros(1)
    return torch.pow(10.0, exponents / 2).to(dtype)


def _check_common(n_steps: int, dim: int, batch_size: int, n_heldout: int) -> tuple[int, int, int, int]:
    return (check_int("n_steps", n_steps, low=1), check_int("dim", dim, low=1),
            check_int("batch_size", batch_size, low=1), check_int("n_heldout", n_heldout, low=1))


def _true_parameters(n_steps: int, dim: int, drift: str, jump_at: float, drift_scale: float,
                     generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """``(T, d)`` the path of ``θ*_t``: constant, one jump to a fresh N(0, I) draw, or a random walk.

    The random walk has per-step standard deviation ``drift_scale / sqrt(T)`` per coordinate, so that the
    total displacement over the stream has standard deviation ``drift_scale`` whatever ``T`` is.
    """
    start = torch.randn(dim, generator=generator, dtype=torch.float64)
    path = start.expand(n_steps, dim).clone()
    if drift == "jump":
        jump_step = int(round(jump_at * n_steps))
        path[jump_step:] = torch.randn(dim, generator=generator, dtype=torch.float64)
    elif drift == "random_walk":
        steps = torch.randn(n_steps, dim, generator=generator, dtype=torch.float64) * (drift_scale / math.sqrt(n_steps))
        steps[0] = 0.0
        path = start + torch.cumsum(steps, dim=0)
    return path.to(dtype)


def linear_regression_stream(n_steps: int, *, dim: int = 20, batch_size: int = 1, variance_decades: float = 2.0,
                             noise_std: float = 0.1, drift: str = "none", jump_at: float = 0.5,
                             drift_scale: float = 1.0, n_heldout: int = 10_000, seed: int = 0,
                             dtype: torch.dtype = torch.float64) -> OnlineStream:
    """Online linear regression ``y_t = x_tᵀθ*_t + σ ε_t`` (experiments E1 and E2).

    Args:
        n_steps: ``T``.
        dim: ``d``.
        batch_size: ``B`` samples per step.
        variance_decades: the input variances span this many decades (see :func:`feature_scales`).
        noise_std: ``σ``, the label noise.
        drift: ``"none"`` (E1), ``"jump"`` (``θ*`` redrawn from N(0, I) at step ``round(jump_at · T)``) or
            ``"random_walk"`` (``θ*_{t+1} = θ*_t + (drift_scale / √T) ξ_t``, ``ξ_t ~ N(0, I)``).
        n_heldout: ``N``, the held-out sample size (drawn with ``θ*_{T−1}``).
        seed: the only source of randomness.

    Returns:
        An :class:`OnlineStream` with ``task="regression"``, ``theta_star`` ``(T, d)`` and the held-out Bayes loss
        (≈ σ²/2 for the loss ½(xᵀθ − y)²).
    """
    n_steps, dim, batch_size, n_heldout = _check_common(n_steps, dim, batch_size, n_heldout)
    check_choice("drift", drift, DRIFTS)
    noise_std = check_real("noise_std", noise_std, low=0.0)
    jump_at = check_real("jump_at", jump_at, low=0.0, high=1.0, high_inclusive=False)
    drift_scale = check_real("drift_scale", drift_scale, low=0.0)
    generator = torch.Generator().manual_seed(seed)
    scales = feature_scales(dim, variance_decades)
    theta_star = _true_parameters(n_steps, dim, drift, jump_at, drift_scale, generator, torch.float64)
    inputs = torch.randn(n_steps, batch_size, dim, generator=generator, dtype=torch.float64) * scales
    noise = torch.randn(n_steps, batch_size, generator=generator, dtype=torch.float64) * noise_std
    targets = torch.einsum("tbd,td->tb", inputs, theta_star) + noise
    heldout_inputs = torch.randn(n_heldout, dim, generator=generator, dtype=torch.float64) * scales
    heldout_noise = torch.randn(n_heldout, generator=generator, dtype=torch.float64) * noise_std
    heldout_targets = heldout_inputs @ theta_star[-1] + heldout_noise
    bayes = 0.5 * float(heldout_noise.square().mean())
    return OnlineStream(inputs.to(dtype), targets.to(dtype), heldout_inputs.to(dtype), heldout_targets.to(dtype),
                        task="regression", theta_star=theta_star.to(dtype), bayes_heldout_loss=bayes)


def logistic_regression_stream(n_steps: int, *, dim: int = 50, batch_size: int = 1, variance_decades: float = 2.0,
                               logit_std: float = 4.0, n_heldout: int = 10_000, seed: int = 0,
                               dtype: torch.dtype = torch.float64) -> OnlineStream:
    """Online logistic regression ``P(y_t = 1 | x_t) = σ(x_tᵀw*)`` (experiment E3).

    ``x ~ N(0, diag(s²))`` as in :func:`linear_regression_stream`; ``w*`` is a N(0, I) draw rescaled so that the
    true logit ``xᵀw*`` has standard deviation ``logit_std`` (``w*ᵀ diag(s²) w* = logit_std²``), which fixes
    the label noise (``logit_std = 4`` gives a Bayes error of about 8 %).

    Returns:
        An :class:`OnlineStream` with ``task="logistic"``, 0/1 float targets, ``theta_star`` ``(T, d)`` (constant)
        and the held-out Bayes cross-entropy.
    """
    n_steps, dim, batch_size, n_heldout = _check_common(n_steps, dim, batch_size, n_heldout)
    logit_std = check_real("logit_std", logit_std, low=0.0, low_inclusive=False)
    generator = torch.Generator().manual_seed(seed)
    scales = feature_scales(dim, variance_decades)
    direction = torch.randn(dim, generator=generator, dtype=torch.float64)
    w_star = direction * (logit_std / torch.linalg.vector_norm(direction * scales))

    def sample(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(*shape, dim, generator=generator, dtype=torch.float64) * scales
        logits = x @ w_star
        y = (torch.rand(shape, generator=generator, dtype=torch.float64) < torch.sigmoid(logits)).to(torch.float64)
        return x, y, logits

    inputs, targets, _ = sample((n_steps, batch_size))
    heldout_inputs, heldout_targets, heldout_logits = sample((n_heldout,))
    bayes = float(torch.nn.functional.binary_cross_entropy_with_logits(heldout_logits, heldout_targets))
    return OnlineStream(inputs.to(dtype), targets.to(dtype), heldout_inputs.to(dtype), heldout_targets.to(dtype),
                        task="logistic", theta_star=w_star.expand(n_steps, dim).to(dtype), bayes_heldout_loss=bayes)


def mnist_stream(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                 test_labels: torch.Tensor, *, batch_size: int = 16, n_samples: int | None = None,
                 n_heldout: int | None = None, seed: int = 0) -> OnlineStream:
    """One shuffled pass over MNIST in minibatches of ``B`` (experiment E4); the test set is held out.

    Args:
        train_images: ``(N, 28, 28)`` uint8, as returned by :func:`triptych.data.load_mnist`.
        train_labels: ``(N,)`` uint8 class indices.
        test_images, test_labels: the held-out set, same layout.
        batch_size: ``B``.
        n_samples: how many training images to stream (default all, rounded down to a multiple of ``B``).
        n_heldout: how many test images to keep (default all; a seeded subset otherwise).
        seed: the order of the pass and the held-out subset.

    Returns:
        An :class:`OnlineStream` with ``task="classification"``, float32 inputs ``(T, B, 784)`` normalised with
        the MNIST mean and standard deviation, and int64 targets ``(T, B)``.
    """
    check_tensor("train_images", train_images, shape=(None, 28, 28))
    check_tensor("train_labels", train_labels, shape=(train_images.shape[0],))
    check_tensor("test_images", test_images, shape=(None, 28, 28))
    check_tensor("test_labels", test_labels, shape=(test_images.shape[0],))
    batch_size = check_int("batch_size", batch_size, low=1)
    n_total = train_images.shape[0]
    n_samples = n_total if n_samples is None else check_int("n_samples", n_samples, low=batch_size, high=n_total)
    n_test = test_images.shape[0]
    n_heldout = n_test if n_heldout is None else check_int("n_heldout", n_heldout, low=1, high=n_test)
    generator = torch.Generator().manual_seed(seed)
    n_steps = n_samples // batch_size
    order = torch.randperm(n_total, generator=generator)[: n_steps * batch_size]
    test_order = torch.randperm(n_test, generator=generator)[:n_heldout] if n_heldout < n_test else slice(None)

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return ((images.reshape(images.shape[0], -1).to(torch.float32) / 255.0) - MNIST_MEAN) / MNIST_STD

    inputs = normalise(train_images[order]).reshape(n_steps, batch_size, -1)
    targets = train_labels[order].to(torch.int64).reshape(n_steps, batch_size)
    return OnlineStream(inputs, targets, normalise(test_images[test_order]), test_labels[test_order].to(torch.int64),
                        task="classification")


__all__ = ["DRIFTS", "TASKS", "OnlineStream", "feature_scales", "linear_regression_stream",
           "logistic_regression_stream", "mnist_stream"]
