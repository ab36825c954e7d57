"""SpatialTransformer: identity at initialisation, parameters, gradients, lazy regression, parallel use, errors."""

import pytest
import torch
from torch import nn

from triptych.spatial import (
    TRANSFORMS,
    CNNLocalization,
    FCNLocalization,
    IdentityLinear,
    LazyIdentityLinear,
    ParallelSpatialTransformers,
    SpatialTransformer,
    affine_grid,
    identity_parameters,
    projective_grid,
    sample,
    tps_control_points,
    tps_grid,
    window_parameters,
)


def make(transform, size=32, **kwargs):
    return SpatialTransformer(FCNLocalization(size, in_channels=2), transform, **kwargs)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_new_transformer_returns_its_input_unchanged(transform, align_corners):
    size = 33 if align_corners else 32  # sizes where the identity is exact in floating point
    x = torch.rand(3, 2, size, size)
    transformer = make(transform, size, align_corners=align_corners)
    assert torch.equal(transformer(x), x)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_new_transformer_is_the_identity_at_paper_sizes(transform):
    x = torch.rand(2, 1, 28, 28)
    y = SpatialTransformer(CNNLocalization(28), transform)(x)
    torch.testing.assert_close(y, x, rtol=0, atol=28 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_regression_layer_starts_at_identity_with_zero_weights(transform):
    transformer = make(transform)
    assert torch.equal(transformer.regression.weight, torch.zeros_like(transformer.regression.weight))
    expected = torch.tensor(identity_parameters(transform))
    assert torch.equal(transformer.regression.bias.detach(), expected)
    assert transformer.n_params == {"affine": 6, "attention": 3, "projective": 8, "tps": 32}[transform]


def test_returned_params_have_their_natural_shapes_and_identity_values():
    x = torch.rand(2, 2, 32, 32)
    _, affine = make("affine")(x, return_params=True)
    assert torch.equal(affine, torch.eye(2, 3).expand(2, 2, 3))
    _, attention = make("attention")(x, return_params=True)
    assert torch.equal(attention, torch.tensor([[1.0, 0.0, 0.0]]).expand(2, 3))
    _, projective = make("projective")(x, return_params=True)
    assert torch.equal(projective, torch.eye(3).expand(2, 3, 3))
    _, control_points = make("tps")(x, return_params=True)
    assert torch.equal(control_points, tps_control_points().expand(2, 16, 2))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_returned_params_reproduce_the_warp_with_the_public_grids(transform):
    transformer = make(transform, size=16)
    with torch.no_grad():  # move away from the identity
        transformer.regression.bias.add_(0.05 * torch.randn_like(transformer.regression.bias))
        transformer.regression.weight.normal_(0, 0.01)
    x = torch.rand(2, 2, 16, 16)
    y, params = transformer(x, return_params=True)
    grid = {"affine": lambda: affine_grid(params, (16, 16)),
            "attention": lambda: affine_grid(torch.stack([
                torch.stack([params[:, 0], torch.zeros(2), params[:, 1]], 1),
                torch.stack([torch.zeros(2), params[:, 0], params[:, 2]], 1)], 1), (16, 16)),
            "projective": lambda: projective_grid(params, (16, 16)),
            "tps": lambda: tps_grid(params, (16, 16))}[transform]()
    torch.testing.assert_close(y, sample(x, grid), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y, x, atol=1e-3)  # the check is not vacuous: the warp is not the identity


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gradients_reach_the_localisation_network(transform):
    transformer = make(transform, size=16)
    x = torch.rand(4, 2, 16, 16)
    target = torch.roll(x, shifts=1, dims=-1)
    (transformer(x) - target).square().mean().backward()
    assert transformer.regression.weight.grad.abs().sum() > 0  # zero-initialised weights still learn
    assert transformer.regression.bias.grad.abs().sum() > 0
    # the localisation net gets gradient only through the (zero) regression weights: exactly zero at step 0
    first = transformer.localization[1]
    assert torch.equal(first.weight.grad, torch.zeros_like(first.weight))


def test_transformer_learns_a_translation():
    torch.manual_seed(1)
    x = torch.zeros(8, 1, 16, 16)
    x[:, :, 4:12, 4:12] = torch.rand(8, 1, 8, 8)
    target = torch.roll(x, shifts=2, dims=-1)  # content moved two pixels right
    transformer = SpatialTransformer(nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.Tanh()), "attention")
    optimizer = torch.optim.Adam(transformer.parameters(), lr=0.02)
    initial = (transformer(x) - target).square().mean().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = (transformer(x) - target).square().mean()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * initial
    _, params = transformer(x, return_params=True)
    torch.testing.assert_close(params[:, 1], torch.full((8,), -2 * 2 / 16), atol=0.02, rtol=0)  # t_x = -2 px


