"""What a task provides: the two small protocols the training application runs on.

A *supervised task* feeds hyperparameter learning (`loop=hpo`) and online training
(`loop=online`): seeded training batches for the inner loop, a validation batch for the outer
loss, and whole splits for evaluation. An *episodic task* feeds few-shot meta-learning
(`loop=fewshot`): meta-batches of tasks, each with a support and a query set.

Any object with these methods works (no base class is needed); `TensorTask` implements the
supervised protocol over tensors held in memory. Both may also define `model_args()`, a dict
of constructor arguments their data implies (`in_features`, `num_classes`, `image_size`, ...):
the application fills a model argument left unset in the config from it. A supervised task
may define `example_groups()`, named boolean masks over its training examples (e.g. the
corrupted and the clean ones), by which the application summarizes learned per-example
weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Batch", "IndexedBatch", "TaskBatch", "SupervisedTask", "EpisodicTask", "SPLITS"]

#: Inputs and targets of a batch.
Batch = tuple[Tensor, Tensor]

#: Inputs, targets and the examples' positions in the training split: the training batches of
#: an indexed task (`TensorTask(indexed=True)`), which per-example weights look up.
IndexedBatch = tuple[Tensor, Tensor, Tensor]

#: The names of the splits.
SPLITS = ("train", "val", "test")


class TaskBatch(NamedTuple):
    """A meta-batch of tasks; every tensor has a leading task dimension.

    Unpacks as `support_x, support_y, query_x, query_y`, the argument order of every
    `metagrad.learners` learner.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


@runtime_checkable
class SupervisedTask(Protocol):
    """Data for `loop=hpo` and `loop=online`."""

    def train_batches(self, seed: int, count: int) -> Sequence[Batch] | Sequence[IndexedBatch]:
        """`count` training batches, the same for the same seed (a resumed run needs them).

        A batch is `(inputs, targets)`, or `(inputs, targets, indices)` with the examples'
        positions in the training split (then `split("train")` carries `0..n-1` too).
        """
        ...

    def val_batch(self, seed: int) -> Batch:
        """The batch of the outer (validation) loss of an outer step."""
        ...

    def split(self, name: str) -> Batch | None:
        """A whole split ("train", "val" or "test") for evaluation; None if it is empty."""
        ...


@runtime_checkable
class EpisodicTask(Protocol):
    """Few-shot episodes for `loop=fewshot`."""

    def episodes(self, split: str, count: int, seed: int) -> TaskBatch:
        """`count` tasks of split "train", "val" or "test", the same for the same seed.

        Tasks of different splits must not share classes (or functions), so that evaluation
        measures adaptation to new tasks.
        """
        ...


def model_args(task: Any) -> dict[str, Any]:
    """The model arguments a task implies (empty when it does not say)."""
    fn = getattr(task, "model_args", None)
    return dict(fn()) if callable(fn) else {}
