"""The spatial transformer module (Jaderberg et al., 2015, §3): localisation net -> grid generator -> sampler.

.. math::  \\theta = f_{loc}(U), \\qquad V = \\mathcal{S}(U, \\mathcal{T}_\\theta(G))

``SpatialTransformer`` owns the regression layer from the localisation features to :math:`\\theta` and initialises
it to the identity transform (zero weights, identity bias), so a new transformer returns its input unchanged and
training starts from the plain network. The ready-made localisation networks are those of the paper's distorted
MNIST models (§4.1): :class:`FCNLocalization` and :class:`CNNLocalization`.

Convention: see :mod:`triptych.spatial.grids` (``src_from_dst`` grids in normalised ``(x, y)`` coordinates on
:math:`[-1, 1]`, one ``align_corners`` for grid and sampler).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from triptych._validation import check_bool, check_choice, check_int, check_size, check_tensor
from triptych.spatial.grids import (
    PADDING_MODES,
    _check_ctrl_shape,
    _tps_grid_from_offsets,
    affine_grid,
    affine_grid_3d,
    attention_grid,
    projective_grid,
    sample,
    tps_control_points,
)

__all__ = [
    "TRANSFORMS",
    "VOLUME_TRANSFORMS",
    "CNNLocalization",
    "FCNLocalization",
    "IdentityLinear",
    "LazyIdentityLinear",
    "ParallelSpatialTransformers",
    "SpatialTransformer",
    "identity_parameters",
    "window_parameters",
]

TRANSFORMS = ("affine", "attention", "projective", "tps")  # on images (B, C, H, W)
VOLUME_TRANSFORMS = ("affine3d",)  # on volumes (B, C, D, H, W), paper appendix


def identity_parameters(transform: str, ctrl_shape: Sequence[int] = (4, 4)) -> tuple[float, ...]:
    """The flat parameter vector :math:`\\theta` of the identity transform of a family.

    - ``"affine"``: 6 entries of :math:`A_\\theta` row by row, ``(1, 0, 0, 0, 1, 0)``;
    - ``"attention"``: ``(s, t_x, t_y) = (1, 0, 0)``;
    - ``"projective"``: :math:`\\theta_1..\\theta_8` = ``(1, 0, 0, 0, 1, 0, 0, 0)``;
    - ``"tps"``: ``2K`` control-point offsets from rest, all zero (``K = rows * cols``);
    - ``"affine3d"``: 12 entries of the ``3 x 4`` matrix row by row.
    """
    check_choice("transform", transform, TRANSFORMS + VOLUME_TRANSFORMS)
    if transform == "affine3d":
        return (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    if transform == "affine":
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    if transform == "attention":
        return (1.0, 0.0, 0.0)
    if transform == "projective":
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
    rows, cols = _check_ctrl_shape(ctrl_shape)
    return (0.0,) * (2 * rows * cols)


def window_parameters(transform: str, scale: tuple[float, float], shift: tuple[float, float],
                      ctrl_shape: Sequence[int] = (4, 4)) -> tuple[float, ...]:
    """Flat :math:`\\theta` of the axis-aligned window map :math:`x^s = s_x x^t + t_x`, :math:`y^s = s_y y^t + t_y`.

    The output then shows the window of half-sizes ``scale`` centred at ``shift`` (normalised coordinates);
    ``scale=(1, 1), shift=(0, 0)`` is :func:`identity_parameters`. The attention family has one scale: it needs
    ``s_x == s_y``.
    """
    check_choice("transform", transform, TRANSFORMS)
    (sx, sy), (tx, ty) = (float(v) for v in scale), (float(v) for v in shift)
    if transform == "attention":
        if sx != sy:
            raise ValueError(f"the attention transform has one scale; got scale={scale}")
        return (sx, tx, ty)
    if transform in ("affine", "projective"):
        return (sx, 0.0, tx, 0.0, sy, ty) + ((0.0, 0.0) if transform == "projective" else ())
    rest = tps_control_points(ctrl_shape, dtype=torch.float64)
    offsets = rest * torch.tensor([sx, sy], dtype=torch.float64) + torch.tensor([tx, ty], dtype=torch.float64) - rest
    return tuple(offsets.reshape(-1).tolist())


class IdentityLinear(nn.Linear):
    """Regression layer :math:`\\theta = W h + b` initialised to a fixed output: :math:`W = 0`, :math:`b = \\theta_0`.

    ``reset_parameters()`` restores that initialisation, so re-initialising a model keeps its transformers at the
    identity.

    Args:
        in_features: size F of the localisation features.
        identity: :math:`\\theta_0`, the output at initialisation (its length is ``out_features``).
    """

    def __init__(self, in_features: int, identity: Sequence[float]):
        self.identity = tuple(float(v) for v in identity)  # read by reset_parameters, which nn.Linear calls
        super().__init__(in_features, len(self.identity))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.bias.copy_(torch.tensor(self.identity, dtype=self.bias.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, identity={self.identity}"


class LazyIdentityLinear(LazyModuleMixin, IdentityLinear):
    """:class:`IdentityLinear` whose ``in_features`` is inferred on the first forward (it then becomes one)."""

    cls_to_become = IdentityLinear
    weight: UninitializedParameter
    bias: UninitializedParameter

    def __init__(self, identity: Sequence[float]):
        super().__init__(0, identity)
        self.weight = UninitializedParameter()
        self.bias = UninitializedParameter()

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.in_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, features: torch.Tensor) -> None:
        if self.has_uninitialized_params():
            with torch.no_grad():
                self.in_features = features.shape[-1]
                self.weight.materialize((self.out_features, self.in_features),
                                        dtype=features.dtype, device=features.device)
                self.bias.materialize((self.out_features,), dtype=features.dtype, device=features.device)
                self.reset_parameters()


class SpatialTransformer(nn.Module):
    """A spatial transformer: warps its input by a transform regressed from that input.

    Args:
        localization: :math:`f_{loc}`, maps the input ``(B, C, H, W)`` (or volume ``(B, C, D, H, W)``) to features
            ``(B, F)``. If it has an
            ``out_features`` attribute (as :class:`FCNLocalization` and :class:`CNNLocalization` do) the regression
            layer is built at once; otherwise F is inferred on the first forward.
        transform: ``"affine"`` (6 parameters), ``"attention"`` (3: scale and translation), ``"projective"`` (8) or
            ``"tps"`` (thin plate spline, 2K control-point offsets); for volumes, ``"affine3d"`` (12).
        output_size: ``(h, w)`` (``(d, h, w)`` for volumes) of the output; ``None`` keeps the input size.
            Down-sampling can alias.
        align_corners: used by both the grid generator and the sampler (module convention).
        ctrl_shape: ``(rows, cols)`` of the TPS control lattice (``"tps"`` only); the paper uses 4 x 4.
        padding_mode: sampler padding, ``"zeros"`` as in the paper.

    Attributes:
        localization: the localisation network.
        regression: :class:`IdentityLinear` (or its lazy form) from F features to the flat :math:`\\theta`.

    ``forward(x, return_params=False)`` returns the warped ``(B, C, h, w)``, and with ``return_params=True`` also
    the transform in its natural form: affine ``(B, 2, 3)``, attention ``(B, 3)``, projective ``(B, 3, 3)``, TPS
    absolute control points ``(B, K, 2)`` (what :func:`~triptych.spatial.grids.tps_grid` takes), 3-D affine
    ``(B, 3, 4)``. The input is
    sampled as it is: normalise *after* the transformer, or zero padding becomes a bright border (see the notes).

    Example:
        >>> transformer = SpatialTransformer(CNNLocalization(28), "tps")
        >>> x = torch.rand(8, 1, 28, 28)
        >>> y, control_points = transformer(x, return_params=True)  # a new transformer is the identity
        >>> y.shape, control_points.shape
        (torch.Size([8, 1, 28, 28]), torch.Size([8, 16, 2]))
    """

    def __init__(self, localization: nn.Module, transform: str = "affine", output_size: Sequence[int] | None = None,
                 *, align_corners: bool = False, ctrl_shape: Sequence[int] = (4, 4), padding_mode: str = "zeros"):
        super().__init__()
        if not isinstance(localization, nn.Module):
            raise TypeError(f"localization must be a torch.nn.Module, got {type(localization).__name__}")
        self.transform = check_choice("transform", transform, TRANSFORMS + VOLUME_TRANSFORMS)
        self.spatial_dims = 3 if transform in VOLUME_TRANSFORMS else 2
        self.output_size = (None if output_size is None
                            else check_size("output_size", output_size, self.spatial_dims))
        self.align_corners = check_bool("align_corners", align_corners)
        self.ctrl_shape = _check_ctrl_shape(ctrl_shape)
        self.padding_mode = check_choice("padding_mode", padding_mode, PADDING_MODES)
        self.localization = localization
        identity = identity_parameters(transform, self.ctrl_shape)
        in_features = getattr(localization, "out_features", None)
        if in_features is None:
            self.regression = LazyIdentityLinear(identity)
        else:
            self.regression = IdentityLinear(check_int("localization.out_features", in_features, low=1), identity)

    def reset_transform(self, params: Sequence[float] | None = None) -> None:
        """Re-initialise the regression layer to output ``params`` (flat, default the identity) for every input.

        The new initial transform is kept: a later ``reset_parameters()`` returns to it.
        """
        params = identity_parameters(self.transform, self.ctrl_shape) if params is None else tuple(params)
        if len(params) != self.n_params:
            raise ValueError(f"params must hold {self.n_params} values for transform {self.transform!r}, "
                             f"got {len(params)}")
        if not all(map(math.isfinite, params)):
            raise ValueError(f"params must be finite, got {params}")
        self.regression.identity = tuple(float(v) for v in params)
        self.regression.reset_parameters()

    @property
    def n_params(self) -> int:
        """Number of regressed parameters per image."""
        return self.regression.out_features

    def extra_repr(self) -> str:
        size = "input size" if self.output_size is None else self.output_size
        extra = f", ctrl_shape={self.ctrl_shape}" if self.transform == "tps" else ""
        return f"transform={self.transform!r}, output_size={size}, align_corners={self.align_corners}{extra}"

    def regress(self, x: torch.Tensor) -> torch.Tensor:
        """Flat transform parameters :math:`\\theta = W f_{loc}(x) + b`, ``(B, n_params)``."""
        features = self.localization(x)
        check_tensor("localization output", features, shape=(x.shape[0], None))
        return self.regression(features)

    def natural_params(self, theta: torch.Tensor) -> torch.Tensor:
        """Flat ``(B, n_params)`` parameters in their natural shape (see the class docstring)."""
        batch = theta.shape[0]
        if self.transform == "affine":
            return theta.view(batch, 2, 3)
        if self.transform == "affine3d":
            return theta.view(batch, 3, 4)
        if self.transform == "projective":
            return torch.cat([theta, torch.ones_like(theta[:, :1])], dim=1).view(batch, 3, 3)
        if self.transform == "tps":
            rest = tps_control_points(self.ctrl_shape, dtype=theta.dtype, device=theta.device)
            return rest + theta.view(batch, -1, 2)
        return theta

    def grid(self, theta: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Sampling grid ``(B, h, w, 2)`` (``(B, d, h, w, 3)``) for flat parameters ``theta`` ``(B, n_params)``."""
        check_tensor("theta", theta, shape=(None, self.n_params), floating=True, finite=True)
        if self.transform == "affine":
            return affine_grid(theta.view(-1, 2, 3), size, align_corners=self.align_corners)
        if self.transform == "affine3d":
            return affine_grid_3d(theta.view(-1, 3, 4), size, align_corners=self.align_corners)
        if self.transform == "attention":
            return attention_grid(theta, size, align_corners=self.align_corners)
        if self.transform == "projective":
            return projective_grid(theta, size, align_corners=self.align_corners)
        size = check_size("size", size, 2)
        return _tps_grid_from_offsets(theta.view(theta.shape[0], -1, 2), size, self.ctrl_shape, self.align_corners)

    def forward(self, x: torch.Tensor, return_params: bool = False):
        check_tensor("x", x, shape=(None,) * (2 + self.spatial_dims), floating=True)
        theta = self.regress(x)
        size = self.output_size or tuple(x.shape[2:])
        warped = sample(x, self.grid(theta, size), align_corners=self.align_corners, padding_mode=self.padding_mode)
        return (warped, self.natural_params(theta)) if return_params else warped


