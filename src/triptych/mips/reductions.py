"""MIPS → MCSS/NNS reductions: append coordinates so that inner-product order becomes cosine (or L2) order.

Maximum inner product search asks for ``argmax_i q·x_i``. The norms of the items ``x_i`` make this different
from maximum cosine similarity search (MCSS). Each reduction below maps items ``x ↦ P(x)`` and queries
``q ↦ Q(q)`` with different maps so that a cosine (or Euclidean) search over the transformed vectors returns the
inner-product winners.

Convention: every function takes a floating tensor of shape ``(N, d)`` (items) or ``(n, d)`` (queries) on any
device and returns a new tensor of the same dtype and device. ``M`` is ``max_norm`` when given, else the largest
item norm ``max_i ‖x_i‖``; an item norm above ``M`` is refused (the reductions require ``‖x/M‖ ≤ 1``). A zero
query stays zero (its direction is undefined and every item ties).

References:
    Shrivastava & Li, "Asymmetric LSH (ALSH) for sublinear time MIPS", NIPS 2014 (L2-ALSH);
    Shrivastava & Li, "Improved asymmetric LSH (ALSH) for MIPS", UAI 2015 (Sign-ALSH);
    Neyshabur & Srebro, "On symmetric and asymmetric LSHs for inner product search", ICML 2015 (Simple-LSH);
    Bachrach et al., "Speeding up the Xbox recommender system using a Euclidean transformation", RecSys 2014;
    Auvolat et al., "Clustering is efficient for approximate MIPS", arXiv 1507.05910 (m = 3, U = 0.85).
"""

from __future__ import annotations

import torch

from triptych._validation import check_int, check_real, check_tensor

__all__ = [
    "item_scale",
    "l2_alsh_items",
    "l2_alsh_queries",
    "sign_alsh_items",
    "sign_alsh_queries",
    "simple_lsh_items",
    "simple_lsh_queries",
]

# Relative slack on ``‖x‖ ≤ M``: a norm recomputed in another order or precision may exceed M by rounding.
_NORM_SLACK = 1e-5


def _matrix(name: str, x: torch.Tensor) -> torch.Tensor:
    return check_tensor(name, x, shape=(None, None), floating=True, finite=True)


def item_scale(x: torch.Tensor, max_norm: float | None = None) -> float:
    """The normaliser ``M``: ``max_norm`` if given, else ``max_i ‖x_i‖`` (1 for an empty or all-zero set).

    Args:
        x: items, ``(N, d)``.
        max_norm: an explicit ``M > 0``; must bound every item norm.

    Raises:
        ValueError: ``max_norm`` is not positive, or some ``‖x_i‖`` exceeds it.
    """
    x = _matrix("items", x)
    largest = float(torch.linalg.vector_norm(x, dim=1).max()) if x.shape[0] else 0.0
    if max_norm is None:
        return largest if largest > 0.0 else 1.0
    max_norm = check_real("max_norm", max_norm, low=0.0, low_inclusive=False)
    if largest > max_norm * (1.0 + _NORM_SLACK):
        raise ValueError(f"max_norm must bound every item norm: got max_norm = {max_norm}, "
                         f"but the largest item norm is {largest}")
    return max_norm


def _unit_rows(q: torch.Tensor) -> torch.Tensor:
    """``q / ‖q‖`` row by row, zero rows left at zero; ``(n, d) → (n, d)``."""
    norms = torch.linalg.vector_norm(q, dim=1, keepdim=True)
    return q / torch.where(norms > 0, norms, torch.ones_like(norms))


