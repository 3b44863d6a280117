"""Differentiable Adam and AdamW (L2 and decoupled weight decay, optional AMSGrad)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from ._hyper import Hyper, Params, check_params, is_zero, resolve, validate
from ._ops import add_scaled, ema, ema_sq, sub_scaled_ratio
from .base import Optimizer, safe_sqrt

__all__ = ["Adam", "AdamW", "AdamState"]


class AdamState(NamedTuple):
    """State of `Adam`/`AdamW`: step count, first and second moments, AMSGrad's running max."""

    step: int
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    max_exp_avg_sq: dict[str, Tensor]


def _split_betas(betas: Sequence[Hyper] | Tensor) -> tuple[Hyper, Hyper]:
    if isinstance(betas, Tensor):
        if betas.shape != (2,):
            raise ValueError(
                f"Invalid betas: a tensor of betas must have shape (2,), got {tuple(betas.shape)}"
            )
        return betas[0], betas[1]
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
    return betas[0], betas[1]


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
            form, or a tensor of shape (2,).
        eps: :math:`\epsilon`, added to the denominator.
        weight_decay: :math:`\lambda`.
        amsgrad: use the running maximum of the second moment.

    Every number may also be a 0-d tensor, a tensor shaped like a parameter, or a mapping from
    parameter name to either; any tensor may require grad.
    """

    hyperparameter_names = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    decoupled_weight_decay = False

    def __init__(
        self,
        lr: Hyper = 1e-3,
        betas: Sequence[Hyper] | Tensor = (0.9, 0.999),
        eps: Hyper = 1e-8,
        weight_decay: Hyper = 0.0,
        amsgrad: bool = False,
    ) -> None:
        beta1, beta2 = _split_betas(betas)
        self.lr = validate(lr, "lr")
        self.betas = (
            validate(beta1, "betas[0]", 0.0, 1.0, high_open=True),
            validate(beta2, "betas[1]", 0.0, 1.0, high_open=True),
        )
        self.eps = validate(eps, "eps")
        self.weight_decay = validate(weight_decay, "weight_decay")
        self.amsgrad = bool(amsgrad)

    def init(self, params: Params) -> AdamState:
        self._check(params)
        zeros = {name: p.new_zeros(p.shape) for name, p in params.items()}
        return AdamState(
            step=0,
            exp_avg=zeros,
            exp_avg_sq=dict(zeros),
            max_exp_avg_sq=dict(zeros) if self.amsgrad else {},
        )

    def step(self, params: Params, grads: Params, state: AdamState) -> tuple[Params, AdamState]:
        check_params(params, grads, {})
        t = state.step + 1
        new_params: Params = {}
        exp_avg: dict[str, Tensor] = {}
        exp_avg_sq: dict[str, Tensor] = {}
        max_exp_avg_sq: dict[str, Tensor] = {}
        for name, p in params.items():
            g = grads[name]
            lr = resolve(self.lr, "lr", name, p)
            beta1 = resolve(self.betas[0], "betas[0]", name, p)
            beta2 = resolve(self.betas[1], "betas[1]", name, p)
            eps = resolve(self.eps, "eps", name, p)
            wd = resolve(self.weight_decay, "weight_decay", name, p)
            if not is_zero(wd):
                if self.decoupled_weight_decay:
                    p = p * (1 - lr * wd)
                else:
                    g = add_scaled(g, p, wd)
            m = ema(state.exp_avg[name], g, beta1)
            v = ema_sq(state.exp_avg_sq[name], g, beta2)
            exp_avg[name] = m
            exp_avg_sq[name] = v
            if self.amsgrad:
                v = max_exp_avg_sq[name] = state.max_exp_avg_sq[name].maximum(v)
            bias_correction1 = 1 - beta1**t
            bias_correction2_sqrt = (1 - beta2**t) ** 0.5
            denom = safe_sqrt(v) / bias_correction2_sqrt + eps
            new_params[name] = sub_scaled_ratio(p, lr / bias_correction1, m, denom)
        return new_params, AdamState(t, exp_avg, exp_avg_sq, max_exp_avg_sq)


class AdamW(Adam):
    r"""Adam with decoupled weight decay, step for step the same as `torch.optim.AdamW`.

    Before the Adam update, :math:`\theta \leftarrow \theta (1 - \gamma \lambda)`; the gradient
    itself is not decayed. Arguments are those of `Adam`; `weight_decay` defaults to 1e-2.
    """

    decoupled_weight_decay = True

    def __init__(
        self,
        lr: Hyper = 1e-3,
        betas: Sequence[Hyper] | Tensor = (0.9, 0.999),
        eps: Hyper = 1e-8,
        weight_decay: Hyper = 1e-2,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
