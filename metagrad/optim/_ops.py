"""Element-wise building blocks of the update rules, fused where a hyperparameter is a number.

torch.optim writes its updates with fused in-place kernels (`lerp_`, `addcmul_`,
`add_(alpha=...)`). The out-of-place versions used here are the same kernels, so values follow
torch.optim's rounding, and each saves one or two autograd nodes per parameter and step. Where
a hyperparameter is a tensor (which may require grad) the plain, equally differentiable formula
is used instead, because the fused kernels take such factors only as Python numbers.
"""

from __future__ import annotations

from typing import TypeGuard

import torch
from torch import Tensor

__all__ = ["add_scaled", "coupled_decay", "ema", "ema_sq", "sub_scaled_ratio"]


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float))


def add_scaled(x: Tensor, y: Tensor, alpha: float | Tensor) -> Tensor:
    """`x + alpha * y`."""
    if _is_number(alpha):
        return torch.add(x, y, alpha=alpha)
    return x + alpha * y


def coupled_decay(g: Tensor, p: Tensor, weight_decay: float | Tensor) -> Tensor:
    """`g + weight_decay * p`: L2 regularization folded into the gradient (skipped exactly when
    `weight_decay` is the number 0; a tensor is always applied, so it keeps its gradient)."""
    if _is_number(weight_decay) and weight_decay == 0:
        return g
    return add_scaled(g, p, weight_decay)


def ema(avg: Tensor, x: Tensor, beta: float | Tensor) -> Tensor:
    """`beta * avg + (1 - beta) * x`, computed as torch.optim does when `beta` is a number."""
    if _is_number(beta):
        return torch.lerp(avg, x, 1 - beta)
    # A tensor beta may differ in dtype or device from avg, which lerp does not allow.
    return beta * avg + (1 - beta) * x


def ema_sq(avg: Tensor, x: Tensor, beta: float | Tensor) -> Tensor:
    """`beta * avg + (1 - beta) * x * x`, computed as torch.optim does when `beta` is a number."""
    if _is_number(beta):
        return torch.addcmul(avg * beta, x, x, value=1 - beta)
    return beta * avg + (1 - beta) * (x * x)


def sub_scaled_ratio(x: Tensor, scale: float | Tensor, num: Tensor, den: Tensor) -> Tensor:
    """`x - scale * num / den` in one `addcdiv` (torch.optim's kernel if `scale` is a number)."""
    if _is_number(scale):
        return torch.addcdiv(x, num, den, value=-scale)
    return torch.addcdiv(x, scale * num, den, value=-1)
