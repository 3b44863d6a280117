"""Differentiable Adagrad with learning-rate decay and L2."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._hyper import Hyper, Params, check_params, is_zero, resolve, validate
from ._ops import add_scaled, sub_scaled_ratio
from .base import Optimizer, safe_sqrt

__all__ = ["Adagrad", "AdagradState"]


class AdagradState(NamedTuple):
    """State of `Adagrad`: step count and the running sum of squared gradients."""

    step: int
    sum: dict[str, Tensor]


class Adagrad(Optimizer[AdagradState]):
    r"""Adagrad, step for step the same as `torch.optim.Adagrad`.

    For each parameter :math:`\theta` with gradient :math:`g` at step :math:`t \ge 1`:

    .. math::
        g &\leftarrow g + \lambda \theta, \qquad
        \tilde\gamma = \frac{\gamma}{1 + (t - 1)\eta} \\
        S_t &= S_{t-1} + g^2 \quad (S_0 = s_0), \qquad
        \theta \leftarrow \theta - \tilde\gamma \frac{g}{\sqrt{S_t} + \epsilon}

    The square root has derivative 0 where its argument is exactly 0 (see `safe_sqrt`).

    Args:
        lr: learning rate :math:`\gamma`.
        lr_decay: :math:`\eta`.
        weight_decay: L2 penalty :math:`\lambda`.
        initial_accumulator_value: :math:`s_0`; differentiable like every other hyperparameter.
        eps: :math:`\epsilon`, added to the denominator.
    """

    hyperparameter_names = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")

    def __init__(
        self,
        lr: Hyper = 1e-2,
        lr_decay: Hyper = 0.0,
        weight_decay: Hyper = 0.0,
        initial_accumulator_value: Hyper = 0.0,
        eps: Hyper = 1e-10,
    ) -> None:
        self.lr = validate(lr, "lr")
        self.lr_decay = validate(lr_decay, "lr_decay")
        self.weight_decay = validate(weight_decay, "weight_decay")
        self.initial_accumulator_value = validate(
            initial_accumulator_value, "initial_accumulator_value"
        )
        self.eps = validate(eps, "eps")

    def init(self, params: Params) -> AdagradState:
        self._check(params)
        sums = {}
        for name, p in params.items():
            s0 = resolve(self.initial_accumulator_value, "initial_accumulator_value", name, p)
            sums[name] = p.new_zeros(p.shape) + s0
        return AdagradState(step=0, sum=sums)

    def step(
        self, params: Params, grads: Params, state: AdagradState
    ) -> tuple[Params, AdagradState]:
        check_params(params, grads, {})
        t = state.step + 1
        new_params: Params = {}
        sums: dict[str, Tensor] = {}
        for name, p in params.items():
            g = grads[name]
            wd = resolve(self.weight_decay, "weight_decay", name, p)
            if not is_zero(wd):
                g = add_scaled(g, p, wd)
            lr = resolve(self.lr, "lr", name, p)
            decay = resolve(self.lr_decay, "lr_decay", name, p)
            clr = lr if is_zero(decay) else lr / (1 + (t - 1) * decay)
            s = torch.addcmul(state.sum[name], g, g)
            sums[name] = s
            denom = safe_sqrt(s) + resolve(self.eps, "eps", name, p)
            new_params[name] = sub_scaled_ratio(p, clr, g, denom)
        return new_params, AdagradState(t, sums)
