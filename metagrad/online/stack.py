r"""Hyperoptimizer stacks (Chandra et al., 2022): every hyperparameter learned online, any height.

A stack is a list of levels, each an optimizer from `metagrad.optim`. Level 0 trains the model;
level k + 1 trains the hyperparameters of level k (its learning rate, momentum, Adam's betas);
the top level's hyperparameters stay fixed. `Hyperoptimizer` runs a stack behind the ordinary
`torch.optim` interface:

>>> opt = Hyperoptimizer(model.parameters(), levels=[
...     HyperAdam(lr=1e-3),      # level 0: trains the model; lr and betas are learned
...     HyperSGD(lr=1e-5),       # level 1: trains Adam's lr and betas; its lr is learned
...     HyperSGD(lr=1e-6),       # level 2 (top): trains level 1's lr; fixed
... ])
>>> opt.zero_grad(); loss.backward(); opt.step()

**The hypergradient.** Write :math:`\phi_k^t` for the hyperparameters of level k used at step t
(stored unconstrained, see below) and :math:`\theta_t` for the model's parameters. Step t
updates every level from the top down, each with the level above's fresh values,

.. math::
    \phi_k^t = U_{k+1}\big(\phi_k^{t-1}, h_k^t;\ \phi_{k+1}^t\big), \qquad
    \theta_t = U_0\big(\theta_{t-1}, g_t;\ \phi_0^t\big),

where :math:`U_k` is level k's update rule (its `metagrad.optim` step; the previous parameters,
gradient and optimizer state enter as constants) and :math:`g_t` is the gradient of the loss
:math:`L_t` at :math:`\theta_{t-1}`. The hypergradient of level k at step t is exact for one
step: the derivative of the current loss with respect to the values used in the previous
update,

.. math::
    h_k^t = \frac{\partial L_t(\theta_{t-1})}{\partial \phi_k^{t-1}}
          = g_t \cdot \frac{\partial \theta_{t-1}}{\partial \phi_0^{t-1}}
            \frac{\partial \phi_0^{t-1}}{\partial \phi_1^{t-1}} \cdots
            \frac{\partial \phi_{k-1}^{t-1}}{\partial \phi_k^{t-1}}.

This is the construction of the `gdtuo` package: the previous update's graph, from the
hyperparameters of every level into :math:`\theta_{t-1}`, is kept for one step, and one
vector-Jacobian product with :math:`g_t` (one backward pass through that update only, never
through the model) gives every level's hypergradient; inputs from before the previous step are
detached, so memory stays flat. The update rules are the pure optimizers of `metagrad.optim`
with tensor hyperparameters, the same code that differentiable inner loops use; nothing of
their math is written again here. Where L2 `weight_decay` is used at level 0, the loss is
taken to include its penalty, as the optimizer does: the gradient in :math:`h_k^t` is
:math:`g_t + \lambda \theta_{t-1}` (as in `SGDHD`/`AdamHD`).

A level's first hypergradient arrives one step after the level below first moved (level 0 at
step 2, level 1 at step 3, ...; a momentum one step later still, since the first momentum
step sets the buffer to the gradient); until then the level's values stay as given and the
level above takes no step for them.

**Storage of the hyperparameters.** Learning rates are stored as they are (no constraint), as
in SGD-HD's additive rule and in gdtuo, so that a stack of SGD over SGD's learning rate is
exactly SGD-HD; a too-large hyper-learning-rate can drive a learned learning rate below zero.
Momentum and Adam's betas are stored as logits (the level above sees
:math:`x = \log(\beta / (1 - \beta))`, and :math:`\beta = \mathrm{sigmoid}(x)`), so they stay
in (0, 1) whatever the steps; gdtuo uses :math:`\beta = (\tanh(y) + 1) / 2`, the same map with
:math:`y = x / 2`. `eps`, `dampening`, `weight_decay` and `nesterov` are fixed. Hypergradients
(`Hyperoptimizer.hypergradients`) are with respect to the stored values.

**Differences from gdtuo.** gdtuo's SGD learns its momentum unconstrained and only when it
starts nonzero, and its Adam starts the second moment at `eps` (because `sqrt` has no
derivative at 0); here momentum is a logit, Adam starts from zero moments exactly as
`torch.optim.Adam` and uses `metagrad.optim.safe_sqrt`. gdtuo feeds a zero hypergradient into
the levels above on the first steps, which for an Adam level counts as a step of its bias
correction; here a level without a hypergradient takes no step. gdtuo's model wrapper needs
`loss.backward(create_graph=True)`; here the model's backward pass is the ordinary one. Stacks
of SGD levels (without momentum) follow gdtuo's trajectories to rounding
(`benchmarks/bench_online_stack.py` checks heights 2-4). With all hyper-learning-rates 0 a
stack is exactly its level 0 (`torch.optim.SGD` or `torch.optim.Adam`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..optim import SGD, Adam
from ..optim.base import Optimizer as PureOptimizer

__all__ = ["Level", "HyperSGD", "HyperAdam", "Hyperoptimizer"]

_KEY = "p"  # the name of the one tensor in each call of a pure optimizer on a parameter


def _detach(tree: Any) -> Any:
    """`tree` (tensors in dicts, lists, tuples and NamedTuples) with every tensor detached."""
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a NamedTuple optimizer state
        return type(tree)(*(_detach(v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detach(v) for v in tree)
    return tree


def _number(value: Any, arg: str) -> float:
    """`value` as a finite float; ValueError naming `arg` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {arg}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {arg}: {value} (must be finite)")
    return float(value)


