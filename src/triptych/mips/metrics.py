"""Quality and cost of an approximate MIPS answer: precision, recall, speedups and Pareto fronts.

Convention: ``found_ids`` is what an index returned, ``(n, k_found)``, best first, ``-1`` for padding;
``true_ids`` is the exact answer, ``(n, k_true)``, best first. Both may be numpy arrays or torch tensors.
Ties in the exact answer are not resolved here: ground truth comes from real-valued data where they do not
occur (see :func:`triptych.mips.baselines.exact_top_k`).

The paper's metric (Auvolat et al. 2015, §5) is precision@k, the fraction of the true top-k found among the
k returned items; its cost axis is the speedup ``N / (dot products computed)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from triptych._validation import check_int, check_real

__all__ = [
    "is_dominated",
    "dot_product_speedup",
    "hits_per_query",
    "interpolate_at",
    "pareto_front",
    "precision_at_k",
    "recall_at_k",
    "wall_clock_speedup",
]


def _ids(name: str, ids: Any) -> np.ndarray:
    """``ids`` as an int64 matrix ``(n, k)``; a 1-d input is one id per query."""
    array = ids.detach().cpu().numpy() if hasattr(ids, "detach") else np.asarray(ids)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer matrix of shape (n, k), got shape {array.shape} "
                         f"and dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def hits_per_query(found_ids: Any, true_ids: Any, k_true: int, k_found: int | None = None) -> np.ndarray:
    """How many of the true top-``k_true`` are among the first ``k_found`` returned ids, per query.

    Args:
        found_ids: returned ids ``(n, ≥ k_found)``; ``-1`` (padding) never counts.
        true_ids: exact ids ``(n, ≥ k_true)``, best first.
        k_true: depth of the exact answer that counts.
        k_found: depth of the returned answer that is looked at (default ``k_true``).

    Returns:
        ``(n,)`` int64 counts in ``[0, k_true]``.
    """
    found = _ids("found_ids", found_ids)
    true = _ids("true_ids", true_ids)
    k_true = check_int("k_true", k_true, low=1, high=true.shape[1])
    k_found = k_true if k_found is None else check_int("k_found", k_found, low=1, high=found.shape[1])
    if found.shape[0] != true.shape[0]:
        raise ValueError(f"found_ids and true_ids must have one row per query each, got {found.shape[0]} "
                         f"and {true.shape[0]} rows")
    found, true = found[:, :k_found], true[:, :k_true]
    # (n, k_found, 1) == (n, 1, k_true): a found id counts once even if it matched twice (duplicates).
    matches = (found[:, :, None] == true[:, None, :]) & (found[:, :, None] >= 0)
    return matches.any(axis=1).sum(axis=1)


def precision_at_k(found_ids: Any, true_ids: Any, k: int) -> float:
    """Mean over queries of ``|found[:k] ∩ true[:k]| / k``, the paper's precision@k."""
    return float(hits_per_query(found_ids, true_ids, k).mean() / k)


def recall_at_k(found_ids: Any, true_ids: Any, k: int, n_found: int | None = None) -> float:
    """Mean fraction of the true top-``k`` found among the first ``n_found`` returned ids (default ``k``).

    ``recall_at_k(found, true, 10)`` is the ann-benchmarks "recall@10"; ``n_found > k`` gives faiss's
    "k-recall@n_found".
    """
    return float(hits_per_query(found_ids, true_ids, k, n_found).mean() / k)


def dot_product_speedup(n_items: int, dot_products: float) -> float:
    """The paper's speedup: brute-force cost ``N`` over the mean dot products computed per query."""
    n_items = check_int("n_items", n_items, low=1)
    dot_products = check_real("dot_products", dot_products, low=0.0, low_inclusive=False)
    return n_items / dot_products


def wall_clock_speedup(exact_seconds: float, seconds: float) -> float:
    """Time of exact search over time of the approximate search, for the same queries."""
    exact_seconds = check_real("exact_seconds", exact_seconds, low=0.0, low_inclusive=False)
    seconds = check_real("seconds", seconds, low=0.0, low_inclusive=False)
    return exact_seconds / seconds


def _pair(name_x: str, x: Any, name_y: str, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{name_x} and {name_y} must have the same length, got {x.size} and {y.size}")
    return x, y


def pareto_front(cost_gain: Any, quality: Any) -> np.ndarray:
    """Indices of the points not dominated in (``cost_gain`` ↑, ``quality`` ↑), by decreasing ``cost_gain``.

    ``cost_gain`` is what larger-is-better on the cost axis means here: a speedup or queries per second.
    A point is dominated when another is at least as good on both axes and better on one. Along the
    returned front ``cost_gain`` decreases strictly and ``quality`` increases strictly.
    """
    gain, qual = _pair("cost_gain", cost_gain, "quality", quality)
    order = np.lexsort((-qual, -gain))  # by gain descending, ties by quality descending
    front, best = [], -np.inf
    for i in order:
        if qual[i] > best:
            front.append(int(i))
            best = qual[i]
    return np.asarray(front, dtype=np.int64)


def interpolate_at(cost_gain: Any, quality: Any, target: float) -> float | None:
    """``cost_gain`` at ``quality = target`` on the Pareto front, linear between the two front points around it.

    Returns:
        The front's largest gain reaching exactly ``target`` if a point does, else the linear interpolation
        between the neighbouring front points, or ``None`` when no point reaches ``target``.
    """
    target = check_real("target", target)
    gain, qual = _pair("cost_gain", cost_gain, "quality", quality)
    if gain.size == 0:
        return None
    front = pareto_front(gain, qual)
    g, q = gain[front], qual[front]  # q increasing, g decreasing
    above = np.nonzero(q >= target)[0]
    if above.size == 0:
        return None
    j = int(above[0])
    if q[j] == target or j == 0:
        return float(g[j])
    t = (target - q[j - 1]) / (q[j] - q[j - 1])
    return float(g[j - 1] + t * (g[j] - g[j - 1]))


def is_dominated(front_gain: Any, front_quality: Any, gain: Any, quality: Any,
                       tolerance: float = 0.0) -> np.ndarray:
    """For each point ``(gain_i, quality_i)``: is it weakly dominated by some reference point?

    A point is dominated when a reference point has ``gain ≥ gain_i`` and ``quality ≥ quality_i − tolerance``.

    Returns:
        ``(n_points,)`` bool.
    """
    ref_gain, ref_quality = _pair("front_gain", front_gain, "front_quality", front_quality)
    gain, quality = _pair("gain", gain, "quality", quality)
    tolerance = check_real("tolerance", tolerance, low=0.0)
    if ref_gain.size == 0:
        return np.zeros(gain.shape, dtype=bool)
    return ((ref_gain[None, :] >= gain[:, None]) & (ref_quality[None, :] >= quality[:, None] - tolerance)).any(1)
