"""The built-in networks: shapes, normalization choices, and how the learners vectorize them."""

from __future__ import annotations

import pytest
import torch

from metagrad.learners import MAML
from metagrad.learners._vectorize import vmap_blocker
from metagrad.models import conv4, mlp, resnet


def test_mlp_layers_and_names() -> None:
    model = mlp(64, 10, hidden=[32, 16], activation="tanh")
    assert [n for n, _ in model.named_parameters()][:2] == ["0.weight", "0.bias"]
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    assert len(list(mlp(3, 2, hidden=[]).parameters())) == 2


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("make", [conv4, resnet], ids=["conv4", "resnet"])
def test_conv_nets_take_images_or_flat_inputs(make, norm) -> None:
    kwargs = dict(hidden=8) if make is conv4 else dict(widths=[4, 8])
    model = make(1, 5, 8, norm=norm, **kwargs)
    images = torch.randn(3, 1, 8, 8)
    assert model(images).shape == (3, 5)
    torch.testing.assert_close(model(images.reshape(3, 64)), model(images))


def test_conv4_keeps_small_images_alive() -> None:
    model = conv4(1, 5, 8, hidden=4, blocks=4)  # 8 -> 4 -> 2 -> 1 -> 1
    assert model[-1].in_features == 4


def test_second_order_learners_vmap_group_norm_but_loop_batch_norm() -> None:
    assert vmap_blocker(conv4(1, 5, 8, hidden=4, norm="group"), second_order=True) is None
    assert vmap_blocker(conv4(1, 5, 8, hidden=4, norm="batch"), second_order=True) is not None
    assert vmap_blocker(conv4(1, 5, 8, hidden=4, norm="batch"), second_order=False) is None


def test_maml_on_conv4_with_group_norm_vmaps_and_matches_the_loop() -> None:
    torch.manual_seed(0)
    model = conv4(1, 3, 8, hidden=4, norm="group").double()
    g = torch.Generator().manual_seed(1)
    batch = (
        torch.rand(4, 3, 1, 8, 8, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4, 3), generator=g),
        torch.rand(4, 6, 1, 8, 8, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4, 6), generator=g),
    )
    vmapped = MAML(model, loss_fn="cross_entropy", inner_lr=0.3, vectorize=True)
    looped = MAML(model, loss_fn="cross_entropy", inner_lr=0.3, vectorize=False)
    a = torch.autograd.grad(vmapped(*batch), list(model.parameters()))
    b = torch.autograd.grad(looped(*batch), list(model.parameters()))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: mlp(0, 3), "in_features"),
        (lambda: mlp(3, 3, activation="swish"), "activation"),
        (lambda: conv4(1, 5, 8, norm="layer"), "norm"),
        (lambda: resnet(1, 5, 8, widths=[]), "widths"),
    ],
    ids=["zero-inputs", "activation", "norm", "no-stages"],
)
def test_bad_arguments(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()
