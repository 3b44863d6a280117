"""`loop=truncated`: online truncated training of hyperparameters (TBPTT, ES, PES).

One long inner run of `horizon` steps is cut into truncations of `truncation` steps; each outer
step runs one truncation (`metagrad.hypergrad.TruncatedSession`) and updates the
meta-parameters, the inner state carried over. When a run ends, the next one starts from a
fresh initialization and fresh batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from ...hypergrad import NonFiniteLossError
from ...hypergrad.session import TruncatedSession
from ..errors import ConfigError, at
from ..runtime import Runtime, make
from .hpo import HPOJob, build_parts

__all__ = ["TruncatedJob", "build"]


class TruncatedJob(HPOJob):
    """Hyperparameters learned online, one truncation of a long inner run per outer step.

    Args:
        session_options: `TruncatedSession` options (`truncation`, `schedule`).
        estimator: a `TruncatedEstimator` (`TBPTT`, `TruncatedES`, `PES`).
        Other arguments: those of `HPOJob` (without `method`).
    """

    def __init__(self, *, estimator: Any, session_options: Mapping[str, Any], **parts: Any) -> None:
        super().__init__(method=None, **parts)
        self.session = TruncatedSession(
            self.problem(0), estimator, seed=self.rt.seed, **session_options
        )

    def compute(self, index: int) -> dict[str, float]:
        if self.session.done:
            self.session.reset()
        if self.session.position == 0:
            # A new inner run: its own initialization and batches.
            self.session.problem = self.problem(self.session.run)
        try:
            result = self.session.step(self.meta)
        except NonFiniteLossError:
            self.session.reset()  # the step is skipped; the next one starts a new run
            raise
        result.apply(self.meta)
        return dict(result.metrics)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "session": self.session.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.session.problem = self.problem(int(state["session"]["run"]))
        self.session.load_state_dict(state["session"])


def build(cfg: DictConfig, rt: Runtime) -> TruncatedJob:
    """The parts of `loop=hpo`, with a truncated estimator and its session options."""
    parts = build_parts(cfg, rt, loop="truncated")
    if cfg.get("truncated") is None:
        raise ConfigError("truncated: loop=truncated needs an estimator (e.g. truncated=pes)")
    estimator = make("truncated", cfg.truncated)
    with at("truncation"):
        return TruncatedJob(
            estimator=estimator,
            session_options={
                "truncation": int(cfg.truncation),
                "schedule": cfg.truncation_schedule,
            },
            **parts,
        )
