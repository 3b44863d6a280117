"""The application's own settings: the top level of `configs/train.yaml`, typed and checked.

These are the only settings the application defines itself (how long a run is, how it
reports, where it runs); every library object in a config is described by its own signature
(see `configs.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING

from .._checks import ArgumentError, check_choice, check_count, check_number

__all__ = [
    "TrainSettings",
    "LearnEntry",
    "WeightingEntry",
    "LOOPS",
    "check_settings",
    "learn_entry",
    "weighting_entry",
]

#: The kinds of run `loop=` selects.
LOOPS = ("hpo", "truncated", "fewshot", "online")


@dataclass
class LearnEntry:
    """One hyperparameter of `loop=hpo` (an entry of the `learn` group): learned, or fixed.

    `init` is one number broadcast over the entry, or a list with one value per layer
    (`per_layer`: parameter tensors in the model's order), per inner step (`per_step`), per
    element (`per_element`: each parameter flattened, in the model's order), or per step and
    then layer/element when both apply, flattened. A `fixed` entry is not learned: its values
    stay as given, which lets a black-box search (`-m hydra/sweeper=optuna`) set per-layer,
    per-step or per-element values through `learn.<name>.init.<i>=...` overrides. A `learn`
    group of fixed entries only trains once and reports, like `learn=none`.
    """

    init: Any = None  # a number or a list; None: the inner optimizer's configured value
    constraint: str = "positive"  # positive | unit | none
    scope: str = "scalar"  # scalar | per_layer | per_element
    per_step: bool = False  # one value per inner step (a schedule over the horizon)
    fixed: bool = False  # True: the values stay as given (not learned)


@dataclass
class WeightingEntry:
    """A learned weighting of the training examples (`learn.example_weights`, `learn.weight_net`).

    The inner loss becomes `metagrad.weighting.weighted_loss` of the per-example losses.
    """

    init: float = 1.0  # example_weights: every example's initial weight
    constraint: str = "positive"  # example_weights: positive (stored as logs) | unit | none
    hidden: int = 100  # weight_net: hidden units of the Meta-Weight-Net
    normalize: str = "weights"  # weights (a weighted mean) | count (the batch size) | none


#: The keys of `WeightingEntry` each weighting takes.
_WEIGHTING_KEYS = {
    "example_weights": ("init", "constraint", "normalize"),
    "weight_net": ("hidden", "normalize"),
}


@dataclass
class TrainSettings:
    """The top level of the training config (`python -m metagrad.train --cfg job` shows it)."""

    # Groups (see `configs.py`); a loop uses some of them and ignores the others.
    task: Any = MISSING
    model: Any = MISSING
    inner_optim: Any = None
    learn: dict[str, Any] | None = None  # name -> LearnEntry fields (checked by loop=hpo)
    hypergrad: Any = None
    truncated: Any = None
    learner: Any = None
    online_optim: Any = None
    outer_optim: Any = None
    logger: Any = MISSING

    loop: str = "hpo"  # hpo | truncated | fewshot | online
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
    dist_timeout: float = 600.0  # seconds a process waits for the others (distributed runs)
    trusted_targets: list[str] = field(default_factory=list)  # modules a resumed run may run

    # loop=hpo
    horizon: int = 100  # inner steps of each inner training run
    eval_horizon: int | None = None  # inner steps of evaluation runs; None: horizon
    population: int = 1  # inner runs per outer step, meta-gradients averaged (spread over ranks)

    # loop=truncated
    truncation: int = 10  # inner steps per truncation (one outer step)
    truncation_schedule: str = "fixed"  # fixed | random (lengths uniform in 1..2K-1)

    # loop=fewshot
    meta_batch: int = 25  # tasks per outer step
    eval_tasks: int = 600  # test tasks of the final evaluation (validation uses a sixth)
    eval_inner_steps: list[int] | None = None  # None: [0, learner.inner_steps]
    learned_lr_outer_lr: float | None = 0.01  # outer lr of learned (log) inner lrs; None: same


def learn_entry(name: str, entry: Any) -> LearnEntry:
    """A `learn` entry as a checked `LearnEntry`.

    Raises:
        ArgumentError: the entry is not a mapping, has unknown keys or wrongly typed values.
    """
    path = f"learn.{name}"
    if not isinstance(entry, dict):
        raise ArgumentError(
            path, f"{path} must be a mapping like {{init: 0.01, scope: per_layer}}, got {entry!r}"
        )
    allowed = [f.name for f in fields(LearnEntry)]
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ArgumentError(path, f"{path} has unknown keys {unknown} (allowed: {allowed})")
    init = entry.get("init")
    if isinstance(init, (list, tuple)):
        if not init:
            raise ArgumentError(f"{path}.init", f"{path}.init is an empty list")
        for i, value in enumerate(init):
            check_number(value, f"{path}.init.{i}")
    elif init is not None:
        check_number(init, f"{path}.init")
    check_choice(
        entry.get("constraint", "positive"), f"{path}.constraint", ("positive", "unit", "none")
    )
    check_choice(
        entry.get("scope", "scalar"), f"{path}.scope", ("scalar", "per_layer", "per_element")
    )
    check_choice(entry.get("per_step", False), f"{path}.per_step", (True, False))
    check_choice(entry.get("fixed", False), f"{path}.fixed", (True, False))
    return LearnEntry(**entry)


def weighting_entry(name: str, entry: Any) -> WeightingEntry:
    """A `learn.example_weights` or `learn.weight_net` entry as a checked `WeightingEntry`.

    Raises:
        ArgumentError: the entry is not a mapping, has keys its weighting does not take, or
            values out of range.
    """
    path = f"learn.{name}"
    if entry is None:
        entry = {}
    if not isinstance(entry, dict):
        raise ArgumentError(
            path, f"{path} must be a mapping like {{normalize: weights}}, got {entry!r}"
        )
    allowed = list(_WEIGHTING_KEYS[name])
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ArgumentError(path, f"{path} has unknown keys {unknown} (allowed: {allowed})")
    out = WeightingEntry(**entry)
    check_choice(out.constraint, f"{path}.constraint", ("positive", "unit", "none"))
    if out.constraint == "none":
        check_number(out.init, f"{path}.init")
    else:
        check_number(out.init, f"{path}.init", 0.0, low_open=True)
    check_count(out.hidden, f"{path}.hidden")
    check_choice(out.normalize, f"{path}.normalize", ("weights", "count", "none"))
    if out.constraint == "none" and out.normalize == "weights":
        raise ArgumentError(
            f"{path}.normalize",
            f"{path}.normalize: free weights (constraint: none) may turn negative, so their sum "
            "cannot normalize the loss; use normalize: count or none",
        )
    if out.constraint == "unit" and not out.init < 1:
        raise ArgumentError(
            f"{path}.init",
            f"{path}.init: a unit-constrained weight starts below 1 (got {out.init})",
        )
    return out


def check_settings(cfg: Any) -> None:
    """Range checks of the top-level settings.

    Raises:
        ArgumentError: naming the setting.
    """
    check_choice(cfg.loop, "loop", LOOPS)
    check_count(cfg.outer_steps, "outer_steps", 0)
    for key in (
        "val_every",
        "checkpoint_every",
        "max_nonfinite",
        "horizon",
        "meta_batch",
        "truncation",
        "population",
    ):
        check_count(cfg[key], key)
    check_count(cfg.eval_tasks, "eval_tasks")
    check_count(cfg.threads, "threads", allow_none=True)
    check_count(cfg.eval_horizon, "eval_horizon", allow_none=True)
    check_number(cfg.dist_timeout, "dist_timeout", 0.0, low_open=True)
    check_number(
        cfg.learned_lr_outer_lr, "learned_lr_outer_lr", 0.0, low_open=True, allow_none=True
    )
    check_choice(cfg.dtype, "dtype", ("float32", "float64"))
    check_choice(cfg.truncation_schedule, "truncation_schedule", ("fixed", "random"))
    if cfg.eval_inner_steps is not None:
        for s in cfg.eval_inner_steps:
            check_count(s, "eval_inner_steps", 0)
    device = cfg.device
    if not isinstance(device, str) or not (
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise ArgumentError("device", f"Invalid device: {device!r} (auto, cpu, cuda or cuda:N)")
