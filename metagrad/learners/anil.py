"""ANIL (Raghu et al. 2020): adapt only the head; the body is meta-learned and shared."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._checks import ArgumentError
from .base import MetaLearner

__all__ = ["ANIL"]


class ANIL(MetaLearner):
    """Almost No Inner Loop: the inner loop adapts only the parameters of the head.

    The body's parameters stay at their meta-learned values inside every task and are learned
    by the outer loop only; the head's initialization is meta-learned as in MAML. Inner steps
    are cheaper (gradients only for the head), and the meta-gradient is exact (second order)
    unless `first_order=True`. Other arguments are those of `MetaLearner`.

    Args:
        model: the whole network.
        head: the name of the submodule that is adapted (as in `model.named_modules()`, e.g.
            "fc" or "4"); default: the last direct child with trainable parameters.

    Raises:
        ValueError: the head is not a submodule of the model or has no trainable parameters.
    """

    def __init__(self, model: nn.Module, *, head: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if head is None:
            with_params = [
                name
                for name, child in model.named_children()
                if any(p.requires_grad for p in child.parameters())
            ]
            if not with_params:
                raise ArgumentError(
                    "head",
                    "Invalid head: the model has no child module with trainable "
                    "parameters; name the head explicitly",
                )
            head = with_params[-1]
        modules = dict(model.named_modules())
        if head not in modules or head == "":
            raise ArgumentError(
                "head",
                f"Invalid head: {head!r} is not a submodule of the model "
                f"(submodules: {[n for n in modules if n][:10]})",
            )
        self.head = head
        if not self.adapted_names():
            raise ArgumentError(
                "head", f"Invalid head: submodule {head!r} has no trainable parameters"
            )

    def adapted_names(self) -> list[str]:
        prefix = self.head + "."
        return [
            n for n, p in self.model.named_parameters() if p.requires_grad and n.startswith(prefix)
        ]
