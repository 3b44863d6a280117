"""sklearn's digits as fixed train/validation/test splits with seeded, reproducible batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DigitsTask", "Batch"]

Batch = tuple[Tensor, Tensor]


@dataclass
class _Split:
    x: Tensor
    y: Tensor


class DigitsTask:
    """sklearn's 8x8 handwritten digits (1797 images, 10 classes), split once by a seed.

    Pixels are scaled to [0, 1]. Batches are drawn from a `torch.Generator` seeded by
    `(seed, outer_step)`, so the batch of inner step `t` in outer step `s` is the same in every
    run with the same seed, including a resumed one.

    Args:
        batch_size: examples per inner (training) batch.
        val_size: examples in the validation split (the outer loss is computed on it).
        test_size: examples in the test split (only used for the final report).
        outer_batch_size: examples per outer batch; None uses the whole validation split.
        split_seed: seed of the train/validation/test split.
        dtype: dtype of the inputs, "float32" or "float64".
        in_features: must be 64 (the image size); given so model configs can read it.
        out_features: must be 10; given so model configs can read it.
    """

    def __init__(
        self,
        batch_size: int = 100,
        val_size: int = 400,
        test_size: int = 400,
        outer_batch_size: int | None = None,
        split_seed: int = 0,
        dtype: str = "float32",
        in_features: int = 64,
        out_features: int = 10,
    ) -> None:
        from sklearn.datasets import load_digits

        if in_features != 64 or out_features != 10:
            raise ValueError(
                f"digits has 64 features and 10 classes, got in_features={in_features}, "
                f"out_features={out_features}"
            )
        data = load_digits()
        n = len(data.target)
        if val_size < 1 or test_size < 0 or val_size + test_size >= n - batch_size:
            raise ValueError(
                f"Invalid split sizes: val_size={val_size}, test_size={test_size} leave fewer "
                f"than batch_size={batch_size} of {n} examples for training"
            )
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (must be >= 1)")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"Invalid dtype: {dtype!r} (float32 or float64)")
        x = torch.as_tensor(data.data, dtype=getattr(torch, dtype)) / 16.0
        y = torch.as_tensor(data.target, dtype=torch.long)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
        x, y = x[order], y[order]
        self.val = _Split(x[:val_size], y[:val_size])
        self.test = _Split(x[val_size : val_size + test_size], y[val_size : val_size + test_size])
        self.train = _Split(x[val_size + test_size :], y[val_size + test_size :])
        self.batch_size = batch_size
        self.outer_batch_size = outer_batch_size
        self.in_features = in_features
        self.out_features = out_features

    def inner_batches(self, seed: int, steps: int) -> list[Batch]:
        """`steps` training batches, each drawn without replacement, from generator `seed`."""
        g = torch.Generator().manual_seed(seed)
        n = len(self.train.y)
        out = []
        for _ in range(steps):
            idx = torch.randperm(n, generator=g)[: self.batch_size]
            out.append((self.train.x[idx], self.train.y[idx]))
        return out

    def outer_batch(self, seed: int) -> Batch:
        """The validation batch of the outer loss: the whole split, or a seeded subset."""
        if self.outer_batch_size is None or self.outer_batch_size >= len(self.val.y):
            return self.val.x, self.val.y
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.val.y), generator=g)[: self.outer_batch_size]
        return self.val.x[idx], self.val.y[idx]

    def __repr__(self) -> str:
        return (
            f"DigitsTask(train={len(self.train.y)}, val={len(self.val.y)}, "
            f"test={len(self.test.y)}, batch_size={self.batch_size})"
        )
