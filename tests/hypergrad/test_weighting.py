"""Data weightings (`ExampleWeights`, `MetaWeightNet`) as meta-parameters of the inner loss.

Hypergradients through short unrolled runs match central finite differences; the exact
estimators agree with `Unrolled`; `Implicit` agrees with `Unrolled` on a strongly convex
problem (L2-regularized softmax regression, full batch) run to convergence; `FirstOrder` sees
no data weights; bad input is refused by name. All numbers are float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import metagrad
from metagrad.hypergrad import Checkpointed, FirstOrder, ForwardMode, Implicit, Unrolled
from metagrad.optim import SGD
from metagrad.weighting import ExampleWeights, MetaWeightNet, weighted_loss

DT = torch.float64
N, D, C = 12, 3, 3  # training examples, features, classes


def data(n: int = N, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=g, dtype=DT)
    y = torch.randint(0, C, (n,), generator=g)
    Xv = torch.randn(9, D, generator=g, dtype=DT)
    yv = torch.randint(0, C, (9,), generator=g)
    return X, y, Xv, yv


def mlp_params(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": 0.7 * torch.randn(D, 4, generator=g, dtype=DT),
        "b1": 0.1 * torch.randn(4, generator=g, dtype=DT),
        "w2": 0.7 * torch.randn(4, C, generator=g, dtype=DT),
        "b2": torch.zeros(C, dtype=DT),
    }


def mlp(p, x):
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def linear(p, x):
    return x @ p["w"] + p["b"]


def make_meta(kind: str, seed: int = 3) -> metagrad.MetaParameters:
    meta = metagrad.MetaParameters()
    if kind == "examples":
        g = torch.Generator().manual_seed(seed)
        init = torch.exp(0.3 * torch.randn(N, generator=g, dtype=DT))  # not all equal
        meta.add_module("weights", ExampleWeights(N, init))
    elif kind == "examples-unit":
        meta.add_module("weights", ExampleWeights(N, 0.6, constraint="unit", dtype=DT))
    else:
        torch.manual_seed(seed)
        meta.add_module("weights", MetaWeightNet(hidden=3, dtype=DT))
    return meta


def problem_for(
    kind, model, init, steps, normalize="weights", batches=None, l2=0.0, lr=0.3, momentum=0.9
):
    X, y, Xv, yv = data()

    def inner(p, m, idx):
        losses = F.cross_entropy(model(p, X[idx]), y[idx], reduction="none")
        weighting = m.value("weights")
        w = weighting(losses) if kind == "mwn" else weighting(idx)
        penalty = sum(t.pow(2).sum() for t in p.values())
        return weighted_loss(losses, w, normalize=normalize) + 0.5 * l2 * penalty

    if batches is None:  # minibatches of 6, overlapping, so every example appears
        batches = [torch.arange(2 * t, 2 * t + 6) % N for t in range(steps)]
    return metagrad.InnerProblem(
        init=init,
        optimizer=lambda m, t: SGD(lr=lr, momentum=momentum),
        inner_loss=inner,
        outer_loss=lambda p, m, b: F.cross_entropy(model(p, b[0]), b[1]),
        inner_batches=batches,
        outer_batch=(Xv, yv),
        steps=steps,
    )


def finite_differences(problem, meta, eps=1e-6) -> dict[str, torch.Tensor]:
    """Central differences of the outer loss after the inner run, per stored coordinate."""
    out = {}
    for name, p in meta.named_parameters():
        grad = torch.zeros_like(p)
        for i in range(p.numel()):
            values = []
            for sign in (1, -1):
                with torch.no_grad():
                    p.view(-1)[i] += sign * eps
                values.append(float(Unrolled()(problem, meta).outer_loss))
                with torch.no_grad():
                    p.view(-1)[i] -= sign * eps
            grad.view(-1)[i] = (values[0] - values[1]) / (2 * eps)
        out[name] = grad
    return out


def assert_agree(got: dict, expected: dict, rtol: float) -> None:
    """Each meta-parameter's gradient matches to `rtol` of its largest entry."""
    assert max(float(g.abs().max()) for g in expected.values()) > 1e-3, "vacuous check"
    for name, g in expected.items():
        assert (got[name] - g).abs().max() <= rtol * g.abs().max(), name


KINDS = ["examples", "examples-unit", "mwn"]


