"""MAML++-style learning: per-layer, per-step inner learning rates and a multi-step loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import ArgumentError, check_number
from .base import MetaLearner, Params, Plan

__all__ = ["MAMLPlusPlus"]


class MAMLPlusPlus(MetaLearner):
    r"""MAML with learned per-layer per-step inner learning rates (Antoniou et al. 2019).

    Inner step :math:`t` updates parameter tensor :math:`l` with its own learned rate
    :math:`\alpha_{l,t}` (LSLR), passed to the inner optimizer as a per-layer `lr`. The rates
    are the entry `inner_lr` of `learner.meta` (a `MetaParameters`: per layer, one value per
    inner step, stored as logs), starting at `inner_lr`. Evaluating with more steps than
    `inner_steps` reuses the last step's rates.

    The multi-step loss (MSL) is optional: set `step_weights` to one weight per inner step and
    the meta-objective becomes :math:`\sum_t w_t L^{q}(\phi^{(t)})` (in calls without an
    explicit `steps`; evaluation with `steps=` reports the last step's loss); `anneal_step_weights`
    moves the weights from uniform to the last step, as the paper does over training. The
    derivative-order annealing of the paper is `first_order=True` early in training, then
    `learner.first_order = False`. Per-step BatchNorm statistics are not implemented: each
    task normalizes with the statistics of its own batch. Other arguments are those of
    `MetaLearner`.

    Args:
        model: the network; its trainable parameters are the meta-learned initialization.
        inner_steps: inner steps per task during meta-training (default 5); also the number
            of learned learning rates per parameter tensor.
        step_weights: weights of the multi-step loss, one per inner step, or None for the
            query loss after the last step only.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_steps: int = 5,
        step_weights: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, inner_steps=inner_steps, **kwargs)
        self.meta.add(
            "inner_lr",
            self.inner_lr,
            scope="per_layer",
            params=self.adapted_params(),
            steps=self.inner_steps,
        )
        self.step_weights = step_weights

    @property
    def step_weights(self) -> list[float] | None:
        """Weights of the multi-step loss (one per inner step), or None (last step only)."""
        return self._step_weights

    @step_weights.setter
    def step_weights(self, weights: Sequence[float] | None) -> None:
        if weights is not None:
            weights = [check_number(w, "step_weights") for w in weights]
            if len(weights) != self.inner_steps:
                raise ArgumentError(
                    "step_weights",
                    f"Invalid step_weights: {len(weights)} weights for {self.inner_steps} "
                    "inner steps (one weight per step)",
                )
        self._step_weights = weights

    def anneal_step_weights(self, progress: float) -> None:
        """Set the multi-step loss weights from uniform (progress 0) to the last step only (1)."""
        check_number(progress, "progress", 0.0, 1.0)
        n = self.inner_steps
        self.step_weights = [
            (1 - progress) / n + (progress if t == n - 1 else 0.0) for t in range(n)
        ]

    def lrs(self) -> dict[str, Tensor]:
        """The current learning rates, [inner_steps] per parameter tensor, by model name."""
        rates = [self.meta.value("inner_lr", step=t) for t in range(self.inner_steps)]
        return {n: torch.stack([r[n] for r in rates]) for n in self.adapted_names()}

    def inner_lr_at(self, step: int) -> dict[str, Tensor]:
        return self.meta.value("inner_lr", step=min(step, self.inner_steps - 1))

    def plan(self, steps: int) -> Plan:
        plan = super().plan(1)
        with self.meta.reuse_values():
            plan.lrs = [self.inner_lr_at(t) for t in range(min(steps, self.inner_steps))]
        plan.steps = steps
        if self._step_weights is not None and steps == self.inner_steps:
            plan.step_weights = self._step_weights
        return plan

    def task_loss(
        self, plan: Plan, buffers: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> Tensor:
        weights = plan.step_weights
        if weights is None or plan.explicit_steps:
            return super().task_loss(plan, buffers, sx, sy, qx, qy)
        total: list[Tensor] = []

        def record(t: int, params: Params) -> None:
            if weights[t] != 0:
                total.append(weights[t] * self.query_loss(plan, params, buffers, qx, qy))

        self.inner_loop(plan, buffers, sx, sy, first_order=self.first_order, on_step=record)
        return torch.stack(total).sum()