def _at_least(value: Any, arg: str, low: float = 0.0) -> float:
    x = _number(value, arg)
    if x < low:
        raise ValueError(f"Invalid {arg}: {value} (must be >= {low})")
    return x


def _within(value: Any, arg: str, low: float, high: float, closed: str) -> float:
    """`value` in the interval from `low` to `high`; `closed` names the ends included."""
    x = _number(value, arg)
    ok_low = x >= low if "low" in closed else x > low
    ok_high = x <= high if "high" in closed else x < high
    if not (ok_low and ok_high):
        left = "[" if "low" in closed else "("
        right = "]" if "high" in closed else ")"
        raise ValueError(f"Invalid {arg}: {value} (must be in {left}{low}, {high}{right})")
    return x


# --- stored (unconstrained) values ------------------------------------------------------------


class _Slot(NamedTuple):
    """A learnable hyperparameter: its optimizer attribute (= group key), index, storage."""

    key: str
    index: int | None  # type: ignore[assignment]
    constraint: str  # "none": stored as is; "unit": stored as a logit, value = sigmoid(stored)
    placeholder: float  # a valid value for building an optimizer that receives a tensor


def _to_stored(slot: _Slot, value: float) -> float:
    if slot.constraint == "unit":
        return math.log(value) - math.log1p(-value)
    return value


def _from_stored(slot: _Slot, stored: Tensor) -> Tensor:
    if slot.constraint == "unit":
        return torch.sigmoid(stored)
    return stored


# --- levels -----------------------------------------------------------------------------------


class Level:
    """One level of a stack: a `metagrad.optim` optimizer and its initial hyperparameters.

    Subclasses (`HyperSGD`, `HyperAdam`) name the optimizer, its hyperparameters and which of
    them can be learned. A level is a plain description: `Hyperoptimizer` copies its values into
    each param group and keeps the learned ones as tensors.

    Attributes:
        values: the hyperparameters by their `torch.optim` names (the form of a param group).
        learn: the names of the hyperparameters that the level above learns (ignored at the top
            of a stack, where nothing is above).
    """

    optimizer_cls: type[PureOptimizer] = PureOptimizer
    slots: dict[str, _Slot] = {}

    def __init__(self, values: dict[str, Any], learn: Iterable[str] | None) -> None:
        if learn is None:
            learn = self._default_learn(values)
        if isinstance(learn, str) or not isinstance(learn, Iterable):
            raise ValueError(
                f"Invalid learn: expected a list of names from {list(self.slots)}, got {learn!r}"
            )
        learn = tuple(learn)
        unknown = [n for n in learn if n not in self.slots]
        if unknown:
            raise ValueError(
                f"Invalid learn: {type(self).__name__} cannot learn {unknown} "
                f"(it can learn {list(self.slots)})"
            )
        if len(set(learn)) != len(learn):
            raise ValueError(f"Invalid learn: {list(learn)} names a hyperparameter twice")
        self.learn: tuple[str, ...] = learn
        self.values: dict[str, Any] = self.check(values, "", learn, initial=True)
        self._templates: dict[tuple[Any, ...], PureOptimizer] = {}
        self._state_type: type = type(self.build(self.values, {}).init({_KEY: torch.zeros(())}))

    def _default_learn(self, values: dict[str, Any]) -> tuple[str, ...]:
        return tuple(self.slots)

    def check(
        self, values: Mapping[str, Any], where: str, learn: Sequence[str], initial: bool = False
    ) -> dict[str, Any]:
        """Validate a full set of this level's values; ValueError naming the bad one.

        Args:
            values: the hyperparameters by name.
            where: a prefix for error messages (which level or group they belong to).
            learn: the names that are learned here.
            initial: whether these are starting values. A learned learning rate may move
                below 0 on its own (the additive rule), so later it only has to be finite.

        Returns:
            The values as a plain dict (numbers as floats, pairs as tuples).
        """
        raise NotImplementedError

    def _check_lr(self, value: Any, arg: str, learned: bool, initial: bool) -> float:
        return _number(value, arg) if learned and not initial else _at_least(value, arg)

    def get(self, values: Mapping[str, Any], name: str) -> Any:
        """The value of learnable hyperparameter `name` in a values dict."""
        slot = self.slots[name]
        value = values[slot.key]
        return value if slot.index is None else value[slot.index]

    def put(self, values: dict[str, Any], name: str, value: Any) -> None:
        """Write learnable hyperparameter `name` into a values dict (in place)."""
        slot = self.slots[name]
        if slot.index is None:
            values[slot.key] = value
        else:
            pair = list(values[slot.key])
            pair[slot.index] = value
            values[slot.key] = tuple(pair)

    def build(self, values: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> PureOptimizer:
        """The level's `metagrad.optim` optimizer with `values`, the learned ones as `tensors`.

        The numbers were validated when they entered the group (`check`). The optimizer is
        built once per set of numbers, with valid placeholders where `tensors` go; each step
        sets the tensors on a shallow copy, so a learned learning rate that has moved below 0
        is used as it is, and no tensor is inspected (no device sync).
        """
        args = dict(values)
        for name in tensors:
            self.put(args, name, self.slots[name].placeholder)
        key = tuple(args.items())
        template = self._templates.get(key)
        if template is None:
            template = self.optimizer_cls(**args)
            if len(self._templates) >= 64:
                self._templates.clear()
            self._templates[key] = template
        if not tensors:
            return template
        opt = copy.copy(template)
        for name, tensor in tensors.items():
            slot = self.slots[name]
            if slot.index is None:
                setattr(opt, slot.key, tensor)
            else:
                pair = list(getattr(opt, slot.key))
                pair[slot.index] = tensor
                setattr(opt, slot.key, tuple(pair))
        return opt

    def plain_state(self, state: Any) -> dict[str, Any]:
        """A pure optimizer state as a plain dict (what `state_dict` stores)."""
        return dict(state._asdict())

    def state_from_plain(self, plain: Mapping[str, Any]) -> Any:
        """The pure optimizer state from `plain_state`'s dict."""
        return self._state_type(**plain)

    def flat_state(self, state: Any) -> dict[str, Any]:
        """A one-parameter pure state as torch.optim-style per-parameter state."""
        flat: dict[str, Any] = {}
        for field, value in state._asdict().items():
            if not isinstance(value, dict):
                flat[field] = value
            elif _KEY in value:
                flat[field] = value[_KEY]
        return flat

    def pure_state(self, flat: Mapping[str, Any]) -> Any:
        """The one-parameter pure state from `flat_state`'s dict."""
        fields: dict[str, Any] = {}
        for field in self._state_type._fields:  # type: ignore[attr-defined]
            if field == "step":
                fields[field] = flat["step"]
            else:
                fields[field] = {_KEY: flat[field]} if field in flat else {}
        return self._state_type(**fields)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"{type(self).__name__}({args}, learn={list(self.learn)!r})"


class HyperSGD(Level):
    r"""A stack level that updates with SGD (`metagrad.optim.SGD`, as `torch.optim.SGD`).

    Args:
        lr: learning rate (>= 0); learned by the level above (stored as is).
        momentum: momentum factor (>= 0); learned (stored as a logit, so it stays in (0, 1))
            when `learn` includes it, which needs a starting value in (0, 1).
        dampening: dampening for momentum, in [0, 1]; fixed.
        weight_decay: L2 penalty (>= 0); fixed.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0); fixed.
        learn: the hyperparameters that the level above learns, from ("lr", "momentum");
            default: ("lr", "momentum") if 0 < momentum < 1, else ("lr",).
    """

    optimizer_cls = SGD
    slots = {
        "lr": _Slot("lr", None, "none", 0.0),
        "momentum": _Slot("momentum", None, "unit", 0.5),
    }

    def __init__(
        self,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        learn: Sequence[str] | None = None,
    ) -> None:
        values = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
        )
        super().__init__(values, learn)

    def _default_learn(self, values: dict[str, Any]) -> tuple[str, ...]:
        momentum = _number(values["momentum"], "momentum")
        return ("lr", "momentum") if 0 < momentum < 1 else ("lr",)

    def check(
        self, values: Mapping[str, Any], where: str, learn: Sequence[str], initial: bool = False
    ) -> dict[str, Any]:
        out = {"lr": self._check_lr(values["lr"], f"{where}lr", "lr" in learn, initial)}
        if "momentum" in learn:
            out["momentum"] = _within(
                values["momentum"], f"{where}momentum (learned, stored as a logit)", 0, 1, ""
            )
        else:
            out["momentum"] = _at_least(values["momentum"], f"{where}momentum")
        out["dampening"] = _within(values["dampening"], f"{where}dampening", 0, 1, "low high")
        out["weight_decay"] = _at_least(values["weight_decay"], f"{where}weight_decay")
        nesterov = values["nesterov"]
        if not isinstance(nesterov, bool):
            raise ValueError(f"Invalid {where}nesterov: expected a bool, got {nesterov!r}")
        if nesterov and (out["momentum"] <= 0 or out["dampening"] != 0):
            raise ValueError(f"Invalid {where}nesterov: needs momentum > 0 and dampening 0")
        out["nesterov"] = nesterov
        return out


