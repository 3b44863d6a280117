"""Differentiable Adagrad with learning-rate decay and L2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._hyper import Hyper, Params, is_zero, resolve
from ._ops import coupled_decay, sub_scaled_ratio
from .base import Optimizer, hyper, safe_sqrt

__all__ = ["Adagrad", "AdagradState"]


class AdagradState(NamedTuple):
    """State of `Adagrad`: step count and the running sum of squared gradients."""

    step: int
    sum: dict[str, Tensor]


@dataclass(eq=False, repr=False)
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

    lr: Hyper = hyper(1e-2)
    lr_decay: Hyper = hyper(0.0)
    weight_decay: Hyper = hyper(0.0)
    initial_accumulator_value: Hyper = hyper(0.0)
    eps: Hyper = hyper(1e-10)

    def init(self, params: Params) -> AdagradState:
        self.check(params)
        sums = {}
        for name, p in params.items():
            s0 = resolve(self.initial_accumulator_value, "initial_accumulator_value", name, p)
            sums[name] = p.new_zeros(p.shape) + s0
        return AdagradState(step=0, sum=sums)

    def step(
        self, params: Params, grads: Params, state: AdagradState
    ) -> tuple[Params, AdagradState]:
        t = state.step + 1
        new_params: Params = {}
        sums: dict[str, Tensor] = {}
        for name, p, g, h in self.per_parameter(params, grads):
            g = coupled_decay(g, p, h.weight_decay)
            clr = h.lr if is_zero(h.lr_decay) else h.lr / (1 + (t - 1) * h.lr_decay)
            s = torch.addcmul(state.sum[name], g, g)
            sums[name] = s
            denom = safe_sqrt(s) + h.eps
            new_params[name] = sub_scaled_ratio(p, clr, g, denom)
        return new_params, AdagradState(t, sums)
