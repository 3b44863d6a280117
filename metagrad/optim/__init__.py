"""Differentiable optimizers: pure `init`/`step` pairs whose updates carry the autograd graph.

>>> from metagrad.optim import Adam
>>> opt = Adam(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
>>> state = opt.init(params)
>>> params, state = opt.step(params, grads, state)
"""

from .adagrad import Adagrad, AdagradState
from .adam import Adam, AdamState, AdamW
from .base import Optimizer, safe_sqrt
from .rmsprop import RMSprop, RMSpropState
from .sgd import SGD, SGDState

__all__ = [
    "Optimizer",
    "SGD",
    "SGDState",
    "Adam",
    "AdamW",
    "AdamState",
    "RMSprop",
    "RMSpropState",
    "Adagrad",
    "AdagradState",
    "safe_sqrt",
]
