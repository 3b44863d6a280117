"""metagrad: differentiable optimizers and exact hypergradients for PyTorch."""

from . import learners, online, optim, tasks
from .functional import Functional, differentiable_step, inner_grads
from .meta_params import MetaParameters
from .problem import InnerProblem

__all__ = [
    "optim",
    "learners",
    "online",
    "tasks",
    "Functional",
    "differentiable_step",
    "inner_grads",
    "MetaParameters",
    "InnerProblem",
]
__version__ = "0.1.0"
