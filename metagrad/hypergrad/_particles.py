"""Run many copies of one inner truncation ("particles") with perturbed meta-parameters.

Used by the evolution-strategies estimators (`TruncatedES`, `PES`). Every particle is the same
function, the shared inner loop `inner_steps` followed by the outer loss, evaluated with its
own values of the stored (unconstrained) meta-parameters substituted through
`torch.func.functional_call`. The particles run as one `torch.func.vmap` call (inner gradients
by `torch.func.grad`) or, as a fallback, in a Python loop (inner gradients by
`torch.autograd.grad`); both paths compute the same numbers. No autograd graph is built: these
estimators need only the losses.

A batch of particle states is an ordinary pytree (params, optimizer state) whose tensors carry
a leading particle dimension; its non-tensor leaves (an optimizer's integer step count) are the
same for every particle and stay plain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._checks import check_count, check_number, detach_tree
from ..meta_params import MetaParameters
from ..problem import InnerProblem
from .base import InnerRun, NonFiniteLossError, inner_steps, outer_loss
from .session import TruncatedEstimator

__all__ = [
    "ParticleEstimator",
    "Particles",
    "antithetic_values",
    "check_vectorize",
    "index_particles",
    "run_particles",
    "sample_noise",
]

logger = logging.getLogger("metagrad.hypergrad")


def check_vectorize(value: Any) -> Any:
    """The `vectorize` option: True, False or "auto"."""
    if not (value is True or value is False or value == "auto"):
        raise ValueError(f"Invalid vectorize: {value!r} (expected True, False or 'auto')")
    return value


@dataclass(frozen=True)
class ParticleEstimator(TruncatedEstimator):
    """The options shared by the particle estimators (`TruncatedES`, `PES`).

    Args:
        particles: N, the number of antithetic pairs (>= 1).
        sigma: the standard deviation of the perturbations of the stored values (> 0): for a
            log-stored learning rate, 0.1 perturbs it by about 10%.
        vectorize: True (`torch.func.vmap` over the particles), False (a Python loop) or
            "auto" (vmap, falling back to the loop with one logged warning where the problem
            cannot be vmapped).
    """

    particles: int = 8
    sigma: float = 0.1
    vectorize: bool | str = "auto"

    def __post_init__(self) -> None:
        check_count(self.particles, "particles")
        check_number(self.sigma, "sigma", low=0.0, low_open=True)
        check_vectorize(self.vectorize)


@dataclass
class Particles:
    """The outcome of one truncation for every particle (leading dimension P).

    Attributes:
        state: (params, optimizer state) after the truncation, tensors batched on dim 0.
        inner_loss: the last inner loss of each particle, shape [P].
        outer_loss: the outer loss at the end of the truncation, shape [P].
    """

    state: tuple[Any, Any]
    inner_loss: Tensor
    outer_loss: Tensor


def sample_noise(
    meta: MetaParameters, pairs: int, sigma: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Gaussian perturbations N(0, sigma^2) of every stored meta-parameter, [pairs, *shape].

    Drawn on the CPU from `generator` (so a seeded session gives the same noise on any
    device), in each meta-parameter's dtype, then moved to its device.
    """
    named = dict(meta.named_parameters())
    if not named:
        raise ValueError("evolution strategies need at least one meta-parameter to perturb")
    noise = {}
    for name, p in named.items():
        eps = torch.randn((pairs, *p.shape), generator=generator, dtype=p.dtype)
        noise[name] = (eps * sigma).to(p.device)
    return noise


