"""metagrad: differentiable optimizers and exact hypergradients for PyTorch."""

from . import optim
from .functional import Functional, differentiable_step, inner_grads

__all__ = ["optim", "Functional", "differentiable_step", "inner_grads"]
__version__ = "0.1.0"
