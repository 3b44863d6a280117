"""Bad optimizer input raises a ValueError whose message names the argument and the parameter."""

from __future__ import annotations

import re

import pytest
import torch

import metagrad.optim as mo


def params() -> dict[str, torch.Tensor]:
    return {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}


def grads_like(ps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: torch.ones_like(p) for n, p in ps.items()}


def bad_beta_per_element() -> torch.Tensor:
    b = torch.full((3, 2), 0.9)
    b[1, 1] = 1.0
    return b


# (id, callable that must raise, regex the message must match)
CONSTRUCTION = [
    ("sgd-negative-lr", lambda: mo.SGD(lr=-0.1), r"Invalid lr: -0\.1 \(must be >= 0"),
    ("adam-negative-lr-tensor", lambda: mo.Adam(lr=torch.tensor(-1e-3)), r"Invalid lr: "),
    (
        "adam-negative-lr-per-element",
        lambda: mo.Adam(lr=-torch.ones(3, 2)),
        r"Invalid lr: tensor of shape \(3, 2\) with values from -1",
    ),
    (
        "sgd-negative-lr-per-layer",
        lambda: mo.SGD(lr={"weight": 0.1, "bias": -0.1}),
        r"Invalid lr for parameter 'bias': -0\.1",
    ),
    (
        "sgd-negative-lr-per-layer-tensor",
        lambda: mo.SGD(lr={"weight": torch.tensor(-0.1), "bias": 0.1}),
        r"Invalid lr for parameter 'weight'",
    ),
    ("sgd-nan-lr", lambda: mo.SGD(lr=float("nan")), r"Invalid lr: nan"),
    ("adam-negative-eps", lambda: mo.Adam(eps=-1e-8), r"Invalid eps: -1e-08"),
    ("adamw-negative-eps-tensor", lambda: mo.AdamW(eps=torch.tensor(-0.1)), r"Invalid eps: "),
    ("rmsprop-negative-eps", lambda: mo.RMSprop(eps=-1e-8), r"Invalid eps: "),
    (
        "adagrad-negative-eps-per-layer",
        lambda: mo.Adagrad(eps={"weight": 1e-10, "bias": -1.0}),
        r"Invalid eps for parameter 'bias': -1\.0",
    ),
    (
        "adam-beta1-one",
        lambda: mo.Adam(betas=(1.0, 0.999)),
        r"Invalid betas\[0\]: 1\.0 .*\[0\.0, 1\.0\)",
    ),
    ("adam-beta2-one", lambda: mo.Adam(betas=(0.9, 1.0)), r"Invalid betas\[1\]: 1\.0"),
    ("adam-beta1-negative", lambda: mo.Adam(betas=(-0.1, 0.999)), r"Invalid betas\[0\]: -0\.1"),
    ("adamw-beta2-above-one", lambda: mo.AdamW(betas=(0.9, 1.5)), r"Invalid betas\[1\]: 1\.5"),
    (
        "adam-betas-tensor-pair",
        lambda: mo.Adam(betas=(torch.tensor(0.9), torch.tensor(1.0))),
        r"Invalid betas\[1\]: ",
    ),
    (
        "adam-betas-one-tensor",
        lambda: mo.Adam(betas=torch.tensor([1.0, 0.999])),
        r"Invalid betas\[0\]: ",
    ),
    (
        "adam-beta2-per-element",
        lambda: mo.Adam(betas=(0.9, bad_beta_per_element())),
        r"Invalid betas\[1\]: tensor of shape \(3, 2\) with values from 0\.9.* to 1",
    ),
    (
        "adam-beta1-per-element-per-layer",
        lambda: mo.Adam(betas=({"weight": bad_beta_per_element(), "bias": 0.9}, 0.999)),
        r"Invalid betas\[0\] for parameter 'weight'",
    ),
    ("adam-betas-not-a-pair", lambda: mo.Adam(betas=(0.9,)), r"Invalid betas: expected a pair"),
    (
        "adam-betas-tensor-wrong-shape",
        lambda: mo.Adam(betas=torch.tensor([0.9, 0.99, 0.999])),
        r"Invalid betas: .*shape \(2,\)",
    ),
    ("sgd-dampening-above-one", lambda: mo.SGD(dampening=1.5), r"Invalid dampening: 1\.5"),
    ("sgd-negative-momentum", lambda: mo.SGD(momentum=-0.9), r"Invalid momentum: -0\.9"),
    (
        "sgd-negative-weight_decay",
        lambda: mo.SGD(weight_decay=-1e-4),
        r"Invalid weight_decay: -0\.0001",
    ),
    ("rmsprop-alpha-above-one", lambda: mo.RMSprop(alpha=1.5), r"Invalid alpha: 1\.5"),
    ("adagrad-negative-lr_decay", lambda: mo.Adagrad(lr_decay=-0.1), r"Invalid lr_decay: -0\.1"),
    (
        "adagrad-negative-initial_accumulator_value",
        lambda: mo.Adagrad(initial_accumulator_value=-1.0),
        r"Invalid initial_accumulator_value: -1\.0",
    ),
    ("sgd-lr-string", lambda: mo.SGD(lr="0.1"), r"Invalid lr: expected a number.*got str"),
    (
        "sgd-lr-per-layer-string",
        lambda: mo.SGD(lr={"weight": "fast"}),
        r"Invalid lr for parameter 'weight': expected a number or a tensor, got str",
    ),
    ("sgd-nesterov-without-momentum", lambda: mo.SGD(nesterov=True), r"Nesterov"),
]


