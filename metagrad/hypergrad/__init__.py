"""Hypergradient methods: one interface, several estimators trading cost, memory and bias.

`method(problem, meta)` runs the inner problem and returns a `HypergradResult` holding the
meta-gradients keyed like `dict(meta.named_parameters())`.
"""

from .base import Estimator, HypergradMethod, HypergradResult, NonFiniteLossError
from .checkpointed import Checkpointed
from .first_order import FirstOrder
from .forward_mode import ForwardMode
from .implicit import Implicit
from .mixed_mode import MixedMode
from .reversible import Reversible
from .solvers import solve_linear
from .truncated import Truncated
from .unrolled import Unrolled

__all__ = [
    "Checkpointed",
    "Estimator",
    "FirstOrder",
    "ForwardMode",
    "Truncated",
    "HypergradMethod",
    "HypergradResult",
    "Implicit",
    "MixedMode",
    "NonFiniteLossError",
    "Reversible",
    "Unrolled",
    "solve_linear",
]
