"""ClusterIndex: exactness at full probing, recall, incremental add, padding, persistence, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triptych.mips import ClusterIndex, SearchStats
from triptych.mips.index import band_bounds, default_bands


def _gaussian(n: int, d: int = 16, seed: int = 0, skew: float = 0.5) -> np.ndarray:
    """Gaussian directions with log-normal norms (norm-skewed, like embeddings): ``(n, d)`` float32."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * rng.lognormal(0.0, skew, (n, 1))).astype(np.float32)


def _exact(queries: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ items.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def _recall(found: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, true, strict=True)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return _gaussian(4000, seed=0), _gaussian(100, seed=1, skew=0.0)


@pytest.fixture(scope="module")
def index(data) -> ClusterIndex:
    items, _ = data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ClusterIndex(16, seed=0).train(items).add(items)
    finally:
        torch.set_num_threads(threads)


def test_exact_when_every_leaf_is_probed(index, data):
    items, queries = data
    scores, ids = index.search(queries, 10, branches=index.n_leaves)
    true_scores, true_ids = _exact(queries, items, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and scores.shape == ids.shape == (100, 10)
    np.testing.assert_array_equal(ids, true_ids)
    np.testing.assert_allclose(scores, true_scores, rtol=1e-5, atol=1e-5)


def test_recall_grows_with_branches_and_is_high(index, data):
    items, queries = data
    _, true_ids = _exact(queries, items, 10)
    recalls = [_recall(index.search(queries, 10, branches=b)[1], true_ids) for b in (1, 8, 32)]
    assert recalls[0] < recalls[1] < recalls[2]
    assert recalls[2] >= 0.9
    assert _recall(index.search(queries, 10)[1], true_ids) >= 0.5  # the default


def test_scores_are_exact_inner_products_best_first(index, data):
    items, queries = data
    scores, ids = index.search(queries, 5, branches=4)
    np.testing.assert_allclose(scores, np.einsum("nd,nkd->nk", queries, items[ids]), rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_stats_count_dot_products(index, data):
    _, queries = data
    _, _, stats = index.search(queries, 10, branches=index.n_leaves, return_stats=True)
    assert isinstance(stats, SearchStats)
    assert stats.candidates == index.ntotal and stats.leaves_probed <= index.n_leaves
    assert stats.dot_products == index.ntotal + index.n_leaves and stats.n_queries == 100
    _, _, few = index.search(queries, 10, branches=2, return_stats=True)
    assert few.candidates < index.ntotal / 10 and few.leaves_probed == 2


def test_ids_in_order_of_addition_and_add_without_rebuild(data):
    items, queries = data
    index = ClusterIndex(16, seed=0).train(items)
    centroids = index._centroids.clone()
    for part in np.array_split(items, 3):
        index.add(part)
    assert index.ntotal == 4000 and torch.equal(index._centroids, centroids)
    scores, ids = index.search(queries, 10, branches=index.n_leaves)
    np.testing.assert_array_equal(ids, _exact(queries, items, 10)[1])
    np.testing.assert_allclose(scores, _exact(queries, items, 10)[0], rtol=1e-5, atol=1e-5)


def test_large_norm_items_added_later_are_found(data):
    items, queries = data
    index = ClusterIndex(16, seed=0).train(items).add(items)
    rng = np.random.default_rng(5)
    # 20 items 30x longer than anything seen in training, each close to one query's direction
    unit = queries[:20] / np.linalg.norm(queries[:20], axis=1, keepdims=True)
    giants = (30.0 * np.abs(items).max() * (unit + 0.05 * rng.standard_normal((20, 16)))).astype(np.float32)
    index.add(giants)
    _, true_ids = _exact(queries, np.concatenate([items, giants]), 10)
    np.testing.assert_array_equal(true_ids[:20, 0], np.arange(4000, 4020))  # the set-up: each giant wins
    scores, ids = index.search(queries, 10, branches=4)
    np.testing.assert_array_equal(ids[:20, 0], np.arange(4000, 4020))
    assert _recall(ids, true_ids) >= 0.6


def test_zero_vectors_are_items_too():
    # every item scores negatively against the query except the zero vector, whose score 0 is the best
    rng = np.random.default_rng(3)
    items = -np.abs(rng.standard_normal((200, 4))).astype(np.float32)
    items[57] = 0.0
    for levels in (1, 2):
        index = ClusterIndex(4, levels=levels, n_clusters=20).train(items).add(items)
        scores, ids = index.search(np.ones((1, 4), dtype=np.float32), 1, branches=index.n_leaves)
        assert ids[0, 0] == 57 and scores[0, 0] == 0.0


def test_padding_when_k_exceeds_items():
    items = _gaussian(30, d=4)
    index = ClusterIndex(4, n_clusters=3).train(items).add(items[:5])
    scores, ids = index.search(items[:2], 8, branches=3)
    assert ids.shape == (2, 8)
    assert np.all(ids[:, 5:] == -1) and np.all(np.isneginf(scores[:, 5:]))
    assert sorted(ids[0, :5].tolist()) == [0, 1, 2, 3, 4]
    empty = ClusterIndex(4, n_clusters=3).train(items)
    scores, ids = empty.search(items[:2], 3)
    assert np.all(ids == -1) and np.all(np.isneginf(scores))


def test_fewer_candidates_than_k_pads(index, data):
    _, queries = data
    scores, ids = index.search(queries, 400, branches=1)
    assert np.all((ids == -1) == np.isneginf(scores))
    assert np.any(ids == -1)
    real = ids[0][ids[0] >= 0]
    assert len(set(real.tolist())) == len(real)


def test_two_level_hierarchy(data):
    items, queries = data
    index = ClusterIndex(16, levels=2, seed=0).train(items).add(items)
    assert len(index._levels) == 1 and index._levels[0].centroids.shape[0] < index.n_leaves
    _, true_ids = _exact(queries, items, 10)
    np.testing.assert_array_equal(index.search(queries, 10, branches=index.n_leaves)[1], true_ids)
    few, many = (_recall(index.search(queries, 10, branches=b)[1], true_ids) for b in (4, 32))
    assert few < many and many >= 0.85
    _, _, stats = index.search(queries, 10, branches=4, return_stats=True)
    assert stats.dot_products < stats.candidates + index.n_leaves  # the top level spares scoring every leaf


@pytest.mark.parametrize("reduction", ["sign_alsh", "simple_lsh"])
def test_reductions_and_seeded_determinism(data, reduction):
    items, queries = data
    a = ClusterIndex(16, reduction=reduction, seed=3).train(items).add(items).search(queries, 10, branches=8)
    b = ClusterIndex(16, reduction=reduction, seed=3).train(items).add(items).search(queries, 10, branches=8)
    np.testing.assert_array_equal(a[1], b[1])
    assert _recall(a[1], _exact(queries, items, 10)[1]) >= 0.6


def test_torch_input_and_float64(data):
    items, queries = data
    index = ClusterIndex(16, seed=0).train(torch.from_numpy(items).double()).add(torch.from_numpy(items))
    ids = index.search(torch.from_numpy(queries), 10, branches=index.n_leaves)[1]
    np.testing.assert_array_equal(ids, _exact(queries, items, 10)[1])


def test_save_load_round_trip(index, data, tmp_path):
    _, queries = data
    path = index.save(tmp_path / "index.tpx")
    loaded = ClusterIndex.load(path)
    assert loaded.ntotal == index.ntotal and loaded.n_leaves == index.n_leaves and loaded.is_trained
    for branches in (3, 11):
        expected, got = index.search(queries, 10, branches=branches), loaded.search(queries, 10, branches=branches)
        np.testing.assert_array_equal(expected[0], got[0])
        np.testing.assert_array_equal(expected[1], got[1])
    # saving the loaded index writes the same bytes
    assert loaded.save(tmp_path / "again.tpx").read_bytes() == path.read_bytes()
    # a loaded index keeps growing with the next ids
    loaded.add(queries[:2])
    assert loaded.search(queries[:2] * 1.0, 1, branches=loaded.n_leaves)[1].shape == (2, 1)
    assert loaded.ntotal == index.ntotal + 2


def test_corrupted_and_truncated_files_refused(index, tmp_path):
    path = index.save(tmp_path / "index.tpx")
    raw = path.read_bytes()
    (tmp_path / "short.tpx").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        ClusterIndex.load(tmp_path / "short.tpx")
    for position in (-100, 70):  # one byte of the payload, one of the JSON metadata
        flipped = bytearray(raw)
        flipped[position] ^= 0xFF
        (tmp_path / "flip.tpx").write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="SHA-256"):
            ClusterIndex.load(tmp_path / "flip.tpx")
    (tmp_path / "other.tpx").write_bytes(b"PK\x03\x04" + raw[4:])
    with pytest.raises(ValueError, match="bad magic"):
        ClusterIndex.load(tmp_path / "other.tpx")
    (tmp_path / "tiny.tpx").write_bytes(raw[:5])
    with pytest.raises(ValueError, match="too short"):
        ClusterIndex.load(tmp_path / "tiny.tpx")
    (tmp_path / "long.tpx").write_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match="truncated or padded"):
        ClusterIndex.load(tmp_path / "long.tpx")
    newer = bytearray(raw)
    newer[8] = 99
    (tmp_path / "newer.tpx").write_bytes(bytes(newer))
    with pytest.raises(ValueError, match="unsupported index format version 99"):
        ClusterIndex.load(tmp_path / "newer.tpx")


def test_errors(index, data):
    items, queries = data
    fresh = ClusterIndex(16)
    assert not fresh.is_trained and fresh.ntotal == 0
    with pytest.raises(ValueError, match="must be trained before search"):
        fresh.search(queries, 1)
    with pytest.raises(ValueError, match="must be trained before add"):
        fresh.add(items)
    with pytest.raises(ValueError, match="d = 16 columns"):
        index.search(queries[:, :8], 1)
    with pytest.raises(ValueError, match="d = 16 columns"):
        index.add(items[:, :3])
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match="branches must be >= 1"):
        index.search(queries, 1, branches=0)
    bad = queries.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        index.search(bad, 1)
    with pytest.raises(ValueError, match="finite"):
        ClusterIndex(16).train(np.where(np.isfinite(bad), bad, np.inf))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ClusterIndex(16, reduction="l2").train(items)
    with pytest.raises(ValueError, match="n_clusters must be <= the number of training vectors"):
        ClusterIndex(16, n_clusters=50).train(items[:10])
    with pytest.raises(ValueError, match="at least one vector"):
        ClusterIndex(16).train(items[:0])
    with pytest.raises(TypeError, match="k must be an integer"):
        index.search(queries, 2.5)