class HyperAdam(Level):
    r"""A stack level that updates with Adam (`metagrad.optim.Adam`, as `torch.optim.Adam`).

    Args:
        lr: learning rate (>= 0); learned by the level above (stored as is).
        betas: (beta1, beta2), each in [0, 1); learned ones are stored as logits, so they must
            start in (0, 1) and stay there.
        eps: added to the denominator (>= 0); fixed.
        weight_decay: L2 penalty (>= 0); fixed.
        learn: the hyperparameters that the level above learns, from
            ("lr", "beta1", "beta2"); default: all three.
    """

    optimizer_cls = Adam
    slots = {
        "lr": _Slot("lr", None, "none", 0.0),
        "beta1": _Slot("betas", 0, "unit", 0.5),
        "beta2": _Slot("betas", 1, "unit", 0.5),
    }

    def __init__(
        self,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        learn: Sequence[str] | None = None,
    ) -> None:
        super().__init__(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), learn)

    def check(
        self, values: Mapping[str, Any], where: str, learn: Sequence[str], initial: bool = False
    ) -> dict[str, Any]:
        betas = values["betas"]
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise ValueError(f"Invalid {where}betas: expected a pair (beta1, beta2), got {betas!r}")
        pair = []
        for i, name in enumerate(("beta1", "beta2")):
            if name in learn:
                arg = f"{where}betas[{i}] (learned, stored as a logit)"
                pair.append(_within(betas[i], arg, 0, 1, ""))
            else:
                pair.append(_within(betas[i], f"{where}betas[{i}]", 0, 1, "low"))
        return {
            "lr": self._check_lr(values["lr"], f"{where}lr", "lr" in learn, initial),
            "betas": tuple(pair),
            "eps": _at_least(values["eps"], f"{where}eps"),
            "weight_decay": _at_least(values["weight_decay"], f"{where}weight_decay"),
        }


_KINDS: dict[str, type[Level]] = {"sgd": HyperSGD, "adam": HyperAdam}


