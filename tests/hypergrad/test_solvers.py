"""Matrix-free linear solvers: accuracy on SPD systems, damping, edge cases, errors, vmap.

Systems are given on dicts of tensors (as the params of a model), with the matrix applied only
through `matvec`; the reference is a dense `torch.linalg.solve`. float64 throughout.
"""

from __future__ import annotations

import pytest
import torch

from metagrad.hypergrad import solve_linear

DT = torch.float64
SHAPES = {"weight": (4, 3), "bias": (8,)}  # 20 unknowns
N = 20
METHODS = ["cg", "neumann", "fixed_point"]


def spd(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with the given eigenvalues and a random eigenbasis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=DT))
    return q @ torch.diag(eigs) @ q.T


def flat(v: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v[k].reshape(-1) for k in SHAPES])


def unflat(x: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, shape in SHAPES.items():
        n = torch.Size(shape).numel()
        out[k] = x[i : i + n].reshape(shape)
        i += n
    return out


def matvec_of(A: torch.Tensor, counter: list[int] | None = None):
    def matvec(v):
        if counter is not None:
            counter[0] += 1
        return unflat(A @ flat(v))

    return matvec


def rhs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return unflat(torch.randn(N, generator=g, dtype=DT))


def settings(method: str, lam_max: float) -> dict:
    """Iterations enough for 1e-10 on the test spectra; step 1 / lambda_max for iterations."""
    if method == "cg":
        return dict(iters=N)
    return dict(iters=400, step_size=1.0 / lam_max)


EIGS = torch.linspace(0.5, 4.0, N, dtype=DT)


@pytest.mark.parametrize("method", METHODS)
def test_solves_spd_system(method):
    A, b = spd(EIGS), rhs()
    x = solve_linear(matvec_of(A), b, method=method, **settings(method, 4.0))
    expected = torch.linalg.solve(A, flat(b))
    torch.testing.assert_close(flat(x), expected, rtol=1e-10, atol=1e-12)
    assert set(x) == set(b) and all(x[k].shape == b[k].shape for k in b)


def test_cg_handles_an_ill_conditioned_system_in_few_iterations():
    # Condition number 100: CG needs about n iterations (a few more in floating point), while
    # the fixed-point iteration with the same budget is still far from the solution.
    A, b = spd(torch.logspace(-1, 1, N, dtype=DT)), rhs()
    expected = torch.linalg.solve(A, flat(b))
    x = solve_linear(matvec_of(A), b, method="cg", iters=2 * N)
    torch.testing.assert_close(flat(x), expected, rtol=1e-10, atol=1e-12)
    slow = solve_linear(matvec_of(A), b, method="fixed_point", iters=2 * N, step_size=0.1)
    assert (flat(slow) - expected).norm() > 0.1 * expected.norm()


@pytest.mark.parametrize("method", METHODS)
def test_damping_solves_the_damped_system(method):
    A, b, delta = spd(EIGS), rhs(), 0.8
    x = solve_linear(matvec_of(A), b, method=method, damping=delta, **settings(method, 4.8))
    expected = torch.linalg.solve(A + delta * torch.eye(N, dtype=DT), flat(b))
    torch.testing.assert_close(flat(x), expected, rtol=1e-10, atol=1e-12)
    undamped = torch.linalg.solve(A, flat(b))
    assert not torch.allclose(flat(x), undamped, rtol=1e-2)


def test_damping_makes_an_indefinite_matrix_solvable_by_cg():
    A, b, delta = spd(torch.linspace(-0.3, 2.0, N, dtype=DT)), rhs(), 1.0
    x = solve_linear(matvec_of(A), b, method="cg", iters=N, damping=delta)
    expected = torch.linalg.solve(A + delta * torch.eye(N, dtype=DT), flat(b))
    torch.testing.assert_close(flat(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tol", [None, 1e-8], ids=["fixed-iters", "tol"])
@pytest.mark.parametrize("method", METHODS)
def test_zero_right_hand_side_gives_zero(method, tol):
    A = spd(EIGS)
    b = {k: torch.zeros(s, dtype=DT) for k, s in SHAPES.items()}
    kw = dict(settings(method, 4.0), iters=10)
    if method != "neumann":
        kw["tol"] = tol
    x = solve_linear(matvec_of(A), b, method=method, **kw)
    for k in b:
        assert torch.isfinite(x[k]).all()
        assert torch.equal(x[k], torch.zeros_like(b[k]))


@pytest.mark.parametrize("method", ["cg", "fixed_point"])
def test_tol_stops_early_with_the_residual_below_it(method):
    A, b = spd(EIGS), rhs()
    counter = [0]
    kw = settings(method, 4.0)
    x = solve_linear(matvec_of(A, counter), b, method=method, tol=1e-6, **kw)
    assert counter[0] < kw["iters"]
    residual = A @ flat(x) - flat(b)
    assert residual.norm() < 1e-4 * flat(b).norm()


def test_neumann_series_truncation_error_shrinks_geometrically():
    A, b = spd(EIGS), rhs()
    exact = torch.linalg.solve(A, flat(b))
    errors = [
        (flat(solve_linear(matvec_of(A), b, method="neumann", iters=k, step_size=0.25)) - exact)
        .norm()
        .item()
        for k in (10, 20, 40)
    ]
    assert errors[0] > errors[1] > errors[2]
    # The slowest mode contracts by (1 - step * lambda_min) = 0.875 per term.
    assert errors[2] / errors[1] == pytest.approx(0.875**20, rel=0.2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(dict(method="lu"), "method", id="bad-method"),
        pytest.param(dict(iters=0), "iters", id="zero-iters"),
        pytest.param(dict(iters=2.5), "iters", id="float-iters"),
        pytest.param(dict(damping=-0.1), "damping", id="negative-damping"),
        pytest.param(dict(damping=float("nan")), "damping", id="nan-damping"),
        pytest.param(dict(tol=-1.0), "tol", id="negative-tol"),
        pytest.param(dict(method="neumann", step_size=0.0), "step_size", id="neumann-step"),
        pytest.param(dict(method="fixed_point", step_size=-1.0), "step_size", id="fp-step"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        solve_linear(matvec_of(spd(EIGS)), rhs(), **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_runs_under_vmap_with_fixed_iterations(method):
    # Three different systems solved at once, as iMAML does for a batch of tasks.
    mats = torch.stack([spd(EIGS * s, seed=i) for i, s in enumerate((1.0, 0.7, 1.3))])
    bs = torch.stack([flat(rhs(i + 5)) for i in range(3)])
    kw = settings(method, 4.0 * 1.3)

    def solve(A, b_flat):
        return flat(solve_linear(matvec_of(A), unflat(b_flat), method=method, tol=None, **kw))

    batched = torch.func.vmap(solve)(mats, bs)
    looped = torch.stack([solve(A, b) for A, b in zip(mats, bs, strict=True)])
    expected = torch.linalg.solve(mats, bs)
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(batched, expected, rtol=1e-10, atol=1e-12)
