"""Meta-SGD (Li et al. 2017): a learned learning rate for every parameter element."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import MetaLearner, Plan

__all__ = ["MetaSGD"]


class MetaSGD(MetaLearner):
    r"""MAML whose inner learning rate is learned per element, along with the initialization.

    The inner update is :math:`\phi \leftarrow \phi - \alpha \odot \nabla L^{s}(\phi)`, with
    :math:`\alpha` shaped like the parameters and meta-learned with :math:`\theta`. Any inner
    optimizer can be used: :math:`\alpha` is passed as its per-element `lr`.

    The learning rates are the entry `inner_lr` of `learner.meta` (a `MetaParameters`, per
    element, stored as logs so they stay positive), starting at `inner_lr`. The outer optimizer
    steps in log space: with Adam at 1e-3 a rate changes by about 0.1% per step; give
    `learner.meta.parameters()` their own parameter group with a larger outer learning rate to
    learn them faster. `lrs()` returns the current values.

    Arguments are those of `MetaLearner`; the meta-gradient is exact (second order) unless
    `first_order=True`, in which case it still reaches the learning rates through the update.
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.meta.add("inner_lr", self.inner_lr, scope="per_element", params=self.adapted_params())

    def lrs(self) -> dict[str, Tensor]:
        """The current per-element inner learning rates, keyed by model parameter name."""
        return self.meta.value("inner_lr")

    def inner_lr_at(self, step: int) -> dict[str, Tensor]:
        return self.lrs()

    def plan(self, steps: int) -> Plan:
        plan = super().plan(1)
        plan.lrs = [self.lrs()]  # the same rates at every step: computed once per forward
        plan.steps = steps
        return plan
