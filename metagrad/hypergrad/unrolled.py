"""Reverse-mode differentiation through the whole unrolled inner loop."""

from __future__ import annotations

from dataclasses import dataclass

from ..meta_params import MetaParameters
from ..problem import InnerProblem
from .base import Estimate, Estimator, inner_steps, meta_gradients, outer_loss, start

__all__ = ["Unrolled"]


@dataclass(frozen=True)
class Unrolled(Estimator):
    """Exact hypergradients by backpropagating through all T inner steps.

    Bias: none; the result is the exact gradient of the outer loss after T steps.
    Cost: one inner run with second-order graph, then one backward pass through it (about
    2-3x the cost of T plain training steps).
    Memory: grows linearly with T (every step's graph is kept until the backward pass).
    """

    def estimate(self, problem: InnerProblem, meta: MetaParameters) -> Estimate:
        run = inner_steps(problem, meta, start(problem, meta), range(problem.steps))
        loss = outer_loss(problem, meta, run.params)
        return Estimate(meta_gradients(loss, meta), loss, run, {})
