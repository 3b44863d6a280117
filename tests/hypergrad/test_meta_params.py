"""`MetaParameters`: every constraint and scope (with and without a per-step schedule), the
stored unconstrained values, the forms handed to `metagrad.optim`, gradients into the raw
storage, module meta-parameters, and errors for bad input. float64 throughout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import metagrad
from metagrad.optim import SGD, Adam

DT = torch.float64
SHAPES = {"0.weight": (3, 2), "0.bias": (3,), "2.weight": (1, 3)}  # dotted names, as in modules
STEPS = 4


def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g, dtype=DT) for n, s in SHAPES.items()}


CONSTRAINTS = {
    "free": None,
    "positive": "positive",
    "unit": "unit",
    "interval": (0.5, 2.0),
}


def in_domain(constraint, shape, seed: int) -> torch.Tensor:
    """Random values strictly inside the constraint's domain."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
    if constraint is None:
        return z
    if constraint == "positive":
        return 0.1 * torch.exp(0.5 * z)
    low, high = (0.0, 1.0) if constraint == "unit" else constraint
    return low + (high - low) * torch.sigmoid(z)


def inverse(constraint, value: torch.Tensor) -> torch.Tensor:
    """The unconstrained value the storage must hold."""
    if constraint is None:
        return value
    if constraint == "positive":
        return value.log()
    low, high = (0.0, 1.0) if constraint == "unit" else constraint
    u = (value - low) / (high - low)
    return torch.log(u) - torch.log1p(-u)


def derivative(constraint, value: torch.Tensor) -> torch.Tensor:
    """d value / d raw."""
    if constraint is None:
        return torch.ones_like(value)
    if constraint == "positive":
        return value
    low, high = (0.0, 1.0) if constraint == "unit" else constraint
    u = (value - low) / (high - low)
    return (high - low) * u * (1 - u)


def build(constraint, scope, steps):
    """A meta-parameter 'x' with distinct values everywhere, and its expected value at step t."""
    lead = () if steps is None else (steps,)
    names = list(SHAPES)
    meta = metagrad.MetaParameters()
    if scope == "scalar":
        init = in_domain(constraint, lead, 1)
        meta.add("x", init, constraint=constraint, steps=steps, dtype=DT)

        def expected(t):
            return init if steps is None else init[t]

    elif scope == "per_layer":
        init = in_domain(constraint, lead + (len(names),), 2)
        # A mapping for the plain scope, a stacked [steps, layers] tensor for a schedule.
        given = {n: init[..., i] for i, n in enumerate(names)} if steps is None else init
        meta.add("x", given, constraint=constraint, scope=scope, params=params(), steps=steps)

        def expected(t):
            row = init if steps is None else init[t]
            return {n: row[i] for i, n in enumerate(names)}

    else:
        init = {
            n: in_domain(constraint, lead + s, 3 + i) for i, (n, s) in enumerate(SHAPES.items())
        }
        meta.add("x", init, constraint=constraint, scope=scope, params=params(), steps=steps)

        def expected(t):
            return {n: v if steps is None else v[t] for n, v in init.items()}

    return meta, expected


GRID = [
    pytest.param(c, scope, steps, id=f"{cid}-{scope}-{'steps' if steps else 'const'}")
    for cid, c in CONSTRAINTS.items()
    for scope in ("scalar", "per_layer", "per_element")
    for steps in (None, STEPS)
]


def steps_of(steps):
    return [None] if steps is None else list(range(steps))


