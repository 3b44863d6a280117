"""Meta-SGD (Li et al. 2017): a learned learning rate for every parameter element."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import LossFn, MetaLearner, OptimizerFactory, Plan

__all__ = ["MetaSGD"]


def lr_key(name: str) -> str:
    """The meta-parameter key of a model parameter name ('.' is not allowed in keys)."""
    return name.replace(".", "/")


class MetaSGD(MetaLearner):
    r"""MAML whose inner learning rate is learned per element, along with the initialization.

    The inner update is :math:`\phi \leftarrow \phi - \alpha \odot \nabla L^{s}(\phi)`, with
    :math:`\alpha` shaped like the parameters and meta-learned with :math:`\theta`. Any inner
    optimizer can be used: :math:`\alpha` is passed as its per-element `lr`.

    The learning rates are stored as `log_lr` (so they stay positive, as every metagrad
    optimizer requires), one tensor per model parameter, keyed by the parameter's name with
    '.' replaced by '/'. They start at `inner_lr`. Note that the outer optimizer then steps in
    log space: with Adam at 1e-3 a rate changes by about 0.1% per step; give the `log_lr`
    parameters their own parameter group with a larger outer learning rate to learn them
    faster. `lrs()` returns the current values.

    Arguments are those of `MetaLearner`; the meta-gradient is exact (second order) unless
    `first_order=True`, in which case it still reaches the learning rates through the update.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | str = "mse",
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        inner_optim: OptimizerFactory | None = None,
        vectorize: bool | str = "auto",
        randomness: str = "different",
    ) -> None:
        super().__init__(
            model, loss_fn, inner_lr, inner_steps, first_order, inner_optim, vectorize, randomness
        )
        params = dict(model.named_parameters())
        self.log_lr = nn.ParameterDict(
            {
                lr_key(n): nn.Parameter(torch.full_like(params[n].detach(), math.log(inner_lr)))
                for n in self.adapted_names()
            }
        )

    def lrs(self) -> dict[str, Tensor]:
        """The current per-element inner learning rates, keyed by model parameter name."""
        return {n: torch.exp(self.log_lr[lr_key(n)]) for n in self.adapted_names()}

    def inner_lr_at(self, step: int) -> dict[str, Tensor]:
        return self.lrs()

    def plan(self, steps: int) -> Plan:
        plan = super().plan(1)
        plan.lrs = [self.lrs()]  # the same rates at every step: computed once per forward
        plan.steps = steps
        return plan
