"""The baselines the paper compares clustering against, behind the same interface as :class:`ClusterIndex`.

- :class:`ExactIndex`: brute force, one BLAS product per chunk of queries then ``topk``; also the ground truth.
- :class:`L2ALSHIndex`: Shrivastava & Li (NIPS 2014), ``h(x) = ⌊(a·P(x) + b) / r⌋`` on the L2-ALSH transform.
- :class:`SignALSHIndex`: Shrivastava & Li (UAI 2015), ``h(x) = sign(a·P(x))`` on the Sign-ALSH transform.
- :class:`SimpleLSHIndex`: Neyshabur & Srebro (ICML 2015), ``h(x) = sign(a·P(x))`` on the exact one-column form.
- :class:`PCATreeIndex`: Bachrach et al. (RecSys 2014), the Euclidean transform then a tree splitting on the
  principal directions at the median.

Every index: the constructor only stores its arguments; ``train(x)`` fits the data-dependent parts (largest
norm, projections, thresholds) and returns ``self``; ``add(x)`` stores items with ids ``0, 1, …`` in order of
addition; ``search(queries, k, <how much to search>, return_stats=False)`` returns numpy ``(scores, ids)`` of
shape ``(n, k)``, best first, padded with ``-inf`` / ``-1``, plus a :class:`SearchStats` when asked. Candidates
are always re-ranked by the exact inner product with the original vectors.

Cost accounting (``SearchStats.dot_products``, mean per query): every hash function evaluated on the query is
one dot product (``K`` per table probed), every tree level is one projection, and every distinct candidate
re-ranked is one dot product. Items and queries live on the CPU.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch

from triptych._validation import as_float_matrix, check_int, check_real
from triptych.mips import SearchStats
from triptych.mips.reductions import (
    l2_alsh_items,
    l2_alsh_queries,
    sign_alsh_items,
    sign_alsh_queries,
    simple_lsh_items,
    simple_lsh_queries,
)

log = logging.getLogger(__name__)

__all__ = [
    "ExactIndex",
    "L2ALSHIndex",
    "PCATreeIndex",
    "SignALSHIndex",
    "SimpleLSHIndex",
    "exact_top_k",
]

# Largest (query × item) score block or (query, candidate) pair batch held at once: bounds memory to ~256 MB.
_BLOCK_ELEMENTS = 1 << 26
_PAIR_BUDGET = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# Shared kernels


def _empty_result(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, k)`` scores filled with ``-inf`` and ids filled with ``-1``."""
    return torch.full((n, k), -math.inf), torch.full((n, k), -1, dtype=torch.int64)