@pytest.mark.parametrize("normalize", ["weights", "count"])
@pytest.mark.parametrize("kind", KINDS)
def test_unrolled_hypergradient_matches_finite_differences(kind, normalize):
    meta = make_meta(kind)
    problem = problem_for(kind, mlp, mlp_params(), steps=4, normalize=normalize)
    result = Unrolled()(problem, meta)
    expected = finite_differences(problem, meta)
    for name, g in expected.items():
        assert g.abs().max() > 1e-4, f"{name}: a vanishing reference makes the check vacuous"
        torch.testing.assert_close(result.grads[name], g, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(Checkpointed(), id="checkpointed-default"),
        pytest.param(Checkpointed(2), id="checkpointed-2"),
        pytest.param(ForwardMode(max_directions=64), id="forward-mode"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_exact_methods_agree_with_unrolled(kind, method):
    meta = make_meta(kind)
    problem = problem_for(kind, mlp, mlp_params(), steps=7)
    ref = Unrolled()(problem, meta)
    result = method(problem, meta)
    assert_agree(result.grads, ref.grads, 1e-8)
    assert result.outer_loss == pytest.approx(float(ref.outer_loss), rel=1e-12)


def test_first_order_sees_no_data_weights():
    # Weights enter training only through the inner gradient, which FirstOrder holds constant.
    meta = make_meta("examples")
    problem = problem_for("examples", mlp, mlp_params(), steps=4)
    with pytest.warns(UserWarning, match="do not affect the outer loss"):
        result = FirstOrder()(problem, meta)
    assert torch.equal(result.grads["weights.raw"], torch.zeros(N, dtype=DT))
    assert Unrolled()(problem, meta).grads["weights.raw"].abs().max() > 1e-4


def linear_params() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(D, C, dtype=DT), "b": torch.zeros(C, dtype=DT)}


@pytest.mark.parametrize(
    ("kind", "normalize", "implicit"),
    [
        pytest.param("examples", "weights", Implicit(solver="cg", iters=40), id="examples-cg"),
        pytest.param("examples-unit", "count", Implicit(solver="cg", iters=40), id="unit-cg"),
        # The inner gradient's Jacobian is symmetric for a Meta-Weight-Net with a fixed
        # normalizer (it is the Hessian of sum_i G(loss_i), G' = the net) ...
        pytest.param("mwn", "count", Implicit(solver="cg", iters=40), id="mwn-count-cg"),
        # ... but not with the weights' sum as normalizer: a fixed-point solve does not need
        # symmetry.
        pytest.param(
            "mwn",
            "weights",
            Implicit(solver="fixed_point", iters=400, step_size=1.0, tol=1e-13),
            id="mwn-weights-fixed-point",
        ),
    ],
)
def test_implicit_matches_unrolled_on_converged_convex_problem(kind, normalize, implicit):
    meta = make_meta(kind)
    everything = torch.arange(N)
    problem = problem_for(
        kind,
        linear,
        linear_params(),
        steps=300,
        normalize=normalize,
        batches=lambda t: everything,
        l2=0.1,
        lr=1.0,
        momentum=0.5,  # converges to 1e-16 in 300 steps here
    )
    ref = Unrolled()(problem, meta)
    result = implicit(problem, meta)
    assert result.metrics["implicit/inner_grad_norm"] < 1e-12
    assert result.metrics["implicit/residual"] < 1e-10
    assert_agree(result.grads, ref.grads, 1e-7)


def test_weighted_loss_value_and_gradients():
    losses = torch.tensor([0.5, 2.0, 1.0], dtype=DT, requires_grad=True)
    raw = torch.tensor([1.0, 3.0, 0.5], dtype=DT, requires_grad=True)
    for normalize, z in [("weights", 4.5), ("count", 3.0), ("none", 1.0)]:
        w = raw * 1.0
        value = weighted_loss(losses, w, normalize=normalize)
        assert float(value.detach()) == pytest.approx((0.5 + 6.0 + 0.5) / z, rel=1e-15)
        grad_losses, grad_raw = torch.autograd.grad(value, [losses, raw], allow_unused=True)
        torch.testing.assert_close(grad_losses, w.detach() / z, rtol=1e-15, atol=0)
        assert grad_raw is None  # weights reach the meta-gradient through the inner gradient
    # A weighted mean: scaling every weight changes neither the value nor the gradient.
    w = raw.detach()
    scaled = weighted_loss(losses, 7 * w)
    assert float(scaled.detach()) == pytest.approx(float(weighted_loss(losses, w).detach()))
    torch.testing.assert_close(torch.autograd.grad(scaled, losses)[0], w / 4.5)
    # All-zero weights give a zero loss, not NaN.
    assert float(weighted_loss(losses, torch.zeros(3, dtype=DT)).detach()) == 0.0


def test_inner_gradient_keeps_the_graph_into_the_weights():
    # d/d raw of the inner gradient: the weighted sum of per-example gradients, exactly.
    X, y, _, _ = data()
    p = {n: t.requires_grad_() for n, t in linear_params().items()}
    p["w"] = (p["w"] + 0.1).detach().requires_grad_()
    weights = ExampleWeights(N, 2.0, dtype=DT)
    idx = torch.tensor([0, 3, 5, 5])
    losses = F.cross_entropy(linear(p, X[idx]), y[idx], reduction="none")
    (g,) = torch.autograd.grad(weighted_loss(losses, weights(idx)), [p["w"]], create_graph=True)
    v = torch.randn(D, C, generator=torch.Generator().manual_seed(0), dtype=DT)
    (got,) = torch.autograd.grad((g * v).sum(), [weights.raw])
    per_example = torch.stack(
        [torch.autograd.grad(losses[i], [p["w"]], retain_graph=True)[0] for i in range(4)]
    )
    alignment = (per_example * v).sum(dim=(1, 2))  # v . grad loss_i
    w = torch.full((4,), 2.0, dtype=DT)
    # d/d w_i of sum_j w_j a_j / sum_j w_j = (a_i - mean_w a) / sum w; times dw/draw = w.
    d_w = (alignment - (w * alignment).sum() / w.sum()) / w.sum()
    expected = torch.zeros(N, dtype=DT).index_add(0, idx, d_w * w)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_example_weights_lookup_and_storage():
    weights = ExampleWeights(5, torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=DT))
    assert weights.num_examples == 5
    torch.testing.assert_close(weights.raw.detach(), torch.log(weights.values().detach()))
    got = weights(torch.tensor([4, 1, 1]))
    torch.testing.assert_close(got, torch.tensor([3.0, 2.0, 2.0], dtype=DT))
    unit = ExampleWeights(3, 0.25, constraint="unit", dtype=DT)
    torch.testing.assert_close(unit.values(), torch.full((3,), 0.25, dtype=DT))
    free = ExampleWeights(3, 0.0, constraint=None, dtype=DT)  # Ren et al.'s eps, from 0
    torch.testing.assert_close(free.values(), torch.zeros(3, dtype=DT))

    meta = metagrad.MetaParameters()
    meta.add_module("weights", weights)
    assert list(dict(meta.named_parameters())) == ["weights.raw"]
    assert meta.value("weights") is weights


