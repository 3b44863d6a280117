"""First-order hypergradients: the inner gradients are treated as constants."""

from __future__ import annotations

from dataclasses import dataclass

from ..meta_params import MetaParameters
from ..problem import InnerProblem
from .base import Estimate, Estimator, inner_steps, meta_gradients, outer_loss, start

__all__ = ["FirstOrder"]


@dataclass(frozen=True)
class FirstOrder(Estimator):
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

    def estimate(self, problem: InnerProblem, meta: MetaParameters) -> Estimate:
        run = start(problem, meta)
        run = inner_steps(problem, meta, run, range(problem.steps), create_graph=False)
        loss = outer_loss(problem, meta, run.params)
        return Estimate(meta_gradients(loss, meta), loss, run, {})
