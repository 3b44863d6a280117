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

__all__ = ["solve_linear", "conjugate_gradient", "neumann", "fixed_point"]

Vec = dict[str, Tensor]
MatVec = Callable[[Vec], Vec]


def _dot(a: Vec, b: Vec) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


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
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"Invalid iters: {iters!r} (must be an int >= 1)")
    if not damping >= 0:
        raise ValueError(f"Invalid damping: {damping} (must be >= 0)")
    if tol is not None and not tol >= 0:
        raise ValueError(f"Invalid tol: {tol} (must be >= 0, or None for fixed iterations)")
    if method == "cg":
        return conjugate_gradient(matvec, b, iters=iters, damping=damping, tol=tol)
    if not step_size > 0:
        raise ValueError(f"Invalid step_size: {step_size} (must be > 0)")
    if method == "neumann":
        return neumann(matvec, b, iters=iters, damping=damping, step_size=step_size)
    if method == "fixed_point":
        return fixed_point(matvec, b, iters=iters, damping=damping, step_size=step_size, tol=tol)
    raise ValueError(f"Invalid method: {method!r} (expected 'cg', 'neumann' or 'fixed_point')")
