"""Online truncated training: one long inner run cut into truncations, meta-updates between.

`TruncatedSession` holds the inner run (params, optimizer state and, for `PES`, the
particles' states and accumulated noise) across calls. Each `session.step(meta)` advances the
run by one truncation of K inner steps and returns the meta-gradient estimate of that
truncation, so the outer optimizer can update the meta-parameters after every truncation:

>>> session = TruncatedSession(problem, PES(particles=8, sigma=0.1), truncation=10)
>>> for _ in range(outer_steps):
...     outer.zero_grad()
...     result = session.step(meta)    # the next K inner steps; a new run after T
...     result.apply(meta)
...     outer.step()

The estimators of this mode (`TBPTT`, `TruncatedES`, `PES`) derive from `TruncatedEstimator`;
they are frozen dataclasses of options, and everything that changes lives in the session.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import ArgumentError, check_choice, check_count
from ..meta_params import MetaParameters
from ..problem import InnerProblem
from .base import Estimate, HypergradResult, package

__all__ = ["TruncatedEstimator", "TruncatedResult", "TruncatedSession", "Truncation"]

_FORMAT = 1


@dataclass
class TruncatedResult(HypergradResult):
    """A `HypergradResult` for one truncation, with the estimator's per-pair samples.

    Attributes:
        samples: for `TruncatedES` and `PES`, the estimate of each antithetic pair, keyed like
            `grads`, shape [pairs, *shape] (`grads` is their mean; their spread gives the
            standard error); None for `TBPTT`.
    """

    samples: dict[str, Tensor] | None = None


@dataclass
class Truncation:
    """One truncation as the session hands it to an estimator.

    Attributes:
        steps: the inner steps it covers (indices into the horizon, 0..T-1).
        generator: the session's random generator (perturbations are drawn from it).
        context: the session's mutable settings (e.g. a vmap fallback).
    """

    steps: range
    generator: torch.Generator
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TruncatedEstimator:
    """Base of the estimators of online truncated training (used through `TruncatedSession`).

    Subclasses are frozen dataclasses whose fields are their options and implement
    `truncation`. The carry is whatever the estimator keeps between truncations (params,
    optimizer state, particles, accumulated noise): a pytree of tensors, numbers, dicts,
    lists, tuples and NamedTuples, which the session saves in its `state_dict`.
    """

    def truncation(
        self, problem: InnerProblem, meta: MetaParameters, carry: Any, span: Truncation
    ) -> tuple[Estimate, Any, dict[str, Tensor] | None]:
        """Run the truncation `span.steps` from `carry` (None at the start of the inner run).

        Returns:
            the estimate (gradients, outer loss, the run that the result reports, metrics),
            the carry for the next truncation, and the per-pair samples (or None).
        """
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options that determine the numbers, as plain values (checked by state dicts).

        `vectorize` is left out: the vmapped and looped particles give the same numbers, so
        a session saved with one may continue with the other.
        """
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "vectorize"
        }


