"""Implicit differentiation: the implicit function theorem at the end of the inner run."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from .._checks import Params, check_number, dot
from ..meta_params import MetaParameters
from ..problem import InnerProblem
from .base import Estimate, Estimator, NonFiniteLossError, inner_steps, outer_loss, start
from .solvers import check_solver, solve_linear

__all__ = ["Implicit", "ImplicitBiasWarning"]


class ImplicitBiasWarning(UserWarning):
    """`Implicit`'s result may be biased: the run is far from an optimum or the solve failed."""


@dataclass(frozen=True)
class Implicit(Estimator):
    r"""Hypergradients by the implicit function theorem at the final inner params.

    The inner loop runs first-order and without graph (like plain training). At its final
    params :math:`w`, treated as the optimum :math:`w^*(\lambda)` of the inner loss
    :math:`L_{in}`, the hypergradient of the outer loss :math:`L_{out}` is

    .. math::
        \frac{d L_{out}}{d\lambda} = \partial_\lambda L_{out}(w, \lambda)
            - \partial_\lambda \big[\nabla_w L_{in}(w, \lambda)^\top v\big],
        \qquad (H + \delta I)\, v = \nabla_w L_{out}(w, \lambda),

    with :math:`H = \nabla_w^2 L_{in}(w, \lambda)` applied only through Hessian-vector
    products (double backward through the inner gradient), never formed, and the linear system
    solved by `solve_linear` (conjugate gradient, Neumann series or fixed-point iteration).

    What it sees: meta-parameters that enter the inner loss (weight decay or per-feature L2
    written in `inner_loss`, data weights, a learned loss module) or the outer loss. It cannot
    see optimizer hyperparameters such as the learning rate or momentum: at an optimum they do
    not matter. Calling it on a problem whose optimizer hyperparameters depend on a
    meta-parameter raises `ValueError` naming them. The initial params are only a starting
    point: a meta-parameter that reaches the run only through `problem.init` gets a zero
    gradient (with the usual warning).

    The inner batch at the optimum is `problem.implicit_batch` when set (for example the full
    training set), else the batch of the last inner step. Both the Hessian and the mixed term
    use it.

    Bias: exact only when the final params are an exact stationary point of the inner loss on
    that batch (and the Hessian there is invertible) and the linear solve is exact. A run that
    stops short of the optimum, a minibatch that differs from the loss the run minimized, or a
    truncated solve (few iterations, damping > 0) bias the result. `metrics` report
    `implicit/inner_grad_norm` (the inner gradient norm at the final params; 0 at an exact
    optimum) and `implicit/residual` (the relative residual of the solve).
    Cost: T first-order inner steps (the price of plain training), one outer gradient, and
    `iters + 2` Hessian-vector products (each about two to three gradient evaluations) at the
    final params, plus one for the residual metric.
    Memory: flat in T: one graph of the inner gradient at the final params, kept during the
    solve, and a few param-sized vectors.

    Args:
        solver: "cg" (needs a symmetric positive definite `H + damping I`; the fastest at a
            minimum), "neumann" or "fixed_point" (need `0 < step_size < 2 / lambda_max`).
        iters: iterations of the solver (terms, for Neumann).
        damping: :math:`\delta \ge 0`, added to the Hessian; makes an indefinite or singular
            Hessian usable at the price of bias.
        step_size: step of the Neumann and fixed-point iterations.
        tol: early stopping tolerance for "cg" and "fixed_point" (None: run all iterations).
        warn_grad_norm: warn (`ImplicitBiasWarning`) when the inner gradient norm at the final
            params exceeds this: the run is far from the stationary point the theorem needs.
        warn_residual: warn when the solve's relative residual exceeds this.
    """

    solver: str = "cg"
    iters: int = 50
    damping: float = 0.0
    step_size: float = 0.1
    tol: float | None = None
    warn_grad_norm: float = 1e-2
    warn_residual: float = 1e-2

    def __post_init__(self) -> None:
        check_solver(
            self.solver, self.iters, self.damping, self.step_size, self.tol, method_arg="solver"
        )
        check_number(self.warn_grad_norm, "warn_grad_norm", 0.0)
        check_number(self.warn_residual, "warn_residual", 0.0)

    def live_steps(self, steps: int) -> int:
        return 1

    def estimate(self, problem: InnerProblem, meta: MetaParameters) -> Estimate:
        named: dict[str, Tensor] = dict(meta.named_parameters())
        _refuse_optimizer_hyperparameters(problem, meta, named)

        run = start(problem, meta, track=False)
        run = inner_steps(problem, meta, run, range(problem.steps), create_graph=False, track=False)
        w = {n: p.detach().requires_grad_() for n, p in run.params.items()}
        names, metas = list(w), list(named.values())

        loss = outer_loss(problem, meta, w)
        both = torch.autograd.grad(loss, [w[n] for n in names] + metas, allow_unused=True)
        g_out = {
            n: torch.zeros_like(w[n]) if g is None else g
            for n, g in zip(names, both[: len(names)], strict=True)
        }
        direct = both[len(names) :]

        batch = problem.implicit_batch
        if batch is None:
            batch = problem.batch(problem.steps - 1)
        inner_loss = problem.inner_loss(w, meta, batch)
        if not bool(torch.isfinite(inner_loss)):
            raise NonFiniteLossError(
                f"inner loss is {inner_loss.detach().cpu().item()} at the final params (after "
                f"inner step {problem.steps - 1}), where the implicit hypergradient is taken"
            )
        g_in = torch.autograd.grad(
            inner_loss, [w[n] for n in names], create_graph=True, allow_unused=True
        )
        # Inner-gradient entries with no graph (params the inner loss ignores, or a loss linear
        # in them) contribute nothing to Hessian-vector products or the mixed term.
        live = [i for i, g in enumerate(g_in) if g is not None and g.requires_grad]

        def hvp(v: Params) -> Params:
            if not live:
                return {n: torch.zeros_like(v[n]) for n in names}
            out = torch.autograd.grad(
                [g_in[i] for i in live],
                [w[n] for n in names],
                grad_outputs=[v[names[i]] for i in live],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            return dict(zip(names, out, strict=True))

        v = solve_linear(
            hvp,
            g_out,
            method=self.solver,
            iters=self.iters,
            damping=self.damping,
            step_size=self.step_size,
            tol=self.tol,
        )
        v = {n: t.detach() for n, t in v.items()}
        hv = hvp(v)
        residual = {n: hv[n] + self.damping * v[n] - g_out[n] for n in names}
        b_norm = float(dot(g_out, g_out).sqrt())
        rel_residual = float(dot(residual, residual).sqrt()) / b_norm if b_norm > 0 else 0.0
        inner_grad_norm = float(
            sum(float(g.detach().pow(2).sum()) for g in g_in if g is not None) ** 0.5
        )

        if live and metas:
            mixed = torch.autograd.grad(
                [g_in[i] for i in live],
                metas,
                grad_outputs=[v[names[i]] for i in live],
                allow_unused=True,
            )
        else:
            mixed = (None,) * len(metas)  # type: ignore[assignment]

        raw: dict[str, Tensor | None] = {}
        for name, d, m in zip(named, direct, mixed, strict=True):
            if d is None and m is None:
                raw[name] = None
            elif m is None:
                raw[name] = d
            elif d is None:
                raw[name] = -m
            else:
                raw[name] = d - m
        far = []
        if inner_grad_norm > self.warn_grad_norm:
            far.append(
                f"the inner gradient norm at the final params is {inner_grad_norm:.3g} (above "
                f"{self.warn_grad_norm:g}): the run did not reach a stationary point"
            )
        if rel_residual > self.warn_residual:
            far.append(
                f"the linear solve's relative residual is {rel_residual:.3g} (above "
                f"{self.warn_residual:g})"
            )
        if far:
            warnings.warn(
                "Implicit: "
                + "; ".join(far)
                + ". The hypergradient may be far from the true one. Run the inner loop longer "
                "or on the full batch (InnerProblem.implicit_batch), raise iters, add damping, "
                "or use an unrolled estimator (Unrolled, Checkpointed)",
                ImplicitBiasWarning,
                stacklevel=3,
            )
        metrics = {
            "implicit/residual": rel_residual,
            "implicit/inner_grad_norm": inner_grad_norm,
            "implicit/trusted": 0.0 if far else 1.0,
        }
        return Estimate(raw, loss, run, metrics)


def _refuse_optimizer_hyperparameters(
    problem: InnerProblem, meta: MetaParameters, named: dict[str, Tensor]
) -> None:
    """Raise if any meta-parameter reaches a hyperparameter of the inner optimizer.

    Builds the optimizer of every inner step from `meta` and asks autograd which
    meta-parameters its tensor hyperparameters depend on (a graph query: a dependency is found
    even where its derivative happens to be zero).
    """
    if not named:
        return
    by_arg: dict[str, list[Tensor]] = {}
    for t in range(problem.steps):
        optimizer = problem.optimizer(meta, t)
        for arg, value in optimizer.hyperparameters().items():
            tensors = [x for x in tree_leaves(value) if isinstance(x, Tensor) and x.requires_grad]
            by_arg.setdefault(arg, []).extend(tensors)
    found: dict[str, list[str]] = {}
    inputs = list(named.values())
    for arg, tensors in by_arg.items():
        if not tensors:
            continue
        total: Any = sum(x.sum() for x in tensors)
        reached = torch.autograd.grad(total, inputs, allow_unused=True)
        for name, g in zip(named, reached, strict=True):
            if g is not None:
                found.setdefault(name, []).append(arg)
    if found:
        listed = ", ".join(f"'{n}' (its {', '.join(args)})" for n, args in found.items())
        raise ValueError(
            "Implicit cannot give hypergradients for inner-optimizer hyperparameters, but these "
            f"meta-parameters reach the optimizer built by problem.optimizer: {listed}. The "
            "implicit function theorem sees only the inner and outer losses at the optimum, "
            "where the learning rate and momentum play no part: learn these with Unrolled "
            "(or another unrolled method), or write a regularizer such as weight decay into "
            "inner_loss instead of the optimizer."
        )
