"""Truncated backpropagation through time: reverse mode through the current truncation only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .._checks import detach_tree
from ..meta_params import MetaParameters
from ..problem import InnerProblem
from .base import Estimate, InnerRun, as_leaves, inner_steps, meta_gradients, outer_loss, start
from .session import TruncatedEstimator, Truncation

__all__ = ["TBPTT"]


@dataclass(frozen=True)
class TBPTT(TruncatedEstimator):
    """Backpropagation through the K inner steps of the current truncation only.

    The truncation starts from the inner params and optimizer state that the previous
    truncations left (detached: treated as constants), runs its K steps with the full
    second-order graph and differentiates the outer loss at its end into the
    meta-parameters. The first truncation of a run also differentiates through the initial
    params and optimizer state (a learned initialization gets its gradient there, and zero,
    with the usual warning, in later truncations). Over a single truncation it is the
    `Truncated(k=K)` of the run that ends there: for fixed meta-parameters, the estimate of
    the truncation ending at step s equals `Truncated(k=K)` on the first s steps, and with
    K >= T it is `Unrolled`.

    Bias: biased for the objective of `TruncatedSession` (and for the final loss): the
    influence of the meta-parameters on the earlier truncations of the run, which reaches
    this truncation's outer loss through its starting state, is dropped. This is the
    short-horizon bias (Wu et al. 2018: short truncations favour too small learning rates);
    deterministic, so averaging does not remove it.
    Cost: K inner steps with second-order graph plus one backward pass per truncation (an
    inner run of T steps costs about what one `Unrolled` hypergradient costs).
    Memory: grows with K, not with T.
    """

    def truncation(
        self, problem: InnerProblem, meta: MetaParameters, carry: Any, span: Truncation
    ) -> tuple[Estimate, Any, dict[str, Tensor] | None]:
        if carry is None:
            run = start(problem, meta)  # keeps the graph from meta into the initial state
        else:
            params, state = carry
            run = InnerRun(as_leaves(params), state)
        run = inner_steps(problem, meta, run, span.steps)
        loss = outer_loss(problem, meta, run.params)
        grads = meta_gradients(loss, meta)
        carry = detach_tree((run.params, run.state))
        last = None if run.last_loss is None else run.last_loss.detach()
        done = InnerRun(carry[0], carry[1], last)
        return Estimate(grads, loss, done, {}), carry, None
