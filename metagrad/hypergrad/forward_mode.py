"""Exact forward-mode hypergradients: tangents pushed through the unrolled inner loop."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._pytree import tree_map

from ..meta_params import MetaParameters
from ..problem import InnerProblem
from .base import HypergradResult, InnerRun, finish, inner_steps, zero_unused

__all__ = ["ForwardMode"]


def _rewrap(x: Any) -> Any:
    """Cut the reverse-mode graph of `x` but keep its forward-mode tangent.

    The primal becomes a fresh leaf that requires grad (the next inner gradient needs it);
    the tangent, which carries everything the forward pass needs, is kept as a constant.
    """
    if not isinstance(x, Tensor):
        return x
    primal, tangent = fwAD.unpack_dual(x)
    primal = primal.detach().requires_grad_(primal.is_floating_point())
    if tangent is None:
        return primal
    return fwAD.make_dual(primal, tangent.detach())


class ForwardMode:
    """Exact hypergradients by forward-mode differentiation of the inner loop.

    Follows Franceschi et al. 2017 ("Forward and Reverse Gradient-Based Hyperparameter
    Optimization"): for one direction `v` in meta-parameter space, the tangent
    `Z_t = d w_t / d meta . v` of the inner params and optimizer state is carried along the
    inner loop, `Z_{t+1} = A_t Z_t + B_t v` with `A_t`, `B_t` the Jacobians of the step with
    respect to the state and the meta-parameters; the outer loss's tangent is then one
    component of the hypergradient. This runs as forward-over-reverse: the meta-parameters are
    `torch.autograd.forward_ad` dual tensors, and the inner gradient (reverse mode with
    `create_graph=True`) carries their tangents as Hessian-vector products. After every step
    the reverse graph is cut and only the primal and tangent values are kept, so memory does
    not grow with T. (`torch.func.jvp` is not used: the inner loop needs tensors that require
    grad, which torch.func transforms do not allow; for the same reason the directions cannot
    be batched with `vmap` and run one after another.)

    Bias: none; the same gradient as `Unrolled` up to floating-point rounding.
    Cost: one inner run with second-order terms per meta-parameter scalar (one direction
    each), so n scalars cost about n times a forward pass through the inner loop.
    Memory: flat in T (one step's graph plus the params, state and their tangents).

    Args:
        max_directions: refuse (ValueError) meta-parameters with more scalars than this;
            reverse-mode methods (`Unrolled`, `Checkpointed`) cost the same for any number.
    """

    def __init__(self, max_directions: int = 64) -> None:
        if isinstance(max_directions, bool) or not isinstance(max_directions, int):
            raise ValueError(f"Invalid max_directions: {max_directions!r} (must be an int >= 1)")
        if max_directions < 1:
            raise ValueError(f"Invalid max_directions: {max_directions} (must be >= 1)")
        self.max_directions = max_directions

    def __call__(self, problem: InnerProblem, meta: MetaParameters) -> HypergradResult:
        started = time.perf_counter()
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
            if found and found[0] is None:
                grads[name] = None
            else:
                values = [torch.zeros((), dtype=p.dtype) if t is None else t for t in found]
                grads[name] = torch.stack(values).view_as(p)
        grads = zero_unused(grads, named)
        return finish(grads, outer_loss, run, started, **{"hypergrad/directions": float(total)})

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

        Returns the outer loss, the final run (detached) and the outer loss's tangent (None
        where the outer loss does not depend on that direction).
        """
        with fwAD.dual_level():
            if others_dual:
                values = {n: fwAD.make_dual(v, torch.zeros_like(v)) for n, v in raw.items()}
            else:
                values = dict(raw)
            if name is not None:
                values[name] = fwAD.make_dual(raw[name], direction)
            outer, run = torch.func.functional_call(meta, values, (self._unroll, problem))
            primal, tangent = fwAD.unpack_dual(outer)
            primal = primal.detach()
            tangent = None if tangent is None else tangent.detach()
            plain = InnerRun(
                {n: p.detach() for n, p in run.params.items()},
                tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, run.state),
                run.last_loss,
            )
        return primal, plain, tangent

    @staticmethod
    def _unroll(meta: MetaParameters, problem: InnerProblem) -> tuple[Tensor, InnerRun]:
        params = {n: _rewrap(p) for n, p in problem.initial_params(meta).items()}
        state = tree_map(_rewrap, problem.optimizer(meta, 0).init(params))
        run = InnerRun(params, state)
        for t in range(problem.steps):
            run = inner_steps(problem, meta, run, (t,))
            params, state = tree_map(_rewrap, (run.params, run.state))
            run = InnerRun(params, state, run.last_loss.detach())
        return problem.outer_loss(run.params, meta, problem.outer_batch), run

    def __repr__(self) -> str:
        return f"ForwardMode(max_directions={self.max_directions})"