def test_output_size_and_parameter_free_localisation():
    x = torch.rand(2, 3, 20, 24)
    transformer = SpatialTransformer(nn.Flatten(), "affine", output_size=(10, 12))
    assert isinstance(transformer.regression, LazyIdentityLinear)
    y = transformer(x)
    assert y.shape == (2, 3, 10, 12)
    assert type(transformer.regression) is IdentityLinear  # materialised on first use
    assert transformer.regression.in_features == 3 * 20 * 24
    assert torch.equal(transformer.regression.weight, torch.zeros(6, 1440))
    transformer.regression.reset_parameters()  # re-initialising keeps the identity
    assert torch.equal(transformer.regression.bias.detach(), torch.tensor(identity_parameters("affine")))


def test_tps_with_another_control_lattice():
    transformer = make("tps", ctrl_shape=(3, 5))
    assert transformer.n_params == 30
    x = torch.rand(2, 2, 32, 32)
    y, control_points = transformer(x, return_params=True)
    assert torch.equal(y, x) and control_points.shape == (2, 15, 2)


def test_parallel_transformers_stack_outputs_along_channels():
    x = torch.rand(2, 1, 28, 28)
    parallel = ParallelSpatialTransformers([
        SpatialTransformer(CNNLocalization(28), "attention", output_size=(14, 14)),
        SpatialTransformer(FCNLocalization(28), "tps", output_size=(14, 14)),
    ])
    with torch.no_grad():
        parallel.transformers[0].regression.bias.copy_(torch.tensor([0.5, 0.5, 0.5]))  # zoom on a quadrant
    y, params = parallel(x, return_params=True)
    assert y.shape == (2, 2, 14, 14)
    assert len(params) == 2 and params[0].shape == (2, 3) and params[1].shape == (2, 16, 2)
    torch.testing.assert_close(y[:, :1], parallel.transformers[0](x))
    torch.testing.assert_close(y[:, 1:], parallel.transformers[1](x))
    assert not torch.allclose(y[:, :1], y[:, 1:])


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_tiled_parallel_transformers_start_on_the_quadrants(transform):
    x = torch.rand(2, 1, 32, 32)
    parallel = ParallelSpatialTransformers(
        [SpatialTransformer(FCNLocalization(32), transform, output_size=(16, 16)) for _ in range(4)], tile=True)
    y = parallel(x)
    quadrants = [x[..., :16, :16], x[..., :16, 16:], x[..., 16:, :16], x[..., 16:, 16:]]  # row-major tiles
    for k, quadrant in enumerate(quadrants):
        torch.testing.assert_close(y[:, k:k + 1], quadrant, rtol=0, atol=1e-5)


