"""Grid generators and the sampler: identities, equalities between families, F.affine_grid, TPS, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from triptych.spatial import (
    affine_grid,
    affine_grid_3d,
    attention_grid,
    projective_grid,
    sample,
    tps_control_points,
    tps_grid,
    tps_kernel,
)

# Sizes at which the normalised pixel centres and the sampler's un-normalisation are exact in floating point.
EXACT_SIZES = {False: [(32, 32), (16, 64), (8, 4)], True: [(33, 33), (17, 65), (9, 5)]}
PAPER_SIZES = [(28, 28), (42, 42), (60, 60), (5, 7)]
DTYPES = [torch.float32, torch.float64]


def identity_grids(batch, size, align_corners, dtype):
    """The identity grid of every 2-D family, from each family's own parameters."""
    rest = tps_control_points(dtype=dtype).expand(batch, -1, -1)
    return {
        "affine": affine_grid(torch.eye(2, 3, dtype=dtype).expand(batch, 2, 3), size, align_corners=align_corners),
        "attention": attention_grid(torch.tensor([[1.0, 0.0, 0.0]], dtype=dtype).expand(batch, 3), size,
                                    align_corners=align_corners),
        "projective": projective_grid(torch.tensor([[1.0, 0, 0, 0, 1, 0, 0, 0]], dtype=dtype).expand(batch, 8),
                                      size, align_corners=align_corners),
        "tps": tps_grid(rest, size, align_corners=align_corners),
    }


