"""Reptile (Nichol et al. 2018): move the initialization towards the adapted weights."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from .._checks import detach_tree
from .base import MetaLearner, Params, Plan

__all__ = ["Reptile"]


class Reptile(MetaLearner):
    r"""Reptile as a loss: its gradient is the Reptile direction.

    Each task runs the inner optimizer from :math:`\theta` on its support set, without any
    graph, to :math:`\phi_i`. The returned value is the mean query loss at the adapted weights
    (for monitoring), and its gradient with respect to :math:`\theta` is
    :math:`\theta - \frac1n \sum_i \phi_i`, so an outer `torch.optim.SGD(lr=epsilon)` step is
    Reptile's :math:`\theta \leftarrow \theta + \epsilon (\bar\phi - \theta)`. (With an
    adaptive outer optimizer such as Adam this is the usual "Reptile with Adam".) Cost: that of
    plain training on each task; no second-order terms by construction.

    Arguments are those of `MetaLearner` without `first_order` (always true here);
    `inner_steps` defaults to 5.
    """

    fixed_arguments: ClassVar[dict[str, Any]] = {"first_order": True}

    def __init__(self, model: nn.Module, *, inner_steps: int = 5, **kwargs: Any) -> None:
        self.refuse_fixed(kwargs)
        super().__init__(model, inner_steps=inner_steps, **kwargs)

    def second_order(self) -> bool:
        return False

    def task_loss(
        self, plan: Plan, buffers: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> Tensor:
        start = detach_tree(plan.theta)
        adapted = detach_tree(self.inner_loop(plan, buffers, sx, sy, first_order=True, start=start))
        query = self.query_loss(plan, adapted, buffers, qx, qy).detach()
        dist = sum(0.5 * ((plan.theta[k] - adapted[k]) ** 2).sum() for k in adapted)
        return query + (dist - dist.detach())
