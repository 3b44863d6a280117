"""N-way K-shot classification tasks built from scikit-learn's digits (no download).

The 1,797 8x8 digit images are split by digit: meta-training tasks draw their classes from
digits 0-5 and meta-test tasks from digits 6-9, so a meta-test task only holds classes never
seen in meta-training. With `rotations=True` (the default) each digit rotated by 0, 90, 180 and
270 degrees is a class of its own, as is common for Omniglot, giving 24 meta-training and 16
meta-test classes. (A "6" turned by 180 degrees looks like a "9"; both are meta-test classes,
so the split stays disjoint, but such a test task is harder.)

>>> tasks = DigitsFewShot(ways=5, shots=1, query=15, split="train", seed=0)
>>> sx, sy, qx, qy = tasks.sample(meta_batch=32)  # sx: [32, 5, 64], sy: [32, 5] labels 0..4
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import ArgumentError, check_choice, check_count
from .protocols import TaskBatch
from .sinusoid import split_seed
from .supervised import load_digits

__all__ = ["DigitsFewShot", "sample_episodes"]

_ALL_DIGITS = tuple(range(10))


def sample_episodes(
    images: Sequence[Tensor], ways: int, shots: int, query: int, count: int, g: torch.Generator
) -> TaskBatch:
    """`count` N-way K-shot tasks from per-class image tensors, drawn with generator `g`.

    Each task picks `ways` classes, relabels them 0..ways-1 in random order and draws `shots`
    support and `query` query examples per class without overlap; examples are shuffled
    within each set. Returns tensors [count, ways * shots, ...] and [count, ways * query, ...].
    """
    check_count(count, "meta_batch")
    sets: list[list[Tensor]] = [[], [], [], []]
    for _ in range(count):
        chosen = torch.randperm(len(images), generator=g)[:ways]
        sx, sy, qx, qy = [], [], [], []
        for label, c in enumerate(chosen.tolist()):
            pool = images[c]
            idx = torch.randperm(len(pool), generator=g)[: shots + query]
            sx.append(pool[idx[:shots]])
            qx.append(pool[idx[shots:]])
            sy.append(torch.full((shots,), label, dtype=torch.long))
            qy.append(torch.full((query,), label, dtype=torch.long))
        s_order = torch.randperm(ways * shots, generator=g)
        q_order = torch.randperm(ways * query, generator=g)
        sets[0].append(torch.cat(sx)[s_order])
        sets[1].append(torch.cat(sy)[s_order])
        sets[2].append(torch.cat(qx)[q_order])
        sets[3].append(torch.cat(qy)[q_order])
    return TaskBatch(*(torch.stack(s) for s in sets))


class DigitsFewShot:
    """A seeded stream of N-way K-shot tasks from sklearn's digits.

    Each task picks `ways` classes of its split, relabels them 0..ways-1 in random order, and
    draws `shots` support and `query` query images per class without overlap.

    As an episodic task (`episodes`), split "train" draws from the `train_digits` classes and
    "test" from the others; digits has too few classes for a third disjoint set, so "val"
    draws from the test classes with seeds of its own (periodic validation during training).

    Args:
        ways: classes per task (N).
        shots: support images per class (K).
        query: query images per class.
        split: the split of `sample`: "train" (classes from `train_digits`) or "test" (the
            other digits).
        seed: seed of the sampler's own `torch.Generator`.
        rotations: make each 90-degree rotation of a digit a separate class.
        flatten: return images as 64 features instead of [1, 8, 8].
        train_digits: the digits whose classes are used for meta-training.
        dtype: floating dtype of the images.

    Raises:
        ValueError: an unknown split, more ways than the split has classes, or more
            shots + query than the smallest class has images.
    """

    def __init__(
        self,
        ways: int = 5,
        shots: int = 1,
        query: int = 15,
        split: str = "train",
        seed: int = 0,
        rotations: bool = True,
        flatten: bool = True,
        train_digits: Sequence[int] = (0, 1, 2, 3, 4, 5),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.ways = check_count(ways, "ways")
        self.shots = check_count(shots, "shots")
        self.query = check_count(query, "query")
        self.split = check_choice(split, "split", ("train", "test"))
        train_digits = tuple(int(d) for d in train_digits)
        if not train_digits or any(d not in _ALL_DIGITS for d in train_digits):
            raise ArgumentError(
                "train_digits", f"Invalid train_digits: {train_digits} (digits 0-9, at least one)"
            )
        if len(set(train_digits)) == len(_ALL_DIGITS):
            raise ArgumentError(
                "train_digits",
                "Invalid train_digits: every digit is a training digit, none is left",
            )
        self.train_digits = tuple(sorted(set(train_digits)))
        self.seed = int(seed)
        self.flatten = bool(flatten)
        self.dtype = dtype
        self.rotations = bool(rotations)
        images, labels = load_digits()
        images = images.reshape(-1, 8, 8)
        turns = (0, 1, 2, 3) if rotations else (0,)
        self._by_split: dict[str, tuple[list[tuple[int, int]], list[Tensor]]] = {}
        for name, digits in (
            ("train", self.train_digits),
            ("test", [d for d in _ALL_DIGITS if d not in self.train_digits]),
        ):
            # One image tensor per class: (digit, rotation) pairs in a fixed order.
            classes = [(d, k) for d in digits for k in turns]
            pools = [torch.rot90(images[labels == d], k, dims=(1, 2)).to(dtype) for d, k in classes]
            self._by_split[name] = (classes, pools)
        self._check_split(self.split)
        self.classes, self._images = self._by_split[self.split]
        self.generator = torch.Generator().manual_seed(self.seed)

    def _check_split(self, name: str) -> None:
        classes, pools = self._by_split[name]
        if self.ways > len(classes):
            raise ArgumentError(
                "ways",
                f"Invalid ways: {self.ways} exceeds the {len(classes)} classes of the "
                f"{name!r} split",
            )
        smallest = min(len(x) for x in pools)
        if self.shots + self.query > smallest:
            raise ArgumentError(
                "query",
                f"Invalid shots + query: {self.shots} + {self.query} exceeds {smallest}, "
                "the number of images in the smallest class",
            )

    @property
    def num_classes(self) -> int:
        """The number of classes in this split."""
        return len(self.classes)

    def _draw(self, split: str, count: int, g: torch.Generator) -> TaskBatch:
        self._check_split(split)
        _, pools = self._by_split[split]
        sx, sy, qx, qy = sample_episodes(pools, self.ways, self.shots, self.query, count, g)
        shape = (count, -1, 64) if self.flatten else (count, -1, 1, 8, 8)
        return TaskBatch(sx.reshape(shape), sy, qx.reshape(shape), qy)

    def sample(self, meta_batch: int) -> TaskBatch:
        """Draw `meta_batch` tasks of this sampler's split from its own generator.

        Returns:
            A `TaskBatch`: support images [meta_batch, ways * shots, 64] (or [..., 1, 8, 8]),
            support labels [meta_batch, ways * shots], query images and labels likewise with
            `ways * query` examples. Examples are shuffled within each set.
        """
        return self._draw(self.split, meta_batch, self.generator)

    def episodes(self, split: str, count: int, seed: int) -> TaskBatch:
        """`count` tasks of `split` ("train", "val" or "test"), drawn from `seed` alone."""
        g = torch.Generator().manual_seed(split_seed(seed, split))
        return self._draw("train" if split == "train" else "test", count, g)

    def model_args(self) -> dict[str, Any]:
        """Input and output sizes for the built-in models."""
        return {
            "in_features": 64,
            "out_features": self.ways,
            "in_channels": 1,
            "num_classes": self.ways,
            "image_size": 8,
        }

    def __repr__(self) -> str:
        return (
            f"DigitsFewShot(ways={self.ways}, shots={self.shots}, query={self.query}, "
            f"split={self.split!r}, classes={self.num_classes}, seed={self.seed})"
        )
