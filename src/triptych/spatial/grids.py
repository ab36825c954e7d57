"""Sampling-grid generators and the bilinear sampler of spatial transformers (Jaderberg et al., 2015, §3.2-3.3).

A grid generator is the map :math:`\\mathcal{T}_\\theta` of the paper: for every pixel :math:`(x_i^t, y_i^t)` of the
*output* (target) it gives the *source* location :math:`(x_i^s, y_i^s)` that the sampler reads,

.. math::  (x_i^s, y_i^s) = \\mathcal{T}_\\theta(x_i^t, y_i^t).

Convention (every function in this module):
    - grids are ``src_from_dst``: ``grid[b, i, j] = (x_s, y_s)`` is where output pixel ``(i, j)`` samples the input;
    - coordinates are normalised to :math:`[-1, 1]`, **x (width) first, then y (height)** (then z for volumes),
      exactly what :func:`torch.nn.functional.grid_sample` expects;
    - ``align_corners=False``: −1 and 1 are the outer edges of the corner pixels, pixel ``j`` of ``W`` is centred at
      :math:`(2j + 1)/W - 1`; ``align_corners=True``: −1 and 1 are the centres of the corner pixels, pixel ``j`` is
      at :math:`2j/(W - 1) - 1`. Pass the same ``align_corners`` to :func:`sample`;
    - output pixel centres are correctly rounded from float64, so the identity transform of every family reproduces
      its input bit for bit wherever floating point allows it: sizes :math:`2^k` with ``align_corners=False`` and
      :math:`2^k + 1` with ``align_corners=True`` (the sampler's un-normalisation is then exact); at other sizes
      the identity is off by one rounding (~1e-7 relative in float32), as it is with ``F.affine_grid``, which is
      exact at fewer sizes because it rounds twice;
    - what depends only on the output size and the control grid (pixel coordinates, the TPS system) is computed
      once and cached per ``(size, align_corners, dtype, device)``; nothing here loops over the batch, and each
      family costs one GEMM for the whole batch. Grids come back as strided views of that ``(B, 2, H*W)`` product
      (``grid_sample`` reads them as they are; use ``.reshape`` rather than ``.view`` on them).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from triptych._validation import check_bool, check_choice, check_size, check_tensor

__all__ = [
    "PADDING_MODES",
    "affine_grid",
    "affine_grid_3d",
    "attention_grid",
    "projective_grid",
    "sample",
    "tps_control_points",
    "tps_grid",
    "tps_kernel",
]

PADDING_MODES = ("zeros", "border", "reflection")


# --------------------------------------------------------------------------------------------------------------
# Output pixel coordinates, cached
# --------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _pixel_coordinates(n: int, align_corners: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised centres of ``n`` pixels along one axis, ``(n,)``, computed in float64 and rounded once.

    Correct rounding is what makes the identity exact at dyadic sizes; ``F.affine_grid`` scales a ``linspace``
    and so rounds twice.
    """
    with torch.inference_mode(False), torch.no_grad():
        j = torch.arange(n, dtype=torch.float64)
        if align_corners:
            centres = 2.0 * j / (n - 1) - 1.0 if n > 1 else torch.zeros(1, dtype=torch.float64)
        else:
            centres = (2.0 * j + 1.0) / n - 1.0
        return centres.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _homogeneous_base_grid(size: tuple[int, ...], align_corners: bool, dtype: torch.dtype,
                           device: torch.device) -> torch.Tensor:
    """Homogeneous output coordinates as rows: ``(3, H*W)`` holding ``x, y, 1``, or ``(4, D*H*W)``: ``x, y, z, 1``.

    Columns run over the output in C order (depth, then height, then width). Rows rather than points, so that a
    batch of matrices applies as ONE ``(B*r, 3) x (3, H*W)`` GEMM (a broadcast ``matmul`` of ``(H*W, 3)`` against
    ``(B, 3, 2)`` runs as B skinny products and is an order of magnitude slower on CPU).
    """
    axes = [_pixel_coordinates(n, align_corners, dtype, device) for n in size]  # (d, h, w) order
    with torch.inference_mode(False), torch.no_grad():
        mesh = torch.meshgrid(*axes, indexing="ij")
        rows = [m.reshape(-1) for m in reversed(mesh)]  # x, y[, z]
        rows.append(torch.ones_like(rows[0]))
        return torch.stack(rows).contiguous()


