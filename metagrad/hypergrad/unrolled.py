"""Reverse-mode differentiation through the whole unrolled inner loop."""

from __future__ import annotations

import time

from ..meta_params import MetaParameters
from ..problem import InnerProblem
from .base import HypergradResult, finish, inner_steps, meta_gradients, start

__all__ = ["Unrolled"]


class Unrolled:
    """Exact hypergradients by backpropagating through all T inner steps.

    Bias: none; the result is the exact gradient of the outer loss after T steps.
    Cost: one inner run with second-order graph, then one backward pass through it (about
    2-3x the cost of T plain training steps).
    Memory: grows linearly with T (every step's graph is kept until the backward pass).
    """

    def __call__(self, problem: InnerProblem, meta: MetaParameters) -> HypergradResult:
        started = time.perf_counter()
        run = inner_steps(problem, meta, start(problem, meta), range(problem.steps))
        outer_loss = problem.outer_loss(run.params, meta, problem.outer_batch)
        grads = meta_gradients(outer_loss, meta)
        return finish(grads, outer_loss, run, started)

    def __repr__(self) -> str:
        return "Unrolled()"
