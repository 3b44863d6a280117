r"""Online learning-rate adaptation by hypergradient descent (Baydin et al., 2018).

`SGDHD` and `AdamHD` are ordinary `torch.optim.Optimizer`s for ordinary training: they tune
their learning rate while they train, from one dot product per step, with no unrolling.

After the update :math:`\theta_{t-1} = \theta_{t-2} + \alpha_{t-1} u_{t-1}` (where :math:`u` is
the update direction per unit learning rate: :math:`-g` for SGD, :math:`-\hat m / (\sqrt{\hat v}
+ \epsilon)` for Adam), the derivative of the loss at :math:`\theta_{t-1}` with respect to the
learning rate used in that update is

.. math::
    h_t = \nabla f(\theta_{t-1}) \cdot u_{t-1} = g_t \cdot u_{t-1},

and the learning rate takes a gradient step on it before the parameters move:

.. math::
    \alpha_t = \alpha_{t-1} - \beta h_t
    \qquad\text{or, with } \texttt{multiplicative=True},\qquad
    \alpha_t = \alpha_{t-1} \Big(1 - \beta \frac{h_t}{\lVert g_t \rVert \lVert u_{t-1} \rVert}\Big),

where :math:`\beta` is `hypergrad_lr`. The dot product and the norms run over every parameter
of a param group, and all of them are computed before any parameter is updated, so every
parameter of the group moves with the same learning rate in a step. The multiplicative rule uses
the cosine between :math:`g_t` and :math:`u_{t-1}`, so with :math:`0 \le \beta < 1` the factor
lies in :math:`[1 - \beta, 1 + \beta]` and the learning rate stays positive; the additive rule
can drive it below zero when :math:`\beta` is large.

The current learning rate is `optimizer.param_groups[i]["lr"]` (a float); it, the previous
directions and the moments are saved and restored by `state_dict` / `load_state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..optim._hyper import validate

__all__ = ["SGDHD", "AdamHD"]


def _check(
    value: float, arg: str, low: float = 0.0, high: float | None = None, high_open: bool = True
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {arg}: expected a number, got {type(value).__name__}")
    validate(value, arg, low, high, high_open)


def _check_hd(lr: float, hypergrad_lr: float, multiplicative: bool) -> None:
    _check(lr, "lr")
    if multiplicative:
        _check(hypergrad_lr, "hypergrad_lr (with multiplicative=True)", 0.0, 1.0)
    else:
        _check(hypergrad_lr, "hypergrad_lr")


def _adapted_lr(
    group: dict[str, Any], grads: list[Tensor], directions: list[Tensor | None]
) -> float:
    """The group's learning rate after one hypergradient step (unchanged on the first step)."""
    pairs = [(g, u) for g, u in zip(grads, directions, strict=True) if u is not None]
    lr = group["lr"]
    if not pairs or group["hypergrad_lr"] == 0:
        return lr
    h = torch.stack([torch.sum(g * u, dtype=torch.float64) for g, u in pairs]).sum().item()
    if not group["multiplicative"]:
        return lr - group["hypergrad_lr"] * h
    g_sq = torch.stack([torch.sum(g * g, dtype=torch.float64) for g, _ in pairs]).sum().item()
    u_sq = torch.stack([torch.sum(u * u, dtype=torch.float64) for _, u in pairs]).sum().item()
    norms = math.sqrt(g_sq) * math.sqrt(u_sq)
    if norms == 0:
        return lr
    return lr * (1 - group["hypergrad_lr"] * h / norms)


