"""Reverse mode through only the last k inner steps (truncated backpropagation)."""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import check_count
from ..meta_params import MetaParameters
from ..problem import InnerProblem
from .base import (
    Estimate,
    Estimator,
    InnerRun,
    as_leaves,
    inner_steps,
    meta_gradients,
    outer_loss,
    start,
)

__all__ = ["Truncated"]


@dataclass(frozen=True)
class Truncated(Estimator):
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

    k: int = 10

    def __post_init__(self) -> None:
        check_count(self.k, "k")

    def live_steps(self, steps: int) -> int:
        return min(self.k, steps)

    def estimate(self, problem: InnerProblem, meta: MetaParameters) -> Estimate:
        steps = problem.steps
        cut = max(steps - self.k, 0)
        if cut == 0:
            run = inner_steps(problem, meta, start(problem, meta), range(steps))
        else:
            run = start(problem, meta, track=False)
            run = inner_steps(problem, meta, run, range(cut), create_graph=False, track=False)
            run = InnerRun(as_leaves(run.params), run.state, run.last_loss)
            run = inner_steps(problem, meta, run, range(cut, steps))
        loss = outer_loss(problem, meta, run.params)
        return Estimate(meta_gradients(loss, meta), loss, run, {"hypergrad/k": min(self.k, steps)})
