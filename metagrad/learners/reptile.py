"""Reptile (Nichol et al. 2018): move the initialization towards the adapted weights."""

from __future__ import annotations

from torch import Tensor, nn

from .base import LossFn, MetaLearner, OptimizerFactory, Params, Plan, _detach

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

    Arguments are those of `MetaLearner` (without `first_order`, which is always true here).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | str = "mse",
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        inner_optim: OptimizerFactory | None = None,
        vectorize: bool | str = "auto",
        randomness: str = "different",
    ) -> None:
        super().__init__(
            model, loss_fn, inner_lr, inner_steps, True, inner_optim, vectorize, randomness
        )

    def second_order(self) -> bool:
        return False

    def task_loss(
        self, plan: Plan, buffers: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> Tensor:
        adapted = _detach(
            self.inner_loop(plan, buffers, sx, sy, first_order=True, start=_detach(plan.theta))
        )
        query = self.query_loss(plan, adapted, buffers, qx, qy).detach()
        dist = sum(0.5 * ((plan.theta[k] - adapted[k]) ** 2).sum() for k in adapted)
        return query + (dist - dist.detach())
