"""Evolution strategies over the current truncation (antithetic, fresh noise each time)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..meta_params import MetaParameters
from ..problem import InnerProblem
from ._particles import (
    ParticleEstimator,
    antithetic_values,
    index_particles,
    pair_estimate,
    run_particles,
    sample_noise,
)
from .base import Estimate, InnerRun
from .session import Truncation

__all__ = ["TruncatedES"]


@dataclass(frozen=True)
class TruncatedES(ParticleEstimator):
    """Antithetic evolution strategies over the K steps of the current truncation.

    Each truncation draws fresh Gaussian perturbations eps_1..N ~ N(0, sigma^2 I) of the
    stored (unconstrained) meta-parameters. All 2N perturbed particles and the unperturbed
    run start from the shared state that the unperturbed run reached (at the start of an
    inner run, each from the initial state its own meta values build), run the truncation,
    and the estimate is `mean_i eps_i (L(theta + eps_i) - L(theta - eps_i)) / (2 sigma^2)`
    of the outer losses at the truncation's end. Only the unperturbed run is carried on.
    Needs no second-order terms and no graph: the particles take first-order inner steps
    (vmapped, or in a loop with the same numbers).

    Bias: unbiased for the gradient of the Gaussian-smoothed truncated objective (the outer
    loss at the truncation's end as a function of the meta-parameters used during this
    truncation only), i.e. the ES counterpart of `TBPTT`: biased for the full horizon, and,
    for a non-quadratic loss, by O(sigma^2) even for the truncation.
    Cost: 2N + 1 first-order inner runs of K steps per truncation, no backward pass.
    Memory: the 2N + 1 particles of one inner step (vmapped), flat in K and T.

    Args: those of `ParticleEstimator` (`particles`, `sigma`, `vectorize`).
    """

    def truncation(
        self, problem: InnerProblem, meta: MetaParameters, carry: Any, span: Truncation
    ) -> tuple[Estimate, Any, dict[str, Tensor] | None]:
        noise = sample_noise(meta, self.particles, self.sigma, span.generator)
        out = run_particles(
            problem,
            meta,
            antithetic_values(meta, noise),
            carry,
            span.steps,
            batched=False,
            vectorize=self.vectorize,
            context=span.context,
        )
        grads, samples, metrics = pair_estimate(noise, out.outer_loss, self.sigma)
        center = index_particles(out.state, 0)
        run = InnerRun(center[0], center[1], out.inner_loss[0])
        return Estimate(grads, out.outer_loss[0], run, metrics), center, samples
