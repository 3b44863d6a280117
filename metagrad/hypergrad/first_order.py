"""First-order hypergradients: the inner gradients are treated as constants."""

from __future__ import annotations

import time

from ..meta_params import MetaParameters
from ..problem import InnerProblem
from .base import HypergradResult, finish, inner_steps, meta_gradients, start

__all__ = ["FirstOrder"]


class FirstOrder:
    """Backpropagation through the inner updates with inner gradients taken without graph.

    Every inner gradient g_t is a constant to the outer backward pass, so for SGD
    `d w_T / d lr = -sum_t g_t` and `d w_T / d w_0 = I` (first-order MAML). The dependence on
    the meta-parameters through the optimizer's update rule (learning rates, momentum, betas)
    and through a learned initialization is kept; the second-order terms (Hessian-vector
    products of the inner loss) are dropped.

    Bias: biased; exact only where the inner gradients do not depend on the params.
    Cost: about T plain training steps plus one cheap backward pass through the updates (no
    double backward).
    Memory: grows with T, but only by the update rule's small tensors (a few per parameter and
    step), not by the model's activations.
    """

    def __call__(self, problem: InnerProblem, meta: MetaParameters) -> HypergradResult:
        started = time.perf_counter()
        run = start(problem, meta)
        run = inner_steps(problem, meta, run, range(problem.steps), create_graph=False)
        outer_loss = problem.outer_loss(run.params, meta, problem.outer_batch)
        grads = meta_gradients(outer_loss, meta)
        return finish(grads, outer_loss, run, started)

    def __repr__(self) -> str:
        return "FirstOrder()"
