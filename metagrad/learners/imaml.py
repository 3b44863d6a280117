"""iMAML (Rajeswaran et al. 2019): meta-gradients by implicit differentiation."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._checks import check_number, detach_tree
from ..hypergrad.solvers import check_solver, solve_linear
from .base import MetaLearner, Params, Plan

__all__ = ["iMAML"]


class iMAML(MetaLearner):  # noqa: N801 (the method's name)
    r"""Implicit MAML: differentiate the inner optimum, not the inner trajectory.

    Each task solves the proximally regularized inner problem

    .. math::
        \phi_i = \arg\min_\phi\; L^{s}_i(\phi) + \frac{\lambda}{2}\lVert\phi - \theta\rVert^2

    approximately with `inner_steps` steps of the inner optimizer from :math:`\theta`, without
    a graph. At an exact optimum, :math:`d\phi_i/d\theta = (I + H_i/\lambda)^{-1}` with
    :math:`H_i` the Hessian of the support loss at :math:`\phi_i`, so the meta-gradient is

    .. math::
        \frac1n \sum_i (I + H_i/\lambda)^{-1} \nabla L^{q}_i(\phi_i),

    solved per task with `metagrad.hypergrad.solve_linear` through Hessian-vector products
    (reverse-over-reverse, the support gradient linearized once per task; no Hessian is
    formed). This is the `metagrad.hypergrad.Implicit` estimator applied to the proximal inner
    loss, one task at a time under vmap (the tests check that both give the same gradient).
    Memory does not grow with `inner_steps`.
    Bias: exact only at the inner optimum and with an exact solve; an unconverged inner loop or
    few solver iterations bias the estimate. The returned value is the mean query loss; its
    gradient is the implicit meta-gradient.

    Other arguments are those of `MetaLearner` (`first_order` does not apply).

    Args:
        model: the network; its trainable parameters are the meta-learned initialization.
        inner_steps: inner steps per task (default 10): the inner loop should come close to
            the optimum of the proximal loss, where the implicit gradient is exact.
        lam: proximal strength :math:`\lambda` (> 0); larger keeps :math:`\phi` closer to
            :math:`\theta`.
        solver: "cg" (default; needs :math:`I + H/\lambda` positive definite, i.e. a local
            minimum), "neumann" or "fixed_point".
        solver_iters: iterations of the solver (fixed, so it runs under vmap).
        damping: Tikhonov damping added to :math:`I + H/\lambda`.
        step_size: step of the Neumann and fixed-point solvers.
    """

    fixed_arguments: ClassVar[dict[str, Any]] = {"first_order": False}

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_steps: int = 10,
        lam: float = 1.0,
        solver: str = "cg",
        solver_iters: int = 10,
        damping: float = 0.0,
        step_size: float = 0.1,
        **kwargs: Any,
    ) -> None:
        self.refuse_fixed(kwargs)
        super().__init__(model, inner_steps=inner_steps, **kwargs)
        self.lam = check_number(lam, "lam", 0.0, low_open=True)
        check_solver(
            solver,
            solver_iters,
            damping,
            step_size,
            None,
            method_arg="solver",
            iters_arg="solver_iters",
        )
        self.solver = solver
        self.solver_iters = solver_iters
        self.damping = float(damping)
        self.step_size = float(step_size)

    def second_order(self) -> bool:
        return True  # Hessian-vector products differentiate a backward

    def support_loss(
        self, plan: Plan, adapted: Params, buffers: Params, x: Tensor, y: Tensor
    ) -> Tensor:
        loss = super().support_loss(plan, adapted, buffers, x, y)
        prox = sum(((adapted[k] - plan.theta[k].detach()) ** 2).sum() for k in adapted)
        return loss + 0.5 * self.lam * prox

    def task_loss(
        self, plan: Plan, buffers: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> Tensor:
        theta = plan.theta
        phi = detach_tree(
            self.inner_loop(plan, buffers, sx, sy, first_order=True, start=detach_tree(theta))
        )

        def query(p: Params) -> Tensor:
            return self.query_loss(plan, p, buffers, qx, qy)

        def support(p: Params) -> Tensor:
            return MetaLearner.support_loss(self, plan, p, buffers, sx, sy)

        query_grad, query_value = torch.func.grad_and_value(query)(phi)
        # The support gradient is linearized once; each product is one backward through it
        # (reverse-over-reverse: H is symmetric, so the vector-Jacobian product is H v).
        _, support_vjp = torch.func.vjp(torch.func.grad(support), phi)[:2]

        def matvec(v: Params) -> Params:
            (hv,) = support_vjp(v)
            return {k: v[k] + hv[k] / self.lam for k in v}

        direction = solve_linear(
            matvec,
            detach_tree(query_grad),
            method=self.solver,
            iters=self.solver_iters,
            damping=self.damping,
            step_size=self.step_size,
        )
        # A value equal to the query loss whose gradient in theta is the implicit direction.
        surrogate = torch.stack([(direction[k].detach() * theta[k]).sum() for k in theta]).sum()
        return query_value.detach() + (surrogate - surrogate.detach())
