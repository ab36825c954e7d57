"""Spatial transformer networks (Jaderberg, Simonyan, Zisserman, Kavukcuoglu; NIPS 2015).

- :mod:`~triptych.spatial.grids`: pure grid generators (affine, attention, projective, thin plate spline, 3-D
  affine) and the bilinear sampler. Grids are ``src_from_dst`` in normalised ``(x, y)`` coordinates on [-1, 1];
  ``align_corners`` is explicit everywhere and must match between grid and sampler.
- :mod:`~triptych.spatial.transformer`: :class:`SpatialTransformer` (localisation net + identity-initialised
  regression + grid + sampler), :class:`ParallelSpatialTransformers`, and the paper's localisation networks.
- :mod:`~triptych.spatial.models`: the distorted-MNIST models of Table 1, :func:`build_model`.
"""

from triptych.spatial.grids import (
    affine_grid,
    affine_grid_3d,
    attention_grid,
    projective_grid,
    sample,
    tps_control_points,
    tps_grid,
    tps_kernel,
)
from triptych.spatial.models import (
    INPUT_SIZES,
    MODEL_NAMES,
    DistortedMNISTNet,
    build_model,
    count_parameters,
    parameter_table,
)
from triptych.spatial.transformer import (
    TRANSFORMS,
    VOLUME_TRANSFORMS,
    CNNLocalization,
    FCNLocalization,
    IdentityLinear,
    LazyIdentityLinear,
    ParallelSpatialTransformers,
    SpatialTransformer,
    identity_parameters,
    window_parameters,
)

__all__ = [
    "INPUT_SIZES",
    "MODEL_NAMES",
    "TRANSFORMS",
    "VOLUME_TRANSFORMS",
    "CNNLocalization",
    "DistortedMNISTNet",
    "FCNLocalization",
    "IdentityLinear",
    "LazyIdentityLinear",
    "ParallelSpatialTransformers",
    "SpatialTransformer",
    "affine_grid",
    "affine_grid_3d",
    "attention_grid",
    "build_model",
    "count_parameters",
    "identity_parameters",
    "parameter_table",
    "projective_grid",
    "sample",
    "tps_control_points",
    "tps_grid",
    "tps_kernel",
    "window_parameters",
]
