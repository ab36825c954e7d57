"""Distorted MNIST of the spatial transformer paper (Jaderberg et al. 2015, §4.1), generated in batches.

Five distortions, each a random warp of a 28×28 MNIST digit (values in [0, 1], black background):

- ``"R"``   rotation by an angle uniform in ±90°; 28×28.
- ``"RTS"`` rotation uniform in ±45°, scale uniform in [0.7, 1.2], placed at a random location of a 42×42 canvas.
- ``"P"``   scale uniform in [0.75, 1.0], then each of the 4 corners moved by N(0, 5 px): a projective warp; 28×28.
- ``"E"``   scale uniform in [0.75, 1.0], then the 16 control points of a 4×4 grid moved by N(0, 1.5 px): a thin
  plate spline warp; 28×28.
- ``"TC"``  the digit at a random location of a 60×60 canvas, plus 6 random 6×6 crops of other digits as clutter.

Every warp is built as a sampling grid (:mod:`triptych.spatial`) that maps each *output* pixel to normalised
*source* coordinates of the 28×28 digit, and the whole batch is sampled at once; nothing loops over images.

Convention: normalised coordinates in [−1, 1] span the full pixel extent (``align_corners=False``), x then y.
One source pixel is ``2 / 28`` normalised units, so a displacement of ``d`` pixels is ``d / 14``.

Randomness comes only from an explicit :class:`torch.Generator`: the same seed gives the same images. Test sets
are drawn from the MNIST test split with a fixed seed; training batches are drawn fresh, every batch, from the
training split minus a held-out validation split (:func:`split_train_validation`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from triptych._validation import check_choice, check_int, check_tensor
from triptych.data.mnist import load_mnist
from triptych.spatial import affine_grid, projective_grid, sample, tps_control_points, tps_grid

DISTORTIONS = ("R", "RTS", "P", "E", "TC")
CANVAS_SIZE = {"R": 28, "RTS": 42, "P": 28, "E": 28, "TC": 60}
DIGIT_SIZE = 28
_PIXEL = 2.0 / DIGIT_SIZE  # one source pixel in normalised units
TC_CLUTTER_PIECES = 6
TC_CLUTTER_SIZE = 6
VALIDATION_SIZE = 10_000
_CHUNK = 2_000  # images distorted per call when building a fixed set (bounds memory)
_SEED_STRIDE = 1_000_003  # separates the seeds of different distortions and splits


@dataclass(frozen=True)
class DistortedSet:
    """A fixed, seeded set of distorted digits.

    Attributes:
        images: ``(N, 1, S, S)`` float32 in [0, 1], ``S = CANVAS_SIZE[distortion]``.
        labels: ``(N,)`` int64.
        distortion: one of :data:`DISTORTIONS`.
        seed: the seed the distortions were drawn with.
    """

    images: torch.Tensor
    labels: torch.Tensor
    distortion: str
    seed: int


def check_distortion(distortion: str) -> str:
    """Return ``distortion`` if it is one of :data:`DISTORTIONS`, else raise ``ValueError``."""
    return check_choice("distortion", distortion, DISTORTIONS)


def _check_digits(digits: torch.Tensor) -> torch.Tensor:
    """``(B, 28, 28)`` digits as float32 in [0, 1]: uint8 is divided by 255, floats must be finite and in [0, 1]."""
    check_tensor("digits", digits, shape=(None, DIGIT_SIZE, DIGIT_SIZE))
    if digits.dtype == torch.uint8:
        return digits.float().div_(255.0)
    check_tensor("digits", digits, floating=True, finite=True)
    if digits.numel() and (float(digits.min()) < 0.0 or float(digits.max()) > 1.0):
        raise ValueError(f"float digits must lie in [0, 1] (black background 0), got values in "
                         f"[{float(digits.min()):.3g}, {float(digits.max()):.3g}]; pass uint8 images for 0-255")
    return digits.float()


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """``(n,)`` samples uniform in ``[low, high)``."""
    return low + (high - low) * torch.rand(n, generator=generator)


def rotation_scale_theta(angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                         canvas_size: int) -> torch.Tensor:
    """The affine ``θ = src_from_dst`` of a digit rotated by ``angle``, scaled by ``scale`` and shifted by ``shift``.

    A point ``p`` of the canvas (in pixels from its centre) shows the digit point ``q = R(−a)(p − t) / s``, so in
    normalised coordinates ``x_src = (S / 28) R(−a) (x_dst − t_norm) / s`` with ``t_norm = 2 t / S``.

    Args:
        angle: ``(B,)`` rotation ``a`` in radians (counter-clockwise on screen).
        scale: ``(B,)`` scale ``s`` of the digit on the canvas.
        shift: ``(B, 2)`` position ``t`` of the digit's centre on the canvas, in normalised canvas units.
        canvas_size: side ``S`` of the output canvas in pixels.

    Returns:
        ``θ`` of shape ``(B, 2, 3)`` for :func:`triptych.spatial.affine_grid`.
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    # y points down in image coordinates, so R(-a) of an on-screen counter-clockwise turn is [[c, -s], [s, c]].
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    linear = rotation * (canvas_size / DIGIT_SIZE / scale)[:, None, None]
    offset = -(linear @ shift.unsqueeze(-1))  # (B, 2, 1)
    return torch.cat([linear, offset], dim=-1)


