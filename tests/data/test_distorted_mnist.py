import math
import os
from pathlib import Path

import pytest
import torch

from triptych.data import distorted_mnist as dm
from triptych.spatial import affine_grid, projective_grid, sample

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(
    not (SHARED / "SHA256SUMS.raw").is_file() and not os.environ.get("TRIPTYCH_MNIST_DIR"),
    reason="no local MNIST copy")


@pytest.fixture(autouse=True)
def _local_mnist(monkeypatch):
    if not os.environ.get("TRIPTYCH_MNIST_DIR") and SHARED.is_dir():
        monkeypatch.setenv("TRIPTYCH_MNIST_DIR", str(SHARED.resolve()))


def _blob_digits(n: int = 16) -> torch.Tensor:
    """``(n, 28, 28)`` synthetic 'digits': a bright, off-centre, asymmetric blob on black, centred in the box."""
    digits = torch.zeros(n, 28, 28)
    digits[:, 8:20, 11:17] = 1.0
    digits[:, 8:11, 11:22] = 1.0
    return digits


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("distortion", dm.DISTORTIONS)
def test_shape_dtype_range(distortion):
    out = dm.distort(_blob_digits(), distortion, _gen(0))
    size = dm.CANVAS_SIZE[distortion]
    assert out.shape == (16, 1, size, size) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.amax(dim=(1, 2, 3)).min()) > 0.5  # every image still shows its digit


@pytest.mark.parametrize("distortion", dm.DISTORTIONS)
def test_same_seed_same_images_other_seed_other_images(distortion):
    digits = _blob_digits()
    first = dm.distort(digits, distortion, _gen(3))
    assert torch.equal(first, dm.distort(digits, distortion, _gen(3)))
    assert not torch.equal(first, dm.distort(digits, distortion, _gen(4)))
    # a fresh draw for every image: the 16 identical inputs come out different
    assert len({tuple(img.flatten().tolist()) for img in first}) == 16


def test_uint8_digits_are_scaled_to_unit_range():
    digits = (_blob_digits(4) * 255).to(torch.uint8)
    as_float = dm.distort(_blob_digits(4), "R", _gen(0))
    assert torch.allclose(dm.distort(digits, "R", _gen(0)), as_float)


def test_rotation_preserves_mass_and_turns_the_right_way():
    digits = _blob_digits(64)
    out = dm.distort(digits, "R", _gen(0))
    mass_ratio = out.sum(dim=(1, 2, 3)) / digits.sum(dim=(1, 2))
    assert float((mass_ratio - 1).abs().max()) < 0.05
    # +90° (counter-clockwise on screen): a bar right of the centre ends up above it
    bar = torch.zeros(1, 1, 28, 28)
    bar[..., 13:15, 18:26] = 1.0
    theta = dm.rotation_scale_theta(torch.tensor([math.pi / 2]), torch.ones(1), torch.zeros(1, 2), 28)
    turned = sample(bar, affine_grid(theta, (28, 28)))[0, 0]
    rows, cols = torch.nonzero(turned > 0.5, as_tuple=True)
    assert float(rows.float().mean()) < 12 and abs(float(cols.float().mean()) - 13.5) < 1.0


def test_rts_scales_mass_and_moves_the_digit_around_inside_the_canvas():
    digits = _blob_digits(256)
    out = dm.distort(digits, "RTS", _gen(1))[:, 0]
    ratio = out.sum(dim=(1, 2)) / digits.sum(dim=(1, 2))
    assert 0.7 ** 2 * 0.95 < float(ratio.min()) and float(ratio.max()) < 1.2 ** 2 * 1.05
    ys, xs = torch.meshgrid(torch.arange(42.0), torch.arange(42.0), indexing="ij")
    mass = out.sum(dim=(1, 2))
    cy, cx = (out * ys).sum(dim=(1, 2)) / mass, (out * xs).sum(dim=(1, 2)) / mass
    assert float(cx.std()) > 2.0 and float(cy.std()) > 2.0  # the location varies
    # nothing is cut at the border: the outer ring stays dark except for the corners of rotated large digits
    assert float(out[:, [0, -1], :].sum() + out[:, :, [0, -1]].sum()) / float(out.sum()) < 1e-3


