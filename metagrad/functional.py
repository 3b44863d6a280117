"""Call ordinary `nn.Module`s with explicit parameters and take differentiable steps on them.

Models stay plain modules: nothing is patched or swapped. Parameters travel as a
`dict[str, Tensor]` (the form of `named_parameters()`), and the module is called through
`torch.func.functional_call`.

>>> fmodel = Functional(model)
>>> params = fmodel.params()          # the module's own parameters: the initial weights
>>> state = opt.init(params)
>>> loss = F.mse_loss(fmodel(params, x), y)
>>> params, state = differentiable_step(opt, loss, params, state)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .optim.base import Optimizer

__all__ = ["Functional", "differentiable_step", "inner_grads"]

State = TypeVar("State")


def inner_grads(
    loss: Tensor, params: Mapping[str, Tensor], *, create_graph: bool = True
) -> dict[str, Tensor]:
    """Gradients of a scalar `loss` with respect to each tensor in `params`.

    With `create_graph=True` the gradients are themselves differentiable, so an update built
    from them can be differentiated again (second-order meta-gradients). A parameter the loss
    does not use gets a zero gradient.

    Raises:
        ValueError: `loss` is not a scalar, a parameter does not require grad (its gradient
            cannot be recovered from a loss that was already computed), or `loss` has no
            graph at all.
    """
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss must be a scalar tensor, got {shape}")
    frozen = [name for name, p in params.items() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"parameters {frozen} do not require grad, so the loss has no gradient for them; "
            "compute the loss from params that require grad (p.detach().requires_grad_())"
        )
    if not loss.requires_grad:
        raise ValueError(
            "loss does not require grad: it was computed without any of the params "
            "(or under torch.no_grad()), so it has no gradient with respect to them"
        )
    names = list(params)
    grads = torch.autograd.grad(
        loss,
        [params[n] for n in names],
        create_graph=create_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return dict(zip(names, grads, strict=True))


def differentiable_step(
    optimizer: Optimizer[State],
    loss: Tensor,
    params: Mapping[str, Tensor],
    state: State,
    *,
    create_graph: bool = True,
) -> tuple[dict[str, Tensor], State]:
    """One optimizer step on `params` from `loss`, differentiable end to end.

    Args:
        optimizer: a `metagrad.optim` optimizer; its hyperparameters may require grad.
        loss: scalar loss computed from `params`.
        params: current parameters by name.
        state: the optimizer's state for `params`.
        create_graph: keep the graph of the gradient computation (second-order terms). False
            gives first-order updates, which still depend on the hyperparameters and on the
            previous params.

    Returns:
        The new params and the new optimizer state.
    """
    grads = inner_grads(loss, params, create_graph=create_graph)
    return optimizer.step(dict(params), grads, state)


class Functional:
    """A plain `nn.Module` called with explicit parameters and buffers.

    Args:
        module: any module. It is not modified; its own parameters are the default starting
            point of an inner loop, so an outer `loss.backward()` reaches them (MAML).
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"Functional expects an nn.Module, got {type(module).__name__}")
        self.module = module

    def params(self, *, detach: bool = False) -> dict[str, Tensor]:
        """The module's trainable parameters by name.

        Args:
            detach: return fresh leaves (copies that require grad) instead of the module's own
                parameters, so that no gradient reaches the module.
        """
        params: dict[str, Tensor] = {
            n: p for n, p in self.module.named_parameters() if p.requires_grad
        }
        if detach:
            params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        return params

    def buffers(self) -> dict[str, Tensor]:
        """Copies of the module's buffers (e.g. BatchNorm running statistics).

        Passing them to `__call__` keeps the module's own buffers unchanged: a BatchNorm layer
        in training mode updates the copies instead.
        """
        return {n: b.clone() for n, b in self.module.named_buffers()}

    def __call__(
        self,
        params: Mapping[str, Tensor],
        *args: Any,
        buffers: Mapping[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the module's forward with `params` (and `buffers`, if given) in place of its own.

        Parameters and buffers not named in the mappings are the module's own.
        """
        tensors = dict(params) if buffers is None else {**buffers, **params}
        return torch.func.functional_call(self.module, tensors, args, kwargs)

    def __repr__(self) -> str:
        return f"Functional({self.module.__class__.__name__})"
