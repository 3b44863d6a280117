"""Run one per-task function over a meta-batch: `torch.func.vmap` or a Python loop.

Both paths call the same function on the same inputs, so they give the same numbers (up to
floating-point summation order). The loop exists for models that vmap cannot batch
(data-dependent control flow, `.item()`, ops without a batching rule) and for layers whose
vmapped second-order gradients are wrong in PyTorch (see `vmap_blocker`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["vmap_blocker", "map_tasks", "index_tree", "check_vectorize"]

logger = logging.getLogger("metagrad.learners")

Vectorize = bool | str
_BATCH_STAT_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def check_vectorize(value: Vectorize) -> Vectorize:
    """Validate the `vectorize` argument: True, False or "auto"."""
    if value not in (True, False, "auto") or (isinstance(value, int) and value not in (0, 1)):
        raise ValueError(f"Invalid vectorize: {value!r} (expected True, False or 'auto')")
    return value


def vmap_blocker(model: nn.Module, second_order: bool) -> str | None:
    """Why vmapped second-order meta-gradients through `model` would be wrong, or None.

    In PyTorch the batching rules of the fused batch-norm and layer-norm backward kernels give
    wrong results when they are differentiated again (a backward of a backward under vmap), and
    they do so silently. A second-order meta-gradient does exactly that whenever the model
    normalizes with batch statistics (BatchNorm or InstanceNorm in training mode, or without
    running statistics) or uses LayerNorm. First-order methods never differentiate a backward
    and are unaffected; GroupNorm and BatchNorm with running statistics in eval mode are fine.
    """
    if not second_order:
        return None
    for name, module in model.named_modules():
        batch_stats = isinstance(module, _BATCH_STAT_NORMS) and (
            module.training or not module.track_running_stats
        )
        if batch_stats or isinstance(module, nn.LayerNorm):
            where = name or "the model itself"
            return (
                f"module '{where}' ({type(module).__name__}) normalizes with statistics of its "
                "input, and PyTorch's vmap gives wrong second-order gradients through it"
            )
    return None


def index_tree(tree: Any, i: int) -> Any:
    """Task `i` of a nested structure (dicts, tuples, lists) of tensors batched on dim 0."""
    if isinstance(tree, Tensor):
        return tree[i]
    if isinstance(tree, dict):
        return {k: index_tree(v, i) for k, v in tree.items()}
    if isinstance(tree, tuple | list):
        return type(tree)(index_tree(v, i) for v in tree)
    return tree


def map_tasks(
    fn: Callable[..., Tensor],
    args: tuple[Any, ...],
    tasks: int,
    *,
    vectorize: bool,
    randomness: str = "different",
) -> Tensor:
    """Apply `fn` to each task of `args` (batched on dim 0) and stack the results.

    Args:
        fn: the per-task function; returns a tensor (typically a scalar loss).
        args: its arguments, each a tensor or a dict/tuple of tensors with a leading task dim.
        tasks: the number of tasks.
        vectorize: one `torch.func.vmap` call (True) or a Python loop (False).
        randomness: vmap's randomness mode ("different": each task draws its own random
            numbers, e.g. dropout masks; "same"; "error").

    Returns:
        The stacked results, shape [tasks, ...].
    """
    if vectorize:
        return torch.func.vmap(fn, randomness=randomness)(*args)
    return torch.stack([fn(*index_tree(args, i)) for i in range(tasks)])


def report_fallback(owner: str, err: BaseException | str) -> None:
    """Log the one message that says a learner runs its tasks in a loop from now on."""
    reason = err if isinstance(err, str) else f"{type(err).__name__}: {err}".split("\n")[0]
    logger.warning(
        "%s: running the tasks of each meta-batch one at a time instead of with torch.func.vmap "
        "(same numbers, slower), because %s. Pass vectorize=False to choose this explicitly.",
        owner,
        reason,
    )
