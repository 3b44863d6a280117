"""Persistent evolution strategies (Vicol, Metz & Sohl-Dickstein 2021): unbiased online ES."""

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

__all__ = ["PES"]


@dataclass(frozen=True)
class PES(ParticleEstimator):
    """Persistent evolution strategies: antithetic ES whose noise persists across truncations.

    Vicol, Metz & Sohl-Dickstein (2021), "Unbiased gradient estimation in unrolled computation
    graphs with persistent evolution strategies". Each of the N antithetic pairs of particles
    keeps its own inner state (params and optimizer state) for the whole inner run. Every
    truncation j draws fresh perturbations eps_ij ~ N(0, sigma^2 I) of the stored
    (unconstrained) meta-parameters; particle +i runs the truncation with theta + eps_ij and
    particle -i with theta - eps_ij, each from where it stopped, and the pair's accumulated
    noise xi_ij = eps_i1 + ... + eps_ij (cleared when a new inner run starts) weights the
    difference of their outer losses at the truncation's end:

        g_j = mean_i xi_ij (L_j(+i) - L_j(-i)) / (2 sigma^2).

    An unperturbed run advances alongside; the result reports its outer loss and params.

    Bias: none for the Gaussian-smoothed objective. Precisely: with the meta-parameters held
    fixed during the inner run, E[g_j] is the gradient with respect to theta of
    E_eps[L_j(theta + eps_1, ..., theta + eps_j)], where L_j is the outer loss after
    truncation j when truncation k ran with theta + eps_k. Summed over the truncations of a
    run, the estimates are unbiased for the gradient of the smoothed
    `sum_j outer_loss(after truncation j)` (the objective of `TruncatedSession`), and the
    estimate of the last truncation alone for the smoothed outer loss after T steps. Where
    the losses are quadratic in the meta-parameters the smoothing changes nothing and the
    estimates are unbiased for the exact gradient; otherwise the smoothing differs from it
    by O(sigma^2). Updating the meta-parameters after every truncation (online) adds the
    usual staleness of online methods (as in RTRL or UORO), small for small outer steps.
    The variance grows with the number of truncations since the run started (the
    accumulated noise grows like the square root of it) and falls like 1 / N.
    Cost: 2N + 1 first-order inner runs of K steps per truncation, no backward pass.
    Memory: 2N + 1 inner states (params and optimizer state) plus N accumulated noises of
    the meta-parameters, flat in K and T.

    Args: those of `ParticleEstimator` (`particles`, `sigma`, `vectorize`).
    """

    def truncation(
        self, problem: InnerProblem, meta: MetaParameters, carry: Any, span: Truncation
    ) -> tuple[Estimate, Any, dict[str, Tensor] | None]:
        noise = sample_noise(meta, self.particles, self.sigma, span.generator)
        if carry is None:
            start, accumulated = None, noise
        else:
            start = carry["particles"]
            accumulated = {n: carry["noise"][n] + eps for n, eps in noise.items()}
        out = run_particles(
            problem,
            meta,
            antithetic_values(meta, noise),
            start,
            span.steps,
            batched=True,
            vectorize=self.vectorize,
            context=span.context,
        )
        grads, samples, metrics = pair_estimate(accumulated, out.outer_loss, self.sigma)
        metrics["pes/noise_rms"] = _rms(accumulated) / self.sigma
        center = index_particles(out.state, 0)
        run = InnerRun(center[0], center[1], out.inner_loss[0])
        carry = {"particles": out.state, "noise": accumulated}
        return Estimate(grads, out.outer_loss[0], run, metrics), carry, samples


def _rms(tree: dict[str, Tensor]) -> float:
    total = sum(float(t.pow(2).sum()) for t in tree.values())
    count = sum(t.numel() for t in tree.values())
    return (total / max(count, 1)) ** 0.5
