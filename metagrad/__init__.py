"""metagrad: differentiable optimizers and exact hypergradients for PyTorch."""

from . import meta, optim, tasks
from .functional import Functional, differentiable_step, inner_grads
from .meta_params import MetaParameters
from .problem import InnerProblem

__all__ = [
    "optim",
    "meta",
    "tasks",
    "Functional",
    "differentiable_step",
    "inner_grads",
    "MetaParameters",
    "InnerProblem",
]
__version__ = "0.1.0"
