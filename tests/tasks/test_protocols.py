"""The task protocols: supervised tasks (TensorTask, Digits) and episodic ones (episodes())."""

from __future__ import annotations

import pytest
import torch

from metagrad.tasks import (
    Digits,
    DigitsFewShot,
    EpisodicTask,
    SinusoidTasks,
    SupervisedTask,
    TensorTask,
)


def test_builtin_tasks_follow_their_protocols() -> None:
    assert isinstance(Digits(), SupervisedTask) and not isinstance(Digits(), EpisodicTask)
    for task in (SinusoidTasks(), DigitsFewShot()):
        assert isinstance(task, EpisodicTask)


def test_digits_splits_are_disjoint_and_batches_reproducible() -> None:
    task = Digits(batch_size=50, val_size=300, test_size=200)
    sizes = {name: len(task.split(name)[1]) for name in ("train", "val", "test")}
    assert sizes == {"train": 1297, "val": 300, "test": 200}
    rows = {name: {tuple(r.tolist()) for r in task.split(name)[0]} for name in sizes}
    assert not rows["val"] & rows["test"]
    a, b = task.train_batches(3, 4), task.train_batches(3, 4)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], task.train_batches(4, 1)[0][0])
    assert a[0][0].shape == (50, 64) and a[0][1].dtype == torch.long
    assert task.model_args()["in_features"] == 64


def test_tensor_task_serves_user_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 3, generator=g), torch.randint(0, 2, (100,), generator=g)
    task = TensorTask((x[:80], y[:80]), (x[80:], y[80:]), batch_size=16, outer_batch_size=8)
    assert isinstance(task, SupervisedTask)
    ((bx, by),) = task.train_batches(0, 1)
    assert bx.shape == (16, 3)
    assert task.val_batch(0)[0].shape == (8, 3)
    assert task.split("test") is None
    with pytest.raises(ValueError, match="batch_size"):
        TensorTask((x[:8], y[:8]), (x[8:], y[8:]), batch_size=16)
    with pytest.raises(ValueError, match="4 inputs but 3 targets"):
        TensorTask((x[:4], y[:3]), (x, y))


@pytest.mark.parametrize(
    "task", [SinusoidTasks(shots=5, query=7), DigitsFewShot(ways=3, shots=2, query=4)]
)
def test_episodes_are_seeded_and_differ_by_split(task) -> None:
    a = task.episodes("train", 4, seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a, task.episodes("train", 4, seed=1), strict=True))
    assert not torch.equal(a.support_x, task.episodes("val", 4, seed=1).support_x)
    assert not torch.equal(a.support_x, task.episodes("train", 4, seed=2).support_x)
    state = torch.random.get_rng_state()
    task.episodes("test", 2, seed=0)
    assert torch.equal(state, torch.random.get_rng_state()), "the global RNG was used"


def test_digits_episodes_keep_meta_test_classes_apart() -> None:
    task = DigitsFewShot(ways=4, shots=1, query=1, rotations=False, flatten=True)
    train_rows = {tuple(r.tolist()) for r in task._by_split["train"][1][0].reshape(-1, 64)}
    test = task.episodes("test", 3, seed=0)
    for row in test.support_x.reshape(-1, 64):
        assert tuple(row.tolist()) not in train_rows
