"""Differentiable stochastic gradient descent with momentum, dampening, Nesterov and L2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import ArgumentError
from ._hyper import Hyper, Params, is_zero
from ._ops import add_scaled, coupled_decay
from .base import Optimizer, flag, hyper

__all__ = ["SGD", "SGDState"]


class SGDState(NamedTuple):
    """State of `SGD`: the step count and, when momentum is used, one buffer per parameter."""

    step: int
    momentum_buffer: dict[str, Tensor]


@dataclass(eq=False, repr=False)
class SGD(Optimizer[SGDState]):
    r"""Stochastic gradient descent, step for step the same as `torch.optim.SGD`.

    For each parameter :math:`\theta` with gradient :math:`g` at step :math:`t`:

    .. math::
        g &\leftarrow g + \lambda \theta \\
        b_t &= \mu b_{t-1} + (1 - \tau) g \quad (b_1 = g) \\
        g &\leftarrow g + \mu b_t \text{ if nesterov, else } b_t \\
        \theta &\leftarrow \theta - \gamma g

    Args:
        lr: learning rate :math:`\gamma`.
        momentum: momentum factor :math:`\mu`. A tensor always uses the momentum buffer, so its
            gradient is available even where its value is 0.
        dampening: dampening :math:`\tau` for momentum, in [0, 1].
        weight_decay: L2 penalty :math:`\lambda`.
        nesterov: use Nesterov momentum (needs momentum > 0 and zero dampening).

    Every number may also be a 0-d tensor, a tensor shaped like a parameter, or a mapping from
    parameter name to either; any tensor may require grad.
    """

    lr: Hyper = hyper(1e-3)
    momentum: Hyper = hyper(0.0)
    dampening: Hyper = hyper(0.0, high=1.0)
    weight_decay: Hyper = hyper(0.0)
    nesterov: bool = flag(False)

    def _check_args(self) -> None:
        if self.nesterov and (is_zero(self.momentum) or not is_zero(self.dampening)):
            raise ArgumentError(
                "nesterov",
                "Invalid nesterov: Nesterov momentum needs a momentum and zero dampening",
            )

    def init(self, params: Params) -> SGDState:
        self.check(params)
        # Buffers are created from the first gradient (b_1 = g), as in torch.optim.SGD.
        return SGDState(step=0, momentum_buffer={})

    def step(self, params: Params, grads: Params, state: SGDState) -> tuple[Params, SGDState]:
        new_params: Params = {}
        new_buffers: dict[str, Tensor] = {}
        use_buffer = not is_zero(self.momentum)
        for name, p, g, h in self.per_parameter(params, grads):
            g = coupled_decay(g, p, h.weight_decay)
            if use_buffer:
                if state.step == 0:
                    buf = g
                elif isinstance(h.momentum, Tensor) and is_zero(h.dampening):
                    # g + mu * buf in one kernel and one autograd node
                    buf = torch.addcmul(g, h.momentum, state.momentum_buffer[name])
                else:
                    buf = h.momentum * state.momentum_buffer[name]
                    buf = buf + g if is_zero(h.dampening) else add_scaled(buf, g, 1 - h.dampening)
                new_buffers[name] = buf
                g = add_scaled(g, buf, h.momentum) if self.nesterov else buf
            if isinstance(h.lr, Tensor):
                new_params[name] = torch.addcmul(p, h.lr, g, value=-1)  # one autograd node
            else:
                new_params[name] = p - h.lr * g
        return new_params, SGDState(step=state.step + 1, momentum_buffer=new_buffers)
