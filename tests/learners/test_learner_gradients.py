"""Meta-gradients of metagrad.learners: vmap equals the loop, closed forms, finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad
from metagrad.learners import ANIL, MAML, MAMLPlusPlus, MetaSGD, Reptile, iMAML
from metagrad.optim import SGD, Adam

DTYPE = torch.float64


def tiny_mlp(seed: int = 0, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(DTYPE)


def sine_batch(tasks: int = 4, shots: int = 5, seed: int = 0):
    from metagrad.tasks import SinusoidTasks

    return SinusoidTasks(seed=seed, dtype=DTYPE).sample(tasks, shots, shots + 1)


def meta_grads(algo: nn.Module, batch) -> dict[str, torch.Tensor]:
    algo.zero_grad()
    algo(*batch).backward()
    return {n: p.grad.clone() for n, p in algo.named_parameters()}


LEARNERS = {
    "maml": lambda m, v: MAML(m, inner_lr=0.1, inner_steps=3, vectorize=v),
    "fomaml": lambda m, v: MAML(m, inner_lr=0.1, inner_steps=3, first_order=True, vectorize=v),
    "maml-adam-inner": lambda m, v: MAML(
        m, inner_lr=0.05, inner_steps=3, inner_optim=Adam, vectorize=v
    ),
    "metasgd": lambda m, v: MetaSGD(m, inner_lr=0.1, inner_steps=2, vectorize=v),
    "anil": lambda m, v: ANIL(m, inner_lr=0.1, inner_steps=3, vectorize=v),
    "mamlpp-msl": lambda m, v: MAMLPlusPlus(
        m, inner_lr=0.1, inner_steps=3, step_weights=[0.2, 0.3, 0.5], vectorize=v
    ),
    "imaml": lambda m, v: iMAML(
        m, inner_lr=0.1, inner_steps=5, lam=2.0, solver_iters=5, vectorize=v
    ),
    "reptile": lambda m, v: Reptile(m, inner_lr=0.1, inner_steps=3, vectorize=v),
}


@pytest.mark.parametrize("name", list(LEARNERS))
def test_vmap_and_loop_give_the_same_meta_gradients(name):
    batch = sine_batch()
    vmapped = LEARNERS[name](tiny_mlp(), True)
    looped = LEARNERS[name](tiny_mlp(), False)
    assert vmapped(*batch).item() == pytest.approx(looped(*batch).item(), abs=1e-12)
    g_vmap, g_loop = meta_grads(vmapped, batch), meta_grads(looped, batch)
    assert g_vmap.keys() == g_loop.keys()
    for n in g_vmap:
        assert g_vmap[n].abs().sum() > 0, f"no meta-gradient reached {n}"
        torch.testing.assert_close(g_vmap[n], g_loop[n], atol=1e-10, rtol=0)


def hand_adapt(model, x, y, lr, steps, create_graph):
    fm = metagrad.Functional(model)
    params = fm.params()
    for _ in range(steps):
        loss = F.mse_loss(fm(params, x), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
    return fm, params


def test_fomaml_matches_a_hand_computed_first_order_gradient():
    model = tiny_mlp()
    sx, sy, qx, qy = sine_batch()
    algo = MAML(model, inner_lr=0.1, inner_steps=3, first_order=True)
    got = meta_grads(algo, (sx, sy, qx, qy))
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(sx.shape[0]):
        # First order: adapt without a graph, then the query gradient at the adapted weights.
        fm, params = hand_adapt(model, sx[i], sy[i], 0.1, 3, create_graph=False)
        params = {n: p.detach().requires_grad_() for n, p in params.items()}
        query = F.mse_loss(fm(params, qx[i]), qy[i])
        for n, g in zip(params, torch.autograd.grad(query, list(params.values())), strict=True):
            expected[n] += g / sx.shape[0]
    for n in expected:
        torch.testing.assert_close(got[f"model.{n}"], expected[n], atol=1e-12, rtol=0)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_maml_one_step_linear_model_matches_closed_form(first_order):
    torch.manual_seed(1)
    d, tasks, n, m, lr = 3, 4, 6, 7, 0.05
    model = nn.Linear(d, 1, bias=False).to(DTYPE)
    sx, qx = torch.randn(tasks, n, d, dtype=DTYPE), torch.randn(tasks, m, d, dtype=DTYPE)
    sy, qy = torch.randn(tasks, n, 1, dtype=DTYPE), torch.randn(tasks, m, 1, dtype=DTYPE)
    algo = MAML(model, inner_lr=lr, inner_steps=1, first_order=first_order)
    got = meta_grads(algo, (sx, sy, qx, qy))["model.weight"].reshape(d)
    w = model.weight.detach().reshape(d)
    expected = torch.zeros(d, dtype=DTYPE)
    for i in range(tasks):
        # L_s(w) = |X w - y|^2 / n, so w' = (I - lr A) w + lr b with A = 2 X'X / n, b = 2 X'y / n.
        a = 2 * sx[i].T @ sx[i] / n
        b = 2 * sx[i].T @ sy[i].reshape(n) / n
        w_new = (torch.eye(d, dtype=DTYPE) - lr * a) @ w + lr * b
        g_query = 2 * qx[i].T @ (qx[i] @ w_new - qy[i].reshape(m)) / m
        jac = torch.eye(d, dtype=DTYPE) if first_order else torch.eye(d, dtype=DTYPE) - lr * a
        expected += jac.T @ g_query / tasks
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


FD_LEARNERS = {
    "maml": lambda m: MAML(m, inner_lr=0.1, inner_steps=2),
    "maml-adam-inner": lambda m: MAML(m, inner_lr=0.05, inner_steps=2, inner_optim=Adam),
    "maml-momentum-inner": lambda m: MAML(
        m, inner_lr=0.1, inner_steps=2, inner_optim=lambda lr: SGD(lr=lr, momentum=0.9)
    ),
    "metasgd": lambda m: MetaSGD(m, inner_lr=0.1, inner_steps=2),
    "mamlpp": lambda m: MAMLPlusPlus(m, inner_lr=0.1, inner_steps=2, step_weights=[0.4, 0.6]),
    "anil": lambda m: ANIL(m, inner_lr=0.1, inner_steps=2),
}


@pytest.mark.parametrize("name", list(FD_LEARNERS))
def test_meta_gradient_matches_finite_differences(name):
    algo = FD_LEARNERS[name](tiny_mlp(hidden=3))
    batch = sine_batch(tasks=3, shots=4)
    grads = meta_grads(algo, batch)
    eps = 1e-6
    for n, p in algo.named_parameters():
        flat = p.detach().view(-1)
        for j in range(flat.numel()):
            with torch.no_grad():
                orig = flat[j].item()
                flat[j] = orig + eps
                up = algo(*batch).item()
                flat[j] = orig - eps
                down = algo(*batch).item()
                flat[j] = orig
            fd = (up - down) / (2 * eps)
            assert grads[n].view(-1)[j].item() == pytest.approx(fd, abs=1e-7, rel=1e-6), (n, j)


def test_imaml_matches_the_implicit_gradient_of_the_exact_inner_optimum():
    # Linear regression: the proximal inner problem has a closed-form optimum
    # w*(theta) = (A + lam I)^-1 (b + lam theta), so d q(w*) / d theta is exact.
    torch.manual_seed(2)
    d, tasks, n, m, lam = 3, 3, 8, 6, 2.0
    model = nn.Linear(d, 1, bias=False).to(DTYPE)
    sx, qx = torch.randn(tasks, n, d, dtype=DTYPE), torch.randn(tasks, m, d, dtype=DTYPE)
    sy, qy = torch.randn(tasks, n, 1, dtype=DTYPE), torch.randn(tasks, m, 1, dtype=DTYPE)
    # Enough inner steps to converge; CG with d iterations is exact for d unknowns.
    algo = iMAML(model, inner_lr=0.1, inner_steps=400, lam=lam, solver="cg", solver_iters=d)
    got = meta_grads(algo, (sx, sy, qx, qy))["model.weight"].reshape(d)

    theta = model.weight.detach().reshape(d).clone().requires_grad_()
    total = 0.0
    for i in range(tasks):
        a = 2 * sx[i].T @ sx[i] / n
        b = 2 * sx[i].T @ sy[i].reshape(n) / n
        w_star = torch.linalg.solve(a + lam * torch.eye(d, dtype=DTYPE), b + lam * theta)
        total = total + ((qx[i] @ w_star - qy[i].reshape(m)) ** 2).mean() / tasks
    (expected,) = torch.autograd.grad(total, theta)
    torch.testing.assert_close(got, expected, atol=1e-8, rtol=0)
    assert algo(sx, sy, qx, qy).item() == pytest.approx(total.item(), abs=1e-8)


@pytest.mark.parametrize("solver", ["neumann", "fixed_point"])
def test_imaml_other_solvers_agree_with_cg(solver):
    batch = sine_batch()
    # lam = 10 keeps I + H / lam positive definite with eigenvalues below 2 / step_size, where
    # the Neumann and fixed-point iterations converge.
    common = dict(inner_lr=0.1, inner_steps=5, lam=10.0)
    ref = meta_grads(iMAML(tiny_mlp(), solver_iters=30, **common), batch)
    got = meta_grads(
        iMAML(tiny_mlp(), solver=solver, solver_iters=200, step_size=0.5, **common), batch
    )
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5)


def test_reptile_gradient_is_theta_minus_mean_adapted_weights():
    model = tiny_mlp()
    sx, sy, qx, qy = sine_batch()
    got = meta_grads(Reptile(model, inner_lr=0.1, inner_steps=3), (sx, sy, qx, qy))
    adapted = [
        hand_adapt(model, sx[i], sy[i], 0.1, 3, create_graph=False)[1] for i in range(sx.shape[0])
    ]
    for n, p in model.named_parameters():
        mean = torch.stack([a[n].detach() for a in adapted]).mean(0)
        torch.testing.assert_close(got[f"model.{n}"], p.detach() - mean, atol=1e-12, rtol=0)


def test_maml_with_adam_inner_loop_matches_a_hand_written_unroll():
    model = tiny_mlp()
    sx, sy, qx, qy = sine_batch()
    got = meta_grads(MAML(model, inner_lr=0.05, inner_steps=3, inner_optim=Adam), (sx, sy, qx, qy))
    model.zero_grad()
    opt = Adam(lr=0.05)
    fm = metagrad.Functional(model)
    for i in range(sx.shape[0]):
        params = fm.params()
        state = opt.init(params)
        for _ in range(3):
            loss = F.mse_loss(fm(params, sx[i]), sy[i])
            params, state = metagrad.differentiable_step(opt, loss, params, state)
        (F.mse_loss(fm(params, qx[i]), qy[i]) / sx.shape[0]).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[f"model.{n}"], p.grad, atol=1e-12, rtol=0)


def test_imaml_agrees_with_the_implicit_hypergradient_estimator():
    # The same inner problem through metagrad.hypergrad.Implicit: the proximal term carries
    # theta into the inner loss, and d/dtheta = lam (H + lam I)^-1 g = (I + H / lam)^-1 g.
    from metagrad.hypergrad import Implicit

    model, lam, steps = tiny_mlp(), 2.0, 30
    sx, sy, qx, qy = sine_batch(tasks=1)
    algo = iMAML(model, inner_lr=0.1, inner_steps=steps, lam=lam, solver_iters=60)
    got = meta_grads(algo, (sx, sy, qx, qy))

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    meta = metagrad.MetaParameters()
    meta.add("init", params, constraint=None, scope="per_element", params=params)
    fm = metagrad.Functional(model)

    def inner_loss(p, meta, batch):
        theta = meta.value("init")
        prox = sum(((p[k] - theta[k]) ** 2).sum() for k in p)
        return F.mse_loss(fm(p, sx[0]), sy[0]) + 0.5 * lam * prox

    problem = metagrad.InnerProblem(
        init=lambda meta: {k: v.detach() for k, v in meta.value("init").items()},
        optimizer=lambda meta, t: SGD(lr=0.1),
        inner_loss=inner_loss,
        outer_loss=lambda p, meta, batch: F.mse_loss(fm(p, qx[0]), qy[0]),
        inner_batches=lambda t: None,
        outer_batch=None,
        steps=steps,
    )
    expected = Implicit(solver="cg", iters=60)(problem, meta).grads
    for (name, g), e in zip(got.items(), expected.values(), strict=True):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=0, msg=name)
