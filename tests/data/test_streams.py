"""Tests of the seeded online streams (E1–E4 of the LLR reproduction)."""

import math

import pytest
import torch

from triptych.data.streams import (
    feature_scales,
    linear_regression_stream,
    logistic_regression_stream,
    mnist_stream,
)


def test_same_seed_same_stream_and_other_seed_differs():
    a = linear_regression_stream(50, drift="random_walk", seed=3)
    b = linear_regression_stream(50, drift="random_walk", seed=3)
    c = linear_regression_stream(50, drift="random_walk", seed=4)
    for field in ("inputs", "targets", "theta_star", "heldout_inputs", "heldout_targets"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.inputs, c.inputs)
    assert not torch.equal(a.theta_star, c.theta_star)


def test_shapes_and_dtypes():
    stream = linear_regression_stream(30, dim=7, batch_size=4, n_heldout=11)
    assert stream.inputs.shape == (30, 4, 7) and stream.targets.shape == (30, 4)
    assert stream.theta_star.shape == (30, 7)
    assert stream.heldout_inputs.shape == (11, 7) and stream.heldout_targets.shape == (11,)
    assert (stream.n_steps, stream.batch_size, stream.dim) == (30, 4, 7)
    assert stream.inputs.dtype == torch.float64
    assert linear_regression_stream(3, dtype=torch.float32).inputs.dtype == torch.float32


def test_feature_scales_span_the_stated_decades():
    scales = feature_scales(20, 2.0)
    assert scales[0] == pytest.approx(1.0) and scales[-1] ** 2 == pytest.approx(1e-2)
    log_var = torch.log10(scales**2)  # log-uniform: equal steps
    assert torch.allclose(torch.diff(log_var), torch.full((19,), -2.0 / 19, dtype=torch.float64), atol=1e-12)


def test_input_variances_and_noise_match_the_specification():
    stream = linear_regression_stream(20_000, dim=5, variance_decades=2.0, noise_std=0.1, seed=1)
    x = stream.inputs[:, 0]
    variances = x.var(dim=0)
    expected = feature_scales(5, 2.0) ** 2
    assert torch.allclose(variances, expected, rtol=0.05)
    assert float(variances.max() / variances.min()) == pytest.approx(100.0, rel=0.1)
    residual = stream.targets[:, 0] - torch.einsum("td,td->t", x, stream.theta_star)
    assert float(residual.std()) == pytest.approx(0.1, rel=0.03)
    assert stream.bayes_heldout_loss == pytest.approx(0.5 * 0.1**2, rel=0.05)


def test_stationary_parameter_is_constant():
    stream = linear_regression_stream(100, seed=2)
    assert torch.equal(stream.theta_star, stream.theta_star[:1].expand(100, -1))


def test_jump_happens_exactly_at_half_the_stream():
    stream = linear_regression_stream(101, drift="jump", seed=5)
    jump = round(0.5 * 101)
    before, after = stream.theta_star[:jump], stream.theta_star[jump:]
    assert torch.equal(before, before[:1].expand_as(before))
    assert torch.equal(after, after[:1].expand_as(after))
    assert float(torch.linalg.vector_norm(after[0] - before[-1])) > 1.0
    # the held-out sample is drawn with the final parameter
    fit = torch.linalg.lstsq(stream.heldout_inputs, stream.heldout_targets.unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(fit, stream.theta_star[-1], atol=0.05)


def test_random_walk_increments_have_the_stated_size():
    n_steps = 10_000
    stream = linear_regression_stream(n_steps, dim=10, drift="random_walk", drift_scale=2.0, seed=0)
    increments = torch.diff(stream.theta_star, dim=0)
    assert float(increments.std()) == pytest.approx(2.0 / math.sqrt(n_steps), rel=0.03)


def test_logistic_labels_follow_the_true_logit():
    stream = logistic_regression_stream(20_000, dim=50, logit_std=4.0, seed=0)
    x, y = stream.inputs[:, 0], stream.targets[:, 0]
    logits = x @ stream.theta_star[0]
    assert float(logits.std()) == pytest.approx(4.0, rel=0.05)
    assert set(y.unique().tolist()) == {0.0, 1.0}
    # calibration: among samples with logit > 2, the positive rate matches the mean predicted probability
    mask = logits > 2
    assert float(y[mask].mean()) == pytest.approx(float(torch.sigmoid(logits[mask]).mean()), abs=0.02)
    assert 0.1 < stream.bayes_heldout_loss < 0.3


def test_mnist_stream_is_one_shuffled_pass_with_normalised_pixels():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8, generator=generator)
    images[:, 0, 0] = torch.arange(40, dtype=torch.uint8)  # tag each image
    labels = torch.arange(40, dtype=torch.uint8) % 10
    test_images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8, generator=generator)
    test_labels = torch.arange(10, dtype=torch.uint8)
    stream = mnist_stream(images, labels, test_images, test_labels, batch_size=4, n_samples=37, seed=1)
    assert stream.inputs.shape == (9, 4, 784) and stream.targets.dtype == torch.int64
    tags = torch.round(stream.inputs[..., 0] * 0.3081 * 255 + 0.1307 * 255).long().flatten()
    assert len(set(tags.tolist())) == 36  # each image at most once
    assert torch.equal(stream.targets.flatten(), tags % 10)  # labels travel with their images
    assert stream.heldout_inputs.shape == (10, 784)
    assert stream.task == "classification"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"drift": "sideways"}, "drift must be one of"),
    ({"noise_std": -1.0}, "noise_std must be >= 0"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"jump_at": 1.0}, "jump_at must be < 1"),
])
def test_invalid_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_regression_stream(10, **kwargs)