def _points_last(rows: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``(B, r, N)`` coordinate rows -> grid ``(B, *size, r)``, a view (strided; ``grid_sample`` takes it as is)."""
    batch, n_rows = rows.shape[:2]
    return rows.view(batch, n_rows, *size).movedim(1, -1)


def _apply_matrices(matrices: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``(B, r, c)`` matrices applied to ``(c, N)`` homogeneous rows -> ``(B, r, N)``, as one GEMM."""
    batch, n_rows, n_cols = matrices.shape
    return (matrices.reshape(batch * n_rows, n_cols) @ base).view(batch, n_rows, -1)


def _output_size(size: Sequence[int], length: int) -> tuple[int, ...]:
    return check_size("size", size, length)


def _check_align_corners(align_corners: bool) -> bool:
    return check_bool("align_corners", align_corners)


# --------------------------------------------------------------------------------------------------------------
# Matrix families
# --------------------------------------------------------------------------------------------------------------

def affine_grid(theta: torch.Tensor, size: Sequence[int], *, align_corners: bool = False) -> torch.Tensor:
    """Affine sampling grid, :math:`(x^s, y^s)^T = A_\\theta (x^t, y^t, 1)^T` (paper eq. 1).

    Equal to ``F.affine_grid(theta, (B, C, H, W), align_corners)`` up to one rounding of the pixel centres (see the
    module convention), and faster: the base grid is cached.

    Args:
        theta: ``src_from_dst`` matrices :math:`A_\\theta`, ``(B, 2, 3)``, in normalised coordinates.
        size: output size ``(H, W)``.
        align_corners: see the module convention.

    Returns:
        Grid ``(B, H, W, 2)`` of normalised source coordinates ``(x, y)``.
    """
    check_tensor("theta", theta, shape=(None, 2, 3), floating=True, finite=True)
    height, width = _output_size(size, 2)
    base = _homogeneous_base_grid((height, width), _check_align_corners(align_corners), theta.dtype, theta.device)
    return _points_last(_apply_matrices(theta, base), (height, width))


def attention_grid(params: torch.Tensor, size: Sequence[int], *, align_corners: bool = False) -> torch.Tensor:
    """Attention (isotropic scale + translation) grid, :math:`A_\\theta = [[s, 0, t_x], [0, s, t_y]]` (paper §3.1).

    Args:
        params: ``(B, 3)`` rows ``(s, t_x, t_y)``; ``s = 1, t = 0`` is the identity, ``s < 1`` zooms in.
        size: output size ``(H, W)``.

    Returns:
        Grid ``(B, H, W, 2)`` of normalised source coordinates.
    """
    check_tensor("params", params, shape=(None, 3), floating=True, finite=True)
    height, width = _output_size(size, 2)
    base = _homogeneous_base_grid((height, width), _check_align_corners(align_corners), params.dtype, params.device)
    scale, shift = params[:, 0:1, None], params[:, 1:3, None]  # (B, 1, 1), (B, 2, 1)
    return _points_last(base[:2] * scale + shift, (height, width))


def _homography_rows(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 8)`` paper parameters or ``(B, 3, 3)`` matrices -> numerator rows ``(B, 2, 3)``, denominator ``(B, 1, 3)``.

    Kept apart (rather than one ``(B, 3, 3)`` matrix whose product is sliced) so the backward pass does not scatter
    gradients of slices into zero-filled full-size tensors.
    """
    if theta.dim() == 2 and theta.shape[1] == 8:
        check_tensor("theta", theta, floating=True, finite=True)
        denominator = torch.cat([theta[:, 6:8], torch.ones_like(theta[:, :1])], dim=1)
        return theta[:, :6].view(-1, 2, 3), denominator.view(-1, 1, 3)
    if theta.dim() == 3 and theta.shape[1:] == (3, 3):
        check_tensor("theta", theta, floating=True, finite=True)
        return theta[:, :2], theta[:, 2:]
    raise ValueError(f"theta must have shape Bx8 or Bx3x3, got {tuple(theta.shape)}")


def projective_grid(theta: torch.Tensor, size: Sequence[int], *, align_corners: bool = False) -> torch.Tensor:
    """Projective (homography) grid (paper §3.1 and appendix):

    .. math::  x^s = \\frac{\\theta_1 x^t + \\theta_2 y^t + \\theta_3}{\\theta_7 x^t + \\theta_8 y^t + 1},\\quad
               y^s = \\frac{\\theta_4 x^t + \\theta_5 y^t + \\theta_6}{\\theta_7 x^t + \\theta_8 y^t + 1}.

    With :math:`\\theta_7 = \\theta_8 = 0` this is the affine grid of ``[[θ1, θ2, θ3], [θ4, θ5, θ6]]``.
    Denominators smaller in magnitude than the dtype's machine epsilon are moved to ±eps (keeping their sign, with
    the gradient of the unclamped value), so points sent towards infinity sample the padding instead of producing
    NaN.

    Args:
        theta: ``(B, 8)`` parameters :math:`\\theta_1..\\theta_8` or ``(B, 3, 3)`` ``src_from_dst`` homographies
            (homogeneous, any non-zero scale), in normalised coordinates.
        size: output size ``(H, W)``.

    Returns:
        Grid ``(B, H, W, 2)`` of normalised source coordinates.
    """
    numerator_rows, denominator_row = _homography_rows(theta)
    height, width = _output_size(size, 2)
    base = _homogeneous_base_grid((height, width), _check_align_corners(align_corners), theta.dtype, theta.device)
    numerator = _apply_matrices(numerator_rows, base)  # (B, 2, H*W)
    denominator = _apply_matrices(denominator_row, base)  # (B, 1, H*W)
    eps = torch.finfo(theta.dtype).eps
    with torch.no_grad():  # move |w| < eps to ±eps; the gradient passes straight through (w + constant)
        clamp = torch.where(denominator.abs() < eps, torch.full_like(denominator, eps).copysign(denominator)
                            - denominator, torch.zeros_like(denominator))
    return _points_last(numerator * (denominator + clamp).reciprocal(), (height, width))


# --------------------------------------------------------------------------------------------------------------
# Thin plate spline
# --------------------------------------------------------------------------------------------------------------

def tps_kernel(squared_distance: torch.Tensor) -> torch.Tensor:
    """Thin-plate radial basis :math:`U(r) = r^2 \\log r^2`, with :math:`U(0) = 0`, from :math:`r^2`.

    The zero is masked before the logarithm, so gradients at :math:`r = 0` are 0, not NaN.
    """
    positive = squared_distance > 0
    safe = torch.where(positive, squared_distance, torch.ones_like(squared_distance))
    return torch.where(positive, safe * safe.log(), torch.zeros_like(squared_distance))


def _check_ctrl_shape(ctrl_shape: Sequence[int]) -> tuple[int, int]:
    rows, cols = check_size("ctrl_shape", ctrl_shape, 2)
    if rows < 2 or cols < 2:
        raise ValueError(f"ctrl_shape must have at least 2 rows and 2 columns of control points, got {ctrl_shape}")
    return rows, cols


@functools.lru_cache(maxsize=64)
def _control_points(ctrl_shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    rows, cols = ctrl_shape
    with torch.inference_mode(False), torch.no_grad():
        y, x = torch.meshgrid(torch.linspace(-1.0, 1.0, rows, dtype=torch.float64),
                              torch.linspace(-1.0, 1.0, cols, dtype=torch.float64), indexing="ij")
        return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1).to(device=device, dtype=dtype)


def tps_control_points(ctrl_shape: Sequence[int] = (4, 4), *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Rest positions :math:`p_k` of the TPS control points: a ``rows x cols`` lattice on :math:`[-1, 1]^2`.

    Returns:
        ``(K, 2)`` rows ``(x, y)``, K = rows * cols, row-major (y outer, x inner). Passing these (expanded to
        ``(B, K, 2)``) to :func:`tps_grid` gives the identity grid exactly.
    """
    return _control_points(_check_ctrl_shape(ctrl_shape), dtype, torch.device(device or "cpu")).clone()


