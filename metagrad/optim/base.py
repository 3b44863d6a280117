"""The differentiable optimizer interface shared by every optimizer in `metagrad.optim`.

An optimizer is a dataclass whose fields are its hyperparameters, each declared once with
`hyper(...)` (a value in any hyperparameter form, range-checked at construction), `pair(...)`
(two such values, as Adam's `betas`) or `flag(...)` (a boolean switch that cannot be learned).
The base class validates them, and `per_parameter(params)` resolves them for each parameter, so
an update rule reads `h.lr`, `h.momentum`, ... instead of resolving names by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from .._checks import ArgumentError
from ._hyper import Hyper, Params, check_coverage, check_grads, resolve, validate

__all__ = ["Optimizer", "safe_sqrt", "hyper", "pair", "flag"]

State = TypeVar("State")

_KIND = "metagrad_kind"


def hyper(default: float, low: float = 0.0, high: float | None = None, high_open: bool = False):
    """Declare a hyperparameter field: any hyperparameter form, in [low, high] (finite)."""
    meta = {_KIND: "hyper", "low": low, "high": high, "high_open": high_open}
    return dataclasses.field(default=default, metadata=meta)


def pair(
    default: tuple[float, float],
    components: tuple[str, str],
    low: float = 0.0,
    high: float | None = None,
    high_open: bool = False,
):
    """Declare a pair of hyperparameters given together (Adam's `betas`).

    Args:
        default: the two default values.
        components: a name for each value, under which it can be learned on its own
            (`("beta1", "beta2")`).
        low, high, high_open: the range of each value.
    """
    meta = {
        _KIND: "pair",
        "low": low,
        "high": high,
        "high_open": high_open,
        "components": components,
    }
    return dataclasses.field(default=default, metadata=meta)


def flag(default: bool):
    """Declare a boolean switch (`nesterov`, `amsgrad`): part of the rule, never learned."""
    return dataclasses.field(default=default, metadata={_KIND: "flag"})


def safe_sqrt(x: Tensor) -> Tensor:
    """Square root whose derivative at exactly 0 is 0 instead of infinity.

    `torch.sqrt` has derivative 1 / (2 sqrt(x)), which is infinite at 0; an optimizer
    statistic such as Adam's second moment is exactly 0 for a coordinate whose gradient has
    always been 0 (a dead ReLU unit, a parameter the loss does not use), and the chain rule
    then multiplies infinity by 0 and returns NaN. Such a coordinate is constant in a
    neighbourhood of the current hyperparameters, so its true derivative is 0, which is what
    this function returns. Values are those of `torch.sqrt` for x >= 0 (a negative x, which only
    rounding in a variance estimate produces, gives 0 instead of NaN); the optimizer's math is
    unchanged.

    With the mask m = 1 where x > 0 and 0 elsewhere, it computes sqrt(m x + (1 - m)) m: the
    square root never sees 0, so every higher and forward-mode derivative stays finite too.
    The mask is built from plain arithmetic (`sign`), which costs less than comparisons and
    `where` in a long unrolled graph.
    """
    mask = torch.sign(x.detach()).clamp_min(0)  # 1 where x > 0, else 0; constant for autograd
    return torch.sqrt(torch.addcmul(1 - mask, x, mask)) * mask


def _split_pair(value: Sequence[Hyper] | Tensor, arg: str) -> tuple[Hyper, Hyper]:
    if isinstance(value, Tensor):
        if value.shape != (2,):
            raise ArgumentError(
                arg,
                f"Invalid {arg}: a tensor of {arg} must have shape (2,), got {tuple(value.shape)}",
            )
        return value[0], value[1]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ArgumentError(arg, f"Invalid {arg}: expected a pair of values, got {value!r}")
    return value[0], value[1]


@dataclasses.dataclass(eq=False, repr=False)
class Optimizer(Generic[State]):
    """A pure, out-of-place optimizer whose step is differentiable.

    Subclasses are dataclasses that declare their hyperparameters as fields (`hyper`, `pair`,
    `flag`) and implement `init` and `step`:

    >>> state = opt.init(params)                         # params: dict[str, Tensor]
    >>> params, state = opt.step(params, grads, state)   # new tensors; inputs untouched

    `step` never modifies its inputs. The tensors it returns carry the autograd graph back to
    the hyperparameters (where they require grad), the old params, the grads and the state.

    Raises:
        ArgumentError: (a `ValueError`) a hyperparameter is non-finite, out of range or of an
            unsupported type; the message names it.
    """

    def __post_init__(self) -> None:
        for f in _fields(type(self), "hyper"):
            m = f.metadata
            value = validate(getattr(self, f.name), f.name, m["low"], m["high"], m["high_open"])
            setattr(self, f.name, value)
        for f in _fields(type(self), "pair"):
            m = f.metadata
            parts = _split_pair(getattr(self, f.name), f.name)
            checked = tuple(
                validate(v, f"{f.name}[{i}]", m["low"], m["high"], m["high_open"])
                for i, v in enumerate(parts)
            )
            setattr(self, f.name, checked)
        for f in _fields(type(self), "flag"):
            value = getattr(self, f.name)
            if not isinstance(value, bool):
                raise ArgumentError(
                    f.name, f"Invalid {f.name}: expected true or false, got {value!r}"
                )
        self._check_args()

    def _resolvable(self) -> list[tuple[str, str, Hyper]]:
        """(field, argument name, value) of every hyperparameter, pairs flattened; read from
        the current attributes (a copy whose tensors were swapped in is resolved as it is)."""
        out: list[tuple[str, str, Hyper]] = []
        for f in _fields(type(self), "hyper", "pair"):
            value = getattr(self, f.name)
            if f.metadata[_KIND] == "pair":
                out.extend((f.name, f"{f.name}[{i}]", v) for i, v in enumerate(value))
            else:
                out.append((f.name, f.name, value))
        return out

    def _check_args(self) -> None:
        """Checks that involve several hyperparameters (subclasses override)."""

    # ------------------------------------------------------------------ declarations
    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        """Names of the hyperparameter fields (pairs included), in declaration order."""
        return tuple(f.name for f in _fields(cls, "hyper", "pair"))

    @classmethod
    def flag_names(cls) -> tuple[str, ...]:
        """Names of the boolean switches."""
        return tuple(f.name for f in _fields(cls, "flag"))

    @classmethod
    def learnable_names(cls) -> dict[str, tuple[str, int | None]]:
        """Every value that can be learned on its own: name -> (field, index in a pair or None).

        Pairs contribute their components (`beta1` -> `("betas", 0)`).
        """
        out: dict[str, tuple[str, int | None]] = {}
        for f in _fields(cls, "hyper", "pair"):
            if f.metadata[_KIND] == "pair":
                for i, c in enumerate(f.metadata["components"]):
                    out[c] = (f.name, i)
            else:
                out[f.name] = (f.name, None)
        return out

    @classmethod
    def bounds(cls, name: str) -> tuple[float, float | None, bool]:
        """`(low, high, high_open)` of the hyperparameter (or pair component) `name`."""
        field, _ = cls.learnable_names()[name]
        m = next(f for f in dataclasses.fields(cls) if f.name == field).metadata
        return m["low"], m["high"], m["high_open"]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The default value of every field."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters and flags by name, as validated (numbers, tensors, mappings)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # ------------------------------------------------------------------ the step
    def init(self, params: Params) -> State:
        """Build the optimizer state for `params` (a mapping from name to tensor)."""
        raise NotImplementedError

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        """Apply one update; returns new params and new state without touching the inputs."""
        raise NotImplementedError

    def check(self, params: Params) -> None:
        """Check that every per-parameter hyperparameter fits `params` (called by `init`)."""
        check_coverage(params, {arg: v for _, arg, v in self._resolvable()})

    def per_parameter(
        self, params: Params, grads: Params
    ) -> Iterator[tuple[str, Tensor, Tensor, Any]]:
        """`(name, param, grad, h)` for each parameter, after checking `grads`.

        `h` holds this parameter's value of every hyperparameter as an attribute (`h.lr`,
        pairs as tuples: `h.betas`), each a number or a tensor (0-d or shaped like the
        parameter).
        """
        check_grads(params, grads)
        resolvable = self._resolvable()
        # Numbers and 0-d tensors are the same for every parameter: resolve them once.
        shared = all(
            isinstance(v, (int, float)) or (isinstance(v, Tensor) and v.dim() == 0)
            for _, _, v in resolvable
        )
        h = None
        for name, p in params.items():
            if h is None or not shared:
                values: dict[str, Any] = {}
                for field, arg, value in resolvable:
                    v = resolve(value, arg, name, p)
                    if field == arg:
                        values[field] = v
                    else:
                        values[field] = (*values.get(field, ()), v)
                h = SimpleNamespace(**values)
            yield name, p, grads[name], h

    def __repr__(self) -> str:
        def show(v: Any) -> str:
            if isinstance(v, Tensor):
                return f"tensor{tuple(v.shape)}" if v.dim() else f"tensor({v.detach().cpu()})"
            if isinstance(v, Mapping):
                return f"<per-parameter: {len(v)} entries>"
            if isinstance(v, tuple):
                return "(" + ", ".join(show(x) for x in v) + ")"
            return repr(v)

        args = ", ".join(f"{k}={show(v)}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


_FIELDS: dict[tuple[type, tuple[str, ...]], tuple[dataclasses.Field, ...]] = {}


def _fields(cls: type, *kinds: str) -> tuple[dataclasses.Field, ...]:
    """The fields of optimizer class `cls` declared with the given kinds (cached per class)."""
    key = (cls, kinds)
    if key not in _FIELDS:
        _FIELDS[key] = tuple(f for f in dataclasses.fields(cls) if f.metadata.get(_KIND) in kinds)
    return _FIELDS[key]
