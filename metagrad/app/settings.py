"""The application's own settings: the top level of `configs/train.yaml`, typed and checked.

These are the only settings the application defines itself (how long a run is, how it
reports, where it runs); every library object in a config is described by its own signature
(see `configs.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from .._checks import ArgumentError, check_choice, check_count, check_number

__all__ = ["TrainSettings", "LearnEntry", "LOOPS", "check_settings"]

#: The kinds of run `loop=` selects.
LOOPS = ("hpo", "online", "fewshot")


@dataclass
class LearnEntry:
    """One hyperparameter learned by `loop=hpo` (an entry of the `learn` group)."""

    init: float | None = None  # None: the inner optimizer's configured value
    constraint: str = "positive"  # positive | unit | none
    scope: str = "scalar"  # scalar | per_layer | per_element
    per_step: bool = False  # one value per inner step (a schedule over the horizon)


@dataclass
class TrainSettings:
    """The top level of the training config (`python -m metagrad.train --cfg job` shows it)."""

    # Groups (see `configs.py`); a loop uses some of them and ignores the others.
    task: Any = MISSING
    model: Any = MISSING
    inner_optim: Any = None
    learn: dict[str, LearnEntry] | None = None
    hypergrad: Any = None
    learner: Any = None
    online_optim: Any = None
    outer_optim: Any = None
    logger: Any = MISSING

    loop: str = "hpo"  # hpo | online | fewshot
    seed: int = 0
    outer_steps: int = 100
    val_every: int = 10
    checkpoint_every: int = 20
    resume: bool = False
    max_nonfinite: int = 5
    progress: bool | None = None  # None: only when stderr is a terminal
    threads: int | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | float64
    loss: Any = None  # None: the task's own; cross_entropy | mse | {_target_: ...}
    metric: Any = None  # None: the task's own; accuracy | none | {_target_: ...}
    memory_guard: bool = True  # refuse a run whose estimated peak memory does not fit
    trusted_targets: list[str] = field(default_factory=list)  # modules a resumed run may run

    # loop=hpo
    horizon: int = 100  # inner steps of each inner training run
    eval_horizon: int | None = None  # inner steps of evaluation runs; None: horizon

    # loop=fewshot
    meta_batch: int = 25  # tasks per outer step
    eval_tasks: int = 600  # test tasks of the final evaluation (validation uses a sixth)
    eval_inner_steps: list[int] | None = None  # None: [0, learner.inner_steps]
    learned_lr_outer_lr: float | None = None  # outer lr of learned inner lrs; None: same


def check_settings(cfg: Any) -> None:
    """Range checks of the top-level settings.

    Raises:
        ArgumentError: naming the setting.
    """
    check_choice(cfg.loop, "loop", LOOPS)
    check_count(cfg.outer_steps, "outer_steps", 0)
    for key in ("val_every", "checkpoint_every", "max_nonfinite", "horizon", "meta_batch"):
        check_count(cfg[key], key)
    check_count(cfg.eval_tasks, "eval_tasks")
    check_count(cfg.threads, "threads", allow_none=True)
    check_count(cfg.eval_horizon, "eval_horizon", allow_none=True)
    check_number(
        cfg.learned_lr_outer_lr, "learned_lr_outer_lr", 0.0, low_open=True, allow_none=True
    )
    check_choice(cfg.dtype, "dtype", ("float32", "float64"))
    if cfg.eval_inner_steps is not None:
        for s in cfg.eval_inner_steps:
            check_count(s, "eval_inner_steps", 0)
    device = cfg.device
    if not isinstance(device, str) or not (
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise ArgumentError("device", f"Invalid device: {device!r} (auto, cpu, cuda or cuda:N)")