def _as_level(spec: Any, index: int) -> Level:
    if isinstance(spec, Level):
        return spec
    if isinstance(spec, Mapping):
        args = dict(spec)
        kind = args.pop("optimizer", None)
        if kind not in _KINDS:
            raise ValueError(
                f"Invalid levels[{index}]: a mapping needs 'optimizer' in {sorted(_KINDS)}, "
                f"got {kind!r}"
            )
        try:
            return _KINDS[kind](**args)
        except TypeError as err:
            raise ValueError(f"Invalid levels[{index}]: {err}") from None
        except ValueError as err:
            raise ValueError(f"levels[{index}]: {err}") from None
    raise ValueError(
        f"Invalid levels[{index}]: expected a HyperSGD, a HyperAdam or a mapping with "
        f"'optimizer' ('sgd' or 'adam'), got {type(spec).__name__}"
    )


def _stored_dtype(device: torch.device) -> torch.dtype:
    """Learned hyperparameters are kept in float64 where the device has it (small updates to
    a learning rate of 1e-3 survive), else in float32; either mixes with any parameter dtype,
    as a 0-d tensor does not change the dtype of an operation."""
    return torch.float32 if device.type == "mps" else torch.float64


def _to(tree: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    def move(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        return x.to(device=device, dtype=dtype if x.is_floating_point() and dtype else x.dtype)

    return torch.utils._pytree.tree_map(move, tree)


class _Unit:
    """Parameters of a group that level 0 updates as one flat vector, in one call.

    A group's parameters with gradients form one unit when they share a dtype and device (one
    update and one graph for all of them, as torch.optim's `foreach` does); otherwise, and
    once the set of parameters with gradients changes, each parameter is a unit of its own,
    with its own state (torch.optim's per-parameter semantics: a parameter without a gradient
    is skipped and its state kept).
    """

    __slots__ = ("positions", "state")

    def __init__(self, positions: list[int], state: dict[str, Any] | None = None) -> None:
        self.positions = positions  # indices into the group's params
        self.state = state  # level 0's state of the flat vector (None before its first step)


class _Stack:
    """What one param group's stack carries from one step to the next."""

    def __init__(self) -> None:
        self.step = 0
        # Levels 0 .. n-2: the stored values used at the last step. They require grad and carry
        # the graph of the last step from the level above; the last step's updates of the
        # units (`outputs`) carry the graph from them.
        self.stored: list[dict[str, Tensor]] = []
        self.upper: list[Any] = []  # pure optimizer states of levels 1 .. n-1
        self.units: list[_Unit] = []
        self.outputs: list[tuple[_Unit, Tensor]] = []  # (unit, its last update with graph)
        # The inputs of the last step (stored values, hypergradients, states of the levels
        # above and of the units before it, previous params and gradients, all values used),
        # from which `load_state_dict` rebuilds its graph.
        self.previous: dict[str, Any] | None = None
        self.hypergrads: list[dict[str, Tensor | None] | None] | None = None
        self.seen: list[dict[str, Any]] = []  # the group's values as last written or read


def _flat(tensors: list[Tensor]) -> Tensor:
    """A new 1-D tensor holding `tensors` one after another."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1).clone()
    return torch.cat([t.reshape(-1) for t in tensors])


def _split_unit(unit: _Unit, params: list[Tensor]) -> list[_Unit]:
    """One unit per parameter, each with its slice of the unit's state."""
    if len(unit.positions) == 1:
        return [unit]
    sizes = [params[i].numel() for i in unit.positions]
    parts: list[dict[str, Any] | None] = [None] * len(sizes)
    if unit.state is not None:
        parts = [{} for _ in sizes]
        for key, value in unit.state.items():
            if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == sum(sizes):
                for part, piece in zip(parts, value.split(sizes), strict=True):
                    part[key] = piece.clone()  # type: ignore[index]
            else:
                for part in parts:
                    part[key] = value  # type: ignore[index]
    return [_Unit([i], part) for i, part in zip(unit.positions, parts, strict=True)]


class Hyperoptimizer(torch.optim.Optimizer):
    r"""A stack of optimizers that learn each other's hyperparameters online (Chandra et al.).

    `levels[0]` trains the parameters; `levels[k + 1]` trains the learned hyperparameters of
    `levels[k]` (its `learn`); the top level's values are fixed. Each step computes every
    level's exact one-step hypergradient with one vector-Jacobian product through the
    previous update, then updates the levels from the top down and the parameters last (see
    the module docstring for the math and for what is stored how). A stack of height 1 is its
    optimizer: `[HyperSGD(...)]` is `torch.optim.SGD`, `[HyperAdam(...)]` is
    `torch.optim.Adam`.

    **Param groups.** `param_groups[i]` holds level 0's values under the `torch.optim` names
    (`lr`, `momentum`, `betas`, ...; a group may override them, as with any optimizer) and
    the values of the levels above in `param_groups[i]["hyper"]` (a list, `hyper[k - 1]` for
    level k; a group may give some of them). Each group runs its own stack, with its own
    learned values and hypergradients from its own parameters only (one group per layer
    gives per-layer learned hyperparameters). After every step the learned values are
    written back as floats, so `param_groups[0]["lr"]` is the current learning rate. Writing a
    value (by hand or with an `lr_scheduler`) takes effect at the next step: a learned value
    continues from the written one.

    **Choosing the levels.** A level's hypergradient is a product of the hypergradients
    below it, so its size compounds with height: on the digits MLP early in training, about
    10 for Adam's learning rate, 100 one level up and 1e4 the level above that. An SGD level
    moves the values below it by its learning rate times that, so SGD levels above Adam need
    learning rates that shrink by about 100 per level, and tall ones still diverge; an Adam
    level moves each value below it by about its learning rate per step, whatever the size of
    the hypergradient, which keeps tall stacks of Adam levels stable
    (`experiments/hyperopt_stacks`).

    **Cost.** One step runs each level's `metagrad.optim` update with autograd recording (at
    level 0 once per group on all its parameters as one flat vector, as torch.optim's
    `foreach` does; on a few scalars above) and one backward pass through the previous
    update, not through the model. Memory: the base optimizer's state, plus the previous
    parameters, the previous gradient and one update's graph (a few parameter-sized tensors),
    flat in the number of steps; nothing more per extra level.

    **Checkpoints.** `state_dict()` holds plain tensors, numbers and containers (loadable with
    `torch.load(weights_only=True)`): the inputs of the last step, from which
    `load_state_dict` rebuilds its graph, so a resumed run continues exactly as an unbroken
    one. `copy.deepcopy` of the optimizer is not supported (the graph cannot be copied): use
    `state_dict`.

    Args:
        params: parameters or param groups, as for any `torch.optim.Optimizer`.
        levels: the stack from the bottom up: `HyperSGD` / `HyperAdam` objects, or mappings
            such as `{"optimizer": "sgd", "lr": 1e-5}` (for configuration files).

    Raises:
        ValueError: `levels` is empty or holds something else; a level below the top learns
            nothing (the level above it would have nothing to tune); a value is out of range
            or not finite; a parameter has a sparse gradient (at `step`).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        levels: Sequence[Level | Mapping[str, Any]],
    ) -> None:
        if isinstance(levels, (str, bytes, Mapping)) or not isinstance(levels, Sequence):
            raise ValueError(
                "Invalid levels: expected a list of levels (HyperSGD, HyperAdam or mappings), "
                f"got {type(levels).__name__}"
            )
        if len(levels) == 0:
            raise ValueError("Invalid levels: a stack needs at least one level")
        self.levels: tuple[Level, ...] = tuple(_as_level(s, i) for i, s in enumerate(levels))
        for k, level in enumerate(self.levels[:-1]):
            if not level.learn:
                raise ValueError(
                    f"Invalid levels[{k}]: it learns no hyperparameters (learn=[]), so "
                    f"levels[{k + 1}] above it has nothing to tune"
                )
        # What each level learns: the top one has nothing above it.
        self._learn: list[tuple[str, ...]] = [lvl.learn for lvl in self.levels[:-1]] + [()]
        self._stacks: list[_Stack] = []
        self._flats: dict[tuple[int, str], Tensor] = {}
        defaults = dict(self.levels[0].values)
        defaults["hyper"] = [dict(lvl.values) for lvl in self.levels[1:]]
        super().__init__(params, defaults)

    @property
    def height(self) -> int:
        """The number of levels."""
        return len(self.levels)

    # --- param groups -------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (values it does not give come from the levels); validates it."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        index = len(self.param_groups)
        for key, value in self.levels[0].values.items():
            param_group.setdefault(key, value)
        given = param_group.get("hyper", [{}] * (self.height - 1))
        if (
            isinstance(given, (str, bytes, Mapping))
            or not isinstance(given, Sequence)
            or len(given) != self.height - 1
            or not all(isinstance(h, Mapping) for h in given)
        ):
            raise ValueError(
                f"Invalid param group {index} hyper: expected a list of {self.height - 1} "
                f"mappings (the values of levels 1 .. {self.height - 1}), got {given!r}"
            )
        param_group["hyper"] = [
            dict(lvl.values) | dict(h) for lvl, h in zip(self.levels[1:], given, strict=True)
        ]
        self._read(param_group, index, validate=True, initial=True)
        super().add_param_group(param_group)

    def _read(
        self, group: dict[str, Any], index: int, validate: bool, initial: bool = False
    ) -> list[dict[str, Any]]:
        """The group's values, one dict per level (copies); validated if asked.

        `initial` checks them as starting values (a learned learning rate must then be
        >= 0; later it only has to be finite, as the additive rule may take it below 0).
        """
        hyper = group.get("hyper")
        if not isinstance(hyper, Sequence) or len(hyper) != self.height - 1:
            raise ValueError(
                f"Invalid param group {index} hyper: expected a list of {self.height - 1} "
                f"mappings, got {hyper!r}"
            )
        sources = [group, *hyper]
        values = []
        for k, (level, source) in enumerate(zip(self.levels, sources, strict=True)):
            if not isinstance(source, Mapping):
                raise ValueError(f"Invalid param group {index} hyper[{k - 1}]: not a mapping")
            missing = [key for key in level.values if key not in source]
            if missing:
                where = "" if k == 0 else f" hyper[{k - 1}]"
                raise ValueError(f"Invalid param group {index}{where}: missing {missing}")
            found = {key: source[key] for key in level.values}
            if validate:
                where = f"param group {index} " + ("" if k == 0 else f"hyper[{k - 1}] ")
                found = level.check(found, where, self._learn[k], initial)
            values.append(found)
        return values

    # --- the stack ----------------------------------------------------------------------------

    def _device(self, group: dict[str, Any]) -> torch.device:
        params = group["params"]
        return params[0].device if params else torch.device("cpu")

    def _stack(self, index: int) -> _Stack:
        while len(self._stacks) <= index:
            self._stacks.append(self._new_stack(len(self._stacks)))
        return self._stacks[index]

    def _new_stack(self, index: int) -> _Stack:
        group = self.param_groups[index]
        values = self._read(group, index, validate=True, initial=True)
        device = self._device(group)
        dtype = _stored_dtype(device)
        stack = _Stack()
        for k in range(self.height - 1):
            level = self.levels[k]
            stack.stored.append(
                {
                    name: torch.tensor(
                        _to_stored(level.slots[name], level.get(values[k], name)),
                        dtype=dtype,
                        device=device,
                    ).requires_grad_()
                    for name in self._learn[k]
                }
            )
            above = self.levels[k + 1]
            plain = {n: t.detach() for n, t in stack.stored[k].items()}
            stack.upper.append(above.build(above.values, {}).init(plain))
        stack.seen = values
        return stack

    def _constrained(self, k: int, stored: Mapping[str, Tensor]) -> dict[str, Tensor]:
        level = self.levels[k]
        return {name: _from_stored(level.slots[name], t) for name, t in stored.items()}

    def _advance(
        self,
        values: list[dict[str, Any]],
        stored_prev: list[dict[str, Tensor]],
        hypergrads: list[dict[str, Tensor | None] | None] | None,
        upper_prev: list[Any],
        base: list[tuple[Tensor, Tensor, dict[str, Any] | None]],
    ) -> tuple[list[dict[str, Tensor]], list[Any], list[Tensor], list[dict[str, Any]], list]:
        """One step of every level, from the top down, recording the graph.

        Args:
            values: every level's values (numbers) for this step.
            stored_prev: levels 0 .. n-2: the stored values before this step (detached).
            hypergrads: levels 0 .. n-2: the hypergradient of each stored value (None where
                there is none); None on a step without any.
            upper_prev: the pure states of levels 1 .. n-1 before this step.
            base: (flat params before the step, flat gradient, state or None) for each unit
                to update.

        Returns:
            The new stored values (requiring grad, with the graph from the level above), the
            new states of the levels above (detached), the units' updated flat params (with
            the graph from the stored values), their new states (detached) and the
            constrained values used by each level.
        """
        n = self.height
        stored: list[dict[str, Tensor]] = [{} for _ in range(n - 1)]
        upper = list(upper_prev)
        used: list[dict[str, Tensor]] = [{} for _ in range(n)]
        for k in reversed(range(n - 1)):
            above = k + 1
            used[above] = self._constrained(above, stored[above]) if above < n - 1 else {}
            hg = None if hypergrads is None else hypergrads[k]
            if hg is None or all(h is None for h in hg.values()):
                # No hypergradient yet: the values stay, and the level above takes no step.
                stored[k] = {
                    name: t.detach().requires_grad_() for name, t in stored_prev[k].items()
                }
                continue
            grads = {
                name: torch.zeros_like(t) if hg.get(name) is None else hg[name]
                for name, t in stored_prev[k].items()
            }
            opt = self.levels[above].build(values[above], used[above])
            new, state = opt.step(stored_prev[k], grads, upper_prev[k])  # type: ignore[arg-type]
            upper[k] = _detach(state)
            if above == n - 1:  # fixed values above: the new values start the graph
                new = {name: t.detach().requires_grad_() for name, t in new.items()}
            stored[k] = new
        level = self.levels[0]
        used[0] = self._constrained(0, stored[0]) if n > 1 else {}
        # In the parameters' dtype: one cast per value and step, rather than one in every
        # operation (and its backward) that mixes a float64 value with float32 tensors.
        dtype = base[0][0].dtype if base else None
        cast = {name: v if v.dtype == dtype else v.to(dtype) for name, v in used[0].items()}
        opt = level.build(values[0], cast)
        params, states = [], []
        for prev, grad, flat in base:
            state = opt.init({_KEY: prev}) if flat is None else level.pure_state(flat)
            out, state = opt.step({_KEY: prev}, {_KEY: grad}, state)
            params.append(out[_KEY])
            states.append(level.flat_state(_detach(state)))
        return stored, upper, params, states, used

    def _hypergradients(
        self, stacks: list[_Stack], values: list[list[dict[str, Any]]]
    ) -> list[list[dict[str, Tensor | None] | None] | None]:
        """Every group's hypergradients: one vector-Jacobian product through the last step.

        The cotangent of each parameter is its gradient now (plus level 0's L2 weight decay
        term): the derivative of the current loss with respect to the parameters that the
        last step produced.
        """
        outputs: list[Tensor] = []
        cotangents: list[Tensor] = []
        inputs: list[Tensor] = []
        spans: list[tuple[int, int, int]] = []
        for group, stack, vals in zip(self.param_groups, stacks, values, strict=True):
            wd = vals[0]["weight_decay"]
            params = group["params"]
            count = 0
            for unit, out in stack.outputs:
                members = [params[i] for i in unit.positions]
                if not out.requires_grad or all(p.grad is None for p in members):
                    continue
                if all(p.grad is not None for p in members):
                    cotangent = self._flat_of(unit, members, "grad")
                else:
                    cotangent = _flat(
                        [torch.zeros_like(p) if p.grad is None else p.grad for p in members]
                    )
                if wd != 0:
                    cotangent = cotangent.add(self._flat_of(unit, members, "param"), alpha=wd)
                outputs.append(out)
                cotangents.append(cotangent)
                count += 1
            start = len(inputs)
            if count:
                inputs.extend(t for level in stack.stored for t in level.values())
            spans.append((start, len(inputs), count))
            stack.outputs = []  # the graph is used once
        if not outputs:
            return [None] * len(stacks)
        grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
        result: list[list[dict[str, Tensor | None] | None] | None] = []
        for stack, (start, end, count) in zip(stacks, spans, strict=True):
            if count == 0:
                result.append(None)
                continue
            found = iter(grads[start:end])
            result.append([{name: next(found) for name in level} for level in stack.stored])
        return result

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Compute every level's hypergradient, update the levels top-down, then the params.

        Args:
            closure: reevaluates the model and returns the loss (optional).

        Returns:
            The loss returned by `closure`, if given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stacks, values = [], []
        for i, group in enumerate(self.param_groups):
            stack = self._stack(i)
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise ValueError("Hyperoptimizer does not support sparse gradients")
            current = self._read(group, i, validate=False)
            if current != stack.seen:  # a value was written since the last step
                current = self._read(group, i, validate=True)
            stacks.append(stack)
            values.append(current)
        self._flats = {}
        try:
            with torch.enable_grad():
                hypergrads = self._hypergradients(stacks, values)
                for i, group in enumerate(self.param_groups):
                    self._step_group(i, group, stacks[i], values[i], hypergrads[i])
        finally:
            self._flats = {}
        return loss

    def _flat_of(self, unit: _Unit, members: list[Tensor], what: str) -> Tensor:
        """The unit's parameters or gradients as one new 1-D tensor, made once per step (the
        hypergradient's cotangent and the update both use them)."""
        key = (id(unit), what)
        found = self._flats.get(key)
        if found is None:
            tensors = [p.detach() if what == "param" else p.grad.detach() for p in members]  # type: ignore[union-attr]
            found = self._flats[key] = _flat(tensors)
        return found

    def _arrange(self, stack: _Stack, params: list[Tensor], active: list[int]) -> list[_Unit]:
        """The units that step now (every member has a gradient); regroups where needed."""
        if not stack.units:
            first = [params[i] for i in active]
            same = all(p.dtype == first[0].dtype and p.device == first[0].device for p in first)
            stack.units = [_Unit(active)] if active and same else [_Unit([i]) for i in active]
            return list(stack.units)
        now = set(active)
        units: list[_Unit] = []
        for unit in stack.units:
            inside = sum(i in now for i in unit.positions)
            if 0 < inside < len(unit.positions):  # some members have no gradient: split
                units.extend(_split_unit(unit, params))
            else:
                units.append(unit)
        covered = {i for unit in units for i in unit.positions}
        units.extend(_Unit([i]) for i in active if i not in covered)
        stack.units = units
        return [u for u in units if all(i in now for i in u.positions)]

    def _step_group(
        self,
        index: int,
        group: dict[str, Any],
        stack: _Stack,
        values: list[dict[str, Any]],
        hypergrads: list[dict[str, Tensor | None] | None] | None,
    ) -> None:
        n = self.height
        params = group["params"]
        stored_prev = []
        for k in range(n - 1):
            level, old = self.levels[k], stack.seen[k]
            now = {}
            for name, t in stack.stored[k].items():
                value = level.get(values[k], name)
                if value != level.get(old, name):  # written since: continue from it
                    stored = _to_stored(level.slots[name], value)
                    now[name] = torch.tensor(stored, dtype=t.dtype, device=t.device)
                else:
                    now[name] = t.detach()
            stored_prev.append(now)
        units = self._arrange(
            stack, params, [i for i, p in enumerate(params) if p.grad is not None]
        )
        if not units:
            # Nothing to update; values stay, and the next step has no hypergradient.
            stack.stored = [{k: t.requires_grad_() for k, t in lv.items()} for lv in stored_prev]
            stack.previous = None
            stack.hypergrads = None
            used = [self._constrained(k, s) for k, s in enumerate(stack.stored)]
            self._mirror(index, group, stack, used)
            return
        base = []
        for unit in units:
            members = [params[i] for i in unit.positions]
            prev = self._flat_of(unit, members, "param")
            grad = self._flat_of(unit, members, "grad")
            base.append((prev, grad, unit.state))
        upper_prev = stack.upper
        stored, upper, new_params, new_states, used = self._advance(  # type: ignore[assignment]
            values, stored_prev, hypergrads, upper_prev, base
        )
        with torch.no_grad():
            targets: list[Tensor] = []
            pieces: list[Tensor] = []
            for unit, new in zip(units, new_params, strict=True):
                members = [params[i] for i in unit.positions]
                parts = [new] if len(members) == 1 else new.split([p.numel() for p in members])
                targets.extend(members)
                pieces.extend(part.view_as(p) for p, part in zip(members, parts, strict=True))
            torch._foreach_copy_(targets, pieces)
        for unit, state in zip(units, new_states, strict=True):
            unit.state = state
        stack.step += 1
        if n > 1:
            stack.outputs = list(zip(units, new_params, strict=True))
            stack.stored = stored  # type: ignore[assignment]
            stack.upper = upper
            stack.hypergrads = hypergrads
            stack.previous = {
                "stored": stored_prev,
                "hypergrads": hypergrads,
                "upper": upper_prev,
                "values": values,
                "base": [
                    (unit.positions, prev, grad, state)
                    for unit, (prev, grad, state) in zip(units, base, strict=True)
                ],
            }
        self._mirror(index, group, stack, used[: n - 1])

    def _mirror(
        self, index: int, group: dict[str, Any], stack: _Stack, used: list[dict[str, Tensor]]
    ) -> None:
        """Write the learned values into the group (one device sync) and remember them."""
        names = [(k, name) for k, level in enumerate(used) for name in level]
        if names:
            floats = torch.stack([used[k][name].detach() for k, name in names]).tolist()
            for (k, name), value in zip(names, floats, strict=True):
                target = group if k == 0 else group["hyper"][k - 1]
                self.levels[k].put(target, name, value)
        stack.seen = self._read(group, index, validate=False)

    # --- inspection and checkpoints -----------------------------------------------------------

    def hypergradients(self, group: int = 0) -> list[dict[str, float]]:
        """The hypergradients used at the last step, for levels 0 .. height - 2.

        Each is the derivative of the loss at that step with respect to the stored value (the
        learning rate itself; the logit of a momentum or beta) used at the step before;
        hyperparameters without one (the first steps) are left out.

        Args:
            group: the index of the param group.
        """
        if group >= len(self._stacks) or self._stacks[group].hypergrads is None:
            return [{} for _ in range(self.height - 1)]
        out = []
        for level in self._stacks[group].hypergrads:  # type: ignore[union-attr]
            found = {} if level is None else level
            out.append({name: float(h) for name, h in found.items() if h is not None})
        return out

    def _describe(self) -> list[dict[str, Any]]:
        return [{"kind": type(lvl).__name__, "learn": list(lvl.learn)} for lvl in self.levels]

    def state_dict(self) -> dict[str, Any]:
        """The torch.optim state dict, with the stacks' state under `"stack"`.

        Per group: the learned values, the states of the levels above and of level 0 (per
        unit of parameters), and the inputs of the last step (previous parameters, gradients,
        states, hypergradients and values), from which `load_state_dict` rebuilds its graph.
        Only tensors, numbers, strings, None and containers.
        """
        for i in range(len(self.param_groups)):
            self._stack(i)
        out = super().state_dict()
        groups = []
        for stack in self._stacks:
            previous = None
            if stack.previous is not None:
                prev = stack.previous
                previous = {
                    "stored": _detach(prev["stored"]),
                    "hypergrads": _detach(prev["hypergrads"]),
                    "upper": [
                        self.levels[k + 1].plain_state(s) for k, s in enumerate(prev["upper"])
                    ],
                    "values": copy.deepcopy(prev["values"]),
                    "base": [
                        {"positions": list(pos), "param": p, "grad": g, "state": s}
                        for pos, p, g, s in prev["base"]
                    ],
                }
            groups.append(
                {
                    "step": stack.step,
                    "stored": _detach(stack.stored),
                    "upper": [self.levels[k + 1].plain_state(s) for k, s in enumerate(stack.upper)],
                    "units": [
                        {"positions": list(u.positions), "state": u.state} for u in stack.units
                    ],
                    "seen": copy.deepcopy(stack.seen),
                    "previous": previous,
                }
            )
        out["stack"] = {"levels": self._describe(), "groups": groups}
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from `state_dict`, rebuilding the last step's graph.

        Raises:
            ValueError: the state dict is not a `Hyperoptimizer`'s, or its levels differ.
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop("stack", None)
        if not isinstance(saved, Mapping) or "groups" not in saved:
            raise ValueError(
                "Invalid state_dict: it has no 'stack' entry (not a Hyperoptimizer state dict)"
            )
        if saved.get("levels") != self._describe():
            raise ValueError(
                f"Invalid state_dict: saved for levels {saved.get('levels')}, but this "
                f"optimizer has {self._describe()}"
            )
        if len(saved["groups"]) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        super().load_state_dict(state_dict)
        self._stacks = []
        for group, entry in zip(self.param_groups, saved["groups"], strict=True):
            self._stacks.append(self._restore(group, entry))

    def _restore(self, group: dict[str, Any], saved: Mapping[str, Any]) -> _Stack:
        params = group["params"]
        device = self._device(group)
        dtype = _stored_dtype(device)

        def unit_tensors(tree: Any, positions: list[int]) -> Any:
            first = params[positions[0]]
            return _to(tree, first.device, first.dtype)

        stack = _Stack()
        stack.step = int(saved["step"])
        stack.seen = copy.deepcopy(list(saved["seen"]))
        stack.units = [
            _Unit(list(u["positions"]), unit_tensors(u["state"], u["positions"]))
            for u in saved["units"]
        ]
        above = self.levels[1:]
        prev = saved["previous"]
        if prev is None:
            stack.stored = [
                {n: t.detach().to(device, dtype).requires_grad_() for n, t in level.items()}
                for level in saved["stored"]
            ]
            stack.upper = [
                lvl.state_from_plain(_to(s, device, dtype))
                for lvl, s in zip(above, saved["upper"], strict=True)
            ]
            return stack
        stored_prev = [_to(level, device, dtype) for level in prev["stored"]]
        hypergrads = _to(prev["hypergrads"], device, dtype)
        upper_prev = [
            lvl.state_from_plain(_to(s, device, dtype))
            for lvl, s in zip(above, prev["upper"], strict=True)
        ]
        values = copy.deepcopy(list(prev["values"]))
        base = [
            (
                list(b["positions"]),
                unit_tensors(b["param"], b["positions"]),
                unit_tensors(b["grad"], b["positions"]),
                unit_tensors(b["state"], b["positions"]),
            )
            for b in prev["base"]
        ]
        with torch.enable_grad():
            stored, upper, new_params, new_states, _ = self._advance(
                values, stored_prev, hypergrads, upper_prev, [b[1:] for b in base]
            )
        by_positions = {tuple(u.positions): u for u in stack.units}
        stack.outputs = []
        for (positions, *_), new, state in zip(base, new_params, new_states, strict=True):
            unit = by_positions[tuple(positions)]
            unit.state = state
            stack.outputs.append((unit, new))
        stack.stored, stack.upper = stored, upper
        stack.hypergrads = hypergrads
        stack.previous = {
            "stored": stored_prev,
            "hypergrads": hypergrads,
            "upper": upper_prev,
            "values": values,
            "base": base,
        }
        return stack
