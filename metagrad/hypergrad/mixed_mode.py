"""Exact reverse mode with per-step second-order terms and segment checkpointing (MixFlow-MG)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._checks import check_choice, check_count, detach_tree
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
from .checkpointed import segment_length

__all__ = ["MixedMode"]


class _Saved(NamedTuple):
    """One inner step, saved for the sweep: its inputs (leaves), its hyperparameter values and
    the outputs of its update (params, then float state tensors), with the update's graph."""

    names: tuple[str, ...]
    params: list[Tensor]
    state: list[Tensor]
    grads: list[Tensor]
    hyper: list[Tensor]
    outputs: list[Tensor]

    def nbytes(self) -> int:
        """Bytes this step adds: its gradient and its outputs. Its params and state share
        storage with the previous step's outputs (or the boundary), and the update's graph
        saves little besides them."""
        return nbytes([self.grads, self.outputs])


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


def _saved_bytes(saved: list[_Saved]) -> int:
    """Bytes held by a rerun segment: the first step's inputs and every step's additions."""
    if not saved:
        return 0
    return nbytes([saved[0].params, saved[0].state]) + sum(s.nbytes() for s in saved)


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
    of the inner gradient through the gradient itself: `H g_bar` (and, for meta-parameters of
    the inner loss, their mixed second derivative). Instead of keeping every step's
    double-backward graph until the end, this estimator forms that product from the step's
    saved inputs when the sweep reaches the step, so at most one step's second-order graph
    exists at any time. `hvp="forward"` forms it as MixFlow-MG does, by forward-mode
    differentiation of the gradient (`d/de grad L(w + e g_bar) = H g_bar`, by the symmetry of
    `H`; `torch.autograd.forward_ad` over `torch.autograd.grad`); `hvp="reverse"` (the
    default) differentiates `grad L . g_bar` again, which gives the same numbers and is
    faster in PyTorch on CPU (forward-mode AD through the gradient costs about twice a double
    backward there, `torch.func.jvp` three times: see `experiments/long_horizon/`).

    A forward pass without graph keeps the params and optimizer state at the start of every
    segment of `segment` steps. The sweep then takes the segments from last to first: it
    reruns the segment from its boundary, saving each step's params, state and gradient with
    the small graph of its update alone (no activations, no second-order graph), and walks
    those steps backwards. The last segment is run once, with the forward pass.

    Bias: none; the same gradient as `Unrolled` up to floating-point rounding.
    Cost: two inner runs without second-order graph (the forward pass and the reruns), plus
    one Hessian-vector product and one vector-Jacobian product of the update rule per step.
    Memory: O(T / segment) boundaries plus `segment` saved steps of a few params-sized
    tensors each; with the default segment ~sqrt(T), O(sqrt(T)) copies of the params,
    independent of the batch size and the activations.

    Args:
        segment: inner steps per segment (>= 1); None picks round(sqrt(T)). `segment >= T`
            saves every step in one pass (no rerun).
        hvp: "reverse" (reverse over reverse, one step at a time) or "forward" (forward over
            reverse, MixFlow-MG's formulation).
    """

    segment: int | None = None
    hvp: str = "reverse"

    def __post_init__(self) -> None:
        check_count(self.segment, "segment", allow_none=True)
        check_choice(self.hvp, "hvp", HVP_MODES)

    def segment_for(self, steps: int) -> int:
        """The segment length used for a horizon of `steps` inner steps."""
        return segment_length(self.segment, steps)

    def live_steps(self, steps: int) -> int:
        # Boundaries and saved steps (each smaller than a step's graph: counted as one) and the
        # one step whose second-order graph exists during the sweep.
        segment = self.segment_for(steps)
        return segment + -(-steps // segment) + 1

    def estimate(self, problem: InnerProblem, meta: MetaParameters) -> Estimate:
        steps = problem.steps
        segment = self.segment_for(steps)
        starts = list(range(0, steps, segment))
        named = dict(meta.named_parameters())
        meta_tensors: list[Tensor] = list(named.values())

        # Forward pass without graph: boundaries of all segments but the last, which is
        # rerun (its steps saved) at once.
        initial = start(problem, meta)  # keeps the graph from meta into the initial state
        run = InnerRun(*detach_tree((initial.params, initial.state)))
        boundaries: list[InnerRun | None] = []
        for b in starts[:-1]:
            boundaries.append(run)
            run = inner_steps(
                problem, meta, run, range(b, b + segment), create_graph=False, track=False
            )
        saved, final = _rerun(problem, meta, run, range(starts[-1], steps))
        stored = _held(boundaries) + _saved_bytes(saved)

        # The outer loss and its gradient with respect to the final params.
        params_T = as_leaves(detach_tree(final.params))
        loss = outer_loss(problem, meta, params_T)
        names = list(params_T)
        found = torch.autograd.grad(
            loss, [params_T[n] for n in names] + meta_tensors, allow_unused=True
        )
        totals = ValueGrads(meta_tensors)
        totals.add_meta(found[len(names) :])
        w_bar: list[Tensor | None] = list(found[: len(names)])
        s_bar: list[Tensor | None] | None = None  # the final state does not reach the loss

        # Sweep the segments backwards: rerun a segment, then walk its steps back, each with
        # one VJP of its (saved) update and one Hessian-vector product.
        for i in reversed(range(len(starts))):
            b, end = starts[i], min(starts[i] + segment, steps)
            if i < len(starts) - 1:
                boundary = boundaries[i]
                if boundary is None:
                    raise RuntimeError(f"segment {i} was swept twice")
                saved, _ = _rerun(problem, meta, boundary, range(b, end))
                boundaries[i] = None
                stored = max(stored, _held(boundaries) + _saved_bytes(saved))
            for t in reversed(range(b, end)):
                w_bar, s_bar = self._step(problem, meta, t, saved.pop(), w_bar, s_bar, totals)
            totals.flush()

        # Into the initial params and state as built from the meta-parameters.
        outputs = list(initial.params.values()) + _float_tensors(initial.state)
        state_adjoints = s_bar if s_bar is not None else [None] * (len(outputs) - len(w_bar))
        pairs = [
            (o, a)
            for o, a in zip(outputs, w_bar + list(state_adjoints), strict=True)
            if a is not None and o.requires_grad
        ]
        if pairs and meta_tensors:
            totals.add_meta(
                torch.autograd.grad(
                    [o for o, _ in pairs], meta_tensors, [a for _, a in pairs], allow_unused=True
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
        w_bar: list[Tensor | None],
        s_bar: list[Tensor | None] | None,
        totals: ValueGrads,
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """One step backwards: adjoints of the step's params and state from those after it."""
        outputs = saved.outputs
        adjoints = w_bar + (s_bar if s_bar is not None else [None] * (len(outputs) - len(w_bar)))
        if len(adjoints) != len(outputs):
            raise RuntimeError(
                f"the optimizer state changed structure when inner step {t} was repeated"
            )
        pairs = [
            (o, a)
            for o, a in zip(outputs, adjoints, strict=True)
            if a is not None and o.requires_grad
        ]
        inputs = saved.params + saved.state + saved.grads + saved.hyper
        found: Sequence[Tensor | None]
        if pairs:  # the vector-Jacobian product of the element-wise update rule
            found = torch.autograd.grad(
                [o for o, _ in pairs], inputs, [a for _, a in pairs], allow_unused=True
            )
        else:
            found = (None,) * len(inputs)
        k, m, r = len(saved.params), len(saved.state), len(saved.grads)
        for x, g in zip(saved.hyper, found[k + m + r :], strict=True):
            totals.add(x, g)
        names = list(saved.names)
        g_bar = dict(zip(names, found[k + m : k + m + r], strict=True))
        params = dict(zip(names, saved.params, strict=True))
        hv, meta_hv = hessian_vector(
            problem, meta, params, t, g_bar, totals.meta_tensors, mode=self.hvp
        )
        totals.add_meta(meta_hv)
        w_prev = [add_into(d, hv.get(n)) for n, d in zip(names, found[:k], strict=True)]
        return w_prev, list(found[k : k + m])


def _rerun(
    problem: InnerProblem, meta: MetaParameters, run: InnerRun, steps: range
) -> tuple[list[_Saved], InnerRun]:
    """Run `steps` from `run`, saving each step's inputs and the graph of its update alone.

    The same values as `inner_steps(..., create_graph=False, track=False)`: the inner gradient
    is taken without graph; the optimizer step is taken with graph from fresh leaves (params,
    state, gradient) and the hyperparameter values, so that its vector-Jacobian product is
    one backward pass over a few element-wise operations later.
    """
    saved: list[_Saved] = []
    params, state, loss = run.params, run.state, run.last_loss
    with meta.reuse_values():
        for t in steps:
            params = as_leaves(detach_tree(params))
            loss = problem.inner_loss(params, meta, problem.batch(t))
            _check_finite(loss, t, problem.steps)
            grads = inner_grads(loss, params, create_graph=False)
            grads = {n: g.detach().requires_grad_() for n, g in grads.items()}
            state, state_leaves = _leaves(state)
            optimizer = problem.optimizer(meta, t)
            new_params, new_state = optimizer.step(params, grads, state)
            outputs = list(new_params.values()) + _float_tensors(new_state)
            saved.append(
                _Saved(
                    names=tuple(params),
                    params=list(params.values()),
                    state=state_leaves,
                    grads=list(grads.values()),
                    hyper=hyper_tensors(optimizer),
                    outputs=outputs,
                )
            )
            params, state = detach_tree((new_params, new_state))
    return saved, InnerRun(params, state, detach_tree(loss))