def test_meta_weight_net_shapes_and_range():
    torch.manual_seed(0)
    net = MetaWeightNet()  # 100 hidden units, as in the paper
    assert sum(p.numel() for p in net.parameters()) == 100 + 100 + 100 + 1
    w = net(torch.linspace(0, 10, 7))
    assert w.shape == (7,)
    assert bool(((w > 0) & (w < 1)).all())
    assert net(torch.zeros(0)).shape == (0,)


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        (torch.tensor([0, 5]), r"out of range: \[5\]"),
        (torch.tensor([-1, 2]), r"out of range: \[-1\]"),
        (torch.tensor([[0, 1]]), "1-D integer tensor"),
        (torch.tensor([0.0, 1.0]), "1-D integer tensor"),
        (torch.tensor([True, False, True, False, True]), "boolean mask"),
        ([0, 1], "must be a tensor"),
    ],
    ids=["too-large", "negative", "2-d", "float", "mask", "list"],
)
def test_example_weights_refuse_bad_indices(indices, match):
    with pytest.raises(ValueError, match=match):
        ExampleWeights(5)(indices)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_examples": 0}, "num_examples"),
        ({"num_examples": 3.0}, "num_examples"),
        ({"num_examples": 3, "init": torch.ones(4)}, r"init: shape \(4,\)"),
        ({"num_examples": 3, "init": -1.0}, "must be > 0"),
        ({"num_examples": 3, "init": 1.0, "constraint": "unit"}, "strictly inside"),
        ({"num_examples": 3, "constraint": "negative"}, "Invalid constraint"),
    ],
    ids=["zero", "float", "init-shape", "init-negative", "init-unit", "constraint"],
)
def test_example_weights_refuse_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExampleWeights(**kwargs)


def test_meta_weight_net_and_weighted_loss_refuse_bad_input():
    with pytest.raises(ValueError, match="hidden"):
        MetaWeightNet(hidden=0)
    net = MetaWeightNet(hidden=2)
    with pytest.raises(ValueError, match="losses must be a 1-D floating-point"):
        net(torch.ones(3, 1))
    with pytest.raises(ValueError, match="losses must be a 1-D floating-point"):
        net(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="same shape"):
        weighted_loss(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="weights must be a 1-D"):
        weighted_loss(torch.ones(3), torch.ones(3, 1))
    with pytest.raises(ValueError, match="losses must be a 1-D"):
        weighted_loss(torch.tensor(1.0), torch.ones(1))
    with pytest.raises(ValueError, match="Invalid normalize"):
        weighted_loss(torch.ones(3), torch.ones(3), normalize="mean")


def test_no_warning_from_exact_methods():
    meta = make_meta("mwn")
    problem = problem_for("mwn", mlp, mlp_params(), steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Unrolled()(problem, meta)
        Checkpointed()(problem, meta)