def test_homography_maps_the_four_points_exactly_and_is_identity_at_rest():
    corners = torch.tensor([[[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]])
    identity = dm.homography_from_points(corners, corners)
    assert torch.allclose(identity, torch.tensor([[1.0, 0, 0, 0, 1, 0, 0, 0]]), atol=1e-6)
    moved = corners + 0.2 * torch.randn(3, 4, 2)
    theta = dm.homography_from_points(moved, corners.expand(3, 4, 2)).double()
    h = torch.cat([theta, torch.ones(3, 1, dtype=torch.float64)], 1).view(3, 3, 3)
    points = torch.cat([moved.double(), torch.ones(3, 4, 1, dtype=torch.float64)], -1)
    mapped = points @ h.transpose(1, 2)
    assert torch.allclose(mapped[..., :2] / mapped[..., 2:], corners.double().expand(3, 4, 2), atol=1e-5)
    # a homography with the corners only scaled by s shrinks the image about its centre (the projective grid agrees)
    theta = dm.homography_from_points(corners * 0.5, corners)
    assert torch.allclose(projective_grid(theta, (28, 28)), affine_grid(torch.tensor([[[2.0, 0, 0], [0, 2.0, 0]]]),
                                                                        (28, 28)), atol=1e-5)


@pytest.mark.parametrize("distortion, low, high", [("P", 0.1, 3.0), ("E", 0.3, 1.6)])
def test_projective_and_elastic_shrink_the_digit_by_about_the_scale(distortion, low, high):
    digits = _blob_digits(256)
    ratio = dm.distort(digits, distortion, _gen(2)).sum(dim=(1, 2, 3)) / digits.sum(dim=(1, 2))
    assert low < float(ratio.min()) and float(ratio.max()) < high  # P: no image folded away to nothing
    assert float(ratio.mean()) < 0.95  # on average the digit is scaled down (s in [0.75, 1])


def test_tc_canvas_holds_the_digit_and_the_clutter():
    digits = _blob_digits(8)
    empty = dm.distort(digits, "TC", _gen(0), clutter_pool=torch.zeros(5, 28, 28))[:, 0]
    for canvas, digit in zip(empty, digits, strict=True):
        rows, cols = torch.nonzero(canvas, as_tuple=True)
        top, left = int(rows.min()) - 8, int(cols.min()) - 11  # the blob starts at (8, 11) in its box
        assert torch.equal(canvas[top:top + 28, left:left + 28], digit)  # pasted exactly, at integer offsets
        assert float(canvas.sum()) == float(digit.sum())
    cluttered = dm.distort(digits, "TC", _gen(0), clutter_pool=torch.ones(5, 28, 28))[:, 0]
    extra = cluttered.sum(dim=(1, 2)) - digits.sum(dim=(1, 2))
    # 6 crops of 6x6 ones: at least one full crop outside the digit, at most all six
    assert float(extra.min()) >= 1 and float(extra.max()) <= 6 * 36
    assert torch.all(cluttered >= empty)  # clutter never erases the digit


def test_invalid_arguments_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="distortion must be one of 'R', 'RTS'"):
        dm.distort(_blob_digits(2), "rotate", _gen(0))
    with pytest.raises(ValueError, match=r"digits must have shape \*x28x28, got \(2, 32, 32\)"):
        dm.distort(torch.zeros(2, 32, 32), "R", _gen(0))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        dm.distort(_blob_digits(2), "R", 0)
    with pytest.raises(ValueError, match="finite"):
        dm.distort(torch.full((2, 28, 28), float("nan")), "P", _gen(0))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*got values in \[0, 255\]"):
        dm.distort(_blob_digits(2) * 255, "R", _gen(0))
    with pytest.raises(ValueError, match="clutter_pool must hold at least one digit"):
        dm.distort(_blob_digits(2), "TC", _gen(0), clutter_pool=torch.zeros(0, 28, 28))
    with pytest.raises(ValueError, match="batch_size must be <= 4"):
        next(dm.training_batches(_blob_digits(4), torch.arange(4), "R", 5, _gen(0)))


def test_training_batches_draw_fresh_distortions_every_epoch():
    digits, labels = _blob_digits(4) * torch.arange(1, 5).view(4, 1, 1) / 4, torch.arange(4)
    batches = dm.training_batches(digits, labels, "R", 4, _gen(0))
    (first, first_labels), (second, second_labels) = next(batches), next(batches)
    assert sorted(first_labels.tolist()) == sorted(second_labels.tolist()) == [0, 1, 2, 3]  # one epoch each
    first, second = first[first_labels.argsort()], second[second_labels.argsort()]
    assert not torch.allclose(first, second)  # same digits, new rotations
    # the label still belongs to its digit: the brightness of digit k is (k + 1) / 4
    assert torch.allclose(first.amax(dim=(1, 2, 3)), torch.arange(1, 5) / 4, atol=0.05)


@needs_mnist
def test_fixed_test_set_is_identical_across_calls_and_differs_across_seeds():
    first = dm.fixed_test_set("E", seed=0, size=300)
    again = dm.fixed_test_set("E", seed=0, size=300)
    other = dm.fixed_test_set("E", seed=1, size=300)
    assert first.images.shape == (300, 1, 28, 28) and first.labels.dtype == torch.int64
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images) and torch.equal(first.labels, other.labels)
    assert not torch.equal(dm.fixed_test_set("R", seed=0, size=300).images, first.images)


@needs_mnist
def test_validation_split_is_disjoint_seeded_and_sized():
    (train_x, train_y), (val_x, val_y) = dm.split_train_validation(5000, seed=0)
    assert train_x.shape == (55_000, 28, 28) and val_x.shape == (5000, 28, 28)
    assert train_y.dtype == val_y.dtype == torch.int64
    (_, _), (val_again, _) = dm.split_train_validation(5000, seed=0)
    (_, _), (val_other, _) = dm.split_train_validation(5000, seed=1)
    assert torch.equal(val_x, val_again) and not torch.equal(val_x, val_other)
    # no held-out digit appears in the training part (compare exact bytes of a sample)
    train_keys = {bytes(img.flatten().tolist()) for img in train_x[:: 11]}
    assert not any(bytes(img.flatten().tolist()) in train_keys for img in val_x[:500])
