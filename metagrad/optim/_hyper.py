"""Hyperparameter values: validation and per-parameter resolution.

A hyperparameter given to a differentiable optimizer takes one of four forms:

* a Python number, shared by every parameter;
* a 0-d tensor, shared by every parameter (may require grad);
* a tensor shaped like a parameter, used element-wise for every parameter of that shape
  (per-element, as in Meta-SGD; mostly useful when there is one parameter);
* a mapping from parameter name to any of the above (per layer, or per element when the
  values are shaped like their parameters).

Resolution happens once per step and never copies or detaches a value, so gradients flow back
to whatever produced it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .._checks import ArgumentError, Params

__all__ = ["Hyper", "Params", "check_grads", "check_coverage", "resolve", "validate", "is_zero"]

Hyper = float | Tensor | Mapping[str, float | Tensor]


def _is_concrete(t: Tensor) -> bool:
    """Whether `t` holds ordinary values that may be inspected (not a torch.func wrapper)."""
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return not (is_wrapped is not None and is_wrapped(t))


def _check_range(
    value: float | Tensor, arg: str, where: str, low: float, high: float | None, high_open: bool
) -> None:
    if isinstance(value, Tensor):
        if not _is_concrete(value) or value.numel() == 0:
            return
        # Comparisons build no graph: the check never affects a hypergradient. One fused
        # reduction and one sync (NaN fails `>=`): optimizers are built at every inner step.
        if value.dim() == 0:  # the common case: one sync, no extra ops
            x = value.item()
            bad = not (math.isfinite(x) and x >= low)
            bad = bad or (high is not None and (x >= high if high_open else x > high))
        else:
            ok = torch.isfinite(value) & (value >= low)
            if high is not None:
                ok = ok & ((value < high) if high_open else (value <= high))
            bad = not bool(ok.all())
        shown: object = ""
        if bad:
            v = value.detach()
            if v.numel() <= 4:
                shown = v.cpu()
            else:
                lo, hi = v.min(), v.max()
                shown = f"tensor of shape {tuple(v.shape)} with values from {lo:g} to {hi:g}"
    else:
        bad = not (math.isfinite(value) and value >= low) or (
            high is not None and (value >= high if high_open else value > high)
        )
        shown = value
    if bad:
        if high is None:
            allowed = f">= {low} and finite"
        else:
            allowed = f"in [{low}, {high})" if high_open else f"in [{low}, {high}]"
        raise ArgumentError(arg, f"Invalid {arg}{where}: {shown} (must be {allowed})")


def validate(
    value: Hyper,
    arg: str,
    low: float = 0.0,
    high: float | None = None,
    high_open: bool = False,
) -> Hyper:
    """Check the form and range of a hyperparameter at construction time.

    Args:
        value: the hyperparameter in any accepted form.
        arg: its name, used in error messages.
        low: smallest allowed value (inclusive).
        high: largest allowed value, or None for no upper bound.
        high_open: whether `high` itself is excluded.

    Returns:
        The value unchanged (mappings are copied into a plain dict).

    Raises:
        ValueError: a value is out of range, or the value has an unsupported type.
    """
    if isinstance(value, Mapping):
        for name, v in value.items():
            if not isinstance(v, (int, float, Tensor)) or isinstance(v, bool):
                raise ArgumentError(
                    arg,
                    f"Invalid {arg} for parameter '{name}': expected a number or a tensor, "
                    f"got {type(v).__name__}",
                )
            _check_range(v, arg, f" for parameter '{name}'", low, high, high_open)
        return dict(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise ArgumentError(
            arg,
            f"Invalid {arg}: expected a number, a tensor or a mapping from parameter name to "
            f"either, got {type(value).__name__}",
        )
    _check_range(value, arg, "", low, high, high_open)
    return value


def resolve(value: Hyper, arg: str, name: str, param: Tensor) -> float | Tensor:
    """The value of hyperparameter `arg` for parameter `name`, checked against its shape.

    Raises:
        ValueError: a mapping misses `name`, or a tensor value is neither 0-d nor shaped like
            the parameter.
    """
    # Called for every hyperparameter, parameter and step: the common cases come first.
    if isinstance(value, (int, float)):
        return value
    if not isinstance(value, Tensor):  # a mapping from parameter name to value
        try:
            value = value[name]
        except KeyError:
            raise ValueError(
                f"{arg} is given per parameter but has no value for parameter '{name}' "
                f"(it has: {sorted(value)})"  # type: ignore[arg-type]
            ) from None
        if not isinstance(value, Tensor):
            return value
    if value.dim() != 0 and value.shape != param.shape:
        raise ValueError(
            f"{arg} for parameter '{name}' has shape {tuple(value.shape)}, but the parameter has "
            f"shape {tuple(param.shape)}: a per-element hyperparameter must match its parameter"
        )
    return value


def is_zero(value: Hyper) -> bool:
    """True only for a plain number equal to zero, whose term can be skipped exactly.

    A tensor is never treated as zero: even when its value is 0 its gradient is not.
    """
    return isinstance(value, (int, float)) and value == 0


def _check_mappings(**named: object) -> None:
    if not all(isinstance(v, Mapping) for v in named.values()):
        kinds = " and ".join(type(v).__name__ for v in named.values())
        raise ValueError(
            f"{' and '.join(named)} must be mappings from parameter name to tensor, got {kinds}"
        )


def check_grads(params: Params, grads: Params) -> None:
    """Check that `grads` has a tensor shaped like each parameter and nothing else.

    Raises:
        ValueError: keys differ, a gradient is None or not a tensor, or its shape differs from
            its parameter's.
    """
    _check_mappings(params=params, grads=grads)
    if params.keys() != grads.keys():
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        problems = []
        if missing:
            problems.append(f"no grads for parameters {missing}")
        if extra:
            problems.append(f"grads for parameters {extra} that are not in params")
        raise ValueError(f"grads must have the same keys as params: {'; '.join(problems)}")
    for name, p in params.items():
        g = grads[name]
        if not isinstance(g, Tensor):
            hint = " (use torch.zeros_like for a parameter without gradient)" if g is None else ""
            raise ValueError(
                f"grad for parameter '{name}' must be a tensor, got {type(g).__name__}{hint}"
            )
        if g.shape != p.shape:
            raise ValueError(
                f"grad for parameter '{name}' has shape {tuple(g.shape)}, expected {tuple(p.shape)}"
            )


def check_coverage(params: Params, hypers: Mapping[str, Hyper]) -> None:
    """Check that every per-parameter hyperparameter fits `params` (names and shapes).

    Raises:
        ValueError: a mapping names parameters that do not exist or misses one, or a tensor
            value is neither 0-d nor shaped like its parameter.
    """
    _check_mappings(params=params)
    for arg, value in hypers.items():
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(params))
            if unknown:
                raise ValueError(
                    f"{arg} names parameters that are not in params: {unknown} "
                    f"(params has: {sorted(params)})"
                )
        for name, p in params.items():
            resolve(value, arg, name, p)
