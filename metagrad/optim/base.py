"""The differentiable optimizer interface shared by every optimizer in `metagrad.optim`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from ._hyper import Hyper, Params, check_params, resolve

__all__ = ["Optimizer", "safe_sqrt"]

State = TypeVar("State")


def safe_sqrt(x: Tensor) -> Tensor:
    """Square root whose derivative at exactly 0 is 0 instead of infinity.

    `torch.sqrt` has derivative 1 / (2 sqrt(x)), which is infinite at 0; an optimizer
    statistic such as Adam's second moment is exactly 0 for a coordinate whose gradient has
    always been 0 (a dead ReLU unit, a parameter the loss does not use), and the chain rule
    then multiplies infinity by 0 and returns NaN. Such a coordinate is constant in a
    neighbourhood of the current hyperparameters, so its true derivative is 0, which is what
    this function returns. Values are those of `torch.sqrt` for x >= 0 (a negative x, which only
    rounding in a variance estimate produces, gives 0 instead of NaN); the optimizer's math is
    unchanged.

    With the mask m = 1 where x > 0 and 0 elsewhere, it computes sqrt(m x + (1 - m)) m: the
    square root never sees 0, so every higher and forward-mode derivative stays finite too.
    The mask is built from plain arithmetic (`sign`), which costs less than comparisons and
    `where` in a long unrolled graph.
    """
    mask = torch.sign(x.detach()).clamp_min(0)  # 1 where x > 0, else 0; constant for autograd
    return torch.sqrt(torch.addcmul(1 - mask, x, mask)) * mask


class Optimizer(Generic[State]):
    """A pure, out-of-place optimizer whose step is differentiable.

    Subclasses hold their hyperparameters and implement `init` and `step`:

    >>> state = opt.init(params)                         # params: dict[str, Tensor]
    >>> params, state = opt.step(params, grads, state)   # new tensors; inputs untouched

    `step` never modifies its inputs. The tensors it returns carry the autograd graph back to
    the hyperparameters (where they require grad), the old params, the grads and the state.
    """

    #: Names of the constructor arguments that are hyperparameters.
    hyperparameter_names: tuple[str, ...] = ()

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters by name, as given (numbers, tensors or mappings)."""
        return {name: getattr(self, name) for name in self.hyperparameter_names}

    def init(self, params: Params) -> State:
        """Build the optimizer state for `params` (a mapping from name to tensor)."""
        raise NotImplementedError

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        """Apply one update; returns new params and new state without touching the inputs."""
        raise NotImplementedError

    def _check(self, params: Params, grads: Params | None = None) -> None:
        check_params(params, params if grads is None else grads, self._flat_hypers())
        for name, p in params.items():
            for arg, value in self._flat_hypers().items():
                resolve(value, arg, name, p)

    def _flat_hypers(self) -> dict[str, Hyper]:
        flat: dict[str, Hyper] = {}
        for name, value in self.hyperparameters().items():
            if isinstance(value, tuple):
                for i, v in enumerate(value):
                    flat[f"{name}[{i}]"] = v
            elif isinstance(value, (int, float, Tensor, Mapping)) and not isinstance(value, bool):
                flat[name] = value
        return flat

    def __repr__(self) -> str:
        def show(v: Any) -> str:
            if isinstance(v, Tensor):
                return f"tensor{tuple(v.shape)}" if v.dim() else f"tensor({v.detach().cpu()})"
            if isinstance(v, Mapping):
                return f"<per-parameter: {len(v)} entries>"
            if isinstance(v, tuple):
                return "(" + ", ".join(show(x) for x in v) + ")"
            return repr(v)

        args = ", ".join(f"{k}={show(v)}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"