def antithetic_values(meta: MetaParameters, noise: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stored values of the 2N + 1 particles: [theta, theta + eps_1..N, theta - eps_1..N]."""
    values = {}
    for name, p in meta.named_parameters():
        raw = p.detach()
        eps = noise[name]
        values[name] = torch.cat([raw.unsqueeze(0), raw + eps, raw - eps])
    return values


def index_particles(tree: Any, i: int) -> Any:
    """Particle `i` of a batch of particle states (non-tensor leaves are shared)."""
    return tree_map(lambda x: x[i] if isinstance(x, Tensor) else x, tree)


def _stack(trees: list[Any]) -> Any:
    """Stack per-particle pytrees of one structure into one batched pytree."""
    flat = [tree_flatten(t) for t in trees]
    spec = flat[0][1]
    for _, other in flat[1:]:
        if other != spec:
            raise RuntimeError("particles ended the truncation with different state structures")
    leaves = []
    for column in zip(*(f[0] for f in flat), strict=True):
        first = column[0]
        leaves.append(torch.stack(column) if isinstance(first, Tensor) else first)
    return tree_unflatten(leaves, spec)


def _one_particle(
    problem: InnerProblem,
    meta: MetaParameters,
    start: tuple[Any, Any] | None,
    steps: range,
    functional: bool,
) -> tuple[tuple[Any, Any], Tensor | None, Tensor]:
    """One particle's truncation with the meta-parameters as currently substituted."""
    if start is None:  # the start of the inner run: this particle's own initial state
        params = detach_tree(problem.initial_params(meta))
        state = detach_tree(problem.optimizer(meta, 0).init(params))
    else:
        params, state = start
    run = inner_steps(
        problem,
        meta,
        InnerRun(params, state),
        steps,
        create_graph=False,
        track=False,
        functional=functional,
    )
    loss = outer_loss(problem, meta, run.params)
    return (run.params, run.state), run.last_loss, loss


def _call(
    meta: MetaParameters,
    values: dict[str, Tensor],
    problem: InnerProblem,
    start: tuple[Any, Any] | None,
    steps: range,
    functional: bool,
) -> Any:
    """One particle's truncation with its stored meta values substituted into `meta`."""

    def body(m: MetaParameters) -> Any:
        return _one_particle(problem, m, start, steps, functional)

    return torch.func.functional_call(meta, values, (body,))


def _vmapped(
    problem: InnerProblem,
    meta: MetaParameters,
    values: dict[str, Tensor],
    start: tuple[Any, Any] | None,
    batched: bool,
    steps: range,
) -> Any:
    static: dict[str, Any] = {}

    def flat(vals: dict[str, Tensor], begin: Any) -> list[Tensor]:
        out = _call(meta, vals, problem, begin, steps, True)
        leaves, spec = tree_flatten(out)
        static["spec"] = spec
        static["leaves"] = [None if isinstance(x, Tensor) else x for x in leaves]
        return [x for x in leaves if isinstance(x, Tensor)]

    if start is None or not batched:
        start_dims: Any = None
    else:
        start_dims = tree_map(lambda x: 0 if isinstance(x, Tensor) else None, start)
    tensors = torch.func.vmap(flat, in_dims=(0, start_dims), randomness="different")(values, start)
    it = iter(tensors)
    leaves = [next(it) if x is None else x for x in static["leaves"]]
    return tree_unflatten(leaves, static["spec"])


def _looped(
    problem: InnerProblem,
    meta: MetaParameters,
    values: dict[str, Tensor],
    start: tuple[Any, Any] | None,
    batched: bool,
    steps: range,
    count: int,
) -> Any:
    outs = []
    for i in range(count):
        vals = {n: v[i] for n, v in values.items()}
        begin = index_particles(start, i) if (start is not None and batched) else start
        outs.append(_call(meta, vals, problem, begin, steps, False))
    return _stack(outs)


def run_particles(
    problem: InnerProblem,
    meta: MetaParameters,
    values: dict[str, Tensor],
    start: tuple[Any, Any] | None,
    steps: range,
    *,
    batched: bool,
    vectorize: bool | str,
    context: dict[str, Any],
) -> Particles:
    """Run inner steps `steps` for every particle and evaluate its outer loss.

    Args:
        values: stored meta-parameter values per particle, each [P, *shape].
        start: None at the start of the inner run (each particle builds its initial params
            and optimizer state from its own meta values), else (params, optimizer state):
            shared by every particle (`batched=False`) or one per particle (`batched=True`,
            tensors [P, ...]).
        vectorize: True (`torch.func.vmap`), False (a Python loop) or "auto" (vmap, falling
            back to the loop for good, with one logged warning, where vmap cannot run the
            problem).
        context: the session's mutable settings; "auto" records its fallback there.

    Raises:
        NonFiniteLossError: an inner loss became NaN or infinite.
    """
    count = next(iter(values.values())).shape[0] if values else 1
    use_vmap = vectorize is True or (vectorize == "auto" and not context.get("loop", False))
    out = None
    if use_vmap:
        try:
            out = _vmapped(problem, meta, values, start, batched, steps)
        except (NonFiniteLossError, ValueError):
            raise
        except RuntimeError as err:
            if vectorize is True:
                raise
            context["loop"] = True
            reason = f"{type(err).__name__}: {err}".split("\n")[0]
            logger.warning(
                "PES/ES: running the particles one at a time instead of with torch.func.vmap "
                "(same numbers, slower), because %s. Pass vectorize=False to choose this "
                "explicitly.",
                reason,
            )
    if out is None:
        out = _looped(problem, meta, values, start, batched, steps, count)
    state, inner, outer = out
    bad = ~torch.isfinite(inner)
    if bool(bad.any()):
        raise NonFiniteLossError(
            f"inner loss is non-finite for {int(bad.sum())} of {count} particles in the "
            f"truncation of inner steps {steps.start}..{steps.stop - 1} (of {problem.steps}); "
            "lower sigma or the learning rate"
        )
    return Particles(state, inner.detach(), outer.detach())


def pair_estimate(
    noise: dict[str, Tensor], outer: Tensor, sigma: float
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float]]:
    """The antithetic estimate from the outer losses [center, +pairs, -pairs].

    Pair i contributes `noise_i * (L(+i) - L(-i)) / (2 sigma^2)`; the estimate is their mean.

    Returns:
        the estimate, the per-pair samples [pairs, *shape] and metrics (`es/loss_mean`, the
        mean outer loss of the perturbed particles; `es/delta_abs`, the mean |L(+) - L(-)|;
        `hypergrad/stderr`, the norm of the estimate's standard error over the pairs).
    """
    pairs = (outer.shape[0] - 1) // 2
    delta = outer[1 : pairs + 1] - outer[pairs + 1 :]
    scale = delta / (2 * sigma**2)
    samples = {
        n: xi * scale.reshape(pairs, *([1] * (xi.dim() - 1))).to(xi.dtype)
        for n, xi in noise.items()
    }
    grads = {n: s.mean(0) for n, s in samples.items()}
    metrics = {
        "es/loss_mean": float(outer[1:].mean()),
        "es/delta_abs": float(delta.abs().mean()),
    }
    if pairs > 1:
        var = sum(float(s.var(0).sum()) for s in samples.values())
        metrics["hypergrad/stderr"] = (var / pairs) ** 0.5
    return grads, samples, metrics
