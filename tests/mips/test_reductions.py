"""MIPS → MCSS reductions: the transformed cosine orders items as the inner product does."""

from __future__ import annotations

import pytest
import torch

from triptych.mips.reductions import (
    item_scale,
    l2_alsh_items,
    l2_alsh_queries,
    sign_alsh_items,
    sign_alsh_queries,
    simple_lsh_items,
    simple_lsh_queries,
)


@pytest.fixture
def skewed() -> tuple[torch.Tensor, torch.Tensor]:
    """Items with norms spread over two orders of magnitude, and queries: ``(500, 8)``, ``(20, 8)``."""
    gen = torch.Generator().manual_seed(0)
    items = torch.randn(500, 8, generator=gen, dtype=torch.float64)
    items *= torch.logspace(-1, 1, 500, dtype=torch.float64)[:, None]
    return items, torch.randn(20, 8, generator=gen, dtype=torch.float64)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T


def test_simple_lsh_is_exact(skewed):
    items, queries = skewed
    p, qq = simple_lsh_items(items), simple_lsh_queries(queries)
    assert p.shape == (500, 9) and qq.shape == (20, 9)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(500, dtype=torch.float64))
    torch.testing.assert_close(qq.norm(dim=1), torch.ones(20, dtype=torch.float64))
    m_norm = items.norm(dim=1).max()
    expected = (queries @ items.T) / (queries.norm(dim=1, keepdim=True) * m_norm)
    torch.testing.assert_close(_cosine(qq, p), expected)
    # the orders agree exactly, item by item
    assert torch.equal(_cosine(qq, p).argsort(dim=1), (queries @ items.T).argsort(dim=1))


@pytest.mark.parametrize("m", [1, 3, 5])
def test_sign_alsh_cosine_is_nearly_monotone(skewed, m):
    items, queries = skewed
    p, qq = sign_alsh_items(items, m=m), sign_alsh_queries(queries, m=m)
    assert p.shape == (500, 8 + m) and qq.shape == (20, 8 + m)
    torch.testing.assert_close(qq.norm(dim=1), torch.ones(20, dtype=torch.float64))
    # the inner product with the transformed query is exactly (U/M) q·x / ‖q‖
    m_norm = items.norm(dim=1).max()
    torch.testing.assert_close(qq @ p.T, 0.85 * (queries @ items.T) / (queries.norm(dim=1, keepdim=True) * m_norm))
    # ‖P(x)‖² = m/4 + ‖x̃‖^(2^(m+1)): nearly constant, so cosine ≈ monotone in q·x
    sq = (0.85 * items.norm(dim=1) / m_norm) ** 2
    torch.testing.assert_close(p.norm(dim=1) ** 2, m / 4 + sq ** (2 ** m))
    top_true = (queries @ items.T).topk(10, dim=1).indices
    top_cos = _cosine(qq, p).topk(10, dim=1).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_true, top_cos, strict=True)) / 200
    assert overlap >= (0.95 if m >= 3 else 0.5)


def test_l2_alsh_distance_formula(skewed):
    items, queries = skewed
    p, qq = l2_alsh_items(items), l2_alsh_queries(queries)
    assert p.shape == (500, 11) and qq.shape == (20, 11)
    assert torch.all(qq[:, 8:] == 0.5)
    m_norm = items.norm(dim=1).max()
    scaled = 0.83 * items / m_norm
    dist = torch.cdist(qq, p) ** 2
    expected = 1 + 3 / 4 - 2 * (queries / queries.norm(dim=1, keepdim=True)) @ scaled.T
    expected += (scaled.norm(dim=1) ** 16)[None, :]
    torch.testing.assert_close(dist, expected)
    # nearest in L2 = top inner product (up to the vanishing last term)
    top_true = (queries @ items.T).argmax(dim=1)
    assert (dist.argmin(dim=1) == top_true).float().mean() >= 0.9


def test_max_norm_and_dtype_and_device(skewed):
    items, _ = skewed
    m_norm = float(items.norm(dim=1).max())
    p = simple_lsh_items(items, max_norm=2 * m_norm)
    torch.testing.assert_close(p[:, :8], items / (2 * m_norm))
    assert sign_alsh_items(items.float()).dtype == torch.float32
    assert item_scale(torch.zeros(3, 4)) == 1.0


def test_zero_query_stays_zero():
    assert torch.equal(sign_alsh_queries(torch.zeros(2, 3)), torch.zeros(2, 6))
    assert torch.equal(simple_lsh_queries(torch.zeros(1, 3)), torch.zeros(1, 4))


def test_errors(skewed):
    items, _ = skewed
    with pytest.raises(ValueError, match="max_norm must bound every item norm"):
        simple_lsh_items(items, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        simple_lsh_items(items, max_norm=0.0)
    with pytest.raises(ValueError, match="U must be < 1"):
        sign_alsh_items(items, U=1.0)
    with pytest.raises(ValueError, match="m must be >= 1"):
        l2_alsh_queries(items, m=0)
    with pytest.raises(ValueError, match="finite"):
        simple_lsh_queries(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        sign_alsh_items(torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        simple_lsh_items(torch.ones(3, 2, dtype=torch.int64))
