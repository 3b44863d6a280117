"""Exact forward-mode hypergradients: tangents pushed through the unrolled inner loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._checks import check_count
from ..meta_params import MetaParameters
from ..problem import InnerProblem
from .base import Estimate, Estimator, InnerRun, inner_steps

__all__ = ["ForwardMode"]


def _split(tree: Any) -> tuple[list[Any], list[Tensor | None], Any]:
    """Plain copies of the primals and tangents of every tensor in `tree`, and its structure.

    Copies, not aliases: an alias of a primal or tangent keeps the step that computed it (and
    so every earlier step) alive, and memory would grow with T.
    """
    leaves, spec = tree_flatten(tree)
    primals: list[Any] = []
    tangents: list[Tensor | None] = []
    for x in leaves:
        if isinstance(x, Tensor):
            primal, tangent = fwAD.unpack_dual(x)
            primals.append(primal.detach().clone())
            tangents.append(None if tangent is None else tangent.detach().clone())
        else:
            primals.append(x)
            tangents.append(None)
    return primals, tangents, spec


def _join(primals: list[Any], tangents: list[Tensor | None], spec: Any) -> Any:
    """Dual tensors (inside the current dual level) from `_split`'s output.

    Floating-point primals become fresh leaves that require grad, as the next inner gradient
    needs.
    """
    leaves = []
    for primal, tangent in zip(primals, tangents, strict=True):
        if isinstance(primal, Tensor):
            primal = primal.detach().requires_grad_(primal.is_floating_point())
            if tangent is not None:
                primal = fwAD.make_dual(primal, tangent)
        leaves.append(primal)
    return tree_unflatten(leaves, spec)


@dataclass(frozen=True)
class ForwardMode(Estimator):
    """Exact hypergradients by forward-mode differentiation of the inner loop.

    Follows Franceschi et al. 2017 ("Forward and Reverse Gradient-Based Hyperparameter
    Optimization"): for one direction `v` in meta-parameter space, the tangent
    `Z_t = d w_t / d meta . v` of the inner params and optimizer state is carried along the
    inner loop, `Z_{t+1} = A_t Z_t + B_t v` with `A_t`, `B_t` the Jacobians of the step with
    respect to the state and the meta-parameters; the outer loss's tangent is then one
    component of the hypergradient. This runs as forward-over-reverse: the meta-parameters are
    `torch.autograd.forward_ad` dual tensors, and the inner gradient (reverse mode with
    `create_graph=True`) carries their tangents as Hessian-vector products. Every inner step
    runs in its own forward-AD level and only copies of the primal and tangent values travel
    to the next step, so memory does not grow with T. (`torch.func.jvp` is not used: the
    inner loop needs tensors that require grad, which torch.func transforms do not allow; for
    the same reason the directions cannot be batched with `vmap` and run one after another.)

    Bias: none; the same gradient as `Unrolled` up to floating-point rounding.
    Cost: one inner run with second-order terms per meta-parameter scalar (one direction
    each). On the digits benchmark one direction costs 3-4x `Unrolled` (forward AD in
    PyTorch is slow for operations that mix tensors with and without tangents), so it pays
    off only where memory, not time, is the limit.
    Memory: flat in T (one step's graph plus the params, state and their tangents).

    Args:
        max_directions: refuse (ValueError) meta-parameters with more scalars than this;
            reverse-mode methods (`Unrolled`, `Checkpointed`) cost the same for any number.
    """

    max_directions: int = 64

    def __post_init__(self) -> None:
        check_count(self.max_directions, "max_directions")

    def live_steps(self, steps: int) -> int:
        return 1

    def estimate(self, problem: InnerProblem, meta: MetaParameters) -> Estimate:
        named = dict(meta.named_parameters())
        total = sum(p.numel() for p in named.values())
        if total > self.max_directions:
            raise ValueError(
                f"ForwardMode needs one inner run per meta-parameter scalar: these "
                f"meta-parameters have {total} scalars, above max_directions="
                f"{self.max_directions}. Use a reverse-mode method (Unrolled or Checkpointed), "
                "whose cost does not grow with the number of meta-parameters, or raise "
                "max_directions."
            )
        raw = {n: p.detach() for n, p in named.items()}
        tangents: dict[str, list[Tensor | None]] = {n: [] for n in named}
        outer_loss, run = None, None
        for name, p in named.items():
            for j in range(p.numel()):
                direction = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                direction[j] = 1
                # The first direction of each meta-parameter is the only dual input, so a
                # None tangent proves that the outer loss does not depend on it (and its
                # other directions are skipped). The others give every meta-parameter a
                # tangent (zero but for the direction): the same numbers, but forward AD's
                # slow path for operands without a tangent is hit far less often.
                outer_loss, run, tangent = self._directional(
                    problem, meta, raw, name, direction.view_as(p), others_dual=j > 0
                )
                tangents[name].append(tangent)
                if tangent is None:
                    break
        if run is None:  # no meta-parameters: run once for the loss and params
            outer_loss, run, _ = self._directional(problem, meta, raw, None, None)
        grads: dict[str, Tensor | None] = {}
        for name, p in named.items():
            found = tangents[name]
            if not found:  # an empty meta-parameter
                grads[name] = torch.zeros_like(p)
            elif found[0] is None:
                grads[name] = None
            else:
                values = [torch.zeros((), dtype=p.dtype) if t is None else t for t in found]
                grads[name] = torch.stack(values).view_as(p)
        assert outer_loss is not None and run is not None
        return Estimate(grads, outer_loss, run, {"hypergrad/directions": float(total)})

    def _directional(
        self,
        problem: InnerProblem,
        meta: MetaParameters,
        raw: dict[str, Tensor],
        name: str | None,
        direction: Tensor | None,
        others_dual: bool = False,
    ) -> tuple[Tensor, InnerRun, Tensor | None]:
        """One inner run with tangent `direction` on meta-parameter `name`.

        Every inner step runs in its own forward-AD level; between steps the params and
        optimizer state travel as plain primal and tangent copies. (Within one level, forward
        AD keeps the tangents of tensors saved for backward registered until the level ends,
        and with them every step's graph: memory would grow with T.)

        Returns the outer loss, the final run (detached) and the outer loss's tangent (None
        where the outer loss does not depend on that direction).
        """

        def call(fn: Any, *args: Any) -> Any:
            values = dict(raw)
            if others_dual:
                values = {n: fwAD.make_dual(v, torch.zeros_like(v)) for n, v in raw.items()}
            if name is not None:
                values[name] = fwAD.make_dual(raw[name], direction)
            return torch.func.functional_call(meta, values, (fn, problem, *args))

        with fwAD.dual_level():
            carry = call(_initial)
        last_loss = None
        for t in range(problem.steps):
            with fwAD.dual_level():
                carry, last_loss = call(_step, carry, t)
        with fwAD.dual_level():
            params = _join(*carry)[0]
            primal, tangent = fwAD.unpack_dual(call(_outer, params))
            primal = primal.detach().clone()
            tangent = None if tangent is None else tangent.detach().clone()
        params, state = tree_unflatten(carry[0], carry[2])
        return primal, InnerRun(params, state, last_loss), tangent


def _initial(meta: MetaParameters, problem: InnerProblem) -> tuple[Any, ...]:
    params = _join(*_split(problem.initial_params(meta)))
    state = problem.optimizer(meta, 0).init(params)
    return _split((params, state))


def _step(
    meta: MetaParameters, problem: InnerProblem, carry: tuple[Any, ...], t: int
) -> tuple[tuple[Any, ...], Tensor]:
    params, state = _join(*carry)
    run = inner_steps(problem, meta, InnerRun(params, state), (t,))
    return _split((run.params, run.state)), fwAD.unpack_dual(run.last_loss).primal.detach().clone()


def _outer(meta: MetaParameters, problem: InnerProblem, params: dict[str, Tensor]) -> Tensor:
    return problem.outer_loss(params, meta, problem.outer_batch)
