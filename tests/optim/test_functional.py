"""`metagrad.functional`: second-order gradients, module calls with BatchNorm, MAML, errors.

Also runs the code examples of the README's optimizer section, so they stay true.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad
from metagrad.optim import SGD, Adam

DTYPE = torch.float64
README = Path(__file__).resolve().parents[2] / "README.md"


# --- the two motivating examples -------------------------------------------------------------


def test_gradient_of_gradient_is_second_derivative() -> None:
    """y = x**2 at x = 2: dy/dx = 4 keeps its graph, and differentiates again to 2."""
    x = torch.tensor(2.0, dtype=DTYPE, requires_grad=True)
    grads = metagrad.inner_grads(x**2, {"x": x}, create_graph=True)
    assert grads["x"].item() == 4.0
    (second,) = torch.autograd.grad(grads["x"], x)
    assert second.item() == 2.0


def test_gradient_without_create_graph_is_not_differentiable() -> None:
    x = torch.tensor(2.0, dtype=DTYPE, requires_grad=True)
    grads = metagrad.inner_grads(x**2, {"x": x}, create_graph=False)
    assert not grads["x"].requires_grad


def test_one_sgd_step_hypergradient() -> None:
    """updated_x = x - lr * dy/dx, loss = 2 * updated_x at x = 2, lr = 0.1.

    d loss / d lr = -2 * dy/dx = -8; d loss / d x = 2 * (1 - 2 lr) = 1.6 (second-order term).
    """
    x = torch.tensor(2.0, dtype=DTYPE, requires_grad=True)
    lr = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    opt = SGD(lr=lr)
    params, state = metagrad.differentiable_step(opt, x**2, {"x": x}, opt.init({"x": x}))
    assert state.step == 1
    loss = 2 * params["x"]
    loss.backward()
    assert lr.grad.item() == pytest.approx(-8.0, abs=1e-12)
    assert x.grad.item() == pytest.approx(1.6, abs=1e-12)


def test_one_sgd_step_first_order_drops_the_second_order_term() -> None:
    """With create_graph=False the gradient is a constant: d loss / d x is 2, not 1.6."""
    x = torch.tensor(2.0, dtype=DTYPE, requires_grad=True)
    lr = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    opt = SGD(lr=lr)
    params, _ = metagrad.differentiable_step(
        opt, x**2, {"x": x}, opt.init({"x": x}), create_graph=False
    )
    (2 * params["x"]).backward()
    assert lr.grad.item() == pytest.approx(-8.0, abs=1e-12)
    assert x.grad.item() == pytest.approx(2.0, abs=1e-12)


# --- inner_grads -----------------------------------------------------------------------------


def test_inner_grads_rejects_non_scalar_loss() -> None:
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"loss must be a scalar tensor, got \(3,\)"):
        metagrad.inner_grads(w * 2, {"w": w})


def test_inner_grads_rejects_a_loss_that_is_not_a_tensor() -> None:
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="loss must be a scalar tensor, got float"):
        metagrad.inner_grads(1.0, {"w": w})


def test_inner_grads_rejects_params_without_grad() -> None:
    w = torch.ones(3, requires_grad=True)
    frozen = torch.ones(3)
    loss = (w * frozen).sum()
    with pytest.raises(ValueError, match=r"parameters \['frozen'\] do not require grad"):
        metagrad.inner_grads(loss, {"w": w, "frozen": frozen})


def test_inner_grads_rejects_a_loss_without_graph() -> None:
    w = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        loss = (w * 2).sum()
    with pytest.raises(ValueError, match="loss does not require grad"):
        metagrad.inner_grads(loss, {"w": w})


def test_inner_grads_gives_zero_for_unused_params() -> None:
    w = torch.tensor([1.0, 2.0], dtype=DTYPE, requires_grad=True)
    unused = torch.ones(2, 3, dtype=DTYPE, requires_grad=True)
    grads = metagrad.inner_grads((w**2).sum(), {"w": w, "unused": unused})
    assert list(grads) == ["w", "unused"]
    assert torch.equal(grads["w"], torch.tensor([2.0, 4.0], dtype=DTYPE))
    assert torch.equal(grads["unused"], torch.zeros(2, 3, dtype=DTYPE))
    # ... and an optimizer step accepts them
    opt = Adam(lr=0.1)
    params, _ = opt.step({"w": w, "unused": unused}, grads, opt.init({"w": w, "unused": unused}))
    assert torch.equal(params["unused"], unused.detach())


# --- Functional ------------------------------------------------------------------------------


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1)).double()


def test_functional_rejects_non_module() -> None:
    with pytest.raises(ValueError, match="Functional expects an nn.Module, got function"):
        metagrad.Functional(lambda x: x)


def test_functional_params_are_the_modules_own_unless_detached() -> None:
    model = bn_model()
    fmodel = metagrad.Functional(model)
    own = fmodel.params()
    assert all(p is q for p, q in zip(own.values(), model.parameters(), strict=True))
    fresh = fmodel.params(detach=True)
    for name, p in fresh.items():
        assert p.is_leaf and p.requires_grad and p is not own[name]
        assert torch.equal(p, own[name])


def test_functional_batchnorm_train_mode_updates_buffer_copies_only() -> None:
    model = bn_model().train()
    twin = copy.deepcopy(model)
    fmodel = metagrad.Functional(model)
    before = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE) + 2.0

    buffers = fmodel.buffers()
    out = fmodel(fmodel.params(), x, buffers=buffers)

    # the same output and the same buffer update as the module itself in train mode
    expected = twin(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name, b in twin.named_buffers():
        torch.testing.assert_close(buffers[name], b, rtol=1e-12, atol=0)
    assert buffers["1.num_batches_tracked"].item() == 1
    assert not torch.equal(buffers["1.running_mean"], before["1.running_mean"])
    # the module's own buffers are untouched
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name


def test_functional_batchnorm_eval_mode_uses_running_stats() -> None:
    model = bn_model()
    g = torch.Generator().manual_seed(2)
    buffers = metagrad.Functional(model).buffers()
    buffers["1.running_mean"] = torch.randn(4, generator=g, dtype=DTYPE)
    buffers["1.running_var"] = torch.rand(4, generator=g, dtype=DTYPE) + 0.5
    model.eval()
    fmodel = metagrad.Functional(model)
    params = fmodel.params()
    x = torch.randn(5, 3, generator=g, dtype=DTYPE)
    out = fmodel(params, x, buffers=buffers)

    h = x @ params["0.weight"].T + params["0.bias"]
    bn = model[1]
    h = (h - buffers["1.running_mean"]) / torch.sqrt(buffers["1.running_var"] + bn.eps)
    h = torch.relu(h * params["1.weight"] + params["1.bias"])
    expected = h @ params["3.weight"].T + params["3.bias"]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # eval mode does not update the running statistics
    assert buffers["1.num_batches_tracked"].item() == 0


def test_functional_batchnorm_unroll_has_exact_hypergradient() -> None:
    """A differentiable inner loop through a BatchNorm model (train mode) passes gradcheck."""
    model = bn_model().train()
    fmodel = metagrad.Functional(model)
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(8, 3, generator=g, dtype=DTYPE), torch.randn(8, 1, generator=g, dtype=DTYPE))
        for _ in range(4)
    ]

    def val_loss(lr):
        params = fmodel.params(detach=True)
        buffers = fmodel.buffers()
        opt = SGD(lr=lr, momentum=0.9)
        state = opt.init(params)
        for x, y in batches[:3]:
            loss = F.mse_loss(fmodel(params, x, buffers=buffers), y)
            params, state = metagrad.differentiable_step(opt, loss, params, state)
        x, y = batches[3]
        return F.mse_loss(fmodel(params, x, buffers=buffers), y)

    lr = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(val_loss, (lr,), eps=1e-6, atol=1e-8, rtol=1e-6)


# --- MAML on a module ------------------------------------------------------------------------


def test_maml_meta_gradient_reaches_module_params_and_matches_finite_differences() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    fmodel = metagrad.Functional(model)
    g = torch.Generator().manual_seed(5)
    xs = torch.rand(10, 1, generator=g, dtype=DTYPE) * 4 - 2
    xq = torch.rand(10, 1, generator=g, dtype=DTYPE) * 4 - 2
    ys, yq = torch.sin(xs + 0.5), torch.sin(xq + 0.5)
    inner = SGD(lr=0.1)

    def meta_loss() -> torch.Tensor:
        params = fmodel.params()  # the module's own weights: the meta-learned init
        state = inner.init(params)
        for _ in range(3):
            loss = F.mse_loss(fmodel(params, xs), ys)
            params, state = metagrad.differentiable_step(inner, loss, params, state)
        return F.mse_loss(fmodel(params, xq), yq)

    model.zero_grad()
    meta_loss().backward()
    analytic = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in analytic.values())

    def shifted_loss(flat: torch.Tensor, i: int, h: float) -> torch.Tensor:
        with torch.no_grad():  # the test harness moves the module's weight in place
            flat[i] += h
        loss = meta_loss().detach()
        with torch.no_grad():
            flat[i] -= h
        return loss

    h = 1e-6
    for name, p in model.named_parameters():
        flat = p.view(-1)
        numeric = torch.stack(
            [
                (shifted_loss(flat, i, h) - shifted_loss(flat, i, -h)) / (2 * h)
                for i in range(flat.numel())
            ]
        ).view_as(p)
        torch.testing.assert_close(analytic[name], numeric, rtol=1e-6, atol=1e-9)
