"""`Implicit` against closed forms on ridge regression, and against `Unrolled` at convergence.

Ridge regression: inner loss ||X w - y||^2 / n + lambda ||w||^2, whose optimum is
w*(lambda) = A^{-1} X^T y / n with A = X^T X / n + lambda I. The validation loss
||X_v w* - y_v||^2 / n_v then has the exact hypergradient

    dL/dlambda = -g_v^T A^{-1} w*,    g_v = 2 X_v^T (X_v w* - y_v) / n_v,

and dL/dlog(lambda) = lambda dL/dlambda (the value `MetaParameters` stores for a positive
constraint). All numbers are float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import metagrad
from metagrad.hypergrad import Implicit, Unrolled
from metagrad.optim import SGD

DT = torch.float64
N, NV, D = 40, 30, 5
LAM = 0.3


def ridge_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=DT)
    Xv = torch.randn(NV, D, generator=g, dtype=DT)
    w_true = torch.randn(D, generator=g, dtype=DT)
    y = X @ w_true + 0.5 * torch.randn(N, generator=g, dtype=DT)
    yv = Xv @ w_true + 0.5 * torch.randn(NV, generator=g, dtype=DT)
    return X, y, Xv, yv


def sq(X, y, w):
    return (X @ w - y).pow(2).mean()


def largest_eig(X: torch.Tensor, lam: float) -> float:
    """Largest eigenvalue of the inner Hessian 2 (X^T X / n + lambda I)."""
    return float(2 * (torch.linalg.eigvalsh(X.T @ X / len(X)).max() + lam))


def closed_form(X, y, Xv, yv, lam: torch.Tensor):
    """w*, the validation loss at w*, and d(val)/d(lam) for a scalar or per-feature lam."""
    A = X.T @ X / len(X) + torch.diag(lam.expand(D))
    w = torch.linalg.solve(A, X.T @ y / len(X))
    gv = 2 * Xv.T @ (Xv @ w - yv) / len(Xv)
    u = torch.linalg.solve(A, gv)  # A is symmetric
    per_feature = -u * w  # d val / d lam_i for a penalty sum_i lam_i w_i^2
    grad = per_feature.sum() if lam.dim() == 0 else per_feature
    return w, sq(Xv, yv, w), grad


def ridge_problem(meta, data, steps, penalty=None, **kw):
    X, y, Xv, yv = data
    lam_value = meta.value("lam")
    lam_now = lam_value["w"] if isinstance(lam_value, dict) else lam_value
    lr = 1.0 / largest_eig(X, float(lam_now.detach().max()))

    def inner(p, m, b):
        lam = m.value("lam")
        lam = lam["w"] if isinstance(lam, dict) else lam
        return sq(b[0], b[1], p["w"]) + (lam * p["w"].pow(2)).sum()

    return metagrad.InnerProblem(
        init={"w": torch.zeros(D, dtype=DT)},
        optimizer=lambda m, t: SGD(lr=lr),
        inner_loss=inner if penalty is None else penalty,
        outer_loss=lambda p, m, b: sq(b[0], b[1], p["w"]),
        inner_batches=lambda t: (X, y),
        outer_batch=(Xv, yv),
        steps=steps,
        **kw,
    )


@pytest.fixture(params=["cg", "neumann", "fixed_point"])
def implicit(request) -> Implicit:
    data = ridge_data()
    if request.param == "cg":
        return Implicit(solver="cg", iters=20)
    return Implicit(solver=request.param, iters=400, step_size=1.0 / largest_eig(data[0], LAM))


@pytest.mark.parametrize("storage", ["log", "free"])
def test_ridge_scalar_lambda_matches_closed_form(implicit, storage):
    data = ridge_data()
    meta = metagrad.MetaParameters()
    meta.add("lam", LAM, constraint="positive" if storage == "log" else None, dtype=DT)
    result = implicit(ridge_problem(meta, data, steps=200), meta)

    w, val, dval = closed_form(*data, torch.tensor(LAM, dtype=DT))
    expected = LAM * dval if storage == "log" else dval  # chain rule through lam = exp(raw)
    assert torch.allclose(result.params["w"], w, rtol=1e-10, atol=1e-12)
    assert torch.allclose(result.outer_loss, val, rtol=1e-12)
    torch.testing.assert_close(result.grads["lam"], expected, rtol=1e-6, atol=0)
    assert result.metrics["implicit/residual"] < 1e-8
    assert result.metrics["implicit/inner_grad_norm"] < 1e-10


def test_ridge_per_feature_lambda_matches_closed_form(implicit):
    data = ridge_data(1)
    params = {"w": torch.zeros(D, dtype=DT)}
    lam0 = torch.linspace(0.1, 0.5, D, dtype=DT)
    meta = metagrad.MetaParameters()
    meta.add("lam", lam0, constraint="positive", scope="per_element", params=params)
    result = implicit(ridge_problem(meta, data, steps=300), meta)

    _, _, dval = closed_form(*data, lam0)
    torch.testing.assert_close(result.grads["lam.w"], lam0 * dval, rtol=1e-6, atol=0)


def test_ridge_unrolled_to_convergence_matches_closed_form():
    data = ridge_data()
    meta = metagrad.MetaParameters()
    meta.add("lam", LAM, constraint="positive", dtype=DT)
    result = Unrolled()(ridge_problem(meta, data, steps=200), meta)
    _, _, dval = closed_form(*data, torch.tensor(LAM, dtype=DT))
    torch.testing.assert_close(result.grads["lam"], LAM * dval, rtol=1e-4, atol=0)


def test_damping_solves_the_damped_system():
    data = ridge_data()
    X, y, Xv, yv = data
    meta = metagrad.MetaParameters()
    meta.add("lam", LAM, constraint=None, dtype=DT)
    delta = 0.7
    result = Implicit(solver="cg", iters=20, damping=delta)(ridge_problem(meta, data, 200), meta)

    w, _, exact = closed_form(*data, torch.tensor(LAM, dtype=DT))
    H = 2 * (X.T @ X / N + LAM * torch.eye(D, dtype=DT))
    gv = 2 * Xv.T @ (Xv @ w - yv) / NV
    v = torch.linalg.solve(H + delta * torch.eye(D, dtype=DT), gv)
    expected = -(2 * w) @ v  # d/dlam of grad_w L_in is 2 w
    torch.testing.assert_close(result.grads["lam"], expected, rtol=1e-8, atol=0)
    assert not torch.allclose(result.grads["lam"], exact, rtol=1e-2)  # damping biases it


def test_implicit_batch_chooses_the_hessian_batch():
    data = ridge_data()
    X, y, Xv, yv = data
    sub = (X[:25], y[:25])
    meta = metagrad.MetaParameters()
    meta.add("lam", LAM, constraint=None, dtype=DT)
    method = Implicit(solver="cg", iters=20)
    explicit = method(ridge_problem(meta, data, 200, implicit_batch=sub), meta)

    H_sub = 2 * (sub[0].T @ sub[0] / 25 + LAM * torch.eye(D, dtype=DT))

    def on_sub(w: torch.Tensor) -> torch.Tensor:
        gv = 2 * Xv.T @ (Xv @ w - yv) / NV
        return -(2 * w) @ torch.linalg.solve(H_sub, gv)  # d/dlam of grad_w L_in is 2 w

    expected = on_sub(explicit.params["w"])
    torch.testing.assert_close(explicit.grads["lam"], expected, rtol=1e-8, atol=0)

    # Without implicit_batch the batch of the last inner step is used.
    problem = ridge_problem(meta, data, 200)
    problem.inner_batches = lambda t: sub if t == 199 else (X, y)
    default = method(problem, meta)
    torch.testing.assert_close(default.grads["lam"], on_sub(default.params["w"]), rtol=1e-8, atol=0)


def test_short_run_is_biased_and_says_so():
    data = ridge_data()
    meta = metagrad.MetaParameters()
    meta.add("lam", LAM, constraint=None, dtype=DT)
    result = Implicit(solver="cg", iters=20)(ridge_problem(meta, data, steps=3), meta)
    _, _, exact = closed_form(*data, torch.tensor(LAM, dtype=DT))
    assert result.metrics["implicit/inner_grad_norm"] > 1e-2
    assert not torch.allclose(result.grads["lam"], exact, rtol=1e-3)


def test_outer_loss_meta_parameter_gets_its_direct_gradient():
    data = ridge_data()
    meta = metagrad.MetaParameters()
    meta.add("lam", LAM, constraint=None, dtype=DT)
    meta.add("c", 0.5, constraint=None, dtype=DT)
    problem = ridge_problem(meta, data, 200)
    plain = problem.outer_loss
    problem.outer_loss = lambda p, m, b: plain(p, m, b) + m.value("c") * p["w"].pow(2).sum()
    result = Implicit(solver="cg", iters=20)(problem, meta)

    X, y, Xv, yv = data
    w, _, _ = closed_form(*data, torch.tensor(LAM, dtype=DT))
    A = X.T @ X / N + LAM * torch.eye(D, dtype=DT)
    g_out = 2 * Xv.T @ (Xv @ w - yv) / NV + 2 * 0.5 * w
    torch.testing.assert_close(result.grads["c"], w.pow(2).sum(), rtol=1e-8, atol=0)
    torch.testing.assert_close(
        result.grads["lam"], -g_out @ torch.linalg.solve(A, w), rtol=1e-6, atol=0
    )


class DataWeights(nn.Module):
    """A learned weight in (0, 1) per training example: a module meta-parameter."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(-1.0, 1.0, n, dtype=DT))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


