"""``ClusterIndex``: approximate maximum inner product search by spherical k-means (Auvolat et al. 2015).

Build (``train`` then ``add``):

1. Norm bands. The training items are split into ``B`` bands by their norm ``‖x‖`` (each band, from the top,
   three times the size of the band above it; :func:`band_bounds`); band ``b``
   has its own normaliser ``M_b`` (its largest training norm). This is the Norm-Ranging idea (Yan et al. 2018):
   with one global ``M`` the appended coordinate of the reduction dominates for the many items whose norm is far
   below ``M`` (GloVe: median 4.4, max 14.1), and the clustering mostly sorts items by norm.
2. MIPS → MCSS per band: items ``P_b(x)`` (:mod:`triptych.mips.reductions`, ``M = M_b``); the query transform
   ``Q(q)`` does not depend on ``M``, so every band shares one query vector.
3. Spherical k-means on ``P_b(x)`` inside each band, ``C_b ∝ N_b · 2^b`` leaves (smaller leaves for larger
   norms, :data:`LEAF_DENSITY`); optional upper levels cluster the
   leaf centroids (level ``l + 1`` clusters the centroids of level ``l``).

Search: every node ``c`` (leaf or upper-level cluster) keeps, in the original space, a unit direction
``u_c``, the angular radius ``r_c = max_{x∈c} ∠(x, u_c)`` and the largest norm ``n_c = max_{x∈c} ‖x‖`` of its
members. For a query at angle ``θ_c`` from ``u_c`` every member satisfies

    q·x ≤ ‖q‖ · n_c · cos(max(0, θ_c − r_c)),

and nodes are ranked by ``s_c(q) = n_c · cos(max(0, θ_c − α·r_c))`` with a slack ``α ∈ [0, 1]`` (``α = 1``: the
bound itself; smaller ``α`` trusts the centroid direction more; 0.25 is best on GloVe). The ``branches`` best
nodes are kept at every level; the members of the chosen leaves (stored contiguously, sorted by leaf) are scored
by the exact inner product ``q·x`` with the original vectors, one matrix product per probed leaf for all the
queries that probe it, and the per-leaf top-k lists are merged.

Items added after training with a norm above ``M_b`` of their band are shrunk onto the band's sphere before the
reduction (``x·M_b/‖x‖``, so that their direction decides the leaf); ``n_c`` and ``r_c`` are maintained on every
``add``, so such a leaf ranks higher for every query and the large-norm items are still found.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triptych import _io
from triptych._validation import as_float_matrix, check_choice, check_int, check_real
from triptych.mips import reductions
from triptych.mips.kmeans import Level, SphericalKMeans, assign, build_hierarchy, level_sizes, suggested_clusters

__all__ = ["ClusterIndex", "SearchStats", "band_bounds", "default_bands"]

logger = logging.getLogger(__name__)

MAGIC = b"TPXMIPS\x00"
FORMAT_VERSION = 1
REDUCTIONS = ("sign_alsh", "simple_lsh")
# Each norm band (from the top) holds this many times the items of the band above it.
BAND_GROWTH = 3.0
# Leaves per item double from one band to the next one up: the high-norm leaves are probed by most queries, so
# making them small saves the most candidates (GloVe: recall@10 = 0.9 at about 40% fewer candidates than with
# leaves of equal size).
LEAF_DENSITY = 2.0
# magic, format version, length of the JSON metadata, length of the payload, SHA-256 of metadata + payload
_HEADER = struct.Struct("<8sIQQ32s")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SearchStats:
    """Cost of one :meth:`ClusterIndex.search` call, averaged over its queries.

    Attributes:
        dot_products: inner products per query: node scoring at every level plus exact scoring of candidates
            (the paper's cost axis; brute force costs ``ntotal``).
        candidates: items scored exactly per query.
        leaves_probed: leaf clusters visited per query.
        n_queries: queries in the call.
        seconds: wall-clock time of the call.
    """

    dot_products: float
    candidates: float
    leaves_probed: float
    n_queries: int
    seconds: float


def default_bands(n_items: int) -> int:
    """Norm bands for ``N`` training items: ``floor(log10 N) − 1``, clipped to ``[1, 4]`` (4 from 100,000 items)."""
    return max(1, min(4, int(math.log10(max(1, n_items))) - 1))


def band_bounds(n_items: int, n_bands: int, growth: float = BAND_GROWTH) -> list[int]:
    """Boundaries, in the ascending norm order, of ``B`` bands whose counts grow by ``growth`` towards low norms.

    The top band (largest norms) is the smallest: on norm-skewed data the answers come mostly from the largest
    norms, and a small top band gets a small ``M_b`` spread and its own fine clustering.
    Returns ``[0, …, N]`` (``B + 1`` entries).
    """
    weights = np.array([growth ** (n_bands - 1 - band) for band in range(n_bands)])
    edges = np.round(np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum() * n_items).astype(int)
    return [int(e) for e in np.maximum.accumulate(edges)]


class ClusterIndex:
    """Clustering index for maximum inner product search (faiss-like ``train``/``add``/``search`` contract).

    Args:
        dim: vector dimension ``d``.
        levels: levels ``L`` of the hierarchy (1: leaves only; leaves then hold about ``N^(1/(L+1))`` items).
        n_clusters: leaf count ``C``; default ``≈ 4·sqrt(N)`` (see :func:`kmeans.suggested_clusters`), or the
            hierarchy's ``N^(L/(L+1))`` when ``levels > 1``.
        reduction: ``"sign_alsh"`` (the paper's, with ``m`` and ``U``) or ``"simple_lsh"`` (exact, one column).
        m: appended coordinates of Sign-ALSH.
        U: scale of the largest item of a band in Sign-ALSH, ``0 < U < 1``.
        n_bands: norm bands ``B``; default :func:`default_bands` of the training set size.
        slack: ``α`` of the node ranking ``n_c·cos(max(0, θ_c − α r_c))``; 1 ranks by the exact upper bound.
        seed: seed of k-means initialisation and sampling.
        max_iter: Lloyd iterations at most (default :func:`kmeans.default_n_iter`).
        progress: optional callback ``progress(stage, done, total)`` for long builds.

    The constructor only stores its arguments; they are checked by :meth:`train`.
    """

    def __init__(self, dim: int, *, levels: int = 1, n_clusters: int | None = None, reduction: str = "sign_alsh",
                 m: int = 3, U: float = 0.85, n_bands: int | None = None, slack: float = 0.25,  # noqa: N803
                 seed: int = 0, max_iter: int | None = None, progress: Progress | None = None) -> None:
        self.dim = dim
        self.levels = levels
        self.n_clusters = n_clusters
        self.reduction = reduction
        self.m = m
        self.U = U
        self.n_bands = n_bands
        self.slack = slack
        self.seed = seed
        self.max_iter = max_iter
        self.progress = progress
        self.is_trained = False
        self._device = torch.device("cpu")

    # ------------------------------------------------------------------ parameters and reductions
    def _check_params(self) -> None:
        check_int("dim", self.dim, low=1)
        check_int("levels", self.levels, low=1, high=8)
        if self.n_clusters is not None:
            check_int("n_clusters", self.n_clusters, low=1)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_int("m", self.m, low=1)
        check_real("U", self.U, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        if self.n_bands is not None:
            check_int("n_bands", self.n_bands, low=1)
        check_real("slack", self.slack, low=0.0, high=1.0)
        check_int("seed", self.seed)
        if self.max_iter is not None:
            check_int("max_iter", self.max_iter, low=1)

    def _reduce_items(self, x: torch.Tensor, max_norm: float) -> torch.Tensor:
        """``P(x)`` with ``M = max_norm``: ``(N, d) → (N, D)``."""
        if self.reduction == "sign_alsh":
            return reductions.sign_alsh_items(x, m=self.m, U=self.U, max_norm=max_norm)
        return reductions.simple_lsh_items(x, max_norm=max_norm)

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        """Number of items added."""
        return int(self._ids.numel()) if self.is_trained else 0

    @property
    def n_leaves(self) -> int:
        """Number of leaf clusters (0 before training)."""
        return int(self._centroids.shape[0]) if self.is_trained else 0

    @property
    def device(self) -> torch.device:
        """Device of the index tensors (that of the training data)."""
        return self._device

    def default_branches(self) -> int:
        """Branches kept per level when ``search(branches=None)``: 4% of the leaves, at least 8 (at most all).

        On GloVe-390k (2,500 leaves, 4 bands) probing 4% of the leaves gives recall@10 ≈ 0.9.
        """
        self._require_trained("default_branches")
        return min(self.n_leaves, max(8, math.ceil(0.04 * self.n_leaves)))

    def _require_trained(self, action: str) -> None:
        if not self.is_trained:
            raise ValueError(f"the index must be trained before {action}; call train(x) first")

    # ------------------------------------------------------------------ train
    def train(self, x: Any) -> ClusterIndex:
        """Learn the norm bands, the leaf centroids and the upper levels from ``x`` ``(N, d)``; returns ``self``.

        Training does not add ``x``; call :meth:`add`. Retraining discards every added item.
        """
        self._check_params()
        x = as_float_matrix("x", x, dim=self.dim)
        n = x.shape[0]
        if n == 0:
            raise ValueError("train needs at least one vector, got shape (0, d)")
        n_bands = min(self.n_bands or default_bands(n), n)
        n_leaves = self.n_clusters or (suggested_clusters(n) if self.levels == 1
                                       else level_sizes(n, self.levels)[0])
        if n_leaves > n:
            raise ValueError(f"n_clusters must be <= the number of training vectors ({n}), got {n_leaves}")
        n_leaves = max(n_leaves, n_bands)
        self._device = x.device
        norms = torch.linalg.vector_norm(x, dim=1)
        order = torch.argsort(norms, stable=True)
        bounds = sorted(set(band_bounds(n, n_bands)))  # a band too small to hold an item is dropped
        n_bands = len(bounds) - 1
        # a band's upper edge is the first norm of the next band: items are banded by ``norm < edge``
        self._band_edges = norms[order[torch.tensor(bounds[1:-1], dtype=torch.int64, device=x.device)]].clone() \
            if n_bands > 1 else norms.new_zeros(0)
        band_max = []
        centroids, leaf_band = [], []
        train_labels = torch.empty(n, dtype=torch.int64, device=x.device)
        counts = np.diff(bounds)
        per_band = _apportion(n_leaves, counts, LEAF_DENSITY ** np.arange(n_bands))
        for band in range(n_bands):
            if self.progress is not None:
                self.progress("k-means", band, n_bands)
            members = x[order[bounds[band]:bounds[band + 1]]]
            top = float(torch.linalg.vector_norm(members, dim=1).max())
            band_max.append(top if top > 0 else 1.0)
            reduced = self._reduce_items(members, band_max[-1])
            fit = SphericalKMeans(int(per_band[band]), max_iter=self.max_iter,
                                  seed=self.seed + band).fit(reduced)
            train_labels[order[bounds[band]:bounds[band + 1]]] = fit.labels_ + sum(c.shape[0] for c in centroids)
            centroids.append(fit.cluster_centers_)
            leaf_band.append(torch.full((fit.cluster_centers_.shape[0],), band, dtype=torch.int64))
        self._band_max = torch.tensor(band_max, dtype=torch.float32, device=x.device)
        self._centroids = torch.cat(centroids)
        self._leaf_band = torch.cat(leaf_band).to(x.device)
        self._leaf_dir = _leaf_directions(x, train_labels, self._centroids[:, :self.dim])
        sizes = level_sizes(n, self.levels, n / self._centroids.shape[0])[1:] if self.levels > 1 else []
        self._levels: list[Level] = build_hierarchy(self._centroids, sizes, seed=self.seed,
                                                    progress=self.progress)
        self._reset_storage()
        self.is_trained = True
        logger.info("trained: %d items, %d bands, %d leaves, %d levels", n, n_bands, self.n_leaves, self.levels)
        return self

    def _reset_storage(self) -> None:
        """Empty leaf lists: ``n_c = 0`` and ``r_c = 0`` until members arrive."""
        dev = self._device
        self._items = torch.zeros(0, self.dim, device=dev)
        self._ids = torch.zeros(0, dtype=torch.int64, device=dev)
        self._labels = torch.zeros(0, dtype=torch.int64, device=dev)
        self._offsets = torch.zeros(self._centroids.shape[0] + 1, dtype=torch.int64, device=dev)
        self._leaf_norm = torch.zeros(self._centroids.shape[0], device=dev)
        self._leaf_radius = torch.zeros(self._centroids.shape[0], device=dev)
        self._refresh_nodes()

    # ------------------------------------------------------------------ add
    def add(self, x: Any) -> ClusterIndex:
        """Add items ``x`` ``(N, d)`` to their nearest leaves; ids continue from :attr:`ntotal`. Returns ``self``."""
        self._require_trained("add")
        x = as_float_matrix("x", x, dim=self.dim).to(self._device)
        if x.shape[0] == 0:
            return self
        labels = self._assign(x)
        norms = torch.linalg.vector_norm(x, dim=1)
        cosines = torch.einsum("nd,nd->n", x, self._leaf_dir[labels]) / norms.clamp(min=1e-30)
        # a zero vector has no direction; its angle is 0 (its score q·x = 0 is within any bound with n_c ≥ 0)
        angles = torch.where(norms > 0, torch.arccos(cosines.clamp(-1.0, 1.0)), torch.zeros_like(norms))
        self._leaf_norm = self._leaf_norm.scatter_reduce(0, labels, norms, reduce="amax")
        self._leaf_radius = self._leaf_radius.scatter_reduce(0, labels, angles, reduce="amax")
        new_ids = torch.arange(self.ntotal, self.ntotal + x.shape[0], device=self._device)
        items = torch.cat([self._items, x])
        ids = torch.cat([self._ids, new_ids])
        labels = torch.cat([self._labels, labels])
        # leaf-major, id-minor: each leaf's members are contiguous and in order of addition
        order = torch.argsort(labels * (ids.numel() + 1) + ids)
        self._items, self._ids, self._labels = items[order].contiguous(), ids[order], labels[order]
        counts = torch.bincount(self._labels, minlength=self.n_leaves)
        self._offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self._refresh_nodes()
        return self

    def _assign(self, x: torch.Tensor) -> torch.Tensor:
        """Leaf of every item ``(N, d) → (N,)`` int64: the nearest centroid, in ``P_b``, of its norm band."""
        norms = torch.linalg.vector_norm(x, dim=1)
        band = torch.bucketize(norms, self._band_edges, right=True)
        labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        for b in torch.unique(band).tolist():
            rows = torch.nonzero(band == b).flatten()
            band_max = float(self._band_max[b])
            xb, nb = x[rows], norms[rows]
            # shrink items above the band's M onto its sphere: the reduction needs ‖x‖ ≤ M
            shrink = (band_max / nb.clamp(min=band_max)).unsqueeze(1)
            reduced = self._reduce_items(xb * shrink, band_max)
            leaves = torch.nonzero(self._leaf_band == b).flatten()
            labels[rows] = leaves[assign(reduced, self._centroids[leaves])[0]]
        return labels

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int, branches: int | None = None, *, return_stats: bool = False,
               batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, SearchStats]:
        """The ``k`` items of largest ``q·x`` for every query, best first.

        Args:
            queries: ``(n, d)`` numpy array or tensor (moved to the index's device).
            k: answers per query; rows are padded with ``-inf`` scores and ``-1`` ids past the items found.
            branches: nodes kept at each level (leaves probed when ``levels == 1``); default
                :meth:`default_branches`; ``branches >= n_leaves`` gives the exact answer.
            return_stats: also return a :class:`SearchStats`.
            batch_size: queries processed together.

        Returns:
            ``scores`` ``(n, k)`` float32 and ``ids`` ``(n, k)`` int64 numpy arrays (and the stats).
        """
        self._require_trained("search")
        started = time.perf_counter()
        k = check_int("k", k, low=1)
        branches = self.default_branches() if branches is None else check_int("branches", branches, low=1)
        batch_size = check_int("batch_size", batch_size, low=1)
        q = as_float_matrix("queries", queries, dim=self.dim).to(self._device)
        scores = torch.full((q.shape[0], k), -math.inf, device=self._device)
        ids = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=self._device)
        node_dots = candidates = probed = 0.0
        if self.ntotal > 0:
            for start in range(0, q.shape[0], batch_size):
                part = q[start:start + batch_size]
                leaves, dots = self._select_leaves(_unit(part), branches)
                s, i, cand = self._scan(part, leaves, k)
                scores[start:start + part.shape[0]], ids[start:start + part.shape[0]] = s, i
                node_dots += dots
                candidates += cand
                probed += float((leaves >= 0).sum())
        result = scores.cpu().numpy(), ids.cpu().numpy()
        if not return_stats:
            return result
        n = max(1, q.shape[0])
        stats = SearchStats(dot_products=(node_dots + candidates) / n, candidates=candidates / n,
                            leaves_probed=probed / n, n_queries=q.shape[0], seconds=time.perf_counter() - started)
        return (*result, stats)

    def _refresh_nodes(self) -> None:
        """Recompute ``(u, r, n)`` of every upper-level node from its children (after training, add or load).

        ``u_node = normalise(Σ_children u_c)``, ``r_node = max_children(∠(u_node, u_c) + r_c)``,
        ``n_node = max_children n_c``: the children's cones lie inside the node's, so its bound holds.
        """
        stats = [NodeStats(self._leaf_dir, self._leaf_radius, self._leaf_norm, self._offsets[1:] > self._offsets[:-1])]
        for level in self._levels:
            below = stats[-1]
            count = level.centroids.shape[0]
            weights = below.populated.to(below.direction.dtype).unsqueeze(1)
            direction = _unit(torch.zeros(count, self.dim, device=self._device)
                              .index_add_(0, level.parent, below.direction * weights))
            gap = torch.arccos(torch.einsum("cd,cd->c", direction[level.parent], below.direction).clamp(-1.0, 1.0))
            spread = torch.where(below.populated, gap + below.radius, torch.zeros_like(gap)).clamp(max=math.pi)
            radius = torch.zeros(count, device=self._device).scatter_reduce(0, level.parent, spread, reduce="amax")
            norm = torch.zeros(count, device=self._device).scatter_reduce(0, level.parent, below.norm, reduce="amax")
            populated = torch.zeros(count, dtype=torch.int64, device=self._device).scatter_reduce(
                0, level.parent, below.populated.long(), reduce="amax").bool()
            stats.append(NodeStats(direction, radius, norm, populated))
        self._node_stats = stats

    def _select_leaves(self, q_unit: torch.Tensor, branches: int) -> tuple[torch.Tensor, float]:
        """Leaves to probe per query, ``(n, b)`` int64 with ``-1`` padding, and the node dot products spent.

        Args:
            q_unit: unit queries ``q/‖q‖``, ``(n, d)``.
        """
        top = self._node_stats[-1]
        scores = _rank_scores(q_unit @ top.direction.T, top, self.slack)
        dots = float(q_unit.shape[0] * top.direction.shape[0])
        top_s, nodes = scores.topk(min(branches, scores.shape[1]), dim=1)
        nodes = torch.where(torch.isfinite(top_s), nodes, torch.full_like(nodes, -1))
        for depth in range(len(self._levels) - 1, -1, -1):
            nodes, spent = self._descend(q_unit, nodes, depth, branches)
            dots += spent
        return nodes, dots

    def _descend(self, q_unit: torch.Tensor, nodes: torch.Tensor, depth: int,
                 branches: int) -> tuple[torch.Tensor, float]:
        """From the chosen nodes of level ``depth`` to the best ``branches`` of their children.

        As in :meth:`_scan`, (query, node) pairs are grouped by node, so each chosen node's children
        ``(K_u, d)`` are scored against all the queries that chose it in one product, written into an
        ``(n, C_depth)`` score matrix (``-inf`` for children of nodes not chosen) that one top-k reduces.

        Args:
            q_unit: ``(n, d)``; nodes: ``(n, b)`` int64 node ids of level ``depth``, ``-1`` for none.

        Returns:
            children chosen ``(n, b')`` (``-1`` padded) and the dot products spent.
        """
        n, b = nodes.shape
        below = self._node_stats[depth]
        parent = self._levels[depth].parent
        order = torch.argsort(parent, stable=True)  # children of each node, contiguous
        counts = torch.bincount(parent, minlength=self._levels[depth].centroids.shape[0])
        first = torch.cumsum(counts, 0) - counts
        scores = torch.full((n, parent.numel()), -math.inf, dtype=q_unit.dtype, device=q_unit.device)
        pairs = torch.nonzero(nodes.flatten() >= 0).flatten()
        pairs = pairs[torch.argsort(nodes.flatten()[pairs], stable=True)]
        uniq, per_node = torch.unique_consecutive(nodes.flatten()[pairs], return_counts=True)
        pair_query = pairs // b
        jobs = list(zip(first[uniq].tolist(), counts[uniq].tolist(), (torch.cumsum(per_node, 0) - per_node).tolist(),
                        per_node.tolist(), strict=True))

        def score(part: list[tuple[int, int, int, int]]) -> None:
            for start, size, p0, count in part:
                kids = order[start:start + size]
                stats = NodeStats(below.direction[kids], below.radius[kids], below.norm[kids], below.populated[kids])
                rows = pair_query[p0:p0 + count]
                block = _rank_scores(q_unit[rows] @ stats.direction.T, stats, self.slack)  # (P_u, K_u)
                scores[rows[:, None], kids[None, :]] = block

        _run_split(score, jobs, q_unit.device)
        dots = float((counts[uniq] * per_node).sum())
        top_s, chosen = scores.topk(min(branches, scores.shape[1]), dim=1)
        return torch.where(torch.isfinite(top_s), chosen, torch.full_like(chosen, -1)), dots

    def _scan(self, q: torch.Tensor, leaves: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact top-k of ``q·x`` over the members of the chosen leaves.

        The (query, leaf) pairs are sorted by leaf, so that each probed leaf's members ``(S_c, d)`` (contiguous
        in storage) are scored against all its queries ``(P_c, d)`` (contiguous after one gather) in one
        product; the leaf's top ``k`` per pair go straight into rows ``P_c`` of a ``(P, k)`` buffer. One scatter
        lays the buffer out as ``(n, b·k)`` (pair slot ``j`` of a query in columns ``j·k … j·k + k − 1``) and
        one top-k merges.

        Args:
            q: queries ``(n, d)``; leaves: ``(n, b)`` int64, ``-1`` for none.

        Returns:
            scores ``(n, k)``, ids ``(n, k)`` (padded), and the number of items scored.
        """
        n, b = leaves.shape
        dev = q.device
        safe = leaves.clamp(min=0)
        sizes = torch.where(leaves >= 0, self._offsets[safe + 1] - self._offsets[safe], 0).flatten()  # (n·b,)
        pairs = torch.nonzero(sizes > 0).flatten()
        pairs = pairs[torch.argsort(leaves.flatten()[pairs], stable=True)]  # pair p = query p // b, slot p % b
        pair_leaf = leaves.flatten()[pairs]
        pair_q = q[pairs // b]  # (P, d): the queries of each leaf are contiguous
        top_s = torch.full((pairs.numel(), k), -math.inf, dtype=q.dtype, device=dev)
        top_i = torch.zeros((pairs.numel(), k), dtype=torch.int64, device=dev)
        uniq, per_leaf = torch.unique_consecutive(pair_leaf, return_counts=True)
        jobs = list(zip(self._offsets[uniq].tolist(), self._offsets[uniq + 1].tolist(),
                        (torch.cumsum(per_leaf, 0) - per_leaf).tolist(), per_leaf.tolist(), strict=True))

        def scan(part: list[tuple[int, int, int, int]]) -> None:
            for lo, hi, p0, count in part:
                kk = min(k, hi - lo)
                block = pair_q[p0:p0 + count] @ self._items[lo:hi].T  # (P_c, S_c)
                torch.topk(block, kk, dim=1, out=(top_s[p0:p0 + count, :kk], top_i[p0:p0 + count, :kk]))

        _run_split(scan, jobs, dev)
        top_i += self._offsets[pair_leaf].unsqueeze(1)  # member rank → storage row (padding stays -inf)
        merged_s = torch.full((n * b, k), -math.inf, dtype=q.dtype, device=dev)
        merged_i = torch.zeros((n * b, k), dtype=torch.int64, device=dev)
        merged_s[pairs], merged_i[pairs] = top_s, top_i
        best_s, pos = merged_s.view(n, b * k).topk(k, dim=1)
        rows = torch.gather(merged_i.view(n, b * k), 1, pos)
        ids = torch.where(torch.isfinite(best_s), self._ids[rows] if self._ids.numel() else rows, -1)
        return best_s, ids, float(sizes.sum())

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, torch.Tensor]:
        state = {"band_edges": self._band_edges, "band_max": self._band_max, "centroids": self._centroids,
                 "leaf_band": self._leaf_band, "leaf_dir": self._leaf_dir, "leaf_norm": self._leaf_norm,
                 "leaf_radius": self._leaf_radius, "items": self._items, "ids": self._ids,
                 "labels": self._labels, "offsets": self._offsets}
        for depth, level in enumerate(self._levels):
            state[f"level{depth}.centroids"] = level.centroids
            state[f"level{depth}.parent"] = level.parent
        return state

    def _params(self) -> dict[str, Any]:
        return {"dim": self.dim, "levels": self.levels, "n_clusters": self.n_clusters, "reduction": self.reduction,
                "m": self.m, "U": self.U, "n_bands": self.n_bands, "slack": self.slack,
                "seed": self.seed, "max_iter": self.max_iter}

    def save(self, path: str | Path) -> Path:
        """Write the index to ``path`` atomically.

        Layout: ``magic (8 B) | format version (u32) | metadata length (u64) | payload length (u64) |
        SHA-256 of metadata + payload (32 B) | JSON metadata (parameters, tensor table) | payload`` (raw
        little-endian tensors). Loading the file gives back an index whose searches return the same bits.
        """
        self._require_trained("save")
        payload = io.BytesIO()
        table = []
        for name, tensor in self._state().items():
            array = tensor.detach().cpu().contiguous().numpy()
            table.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape),
                          "offset": payload.tell()})
            payload.write(array.tobytes())
        data = payload.getvalue()
        meta = json.dumps({"params": self._params(), "tensors": table}, sort_keys=True).encode("utf-8")
        digest = hashlib.sha256(meta + data).digest()
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(meta), len(data), digest)
        return _io.atomic_write_bytes(path, header + meta + data)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> ClusterIndex:
        """Read an index written by :meth:`save` onto ``device`` (default CPU).

        Raises:
            ValueError: not an index file, another format version, truncated or padded, or corrupted (the
                SHA-256 of metadata and payload does not match the header).
        """
        raw = Path(path).read_bytes()
        if len(raw) < _HEADER.size:
            raise ValueError(f"{path}: not a triptych MIPS index (file too short: {len(raw)} bytes)")
        magic, version, meta_len, data_len, digest = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ValueError(f"{path}: not a triptych MIPS index (bad magic {magic!r})")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported index format version {version}, expected {FORMAT_VERSION}")
        body = raw[_HEADER.size:]
        if len(body) != meta_len + data_len:
            raise ValueError(f"{path}: truncated or padded index: {len(body)} bytes after the header, "
                             f"expected {meta_len + data_len}")
        if hashlib.sha256(body).digest() != digest:
            raise ValueError(f"{path}: corrupted index: the SHA-256 of metadata and payload does not match the "
                             "header")
        meta = json.loads(body[:meta_len].decode("utf-8"))
        data = body[meta_len:]
        state = {}
        for entry in meta["tensors"]:
            array = np.frombuffer(data, dtype=np.dtype(entry["dtype"]), count=math.prod(entry["shape"]),
                                  offset=entry["offset"]).reshape(entry["shape"])
            state[entry["name"]] = torch.from_numpy(array.copy())
        index = cls(**meta["params"])
        index._restore(state, torch.device(device) if device is not None else torch.device("cpu"))
        return index

    def _restore(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        state = {name: tensor.to(device) for name, tensor in state.items()}
        self._device = device
        self._band_edges, self._band_max = state["band_edges"], state["band_max"]
        self._centroids, self._leaf_band, self._leaf_dir = state["centroids"], state["leaf_band"], state["leaf_dir"]
        self._leaf_norm, self._leaf_radius = state["leaf_norm"], state["leaf_radius"]
        self._items, self._ids, self._labels = state["items"], state["ids"], state["labels"]
        self._offsets = state["offsets"]
        self._levels = [Level(state[f"level{d}.centroids"], state[f"level{d}.parent"])
                        for d in range(self.levels - 1) if f"level{d}.centroids" in state]
        self._refresh_nodes()
        self.is_trained = True

    def to(self, device: str | torch.device) -> ClusterIndex:
        """Move the index to ``device`` (e.g. ``"cuda"``); returns ``self``."""
        self._require_trained("to")
        self._restore(self._state(), torch.device(device))
        return self

    def __repr__(self) -> str:
        state = (f"ntotal={self.ntotal}, leaves={self.n_leaves}, bands={int(self._band_max.numel())}"
                 if self.is_trained else "untrained")
        return f"ClusterIndex(dim={self.dim}, levels={self.levels}, reduction={self.reduction!r}, {state})"


def _apportion(total: int, counts: np.ndarray, density: np.ndarray) -> np.ndarray:
    """Split ``total`` leaves over bands ∝ ``counts · density`` (largest remainder), ≥ 1 and ≤ count each."""
    counts = np.asarray(counts, dtype=np.int64)
    weights = counts * np.asarray(density, dtype=np.float64)
    share = total * weights / weights.sum()
    out = np.maximum(1, np.floor(share).astype(np.int64))
    for band in np.argsort(-(share - np.floor(share)), kind="stable")[: max(0, total - int(out.sum()))]:
        out[band] += 1
    return np.minimum(out, counts)


@dataclass(frozen=True)
class NodeStats:
    """What a node knows of its members, in the original space.

    Attributes:
        direction: unit directions ``u_c``, ``(C, d)``.
        radius: angular radii ``r_c = max_{x∈c} ∠(x, u_c)`` in radians, ``(C,)``.
        norm: largest member norms ``n_c`` (0 for a node without members), ``(C,)``.
        populated: whether the node has members, ``(C,)`` bool.
    """

    direction: torch.Tensor
    radius: torch.Tensor
    norm: torch.Tensor
    populated: torch.Tensor


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm, zero rows left at zero: ``(N, d) → (N, d)``."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def _rank_scores(cosines: torch.Tensor, stats: NodeStats, slack: float) -> torch.Tensor:
    """``s_c = n_c · cos(max(0, θ_c − α r_c))`` from ``cos θ_c``; ``-inf`` for nodes without members.

    Computed in place in ``cosines`` (consumed) with per-node constants folded in, as this runs over the whole
    ``(n, C)`` query × leaf matrix: ``n_c cos(θ − w) = cos θ · (n_c cos w) + sin θ · (n_c sin w)`` for ``θ ≥ w``,
    ``n_c`` inside the widened cone ``θ < w``.

    Args:
        cosines: ``cos θ_c = q̂·u_c``, ``(n, C)``, overwritten; ``stats`` fields are ``(C,)``.
        slack: ``α``; 1 gives the upper bound of ``q·x/‖q‖`` over the node's members.
    """
    widened = (slack * stats.radius).clamp(max=math.pi)
    cos_w = torch.cos(widened)
    along, across = stats.norm * cos_w, stats.norm * torch.sin(widened)
    inside = cosines >= cos_w
    scores = cosines.square().neg_().add_(1.0).clamp_(min=0.0).sqrt_().mul_(across).addcmul_(cosines, along)
    scores = torch.where(inside, stats.norm, scores)
    return scores.masked_fill_(~stats.populated, -math.inf)


def _leaf_directions(x: torch.Tensor, labels: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Unit mean ``u_c`` of the training members of every leaf ``(C, d)``; ``fallback`` rows where it is 0."""
    sums = torch.zeros(fallback.shape[0], x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    empty = (torch.linalg.vector_norm(sums, dim=1) == 0).unsqueeze(1)
    return _unit(torch.where(empty, fallback, sums))


def _run_split(work: Callable[[list], None], jobs: list, device: torch.device) -> None:
    """Run ``work`` over ``jobs`` split in ``torch.get_num_threads()`` interleaved parts, one Python thread each.

    The per-leaf (per-node) products are small: torch's intra-op threads would meet at an OpenMP barrier after every one
    of them (and stall whenever the machine is busy), so on CPU each part runs single-threaded and the parts run
    in parallel (torch releases the GIL inside its kernels). The parts write disjoint entries of shared buffers.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= 1 or len(jobs) < 2 * threads:
        work(jobs)
        return
    parts = [jobs[i::threads] for i in range(threads)]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for future in [pool.submit(work, part) for part in parts]:
                future.result()
    finally:
        torch.set_num_threads(threads)
