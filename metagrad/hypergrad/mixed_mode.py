"""Exact reverse mode with per-step second-order terms and segment checkpointing (MixFlow-MG)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._checks import Params, check_choice, check_count, detach_tree
from ..functional import inner_grads
from ..meta_params import MetaParameters
from ..problem import InnerProblem
from ._sweep import HVP_MODES, ValueGrads, add_into, hessian_vector, hyper_tensors, nbytes
from .base import (
    Estimate,
    Estimator,
    InnerRun,
    _check_finite,
    as_leaves,
    inner_steps,
    outer_loss,
    start,
)

__all__ = ["MixedMode"]


class _Saved(NamedTuple):
    """The inputs of one inner step, detached: params, optimizer state and (maybe) gradient."""

    params: Params
    state: Any
    grads: Params | None


def _leaves(tree: Any) -> tuple[Any, list[Tensor]]:
    """`tree` with every floating-point tensor replaced by a fresh leaf requiring grad."""
    flat, spec = tree_flatten(tree)
    flat = [
        x.detach().requires_grad_() if isinstance(x, Tensor) and x.is_floating_point() else x
        for x in flat
    ]
    return tree_unflatten(flat, spec), [
        x for x in flat if isinstance(x, Tensor) and x.requires_grad
    ]


def _held(boundaries: list[InnerRun | None]) -> int:
    return nbytes([(b.params, b.state) for b in boundaries if b is not None])


def _float_tensors(tree: Any) -> list[Tensor]:
    flat, _ = tree_flatten(tree)
    return [x for x in flat if isinstance(x, Tensor) and x.is_floating_point()]


@dataclass(frozen=True)
class MixedMode(Estimator):
    """Exact hypergradients by a step-by-step reverse sweep over checkpointed segments.

    Follows Kemaev et al. 2025 ("Scalable meta-learning via mixed-mode differentiation",
    MixFlow-MG). Reverse mode through the inner loop needs, at every step, the vector-Jacobian
    product of the update `(w, s) -> opt.step(w, grad L(w), s)`. Its first part, through the
    optimizer's element-wise update rule, is cheap; its second part sends the adjoint `g_bar`
    of the inner gradient through the gradient itself, `H g_bar` (and, for meta-parameters of
    the inner loss, their mixed second derivative). Instead of keeping every step's
    double-backward graph, this estimator computes that product from the step's saved inputs
    when the sweep reaches the step: by default as a forward-mode derivative of the gradient
    (`d/de grad L(w + e g_bar) = H g_bar`, using the symmetry of `H`), so at most one step's
    graph is alive at any time.

    A forward pass without graph keeps the params and optimizer state at the start of every
    segment of `segment` steps. The sweep then takes the segments from last to first: it
    reruns the segment from its boundary without graph, saving each step's params, state and
    gradient, and walks those steps backwards. The last segment's inputs are saved by the
    forward pass itself.

    Bias: none; the same gradient as `Unrolled` up to floating-point rounding.
    Cost: two inner runs without graph (the forward pass and the reruns) plus, per step, one
    Hessian-vector product and a vector-Jacobian product of the update rule. On CPU with
    PyTorch 2.x, forward-mode AD through a gradient costs about twice a double backward
    (`benchmarks/bench_long_horizon.py`), so `hvp="reverse"` is the faster choice there.
    Memory: O(T / segment) boundaries plus `segment` saved steps, each only params, state and
    gradient (no activations and no graph): with the default segment ~sqrt(T), O(sqrt(T))
    copies of the params.

    Args:
        segment: inner steps per segment (>= 1); None picks round(sqrt(T)). `segment >= T`
            saves every step's inputs in one forward pass (no rerun).
        hvp: how each step's Hessian-vector product is formed: "forward" (forward over
            reverse, as in MixFlow-MG) or "reverse" (one step's reverse over reverse; the
            gradient it computes also serves the update rule's product, so no gradient is
            saved per step).
    """

    segment: int | None = None
    hvp: str = "forward"

    def __post_init__(self) -> None:
        check_count(self.segment, "segment", allow_none=True)
        check_choice(self.hvp, "hvp", HVP_MODES)

    def segment_for(self, steps: int) -> int:
        """The segment length used for a horizon of `steps` inner steps."""
        if self.segment is None:
            return max(1, round(math.sqrt(steps)))
        return min(self.segment, steps)

    def estimate(self, problem: InnerProblem, meta: MetaParameters) -> Estimate:
        steps = problem.steps
        segment = self.segment_for(steps)
        starts = list(range(0, steps, segment))
        named = dict(meta.named_parameters())
        meta_tensors = list(named.values())
        keep_grads = self.hvp == "forward"

        # Forward pass without graph: boundaries of all segments but the last, whose steps'
        # inputs are saved directly.
        initial = start(problem, meta)  # keeps the graph from meta into the initial state
        run = InnerRun(*detach_tree((initial.params, initial.state)))
        boundaries: list[InnerRun | None] = []
        for b in starts[:-1]:
            boundaries.append(run)
            run = inner_steps(
                problem, meta, run, range(b, b + segment), create_graph=False, track=False
            )
        last = starts[-1]
        saved, final = _rerun(problem, meta, run, range(last, steps), keep_grads)
        stored = _held(boundaries) + nbytes(saved)

        # The outer loss and its gradient with respect to the final params.
        params_T = as_leaves(detach_tree(final.params))
        loss = outer_loss(problem, meta, params_T)
        names = list(params_T)
        found = torch.autograd.grad(
            loss, [params_T[n] for n in names] + meta_tensors, allow_unused=True
        )
        totals = ValueGrads(meta_tensors)
        totals.add_meta(found[len(names) :])
        w_bar: dict[str, Tensor | None] = dict(zip(names, found[: len(names)], strict=True))
        s_bar: list[Tensor | None] | None = None  # the final state does not reach the loss

        # Sweep the segments backwards, each step with one VJP of the update rule and one
        # Hessian-vector product. Hyperparameter values are computed once for the sweep.
        with meta.reuse_values():
            for i in reversed(range(len(starts))):
                b, end = starts[i], min(starts[i] + segment, steps)
                if i < len(starts) - 1:
                    saved, _ = _rerun(problem, meta, boundaries[i], range(b, end), keep_grads)
                    boundaries[i] = None
                    stored = max(stored, _held(boundaries) + nbytes(saved))
                for t in reversed(range(b, end)):
                    w_bar, s_bar = self._step(problem, meta, t, saved[t - b], w_bar, s_bar, totals)
                saved = []
                totals.flush()

            # Into the initial params and state as built from the meta-parameters.
            outputs = list(initial.params.values()) + _float_tensors(initial.state)
            state_adjoints = s_bar if s_bar is not None else [None] * (len(outputs) - len(w_bar))
            adjoints = [w_bar[n] for n in initial.params] + list(state_adjoints)
            pairs = [
                (o, a)
                for o, a in zip(outputs, adjoints, strict=True)
                if a is not None and o.requires_grad
            ]
            if pairs and meta_tensors:
                totals.add_meta(
                    torch.autograd.grad(
                        [o for o, _ in pairs],
                        meta_tensors,
                        [a for _, a in pairs],
                        allow_unused=True,
                    )
                )
            grads = dict(zip(named, totals.result(), strict=True))
        metrics = {"hypergrad/segment": segment, "hypergrad/stored_bytes": float(stored)}
        return Estimate(grads, loss, final, metrics)

    def _step(
        self,
        problem: InnerProblem,
        meta: MetaParameters,
        t: int,
        saved: _Saved,
        w_bar: dict[str, Tensor | None],
        s_bar: list[Tensor | None] | None,
        totals: ValueGrads,
    ) -> tuple[dict[str, Tensor | None], list[Tensor | None]]:
        """One step backwards: adjoints of the step's params and state from those after it."""
        found: dict[str, Any] = {}

        def through_update(grads: Params) -> dict[str, Tensor | None]:
            direct, state_bar, g_bar = _update_vjp(
                problem, meta, t, saved.params, saved.state, grads, w_bar, s_bar, totals
            )
            found.update(direct=direct, state_bar=state_bar)
            return g_bar

        if self.hvp == "forward":
            g_bar = through_update(saved.grads)
            hv, meta_hv = hessian_vector(
                problem, meta, saved.params, t, g_bar, totals.meta_tensors, mode="forward"
            )
        else:
            hv, meta_hv = hessian_vector(
                problem,
                meta,
                saved.params,
                t,
                {},
                totals.meta_tensors,
                mode="reverse",
                on_gradient=through_update,
            )
        totals.add_meta(meta_hv)
        direct = found["direct"]
        return {n: add_into(direct[n], hv.get(n)) for n in direct}, found["state_bar"]


