"""Building blocks of the step-by-step reverse sweeps of `MixedMode` and `Reversible`.

Both estimators walk the inner loop backwards one step at a time, holding only the adjoint
(the outer loss's gradient with respect to the params and optimizer state after the step) and
the inputs of the current step. Each step contributes

* a vector-Jacobian product through the optimizer's update rule, which is element-wise and
  cheap: it gives the adjoint of the previous params and state, of the inner gradient (`g_bar`)
  and of the step's hyperparameter values;
* the second-order term: the inner gradient is a function of the params (and of loss
  meta-parameters), so `g_bar` reaches them through the Hessian, `H g_bar` and
  `d^2 L / d meta d w . g_bar`, one Hessian-vector product per step.

Hyperparameter values (a learning rate read from the meta-parameters, a schedule's value at a
step) are shared by many steps; their gradients are summed per value (`ValueGrads`) and pushed
into the stored meta-parameters in one backward pass per segment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._pytree import tree_flatten

from .._checks import Params
from ..functional import inner_grads
from ..meta_params import MetaParameters
from ..optim.base import Optimizer
from ..problem import InnerProblem
from .base import _check_finite

__all__ = [
    "HVP_MODES",
    "ValueGrads",
    "add_into",
    "fresh_values",
    "hessian_vector",
    "hyper_tensors",
    "nbytes",
]

HVP_MODES = ("forward", "reverse")


def nbytes(tree: Any) -> int:
    """Bytes held by the tensors of a pytree (params, optimizer state, lists of them)."""
    leaves, _ = tree_flatten(tree)
    return sum(x.numel() * x.element_size() for x in leaves if isinstance(x, Tensor))


def add_into(total: Tensor | None, extra: Tensor | None) -> Tensor | None:
    """`total + extra`, where None stands for zero."""
    if extra is None:
        return total
    return extra if total is None else total + extra


@contextlib.contextmanager
def fresh_values(meta: MetaParameters) -> Iterator[None]:
    """A block in which `meta.value` builds its values afresh (a new, empty cache).

    The loss of one step is evaluated here, so the graph from the meta-parameters into the
    loss belongs to that step alone and is freed with it.
    """
    reuse = getattr(meta, "reuse_values", contextlib.nullcontext)
    with reuse():
        yield


def hyper_tensors(optimizer: Optimizer) -> list[Tensor]:
    """The distinct tensors among an optimizer's hyperparameters that require grad.

    These are the only way the meta-parameters reach a `metagrad.optim` update rule: every
    hyperparameter is a declared field (a number, a tensor, a pair, or a mapping from parameter
    name to either).
    """
    leaves, _ = tree_flatten(list(optimizer.hyperparameters().values()))
    seen: dict[int, Tensor] = {}
    for x in leaves:
        if isinstance(x, Tensor) and x.requires_grad:
            seen.setdefault(id(x), x)
    return list(seen.values())


class ValueGrads:
    """Gradients of the outer loss with respect to the meta-parameters, gathered by the sweep.

    Gradients with respect to meta-parameters themselves are summed directly (`add_meta`).
    Gradients with respect to tensors computed from them (hyperparameter values) are summed per
    tensor (`add`) and pushed through the graph that computed them by `flush`, one backward
    pass for many steps. That graph is kept (`retain_graph`), because values cached by
    `MetaParameters.reuse_values` serve later steps too.

    Args:
        meta_tensors: the meta-parameters, in `meta.named_parameters()` order.
    """

    def __init__(self, meta_tensors: Sequence[Tensor]) -> None:
        self.meta_tensors = list(meta_tensors)
        self.totals: list[Tensor | None] = [None] * len(self.meta_tensors)
        self._pending: dict[int, tuple[Tensor, Tensor]] = {}

    def add(self, tensor: Tensor, grad: Tensor | None) -> None:
        """Add `grad` to the gradient with respect to `tensor` (a meta-derived value)."""
        if grad is None:
            return
        key = id(tensor)
        if key in self._pending:
            grad = self._pending[key][1] + grad
        self._pending[key] = (tensor, grad)

    def add_meta(self, grads: Sequence[Tensor | None]) -> None:
        """Add gradients with respect to the meta-parameters (aligned with `meta_tensors`)."""
        for j, g in enumerate(grads):
            self.totals[j] = add_into(self.totals[j], g)

    def flush(self) -> None:
        """Push the pending value gradients into the meta-parameters."""
        pending = list(self._pending.values())
        self._pending.clear()
        if not pending or not self.meta_tensors:
            return
        found = torch.autograd.grad(
            [t for t, _ in pending],
            self.meta_tensors,
            [g for _, g in pending],
            retain_graph=True,
            allow_unused=True,
        )
        self.add_meta(found)

    def result(self) -> list[Tensor | None]:
        """The summed gradients (None for a meta-parameter that received none)."""
        self.flush()
        return self.totals


def hessian_vector(
    problem: InnerProblem,
    meta: MetaParameters,
    params: Params,
    step: int,
    vector: dict[str, Tensor | None],
    meta_tensors: Sequence[Tensor],
    *,
    mode: str = "reverse",
    on_gradient: Any = None,
) -> tuple[dict[str, Tensor | None], list[Tensor | None]]:
    """The second-order term of one step: `H v` and `d^2 L / d meta d w . v`.

    `L` is the inner loss of step `step` at `params`, `H` its Hessian with respect to the
    params and `v = vector` (None entries are zero). Both products are one derivative of
    `grad_w L . v`; by the symmetry of second derivatives they are also the directional
    derivative of the full gradient `(grad_w L, grad_meta L)` along `v`.

    Args:
        mode: "reverse" differentiates `grad_w L . v` again (reverse over reverse, one step's
            double-backward graph at a time); "forward" pushes the tangent `v` through the
            computation of the gradient (forward over reverse, `torch.autograd.forward_ad`),
            as MixFlow-MG does.
        on_gradient: "reverse" mode only: called with the inner gradient (detached, before the
            second backward pass) and must return `vector`; lets a caller that needs the
            gradient to form `v` (an optimizer's vector-Jacobian product) take the gradient
            and the Hessian-vector product from one evaluation of the loss. `vector` is then
            ignored.

    Returns:
        `H v` keyed like `params` (None where zero) and the loss meta-parameters' term, aligned
        with `meta_tensors` (None where the loss does not use one).
    """
    names = list(params)
    meta_tensors = list(meta_tensors)
    if mode == "forward":
        if on_gradient is not None:
            raise ValueError("on_gradient needs mode='reverse'")
        with fwAD.dual_level():
            leaves = {}
            for n in names:
                p = params[n].detach()
                v = vector.get(n)
                leaves[n] = (fwAD.make_dual(p, v) if v is not None else p).requires_grad_()
            with fresh_values(meta):
                loss = problem.inner_loss(leaves, meta, problem.batch(step))
            _check_finite(loss, step, problem.steps)
            found = torch.autograd.grad(
                loss, [leaves[n] for n in names] + meta_tensors, allow_unused=True
            )
            tangents = [None if g is None else fwAD.unpack_dual(g).tangent for g in found]
        return dict(zip(names, tangents[: len(names)], strict=True)), tangents[len(names) :]
    if mode != "reverse":
        raise ValueError(f"Invalid hvp mode: {mode!r} (expected one of {HVP_MODES})")
    leaves = {n: params[n].detach().requires_grad_() for n in names}
    with fresh_values(meta):
        loss = problem.inner_loss(leaves, meta, problem.batch(step))
    _check_finite(loss, step, problem.steps)
    grads = inner_grads(loss, leaves, create_graph=True)
    if on_gradient is not None:
        vector = on_gradient({n: g.detach() for n, g in grads.items()})
    pairs = [
        (grads[n], vector[n]) for n in names if vector.get(n) is not None and grads[n].requires_grad
    ]
    if not pairs:
        return dict.fromkeys(names), [None] * len(meta_tensors)
    found = torch.autograd.grad(
        [g for g, _ in pairs],
        [leaves[n] for n in names] + meta_tensors,
        [v for _, v in pairs],
        allow_unused=True,
    )
    return dict(zip(names, found[: len(names)], strict=True)), list(found[len(names) :])