@pytest.mark.parametrize(
    "make, match", [c[1:] for c in CONSTRUCTION], ids=[c[0] for c in CONSTRUCTION]
)
def test_construction_rejects_bad_values(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# Errors that depend on the params: raised by init (and, for grads, by step).
INIT = [
    (
        "per-element-shape-mismatch",
        lambda: mo.Adam(lr=torch.full((2, 3), 1e-3)),
        r"lr for parameter 'weight' has shape \(2, 3\), but the parameter has shape \(3, 2\)",
    ),
    (
        "per-element-shape-mismatch-in-dict",
        lambda: mo.SGD(lr={"weight": 0.1, "bias": torch.full((2,), 0.1)}),
        r"lr for parameter 'bias' has shape \(2,\), but the parameter has shape \(3,\)",
    ),
    (
        "per-element-betas-shape-mismatch",
        lambda: mo.AdamW(
            betas=(0.9, {"weight": torch.full((3, 2), 0.99), "bias": torch.full((4,), 0.99)})
        ),
        r"betas\[1\] for parameter 'bias' has shape \(4,\)",
    ),
    (
        "per-layer-missing-parameter",
        lambda: mo.RMSprop(momentum={"weight": 0.9}),
        r"momentum is given per parameter but has no value for parameter 'bias'",
    ),
    (
        "per-layer-unknown-parameter",
        lambda: mo.Adagrad(lr={"weight": 0.1, "bias": 0.1, "scale": 0.1}),
        r"lr names parameters that are not in params: \['scale'\]",
    ),
    (
        "adagrad-initial-accumulator-shape-mismatch",
        lambda: mo.Adagrad(initial_accumulator_value=torch.zeros(5)),
        r"initial_accumulator_value for parameter '(weight|bias)' has shape \(5,\)",
    ),
]


@pytest.mark.parametrize("make, match", [c[1:] for c in INIT], ids=[c[0] for c in INIT])
def test_init_rejects_hyperparameters_that_do_not_fit_params(make, match) -> None:
    opt = make()
    with pytest.raises(ValueError, match=match):
        opt.init(params())


OPTIMIZERS = [mo.SGD(lr=0.1, momentum=0.9), mo.Adam(), mo.AdamW(), mo.RMSprop(), mo.Adagrad()]
OPT_IDS = ["sgd", "adam", "adamw", "rmsprop", "adagrad"]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=OPT_IDS)
def test_step_rejects_grads_with_missing_keys(opt) -> None:
    ps = params()
    state = opt.init(ps)
    grads = grads_like(ps)
    del grads["bias"]
    with pytest.raises(ValueError, match=r"grads .*no grads for parameters \['bias'\]"):
        opt.step(ps, grads, state)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=OPT_IDS)
def test_step_rejects_grads_with_unknown_keys(opt) -> None:
    ps = params()
    state = opt.init(ps)
    grads = {**grads_like(ps), "scale": torch.ones(1)}
    with pytest.raises(
        ValueError, match=r"grads for parameters \['scale'\] that are not in params"
    ):
        opt.step(ps, grads, state)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=OPT_IDS)
def test_step_rejects_grad_of_wrong_shape(opt) -> None:
    ps = params()
    state = opt.init(ps)
    grads = {**grads_like(ps), "bias": torch.ones(4)}
    with pytest.raises(
        ValueError, match=r"grad for parameter 'bias' has shape \(4,\), expected \(3,\)"
    ):
        opt.step(ps, grads, state)


def test_step_rejects_params_that_are_not_a_mapping() -> None:
    opt = mo.SGD(lr=0.1)
    ps = params()
    with pytest.raises(ValueError, match="params and grads must be mappings"):
        opt.step(list(ps.values()), grads_like(ps), opt.init(ps))


def test_valid_edge_values_are_accepted() -> None:
    """The limits themselves are allowed where torch.optim allows them."""
    ps = params()
    for opt in [
        mo.SGD(lr=0.0, momentum=0.0, dampening=1.0, weight_decay=0.0),
        mo.Adam(lr=0.0, betas=(0.0, 0.0), eps=0.0),
        mo.RMSprop(alpha=0.0, eps=0.0),
        mo.Adagrad(lr_decay=0.0, initial_accumulator_value=0.0, eps=0.0),
    ]:
        new, _ = opt.step(ps, grads_like(ps), opt.init(ps))
        assert new.keys() == ps.keys()


def test_error_message_names_argument_and_parameter() -> None:
    """One message, read in full: it says which argument, which parameter and why."""
    opt = mo.SGD(lr={"weight": torch.full((2, 2), 0.1), "bias": 0.1})
    with pytest.raises(ValueError) as info:
        opt.init(params())
    message = str(info.value)
    assert re.search(r"\blr\b", message) and "'weight'" in message
    assert "(2, 2)" in message and "(3, 2)" in message
