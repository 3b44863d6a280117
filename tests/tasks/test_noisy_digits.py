"""`NoisyDigits` and `corrupt_digits`: corrupted training splits, clean val/test splits, and
batches that carry the indices of their examples."""

from __future__ import annotations

import pytest
import torch

from metagrad.tasks import Digits, NoisyDigits, SupervisedTask, TensorTask, corrupt_digits


def test_indexed_batches_point_at_their_examples() -> None:
    task = NoisyDigits(noise="flip", rate=0.4, batch_size=50)
    assert isinstance(task, SupervisedTask)
    x, y, idx = task.split("train")
    assert torch.equal(idx, torch.arange(len(y)))
    batches = task.train_batches(seed=3, count=2)
    for bx, by, bidx in batches:
        assert bidx.dtype == torch.int64 and len(bidx) == 50
        assert torch.equal(bx, x[bidx]) and torch.equal(by, y[bidx])
    assert not torch.equal(batches[0][2], batches[1][2])
    again = task.train_batches(seed=3, count=2)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(batches, again, strict=True))
    # Validation and test splits stay pairs, clean and balanced.
    vx, vy = task.split("val")
    assert torch.bincount(vy, minlength=10).tolist() == [10] * 10
    assert len(task.split("test")) == 2


def test_default_batch_is_the_whole_training_split() -> None:
    task = NoisyDigits()
    ((x, y, idx),) = task.train_batches(seed=0, count=1)
    assert sorted(idx.tolist()) == list(range(1197))


def test_groups_name_the_flipped_labels() -> None:
    task = NoisyDigits(noise="flip", rate=0.4, split_seed=2)
    data = corrupt_digits("flip", rate=0.4, seed=2)
    groups = task.example_groups()
    assert set(groups) == {"corrupted", "clean"}
    assert torch.equal(groups["corrupted"], data.corrupted)
    assert int(groups["corrupted"].sum()) == round(0.4 * 1197)
    _, y, _ = task.split("train")
    assert bool((y[groups["corrupted"]] != data.y_true[groups["corrupted"]]).all())
    assert torch.equal(y[groups["clean"]], data.y_true[groups["clean"]])
    # No flipped labels: only the clean group.
    assert set(NoisyDigits(rate=0.0).example_groups()) == {"clean"}


def test_imbalance_groups_are_the_rarest_classes() -> None:
    task = NoisyDigits(noise="imbalance", imbalance=100.0, split_seed=1)
    groups = task.example_groups()
    assert set(groups) == {"tail", "head"}
    counts = torch.bincount(task.split("train")[1], minlength=10)
    tail_classes = set(task.split("train")[1][groups["tail"]].tolist())
    assert len(tail_classes) == 5
    assert max(counts[c] for c in tail_classes) <= min(
        counts[c] for c in set(range(10)) - tail_classes
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise": "blur"}, "Invalid noise"),
        ({"rate": 1.0}, "Invalid rate"),
        ({"noise": "imbalance", "imbalance": 0.5}, "Invalid imbalance"),
        ({"val_per_class": 0}, "Invalid val_per_class"),
        ({"batch_size": 5000}, "Invalid batch_size"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NoisyDigits(**kwargs)


def test_indexing_is_opt_in_for_tensor_tasks() -> None:
    (batch,) = Digits(batch_size=16).train_batches(seed=0, count=1)
    assert len(batch) == 2
    indexed = Digits(batch_size=16, indexed=True)
    ((x, y, idx),) = indexed.train_batches(seed=0, count=1)
    assert torch.equal(x, indexed.train[0][idx])
    plain = TensorTask(
        (torch.zeros(4, 2), torch.zeros(4)), (torch.ones(2, 2), torch.ones(2)), batch_size=2
    )
    assert len(plain.split("train")) == 2
