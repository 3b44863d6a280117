"""Shared types and argument checks of the library: one place for each rule.

Every constructor in metagrad validates its arguments with these functions, so a rule ("an
int >= 1", "a finite number >= 0") is written once and its message reads the same everywhere.
The errors are `ArgumentError`s (a `ValueError`) that carry the argument's name, which lets
the training application name the config key (`inner_optim.lr: ...`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ArgumentError",
    "Params",
    "check_choice",
    "check_count",
    "check_number",
    "detach_tree",
    "dot",
]

#: Inner parameters (or anything shaped like them): a mapping from parameter name to tensor.
Params = dict[str, Tensor]


class ArgumentError(ValueError):
    """An argument is out of range or of the wrong type.

    Attributes:
        arg: the argument's name, e.g. "lr" or "betas[0]".
    """

    def __init__(self, arg: str, message: str) -> None:
        super().__init__(message)
        self.arg = arg


def check_count(value: Any, arg: str, minimum: int = 1, *, allow_none: bool = False) -> Any:
    """An integer >= `minimum` (bools refused), or None where `allow_none`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        also = " or None" if allow_none else ""
        raise ArgumentError(arg, f"Invalid {arg}: {value!r} (must be an int >= {minimum}{also})")
    return value


def check_number(
    value: Any,
    arg: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> Any:
    """A finite real number (bools refused) in the given range; returns it as a float."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(arg, f"Invalid {arg}: expected a number, got {value!r}")
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        allowed = _range(low, high, low_open, high_open)
        raise ArgumentError(arg, f"Invalid {arg}: {value!r} (must be {allowed})")
    return float(value)


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return "finite"
    if high is None:
        return f"finite and {'>' if low_open else '>='} {low}"
    if low is None:
        return f"finite and {'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_choice(value: Any, arg: str, choices: tuple[Any, ...]) -> Any:
    """One of `choices` (compared by value and type, so 1 is not True)."""
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ArgumentError(arg, f"Invalid {arg}: {value!r} (expected one of {choices})")
    return value


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """The inner product of two dicts of tensors with the same keys."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def detach_tree(tree: Any) -> Any:
    """`tree` (params, optimizer state, or both) with every tensor detached."""
    return torch.utils._pytree.tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, tree)
