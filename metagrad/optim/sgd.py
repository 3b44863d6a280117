"""Differentiable stochastic gradient descent with momentum, dampening, Nesterov and L2."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._hyper import Hyper, Params, check_params, is_zero, resolve, validate
from ._ops import add_scaled
from .base import Optimizer

__all__ = ["SGD", "SGDState"]


class SGDState(NamedTuple):
    """State of `SGD`: the step count and, when momentum is used, one buffer per parameter."""

    step: int
    momentum_buffer: dict[str, Tensor]


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
        dampening: dampening :math:`\tau` for momentum.
        weight_decay: L2 penalty :math:`\lambda`.
        nesterov: use Nesterov momentum (needs momentum > 0 and zero dampening).

    Every number may also be a 0-d tensor, a tensor shaped like a parameter, or a mapping from
    parameter name to either; any tensor may require grad.
    """

    hyperparameter_names = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(
        self,
        lr: Hyper = 1e-3,
        momentum: Hyper = 0.0,
        dampening: Hyper = 0.0,
        weight_decay: Hyper = 0.0,
        nesterov: bool = False,
    ) -> None:
        self.lr = validate(lr, "lr")
        self.momentum = validate(momentum, "momentum")
        self.dampening = validate(dampening, "dampening", 0.0, 1.0)
        self.weight_decay = validate(weight_decay, "weight_decay")
        if nesterov and (is_zero(momentum) or not is_zero(dampening)):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.nesterov = bool(nesterov)

    def _uses_buffer(self) -> bool:
        return not is_zero(self.momentum)

    def init(self, params: Params) -> SGDState:
        self._check(params)
        # Buffers are created from the first gradient (b_1 = g), as in torch.optim.SGD.
        return SGDState(step=0, momentum_buffer={})

    def step(self, params: Params, grads: Params, state: SGDState) -> tuple[Params, SGDState]:
        check_params(params, grads, {})
        new_params: Params = {}
        new_buffers: dict[str, Tensor] = {}
        use_buffer = self._uses_buffer()
        for name, p in params.items():
            g = grads[name]
            wd = resolve(self.weight_decay, "weight_decay", name, p)
            if not is_zero(wd):
                g = add_scaled(g, p, wd)
            if use_buffer:
                mu = resolve(self.momentum, "momentum", name, p)
                if state.step == 0:
                    buf = g
                else:
                    damp = resolve(self.dampening, "dampening", name, p)
                    if isinstance(mu, Tensor) and is_zero(damp):
                        # g + mu * buf in one kernel and one autograd node
                        buf = torch.addcmul(g, mu, state.momentum_buffer[name])
                    else:
                        buf = mu * state.momentum_buffer[name]
                        buf = buf + g if is_zero(damp) else add_scaled(buf, g, 1 - damp)
                new_buffers[name] = buf
                g = add_scaled(g, buf, mu) if self.nesterov else buf
            lr = resolve(self.lr, "lr", name, p)
            if isinstance(lr, Tensor):
                new_params[name] = torch.addcmul(p, lr, g, value=-1)  # one autograd node
            else:
                new_params[name] = p - lr * g
        return new_params, SGDState(step=state.step + 1, momentum_buffer=new_buffers)
