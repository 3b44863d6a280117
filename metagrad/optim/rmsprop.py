"""Differentiable RMSprop (optionally centered, with momentum and L2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._hyper import Hyper, Params, is_zero
from ._ops import coupled_decay, ema, ema_sq, sub_scaled_ratio
from .base import Optimizer, flag, hyper, safe_sqrt

__all__ = ["RMSprop", "RMSpropState"]


class RMSpropState(NamedTuple):
    """State of `RMSprop`: step count, squared average, gradient average, momentum buffer."""

    step: int
    square_avg: dict[str, Tensor]
    grad_avg: dict[str, Tensor]
    momentum_buffer: dict[str, Tensor]


@dataclass(eq=False, repr=False)
class RMSprop(Optimizer[RMSpropState]):
    r"""RMSprop, step for step the same as `torch.optim.RMSprop`.

    For each parameter :math:`\theta` with gradient :math:`g`:

    .. math::
        g &\leftarrow g + \lambda \theta \\
        s_t &= \alpha s_{t-1} + (1 - \alpha) g^2, \qquad
        a_t = \alpha a_{t-1} + (1 - \alpha) g \ \text{(centered only)} \\
        d &= \sqrt{s_t - a_t^2} + \epsilon \text{ if centered, else } \sqrt{s_t} + \epsilon \\
        b_t &= \mu b_{t-1} + g / d, \qquad \theta \leftarrow \theta - \gamma b_t
            \quad\text{(without momentum: } \theta \leftarrow \theta - \gamma g / d\text{)}

    The square root has derivative 0 where its argument is exactly 0 (see `safe_sqrt`).

    Args:
        lr: learning rate :math:`\gamma`.
        alpha: smoothing constant :math:`\alpha`, in [0, 1].
        eps: :math:`\epsilon`, added to the denominator.
        weight_decay: L2 penalty :math:`\lambda`.
        momentum: momentum factor :math:`\mu`. A tensor always uses the buffer.
        centered: normalize by the estimated variance of the gradient.
    """

    lr: Hyper = hyper(1e-2)
    alpha: Hyper = hyper(0.99, high=1.0)
    eps: Hyper = hyper(1e-8)
    weight_decay: Hyper = hyper(0.0)
    momentum: Hyper = hyper(0.0)
    centered: bool = flag(False)

    def init(self, params: Params) -> RMSpropState:
        self.check(params)
        zeros = {name: p.new_zeros(p.shape) for name, p in params.items()}
        return RMSpropState(
            step=0,
            square_avg=zeros,
            grad_avg=dict(zeros) if self.centered else {},
            momentum_buffer=dict(zeros) if not is_zero(self.momentum) else {},
        )

    def step(
        self, params: Params, grads: Params, state: RMSpropState
    ) -> tuple[Params, RMSpropState]:
        use_momentum = not is_zero(self.momentum)
        new_params: Params = {}
        square_avg: dict[str, Tensor] = {}
        grad_avg: dict[str, Tensor] = {}
        momentum_buffer: dict[str, Tensor] = {}
        for name, p, g, h in self.per_parameter(params, grads):
            g = coupled_decay(g, p, h.weight_decay)
            s = ema_sq(state.square_avg[name], g, h.alpha)
            square_avg[name] = s
            if self.centered:
                a = ema(state.grad_avg[name], g, h.alpha)
                grad_avg[name] = a
                s = torch.addcmul(s, a, a, value=-1)
            denom = safe_sqrt(s) + h.eps
            if use_momentum:
                buf = torch.addcdiv(h.momentum * state.momentum_buffer[name], g, denom)
                momentum_buffer[name] = buf
                new_params[name] = p - h.lr * buf
            else:
                new_params[name] = sub_scaled_ratio(p, h.lr, g, denom)
        new_state = RMSpropState(state.step + 1, square_avg, grad_avg, momentum_buffer)
        return new_params, new_state
