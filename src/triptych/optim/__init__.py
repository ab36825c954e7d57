"""Online step-size adaptation: LLR (Massé & Ollivier, arXiv 1511.02540) and the SGD-HD anchor.

- :class:`LLR` — learns log η online from the trajectory's sensitivity to it (exact, finite-difference or
  Hessian-free), on top of SGD, AdaGrad or Adam; the current η is always ``param_group["lr"]``.
- :class:`SGDHD` — hypergradient descent (Baydin et al. 2018), α_t = α_{t−1} + β g_t·g_{t−1}.
- :mod:`triptych.optim.reference` — the equations line by line on a flat vector, the tests' oracle.
"""

from triptych.optim.hypergradient import SGDHD
from triptych.optim.llr import BASES, LLR, VARIANTS

__all__ = ["BASES", "LLR", "SGDHD", "VARIANTS"]