def _grads(group: dict[str, Any], name: str) -> tuple[list[Tensor], list[Tensor]]:
    params, grads = [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise ValueError(f"{name} does not support sparse gradients")
        params.append(p)
        g = p.grad
        if group["weight_decay"] != 0:
            g = g.add(p, alpha=group["weight_decay"])
        grads.append(g)
    return params, grads


class _HypergradientDescent(torch.optim.Optimizer):
    """The step shared by SGD-HD and Adam-HD: adapt each group's lr, then `_update` with it."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Adapt each group's learning rate, then update its parameters with it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = _grads(group, type(self).__name__)
            directions = [self.state[p].get("direction") for p in params]
            group["lr"] = _adapted_lr(group, grads, directions)
            for p, g in zip(params, grads, strict=True):
                # The direction per unit learning rate, kept for the next step's hypergradient.
                self.state[p]["direction"] = self._update(group, p, g, self.state[p])
        return loss

    def _update(self, group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any]) -> Tensor:
        """Move `p` in place with `group["lr"]`; return the update direction per unit lr."""
        raise NotImplementedError


class SGDHD(_HypergradientDescent):
    r"""SGD whose learning rate adapts online by hypergradient descent (SGD-HD).

    With :math:`g_t` the gradient (plus weight decay) and :math:`b_t` the momentum buffer of
    `torch.optim.SGD`, the update direction is :math:`u_t = -b_t` (:math:`-g_t - \mu b_t` with
    Nesterov, :math:`-g_t` without momentum) and

    .. math::
        \alpha_t = \alpha_{t-1} - \beta\, g_t \cdot u_{t-1}, \qquad
        \theta_t = \theta_{t-1} + \alpha_t u_t

    (see the module docstring for the multiplicative rule). With `hypergrad_lr=0` it is
    `torch.optim.SGD` step for step.

    Args:
        params: parameters or param groups, as for any `torch.optim.Optimizer`.
        lr: initial learning rate :math:`\alpha_0`.
        hypergrad_lr: hypergradient learning rate :math:`\beta` (in [0, 1) if multiplicative).
        momentum: momentum factor.
        dampening: dampening for momentum.
        weight_decay: L2 penalty, part of the gradient used for the hypergradient too.
        nesterov: Nesterov momentum (needs momentum > 0 and zero dampening).
        multiplicative: use the multiplicative rule, which keeps the learning rate positive.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        hypergrad_lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        multiplicative: bool = False,
    ) -> None:
        _check_hd(lr, hypergrad_lr, multiplicative)
        _check(momentum, "momentum")
        _check(dampening, "dampening", 0.0, 1.0, high_open=False)
        _check(weight_decay, "weight_decay")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Invalid nesterov: needs momentum > 0 and dampening 0")
        defaults = dict(
            lr=lr,
            hypergrad_lr=hypergrad_lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            multiplicative=multiplicative,
        )
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any]) -> Tensor:
        mu = group["momentum"]
        d = g
        if mu != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.clone()
            else:
                buf.mul_(mu).add_(g, alpha=1 - group["dampening"])
            d = g.add(buf, alpha=mu) if group["nesterov"] else buf
        p.add_(d, alpha=-group["lr"])
        return d.neg()


class AdamHD(_HypergradientDescent):
    r"""Adam whose learning rate adapts online by hypergradient descent (Adam-HD).

    With Adam's bias-corrected moments :math:`\hat m_t, \hat v_t` (exactly as
    `torch.optim.Adam`), the update direction is
    :math:`u_t = -\hat m_t / (\sqrt{\hat v_t} + \epsilon)` and

    .. math::
        \alpha_t = \alpha_{t-1} - \beta\, g_t \cdot u_{t-1}, \qquad
        \theta_t = \theta_{t-1} + \alpha_t u_t

    (see the module docstring for the multiplicative rule). With `hypergrad_lr=0` it is
    `torch.optim.Adam` step for step.

    Args:
        params: parameters or param groups, as for any `torch.optim.Optimizer`.
        lr: initial learning rate :math:`\alpha_0`.
        hypergrad_lr: hypergradient learning rate :math:`\beta` (in [0, 1) if multiplicative).
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: L2 penalty, part of the gradient used for the hypergradient too.
        multiplicative: use the multiplicative rule, which keeps the learning rate positive.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        hypergrad_lr: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        multiplicative: bool = False,
    ) -> None:
        _check_hd(lr, hypergrad_lr, multiplicative)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
        _check(betas[0], "betas[0]", 0.0, 1.0)
        _check(betas[1], "betas[1]", 0.0, 1.0)
        _check(eps, "eps")
        _check(weight_decay, "weight_decay")
        defaults = dict(
            lr=lr,
            hypergrad_lr=hypergrad_lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            multiplicative=multiplicative,
        )
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any]) -> Tensor:
        beta1, beta2 = group["betas"]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**t
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        p.addcdiv_(m, denom, value=-group["lr"] / bias_correction1)
        return (m / denom).div_(-bias_correction1)
