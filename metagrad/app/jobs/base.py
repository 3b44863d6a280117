"""What the loop calls on a job, and the outer step shared by the jobs that learn by gradient.

A job is one kind of run (`loop=hpo`, `fewshot`, `online`). The loop (`app/loop.py`) calls only
the methods of `Job`; `MetaJob` implements the outer step every meta-learning job shares (zero
the gradients, compute them, check they are finite, step the outer optimizer), its checkpoint
state and the logging of `MetaParameters`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ...hypergrad import NonFiniteLossError
from ...meta_params import MetaParameters

__all__ = ["Job", "MetaJob", "StepOutcome"]


@dataclass
class StepOutcome:
    """What one outer step reports.

    Attributes:
        metrics: scalars to log (`outer/loss`, `inner/loss`, `hypergrad/norm`, ...).
        finite: False when the meta-gradient or loss was NaN/Inf and the update was skipped.
        reason: why the step was skipped.
        notes: warnings worth a line in the log and the dashboard (each reported once a run).
    """

    metrics: dict[str, float]
    finite: bool = True
    reason: str = ""
    notes: list[str] = field(default_factory=list)


class Job(Protocol):
    """One kind of outer loop; everything the loop calls."""

    def step(self, index: int) -> StepOutcome:
        """Run outer step `index` (0-based) and update the meta-parameters if finite."""
        ...

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Validation metrics (and test metrics when `final`), tags as keys."""
        ...

    def meta_scalars(self) -> dict[str, float]:
        """Current values of learnable hyperparameters, `meta/`-prefixed tags as keys."""
        ...

    def meta_tensors(self) -> dict[str, Tensor]:
        """Per-element meta-parameters, for histograms."""
        ...

    def meta_schedules(self) -> dict[str, Tensor]:
        """Learned per-step schedules, for charts."""
        ...

    def layout(self) -> dict[str, list[str]]:
        """Charts that group several tags (regular expressions)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors and plain data only)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict()`."""
        ...


def grad_norm(params: Sequence[Tensor]) -> float:
    """The norm of the gradients in `.grad` (inf or nan if any is)."""
    grads = [p.grad for p in params if p.grad is not None]
    return math.sqrt(sum(float(g.detach().pow(2).sum()) for g in grads))


class MetaJob:
    """The outer step of a job that learns `module`'s parameters with `outer_optimizer`.

    Subclasses implement `compute(index)`, which puts the meta-gradients into `.grad` and
    returns the step's metrics; this class runs the skeleton around it and logs `meta` (the
    `MetaParameters` whose values are worth charting).

    Args:
        module: every learned tensor (checkpointed with `state_dict`).
        meta: the meta-parameters to log (may be part of `module`, or `module` itself).
        outer_optimizer: a torch.optim optimizer over `module.parameters()`.
    """

    def __init__(
        self, module: nn.Module, meta: MetaParameters, outer_optimizer: torch.optim.Optimizer
    ) -> None:
        self.module = module
        self.meta = meta
        self.outer_optimizer = outer_optimizer
        self._warned: set[type] = set()

    def compute(self, index: int) -> dict[str, float]:
        """Fill `.grad` of the meta-parameters for outer step `index`; return its metrics."""
        raise NotImplementedError

    def step(self, index: int) -> StepOutcome:
        self.outer_optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            try:
                metrics = self.compute(index)
            except NonFiniteLossError as e:
                return StepOutcome({}, finite=False, reason=str(e))
        notes = self._notes(caught)
        loss = metrics.get("outer/loss", 0.0)
        if not math.isfinite(loss):
            return StepOutcome(metrics, finite=False, reason=f"outer loss is {loss}")
        params = list(self.module.parameters())
        norm = grad_norm(params)
        metrics.setdefault("hypergrad/norm", norm)
        if not math.isfinite(norm):
            named = dict(self.module.named_parameters())
            bad = [
                n
                for n, p in named.items()
                if p.grad is not None and not bool(torch.isfinite(p.grad).all())
            ]
            return StepOutcome(
                metrics, finite=False, reason=f"non-finite meta-gradient of {bad}", notes=notes
            )
        self.outer_optimizer.step()
        return StepOutcome(metrics, notes=notes)

    def _notes(self, caught: list[warnings.WarningMessage]) -> list[str]:
        """The warnings of one step not reported before in this run (one per kind)."""
        seen = self._warned
        out = []
        for w in caught:
            if w.category not in seen:
                seen.add(w.category)
                out.append(f"{w.category.__name__}: {w.message}")
        return out

    # ------------------------------------------------------------------ logging
    def meta_scalars(self) -> dict[str, float]:
        return {f"meta/{k}": v for k, v in self.meta.scalars().items()}

    def meta_tensors(self) -> dict[str, Tensor]:
        return {f"meta/{k}": v for k, v in self.meta.histograms().items()}

    def meta_schedules(self) -> dict[str, Tensor]:
        return {f"schedule/{k}": v for k, v in self.meta.schedules().items()}

    def layout(self) -> dict[str, list[str]]:
        groups = {"losses": ["outer/loss", "inner/loss", "val/loss"]}
        for name in self.meta.entry_names():
            if self.meta.scope(name) == "per_layer":
                groups[f"{name} per layer"] = [f"meta/{name}/.*"]
        return groups

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
