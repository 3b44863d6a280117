"""The kinds of run `loop=` selects: each module provides `build(cfg, runtime) -> Job`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import fewshot, hpo, online, truncated
from .base import Job, MetaJob, StepOutcome

__all__ = ["JOBS", "GROUPS_USED", "Job", "MetaJob", "StepOutcome"]

#: loop name -> builder.
JOBS: dict[str, Callable[..., Any]] = {
    "hpo": hpo.build,
    "truncated": truncated.build,
    "fewshot": fewshot.build,
    "online": online.build,
}

#: The config groups each loop reads; the others are dropped from its recorded config.
GROUPS_USED: dict[str, tuple[str, ...]] = {
    "hpo": ("task", "model", "inner_optim", "learn", "hypergrad", "outer_optim", "logger"),
    "truncated": ("task", "model", "inner_optim", "learn", "truncated", "outer_optim", "logger"),
    "fewshot": ("task", "model", "inner_optim", "learner", "outer_optim", "logger"),
    "online": ("task", "model", "online_optim", "logger"),
}