class TruncatedSession:
    """One long inner run of T steps, advanced K steps (one truncation) per `step(meta)`.

    T is `problem.steps`; inner step t reads `problem.batch(t)` and `problem.optimizer(meta,
    t)` with t counted from the start of the run, so per-step schedules (`meta.add(...,
    steps=T)`) index the whole run. With the fixed schedule the run has ceil(T / K)
    truncations: [0, K), [K, 2K), ..., the last one shorter when K does not divide T; with
    K >= T the whole run is one truncation (for `TBPTT`, `Unrolled`; for `PES`, ES over the
    full horizon). The random schedule draws each truncation's length uniformly
    from 1..2K - 1 (mean K; cut at T), which keeps the truncation boundaries from lining up
    with any period of the inner problem. After the truncation that reaches T, `done` is
    True; the next `step` starts a new inner run from `problem.init` with the meta-parameters
    of that moment (or raises, with `auto_reset=False`, until `reset()` is called).

    The objective whose gradient the estimators target is the sum over the truncations of one
    inner run of the outer loss at the end of each truncation,
    `F(meta) = sum_j outer_loss(params after truncation j)`, with the meta-parameters held
    for the whole run; its last term is the outer loss after T steps. Each `step` estimates
    the gradient of the current truncation's term (see each estimator for its bias).

    Args:
        problem: the inner problem; `problem.steps` is the horizon T.
        estimator: a `TruncatedEstimator`: `TBPTT()`, `TruncatedES(...)` or `PES(...)`.
        truncation: K, the number of inner steps per truncation (>= 1; the mean length with
            the random schedule).
        schedule: "fixed" or "random" truncation lengths.
        seed: seed of the session's random generator (perturbations, random lengths).
        auto_reset: start a new inner run when `step` is called after the run is done.
    """

    def __init__(
        self,
        problem: InnerProblem,
        estimator: TruncatedEstimator,
        truncation: int,
        *,
        schedule: str = "fixed",
        seed: int = 0,
        auto_reset: bool = True,
    ) -> None:
        if not isinstance(problem, InnerProblem):
            raise ValueError(f"problem must be an InnerProblem, got {type(problem).__name__}")
        if not isinstance(estimator, TruncatedEstimator):
            raise ValueError(
                "estimator must be a truncated estimator (TBPTT, TruncatedES or PES), got "
                f"{type(estimator).__name__}; estimators of whole inner runs such as Truncated "
                "are called as method(problem, meta)"
            )
        self.problem = problem
        self.estimator = estimator
        self.truncation = check_count(truncation, "truncation")
        self.schedule = check_choice(schedule, "schedule", ("fixed", "random"))
        self.seed = check_count(seed, "seed", minimum=0)
        if not isinstance(auto_reset, bool):
            raise ArgumentError("auto_reset", f"Invalid auto_reset: {auto_reset!r} (a bool)")
        self.auto_reset = auto_reset
        self._generator = torch.Generator().manual_seed(seed)
        self._context: dict[str, Any] = {}
        self._position = 0  # inner steps taken in the current run
        self._run = 0  # index of the current inner run
        self._index = 0  # truncations taken in the current run
        self._total = 0  # truncations taken in all runs
        self._carry: Any = None
        self._pending: Any = None  # a loaded carry, decoded at the next step

    # ------------------------------------------------------------------ position
    @property
    def horizon(self) -> int:
        """T, the length of one inner run."""
        return self.problem.steps

    @property
    def position(self) -> int:
        """Inner steps taken in the current run (0..T)."""
        return self._position

    @property
    def run(self) -> int:
        """Index of the current inner run (0 for the first)."""
        return self._run

    @property
    def done(self) -> bool:
        """Whether the current inner run has reached T steps."""
        return self._position >= self.problem.steps

    def reset(self) -> None:
        """Start a new inner run at the next `step` (from `problem.init`, noise cleared)."""
        if self._position > 0:
            self._run += 1
        self._position = 0
        self._index = 0
        self._carry = None
        self._pending = None

    # ------------------------------------------------------------------ the step
    def step(self, meta: MetaParameters) -> TruncatedResult:
        """Advance the inner run by one truncation and estimate its meta-gradient.

        Returns:
            The gradient estimate keyed like `dict(meta.named_parameters())`, the outer loss
            at the end of the truncation (of the unperturbed run), its params, per-pair
            samples (ES, PES) and metrics: the standard ones (`outer/loss`, `inner/loss`,
            `hypergrad/norm`, `hypergrad/seconds`), `truncation/run`, `truncation/index`,
            `truncation/start`, `truncation/length`, `truncation/end_of_run` (1.0 when this
            truncation reached T) and the estimator's own.

        Raises:
            RuntimeError: the run is done and `auto_reset` is False.
            NonFiniteLossError: an inner loss became NaN or infinite. The session is left as
                it was before the call: reset it, or lower the learning rate or sigma.
        """
        started = time.perf_counter()
        if self.done:
            if not self.auto_reset:
                raise RuntimeError(
                    f"the inner run is done ({self.problem.steps} steps); call reset() to "
                    "start a new one, or create the session with auto_reset=True"
                )
            self.reset()
        if self._pending is not None:
            self._carry = _decode(self._pending, _template_types(self.problem, meta))
            self._pending = None
        saved = self._generator.get_state()
        try:
            steps = self._next_steps()
            span = Truncation(steps, self._generator, self._context)
            estimate, carry, samples = self.estimator.truncation(
                self.problem, meta, self._carry, span
            )
        except BaseException:
            self._generator.set_state(saved)  # the session is unchanged
            raise
        metrics = {
            "truncation/run": float(self._run),
            "truncation/index": float(self._index),
            "truncation/start": float(steps.start),
            "truncation/length": float(len(steps)),
            "truncation/end_of_run": float(steps.stop >= self.problem.steps),
        }
        self._carry = carry
        self._position = steps.stop
        self._index += 1
        self._total += 1
        return _package(estimate, samples, meta, started, metrics)

    def _next_steps(self) -> range:
        begin, horizon = self._position, self.problem.steps
        length = self.truncation
        if self.schedule == "random":
            length = int(torch.randint(1, 2 * self.truncation, (1,), generator=self._generator))
        return range(begin, min(begin + length, horizon))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The session's state as plain tensors, numbers and strings (`torch.save` it).

        Holds the position in the inner run, the counters, the random generator's state and
        the estimator's carry (params, optimizer state, particles, accumulated noise). The
        meta-parameters and the outer optimizer are the caller's to save.
        """
        carry = self._pending if self._pending is not None else _encode(self._carry)
        return {
            "format": _FORMAT,
            "estimator": type(self.estimator).__name__,
            "options": _encode(self.estimator.options()),
            "truncation": self.truncation,
            "schedule": self.schedule,
            "horizon": self.problem.steps,
            "position": self._position,
            "run": self._run,
            "index": self._index,
            "total": self._total,
            "generator": self._generator.get_state(),
            "loop": bool(self._context.get("loop", False)),
            "carry": carry,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`: the next `step` gives what the saved session's would.

        Raises:
            ValueError: the state was saved by a session with another estimator, options,
                truncation, schedule or horizon (the key is named).
        """
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("not a TruncatedSession state_dict (format 1)")
        expected = {
            "estimator": type(self.estimator).__name__,
            "options": _encode(self.estimator.options()),
            "truncation": self.truncation,
            "schedule": self.schedule,
            "horizon": self.problem.steps,
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"state_dict['{key}'] is {state.get(key)!r} but this session has {value!r}"
                )
        self._position = int(state["position"])
        self._run = int(state["run"])
        self._index = int(state["index"])
        self._total = int(state["total"])
        self._generator.set_state(state["generator"])
        self._context = {"loop": True} if state.get("loop") else {}
        self._carry = None
        self._pending = state["carry"]

    def __repr__(self) -> str:
        return (
            f"TruncatedSession({self.estimator!r}, truncation={self.truncation}, "
            f"schedule={self.schedule!r}, horizon={self.problem.steps}, "
            f"position={self._position}, run={self._run})"
        )


