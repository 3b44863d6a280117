"""Learnable meta-parameters, stored unconstrained, read back in the optimizers' forms."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import ArgumentError, check_choice, check_count

__all__ = ["MetaParameters", "Constraint"]

Constraint = str | tuple[float, float] | None
_SCOPES = ("scalar", "per_layer", "per_element")


@dataclass(frozen=True)
class _Entry:
    scope: str
    constraint: Constraint
    names: tuple[str, ...]  # parameter names, for per_layer and per_element scopes
    steps: int | None


def _bounds(constraint: Constraint) -> tuple[float, float]:
    """The interval of a "unit" or (low, high) constraint."""
    if isinstance(constraint, tuple):
        return constraint
    return (0.0, 1.0)


def _check_constraint(constraint: Constraint, name: str) -> None:
    if constraint in (None, "positive", "unit"):
        return
    if (
        isinstance(constraint, tuple)
        and len(constraint) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in constraint)
        and all(math.isfinite(b) for b in constraint)
        and constraint[0] < constraint[1]
    ):
        return
    raise ArgumentError(
        "constraint",
        f"Invalid constraint for meta-parameter '{name}': {constraint!r} (expected None, "
        "'positive', 'unit' or a pair (low, high) of finite numbers with low < high; for a "
        "value with no upper bound use 'positive')",
    )


def _check_init(init: Any, name: str) -> None:
    def ok(v: Any) -> bool:
        if isinstance(v, Tensor):
            return not v.is_complex() and v.dtype != torch.bool
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    values = init.values() if isinstance(init, Mapping) else [init]
    bad = [v for v in values if not ok(v)]
    if bad:
        raise ArgumentError(
            "init",
            f"Invalid init for meta-parameter '{name}': expected a real number, a real tensor "
            f"or a mapping from parameter name to either, got {type(bad[0]).__name__} "
            f"{bad[0]!r}",
        )


def _to_unconstrained(value: Tensor, constraint: Constraint, name: str) -> Tensor:
    """Inverse of `_to_constrained`, checking that `value` lies strictly inside the domain."""
    value = value.detach()
    if not bool(torch.isfinite(value).all()):
        raise ArgumentError("init", f"Initial value of meta-parameter '{name}' must be finite")
    if constraint is None:
        return value.clone()
    if constraint == "positive":
        if not bool((value > 0).all()):
            raise ArgumentError("init", f"Initial value of meta-parameter '{name}' must be > 0")
        return value.log()
    low, high = _bounds(constraint)
    if not bool(((value > low) & (value < high)).all()):
        raise ArgumentError(
            "init",
            f"Initial value of meta-parameter '{name}' must lie strictly inside ({low}, {high})",
        )
    return torch.logit((value - low) / (high - low))


def _to_constrained(raw: Tensor, constraint: Constraint) -> Tensor:
    if constraint is None:
        return raw
    if constraint == "positive":
        return raw.exp()
    low, high = _bounds(constraint)
    if (low, high) == (0.0, 1.0):
        return torch.sigmoid(raw)  # read at every inner step: skip the no-op affine map
    return low + (high - low) * torch.sigmoid(raw)


def _default_dtype(init: Any, params: Mapping[str, Tensor] | None) -> torch.dtype:
    if params:
        return next(iter(params.values())).dtype
    values = init.values() if isinstance(init, Mapping) else [init]
    for v in values:
        if isinstance(v, Tensor) and v.is_floating_point():
            return v.dtype
    return torch.get_default_dtype()


def _key(param_name: str) -> str:
    # nn.Module attribute names cannot contain dots; parameter names ("0.weight") do.
    return param_name.replace(".", "__")


class MetaParameters(nn.Module):
    """A container of learnable meta-parameters; its `parameters()` feed a stock outer optimizer.

    Values are stored unconstrained and mapped through an explicit constraint when read:
    `"positive"` (stored as a log, e.g. learning rates), `"unit"` (stored as a logit, e.g.
    momentum and betas), `(low, high)` (scaled logit), or `None` (free, e.g. MAML's initial
    weights). Scopes: `"scalar"` (one value), `"per_layer"` (one per parameter tensor),
    `"per_element"` (a tensor shaped like each parameter); `steps=T` adds one value per inner
    step (a schedule) to any scope. Any `nn.Module` assigned as an attribute (or through
    `add_module`) is a meta-parameter too.

    Example:
        >>> meta = MetaParameters()
        >>> meta.add("lr", 0.01, constraint="positive", scope="per_layer", params=params)
        >>> meta.add("momentum", 0.9, constraint="unit")
        >>> opt = SGD(lr=meta.value("lr"), momentum=meta.value("momentum"))
        >>> outer = torch.optim.Adam(meta.parameters(), lr=1e-2)
    """

    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[str, _Entry] = {}
        self._value_cache: dict[tuple[str, int | None, bool], Any] | None = None

    def add(
        self,
        name: str,
        init: float | Tensor | Mapping[str, Tensor | float],
        *,
        constraint: Constraint = "positive",
        scope: str = "scalar",
        params: Mapping[str, Tensor] | None = None,
        steps: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> MetaParameters:
        """Register a learnable meta-parameter.

        Args:
            name: how `value(name)` and `named_parameters()` refer to it.
            init: initial (constrained) value: a number broadcast over the scope, a tensor of
                the scope's shape, or, for per-layer/per-element scopes, a mapping from
                parameter name to value.
            constraint: None, "positive", "unit" or (low, high).
            scope: "scalar", "per_layer" or "per_element".
            params: the inner parameters (names and shapes); needed by per-layer and
                per-element scopes.
            steps: if given, one value per inner step (a schedule of length `steps`).
            dtype: storage dtype; defaults to that of `params`, else of a floating-point
                tensor `init`, else torch's default.

        Returns:
            self, so calls can be chained.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise ArgumentError(
                "name", f"Invalid meta-parameter name {name!r}: must be an identifier"
            )
        if name in self._entries or hasattr(self, name):
            raise ArgumentError("name", f"meta-parameter '{name}' already exists")
        check_choice(scope, "scope", _SCOPES)
        _check_constraint(constraint, name)
        _check_init(init, name)
        check_count(steps, "steps", allow_none=True)
        if scope != "scalar":
            if not isinstance(params, Mapping) or not params:
                raise ArgumentError(
                    "params", f"meta-parameter '{name}' with scope '{scope}' needs params"
                )
            names = tuple(params)
        else:
            names = ()
        if dtype is None:
            dtype = _default_dtype(init, params)
        lead = (steps,) if steps is not None else ()

        def initial(shape: tuple[int, ...], value: Any, what: str) -> Tensor:
            t = torch.as_tensor(value.detach() if isinstance(value, Tensor) else value, dtype=dtype)
            if t.dim() == 0 or t.shape == shape[len(lead) :]:
                t = t.expand(shape)
            if t.shape != shape:
                raise ArgumentError(
                    "init",
                    f"Initial value of meta-parameter '{what}' has shape {tuple(t.shape)}, "
                    f"expected {shape}",
                )
            return _to_unconstrained(t.clone(), constraint, what)

        def pick(pname: str) -> Any:
            if isinstance(init, Mapping):
                if pname not in init:
                    raise ArgumentError(
                        "init", f"Initial value of meta-parameter '{name}' misses '{pname}'"
                    )
                return init[pname]
            return init

        if scope == "scalar":
            self.register_parameter(name, nn.Parameter(initial(lead, init, name)))
        elif scope == "per_layer":
            if isinstance(init, Tensor) and init.dim() > 0:
                stacked = init  # one value per layer in `params` order (steps first)
            else:
                values = [torch.as_tensor(pick(p), dtype=dtype).expand(lead) for p in names]
                stacked = torch.stack(values, dim=-1)
            raw = initial(lead + (len(names),), stacked, name)
            self.register_parameter(name, nn.Parameter(raw))
        else:
            store = nn.ParameterDict()
            for pname in names:
                assert params is not None  # checked above for this scope
                shape = lead + tuple(params[pname].shape)
                store[_key(pname)] = nn.Parameter(initial(shape, pick(pname), f"{name}.{pname}"))
            self.add_module(name, store)
        self._entries[name] = _Entry(scope, constraint, names, steps)
        return self

    def entry_names(self) -> list[str]:
        """Names of the tensor meta-parameters registered with `add`."""
        return list(self._entries)

    def value(self, name: str, step: int | None = None) -> Any:
        """The constrained value of `name`, in the form `metagrad.optim` accepts.

        Returns a 0-d tensor (scalar scope), a dict from parameter name to 0-d tensor
        (per-layer) or to a tensor shaped like the parameter (per-element), or the module
        itself for a module meta-parameter. An entry with `steps` needs `step`, which selects
        that inner step's value. Inside `reuse_values()` the same arguments give the same
        tensors.
        """
        cache = self._value_cache
        if cache is None or name not in self._entries:
            return self._value(name, step)
        key = (name, step, torch.is_grad_enabled())
        if key not in cache:
            cache[key] = self._value(name, step)
        found = cache[key]
        return dict(found) if isinstance(found, dict) else found

    @contextmanager
    def reuse_values(self) -> Iterator[None]:
        """Within the block, `value(name, step)` computes each value once and reuses it.

        Hypergradient methods wrap one inner run in it: a value read at every inner step is
        then one node of the autograd graph instead of T (measurably cheaper for long runs),
        and the gradient is the same. Values computed with grad disabled are kept apart from
        those computed with it. Each block starts empty and the previous cache (if any) is
        restored at its end; do not change the stored values inside a block.
        """
        previous = self._value_cache
        self._value_cache = {}
        try:
            yield
        finally:
            self._value_cache = previous

    def _value(self, name: str, step: int | None) -> Any:
        if name not in self._entries:
            module = getattr(self, name, None) if name in self._modules else None
            if module is not None:
                return module
            raise KeyError(f"no meta-parameter named '{name}' (have: {self.entry_names()})")
        entry = self._entries[name]
        if entry.steps is not None:
            if step is None:
                raise ValueError(f"meta-parameter '{name}' is a per-step schedule: pass step=")
            if not 0 <= step < entry.steps:
                raise ValueError(
                    f"step {step} is outside the schedule of '{name}' (0..{entry.steps - 1})"
                )

        def at(t: Tensor) -> Tensor:
            return t if entry.steps is None else t[step]

        if entry.scope == "scalar":
            return _to_constrained(at(getattr(self, name)), entry.constraint)
        if entry.scope == "per_layer":
            values = _to_constrained(at(getattr(self, name)), entry.constraint)
            # One unbind (one backward node) instead of one select per layer and step.
            return dict(zip(entry.names, values.unbind(-1), strict=True))
        store = getattr(self, name)
        return {p: _to_constrained(at(store[_key(p)]), entry.constraint) for p in entry.names}

    def schedule(self, name: str) -> Tensor:
        """A per-step entry's constrained values as one detached tensor, steps first.

        Scalar scope gives shape [steps], per-layer [steps, layers] (layers in `params` order).
        """
        entry = self._entries[name]
        if entry.steps is None or entry.scope == "per_element":
            raise ValueError(f"'{name}' is not a scalar or per-layer schedule")
        return _to_constrained(getattr(self, name), entry.constraint).detach()

    def scalars(self) -> dict[str, float]:
        """Current constrained values of scalar and per-layer entries, for logging.

        Keys are `name` or `name/param_name`; schedules appear as their mean over steps.
        Per-element entries are left out (log them as histograms).
        """
        out: dict[str, float] = {}
        for name, entry in self._entries.items():
            if entry.scope == "per_element":
                continue
            values = _to_constrained(getattr(self, name).detach(), entry.constraint)
            if entry.steps is not None:
                values = values.mean(dim=0)
            if entry.scope == "scalar":
                out[name] = float(values)
            else:
                out.update({f"{name}/{p}": float(values[i]) for i, p in enumerate(entry.names)})
        return out

    def histograms(self) -> dict[str, Tensor]:
        """Per-element entries' current values (detached), keyed `name/param_name`.

        A per-step entry gives the values of its last step. For logging as histograms.
        """
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, entry in self._entries.items():
                if entry.scope != "per_element":
                    continue
                step = None if entry.steps is None else entry.steps - 1
                out.update({f"{name}/{p}": v for p, v in self._value(name, step).items()})
        return out

    def schedules(self) -> dict[str, Tensor]:
        """Per-step scalar and per-layer entries as `schedule(name)` tensors, keyed by name."""
        return {
            name: self.schedule(name)
            for name, e in self._entries.items()
            if e.steps is not None and e.scope != "per_element"
        }

    def scope(self, name: str) -> str:
        """The scope of entry `name` ("scalar", "per_layer" or "per_element")."""
        return self._entries[name].scope

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call `fn(self, *args, **kwargs)`.

        With `torch.func.functional_call(meta, values, (fn,))` this evaluates `fn` with the
        meta-parameters replaced by `values`, which is how function transforms (jvp, vmap)
        see the meta-parameters as inputs.
        """
        return fn(self, *args, **kwargs)

    def extra_repr(self) -> str:
        parts = []
        for name, e in self._entries.items():
            steps = f", steps={e.steps}" if e.steps is not None else ""
            parts.append(f"{name}: {e.scope}, constraint={e.constraint!r}{steps}")
        return "\n".join(parts)
