"""What every hypergradient method shares: the result type, the inner loop and its checks.

An estimator is a small frozen dataclass (its fields are its options) deriving from `Estimator`,
which times the call and packages the result; the estimator implements `estimate`. All of them
run the inner loop through one function, `inner_steps`, which the training application also
uses for its evaluation runs.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from .._checks import Params, detach_tree
from ..functional import inner_grads
from ..meta_params import MetaParameters
from ..problem import InnerProblem

__all__ = [
    "Estimate",
    "Estimator",
    "HypergradMethod",
    "HypergradResult",
    "InnerRun",
    "NonFiniteLossError",
    "as_leaves",
    "detach_tree",
    "inner_steps",
    "meta_gradients",
    "package",
    "start",
    "zero_unused",
]


class NonFiniteLossError(FloatingPointError):
    """The inner loss became NaN or infinite; the message says at which inner step."""


@dataclass
class HypergradResult:
    """What a hypergradient method returns.

    Attributes:
        grads: meta-gradients keyed like `dict(meta.named_parameters())`.
        outer_loss: the outer (validation) loss after the inner run, detached.
        params: the final inner params, detached.
        metrics: scalar metrics (`outer/loss`, `inner/loss`, `hypergrad/norm`, ...).
    """

    grads: dict[str, Tensor]
    outer_loss: Tensor
    params: Params
    metrics: dict[str, float] = field(default_factory=dict)

    def apply(self, meta: MetaParameters) -> None:
        """Accumulate the meta-gradients into `.grad`, ready for `outer_optimizer.step()`."""
        for name, p in meta.named_parameters():
            g = self.grads[name].to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad + g

    def is_finite(self) -> bool:
        """Whether every meta-gradient is finite."""
        return all(bool(torch.isfinite(g).all()) for g in self.grads.values())


class HypergradMethod(Protocol):
    """A hypergradient estimator: runs the inner problem, returns meta-gradients."""

    def __call__(self, problem: InnerProblem, meta: MetaParameters) -> HypergradResult: ...


@dataclass
class InnerRun:
    """The running inner loop: current params and optimizer state, last inner loss."""

    params: Params
    state: Any
    last_loss: Tensor | None = None


class Estimate(NamedTuple):
    """What `Estimator.estimate` hands back to be packaged into a `HypergradResult`."""

    grads: Mapping[str, Tensor | None]
    outer_loss: Tensor
    run: InnerRun
    metrics: dict[str, float]


@dataclass(frozen=True)
class Estimator:
    """Base of the estimators: `estimator(problem, meta) -> HypergradResult`.

    Subclasses are frozen dataclasses whose fields are their options (validated in
    `__post_init__`) and implement `estimate`. This class times the call, turns missing
    gradients into zeros (with one warning naming them) and adds the standard metrics.
    """

    def estimate(self, problem: InnerProblem, meta: MetaParameters) -> Estimate:
        """Run the inner problem and compute the meta-gradients (None where unused)."""
        raise NotImplementedError

    def live_steps(self, steps: int) -> int:
        """How many inner steps' graphs this estimator holds at once for a horizon of `steps`
        (a saved boundary state counts as one): its memory scaling, for resource estimates."""
        return steps

    def __call__(self, problem: InnerProblem, meta: MetaParameters) -> HypergradResult:
        started = time.perf_counter()
        return package(self.estimate(problem, meta), meta, started)


def package(
    estimate: Estimate,
    meta: MetaParameters,
    started: float,
    extra: Mapping[str, float] | None = None,
    result_type: type[HypergradResult] = HypergradResult,
    **fields: Any,
) -> Any:
    """An estimate as a `result_type` (detached), with the standard metrics.

    Missing gradients become zeros (with one warning naming them); the metrics are
    `outer/loss`, `hypergrad/norm`, `hypergrad/seconds`, `inner/loss`, then `extra`, then the
    estimator's own. `fields` are further fields of `result_type`.
    """
    found, loss, run, metrics = estimate
    grads = zero_unused(found, dict(meta.named_parameters()))
    norm = math.sqrt(sum(float(g.detach().pow(2).sum()) for g in grads.values()))
    base = {
        "outer/loss": float(loss.detach()),
        "hypergrad/norm": norm,
        "hypergrad/seconds": time.perf_counter() - started,
    }
    if run.last_loss is not None:
        base["inner/loss"] = float(run.last_loss.detach())
    base.update(extra or {})
    base.update(metrics)
    return result_type(
        grads={n: g.detach() for n, g in grads.items()},
        outer_loss=loss.detach(),
        params={n: p.detach() for n, p in run.params.items()},
        metrics=base,
        **fields,
    )


def _check_finite(loss: Tensor, step: int, steps: int) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        return  # inner_grads rejects it with a clear message
    value = loss.detach().item()  # one sync, no extra op: this runs at every inner step
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"inner loss is {value} at inner step {step} (of {steps}); "
            "lower the learning rate or check the data"
        )


def as_leaves(params: Params) -> Params:
    """Params that do not require grad become fresh leaves that do (inner gradients need it)."""
    return {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in params.items()}


def start(problem: InnerProblem, meta: MetaParameters, *, track: bool = True) -> InnerRun:
    """Initial params and optimizer state (built by the step-0 optimizer).

    Args:
        track: keep the graph from the meta-parameters into the initial params and state;
            False detaches them (for methods that see only part of the run).
    """
    params = problem.initial_params(meta)
    if not track:
        params = detach_tree(params)
    params = as_leaves(params)
    state = problem.optimizer(meta, 0).init(params)
    if not track:
        state = detach_tree(state)
    return InnerRun(params, state)


def inner_steps(
    problem: InnerProblem,
    meta: MetaParameters,
    run: InnerRun,
    steps: Iterable[int],
    *,
    create_graph: bool = True,
    track: bool = True,
    functional: bool = False,
) -> InnerRun:
    """Run inner steps `steps` (indices into the horizon) from `run`: the one inner loop.

    Args:
        create_graph: differentiate through the inner gradients (second-order terms).
        track: keep the graph across steps; False runs every step from detached params and
            state and takes the optimizer step without graph (the untracked prefix of
            truncated methods, the forward pass of checkpointed ones, evaluation runs), so
            memory stays flat. Untracked steps are outside any differentiated path by design.
        functional: take the inner gradients with `torch.func.grad` instead of
            `torch.autograd.grad`, so that the loop runs under `torch.func.vmap` (the
            particles of `PES`); params need not require grad. The per-step finite check
            (one `.item()`, which vmap cannot run) is then left to the caller, who checks the
            returned `last_loss`.

    Raises:
        NonFiniteLossError: the inner loss is NaN or infinite; the message names the step.
    """
    params, state, loss = run.params, run.state, run.last_loss
    if not track:
        state = detach_tree(state)
    # Meta values read at every step are computed (and later differentiated) once per call.
    reuse = getattr(meta, "reuse_values", contextlib.nullcontext)
    with reuse():
        for t in steps:
            if functional:
                if not track:
                    params = detach_tree(params)
                second_order = track and create_graph
                at = params if second_order else detach_tree(params)
                grads, loss = _functional_grads(problem, meta, at, problem.batch(t))
                if not second_order:
                    grads = detach_tree(grads)
            else:
                if not track:
                    params = as_leaves(detach_tree(params))
                loss = problem.inner_loss(params, meta, problem.batch(t))
                _check_finite(loss, t, problem.steps)
                grads = inner_grads(loss, params, create_graph=create_graph and track)
            if track:
                params, state = problem.optimizer(meta, t).step(params, grads, state)
            else:
                # Cut from the graph anyway: build none (cheaper than building and detaching).
                with torch.no_grad():
                    params, state = problem.optimizer(meta, t).step(params, grads, state)
    if not track:
        params = detach_tree(params)
    return InnerRun(params, state, loss)


def _functional_grads(
    problem: InnerProblem, meta: MetaParameters, params: Params, batch: Any
) -> tuple[Params, Tensor]:
    """The inner gradients and loss by `torch.func.grad` (works under `torch.func.vmap`)."""

    def loss_of(p: Params) -> tuple[Tensor, Tensor]:
        loss = problem.inner_loss(p, meta, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss must be a scalar tensor, got {shape}")
        return loss, loss

    return torch.func.grad(loss_of, has_aux=True)(dict(params))


def outer_loss(problem: InnerProblem, meta: MetaParameters, params: Params) -> Tensor:
    """The outer loss at `params`, checked to be a scalar."""
    loss = problem.outer_loss(params, meta, problem.outer_batch)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"outer_loss must return a scalar tensor, got {shape}")
    return loss


def meta_gradients(
    loss: Tensor, meta: MetaParameters, *, retain_graph: bool = False
) -> Mapping[str, Tensor | None]:
    """Gradient of `loss` for every meta-parameter (None where the loss does not use it)."""
    named = dict(meta.named_parameters())
    grads = torch.autograd.grad(
        loss, list(named.values()), allow_unused=True, retain_graph=retain_graph
    )
    return dict(zip(named, grads, strict=True))


def zero_unused(
    grads: Mapping[str, Tensor | None], named: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Replace missing gradients by zeros and warn once, naming the meta-parameters."""
    unused = [n for n, g in grads.items() if g is None]
    if unused:
        warnings.warn(
            f"meta-parameters {unused} do not affect the outer loss through the steps this "
            "method differentiates (a learned init under Truncated or Implicit, for instance); "
            "their gradient is zero",
            stacklevel=4,
        )
    return {n: torch.zeros_like(named[n]) if g is None else g for n, g in grads.items()}
