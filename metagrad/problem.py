"""The description of one inner training run, shared by every hypergradient method."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ._checks import Params, check_count
from .meta_params import MetaParameters
from .optim.base import Optimizer

__all__ = ["InnerProblem"]

LossFn = Callable[[Params, MetaParameters, Any], Tensor]


@dataclass
class InnerProblem:
    """One inner training run: initial params, optimizer, losses, batches and horizon.

    Args:
        init: the initial inner params, or a function of the meta-parameters returning them
            (a learned initialization, as in MAML).
        optimizer: `(meta, step) -> Optimizer`, the inner optimizer for inner step `step`,
            built from the meta-parameters' current values (e.g.
            `lambda meta, t: SGD(lr=meta.value("lr"))`). It is called once per step, so a
            per-step schedule reads `meta.value("lr", step=t)`.
        inner_loss: `(params, meta, batch) -> scalar`, the training loss of the inner loop.
        outer_loss: `(params, meta, batch) -> scalar`, the validation loss differentiated into
            the meta-parameters.
        inner_batches: a sequence of at least `steps` batches, or `step -> batch`. A function
            must return the same batch for the same step: checkpointed methods call it again
            when they recompute a segment.
        outer_batch: the batch of the outer loss.
        steps: the number of inner steps T.
        implicit_batch: the inner batch at which `Implicit` takes the Hessian and the mixed
            derivative at the final params (e.g. the whole training set); None uses the batch
            of the last inner step. Other methods ignore it.
    """

    init: Mapping[str, Tensor] | Callable[[MetaParameters], Mapping[str, Tensor]]
    optimizer: Callable[[MetaParameters, int], Optimizer]
    inner_loss: LossFn
    outer_loss: LossFn
    inner_batches: Sequence[Any] | Callable[[int], Any]
    outer_batch: Any
    steps: int
    implicit_batch: Any = None

    def __post_init__(self) -> None:
        check_count(self.steps, "steps")
        for field in ("optimizer", "inner_loss", "outer_loss"):
            if not callable(getattr(self, field)):
                raise ValueError(f"InnerProblem.{field} must be callable")
        if not callable(self.init) and not isinstance(self.init, Mapping):
            raise ValueError("InnerProblem.init must be a mapping of tensors or a function of meta")
        if not callable(self.inner_batches):
            if len(self.inner_batches) < self.steps:
                raise ValueError(
                    f"inner_batches has {len(self.inner_batches)} batches for {self.steps} steps"
                )

    def initial_params(self, meta: MetaParameters) -> Params:
        """The initial params, as given or as built from `meta`."""
        params = self.init(meta) if callable(self.init) else self.init
        if not isinstance(params, Mapping) or not params:
            raise ValueError("InnerProblem.init must give a non-empty mapping of tensors")
        return dict(params)

    def batch(self, step: int) -> Any:
        """The inner batch of step `step`."""
        if callable(self.inner_batches):
            return self.inner_batches(step)
        return self.inner_batches[step]
