"""Differentiable Adam and AdamW (L2 and decoupled weight decay, optional AMSGrad)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from torch import Tensor

from ._hyper import Hyper, Params, is_zero
from ._ops import coupled_decay, ema, ema_sq, sub_scaled_ratio
from .base import Optimizer, flag, hyper, pair, safe_sqrt

__all__ = ["Adam", "AdamW", "AdamState"]


class AdamState(NamedTuple):
    """State of `Adam`/`AdamW`: step count, first and second moments, AMSGrad's running max."""

    step: int
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    max_exp_avg_sq: dict[str, Tensor]


@dataclass(eq=False, repr=False)
class Adam(Optimizer[AdamState]):
    r"""Adam, step for step the same as `torch.optim.Adam` (and `AdamW` with `decoupled`).

    For each parameter :math:`\theta` with gradient :math:`g` at step :math:`t \ge 1`:

    .. math::
        g &\leftarrow g + \lambda \theta \quad\text{(L2; AdamW instead scales }
            \theta \leftarrow \theta (1 - \gamma\lambda)\text{)} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ with amsgrad, else } v_t \\
        \theta &\leftarrow \theta - \frac{\gamma}{1 - \beta_1^t}
            \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    The square root has derivative 0 (not infinity) where its argument is exactly 0, so
    hypergradients stay finite for coordinates whose gradient has always been 0; values are
    those of torch.optim.

    Args:
        lr: learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1); a pair of values in any hyperparameter
            form, or a tensor of shape (2,). Learned separately as `beta1` and `beta2`.
        eps: :math:`\epsilon`, added to the denominator.
        weight_decay: :math:`\lambda`.
        amsgrad: use the running maximum of the second moment.

    Every number may also be a 0-d tensor, a tensor shaped like a parameter, or a mapping from
    parameter name to either; any tensor may require grad.
    """

    lr: Hyper = hyper(1e-3)
    betas: Sequence[Hyper] | Tensor = pair(
        (0.9, 0.999), ("beta1", "beta2"), high=1.0, high_open=True
    )
    eps: Hyper = hyper(1e-8)
    weight_decay: Hyper = hyper(0.0)
    amsgrad: bool = flag(False)

    decoupled_weight_decay: ClassVar[bool] = False

    def init(self, params: Params) -> AdamState:
        self.check(params)
        zeros = {name: p.new_zeros(p.shape) for name, p in params.items()}
        return AdamState(
            step=0,
            exp_avg=zeros,
            exp_avg_sq=dict(zeros),
            max_exp_avg_sq=dict(zeros) if self.amsgrad else {},
        )

    def step(self, params: Params, grads: Params, state: AdamState) -> tuple[Params, AdamState]:
        t = state.step + 1
        new_params: Params = {}
        exp_avg: dict[str, Tensor] = {}
        exp_avg_sq: dict[str, Tensor] = {}
        max_exp_avg_sq: dict[str, Tensor] = {}
        for name, p, g, h in self.per_parameter(params, grads):
            beta1, beta2 = h.betas
            if self.decoupled_weight_decay:
                if not is_zero(h.weight_decay):
                    p = p * (1 - h.lr * h.weight_decay)
            else:
                g = coupled_decay(g, p, h.weight_decay)
            m = ema(state.exp_avg[name], g, beta1)
            v = ema_sq(state.exp_avg_sq[name], g, beta2)
            exp_avg[name] = m
            exp_avg_sq[name] = v
            if self.amsgrad:
                v = max_exp_avg_sq[name] = state.max_exp_avg_sq[name].maximum(v)
            bias_correction1 = 1 - beta1**t
            bias_correction2_sqrt = (1 - beta2**t) ** 0.5
            denom = safe_sqrt(v) / bias_correction2_sqrt + h.eps
            new_params[name] = sub_scaled_ratio(p, h.lr / bias_correction1, m, denom)
        return new_params, AdamState(t, exp_avg, exp_avg_sq, max_exp_avg_sq)


@dataclass(eq=False, repr=False)
class AdamW(Adam):
    r"""Adam with decoupled weight decay, step for step the same as `torch.optim.AdamW`.

    Before the Adam update, :math:`\theta \leftarrow \theta (1 - \gamma \lambda)`; the gradient
    itself is not decayed. Arguments are those of `Adam`; `weight_decay` defaults to 1e-2.
    """

    weight_decay: Hyper = hyper(1e-2)

    decoupled_weight_decay: ClassVar[bool] = True