def _scaled(x: torch.Tensor, scale: float, max_norm: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̃, ‖x̃‖²)`` with ``x̃ = scale · x / M``: ``(N, d)`` and ``(N, 1)``, ``‖x̃‖ ≤ scale``."""
    x = _matrix("items", x)
    m_norm = item_scale(x, max_norm)
    scaled = x * (scale / m_norm)
    sq = scaled.square().sum(dim=1, keepdim=True).clamp_(max=scale * scale)
    return scaled, sq


def _powers(sq: torch.Tensor, m: int) -> torch.Tensor:
    """``[‖x̃‖^(2^1), ‖x̃‖^(2^2), …, ‖x̃‖^(2^m)]`` from ``sq = ‖x̃‖²``: ``(N, 1) → (N, m)``."""
    columns = [sq]
    for _ in range(m - 1):
        columns.append(columns[-1].square())
    return torch.cat(columns, dim=1)


def sign_alsh_items(x: torch.Tensor, m: int = 3, U: float = 0.85,  # noqa: N803 - the paper's symbol
                    max_norm: float | None = None) -> torch.Tensor:
    """Sign-ALSH item transform ``P(x) = [x̃; ½ − ‖x̃‖^(2^1); …; ½ − ‖x̃‖^(2^m)]`` with ``x̃ = U·x/M``.

    With the query transform :func:`sign_alsh_queries`, ``Q(q)·P(x) = (U/M)·q·x/‖q‖`` exactly, while
    ``‖P(x)‖² = m/4 + ‖x̃‖^(2^(m+1))`` is nearly constant (the error term vanishes doubly exponentially in
    ``m``), so the cosine between ``Q(q)`` and ``P(x)`` is nearly monotone in ``q·x``.

    Args:
        x: items, ``(N, d)``.
        m: number of appended coordinates (paper: 3).
        U: scale ``0 < U < 1`` of the largest item (paper: 0.85).
        max_norm: ``M``; defaults to the largest item norm.

    Returns:
        ``(N, d + m)``.
    """
    m = check_int("m", m, low=1)
    U = check_real("U", U, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)  # noqa: N806
    scaled, sq = _scaled(x, U, max_norm)
    return torch.cat([scaled, 0.5 - _powers(sq, m)], dim=1)


def sign_alsh_queries(q: torch.Tensor, m: int = 3) -> torch.Tensor:
    """Sign-ALSH query transform ``Q(q) = [q/‖q‖; 0; …; 0]`` (``m`` zeros): ``(n, d) → (n, d + m)``."""
    q = _matrix("queries", q)
    m = check_int("m", m, low=1)
    return torch.cat([_unit_rows(q), q.new_zeros(q.shape[0], m)], dim=1)


def simple_lsh_items(x: torch.Tensor, max_norm: float | None = None) -> torch.Tensor:
    """Simple-LSH item transform ``P(x) = [x/M; sqrt(1 − ‖x/M‖²)]``: ``(N, d) → (N, d + 1)``, unit rows.

    Exact reduction: with ``Q(q) = [q/‖q‖; 0]``, ``cos(Q(q), P(x)) = Q(q)·P(x) = q·x / (M‖q‖)``, a strictly
    increasing function of ``q·x`` for a fixed query.
    """
    scaled, sq = _scaled(x, 1.0, max_norm)
    return torch.cat([scaled, (1.0 - sq).clamp_(min=0.0).sqrt_()], dim=1)


def simple_lsh_queries(q: torch.Tensor) -> torch.Tensor:
    """Simple-LSH query transform ``Q(q) = [q/‖q‖; 0]``: ``(n, d) → (n, d + 1)``."""
    q = _matrix("queries", q)
    return torch.cat([_unit_rows(q), q.new_zeros(q.shape[0], 1)], dim=1)


def l2_alsh_items(x: torch.Tensor, m: int = 3, U: float = 0.83,  # noqa: N803 - the paper's symbol
                  max_norm: float | None = None) -> torch.Tensor:
    """L2-ALSH item transform ``P(x) = [x̃; ‖x̃‖^(2^1); …; ‖x̃‖^(2^m)]`` with ``x̃ = U·x/M``.

    With ``Q(q) = [q/‖q‖; ½; …; ½]``, ``‖Q(q) − P(x)‖² = 1 + m/4 − 2·Q(q)·x̃ + ‖x̃‖^(2^(m+1))``, so the
    Euclidean nearest neighbour of ``Q(q)`` is the inner-product winner up to the vanishing last term.

    Args:
        x: items, ``(N, d)``.
        m: number of appended coordinates (usual: 3).
        U: scale ``0 < U < 1`` of the largest item (usual: 0.83).
        max_norm: ``M``; defaults to the largest item norm.

    Returns:
        ``(N, d + m)``.
    """
    m = check_int("m", m, low=1)
    U = check_real("U", U, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)  # noqa: N806
    scaled, sq = _scaled(x, U, max_norm)
    return torch.cat([scaled, _powers(sq, m)], dim=1)


def l2_alsh_queries(q: torch.Tensor, m: int = 3) -> torch.Tensor:
    """L2-ALSH query transform ``Q(q) = [q/‖q‖; ½; …; ½]`` (``m`` halves): ``(n, d) → (n, d + m)``."""
    q = _matrix("queries", q)
    m = check_int("m", m, low=1)
    return torch.cat([_unit_rows(q), q.new_full((q.shape[0], m), 0.5)], dim=1)
