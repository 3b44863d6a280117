"""Supervised tasks over tensors in memory: a generic one and sklearn's digits."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import ArgumentError, check_count
from .protocols import Batch, IndexedBatch

__all__ = ["TensorTask", "Digits"]


def _pair(value: Any, arg: str) -> Batch:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(t, Tensor) for t in value)
    ):
        raise ArgumentError(arg, f"Invalid {arg}: expected a pair of tensors (x, y)")
    x, y = value
    if len(x) != len(y):
        raise ArgumentError(arg, f"Invalid {arg}: {len(x)} inputs but {len(y)} targets")
    return x, y


class TensorTask:
    """A supervised task whose splits are tensors: the `SupervisedTask` protocol, ready to use.

    Training batches are drawn without replacement from a `torch.Generator` seeded by the
    seed the application passes (derived from the run's seed and the outer step), so the
    batches of a run are reproducible, a resumed run included.

    Args:
        train: (inputs, targets) of the training split.
        val: (inputs, targets) of the validation split (the outer objective).
        test: (inputs, targets) of the test split, reported at the end only; None for none.
        batch_size: examples per training batch.
        outer_batch_size: examples per outer (validation) batch; None uses the whole split.
        model_args: constructor arguments the data implies, e.g. {"in_features": 64,
            "out_features": 10}, given to models that leave them unset.
        indexed: training batches and the training split carry a third element, the
            positions of their examples in the training split (an int64 tensor), which
            learned per-example weights look up (`learn.example_weights`).

    Example:
        >>> class MyTask(TensorTask):
        ...     def __init__(self, path: str, batch_size: int = 64):
        ...         x, y = load(path)  # your data
        ...         super().__init__((x[:800], y[:800]), (x[800:], y[800:]), batch_size=batch_size,
        ...                          model_args={"in_features": x.shape[1], "out_features": 10})
    """

    def __init__(
        self,
        train: Batch,
        val: Batch,
        test: Batch | None = None,
        batch_size: int = 100,
        outer_batch_size: int | None = None,
        model_args: dict[str, Any] | None = None,
        indexed: bool = False,
    ) -> None:
        self.train = _pair(train, "train")
        self.val = _pair(val, "val")
        self.test = None if test is None else _pair(test, "test")
        self.batch_size = check_count(batch_size, "batch_size")
        self.outer_batch_size = check_count(outer_batch_size, "outer_batch_size", allow_none=True)
        if len(self.train[1]) < self.batch_size:
            raise ArgumentError(
                "batch_size",
                f"Invalid batch_size: {batch_size} exceeds the {len(self.train[1])} training "
                "examples",
            )
        if len(self.val[1]) == 0:
            raise ArgumentError("val", "Invalid val: the validation split is empty")
        self._model_args = dict(model_args or {})
        self.indexed = bool(indexed)

    def train_batches(self, seed: int, count: int) -> list[Batch] | list[IndexedBatch]:
        """`count` training batches, each drawn without replacement, from generator `seed`.

        Each is `(x, y)`, or `(x, y, indices)` for an indexed task.
        """
        g = torch.Generator().manual_seed(seed)
        x, y = self.train
        out: list[Any] = []
        for _ in range(count):
            idx = torch.randperm(len(y), generator=g)[: self.batch_size]
            out.append((x[idx], y[idx], idx) if self.indexed else (x[idx], y[idx]))
        return out

    def val_batch(self, seed: int) -> Batch:
        """The validation batch of the outer loss: the whole split, or a seeded subset."""
        x, y = self.val
        if self.outer_batch_size is None or self.outer_batch_size >= len(y):
            return x, y
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(y), generator=g)[: self.outer_batch_size]
        return x[idx], y[idx]

    def split(self, name: str) -> Batch | IndexedBatch | None:
        """The whole split "train", "val" or "test" (None when it is empty or absent).

        An indexed task's training split carries the indices `0..n-1` as a third element.
        """
        if name not in ("train", "val", "test"):
            raise ArgumentError("split", f"Invalid split: {name!r} (train, val or test)")
        found = getattr(self, name)
        if found is None or len(found[1]) == 0:
            return None
        if name == "train" and self.indexed:
            return (*found, torch.arange(len(found[1])))
        return found

    def model_args(self) -> dict[str, Any]:
        """Model constructor arguments implied by the data."""
        return dict(self._model_args)

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{n}={0 if s is None else len(s[1])}"
            for n, s in (("train", self.train), ("val", self.val), ("test", self.test))
        )
        return f"{type(self).__name__}({sizes}, batch_size={self.batch_size})"


class Digits(TensorTask):
    """sklearn's 8x8 handwritten digits (1,797 images, 10 classes), split once by a seed.

    Pixels are scaled to [0, 1]; inputs are 64 features (models that want images reshape them:
    `model_args()` gives `in_channels=1, image_size=8` too).

    Args:
        batch_size: examples per inner (training) batch.
        val_size: examples in the validation split (the outer loss is computed on it).
        test_size: examples in the test split (only used for the final report).
        outer_batch_size: examples per outer batch; None uses the whole validation split.
        split_seed: seed of the train/validation/test split.
        indexed: training batches carry their examples' indices (see `TensorTask`).
    """

    def __init__(
        self,
        batch_size: int = 100,
        val_size: int = 400,
        test_size: int = 400,
        outer_batch_size: int | None = None,
        split_seed: int = 0,
        indexed: bool = False,
    ) -> None:
        x, y = load_digits()
        n = len(y)
        check_count(val_size, "val_size")
        check_count(test_size, "test_size", 0)
        if val_size + test_size > n - check_count(batch_size, "batch_size"):
            raise ArgumentError(
                "val_size",
                f"Invalid split sizes: val_size={val_size}, test_size={test_size} leave fewer "
                f"than batch_size={batch_size} of {n} examples for training",
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
        x, y = x[order], y[order]
        a, b = val_size, val_size + test_size
        super().__init__(
            train=(x[b:], y[b:]),
            val=(x[:a], y[:a]),
            test=(x[a:b], y[a:b]),
            batch_size=batch_size,
            outer_batch_size=outer_batch_size,
            model_args={
                "in_features": 64,
                "out_features": 10,
                "in_channels": 1,
                "num_classes": 10,
                "image_size": 8,
            },
            indexed=indexed,
        )


def load_digits() -> tuple[Tensor, Tensor]:
    """sklearn's digits as float32 inputs in [0, 1] (n x 64) and int64 labels.

    Raises:
        FileNotFoundError: scikit-learn's copy of the data set is missing (a broken install).
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError(
            "the digits data comes with scikit-learn: pip install scikit-learn"
        ) from e
    try:
        images, labels = _load(return_X_y=True)
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(
            f"scikit-learn's digits data could not be read ({e}); reinstall scikit-learn "
            "(pip install --force-reinstall scikit-learn)"
        ) from None
    x = torch.as_tensor(images, dtype=torch.float32) / 16.0
    return x, torch.as_tensor(labels, dtype=torch.long)