def _package(
    estimate: Estimate,
    samples: dict[str, Tensor] | None,
    meta: MetaParameters,
    started: float,
    extra: dict[str, float],
) -> TruncatedResult:
    """The result of one truncation, with the standard metrics (as `Estimator` gives them)."""
    detached = None if samples is None else {n: s.detach() for n, s in samples.items()}
    result: TruncatedResult = package(
        estimate, meta, started, extra, result_type=TruncatedResult, samples=detached
    )
    return result


# ---------------------------------------------------------------------- carry (de)serialization
def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _encode(x: Any) -> Any:
    """A pytree as nested plain dicts, lists, strings, numbers and tensors."""
    if isinstance(x, Tensor):
        return x.detach()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if _is_namedtuple(x):
        return {"kind": "namedtuple", "type": _type_name(type(x)), "items": [_encode(v) for v in x]}
    if isinstance(x, (tuple, list)):
        kind = "tuple" if isinstance(x, tuple) else "list"
        return {"kind": kind, "items": [_encode(v) for v in x]}
    if isinstance(x, dict):
        return {"kind": "dict", "keys": list(x), "items": [_encode(v) for v in x.values()]}
    raise ValueError(f"cannot save a {type(x).__name__} in a TruncatedSession state_dict")


def _decode(x: Any, types: dict[str, type]) -> Any:
    """Inverse of `_encode`; NamedTuple classes are looked up in `types` by qualified name."""
    if not isinstance(x, dict):
        return x
    items = [_decode(v, types) for v in x["items"]]
    kind = x["kind"]
    if kind == "dict":
        return dict(zip(x["keys"], items, strict=True))
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    if x["type"] not in types:
        raise ValueError(
            f"the saved session state holds a {x['type']}, which this problem's optimizer "
            "state does not use"
        )
    return types[x["type"]](*items)


def _template_types(problem: InnerProblem, meta: MetaParameters) -> dict[str, type]:
    """The NamedTuple classes of this problem's optimizer state, by qualified name."""
    found: dict[str, type] = {}

    def walk(x: Any) -> None:
        if _is_namedtuple(x):
            found[_type_name(type(x))] = type(x)
        if isinstance(x, (tuple, list)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    with torch.no_grad():
        params = {n: p.detach() for n, p in problem.initial_params(meta).items()}
        walk(problem.optimizer(meta, 0).init(params))
    return found
