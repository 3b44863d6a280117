"""Matrix-free linear solvers on dicts of tensors, for implicit differentiation.

Each solver approximately solves `(A + damping * I) x = b` where `A` is given only through
`matvec` (typically a Hessian-vector product), so no dense matrix is ever formed. All work is
plain tensor arithmetic: with `tol=None` the number of iterations is fixed and the solvers run
under `torch.func.vmap` (one system per task).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import check_choice, check_count, check_number
from .._checks import dot as _dot

__all__ = [
    "SOLVERS",
    "check_solver",
    "solve_linear",
    "conjugate_gradient",
    "neumann",
    "fixed_point",
]

Vec = dict[str, Tensor]
MatVec = Callable[[Vec], Vec]

#: The names `solve_linear` takes as `method`.
SOLVERS = ("cg", "neumann", "fixed_point")


def check_solver(
    method: str,
    iters: int,
    damping: float,
    step_size: float,
    tol: float | None,
    *,
    method_arg: str = "method",
    iters_arg: str = "iters",
) -> None:
    """Validate the arguments of `solve_linear` (also used by the estimators that call it).

    Args:
        method_arg, iters_arg: the names the caller gives these arguments ("solver" for
            `Implicit`, "solver_iters" for `iMAML`).

    Raises:
        ArgumentError: naming the argument out of range.
    """
    check_choice(method, method_arg, SOLVERS)
    check_count(iters, iters_arg)
    check_number(damping, "damping", 0.0)
    check_number(step_size, "step_size", 0.0, low_open=True)
    check_number(tol, "tol", 0.0, allow_none=True)


def _axpy(alpha: Tensor | float, x: Vec, y: Vec) -> Vec:
    return {k: y[k] + alpha * x[k] for k in y}


def _damped(matvec: MatVec, damping: float) -> MatVec:
    if damping == 0:
        return matvec
    return lambda v: _axpy(damping, v, matvec(v))


def conjugate_gradient(
    matvec: MatVec, b: Vec, *, iters: int = 50, damping: float = 0.0, tol: float | None = None
) -> Vec:
    """Conjugate gradient for a symmetric positive definite `A + damping * I`.

    Converges in at most n iterations in exact arithmetic (n unknowns), much faster when the
    spectrum is clustered. `tol` stops early once the residual norm is below it.
    """
    A = _damped(matvec, damping)
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = _dot(r, r)
    for _ in range(iters):
        Ap = A(p)
        pAp = _dot(p, Ap)
        # A converged (zero) direction gives 0 / 0: take a zero step instead of NaN.
        alpha = torch.where(pAp != 0, rs / torch.where(pAp != 0, pAp, 1.0), 0.0)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, Ap, r)
        rs_new = _dot(r, r)
        if tol is not None and bool(rs_new.sqrt() < tol):
            break
        beta = torch.where(rs != 0, rs_new / torch.where(rs != 0, rs, 1.0), 0.0)
        p = _axpy(beta, p, r)
        rs = rs_new
    return x


def neumann(
    matvec: MatVec, b: Vec, *, iters: int = 50, damping: float = 0.0, step_size: float = 0.1
) -> Vec:
    """Truncated Neumann series `x = alpha * sum_k (I - alpha A)^k b` (Lorraine et al. 2020).

    Converges when `0 < step_size < 2 / lambda_max(A)`; the error after K terms shrinks like
    `(1 - step_size * lambda_min)^K`. A fixed number of terms: no data-dependent stopping.
    """
    A = _damped(matvec, damping)
    term = {k: step_size * v for k, v in b.items()}
    x = dict(term)
    for _ in range(iters):
        term = _axpy(-step_size, A(term), term)
        x = {k: x[k] + term[k] for k in x}
    return x


def fixed_point(
    matvec: MatVec,
    b: Vec,
    *,
    iters: int = 50,
    damping: float = 0.0,
    step_size: float = 0.1,
    tol: float | None = None,
) -> Vec:
    """Fixed-point (Richardson) iteration `x <- x - step_size * (A x - b)` from `x = 0`.

    This is the linearization of gradient descent on the inner loss around its optimum; it
    converges under the same condition as `neumann` and, unlike it, can stop early once the
    update is smaller than `tol` (relative to `b`).
    """
    A = _damped(matvec, damping)
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    b_norm = _dot(b, b).sqrt()
    for _ in range(iters):
        Ax = A(x)
        update = {k: step_size * (b[k] - Ax[k]) for k in x}
        x = {k: x[k] + update[k] for k in x}
        if tol is not None and bool(_dot(update, update).sqrt() <= tol * b_norm):
            break
    return x


def solve_linear(
    matvec: MatVec,
    b: Vec,
    *,
    method: str = "cg",
    iters: int = 50,
    damping: float = 0.0,
    step_size: float = 0.1,
    tol: float | None = None,
) -> Vec:
    """Solve `(A + damping * I) x = b` with `method` in {"cg", "neumann", "fixed_point"}.

    Args:
        matvec: `v -> A v` on dicts of tensors shaped like `b`.
        b: the right-hand side.
        method: the solver.
        iters: maximum number of iterations (terms, for Neumann).
        damping: Tikhonov damping added to `A`; makes an indefinite Hessian usable.
        step_size: step of the Neumann and fixed-point iterations (below 2 / lambda_max).
        tol: early-stopping tolerance for "cg" and "fixed_point" (None: run all iterations).
    """
    check_solver(method, iters, damping, step_size, tol)
    if method == "cg":
        return conjugate_gradient(matvec, b, iters=iters, damping=damping, tol=tol)
    if method == "neumann":
        return neumann(matvec, b, iters=iters, damping=damping, step_size=step_size)
    return fixed_point(matvec, b, iters=iters, damping=damping, step_size=step_size, tol=tol)
