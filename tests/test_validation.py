import numpy as np
import pytest
import torch

from triptych._io import atomic_write_bytes, sha256_bytes, sha256_file
from triptych._validation import as_float_matrix, check_choice, check_int, check_real, check_size, check_tensor


def test_check_real_bounds_and_types():
    assert check_real("lr", 1) == 1.0
    with pytest.raises(ValueError, match=r"lr must be > 0.0, got 0.0"):
        check_real("lr", 0.0, low=0.0, low_inclusive=False)
    with pytest.raises(ValueError, match="finite"):
        check_real("lr", float("nan"))
    with pytest.raises(TypeError, match="real number"):
        check_real("lr", True)
    with pytest.raises(TypeError, match="real number"):
        check_real("lr", "0.1")


def test_check_int_and_choice_and_size():
    assert check_int("k", np.int64(3), low=1) == 3
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        check_int("k", 0, low=1)
    with pytest.raises(TypeError, match="integer"):
        check_int("k", 2.0)
    with pytest.raises(ValueError, match="'a', 'b'; got 'c'"):
        check_choice("mode", "c", ("a", "b"))
    assert check_size("size", torch.Size([4, 5]), 2) == (4, 5)
    with pytest.raises(ValueError, match="sequence of 2 positive integers"):
        check_size("size", (4,), 2)


def test_check_tensor_shape_dtype_finite():
    theta = torch.zeros(3, 2, 3)
    assert check_tensor("theta", theta, shape=(None, 2, 3), floating=True, finite=True) is theta
    with pytest.raises(ValueError, match=r"theta must have shape \*x2x3, got \(3, 3, 3\)"):
        check_tensor("theta", torch.zeros(3, 3, 3), shape=(None, 2, 3))
    with pytest.raises(TypeError, match="floating-point"):
        check_tensor("theta", torch.zeros(3, 2, 3, dtype=torch.long), floating=True)
    with pytest.raises(ValueError, match="finite"):
        check_tensor("theta", torch.tensor([float("inf")]), finite=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_tensor("theta", np.zeros(3))


def test_as_float_matrix_coerces_and_refuses():
    out = as_float_matrix("x", np.arange(6, dtype=np.float64).reshape(2, 3), dim=3)
    assert out.dtype == torch.float32 and out.shape == (2, 3) and out.is_contiguous()
    assert as_float_matrix("q", [1.0, 2.0]).shape == (1, 2)
    with pytest.raises(ValueError, match="d = 4 columns"):
        as_float_matrix("x", np.zeros((2, 3)), dim=4)
    with pytest.raises(ValueError, match="finite"):
        as_float_matrix("x", np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"shape \(N, d\)"):
        as_float_matrix("x", np.zeros((2, 3, 4)))
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        as_float_matrix("x", "abc")


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert sha256_file(path) == sha256_bytes(b"new contents")
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]