def _tps_lhs(points: torch.Tensor) -> torch.Tensor:
    """The TPS system matrix :math:`L = [[K, P], [P^T, 0]]`, ``(K+3, K+3)``, for control points ``(K, 2)``."""
    n = points.shape[0]
    kernel = tps_kernel(torch.cdist(points, points).square())
    affine = torch.cat([torch.ones(n, 1, dtype=points.dtype), points], dim=1)  # rows (1, x, y)
    top = torch.cat([kernel, affine], dim=1)
    bottom = torch.cat([affine.T, torch.zeros(3, 3, dtype=points.dtype)], dim=1)
    return torch.cat([top, bottom], dim=0)


@functools.lru_cache(maxsize=64)
def _tps_warp_matrix(size: tuple[int, int], ctrl_shape: tuple[int, int], align_corners: bool,
                     dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Matrix :math:`M^T` ``(K, H*W)``, with ``grid = M @ control_points``, of the TPS through the control points.

    The TPS :math:`f(v) = a_0 + a_x x + a_y y + \\sum_k w_k U(\\lVert v - p_k \\rVert)` interpolating targets
    :math:`c_k` at the rest points :math:`p_k` solves :math:`L [w; a] = [c; 0]`. Both :math:`L` and the basis at
    the output pixels :math:`A = [U(\\lVert v_i - p_k \\rVert), 1, x_i, y_i]` depend only on the control lattice and
    the output size, so :math:`M = A L^{-1} [I; 0]` is formed once (``torch.linalg.solve`` in float64, no explicit
    inverse) and a warp costs one ``(H*W, K) x (K, 2)`` product per image.
    """
    with torch.inference_mode(False), torch.no_grad():
        points = _control_points(ctrl_shape, torch.float64, torch.device("cpu"))
        n = points.shape[0]
        selector = torch.cat([torch.eye(n, dtype=torch.float64), torch.zeros(3, n, dtype=torch.float64)])
        weights = torch.linalg.solve(_tps_lhs(points), selector)  # (K+3, K): [w; a] per unit target
        pixels = _homogeneous_base_grid(size, align_corners, torch.float64, torch.device("cpu"))[:2].T
        basis = torch.cat([tps_kernel(torch.cdist(pixels, points).square()),
                           torch.ones(pixels.shape[0], 1, dtype=torch.float64), pixels], dim=1)
        return (basis @ weights).T.to(device=device, dtype=dtype).contiguous()


def _tps_grid_from_offsets(offsets: torch.Tensor, size: tuple[int, int], ctrl_shape: tuple[int, int],
                           align_corners: bool) -> torch.Tensor:
    """TPS grid ``(B, H, W, 2)`` from control-point displacements ``(B, K, 2)`` (zero = identity).

    Since the TPS reproduces affine maps exactly, ``M @ (p + d) = base + M @ d``; writing it as ``base + M @ d``
    makes the rest position the exact identity.
    """
    base = _homogeneous_base_grid(size, align_corners, offsets.dtype, offsets.device)[:2]
    warp_t = _tps_warp_matrix(size, ctrl_shape, align_corners, offsets.dtype, offsets.device)  # (K, H*W)
    batch, n_points, _ = offsets.shape
    displacement = (offsets.transpose(1, 2).reshape(batch * 2, n_points) @ warp_t).view(batch, 2, -1)
    return _points_last(base + displacement, size)


def tps_grid(control_points: torch.Tensor, size: Sequence[int], *, ctrl_shape: Sequence[int] = (4, 4),
             align_corners: bool = False) -> torch.Tensor:
    """Thin-plate-spline grid through ``rows x cols`` control points (paper §3.1, Bookstein 1989).

    Output point :math:`p_k` of the rest lattice (:func:`tps_control_points`) samples the source at
    ``control_points[:, k]``; in between, the map is the minimum-bending-energy interpolant with kernel
    :math:`U(r) = r^2 \\log r^2`.

    Args:
        control_points: absolute source coordinates :math:`c_k` of the control points, ``(B, K, 2)`` rows
            ``(x, y)``, K = rows * cols in the order of :func:`tps_control_points`.
        size: output size ``(H, W)``.
        ctrl_shape: ``(rows, cols)`` of the control lattice, each at least 2.

    Returns:
        Grid ``(B, H, W, 2)`` of normalised source coordinates.
    """
    rows, cols = _check_ctrl_shape(ctrl_shape)
    check_tensor("control_points", control_points, shape=(None, rows * cols, 2), floating=True, finite=True)
    size = _output_size(size, 2)
    align_corners = _check_align_corners(align_corners)
    rest = _control_points((rows, cols), control_points.dtype, control_points.device)
    return _tps_grid_from_offsets(control_points - rest, size, (rows, cols), align_corners)


# --------------------------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------------------------

def affine_grid_3d(theta: torch.Tensor, size: Sequence[int], *, align_corners: bool = False) -> torch.Tensor:
    """3-D affine grid for volumes (paper appendix), :math:`(x^s, y^s, z^s)^T = A_\\theta (x^t, y^t, z^t, 1)^T`.

    Equal to ``F.affine_grid(theta, (B, C, D, H, W), align_corners)`` up to one rounding of the pixel centres.

    Args:
        theta: ``src_from_dst`` matrices ``(B, 3, 4)`` in normalised coordinates.
        size: output size ``(D, H, W)``.

    Returns:
        Grid ``(B, D, H, W, 3)`` of normalised source coordinates ``(x, y, z)``.
    """
    check_tensor("theta", theta, shape=(None, 3, 4), floating=True, finite=True)
    depth, height, width = _output_size(size, 3)
    base = _homogeneous_base_grid((depth, height, width), _check_align_corners(align_corners), theta.dtype,
                                  theta.device)
    return _points_last(_apply_matrices(theta, base), (depth, height, width))


# --------------------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------------------

def sample(x: torch.Tensor, grid: torch.Tensor, *, align_corners: bool = False,
           padding_mode: str = "zeros") -> torch.Tensor:
    """Bilinear (trilinear for volumes) sampling of ``x`` at ``grid`` (paper eq. 5, through ``F.grid_sample``).

    .. math::  V_i^c = \\sum_n^H \\sum_m^W U_{nm}^c \\max(0, 1 - |x_i^s - m|) \\max(0, 1 - |y_i^s - n|)

    Differentiable with respect to both ``x`` and ``grid`` (sub-gradients at pixel centres).

    Args:
        x: input ``(B, C, H, W)`` or volume ``(B, C, D, H, W)``.
        grid: ``(B, h, w, 2)`` or ``(B, d, h, w, 3)`` normalised source coordinates from a grid generator built
            with the same ``align_corners``.
        padding_mode: ``"zeros"`` (the paper), ``"border"`` or ``"reflection"``.

    Returns:
        Output ``(B, C, h, w)`` or ``(B, C, d, h, w)``.
    """
    check_tensor("x", x, floating=True)
    if x.dim() not in (4, 5):
        raise ValueError(f"x must have shape BxCxHxW or BxCxDxHxW, got {tuple(x.shape)}")
    spatial = x.dim() - 2
    check_tensor("grid", grid, shape=(x.shape[0],) + (None,) * spatial + (spatial,), floating=True)
    if grid.dtype != x.dtype:
        raise ValueError(f"grid must have the dtype of x ({x.dtype}), got {grid.dtype}")
    check_choice("padding_mode", padding_mode, PADDING_MODES)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode,
                         align_corners=_check_align_corners(align_corners))