def random_affine(batch, dtype=torch.float64, scale=0.3):
    return torch.eye(2, 3, dtype=dtype) + scale * torch.randn(batch, 2, 3, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_identity_of_every_family_reproduces_input_exactly(align_corners, dtype):
    for size in EXACT_SIZES[align_corners]:
        x = torch.rand(2, 3, *size, dtype=dtype)
        for family, grid in identity_grids(2, size, align_corners, dtype).items():
            assert torch.equal(sample(x, grid, align_corners=align_corners), x), (family, size)


@pytest.mark.parametrize("align_corners", [False, True])
def test_identity_at_other_sizes_is_within_one_rounding(align_corners):
    for size in PAPER_SIZES:
        x = torch.rand(2, 1, *size)
        # a rounding of a normalised centre moves the sample by up to ~max(size) * eps / 2 pixels
        tolerance = max(size) * torch.finfo(torch.float32).eps
        for family, grid in identity_grids(2, size, align_corners, torch.float32).items():
            torch.testing.assert_close(sample(x, grid, align_corners=align_corners), x, rtol=0, atol=tolerance,
                                       msg=f"{family} {size}")


@pytest.mark.parametrize("align_corners", [False, True])
def test_identity_grids_are_the_pixel_centres(align_corners):
    height, width = 4, 5
    grid = identity_grids(1, (height, width), align_corners, torch.float64)["affine"][0]
    j, i = torch.arange(width, dtype=torch.float64), torch.arange(height, dtype=torch.float64)
    if align_corners:
        xs, ys = 2 * j / (width - 1) - 1, 2 * i / (height - 1) - 1
    else:
        xs, ys = (2 * j + 1) / width - 1, (2 * i + 1) / height - 1
    torch.testing.assert_close(grid[..., 0], xs.expand(height, width), rtol=0, atol=1e-15)  # x varies along width
    torch.testing.assert_close(grid[..., 1], ys[:, None].expand(height, width), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------------------------------
# Affine and attention
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_grid_equals_torch_affine_grid(align_corners, dtype):
    theta = random_affine(3, dtype)
    for size in [(28, 28), (7, 11), (1, 6)]:
        expected = F.affine_grid(theta, (3, 1, *size), align_corners=align_corners)
        # both round the pixel centres; F.affine_grid twice, so they may differ in the last bits
        tolerance = 8 * torch.finfo(dtype).eps
        torch.testing.assert_close(affine_grid(theta, size, align_corners=align_corners), expected,
                                   rtol=tolerance, atol=tolerance)


def test_affine_grid_translation_moves_content_by_whole_pixels():
    x = torch.rand(1, 1, 8, 8)
    theta = torch.tensor([[[1.0, 0.0, 2.0 / 8], [0.0, 1.0, 0.0]]])  # sample one pixel to the right
    y = sample(x, affine_grid(theta, (8, 8)))
    torch.testing.assert_close(y[..., :-1], x[..., 1:], rtol=0, atol=0)
    assert torch.equal(y[..., -1], torch.zeros_like(y[..., -1]))  # zero padding beyond the border


def test_attention_grid_equals_affine_grid_of_its_matrix():
    params = torch.tensor([[0.5, 0.1, -0.2], [1.3, -0.4, 0.3]], dtype=torch.float64)
    s, tx, ty = params.unbind(1)
    zero = torch.zeros_like(s)
    theta = torch.stack([torch.stack([s, zero, tx], 1), torch.stack([zero, s, ty], 1)], 1)
    torch.testing.assert_close(attention_grid(params, (9, 6)), affine_grid(theta, (9, 6)), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------------------------------
# Projective
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("align_corners", [False, True])
def test_projective_with_zero_perspective_terms_equals_affine(align_corners):
    theta = random_affine(4)
    params = torch.cat([theta.reshape(4, 6), torch.zeros(4, 2, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(projective_grid(params, (10, 13), align_corners=align_corners),
                               affine_grid(theta, (10, 13), align_corners=align_corners), rtol=0, atol=1e-15)


def test_projective_matches_the_paper_formula_and_is_scale_invariant():
    params = torch.tensor([[1.1, 0.2, 0.1, -0.1, 0.9, 0.05, 0.3, -0.2]], dtype=torch.float64)
    grid = projective_grid(params, (5, 6))
    t1, t2, t3, t4, t5, t6, t7, t8 = params[0]
    base = affine_grid(torch.eye(2, 3, dtype=torch.float64)[None], (5, 6))[0]
    x, y = base[..., 0], base[..., 1]
    denominator = t7 * x + t8 * y + 1
    expected = torch.stack([(t1 * x + t2 * y + t3) / denominator, (t4 * x + t5 * y + t6) / denominator], dim=-1)
    torch.testing.assert_close(grid[0], expected, rtol=1e-14, atol=1e-14)
    matrix = torch.cat([params, torch.ones(1, 1, dtype=torch.float64)], 1).view(1, 3, 3)
    torch.testing.assert_close(projective_grid(-2.5 * matrix, (5, 6)), grid, rtol=1e-14, atol=1e-14)


def test_projective_points_at_infinity_give_finite_grids_and_gradients():
    # theta_7 = 1: the denominator x + 1 vanishes on the left edge with align_corners=True
    params = torch.tensor([[1.0, 0, 0, 0, 1, 0, 1.0, 0]], dtype=torch.float64, requires_grad=True)
    grid = projective_grid(params, (3, 3), align_corners=True)
    assert torch.isfinite(grid).all()
    grid.sum().backward()
    assert torch.isfinite(params.grad).all()


# --------------------------------------------------------------------------------------------------------------
# Thin plate spline
# --------------------------------------------------------------------------------------------------------------

def test_tps_kernel_values_and_masked_zero():
    r2 = torch.tensor([0.0, 1.0, 4.0, math.e], dtype=torch.float64, requires_grad=True)
    u = tps_kernel(r2)
    torch.testing.assert_close(u, torch.tensor([0.0, 0.0, 4 * math.log(4.0), math.e], dtype=torch.float64))
    u.sum().backward()
    assert torch.isfinite(r2.grad).all() and r2.grad[0] == 0  # no NaN from log(0) at r = 0


def test_tps_control_points_lattice():
    points = tps_control_points((3, 4), dtype=torch.float64)
    assert points.shape == (12, 2)
    torch.testing.assert_close(points[:4, 0], torch.tensor([-1, -1 / 3, 1 / 3, 1], dtype=torch.float64))
    assert torch.equal(points[:4, 1], torch.full((4,), -1.0, dtype=torch.float64))  # x varies fastest
    assert torch.equal(points[::4, 1], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))


def test_tps_at_rest_is_the_identity_grid():
    for align_corners in (False, True):
        rest = tps_control_points(dtype=torch.float64).expand(2, -1, -1)
        affine = affine_grid(torch.eye(2, 3, dtype=torch.float64).expand(2, 2, 3), (11, 7), align_corners=align_corners)
        assert torch.equal(tps_grid(rest, (11, 7), align_corners=align_corners), affine)


def test_tps_maps_control_points_exactly_onto_their_targets():
    rest = tps_control_points(dtype=torch.float64)
    targets = rest + 0.2 * torch.randn(3, 16, 2, dtype=torch.float64)
    # with align_corners=True, output pixels 0, 2, 4, 6 of a 7 x 7 grid lie on the 4 x 4 control lattice
    grid = tps_grid(targets, (7, 7), align_corners=True)
    torch.testing.assert_close(grid[:, ::2, ::2].reshape(3, 16, 2), targets, rtol=0, atol=1e-13)


def test_tps_reproduces_affine_maps():
    theta = random_affine(2)
    rest = tps_control_points(dtype=torch.float64)
    targets = rest @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]
    torch.testing.assert_close(tps_grid(targets, (9, 10)), affine_grid(theta, (9, 10)), rtol=0, atol=1e-13)


def naive_tps_grid(targets, size, align_corners):
    """Per-image reference: build and solve the TPS system, then evaluate the spline at every output pixel."""
    rest = tps_control_points(dtype=torch.float64)
    k = rest.shape[0]
    pixels = affine_grid(torch.eye(2, 3, dtype=torch.float64)[None], size, align_corners=align_corners).reshape(-1, 2)
    system = torch.zeros(k + 3, k + 3, dtype=torch.float64)
    system[:k, :k] = tps_kernel(((rest[:, None] - rest[None]) ** 2).sum(-1))
    system[:k, k] = system[k, :k] = 1.0
    system[:k, k + 1:] = rest
    system[k + 1:, :k] = rest.T
    grids = []
    for target in targets:
        rhs = torch.cat([target, torch.zeros(3, 2, dtype=torch.float64)])
        coefficients = torch.linalg.solve(system, rhs)
        basis = tps_kernel(((pixels[:, None] - rest[None]) ** 2).sum(-1))
        values = basis @ coefficients[:k] + coefficients[k] + pixels @ coefficients[k + 1:]
        grids.append(values.reshape(*size, 2))
    return torch.stack(grids)


@pytest.mark.parametrize("align_corners", [False, True])
def test_tps_grid_matches_a_naive_per_image_solve(align_corners):
    targets = tps_control_points(dtype=torch.float64) + 0.15 * torch.randn(3, 16, 2, dtype=torch.float64)
    torch.testing.assert_close(tps_grid(targets, (12, 9), align_corners=align_corners),
                               naive_tps_grid(targets, (12, 9), align_corners), rtol=0, atol=1e-12)


def test_tps_other_control_lattices():
    targets = tps_control_points((3, 5), dtype=torch.float64) + 0.1 * torch.randn(2, 15, 2, dtype=torch.float64)
    grid = tps_grid(targets, (5, 9), ctrl_shape=(3, 5), align_corners=True)  # pixels 0, 2, 4 x 0, 2, 4, 6, 8
    torch.testing.assert_close(grid[:, ::2, ::2].reshape(2, 15, 2), targets, rtol=0, atol=1e-13)


# --------------------------------------------------------------------------------------------------------------
# 3-D affine
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grid_3d_identity_is_exact(align_corners):
    size = (8, 16, 4) if not align_corners else (9, 17, 5)
    x = torch.rand(2, 2, *size)
    grid = affine_grid_3d(torch.eye(3, 4).expand(2, 3, 4), size, align_corners=align_corners)
    assert grid.shape == (2, *size, 3)
    assert torch.equal(sample(x, grid, align_corners=align_corners), x)


@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grid_3d_equals_torch_affine_grid_on_volumes(align_corners):
    theta = torch.eye(3, 4, dtype=torch.float64) + 0.3 * torch.randn(2, 3, 4, dtype=torch.float64)
    expected = F.affine_grid(theta, (2, 1, 5, 6, 7), align_corners=align_corners)
    torch.testing.assert_close(affine_grid_3d(theta, (5, 6, 7), align_corners=align_corners), expected,
                               rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------------------------------------------
# Gradients (float64 gradcheck through grid and sampler)
# --------------------------------------------------------------------------------------------------------------

def _gradcheck(make_grid, params, size, channels=2):
    x = torch.rand(params.shape[0], channels, *size, dtype=torch.float64, requires_grad=True)
    params = params.detach().requires_grad_(True)

    def warp(inp, theta):
        return sample(inp, make_grid(theta), align_corners=False)

    assert torch.autograd.gradcheck(warp, (x, params), eps=1e-6, atol=1e-5)


def test_gradcheck_affine():
    _gradcheck(lambda t: affine_grid(t, (4, 5)), random_affine(2, scale=0.2), (5, 6))


def test_gradcheck_attention():
    params = torch.tensor([[0.8, 0.13, -0.07], [1.1, -0.21, 0.05]], dtype=torch.float64)
    _gradcheck(lambda t: attention_grid(t, (4, 5)), params, (5, 6))


def test_gradcheck_projective():
    identity = torch.tensor([[1, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.float64)
    params = identity + 0.1 * torch.randn(2, 8, dtype=torch.float64)
    _gradcheck(lambda t: projective_grid(t, (4, 5)), params, (5, 6))


def test_gradcheck_tps():
    targets = tps_control_points(dtype=torch.float64) + 0.1 * torch.randn(2, 16, 2, dtype=torch.float64)
    _gradcheck(lambda t: tps_grid(t, (4, 5)), targets, (5, 6))


def test_gradcheck_affine_3d():
    theta = torch.eye(3, 4, dtype=torch.float64) + 0.2 * torch.randn(1, 3, 4, dtype=torch.float64)
    _gradcheck(lambda t: affine_grid_3d(t, (3, 4, 3)), theta, (3, 4, 5), channels=1)


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------

def test_wrong_shapes_raise_saying_what_was_expected():
    with pytest.raises(ValueError, match=r"theta must have shape \*x2x3, got \(2, 3\)"):
        affine_grid(torch.eye(2, 3), (4, 4))
    with pytest.raises(ValueError, match=r"params must have shape \*x3, got \(1, 4\)"):
        attention_grid(torch.ones(1, 4), (4, 4))
    with pytest.raises(ValueError, match=r"theta must have shape Bx8 or Bx3x3, got \(1, 6\)"):
        projective_grid(torch.ones(1, 6), (4, 4))
    with pytest.raises(ValueError, match=r"control_points must have shape \*x16x2, got \(1, 9, 2\)"):
        tps_grid(torch.zeros(1, 9, 2), (4, 4))
    with pytest.raises(ValueError, match=r"theta must have shape \*x3x4, got \(1, 2, 3\)"):
        affine_grid_3d(torch.zeros(1, 2, 3), (2, 2, 2))
    with pytest.raises(ValueError, match=r"size must be a sequence of 2 positive integers"):
        affine_grid(torch.eye(2, 3)[None], (4, 4, 4))
    with pytest.raises(ValueError, match=r"size\[1\] must be >= 1, got 0"):
        affine_grid(torch.eye(2, 3)[None], (4, 0))
    with pytest.raises(ValueError, match=r"ctrl_shape must have at least 2 rows and 2 columns"):
        tps_grid(torch.zeros(1, 4, 2), (4, 4), ctrl_shape=(1, 4))


def test_non_finite_parameters_raise():
    theta = torch.eye(2, 3)[None].clone()
    theta[0, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="theta must contain only finite values"):
        affine_grid(theta, (4, 4))
    with pytest.raises(ValueError, match="theta must contain only finite values"):
        projective_grid(torch.full((1, 8), float("inf")), (4, 4))
    with pytest.raises(ValueError, match="control_points must contain only finite values"):
        tps_grid(torch.full((1, 16, 2), float("nan")), (4, 4))


def test_non_float_and_bad_flags_raise():
    with pytest.raises(TypeError, match="theta must be a floating-point tensor"):
        affine_grid(torch.zeros(1, 2, 3, dtype=torch.int64), (4, 4))
    with pytest.raises(TypeError, match="align_corners must be a bool, got 1"):
        affine_grid(torch.eye(2, 3)[None], (4, 4), align_corners=1)


def test_sample_checks_its_inputs():
    x = torch.rand(2, 1, 4, 4)
    grid = affine_grid(torch.eye(2, 3).expand(2, 2, 3), (3, 3))
    with pytest.raises(ValueError, match=r"grid must have shape 2x\*x\*x2, got \(1, 3, 3, 2\)"):
        sample(x, grid[:1])
    with pytest.raises(ValueError, match=r"x must have shape BxCxHxW or BxCxDxHxW, got \(4, 4\)"):
        sample(x[0, 0], grid)
    with pytest.raises(ValueError, match="grid must have the dtype of x"):
        sample(x, grid.double())
    with pytest.raises(ValueError, match="padding_mode must be one of 'zeros', 'border', 'reflection'"):
        sample(x, grid, padding_mode="constant")
    assert sample(x, grid).shape == (2, 1, 3, 3)  # output size follows the grid


# --------------------------------------------------------------------------------------------------------------
# Cross-checks against kornia (different conventions: pixel homographies, TPS centred on the targets)
# --------------------------------------------------------------------------------------------------------------

def _pixel_from_normalised(height, width, dtype):
    """Corner-aligned (align_corners=True) map from normalised to pixel coordinates, ``(3, 3)``."""
    return torch.tensor([[(width - 1) / 2, 0, (width - 1) / 2], [0, (height - 1) / 2, (height - 1) / 2], [0, 0, 1]],
                        dtype=dtype)


def test_projective_warp_matches_kornia_warp_perspective():
    kornia = pytest.importorskip("kornia")
    height, width = 13, 17
    src_from_dst = torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(3, 3, 3, dtype=torch.float64)
    x = torch.rand(3, 2, height, width, dtype=torch.float64)
    ours = sample(x, projective_grid(src_from_dst, (height, width), align_corners=True), align_corners=True)
    # kornia takes the source->destination homography in pixels (corner-aligned)
    pixel = _pixel_from_normalised(height, width, torch.float64)
    dst_from_src_pixels = torch.linalg.inv(pixel @ src_from_dst @ torch.linalg.inv(pixel))
    theirs = kornia.geometry.transform.warp_perspective(x, dst_from_src_pixels, (height, width), align_corners=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("align_corners", [False, True])
def test_projective_warp_matches_kornia_homography_warp(align_corners):
    kornia = pytest.importorskip("kornia")
    src_from_dst = torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(2, 3, 3, dtype=torch.float64)
    x = torch.rand(2, 1, 11, 8, dtype=torch.float64)
    ours = sample(x, projective_grid(src_from_dst, (11, 8), align_corners=align_corners), align_corners=align_corners)
    theirs = kornia.geometry.transform.homography_warp(x, src_from_dst, (11, 8), align_corners=align_corners)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def _kornia_tps_warp(kornia, x, targets, align_corners):
    rest = tps_control_points(dtype=x.dtype).expand_as(targets)
    tps = kornia.geometry.transform
    kernel_weights, affine_weights = tps.get_tps_transform(rest, targets)
    return tps.warp_image_tps(x, targets, kernel_weights, affine_weights, align_corners=align_corners)


def test_tps_warp_matches_kornia_for_affine_targets():
    kornia = pytest.importorskip("kornia")
    theta = random_affine(2, scale=0.2)
    rest = tps_control_points(dtype=torch.float64)
    targets = rest @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]
    x = torch.rand(2, 1, 15, 12, dtype=torch.float64)
    ours = sample(x, tps_grid(targets, (15, 12), align_corners=True), align_corners=True)
    torch.testing.assert_close(ours, _kornia_tps_warp(kornia, x, targets, True), rtol=0, atol=1e-10)


def test_tps_warp_matches_kornia_at_the_control_points():
    # kornia centres its kernels on the targets rather than on the lattice (a different interpolant between the
    # control points), but both interpolate: the output pixels on the lattice must agree for any targets.
    kornia = pytest.importorskip("kornia")
    targets = tps_control_points(dtype=torch.float64) + 0.2 * torch.randn(2, 16, 2, dtype=torch.float64)
    x = torch.rand(2, 3, 7, 7, dtype=torch.float64)
    ours = sample(x, tps_grid(targets, (7, 7), align_corners=True), align_corners=True)
    theirs = _kornia_tps_warp(kornia, x, targets, True)
    torch.testing.assert_close(ours[..., ::2, ::2], theirs[..., ::2, ::2], rtol=0, atol=1e-10)
    assert (ours - theirs).abs().max() > 1e-3  # elsewhere the two splines differ: the check above is not vacuous
