"""Online optimizers: ordinary `torch.optim.Optimizer`s that tune their own hyperparameters.

Unlike `metagrad.optim`, whose optimizers are pure `init`/`step` pairs that an outer loop
differentiates, these follow the `torch.optim` contract: `opt.step()` after `loss.backward()`
updates the parameters in place, and the hyperparameters adapt as training goes.

>>> from metagrad.online import SGDHD
>>> opt = SGDHD(model.parameters(), lr=1e-3, hypergrad_lr=0.1)
"""

from .hd import SGDHD, AdamHD

__all__ = ["SGDHD", "AdamHD"]