def _update_vjp(
    problem: InnerProblem,
    meta: MetaParameters,
    t: int,
    params: Params,
    state: Any,
    grads: Params,
    w_bar: dict[str, Tensor | None],
    s_bar: list[Tensor | None] | None,
    totals: ValueGrads,
) -> tuple[dict[str, Tensor | None], list[Tensor | None], dict[str, Tensor | None]]:
    """The vector-Jacobian product of step `t`'s element-wise update rule.

    Returns the adjoints of the step's params (the direct part, without the Hessian term), of
    its optimizer state (float tensors in flattening order) and of its inner gradient; the
    hyperparameter values' gradients go into `totals`.
    """
    names = list(params)
    params, param_leaves = _leaves(params)
    state, state_leaves = _leaves(state)
    grads, grad_leaves = _leaves(grads)
    optimizer = problem.optimizer(meta, t)
    hyper = hyper_tensors(optimizer)
    new_params, new_state = optimizer.step(params, grads, state)
    new_state_tensors = _float_tensors(new_state)
    state_adjoints = s_bar if s_bar is not None else [None] * len(new_state_tensors)
    if len(state_adjoints) != len(new_state_tensors):
        raise RuntimeError(
            f"the optimizer state changed structure when inner step {t} was repeated"
        )
    outputs = [new_params[n] for n in names] + new_state_tensors
    adjoints = [w_bar[n] for n in names] + list(state_adjoints)
    pairs = [
        (o, a) for o, a in zip(outputs, adjoints, strict=True) if a is not None and o.requires_grad
    ]
    inputs = param_leaves + state_leaves + grad_leaves + hyper
    if pairs:
        found = torch.autograd.grad(
            [o for o, _ in pairs], inputs, [a for _, a in pairs], allow_unused=True
        )
    else:
        found = (None,) * len(inputs)
    k, m, r = len(param_leaves), len(state_leaves), len(grad_leaves)
    for x, g in zip(hyper, found[k + m + r :], strict=True):
        totals.add(x, g)
    return (
        dict(zip(names, found[:k], strict=True)),
        list(found[k : k + m]),
        dict(zip(names, found[k + m : k + m + r], strict=True)),
    )


def _rerun(
    problem: InnerProblem,
    meta: MetaParameters,
    run: InnerRun,
    steps: range,
    keep_grads: bool,
) -> tuple[list[_Saved], InnerRun]:
    """Run `steps` without graph from `run`, saving each step's inputs (detached).

    The same computation as `inner_steps(..., create_graph=False, track=False)`, step for step.
    """
    saved: list[_Saved] = []
    params, state, loss = run.params, detach_tree(run.state), run.last_loss
    with meta.reuse_values():
        for t in steps:
            params = as_leaves(detach_tree(params))
            loss = problem.inner_loss(params, meta, problem.batch(t))
            _check_finite(loss, t, problem.steps)
            grads = inner_grads(loss, params, create_graph=False)
            saved.append(
                _Saved(detach_tree(params), state, detach_tree(grads) if keep_grads else None)
            )
            with torch.no_grad():
                params, state = problem.optimizer(meta, t).step(params, grads, state)
    return saved, InnerRun(detach_tree(params), state, loss)
