"""Digits with a corrupted training split: label noise or class imbalance, clean val and test.

The setting of learning to reweight training data (Ren et al. 2018; Shu et al. 2019; data
hyper-cleaning, Franceschi et al. 2017): a training split whose labels are partly flipped, or
whose classes are long-tailed, and a small clean, balanced validation split as the outer
objective. `corrupt_digits` makes the splits; `NoisyDigits` is the supervised task over them,
whose batches carry the example indices that per-example weights look up.

>>> task = NoisyDigits(noise="flip", rate=0.4)
>>> (x, y, idx), = task.train_batches(seed=0, count=1)   # idx: positions in the training split
>>> task.example_groups()["corrupted"].sum()             # 479 flipped labels
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import ArgumentError, check_choice, check_number
from .supervised import TensorTask, load_digits

__all__ = ["CorruptedSplits", "NoisyDigits", "NOISES", "corrupt_digits"]

#: The corruptions of the training split.
NOISES = ("flip", "imbalance")

_CLASSES = 10


@dataclass
class CorruptedSplits:
    """Digits split into a corrupted training set and clean validation and test sets.

    Attributes:
        x_train, y_train: training images ([n, 64], in [0, 1]) and their observed labels.
        y_true: the training labels before corruption.
        corrupted: which training labels were flipped (all False under imbalance).
        x_val, y_val: the clean, balanced validation split (the outer objective).
        x_test, y_test: the clean, balanced test split, for reporting only.
    """

    x_train: Tensor
    y_train: Tensor
    y_true: Tensor
    corrupted: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def class_counts(self) -> list[int]:
        """Training examples per (observed) class."""
        return torch.bincount(self.y_train, minlength=_CLASSES).tolist()

    def tail(self, classes: int = _CLASSES // 2) -> Tensor:
        """Which training examples belong to the `classes` rarest (observed) classes."""
        counts = torch.bincount(self.y_train, minlength=_CLASSES)
        return torch.isin(self.y_train, counts.argsort()[:classes])


def _check_per_class(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 60:
        raise ArgumentError(name, f"Invalid {name}: {value!r} (must be an int in 1..60)")
    return value


def corrupt_digits(
    noise: str = "flip",
    *,
    rate: float = 0.4,
    imbalance: float = 100.0,
    val_per_class: int = 10,
    test_per_class: int = 50,
    seed: int = 0,
) -> CorruptedSplits:
    """Split sklearn's digits and corrupt the training split; the same arguments, the same data.

    Each class gives `test_per_class` test and `val_per_class` validation images, the rest
    (about 120 per class) is the training pool, in a seeded random order.

    Args:
        noise: "flip": a fraction `rate` of the training labels, chosen at random, is replaced
            by a different class drawn uniformly; "imbalance": class c keeps
            `n_max * imbalance ** (-r_c / 9)` images (at least one), r_c its rank in a seeded
            random order of the classes and n_max the smallest class's pool, so the most
            frequent class has about `imbalance` times as many as the rarest.
        rate: the flipped fraction, in [0, 1) ("flip").
        imbalance: the ratio of the largest to the smallest class, >= 1 ("imbalance").
        val_per_class: size of the clean validation split per class (1..60).
        test_per_class: size of the clean test split per class (1..60).
        seed: the split, the corruption and the class order.

    Raises:
        ValueError: naming the argument out of range.
    """
    check_choice(noise, "noise", NOISES)
    check_number(rate, "rate", 0.0, 1.0, high_open=True)
    check_number(imbalance, "imbalance", 1.0)
    _check_per_class(val_per_class, "val_per_class")
    _check_per_class(test_per_class, "test_per_class")
    x, y = load_digits()
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(x), generator=g)
    test, val, pool = [], [], []
    for c in range(_CLASSES):
        members = order[y[order] == c]
        test.append(members[:test_per_class])
        val.append(members[test_per_class : test_per_class + val_per_class])
        pool.append(members[test_per_class + val_per_class :])
    if noise == "imbalance":
        n_max = min(len(p) for p in pool)
        rank = torch.randperm(_CLASSES, generator=g)
        pool = [
            p[: max(1, round(n_max * imbalance ** (-float(rank[c]) / (_CLASSES - 1))))]
            for c, p in enumerate(pool)
        ]
    train = torch.cat(pool)
    train = train[torch.randperm(len(train), generator=g)]
    y_true = y[train]
    y_train = y_true.clone()
    corrupted = torch.zeros(len(train), dtype=torch.bool)
    if noise == "flip":
        flipped = torch.randperm(len(train), generator=g)[: round(rate * len(train))]
        shift = torch.randint(1, _CLASSES, (len(flipped),), generator=g)
        y_train[flipped] = (y_true[flipped] + shift) % _CLASSES
        corrupted[flipped] = True
    test_idx, val_idx = torch.cat(test), torch.cat(val)
    return CorruptedSplits(
        x[train], y_train, y_true, corrupted, x[val_idx], y[val_idx], x[test_idx], y[test_idx]
    )


class NoisyDigits(TensorTask):
    """sklearn's digits with label noise or class imbalance in the training split.

    A supervised task (`loop=hpo`, `truncated`, `online`) over `corrupt_digits`' splits: the
    corrupted training split feeds the inner loop, the small clean validation split is the
    outer objective, the clean test split is reported at the end. Batches carry the indices of
    their examples (`indexed=True`), so learned per-example weights
    (`metagrad.weighting.ExampleWeights`) can be looked up; `example_groups()` names the
    corrupted and clean examples (flip) or the rare and frequent classes' examples (imbalance)
    so that their learned weights can be compared.

    Args:
        noise: "flip" (labels flipped at `rate`) or "imbalance" (long-tailed classes at ratio
            `imbalance`).
        rate: the flipped fraction of training labels, in [0, 1) ("flip").
        imbalance: largest to smallest class size, >= 1 ("imbalance").
        val_per_class: clean validation images per class (the outer objective).
        test_per_class: clean test images per class.
        batch_size: training examples per inner batch; None: the whole training split (full
            batch, as in data hyper-cleaning).
        outer_batch_size: examples per outer batch; None: the whole validation split.
        split_seed: seed of the split and the corruption.
    """

    def __init__(
        self,
        noise: str = "flip",
        rate: float = 0.4,
        imbalance: float = 100.0,
        val_per_class: int = 10,
        test_per_class: int = 50,
        batch_size: int | None = None,
        outer_batch_size: int | None = None,
        split_seed: int = 0,
    ) -> None:
        data = corrupt_digits(
            noise,
            rate=float(rate),
            imbalance=float(imbalance),
            val_per_class=val_per_class,
            test_per_class=test_per_class,
            seed=split_seed,
        )
        self.noise = noise
        self.data = data
        super().__init__(
            train=(data.x_train, data.y_train),
            val=(data.x_val, data.y_val),
            test=(data.x_test, data.y_test),
            batch_size=len(data.y_train) if batch_size is None else batch_size,
            outer_batch_size=outer_batch_size,
            model_args={
                "in_features": 64,
                "out_features": _CLASSES,
                "in_channels": 1,
                "num_classes": _CLASSES,
                "image_size": 8,
            },
            indexed=True,
        )

    def example_groups(self) -> dict[str, Tensor]:
        """Named masks over the training examples, to compare their learned weights.

        "flip": `corrupted` (flipped labels) and `clean`; "imbalance": `tail` (the five rarest
        classes) and `head` (the others). Empty groups are left out.
        """
        if self.noise == "flip":
            groups = {"corrupted": self.data.corrupted, "clean": ~self.data.corrupted}
        else:
            tail = self.data.tail()
            groups = {"tail": tail, "head": ~tail}
        return {k: v for k, v in groups.items() if bool(v.any())}
