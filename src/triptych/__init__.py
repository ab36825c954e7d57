"""triptych: three deep-learning papers as reliable PyTorch software.

- :mod:`triptych.optim` — LLR, an optimizer that learns its own step size online (Massé & Ollivier).
- :mod:`triptych.spatial` — spatial transformer layers (Jaderberg et al.).
- :mod:`triptych.mips` — clustered maximum inner product search (Auvolat et al.).
"""

__version__ = "0.1.0"
