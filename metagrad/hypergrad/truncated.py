"""Reverse mode through only the last k inner steps (truncated backpropagation)."""

from __future__ import annotations

import time

from ..meta_params import MetaParameters
from ..problem import InnerProblem
from .base import (
    HypergradResult,
    InnerRun,
    as_leaves,
    finish,
    inner_steps,
    meta_gradients,
    start,
)

__all__ = ["Truncated"]


class Truncated:
    """Hypergradients from backpropagating through the last `k` of the T inner steps.

    The first T - k steps run without a graph (params and optimizer state are detached after
    every step); the last k steps keep the full second-order graph, as `Unrolled` does.

    Bias: biased toward short horizons for k < T: the influence of the meta-parameters on the
    first T - k steps is dropped, and so is a learned initialization's (its gradient is zero,
    with the usual warning). With k >= T it is `Unrolled`, bit for bit.
    Cost: T - k first-order steps plus k steps with graph and one backward pass through them.
    Memory: grows with k, not with T.

    Args:
        k: the number of trailing inner steps to differentiate through (>= 1).
    """

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k!r} (must be an int >= 1)")
        self.k = k

    def __call__(self, problem: InnerProblem, meta: MetaParameters) -> HypergradResult:
        started = time.perf_counter()
        steps = problem.steps
        cut = max(steps - self.k, 0)
        if cut == 0:
            run = inner_steps(problem, meta, start(problem, meta), range(steps))
        else:
            run = start(problem, meta, track=False)
            run = inner_steps(problem, meta, run, range(cut), create_graph=False, track=False)
            run = InnerRun(as_leaves(run.params), run.state, run.last_loss)
            run = inner_steps(problem, meta, run, range(cut, steps))
        outer_loss = problem.outer_loss(run.params, meta, problem.outer_batch)
        grads = meta_gradients(outer_loss, meta)
        return finish(grads, outer_loss, run, started, **{"hypergrad/k": min(self.k, steps)})

    def __repr__(self) -> str:
        return f"Truncated(k={self.k})"