class ParallelSpatialTransformers(nn.Module):
    """Several spatial transformers applied to the same input, outputs stacked along channels (paper §3.4).

    Each transformer has its own localisation network and transform family; they must produce the same output
    size. ``forward(x, return_params=False)`` returns ``(B, C * n, h, w)`` (transformer ``k``'s channels at
    ``k*C:(k+1)*C``), and with ``return_params=True`` also the list of each transformer's parameters.

    Args:
        transformers: the :class:`SpatialTransformer` modules.
        tile: start the transformers on windows that tile the input (``rows x cols``, ``rows = floor(sqrt(n))``,
            in row-major order) instead of all at the identity, so that they do not begin identical.
    """

    def __init__(self, transformers: Iterable[SpatialTransformer], *, tile: bool = False):
        super().__init__()
        self.transformers = nn.ModuleList(transformers)
        if len(self.transformers) == 0:
            raise ValueError("transformers must hold at least one SpatialTransformer, got none")
        for k, module in enumerate(self.transformers):
            if not isinstance(module, SpatialTransformer):
                raise TypeError(f"transformers[{k}] must be a SpatialTransformer, got {type(module).__name__}")
        sizes = {module.output_size for module in self.transformers}
        if len(sizes) > 1:
            raise ValueError(f"all transformers must have the same output_size, got {sorted(map(str, sizes))}")
        if check_bool("tile", tile):
            volumes = [module.transform for module in self.transformers if module.spatial_dims != 2]
            if volumes:
                raise ValueError(f"tile supports the image transforms {TRANSFORMS}, got {volumes}")
            n = len(self.transformers)
            rows = math.isqrt(n)
            cols = -(-n // rows)
            for k, module in enumerate(self.transformers):
                row, col = divmod(k, cols)
                scale = (1.0 / cols, 1.0 / rows) if module.transform != "attention" else (1.0 / max(rows, cols),) * 2
                shift = ((2 * col + 1) / cols - 1.0, (2 * row + 1) / rows - 1.0)
                module.reset_transform(window_parameters(module.transform, scale, shift, module.ctrl_shape))

    def forward(self, x: torch.Tensor, return_params: bool = False):
        results = [module(x, return_params=True) for module in self.transformers]
        warped = torch.cat([y for y, _ in results], dim=1)
        return (warped, [params for _, params in results]) if return_params else warped


def _square_size(name: str, size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return check_size(name, (size, size), 2)
    return check_size(name, size, 2)


class FCNLocalization(nn.Sequential):
    """The paper's ST-FCN localisation network: ``depth`` fully connected ReLU layers of ``hidden`` units.

    Maps ``(B, C, H, W)`` to ``(B, hidden)``; the regression layer belongs to :class:`SpatialTransformer`.

    Args:
        input_size: ``H`` (square) or ``(H, W)``.
        in_channels: C.
        hidden: units per layer (32 in the paper).
        depth: number of layers (3 in the paper).
    """

    def __init__(self, input_size: int | Sequence[int], in_channels: int = 1, hidden: int = 32, depth: int = 3):
        height, width = _square_size("input_size", input_size)
        in_channels = check_int("in_channels", in_channels, low=1)
        hidden = check_int("hidden", hidden, low=1)
        depth = check_int("depth", depth, low=1)
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_channels * height * width
        for _ in range(depth):
            layers += [nn.Linear(features, hidden), nn.ReLU(inplace=True)]
            features = hidden
        super().__init__(*layers)
        self.out_features = hidden


class CNNLocalization(nn.Sequential):
    """The paper's ST-CNN localisation network (§4.1):

    down-sample x2 (2 x 2 average) -> conv ``filters``@k x k -> max-pool 2 -> conv ``filters``@k x k -> FC ``hidden``,
    all with ReLU; 20 filters, k = 5 and 20 units in the paper. Maps ``(B, C, H, W)`` to ``(B, hidden)``.

    Args:
        input_size: ``H`` (square) or ``(H, W)``; at least ``6 k - 2`` (28 for the default kernel); smaller
            inputs raise.
        in_channels: C.
    """

    def __init__(self, input_size: int | Sequence[int], in_channels: int = 1, filters: int = 20, kernel_size: int = 5,
                 hidden: int = 20):
        height, width = _square_size("input_size", input_size)
        in_channels = check_int("in_channels", in_channels, low=1)
        filters = check_int("filters", filters, low=1)
        kernel_size = check_int("kernel_size", kernel_size, low=1)
        hidden = check_int("hidden", hidden, low=1)

        def after_convs(n: int) -> int:
            return ((n // 2 - kernel_size + 1) // 2) - kernel_size + 1

        out_h, out_w = after_convs(height), after_convs(width)
        if out_h < 1 or out_w < 1:
            minimum = 6 * kernel_size - 2  # smallest n with after_convs(n) >= 1
            raise ValueError(f"input_size must be at least {minimum} for kernel_size={kernel_size}, "
                             f"got {(height, width)}")
        super().__init__(
            nn.AvgPool2d(2),
            nn.Conv2d(in_channels, filters, kernel_size), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(filters, filters, kernel_size), nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(filters * out_h * out_w, hidden), nn.ReLU(inplace=True),
        )
        self.out_features = hidden