def exact_top_k(items: Any, queries: Any, k: int, *, block_elements: int = _BLOCK_ELEMENTS
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exact MIPS: the ``k`` largest ``q·x_i`` for every query, by chunked matrix product and ``topk``.

    Args:
        items: ``(N, d)`` array or tensor.
        queries: ``(n, d)``.
        k: answers per query; beyond ``N`` the rows are padded with ``-inf`` / ``-1``.
        block_elements: largest ``(queries × N)`` score block computed at once.

    Returns:
        ``scores`` float32 ``(n, k)`` and ``ids`` int64 ``(n, k)``, best first.
    """
    items = as_float_matrix("items", items)
    queries = as_float_matrix("queries", queries, dim=items.shape[1])
    k = check_int("k", k, low=1)
    scores, ids = _exact_top_k(items, queries, k, block_elements)
    return scores.numpy(), ids.numpy()


def _exact_top_k(items: torch.Tensor, queries: torch.Tensor, k: int, block_elements: int = _BLOCK_ELEMENTS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    n, n_items = queries.shape[0], items.shape[0]
    scores, ids = _empty_result(n, k)
    kk = min(k, n_items)
    if kk == 0:
        return scores, ids
    rows = max(1, block_elements // n_items)
    items_t = items.t()
    for start in range(0, n, rows):
        block = queries[start:start + rows] @ items_t  # (rows, N)
        top_scores, top_ids = block.topk(kk, dim=1)
        scores[start:start + rows, :kk] = top_scores
        ids[start:start + rows, :kk] = top_ids
    return scores, ids


def _expand_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand ranges ``[s, s + l)`` into their positions: ``(R,), (R,) → (which range (P,), position (P,))``."""
    which = torch.repeat_interleave(torch.arange(starts.numel()), lengths)
    first = torch.cumsum(lengths, 0) - lengths  # offset of each range inside the output
    positions = starts[which] + (torch.arange(which.numel()) - first[which])
    return which, positions


def _batches_by_size(sizes: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """Split rows into batches of similar ``sizes`` whose padded area ``rows × max size`` stays within ``budget``.

    Rows are taken in increasing size, so a batch wastes little on padding; a row over budget is alone.

    Returns:
        Index tensors (into ``sizes``) of each batch.
    """
    order = torch.argsort(sizes, stable=True)
    sorted_sizes = sizes[order].clamp(min=1)
    batches, start, n = [], 0, sizes.numel()
    while start < n:
        area = torch.arange(1, n - start + 1) * sorted_sizes[start:]  # padded area if the batch ended there
        end = start + max(1, int((area <= budget).sum()))
        batches.append(order[start:end])
        start = end
    return batches


def _rerank_ranges(items: torch.Tensor, queries: torch.Tensor, members: torch.Tensor, starts: torch.Tensor,
                   lengths: torch.Tensor, k: int, *, deduplicate: bool, pair_budget: int = _PAIR_BUDGET
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score each query against the items in its ranges of ``members`` exactly and keep the top ``k``.

    Each query ``i`` owns ``R`` ranges ``members[starts[i, r] : starts[i, r] + lengths[i, r]]`` (the buckets it
    hit). Queries of similar candidate counts are batched; a batch's candidates are laid out as a padded
    ``(B, C)`` id matrix, gathered once and scored with one batched product, so the search is a handful of
    vectorised operations per batch, never a Python loop per query.

    Args:
        items: ``(N, d)`` original vectors; ``queries``: ``(n, d)``.
        members: ``(T,)`` item ids, grouped into buckets.
        starts, lengths: ``(n, R)`` int64.
        deduplicate: drop repeated (query, item) pairs (buckets of several hash tables overlap).

    Returns:
        ``(n, k)`` scores and ids, and ``(n,)`` the number of distinct candidates scored per query.
    """
    n, (n_items, dim) = queries.shape[0], items.shape
    scores, ids = _empty_result(n, k)
    n_candidates = torch.zeros(n, dtype=torch.int64)
    n_ranges = starts.shape[1]
    for rows in _batches_by_size(lengths.sum(1), pair_budget):
        which, positions = _expand_ranges(starts[rows].flatten(), lengths[rows].flatten())
        query_of = torch.div(which, n_ranges, rounding_mode="floor")  # local row in the batch, non-decreasing
        item_of = members[positions]
        if deduplicate:
            keys = torch.unique(query_of * n_items + item_of)  # sorted: still grouped by query
            query_of = torch.div(keys, n_items, rounding_mode="floor")
            item_of = keys - query_of * n_items
        counts = torch.bincount(query_of, minlength=rows.numel())
        n_candidates[rows] = counts
        width = int(counts.max()) if counts.numel() else 0
        if width == 0:
            continue
        slot = torch.arange(query_of.numel()) - (torch.cumsum(counts, 0) - counts)[query_of]
        padded = torch.full((rows.numel(), width), -1, dtype=torch.int64)
        padded[query_of, slot] = item_of
        vectors = items.index_select(0, padded.clamp(min=0).flatten()).view(rows.numel(), width, dim)
        block = torch.bmm(vectors, queries[rows].unsqueeze(2)).squeeze(2).masked_fill_(padded < 0, -math.inf)
        top = block.topk(min(k, width), dim=1)
        scores[rows, :top.values.shape[1]] = top.values
        ids[rows, :top.values.shape[1]] = padded.gather(1, top.indices)
    return scores, ids, n_candidates


def _rerank_leaves(items_by_leaf: torch.Tensor, ids_by_leaf: torch.Tensor, leaf_starts: torch.Tensor,
                   leaf_sizes: torch.Tensor, queries: torch.Tensor, visited: torch.Tensor, k: int,
                   block_elements: int = _BLOCK_ELEMENTS // 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top ``k`` over the leaves each query visits, one matrix product per leaf.

    Args:
        items_by_leaf: ``(N, d)`` item vectors stored leaf after leaf (leaf ``j`` is the contiguous slice
            ``[leaf_starts[j], leaf_starts[j] + leaf_sizes[j])``); ``ids_by_leaf``: ``(N,)`` their ids.
        queries: ``(n, d)``. visited: ``(n, V)`` distinct leaves per query.

    Returns:
        ``(n, k)`` scores and ids, and ``(n,)`` the number of items scored per query.
    """
    n, n_visits = visited.shape
    scores, ids = _empty_result(n, k)
    rows = max(1, block_elements // (n_visits * k))
    for lo in range(0, n, rows):
        leaf_of = visited[lo:lo + rows].flatten()  # (B·V,) visit p belongs to query lo + p // V
        part_scores, part_ids = _empty_result(leaf_of.numel(), k)
        order = torch.argsort(leaf_of, stable=True)
        leaves, counts = torch.unique_consecutive(leaf_of[order], return_counts=True)
        ends = torch.cumsum(counts, 0).tolist()
        for leaf, end, count in zip(leaves.tolist(), ends, counts.tolist(), strict=True):
            size = int(leaf_sizes[leaf])
            if size == 0:
                continue
            visits = order[end - count:end]
            first = int(leaf_starts[leaf])
            block = queries[lo + torch.div(visits, n_visits, rounding_mode="floor")] @ \
                items_by_leaf[first:first + size].t()  # (visits, size)
            top = block.topk(min(k, size), dim=1)
            part_scores[visits, :top.values.shape[1]] = top.values
            part_ids[visits, :top.values.shape[1]] = ids_by_leaf[first + top.indices]
        merged = part_scores.view(-1, n_visits * k).topk(k, dim=1)
        scores[lo:lo + rows] = merged.values
        ids[lo:lo + rows] = part_ids.view(-1, n_visits * k).gather(1, merged.indices)
    return scores, ids, leaf_sizes[visited].sum(1)


def _not_trained(name: str, action: str) -> ValueError:
    return ValueError(f"the {name} must be trained before {action}; call train(x) first")


def _as_results(scores: torch.Tensor, ids: torch.Tensor, return_stats: bool, *, started: float,
                dot_products: float, candidates: float, leaves_probed: float):
    """``(scores, ids)`` as numpy, plus the :class:`SearchStats` of the call (means per query) when asked."""
    if not return_stats:
        return scores.numpy(), ids.numpy()
    stats = SearchStats(dot_products=dot_products, candidates=candidates, leaves_probed=leaves_probed,
                        n_queries=scores.shape[0], seconds=time.perf_counter() - started)
    return scores.numpy(), ids.numpy(), stats


# ----------------------------------------------------------------------------------------------------------------
# Exact search


class ExactIndex:
    """Brute-force MIPS by BLAS: ``scores = Q Xᵀ`` in blocks, then ``topk``. Costs ``N`` dot products a query.

    Args:
        dim: vector dimension ``d``.
        block_elements: largest ``(queries × N)`` score block held at once (memory bound).
    """

    def __init__(self, dim: int, *, block_elements: int = _BLOCK_ELEMENTS) -> None:
        self.dim = check_int("dim", dim, low=1)
        self.block_elements = check_int("block_elements", block_elements, low=1)
        self.items_ = torch.empty(0, self.dim)

    @property
    def ntotal(self) -> int:
        """Number of items stored."""
        return self.items_.shape[0]

    def train(self, x: Any) -> ExactIndex:
        """Nothing to learn (as faiss's flat index); checks ``x`` and returns ``self``."""
        as_float_matrix("x", x, dim=self.dim)
        return self

    def add(self, x: Any) -> ExactIndex:
        """Append items ``(N, d)``; their ids continue from :attr:`ntotal`."""
        self.items_ = torch.cat([self.items_, as_float_matrix("x", x, dim=self.dim).cpu()])
        return self

    def search(self, queries: Any, k: int, *, return_stats: bool = False):
        """The exact top ``k`` of each query ``(n, d)``: numpy ``(n, k)`` scores and ids (+ stats)."""
        started = time.perf_counter()
        queries = as_float_matrix("queries", queries, dim=self.dim).cpu()
        k = check_int("k", k, low=1)
        scores, ids = _exact_top_k(self.items_, queries, k, self.block_elements)
        return _as_results(scores, ids, return_stats, started=started, dot_products=float(self.ntotal),
                           candidates=float(self.ntotal), leaves_probed=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Locality-sensitive hashing


class _HashIndex:
    """``L`` tables of ``K`` concatenated hashes of the transformed items; search probes ``tables`` of them.

    A query's candidates are the items sharing its bucket in any of the tables probed; they are re-ranked by
    the exact inner product. Buckets are found by binary search in each table's sorted bucket keys, for all
    queries at once. Subclasses give the item/query transforms ``P``, ``Q`` and the hash function.
    """

    _name = "index"

    def __init__(self, dim: int, *, n_hashes: int, n_tables: int, seed: int) -> None:
        self.dim = check_int("dim", dim, low=1)
        self.n_hashes = check_int("n_hashes", n_hashes, low=1)
        self.n_tables = check_int("n_tables", n_tables, low=1)
        self.seed = check_int("seed", seed)
        self.max_norm_: float | None = None
        self.items_ = torch.empty(0, self.dim)

    # Subclass hooks ------------------------------------------------------------------------------------------
    def _item_transform(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _query_transform(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _codes(self, projections: torch.Tensor) -> torch.Tensor:
        """Hash values from projections ``a·z``: ``(n, L·K) → (n, L·K)`` int64."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Number of items stored."""
        return self.items_.shape[0]

    def _transformed_dim(self) -> int:
        return self._item_transform(torch.ones(1, self.dim)).shape[1]

    def train(self, x: Any) -> _HashIndex:
        """Draw the random projections (seeded) and take ``M = max ‖x_i‖`` from ``x`` ``(N, d)``."""
        x = as_float_matrix("x", x, dim=self.dim).cpu()
        generator = torch.Generator().manual_seed(self.seed)
        width = self.n_tables * self.n_hashes
        self.projections_ = torch.randn(self._transformed_dim(), width, generator=generator)  # a, (d', L·K)
        self.offsets_ = torch.rand(width, generator=generator)  # b/r ~ U[0, 1), used by L2 hashes only
        # Random odd 63-bit multipliers combine a table's K hash values into one bucket key (mod 2^64).
        rng = np.random.default_rng(self.seed)
        self.key_multipliers_ = rng.integers(1, 2**62, size=(self.n_tables, self.n_hashes), dtype=np.uint64) * 2 + 1
        self.max_norm_ = max(float(torch.linalg.vector_norm(x, dim=1).max()) if x.shape[0] else 0.0, 1e-30)
        self._build_tables()
        return self

    def add(self, x: Any) -> _HashIndex:
        """Append items ``(N, d)`` and rebuild the tables (a larger norm than ``M`` raises ``M`` first)."""
        if self.max_norm_ is None:
            raise _not_trained(self._name, "add")
        x = as_float_matrix("x", x, dim=self.dim).cpu()
        self.items_ = torch.cat([self.items_, x])
        largest = float(torch.linalg.vector_norm(x, dim=1).max()) if x.shape[0] else 0.0
        if largest > self.max_norm_:
            log.info("%s: an added item has norm %.4g > M = %.4g; rehashing with the new M", self._name,
                     largest, self.max_norm_)
            self.max_norm_ = largest
        self._build_tables()
        return self

    def _bucket_keys(self, z: torch.Tensor) -> torch.Tensor:
        """Bucket keys of transformed vectors: ``(n, d') → (n, L)`` int64, one per table."""
        codes = torch.empty(z.shape[0], self.n_tables * self.n_hashes, dtype=torch.int64)
        rows = max(1, _BLOCK_ELEMENTS // codes.shape[1])
        for start in range(0, z.shape[0], rows):
            codes[start:start + rows] = self._codes(z[start:start + rows] @ self.projections_)
        codes_u = codes.numpy().astype(np.uint64).reshape(-1, self.n_tables, self.n_hashes)
        keys = (codes_u * self.key_multipliers_[None]).sum(axis=2, dtype=np.uint64)  # wraps mod 2^64
        return torch.from_numpy(keys.view(np.int64))

    def _build_tables(self) -> None:
        keys = self._bucket_keys(self._item_transform(self.items_))  # (N, L)
        self.sorted_keys_, order = torch.sort(keys.t().contiguous(), dim=1, stable=True)  # (L, N)
        self.members_ = order.flatten()  # table t's items sorted by key at [t·N, (t+1)·N)

    def search(self, queries: Any, k: int, tables: int | None = None, *, return_stats: bool = False):
        """Probe the first ``tables`` tables (default all ``L``) and re-rank the union of the buckets hit.

        Args:
            queries: ``(n, d)``.
            k: answers per query.
            tables: number of hash tables probed, ``1 ≤ tables ≤ L``; more finds more at more cost.

        Returns:
            numpy ``scores`` ``(n, k)`` float32 and ``ids`` ``(n, k)`` int64, plus :class:`SearchStats` when
            ``return_stats``.
        """
        started = time.perf_counter()
        if self.max_norm_ is None:
            raise _not_trained(self._name, "search")
        queries = as_float_matrix("queries", queries, dim=self.dim).cpu()
        k = check_int("k", k, low=1)
        tables = self.n_tables if tables is None else check_int("tables", tables, low=1, high=self.n_tables)
        n, n_items = queries.shape[0], self.ntotal
        query_keys = self._bucket_keys(self._query_transform(queries))[:, :tables].t().contiguous()  # (tables, n)
        starts = torch.empty(n, tables, dtype=torch.int64)
        lengths = torch.empty(n, tables, dtype=torch.int64)
        for t in range(tables):
            lo = torch.searchsorted(self.sorted_keys_[t], query_keys[t], right=False)
            hi = torch.searchsorted(self.sorted_keys_[t], query_keys[t], right=True)
            starts[:, t], lengths[:, t] = lo + t * n_items, hi - lo
        scores, ids, n_candidates = _rerank_ranges(self.items_, queries, self.members_, starts, lengths, k,
                                                   deduplicate=tables > 1)
        mean_candidates = float(n_candidates.double().mean()) if n else 0.0
        return _as_results(scores, ids, return_stats, started=started, candidates=mean_candidates,
                           dot_products=tables * self.n_hashes + mean_candidates, leaves_probed=float(tables))


class L2ALSHIndex(_HashIndex):
    """L2-ALSH (Shrivastava & Li 2014): ``h_{a,b}(z) = ⌊(a·z + b) / r⌋`` on ``P(x)`` / ``Q(q)``.

    ``P(x) = [Ux/M; ‖Ux/M‖^(2^1); …; ‖Ux/M‖^(2^m)]``, ``Q(q) = [q/‖q‖; ½; …; ½]``, ``a ~ N(0, I)``,
    ``b ~ U[0, r)``; a bucket concatenates ``K`` such hashes and there are ``L`` tables.

    Args:
        dim: ``d``. n_hashes: ``K``. n_tables: ``L``. m, U, r: the paper's recommended 3, 0.83, 2.5.
        seed: seeds the projections and offsets.
    """

    _name = "L2ALSHIndex"

    def __init__(self, dim: int, *, n_hashes: int = 8, n_tables: int = 32, m: int = 3,
                 U: float = 0.83, r: float = 2.5, seed: int = 0) -> None:  # noqa: N803 - the paper's symbol
        super().__init__(dim, n_hashes=n_hashes, n_tables=n_tables, seed=seed)
        self.m = check_int("m", m, low=1)
        self.U = check_real("U", U, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.r = check_real("r", r, low=0.0, low_inclusive=False)

    def _item_transform(self, x: torch.Tensor) -> torch.Tensor:
        return l2_alsh_items(x, m=self.m, U=self.U, max_norm=self.max_norm_)

    def _query_transform(self, q: torch.Tensor) -> torch.Tensor:
        return l2_alsh_queries(q, m=self.m)

    def _codes(self, projections: torch.Tensor) -> torch.Tensor:
        return torch.floor(projections / self.r + self.offsets_).to(torch.int64)


class SignALSHIndex(_HashIndex):
    """Sign-ALSH (Shrivastava & Li 2015): ``h_a(z) = sign(a·z)`` on ``P(x)`` / ``Q(q)``, ``a ~ N(0, I)``.

    ``P(x) = [Ux/M; ½ − ‖Ux/M‖^(2^1); …; ½ − ‖Ux/M‖^(2^m)]``, ``Q(q) = [q/‖q‖; 0; …; 0]``; the collision
    probability ``1 − θ/π`` grows with the cosine, which grows (nearly) with ``q·x``.

    Args:
        dim: ``d``. n_hashes: ``K`` bits a bucket. n_tables: ``L``. m, U: the paper's recommended 2, 0.75.
        seed: seeds the projections.
    """

    _name = "SignALSHIndex"

    def __init__(self, dim: int, *, n_hashes: int = 12, n_tables: int = 32, m: int = 2, U: float = 0.75,
                 seed: int = 0) -> None:  # noqa: N803 - the paper's symbol
        super().__init__(dim, n_hashes=n_hashes, n_tables=n_tables, seed=seed)
        self.m = check_int("m", m, low=1)
        self.U = check_real("U", U, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)

    def _item_transform(self, x: torch.Tensor) -> torch.Tensor:
        return sign_alsh_items(x, m=self.m, U=self.U, max_norm=self.max_norm_)

    def _query_transform(self, q: torch.Tensor) -> torch.Tensor:
        return sign_alsh_queries(q, m=self.m)

    def _codes(self, projections: torch.Tensor) -> torch.Tensor:
        return (projections > 0).to(torch.int64)


class SimpleLSHIndex(_HashIndex):
    """Simple-LSH (Neyshabur & Srebro 2015): sign random projections on ``P(x) = [x/M; sqrt(1 − ‖x/M‖²)]``.

    With ``Q(q) = [q/‖q‖; 0]`` the reduction is exact: ``cos(Q(q), P(x)) = q·x / (M‖q‖)``.

    Args:
        dim: ``d``. n_hashes: ``K`` bits a bucket. n_tables: ``L``. seed: seeds the projections.
    """

    _name = "SimpleLSHIndex"

    def __init__(self, dim: int, *, n_hashes: int = 12, n_tables: int = 32, seed: int = 0) -> None:
        super().__init__(dim, n_hashes=n_hashes, n_tables=n_tables, seed=seed)

    def _item_transform(self, x: torch.Tensor) -> torch.Tensor:
        return simple_lsh_items(x, max_norm=self.max_norm_)

    def _query_transform(self, q: torch.Tensor) -> torch.Tensor:
        return simple_lsh_queries(q)

    def _codes(self, projections: torch.Tensor) -> torch.Tensor:
        return (projections > 0).to(torch.int64)


# ----------------------------------------------------------------------------------------------------------------
# PCA-tree


def bachrach_items(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Bachrach et al.'s Euclidean transform of items: ``x̃ = [sqrt(Φ² − ‖x‖²); x]``, ``(N, d) → (N, d + 1)``.

    With ``q̃ = [0; q]``, ``‖q̃ − x̃‖² = Φ² + ‖q‖² − 2 q·x``: the nearest neighbour of ``q̃`` is the MIPS answer.
    """
    extra = (max_norm**2 - x.square().sum(1, keepdim=True)).clamp_(min=0.0).sqrt_()
    return torch.cat([extra, x], dim=1)


def bachrach_queries(q: torch.Tensor) -> torch.Tensor:
    """Bachrach et al.'s query transform ``q̃ = [0; q]``: ``(n, d) → (n, d + 1)``."""
    return torch.cat([q.new_zeros(q.shape[0], 1), q], dim=1)


def _group_medians(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Lower median of ``values`` within each group: ``(N,), (N,) → (n_groups,)``, 0 for an empty group."""
    by_value = torch.argsort(values, stable=True)
    order = by_value[torch.argsort(group[by_value], stable=True)]  # grouped, ascending values inside
    counts = torch.bincount(group, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    medians = torch.zeros(n_groups, dtype=values.dtype)
    present = counts > 0
    medians[present] = values[order[starts[present] + (counts[present] - 1) // 2]]
    return medians


class PCATreeIndex:
    """PCA-tree (Bachrach et al. 2014) on the Euclidean transform of MIPS.

    Level ``l`` of the tree splits every node on the ``l``-th principal direction ``v_l`` of the transformed
    items, at the median of its own training items' projections, so the ``2^D`` leaves are balanced. A query
    descends to its leaf; ``leaves > 1`` visits the leaves in order of the exact distance from ``q̃`` to each
    leaf cell in the projected space, ``Σ_l max(0, ±(v_l·(q̃ − μ) − t_node))²`` (the cells are products of
    intervals along orthogonal directions), a best-bin-first search that is exact when all leaves are visited.

    Args:
        dim: ``d``.
        depth: ``D``, at most ``d + 1``; ``None`` gives leaves of about ``√N`` training items.
        seed: unused by the algorithm (it is deterministic); kept for a uniform interface.
    """

    def __init__(self, dim: int, *, depth: int | None = None, seed: int = 0) -> None:
        self.dim = check_int("dim", dim, low=1)
        self.depth = None if depth is None else check_int("depth", depth, low=1, high=self.dim + 1)
        self.seed = check_int("seed", seed)
        self.max_norm_: float | None = None
        self.items_ = torch.empty(0, self.dim)

    @property
    def ntotal(self) -> int:
        """Number of items stored."""
        return self.items_.shape[0]

    @property
    def n_leaves(self) -> int:
        """``2^D``."""
        if self.max_norm_ is None:
            raise _not_trained("PCATreeIndex", "n_leaves")
        return 1 << self.depth_

    def train(self, x: Any) -> PCATreeIndex:
        """Fit ``Φ = max ‖x‖``, the mean ``μ``, the top-``D`` principal directions and the median thresholds."""
        x = as_float_matrix("x", x, dim=self.dim).cpu()
        if x.shape[0] < 2:
            raise ValueError(f"PCATreeIndex needs at least 2 training items, got {x.shape[0]}")
        default_depth = max(1, round(math.log2(x.shape[0]) / 2))
        self.depth_ = min(self.depth or default_depth, self.dim + 1)
        self.max_norm_ = max(float(torch.linalg.vector_norm(x, dim=1).max()), 1e-30)
        self._fit(x)
        return self

    def _fit(self, x: torch.Tensor) -> None:
        z = bachrach_items(x, self.max_norm_).double()
        self.mean_ = z.mean(0)
        centred = z - self.mean_
        _, eigenvectors = torch.linalg.eigh(centred.t() @ centred)  # ascending eigenvalues
        self.directions_ = eigenvectors[:, -self.depth_:].flip(1).float().contiguous()  # (d + 1, D), v_1 first
        self.mean_ = self.mean_.float()
        projections = (z.float() - self.mean_) @ self.directions_  # (N, D)
        node = torch.zeros(x.shape[0], dtype=torch.int64)
        self.thresholds_ = []  # level l: (2^l,) medians
        for level in range(self.depth_):
            thresholds = _group_medians(projections[:, level], node, 1 << level)
            self.thresholds_.append(thresholds)
            node = 2 * node + (projections[:, level] > thresholds[node]).long()
        self._route_all()

    def _leaf_of(self, x: torch.Tensor) -> torch.Tensor:
        """Leaf index of each item ``(N, d) → (N,)``."""
        projections = (bachrach_items(x, self.max_norm_) - self.mean_) @ self.directions_
        node = torch.zeros(x.shape[0], dtype=torch.int64)
        for level, thresholds in enumerate(self.thresholds_):
            node = 2 * node + (projections[:, level] > thresholds[node]).long()
        return node

    def _route_all(self) -> None:
        leaf = self._leaf_of(self.items_)
        self.members_ = torch.argsort(leaf, stable=True)  # item ids, leaf after leaf
        self.items_by_leaf_ = self.items_[self.members_]  # contiguous leaves: one product per visited leaf
        counts = torch.bincount(leaf, minlength=self.n_leaves)
        self.leaf_starts_ = torch.cumsum(counts, 0) - counts
        self.leaf_sizes_ = counts

    def add(self, x: Any) -> PCATreeIndex:
        """Append items ``(N, d)`` and route them to their leaves (a norm above ``Φ`` refits on all items)."""
        if self.max_norm_ is None:
            raise _not_trained("PCATreeIndex", "add")
        x = as_float_matrix("x", x, dim=self.dim).cpu()
        self.items_ = torch.cat([self.items_, x])
        largest = float(torch.linalg.vector_norm(x, dim=1).max()) if x.shape[0] else 0.0
        if largest > self.max_norm_:
            log.info("PCATreeIndex: an added item has norm %.4g > Φ = %.4g; refitting on all items", largest,
                     self.max_norm_)
            self.max_norm_ = largest
            self._fit(self.items_)
        else:
            self._route_all()
        return self

    def _leaf_bounds(self, projections: torch.Tensor) -> torch.Tensor:
        """Squared distance from each query to each leaf cell in the projected space: ``(n, D) → (n, 2^D)``."""
        leaves = torch.arange(self.n_leaves)
        bounds = projections.new_zeros(projections.shape[0], self.n_leaves)
        for level, thresholds in enumerate(self.thresholds_):
            node = leaves >> (self.depth_ - level)
            right = (leaves >> (self.depth_ - level - 1)) & 1  # the side of that node the leaf lies on
            sign = 1.0 - 2.0 * right.float()  # left cell needs p ≤ t, right cell p > t
            bounds += ((projections[:, level:level + 1] - thresholds[node]) * sign).clamp_(min=0.0).square_()
        return bounds

    def search(self, queries: Any, k: int, leaves: int = 1, *, return_stats: bool = False):
        """Visit the ``leaves`` nearest leaf cells of each query and re-rank their items exactly.

        Args:
            queries: ``(n, d)``. k: answers per query.
            leaves: leaves visited, ``1 ≤ leaves ≤ 2^D``; all leaves give the exact answer.

        Returns:
            numpy ``scores`` ``(n, k)`` and ``ids`` ``(n, k)``, plus :class:`SearchStats` when ``return_stats``.
        """
        started = time.perf_counter()
        if self.max_norm_ is None:
            raise _not_trained("PCATreeIndex", "search")
        queries = as_float_matrix("queries", queries, dim=self.dim).cpu()
        k = check_int("k", k, low=1)
        leaves = check_int("leaves", leaves, low=1, high=self.n_leaves)
        n = queries.shape[0]
        projections = (bachrach_queries(queries) - self.mean_) @ self.directions_  # (n, D)
        visited = torch.empty(n, leaves, dtype=torch.int64)
        rows = max(1, _BLOCK_ELEMENTS // self.n_leaves)
        for start in range(0, n, rows):
            bounds = self._leaf_bounds(projections[start:start + rows])
            visited[start:start + rows] = bounds.topk(leaves, dim=1, largest=False, sorted=False).indices
        scores, ids, n_candidates = _rerank_leaves(self.items_by_leaf_, self.members_, self.leaf_starts_,
                                                   self.leaf_sizes_, queries, visited, k)
        mean_candidates = float(n_candidates.double().mean()) if n else 0.0
        # Ranking the leaves costs D·2^D scalar operations, counted as that many d-dimensional dot products' worth.
        ranking = self.depth_ * self.n_leaves / (self.dim + 1) if leaves > 1 else 0.0
        return _as_results(scores, ids, return_stats, started=started, candidates=mean_candidates,
                           dot_products=self.depth_ + ranking + mean_candidates, leaves_probed=float(leaves))
