"""Differentiable RMSprop (optionally centered, with momentum and L2)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._hyper import Hyper, Params, check_params, is_zero, resolve, validate
from ._ops import add_scaled, ema, ema_sq, sub_scaled_ratio
from .base import Optimizer, safe_sqrt

__all__ = ["RMSprop", "RMSpropState"]


class RMSpropState(NamedTuple):
    """State of `RMSprop`: step count, squared average, gradient average, momentum buffer."""

    step: int
    square_avg: dict[str, Tensor]
    grad_avg: dict[str, Tensor]
    momentum_buffer: dict[str, Tensor]


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
        alpha: smoothing constant :math:`\alpha`.
        eps: :math:`\epsilon`, added to the denominator.
        weight_decay: L2 penalty :math:`\lambda`.
        momentum: momentum factor :math:`\mu`. A tensor always uses the buffer.
        centered: normalize by the estimated variance of the gradient.
    """

    hyperparameter_names = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")

    def __init__(
        self,
        lr: Hyper = 1e-2,
        alpha: Hyper = 0.99,
        eps: Hyper = 1e-8,
        weight_decay: Hyper = 0.0,
        momentum: Hyper = 0.0,
        centered: bool = False,
    ) -> None:
        self.lr = validate(lr, "lr")
        self.alpha = validate(alpha, "alpha", 0.0, 1.0)
        self.eps = validate(eps, "eps")
        self.weight_decay = validate(weight_decay, "weight_decay")
        self.momentum = validate(momentum, "momentum")
        self.centered = bool(centered)

    def init(self, params: Params) -> RMSpropState:
        self._check(params)
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
        check_params(params, grads, {})
        use_momentum = not is_zero(self.momentum)
        new_params: Params = {}
        square_avg: dict[str, Tensor] = {}
        grad_avg: dict[str, Tensor] = {}
        momentum_buffer: dict[str, Tensor] = {}
        for name, p in params.items():
            g = grads[name]
            alpha = resolve(self.alpha, "alpha", name, p)
            wd = resolve(self.weight_decay, "weight_decay", name, p)
            if not is_zero(wd):
                g = add_scaled(g, p, wd)
            s = ema_sq(state.square_avg[name], g, alpha)
            square_avg[name] = s
            if self.centered:
                a = ema(state.grad_avg[name], g, alpha)
                grad_avg[name] = a
                s = torch.addcmul(s, a, a, value=-1)
            denom = safe_sqrt(s) + resolve(self.eps, "eps", name, p)
            lr = resolve(self.lr, "lr", name, p)
            if use_momentum:
                mu = resolve(self.momentum, "momentum", name, p)
                buf = torch.addcdiv(mu * state.momentum_buffer[name], g, denom)
                momentum_buffer[name] = buf
                new_params[name] = p - lr * buf
            else:
                new_params[name] = sub_scaled_ratio(p, lr, g, denom)
        new_state = RMSpropState(state.step + 1, square_avg, grad_avg, momentum_buffer)
        return new_params, new_state