@pytest.mark.parametrize("constraint, scope, steps", GRID)
def test_value_round_trips_the_initial_value(constraint, scope, steps):
    meta, expected = build(constraint, scope, steps)
    for t in steps_of(steps):
        value, want = meta.value("x", step=t), expected(t)
        if scope == "scalar":
            assert isinstance(value, torch.Tensor) and value.dim() == 0
            torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-12)
        else:
            assert isinstance(value, dict) and list(value) == list(SHAPES)
            for n in SHAPES:
                shape = () if scope == "per_layer" else SHAPES[n]
                assert value[n].shape == shape and value[n].dtype == DT
                torch.testing.assert_close(value[n], want[n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("constraint, scope, steps", GRID)
def test_storage_holds_the_unconstrained_value(constraint, scope, steps):
    meta, expected = build(constraint, scope, steps)
    raw = dict(meta.named_parameters())
    if scope == "per_element":
        assert set(raw) == {f"x.{n.replace('.', '__')}" for n in SHAPES}
    else:
        assert set(raw) == {"x"}
    for t in steps_of(steps):
        want = expected(t)
        if scope == "scalar":
            stored = raw["x"] if t is None else raw["x"][t]
            torch.testing.assert_close(stored, inverse(constraint, want), rtol=1e-10, atol=1e-12)
            continue
        for i, n in enumerate(SHAPES):
            if scope == "per_layer":
                stored = raw["x"][..., i] if t is None else raw["x"][t, i]
            else:
                full = raw[f"x.{n.replace('.', '__')}"]
                stored = full if t is None else full[t]
            torch.testing.assert_close(stored, inverse(constraint, want[n]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("constraint, scope, steps", GRID)
def test_gradients_reach_the_raw_storage(constraint, scope, steps):
    meta, expected = build(constraint, scope, steps)
    t = None if steps is None else 2
    value = meta.value("x", step=t)
    values = {"": value} if scope == "scalar" else value
    coefs = {n: in_domain(None, v.shape, 10 + i) for i, (n, v) in enumerate(values.items())}
    sum((coefs[n] * v).sum() for n, v in values.items()).backward()

    want = expected(t)
    want = {"": want} if scope == "scalar" else want
    for i, n in enumerate(values):
        d = coefs[n] * derivative(constraint, want[n])
        if scope == "scalar":
            grad = meta.x.grad
        elif scope == "per_layer":
            grad = meta.x.grad[..., i]
        else:
            grad = dict(meta.named_parameters())[f"x.{n.replace('.', '__')}"].grad
        if t is None:
            torch.testing.assert_close(grad, d, rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(grad[t], d, rtol=1e-10, atol=1e-12)
            others = torch.cat([grad[:t], grad[t + 1 :]])
            assert torch.equal(others, torch.zeros_like(others))  # other steps untouched


@pytest.mark.parametrize("scope", ["scalar", "per_layer", "per_element"])
def test_values_drive_sgd_with_momentum(scope):
    p0 = params()
    meta = metagrad.MetaParameters()
    kw = dict(scope=scope, params=p0) if scope != "scalar" else dict(dtype=DT)
    lr_init = {n: 0.1 * (i + 1) for i, n in enumerate(SHAPES)} if scope != "scalar" else 0.1
    meta.add("lr", lr_init, constraint="positive", **kw)
    meta.add("momentum", 0.8, constraint="unit", **kw)
    opt = SGD(lr=meta.value("lr"), momentum=meta.value("momentum"))
    g1 = {n: torch.full_like(p, 1.0) for n, p in p0.items()}
    g2 = {n: torch.full_like(p, -0.5) for n, p in p0.items()}
    state = opt.init(p0)
    p1, state = opt.step(p0, g1, state)
    p2, state = opt.step(p1, g2, state)
    for i, n in enumerate(SHAPES):
        lr = 0.1 * (i + 1) if scope != "scalar" else 0.1
        want = p0[n] - lr * g1[n] - lr * (0.8 * g1[n] + g2[n])
        torch.testing.assert_close(p2[n], want, rtol=1e-12, atol=1e-12)
    loss = sum(p.sum() for p in p2.values())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in meta.parameters())


@pytest.mark.parametrize("scope", ["scalar", "per_layer"])
def test_values_drive_adam_like_torch_optim(scope):
    p0 = params()
    meta = metagrad.MetaParameters()
    kw = dict(scope=scope, params=p0) if scope != "scalar" else dict(dtype=DT)
    lrs = [0.01, 0.02, 0.03]
    meta.add("lr", dict(zip(SHAPES, lrs, strict=True)) if scope != "scalar" else 0.01, **kw)
    meta.add("beta1", 0.7, constraint="unit", **kw)
    meta.add("beta2", 0.95, constraint="unit", **kw)
    meta.add("eps", 1e-3, constraint="positive", **kw)
    opt = Adam(
        lr=meta.value("lr"),
        betas=(meta.value("beta1"), meta.value("beta2")),
        eps=meta.value("eps"),
    )
    leaves = {n: nn.Parameter(p.clone()) for n, p in p0.items()}
    groups = [
        {"params": [leaves[n]], "lr": lrs[i] if scope != "scalar" else 0.01}
        for i, n in enumerate(SHAPES)
    ]
    ref = torch.optim.Adam(groups, betas=(0.7, 0.95), eps=1e-3)
    params_, state = dict(p0), opt.init(p0)
    for k in range(3):
        grads = {n: torch.sin(p + k) for n, p in params_.items()}
        params_, state = opt.step(params_, grads, state)
        for leaf in leaves.values():
            leaf.grad = torch.sin(leaf.detach() + k)
        ref.step()
    for n in SHAPES:
        torch.testing.assert_close(params_[n], leaves[n].detach(), rtol=1e-10, atol=1e-12)


def test_schedule_gives_each_step_its_own_value():
    meta = metagrad.MetaParameters()
    lrs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DT)
    meta.add("lr", lrs, constraint="positive", steps=STEPS, dtype=DT)
    p = {"w": torch.tensor([2.0], dtype=DT)}
    for t in range(STEPS):
        opt = SGD(lr=meta.value("lr", step=t))
        p, _ = opt.step(p, {"w": torch.ones(1, dtype=DT)}, opt.init(p))
    torch.testing.assert_close(p["w"], torch.tensor([2.0 - 1.0], dtype=DT), rtol=1e-12, atol=0)
    torch.testing.assert_close(meta.schedule("lr"), lrs, rtol=1e-12, atol=0)
    p["w"].sum().backward()
    torch.testing.assert_close(meta.lr.grad, -lrs, rtol=1e-12, atol=0)  # d/dlog(lr_t) = -lr_t


def test_per_layer_schedule_broadcasts_a_per_layer_tensor_over_steps():
    meta = metagrad.MetaParameters()
    per_layer = torch.tensor([0.1, 0.2, 0.3], dtype=DT)
    meta.add("lr", per_layer, scope="per_layer", params=params(), steps=STEPS)
    assert meta.schedule("lr").shape == (STEPS, 3)
    for t in range(STEPS):
        got = torch.stack(list(meta.value("lr", step=t).values()))
        torch.testing.assert_close(got, per_layer, rtol=1e-12, atol=0)


def test_scalars_for_logging():
    meta = metagrad.MetaParameters()
    meta.add("lr", 0.1, dtype=DT)
    meta.add("mom", {"0.weight": 0.5, "0.bias": 0.6, "2.weight": 0.7}, constraint="unit",
             scope="per_layer", params=params())  # fmt: skip
    meta.add("sched", torch.tensor([1.0, 2.0, 3.0, 6.0]), steps=STEPS)
    meta.add("init", params(), constraint=None, scope="per_element", params=params())
    meta.add_module("net", nn.Linear(2, 1))
    got = meta.scalars()
    assert set(got) == {"lr", "mom/0.weight", "mom/0.bias", "mom/2.weight", "sched"}
    assert all(isinstance(v, float) for v in got.values())
    assert got["lr"] == pytest.approx(0.1)
    assert got["mom/0.bias"] == pytest.approx(0.6)
    assert got["sched"] == pytest.approx(3.0)  # the mean over steps
    assert meta.entry_names() == ["lr", "mom", "sched", "init"]
    assert "mom: per_layer" in repr(meta)


def test_stock_outer_optimizer_keeps_values_in_their_domain():
    meta = metagrad.MetaParameters()
    meta.add("lr", 0.1, dtype=DT)
    meta.add("mom", 0.9, constraint="unit", dtype=DT)
    meta.add("beta", 1.0, constraint=(0.5, 2.0), dtype=DT)
    outer = torch.optim.SGD(meta.parameters(), lr=100.0)  # absurdly large steps
    for sign in (1.0, -1.0):
        outer.zero_grad()
        (sign * (meta.value("lr") + meta.value("mom") + meta.value("beta"))).backward()
        outer.step()
        assert meta.value("lr") > 0
        assert 0 <= meta.value("mom") <= 1
        assert 0.5 <= meta.value("beta") <= 2.0


def test_module_meta_parameters():
    meta = metagrad.MetaParameters()
    meta.add("lr", 0.1, dtype=DT)
    net = nn.Linear(2, 1).to(DT)
    meta.add_module("loss_net", net)
    assert meta.value("loss_net") is net
    names = dict(meta.named_parameters())
    assert set(names) == {"lr", "loss_net.weight", "loss_net.bias"}
    assert "loss_net" not in meta.entry_names()
    out = meta.value("loss_net")(torch.ones(1, 2, dtype=DT)).sum() * meta.value("lr")
    out.backward()
    assert net.weight.grad is not None and meta.lr.grad is not None
    before = net.weight.detach().clone()
    torch.optim.Adam(meta.parameters(), lr=0.1).step()
    assert not torch.equal(net.weight.detach(), before)
    with pytest.raises(ValueError, match="already exists"):
        meta.add("loss_net", 0.1)


def test_functional_call_replaces_the_stored_values():
    meta = metagrad.MetaParameters()
    meta.add("lr", 0.1, dtype=DT)
    raw = torch.tensor(math.log(0.5), dtype=DT)
    got = torch.func.functional_call(meta, {"lr": raw}, (lambda m: m.value("lr"),))
    torch.testing.assert_close(got, torch.tensor(0.5, dtype=DT), rtol=1e-12, atol=0)
    torch.testing.assert_close(meta.value("lr").detach(), torch.tensor(0.1, dtype=DT))


def test_dtype_follows_params_unless_given():
    p64 = params()
    meta = metagrad.MetaParameters()
    meta.add("a", 0.1, scope="per_layer", params=p64)
    meta.add("b", 0.1)
    meta.add("c", 0.1, dtype=torch.float64)
    assert meta.a.dtype == torch.float64
    assert meta.b.dtype == torch.get_default_dtype()
    assert meta.c.dtype == torch.float64


def test_dtype_follows_a_floating_point_tensor_init():
    meta = metagrad.MetaParameters()
    meta.add("lam", torch.tensor(0.1, dtype=torch.float64))
    meta.add("sched", torch.full((4,), 0.5, dtype=torch.float64), constraint="unit", steps=4)
    meta.add("steps", torch.tensor([1, 2]), steps=2)  # integer values: the default dtype
    assert meta.lam.dtype == torch.float64
    assert meta.sched.dtype == torch.float64
    assert meta.steps.dtype == torch.get_default_dtype()


BAD_ADD = [
    pytest.param(dict(name="1lr"), "name", id="name-not-identifier"),
    pytest.param(dict(name="lr-x"), "name", id="name-with-dash"),
    pytest.param(dict(name=""), "name", id="empty-name"),
    pytest.param(dict(name=3), "name", id="name-not-str"),
    pytest.param(dict(name="add"), "already exists", id="name-shadows-method"),
    pytest.param(dict(scope="global"), "scope", id="unknown-scope"),
    pytest.param(dict(scope=None), "scope", id="none-scope"),
    pytest.param(dict(constraint="negative"), "constraint", id="unknown-constraint"),
    pytest.param(dict(constraint=(1.0, 0.0)), "constraint", id="reversed-interval"),
    pytest.param(dict(constraint=(0.0,)), "constraint", id="one-bound"),
    pytest.param(dict(constraint=[0.0, 1.0]), "constraint", id="list-interval"),
    pytest.param(dict(constraint=(0.0, "1")), "constraint", id="string-bound"),
    pytest.param(dict(init=0.0), "> 0", id="positive-zero"),
    pytest.param(dict(init=-1.0), "> 0", id="positive-negative"),
    pytest.param(dict(init=torch.tensor([0.1, -0.1]), steps=2), "> 0", id="positive-one-bad-step"),
    pytest.param(dict(init=1.0, constraint="unit"), r"\(0.0, 1.0\)", id="unit-one"),
    pytest.param(dict(init=0.0, constraint="unit"), r"\(0.0, 1.0\)", id="unit-zero"),
    pytest.param(dict(init=2.0, constraint=(0.5, 2.0)), r"\(0.5, 2.0\)", id="interval-high"),
    pytest.param(dict(init=float("nan"), constraint=None), "finite", id="free-nan"),
    pytest.param(dict(init=float("inf")), "finite", id="positive-inf"),
    pytest.param(dict(steps=0), "steps", id="zero-steps"),
    pytest.param(dict(steps=-2), "steps", id="negative-steps"),
    pytest.param(dict(steps=2.0), "steps", id="float-steps"),
    pytest.param(dict(steps=True), "steps", id="bool-steps"),
    pytest.param(dict(scope="per_layer"), "needs params", id="per-layer-without-params"),
    pytest.param(dict(scope="per_element", params={}), "needs params", id="empty-params"),
    pytest.param(dict(init=torch.ones(2)), "shape", id="scalar-with-vector"),
    pytest.param(dict(init=torch.ones(3), steps=2), "shape", id="schedule-wrong-length"),
    pytest.param(
        dict(scope="per_layer", params=params(), init=torch.ones(2)), "shape", id="layers-wrong"
    ),
    pytest.param(
        dict(scope="per_element", params=params(), init={"0.weight": 0.1}),
        "misses '0.bias'",
        id="mapping-misses-param",
    ),
    pytest.param(
        dict(scope="per_element", params=params(), init=torch.ones(5)), "shape", id="elem-shape"
    ),
    pytest.param(
        dict(scope="per_element", params=params(), init={n: -1.0 for n in SHAPES}),
        "0.weight",
        id="per-element-out-of-domain-names-param",
    ),
]


@pytest.mark.parametrize("kwargs, message", BAD_ADD)
def test_bad_add_raises(kwargs, message):
    meta = metagrad.MetaParameters()
    meta.add("existing", 0.1)
    args = {"name": "lr", "init": 0.1, **kwargs}
    name, init = args.pop("name"), args.pop("init")
    with pytest.raises(ValueError, match=message):
        meta.add(name, init, **args)


def test_duplicate_name_raises():
    meta = metagrad.MetaParameters().add("lr", 0.1)
    with pytest.raises(ValueError, match="'lr' already exists"):
        meta.add("lr", 0.2)


def test_bad_value_requests():
    meta = metagrad.MetaParameters()
    meta.add("lr", 0.1)
    meta.add("sched", 0.1, steps=STEPS)
    meta.add("elem", 0.1, scope="per_element", params=params())
    with pytest.raises(KeyError, match="no meta-parameter named 'nope'"):
        meta.value("nope")
    with pytest.raises(ValueError, match="pass step="):
        meta.value("sched")
    for step in (-1, STEPS):
        with pytest.raises(ValueError, match="outside the schedule"):
            meta.value("sched", step=step)
    with pytest.raises(ValueError, match="not a scalar or per-layer schedule"):
        meta.schedule("lr")
    with pytest.raises(ValueError, match="not a scalar or per-layer schedule"):
        meta.schedule("elem")