@pytest.mark.parametrize("n", [1, 100, 5000])
def test_defaults_across_sizes(n):
    items = _gaussian(n, d=8, seed=2)
    index = ClusterIndex(8).train(items).add(items)
    assert 1 <= index.n_leaves <= max(1, n // 8) and 1 <= index.default_branches() <= index.n_leaves
    ids = index.search(items[:3], 1, branches=index.n_leaves)[1]
    np.testing.assert_array_equal(ids[:, 0], _exact(items[:3], items, 1)[1][:, 0])


def test_band_helpers():
    assert default_bands(100) == 1 and default_bands(390_000) == 4
    bounds = band_bounds(4000, 4)
    assert bounds[0] == 0 and bounds[-1] == 4000
    sizes = np.diff(bounds)
    assert np.all(sizes[:-1] > sizes[1:])  # low-norm bands are the largest, the top band the smallest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_matches_cpu(index, data, tmp_path):
    items, queries = data
    gpu = ClusterIndex(16, seed=0).train(torch.from_numpy(items).cuda()).add(items)
    assert gpu.device.type == "cuda"
    np.testing.assert_array_equal(gpu.search(queries, 10, branches=gpu.n_leaves)[1], _exact(queries, items, 10)[1])
    moved = ClusterIndex.load(index.save(tmp_path / "i.tpx"), device="cuda")
    np.testing.assert_array_equal(moved.search(queries, 10, branches=6)[1], index.search(queries, 10, branches=6)[1])


@pytest.mark.parametrize("levels", [1, 2])
def test_threaded_scan_matches_single_thread(data, levels):
    items, queries = data
    index = ClusterIndex(16, levels=levels, seed=0).train(items).add(items)
    single = index.search(queries, 10, branches=16)
    torch.set_num_threads(2)  # the autouse fixture restores the count
    threaded = index.search(queries, 10, branches=16)
    assert torch.get_num_threads() == 2  # the scan restores the caller's thread count
    np.testing.assert_array_equal(single[1], threaded[1])
    np.testing.assert_allclose(single[0], threaded[0], rtol=1e-6)  # BLAS blocking may differ per thread count
