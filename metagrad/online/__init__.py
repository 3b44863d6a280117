"""Online optimizers: ordinary `torch.optim.Optimizer`s that tune their own hyperparameters.

Unlike `metagrad.optim`, whose optimizers are pure `init`/`step` pairs that an outer loop
differentiates, these follow the `torch.optim` contract: `opt.step()` after `loss.backward()`
updates the parameters in place, and the hyperparameters adapt as training goes.

>>> from metagrad.online import SGDHD
>>> opt = SGDHD(model.parameters(), lr=1e-3, hypergrad_lr=0.1)

`Hyperoptimizer` generalizes them to stacks (Chandra et al., 2022), in which every
hyperparameter of each level (learning rate, momentum, Adam's betas) is learned by the level
above:

>>> from metagrad.online import HyperAdam, HyperSGD, Hyperoptimizer
>>> opt = Hyperoptimizer(model.parameters(), levels=[HyperAdam(lr=1e-3), HyperSGD(lr=1e-5)])
"""

from .hd import SGDHD, AdamHD
from .stack import HyperAdam, Hyperoptimizer, HyperSGD, Level

__all__ = ["SGDHD", "AdamHD", "Hyperoptimizer", "HyperSGD", "HyperAdam", "Level"]