def test_reset_transform_sets_and_keeps_a_start_transform():
    transformer = make("affine", size=16)
    zoom = window_parameters("affine", (0.5, 0.5), (0.25, -0.25))
    transformer.reset_transform(zoom)
    x = torch.rand(2, 2, 16, 16)
    expected = sample(x, affine_grid(torch.tensor(zoom).view(1, 2, 3).expand(2, 2, 3), (16, 16)))
    torch.testing.assert_close(transformer(x), expected)
    transformer.regression.reset_parameters()
    torch.testing.assert_close(transformer(x), expected)  # kept across re-initialisation
    transformer.reset_transform()
    assert torch.equal(transformer(x), x)
    with pytest.raises(ValueError, match="params must hold 6 values for transform 'affine', got 3"):
        transformer.reset_transform((1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="the attention transform has one scale"):
        window_parameters("attention", (0.5, 1.0), (0.0, 0.0))


def test_window_parameters_agree_across_families():
    scale, shift = (0.5, 0.5), (0.2, -0.3)
    transformers = {t: SpatialTransformer(FCNLocalization(8), t, output_size=(8, 8)) for t in TRANSFORMS}
    x = torch.rand(1, 1, 8, 8)
    outputs = []
    for transform, module in transformers.items():
        module.reset_transform(window_parameters(transform, scale, shift))
        outputs.append(module(x))
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], rtol=0, atol=1e-5)
    assert not torch.allclose(outputs[0], x, atol=1e-2)


def test_volume_transformer_starts_at_identity_and_learns():
    x = torch.rand(2, 1, 8, 16, 4)  # (B, C, D, H, W); dyadic sizes: the identity is exact
    transformer = SpatialTransformer(nn.Flatten(), "affine3d")
    y, theta = transformer(x, return_params=True)
    assert torch.equal(y, x) and torch.equal(theta, torch.eye(3, 4).expand(2, 3, 4))
    (transformer(x) - torch.roll(x, 1, dims=2)).square().mean().backward()
    assert transformer.regression.bias.grad.abs().sum() > 0
    smaller = SpatialTransformer(nn.Flatten(), "affine3d", output_size=(4, 8, 2))
    assert smaller(x).shape == (2, 1, 4, 8, 2)
    with pytest.raises(ValueError, match=r"x must have shape \*x\*x\*x\*x\*, got \(2, 1, 8, 16\)"):
        transformer(x[..., 0])
    with pytest.raises(ValueError, match="output_size must be a sequence of 3 positive integers"):
        SpatialTransformer(nn.Flatten(), "affine3d", output_size=(4, 4))
    with pytest.raises(ValueError, match="tile supports the image transforms"):
        ParallelSpatialTransformers([transformer], tile=True)


def test_localisation_networks_have_the_paper_shapes():
    cnn = CNNLocalization(60)
    convs = [m for m in cnn if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(20, (5, 5)), (20, (5, 5))]
    assert cnn(torch.rand(2, 1, 60, 60)).shape == (2, 20) and cnn.out_features == 20
    fcn = FCNLocalization(42)
    assert [m.out_features for m in fcn if isinstance(m, nn.Linear)] == [32, 32, 32]
    assert fcn(torch.rand(2, 1, 42, 42)).shape == (2, 32)


def test_errors_say_what_was_expected():
    with pytest.raises(ValueError, match="transform must be one of 'affine', 'attention', 'projective', 'tps'"):
        make("similarity")
    with pytest.raises(TypeError, match="localization must be a torch.nn.Module, got function"):
        SpatialTransformer(lambda x: x, "affine")
    with pytest.raises(ValueError, match=r"input_size must be at least 28 for kernel_size=5, got \(27, 27\)"):
        CNNLocalization(27)
    with pytest.raises(ValueError, match=r"output_size must be a sequence of 2 positive integers"):
        make("affine", output_size=5)
    transformer = SpatialTransformer(nn.Identity(), "affine")
    with pytest.raises(ValueError, match=r"localization output must have shape 2x\*, got \(2, 1, 4, 4\)"):
        transformer(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"x must have shape \*x\*x\*x\*, got \(4, 4\)"):
        make("affine")(torch.rand(4, 4))
    with pytest.raises(ValueError, match="all transformers must have the same output_size"):
        ParallelSpatialTransformers([make("affine", output_size=(8, 8)), make("affine")])


def test_non_finite_regressed_parameters_raise():
    transformer = make("projective")
    with torch.no_grad():
        transformer.regression.bias[7] = float("nan")
    with pytest.raises(ValueError, match="theta must contain only finite values, got NaN or Inf"):
        transformer(torch.rand(1, 2, 32, 32))
