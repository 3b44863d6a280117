"""metagrad.tasks: seeded sinusoid and digits few-shot tasks."""

from __future__ import annotations

import math

import pytest
import torch

from metagrad.tasks import DigitsFewShot, SinusoidTasks


def test_sinusoid_shapes_ranges_and_targets():
    tasks = SinusoidTasks(seed=0, dtype=torch.float64)
    amplitude, phase = tasks.sample_functions(500)
    assert amplitude.min() >= 0.1 and amplitude.max() <= 5.0 and amplitude.max() > 4.5
    assert phase.min() >= 0 and phase.max() <= math.pi
    x, y = tasks.points(amplitude, phase, 7)
    assert x.shape == y.shape == (500, 7, 1) and x.abs().max() <= 5.0
    torch.testing.assert_close(y, amplitude[:, None, None] * torch.sin(x - phase[:, None, None]))
    sx, sy, qx, qy = tasks.sample(25, 10, 15)
    assert sx.shape == sy.shape == (25, 10, 1) and qx.shape == qy.shape == (25, 15, 1)


def test_sinusoid_support_and_query_come_from_the_same_function():
    sx, sy, qx, qy = SinusoidTasks(seed=3, dtype=torch.float64).sample(4, 50, 50)
    # Fit a * sin(x) + b * cos(x) on the support set; it must explain the query set exactly.
    for i in range(4):
        basis = torch.cat([torch.sin(sx[i]), torch.cos(sx[i])], dim=1)
        coef = torch.linalg.lstsq(basis, sy[i]).solution
        pred = torch.cat([torch.sin(qx[i]), torch.cos(qx[i])], dim=1) @ coef
        torch.testing.assert_close(pred, qy[i], atol=1e-10, rtol=0)


def test_sinusoid_is_reproducible_and_seeded():
    a, b = SinusoidTasks(seed=5).sample(3, 4), SinusoidTasks(seed=5).sample(3, 4)
    c = SinusoidTasks(seed=6).sample(3, 4)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a.support_x, c.support_x)
    state = torch.random.get_rng_state()
    SinusoidTasks(seed=5).sample(3, 4)
    assert torch.equal(state, torch.random.get_rng_state()), "the global RNG was used"


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(amplitude=(5, 1)), "amplitude"), (dict(x_range="wide"), "x_range")],
    ids=["reversed", "not-a-pair"],
)
def test_sinusoid_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SinusoidTasks(**kwargs)
    with pytest.raises(ValueError, match="shots"):
        SinusoidTasks().sample(2, 0)


@pytest.fixture(scope="module")
def digits_train() -> DigitsFewShot:
    return DigitsFewShot(ways=5, shots=2, query=3, split="train", seed=0)


def test_digits_shapes_and_balanced_labels(digits_train):
    sx, sy, qx, qy = digits_train.sample(6)
    assert sx.shape == (6, 10, 64) and sy.shape == (6, 10)
    assert qx.shape == (6, 15, 64) and qy.shape == (6, 15)
    assert sy.dtype == torch.long and 0 <= sx.min() and sx.max() <= 1
    for labels, per_class in ((sy, 2), (qy, 3)):
        counts = torch.stack([torch.bincount(row, minlength=5) for row in labels])
        assert (counts == per_class).all()
    images = DigitsFewShot(ways=2, shots=1, query=1, flatten=False).sample(2).support_x
    assert images.shape == (2, 2, 1, 8, 8)


def test_digits_meta_train_and_meta_test_classes_are_disjoint(digits_train):
    test = DigitsFewShot(ways=5, shots=2, query=3, split="test", seed=0)
    assert set(digits_train.classes).isdisjoint(test.classes)
    assert {d for d, _ in digits_train.classes} == {0, 1, 2, 3, 4, 5}
    assert {d for d, _ in test.classes} == {6, 7, 8, 9}
    assert digits_train.num_classes == 24 and test.num_classes == 16
    plain = DigitsFewShot(ways=4, split="test", rotations=False)
    assert plain.num_classes == 4


def test_digits_images_of_one_label_come_from_one_class():
    tasks = DigitsFewShot(ways=3, shots=5, query=5, split="test", seed=1, rotations=False)
    sx, sy, qx, qy = tasks.sample(2)
    pools = [img.reshape(len(img), 64) for img in tasks._images]
    for t in range(2):
        for label in range(3):
            rows = torch.cat([sx[t][sy[t] == label], qx[t][qy[t] == label]])
            owners = {
                i for row in rows for i, pool in enumerate(pools) if (pool == row).all(dim=1).any()
            }
            assert len(owners) == 1


def test_digits_is_reproducible():
    a = DigitsFewShot(seed=4, shots=1, query=2).sample(3)
    b = DigitsFewShot(seed=4, shots=1, query=2).sample(3)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(split="val"), "split"),
        (dict(ways=5, split="test", rotations=False), "ways"),
        (dict(shots=100, query=100), "shots \\+ query"),
        (dict(train_digits=tuple(range(10))), "train_digits"),
        (dict(ways=0), "ways"),
    ],
    ids=["split", "too-many-ways", "too-many-shots", "no-test-digits", "zero-ways"],
)
def test_digits_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsFewShot(**kwargs)
