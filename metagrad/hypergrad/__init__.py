"""Hypergradient methods: one interface, several estimators trading cost, memory and bias.

`method(problem, meta)` runs the inner problem and returns a `HypergradResult` holding the
meta-gradients keyed like `dict(meta.named_parameters())`.
"""

from .base import HypergradMethod, HypergradResult, NonFiniteLossError
from .implicit import Implicit
from .solvers import solve_linear
from .unrolled import Unrolled

__all__ = [
    "HypergradMethod",
    "HypergradResult",
    "Implicit",
    "NonFiniteLossError",
    "Unrolled",
    "solve_linear",
]
