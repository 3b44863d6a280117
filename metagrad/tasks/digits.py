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

import torch
from torch import Tensor

from .sinusoid import TaskBatch, _count

__all__ = ["DigitsFewShot"]

_ALL_DIGITS = tuple(range(10))


def _load_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 8, 8) / 16.0
    return x, torch.as_tensor(labels, dtype=torch.long)


class DigitsFewShot:
    """A seeded stream of N-way K-shot tasks from sklearn's digits.

    Each task picks `ways` classes of its split, relabels them 0..ways-1 in random order, and
    draws `shots` support and `query` query images per class without overlap.

    Args:
        ways: classes per task (N).
        shots: support images per class (K).
        query: query images per class.
        split: "train" (classes from `train_digits`) or "test" (the other digits).
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
        self.ways = _count(ways, "ways", 1)
        self.shots = _count(shots, "shots", 1)
        self.query = _count(query, "query", 1)
        if split not in ("train", "test"):
            raise ValueError(f"Invalid split: {split!r} (expected 'train' or 'test')")
        train_digits = tuple(int(d) for d in train_digits)
        if not train_digits or any(d not in _ALL_DIGITS for d in train_digits):
            raise ValueError(f"Invalid train_digits: {train_digits} (digits 0-9, at least one)")
        if len(set(train_digits)) == len(_ALL_DIGITS):
            raise ValueError("Invalid train_digits: every digit is a training digit, none is left")
        digits = (
            sorted(set(train_digits))
            if split == "train"
            else [d for d in _ALL_DIGITS if d not in train_digits]
        )
        self.split = split
        self.seed = int(seed)
        self.flatten = bool(flatten)
        self.dtype = dtype
        images, labels = _load_digits()
        turns = (0, 1, 2, 3) if rotations else (0,)
        # One image tensor per class: (digit, rotation) pairs in a fixed order.
        self.classes: list[tuple[int, int]] = [(d, k) for d in digits for k in turns]
        self._images = [
            torch.rot90(images[labels == d], k, dims=(1, 2)).to(dtype) for d, k in self.classes
        ]
        if self.ways > len(self.classes):
            raise ValueError(
                f"Invalid ways: {ways} exceeds the {len(self.classes)} classes of the "
                f"{split!r} split"
            )
        smallest = min(len(x) for x in self._images)
        if self.shots + self.query > smallest:
            raise ValueError(
                f"Invalid shots + query: {self.shots} + {self.query} exceeds {smallest}, the "
                "number of images in the smallest class"
            )
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def num_classes(self) -> int:
        """The number of classes in this split."""
        return len(self.classes)

    def sample(self, meta_batch: int) -> TaskBatch:
        """Draw `meta_batch` tasks.

        Returns:
            A `TaskBatch`: support images [meta_batch, ways * shots, 64] (or [..., 1, 8, 8]),
            support labels [meta_batch, ways * shots], query images and labels likewise with
            `ways * query` examples. Examples are shuffled within each set.
        """
        _count(meta_batch, "meta_batch", 1)
        g = self.generator
        sets: list[list[Tensor]] = [[], [], [], []]
        for _ in range(meta_batch):
            chosen = torch.randperm(len(self.classes), generator=g)[: self.ways]
            sx, sy, qx, qy = [], [], [], []
            for label, c in enumerate(chosen.tolist()):
                pool = self._images[c]
                idx = torch.randperm(len(pool), generator=g)[: self.shots + self.query]
                sx.append(pool[idx[: self.shots]])
                qx.append(pool[idx[self.shots :]])
                sy.append(torch.full((self.shots,), label, dtype=torch.long))
                qy.append(torch.full((self.query,), label, dtype=torch.long))
            s_order = torch.randperm(self.ways * self.shots, generator=g)
            q_order = torch.randperm(self.ways * self.query, generator=g)
            sets[0].append(torch.cat(sx)[s_order])
            sets[1].append(torch.cat(sy)[s_order])
            sets[2].append(torch.cat(qx)[q_order])
            sets[3].append(torch.cat(qy)[q_order])
        sx, sy, qx, qy = (torch.stack(s) for s in sets)
        shape = (meta_batch, -1, 64) if self.flatten else (meta_batch, -1, 1, 8, 8)
        return TaskBatch(sx.reshape(shape), sy, qx.reshape(shape), qy)

    def __repr__(self) -> str:
        return (
            f"DigitsFewShot(ways={self.ways}, shots={self.shots}, query={self.query}, "
            f"split={self.split!r}, classes={self.num_classes}, seed={self.seed})"
        )
