"""The one place that checks user input and words the errors.

Every public entry point validates its arguments through these functions, so that a user always gets a
``ValueError`` or ``TypeError`` saying what was expected and what arrived. Never ``assert`` on user input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch


def _describe(value: Any) -> str:
    """A short description of ``value`` for error messages."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and dtype {value.dtype}"
    return f"{value!r} ({type(value).__name__})"


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    """Return ``value`` as a finite float inside the given bounds, or raise.

    Raises:
        TypeError: ``value`` is not a real number (bools are refused).
        ValueError: ``value`` is not finite or lies outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        bound = "<=" if high_inclusive else "<"
        raise ValueError(f"{name} must be {bound} {high}, got {value}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an int inside ``[low, high]``, or raise ``TypeError``/``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (``True``/``False``, numpy bools included), else raise ``TypeError``."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return bool(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_size(name: str, value: Any, length: int) -> tuple[int, ...]:
    """Return ``value`` as a tuple of ``length`` positive ints (an output size such as ``(H, W)``)."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != length:
        raise ValueError(f"{name} must be a sequence of {length} positive integers, got {_describe(value)}")
    return tuple(check_int(f"{name}[{i}]", v, low=1) for i, v in enumerate(value))


def check_tensor(name: str, value: Any, *, shape: Sequence[int | None] | None = None,
                 floating: bool = False, finite: bool = False) -> torch.Tensor:
    """Check a tensor argument and return it unchanged.

    Args:
        shape: expected shape, ``None`` entries match any size; e.g. ``(None, 2, 3)`` for ``(B, 2, 3)``.
        floating: require a floating-point dtype.
        finite: refuse NaN and infinite entries.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(value)}")
    if shape is not None:
        expected = "x".join("*" if s is None else str(s) for s in shape)
        if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape, strict=False)):
            raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if finite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must contain only finite values, got NaN or Inf")
    return value


def as_float_matrix(name: str, value: Any, *, dim: int | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Coerce a numpy array or tensor of shape ``(N, d)`` to a finite contiguous float tensor.

    The tensor keeps its device. A 1-d input of length ``d`` is treated as one row.

    Raises:
        TypeError: not an array, tensor or nested sequence of numbers.
        ValueError: wrong number of dimensions, wrong ``d``, or non-finite entries.
    """
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray | list | tuple):
        array = np.asarray(value)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise TypeError(f"{name} must hold numbers, got {_describe(array)}")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor of shape (N, d), got {_describe(value)}")
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape (N, d), got {tuple(tensor.shape)}")
    if dim is not None and tensor.shape[1] != dim:
        raise ValueError(f"{name} must have d = {dim} columns, got shape {tuple(tensor.shape)}")
    if tensor.is_complex():
        raise TypeError(f"{name} must be real, got dtype {tensor.dtype}")
    tensor = tensor.to(dtype).contiguous()
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must contain only finite values, got NaN or Inf")
    return tensor
