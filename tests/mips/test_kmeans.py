"""Spherical k-means: determinism, unit centroids, monotone objective, empty-cluster repair, hierarchy sizes."""

from __future__ import annotations

import pytest
import torch

from triptych.mips.kmeans import SphericalKMeans, assign, build_hierarchy, level_sizes, suggested_clusters


@pytest.fixture
def blobs() -> torch.Tensor:
    """Three tight directions on the sphere plus noise: ``(600, 8)``."""
    gen = torch.Generator().manual_seed(1)
    centres = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=1)
    points = centres.repeat_interleave(200, dim=0) + 0.05 * torch.randn(600, 8, generator=gen)
    return points * torch.rand(600, 1, generator=gen).add(0.5)  # norms must not matter


def test_seeded_determinism_and_seed_matters(blobs):
    a = SphericalKMeans(10, seed=3).fit(blobs)
    b = SphericalKMeans(10, seed=3).fit(blobs)
    c = SphericalKMeans(10, seed=4).fit(blobs)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_) and torch.equal(a.labels_, b.labels_)
    assert not torch.equal(a.cluster_centers_, c.cluster_centers_)


@pytest.mark.parametrize("init", ["random", "k-means++"])
def test_unit_centroids_and_monotone_objective(blobs, init):
    fit = SphericalKMeans(12, init=init, tol=0.0, max_iter=15, seed=0).fit(blobs)
    torch.testing.assert_close(fit.cluster_centers_.norm(dim=1), torch.ones(12))
    history = torch.tensor(fit.objective_history_)
    assert torch.all(history[1:] >= history[:-1] - 1e-6)
    assert fit.n_iter_ == len(fit.objective_history_) - 1 <= 15
    assert fit.objective_ == fit.objective_history_[-1]
    # the labels are the argmax of the similarity to the final centroids
    points = torch.nn.functional.normalize(blobs, dim=1)
    assert torch.equal(fit.labels_, (points @ fit.cluster_centers_.T).argmax(dim=1))


def test_recovers_three_directions(blobs):
    fit = SphericalKMeans(3, init="k-means++", seed=0).fit(blobs)
    assert fit.objective_ > 0.99
    assert sorted(torch.bincount(fit.labels_).tolist()) == [200, 200, 200]


def test_empty_cluster_repair():
    # duplicated points: random init picks duplicates, whose clusters would stay empty without repair
    base = torch.nn.functional.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    points = torch.cat([base.repeat(40, 1), base + 0.01 * torch.randn(5, 4, generator=torch.Generator())])
    fit = SphericalKMeans(8, seed=0, tol=0.0, max_iter=10).fit(points)
    assert fit.n_repaired_ > 0
    assert torch.isfinite(fit.cluster_centers_).all()
    torch.testing.assert_close(fit.cluster_centers_.norm(dim=1), torch.ones(8))


def test_subsample_still_labels_every_point(blobs):
    fit = SphericalKMeans(4, seed=0, max_points_per_centroid=10).fit(blobs)
    assert fit.labels_.shape == (600,)
    assert torch.equal(fit.labels_, fit.predict(blobs))


def test_assign_chunks_agree_with_full_product(blobs):
    centroids = torch.nn.functional.normalize(torch.randn(7, 8), dim=1)
    labels, sims = assign(blobs, centroids)
    full = blobs @ centroids.T
    assert torch.equal(labels, full.argmax(dim=1))
    torch.testing.assert_close(sims, full.max(dim=1).values)


def test_hierarchy_and_sizes(blobs):
    assert level_sizes(1_000_000, 1) == [1000]
    assert level_sizes(1_000_000, 2) == [10000, 100]
    leaves = SphericalKMeans(30, seed=0).fit(blobs).cluster_centers_
    (level,) = build_hierarchy(leaves, [5], seed=0)
    assert level.centroids.shape == (5, 8) and level.parent.shape == (30,)
    assert set(level.parent.tolist()) == set(range(5))
    assert 1 <= suggested_clusters(100) <= 12 and suggested_clusters(10**7) == 4 * 3162 + 1


def test_errors(blobs):
    with pytest.raises(ValueError, match="at least n_clusters = 700 points"):
        SphericalKMeans(700).fit(blobs)
    with pytest.raises(ValueError, match="init must be one of"):
        SphericalKMeans(3, init="kmeans").fit(blobs)
    with pytest.raises(ValueError, match="finite"):
        SphericalKMeans(2).fit(torch.tensor([[float("inf"), 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="n_clusters must be >= 1"):
        SphericalKMeans(0).fit(blobs)