def homography_from_points(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """The 8 parameters of the projective map sending each ``dst[:, k]`` onto ``src[:, k]`` (4 points).

    ``x_s = (θ1 x + θ2 y + θ3) / (θ7 x + θ8 y + 1)``, ``y_s = (θ4 x + θ5 y + θ6) / (θ7 x + θ8 y + 1)``; each point
    gives two linear equations in θ, and the ``(B, 8, 8)`` system is solved with ``torch.linalg.solve``.

    Args:
        dst: ``(B, 4, 2)`` output points (x, y).
        src: ``(B, 4, 2)`` source points they map to.

    Returns:
        ``θ`` of shape ``(B, 8)`` for :func:`triptych.spatial.projective_grid`.
    """
    x, y = dst[..., 0], dst[..., 1]
    xs, ys = src[..., 0], src[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_x = torch.stack([x, y, one, zero, zero, zero, -x * xs, -y * xs], dim=-1)  # (B, 4, 8)
    rows_y = torch.stack([zero, zero, zero, x, y, one, -x * ys, -y * ys], dim=-1)
    system = torch.cat([rows_x, rows_y], dim=1).double()  # (B, 8, 8)
    target = torch.cat([xs, ys], dim=1).double().unsqueeze(-1)  # (B, 8, 1)
    return torch.linalg.solve(system, target).squeeze(-1).to(dst.dtype)


def rotate(digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """R: rotate each digit by an angle uniform in ±90°. ``(B, 28, 28)`` → ``(B, 1, 28, 28)``."""
    n = digits.shape[0]
    angle = _uniform(generator, n, -math.pi / 2, math.pi / 2)
    theta = rotation_scale_theta(angle, torch.ones(n), torch.zeros(n, 2), DIGIT_SIZE)
    return sample(digits.unsqueeze(1), affine_grid(theta, (DIGIT_SIZE, DIGIT_SIZE)))


def rotate_translate_scale(digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RTS: rotation in ±45°, scale in [0.7, 1.2], random location in a 42×42 canvas. → ``(B, 1, 42, 42)``.

    The centre is uniform over the positions that keep the scaled 28×28 box inside the canvas.
    """
    n, size = digits.shape[0], CANVAS_SIZE["RTS"]
    angle = _uniform(generator, n, -math.pi / 4, math.pi / 4)
    scale = _uniform(generator, n, 0.7, 1.2)
    room = (size - DIGIT_SIZE * scale) / size  # half the free space, in normalised canvas units
    shift = (2 * torch.rand(n, 2, generator=generator) - 1) * room[:, None]
    theta = rotation_scale_theta(angle, scale, shift, size)
    return sample(digits.unsqueeze(1), affine_grid(theta, (size, size)))


def _is_proper_warp(moved: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``(B,)`` whether each moved quadrilateral is a proper projective image of the square.

    The corners must still form a convex quadrilateral in the original order (every turn ``e_k × e_{k+1} > 0``,
    so nothing folds over), and the denominator ``θ7 x + θ8 y + 1`` must stay positive on the whole output
    canvas (it is affine, so its four corners suffice), so no output pixel samples from beyond the horizon.
    """
    edges = moved.roll(-1, dims=1) - moved  # (B, 4, 2)
    turns = edges[..., 0] * edges.roll(-1, dims=1)[..., 1] - edges[..., 1] * edges.roll(-1, dims=1)[..., 0]
    canvas = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    denominator = canvas @ theta[:, 6:].T + 1  # (4, B)
    return (turns > 0).all(dim=1) & (denominator > 0).all(dim=0) & torch.isfinite(theta).all(dim=1)


def project(digits: torch.Tensor, generator: torch.Generator, max_rounds: int = 100) -> torch.Tensor:
    """P: scale in [0.75, 1.0], then the 4 corners moved by N(0, 5 px); projective warp. → ``(B, 1, 28, 28)``.

    The digit's corners ``c_k = (±1, ±1)`` appear at ``s c_k + ε_k`` in the output; the homography maps those
    points back onto ``c_k``. With a 5 px spread the corners of a small digit sometimes fold over (an empty or
    mirrored image); those draws are rejected and drawn again, batch-wise, so every image is a proper projective
    view of its digit.
    """
    n = digits.shape[0]
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = _uniform(generator, count, 0.75, 1.0)
        moved = corners * scale[:, None, None] + 5.0 * _PIXEL * torch.randn(count, 4, 2, generator=generator)
        return moved, homography_from_points(moved, corners.expand(count, 4, 2))

    moved, theta = draw(n)
    for _ in range(max_rounds):
        redo = ~_is_proper_warp(moved, theta)
        if not redo.any():
            break
        moved[redo], theta[redo] = draw(int(redo.sum()))
    else:
        raise RuntimeError(f"no proper projective warp after {max_rounds} rounds of redraws")
    return sample(digits.unsqueeze(1), projective_grid(theta, (DIGIT_SIZE, DIGIT_SIZE)))


def elastic(digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """E: scale in [0.75, 1.0], then 16 control points (4×4 grid) moved by N(0, 1.5 px); thin plate spline warp.

    The output's rest control points ``g_k`` are sent to source points ``g_k / s + ε_k``. → ``(B, 1, 28, 28)``.
    """
    n = digits.shape[0]
    scale = _uniform(generator, n, 0.75, 1.0)
    rest = tps_control_points((4, 4)).expand(n, 16, 2)
    targets = rest / scale[:, None, None] + 1.5 * _PIXEL * torch.randn(n, 16, 2, generator=generator)
    return sample(digits.unsqueeze(1), tps_grid(targets, (DIGIT_SIZE, DIGIT_SIZE), ctrl_shape=(4, 4)))


def _paste(canvas: torch.Tensor, patches: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Paste ``patches`` ``(B, h, w)`` into ``canvas`` ``(B, S, S)`` at integer ``(top, left)`` by pixel-wise max."""
    batch = torch.arange(canvas.shape[0])[:, None, None]
    rows = (top[:, None] + torch.arange(patches.shape[1]))[:, :, None]
    cols = (left[:, None] + torch.arange(patches.shape[2]))[:, None, :]
    canvas[batch, rows, cols] = torch.maximum(canvas[batch, rows, cols], patches)
    return canvas


def _crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, size, size)`` crops of ``images`` ``(B, H, W)`` at integer ``(top, left)``."""
    batch = torch.arange(images.shape[0])[:, None, None]
    rows = (top[:, None] + torch.arange(size))[:, :, None]
    cols = (left[:, None] + torch.arange(size))[:, None, :]
    return images[batch, rows, cols]


def translate_clutter(digits: torch.Tensor, generator: torch.Generator, clutter_pool: torch.Tensor) -> torch.Tensor:
    """TC: the digit at a random location of a 60×60 canvas, plus 6 random 6×6 crops of other digits.

    Each clutter piece is a 6×6 crop at a random place of a digit drawn at random from ``clutter_pool``, pasted
    at a random place of the canvas; overlaps keep the brighter pixel. → ``(B, 1, 60, 60)``.

    Args:
        digits: ``(B, 28, 28)`` float digits in [0, 1].
        clutter_pool: ``(M, 28, 28)`` float digits the clutter is cut from (the same split as ``digits``).
    """
    n, size = digits.shape[0], CANVAS_SIZE["TC"]
    canvas = torch.zeros(n, size, size)
    top, left = torch.randint(0, size - DIGIT_SIZE + 1, (2, n), generator=generator)
    canvas = _paste(canvas, digits, top, left)
    crop_room, canvas_room = DIGIT_SIZE - TC_CLUTTER_SIZE + 1, size - TC_CLUTTER_SIZE + 1
    for _ in range(TC_CLUTTER_PIECES):
        sources = clutter_pool[torch.randint(0, clutter_pool.shape[0], (n,), generator=generator)]
        crop_top, crop_left = torch.randint(0, crop_room, (2, n), generator=generator)
        pieces = _crop(sources, crop_top, crop_left, TC_CLUTTER_SIZE)
        paste_top, paste_left = torch.randint(0, canvas_room, (2, n), generator=generator)
        canvas = _paste(canvas, pieces, paste_top, paste_left)
    return canvas.unsqueeze(1)


def distort(digits: torch.Tensor, distortion: str, generator: torch.Generator,
            clutter_pool: torch.Tensor | None = None) -> torch.Tensor:
    """Apply one random draw of ``distortion`` to each digit of a batch.

    Args:
        digits: ``(B, 28, 28)``, uint8 (0–255) or float in [0, 1].
        distortion: one of :data:`DISTORTIONS`.
        generator: the source of randomness (CPU).
        clutter_pool: ``(M, 28, 28)`` digits for the TC clutter (uint8 or float); defaults to ``digits``.

    Returns:
        ``(B, 1, S, S)`` float32 in [0, 1] with ``S = CANVAS_SIZE[distortion]``.
    """
    check_distortion(distortion)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    digits = _check_digits(digits)
    pool = digits if clutter_pool is None else _check_digits(clutter_pool)
    if distortion == "TC" and pool.shape[0] == 0:
        raise ValueError("clutter_pool must hold at least one digit, got none")
    return _distort(digits, distortion, generator, pool)


def _distort(digits: torch.Tensor, distortion: str, generator: torch.Generator,
             clutter_pool: torch.Tensor) -> torch.Tensor:
    """:func:`distort` on inputs already checked (float digits in [0, 1]), so loops validate only once."""
    if distortion == "TC":
        return translate_clutter(digits, generator, clutter_pool)
    warp = {"R": rotate, "RTS": rotate_translate_scale, "P": project, "E": elastic}[distortion]
    return warp(digits, generator).clamp_(0.0, 1.0)


def split_train_validation(validation_size: int = VALIDATION_SIZE, seed: int = 0
                           ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The MNIST training split divided, by a seeded permutation, into training and held-out validation digits.

    Returns:
        ``((train_digits, train_labels), (val_digits, val_labels))``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``.
    """
    images, labels = load_mnist("train")
    validation_size = check_int("validation_size", validation_size, low=1, high=images.shape[0] - 1)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(check_int("seed", seed)))
    val, train = order[:validation_size], order[validation_size:]
    return (images[train], labels[train].long()), (images[val], labels[val].long())


def distort_fixed(digits: torch.Tensor, labels: torch.Tensor, distortion: str, seed: int) -> DistortedSet:
    """One fixed draw of ``distortion`` over ``digits`` (clutter from the same digits), reproducible from ``seed``.

    Distorted in chunks of a few thousand images so that memory stays bounded.
    """
    check_distortion(distortion)
    generator = torch.Generator().manual_seed(check_int("seed", seed, low=0))
    pool = _check_digits(digits)
    check_tensor("labels", labels, shape=(pool.shape[0],))
    chunks = [_distort(pool[i:i + _CHUNK], distortion, generator, pool)
              for i in range(0, pool.shape[0], _CHUNK)]
    return DistortedSet(torch.cat(chunks), labels.long(), distortion, seed)


def _fixed_seed(distortion: str, split: str, seed: int) -> int:
    return seed * _SEED_STRIDE + 10 * DISTORTIONS.index(distortion) + ("validation", "test").index(split)


def fixed_test_set(distortion: str, seed: int = 0, size: int | None = None) -> DistortedSet:
    """The fixed test set of ``distortion``: the MNIST test split (or its first ``size`` digits) distorted once.

    The same ``(distortion, seed, size)`` gives the same tensors on every call; the test split is never used
    for training or model choice.
    """
    check_distortion(distortion)
    images, labels = load_mnist("test")
    if size is not None:
        size = check_int("size", size, low=1, high=images.shape[0])
        images, labels = images[:size], labels[:size]
    return distort_fixed(images, labels, distortion, _fixed_seed(distortion, "test", check_int("seed", seed, low=0)))


def fixed_validation_set(distortion: str, digits: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> DistortedSet:
    """The fixed validation set of ``distortion`` over held-out training ``digits`` """
    check_distortion(distortion)
    return distort_fixed(digits, labels, distortion,
                         _fixed_seed(distortion, "validation", check_int("seed", seed, low=0)))


def training_batches(digits: torch.Tensor, labels: torch.Tensor, distortion: str, batch_size: int,
                     generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(images (B, 1, S, S), labels (B,))`` batches with distortions drawn fresh for every batch.

    The digits are visited in a new random order every epoch; each visit gets a new random warp, so no two
    epochs see the same image. TC clutter is cut from the same training digits.
    """
    check_distortion(distortion)
    pool = _check_digits(digits)
    batch_size = check_int("batch_size", batch_size, low=1, high=pool.shape[0])
    check_tensor("labels", labels, shape=(pool.shape[0],))
    while True:
        order = torch.randperm(pool.shape[0], generator=generator)
        for start in range(0, pool.shape[0] - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield _distort(pool[index], distortion, generator, pool), labels[index]


__all__ = [
    "CANVAS_SIZE", "DISTORTIONS", "DistortedSet", "check_distortion", "distort", "distort_fixed", "elastic",
    "homography_from_points", "project", "rotate", "rotate_translate_scale", "rotation_scale_theta",
    "fixed_test_set", "fixed_validation_set", "split_train_validation", "training_batches", "translate_clutter",
]