def test_data_weights_module_matches_finite_differences():
    data = ridge_data(2)
    X, y, Xv, yv = data
    meta = metagrad.MetaParameters()
    meta.add("lam", LAM, constraint="positive", dtype=DT)
    meta.add_module("weights", DataWeights(N))

    def inner(p, m, b):
        r = b[0] @ p["w"] - b[1]
        return (m.value("weights")() * r.pow(2)).mean() + m.value("lam") * p["w"].pow(2).sum()

    problem = ridge_problem(meta, data, 400, penalty=inner)
    result = Implicit(solver="cg", iters=20)(problem, meta)

    def val(logits: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(logits)
        A = X.T @ (s[:, None] * X) / N + LAM * torch.eye(D, dtype=DT)
        w = torch.linalg.solve(A, X.T @ (s * y) / N)
        return sq(Xv, yv, w)

    logits = meta.weights.logits.detach()
    exact = torch.autograd.functional.jacobian(val, logits)  # differentiates the dense solve
    torch.testing.assert_close(result.grads["weights.logits"], exact, rtol=1e-6, atol=1e-12)
    h = 1e-6
    for i in (0, 7, N - 1):
        e = torch.zeros(N, dtype=DT)
        e[i] = h
        fd = (val(logits + e) - val(logits - e)) / (2 * h)
        torch.testing.assert_close(result.grads["weights.logits"][i], fd, rtol=1e-5, atol=1e-10)


def test_logistic_regression_agrees_with_unrolled():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(60, 4, generator=g, dtype=DT)
    y = (X @ torch.randn(4, generator=g, dtype=DT) > 0).to(DT)
    Xv = torch.randn(40, 4, generator=g, dtype=DT)
    yv = (Xv[:, 0] > 0).to(DT)
    params = {"w": torch.zeros(4, dtype=DT)}
    meta = metagrad.MetaParameters()
    meta.add("l2", 0.2, constraint="positive", scope="per_element", params=params)

    def bce(p, b):
        return nn.functional.binary_cross_entropy_with_logits(b[0] @ p["w"], b[1])

    problem = metagrad.InnerProblem(
        init=params,
        optimizer=lambda m, t: SGD(lr=1.0, momentum=0.5),
        inner_loss=lambda p, m, b: bce(p, b) + (m.value("l2")["w"] * p["w"].pow(2)).sum(),
        outer_loss=lambda p, m, b: bce(p, b),
        inner_batches=lambda t: (X, y),
        outer_batch=(Xv, yv),
        steps=300,
    )
    unrolled = Unrolled()(problem, meta)
    implicit = Implicit(solver="cg", iters=20)(problem, meta)
    assert implicit.metrics["implicit/inner_grad_norm"] < 1e-12
    torch.testing.assert_close(implicit.grads["l2.w"], unrolled.grads["l2.w"], rtol=1e-6, atol=0)


def test_all_used_gives_no_warning_and_a_stock_adam_step():
    data = ridge_data()
    meta = metagrad.MetaParameters()
    meta.add("lam", LAM, constraint="positive", dtype=DT)
    outer = torch.optim.Adam(meta.parameters(), lr=0.1)
    before = meta.value("lam").detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every meta-parameter is used: no warning
        result = Implicit(solver="cg", iters=20)(ridge_problem(meta, data, 200), meta)
    result.apply(meta)
    outer.step()
    assert set(result.grads) == set(dict(meta.named_parameters()))
    assert not torch.equal(meta.value("lam").detach(), before)
    assert result.metrics["outer/loss"] == pytest.approx(float(result.outer_loss))


def test_proximal_init_matches_the_imaml_closed_form():
    # iMAML: the meta-learned init theta is both the starting point and the centre of a
    # proximal term (reg / 2) ||w - theta||^2 in the inner loss. At the optimum,
    # dL/dtheta = reg (2 X^T X / n + reg I)^{-1} g_v; the starting point itself plays no part.
    X, y, Xv, yv = ridge_data(4)
    reg = 0.8
    theta0 = torch.linspace(-1.0, 1.0, D, dtype=DT)
    meta = metagrad.MetaParameters()
    meta.add("theta", theta0, constraint=None, scope="per_element", params={"w": theta0})
    A = 2 * X.T @ X / N + reg * torch.eye(D, dtype=DT)
    problem = metagrad.InnerProblem(
        init=lambda m: {"w": m.value("theta")["w"]},
        optimizer=lambda m, t: SGD(lr=1.0 / float(torch.linalg.eigvalsh(A).max())),
        inner_loss=lambda p, m, b: (
            sq(b[0], b[1], p["w"]) + reg / 2 * (p["w"] - m.value("theta")["w"]).pow(2).sum()
        ),
        outer_loss=lambda p, m, b: sq(b[0], b[1], p["w"]),
        inner_batches=lambda t: (X, y),
        outer_batch=(Xv, yv),
        steps=300,
    )
    w = torch.linalg.solve(A, 2 * X.T @ y / N + reg * theta0)
    gv = 2 * Xv.T @ (Xv @ w - yv) / NV
    expected = reg * torch.linalg.solve(A, gv)
    implicit = Implicit(solver="cg", iters=20)(problem, meta)
    torch.testing.assert_close(implicit.grads["theta.w"], expected, rtol=1e-6, atol=1e-12)
    unrolled = Unrolled()(problem, meta)  # sees the starting point too; it vanishes at T = 300
    torch.testing.assert_close(unrolled.grads["theta.w"], expected, rtol=1e-4, atol=1e-10)
