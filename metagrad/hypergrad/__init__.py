"""Hypergradient methods: one interface, several estimators trading cost, memory and bias.

`method(problem, meta)` runs the inner problem and returns a `HypergradResult` holding the
meta-gradients keyed like `dict(meta.named_parameters())`. For online truncated training,
`TruncatedSession(problem, estimator, truncation=K)` advances one long inner run K steps per
`session.step(meta)` with `TBPTT`, `TruncatedES` or `PES`.
"""

from .base import Estimator, HypergradMethod, HypergradResult, NonFiniteLossError
from .checkpointed import Checkpointed
from .first_order import FirstOrder
from .forward_mode import ForwardMode
from .implicit import Implicit, ImplicitBiasWarning
from .mixed_mode import MixedMode
from .pes import PES
from .reversible import Reversible
from .session import TruncatedEstimator, TruncatedResult, TruncatedSession
from .solvers import solve_linear
from .tbptt import TBPTT
from .truncated import Truncated
from .truncated_es import TruncatedES
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
    "ImplicitBiasWarning",
    "MixedMode",
    "NonFiniteLossError",
    "PES",
    "Reversible",
    "TBPTT",
    "TruncatedES",
    "TruncatedEstimator",
    "TruncatedResult",
    "TruncatedSession",
    "Unrolled",
    "solve_linear",
]
