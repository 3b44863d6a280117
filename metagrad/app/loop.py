"""The outer training loop: steps, validation, logging, checkpoints and non-finite handling.

The loop is a plain function over a `Job` (what one outer step does) and a logger, so it can be
tested without Hydra. It is the only place that writes to TensorBoard. A stop request (a
signal) ends it after the current outer step, with a checkpoint.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .checkpoint import save_checkpoint
from .jobs.base import Job, StepOutcome
from .logger import NullLogger

__all__ = [
    "Interrupted",
    "Job",
    "LoopResult",
    "NonFiniteError",
    "StepOutcome",
    "resume_state",
    "run_loop",
]

log = logging.getLogger("metagrad.train")


class NonFiniteError(RuntimeError):
    """Too many outer steps in a row had a non-finite meta-gradient or loss."""


class Interrupted(Exception):  # noqa: N818 (a stop the user asked for, not a failure)
    """The loop stopped early on request (a signal) after writing a checkpoint.

    Attributes:
        step: the outer steps done (and checkpointed).
        signum: the signal that asked for the stop.
    """

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"stopped after outer step {step}")
        self.step = step
        self.signum = signum


@dataclass
class LoopResult:
    """The end of a run: final metrics, metrics before the first outer step, counts."""

    final: dict[str, float]
    steps: int
    nonfinite_total: int
    initial: dict[str, float] = field(default_factory=dict)


def resume_state(checkpoint: Mapping[str, Any], job: Job) -> dict[str, Any]:
    """Restore `job` from a loaded checkpoint; returns the loop's own counters (`step`, ...)."""
    job.load_state_dict(checkpoint["job"])
    torch.set_rng_state(checkpoint["torch_rng"])
    return dict(checkpoint["loop"])


def run_loop(
    job: Job,
    *,
    outer_steps: int,
    logger: NullLogger | None = None,
    val_every: int = 10,
    checkpoint_every: int = 0,
    checkpoint_path: Path | None = None,
    max_nonfinite: int = 5,
    progress: bool = False,
    start: Mapping[str, Any] | None = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
    stop: Callable[[], int | None] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> LoopResult:
    """Run outer steps until `outer_steps`, logging each with the outer step count (1-based).

    Args:
        job: what one outer step does.
        outer_steps: total number of outer steps of the run (a resumed run continues to it).
        logger: where scalars, histograms and charts go.
        val_every: validate every this many steps (and after the last one).
        checkpoint_every: write a checkpoint every this many steps (0: never) and at the end.
        checkpoint_path: where to write it.
        max_nonfinite: stop with `NonFiniteError` after this many skipped steps in a row.
        progress: show a progress bar with the current losses.
        start: loop counters from `resume_state` (None: a fresh run).
        checkpoint_extra: more plain data to store in every checkpoint (e.g. the config).
        stop: returns a signal number once a stop was requested (else None); the loop then
            writes a checkpoint after the current step and raises `Interrupted`.
        save: writes a checkpoint payload (default: `save_checkpoint(checkpoint_path, ...)`
            with the RNG state); a distributed run passes one that every process calls.

    Returns:
        The final metrics (`job.evaluate(final=True)`) and counts.

    Raises:
        Interrupted: a stop was requested; the checkpoint holds every finished step.
        NonFiniteError: `max_nonfinite` outer steps in a row were skipped.
    """
    logger = logger or NullLogger()
    counters = dict(start or {"step": 0, "nonfinite_total": 0, "nonfinite_in_a_row": 0})
    first = counters["step"]
    if 0 < outer_steps <= first:
        log.info("checkpoint is already at outer step %d of %d", first, outer_steps)
    bar = tqdm(
        range(first, outer_steps),
        initial=first,
        total=outer_steps,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        desc="outer",
    )
    # Log lines go through tqdm.write while the bar is shown, so they do not break it.
    with logging_redirect_tqdm(loggers=[logging.getLogger()]) if progress else nullcontext():
        return _run(
            job,
            logger,
            bar,
            counters,
            outer_steps,
            val_every,
            checkpoint_every,
            checkpoint_path,
            max_nonfinite,
            progress,
            checkpoint_extra,
            stop or (lambda: None),
            save,
        )


def _run(
    job: Job,
    logger: NullLogger,
    bar: tqdm,
    counters: dict[str, Any],
    outer_steps: int,
    val_every: int,
    checkpoint_every: int,
    checkpoint_path: Path | None,
    max_nonfinite: int,
    progress: bool,
    checkpoint_extra: Mapping[str, Any] | None,
    stop: Callable[[], int | None],
    save: Callable[[dict[str, Any]], None] | None,
) -> LoopResult:
    first = counters["step"]
    if first == 0:
        _log_meta(job, logger, 0, force_figure=True)
        if outer_steps > 0:  # with no step, the final evaluation is the same run: done once
            initial = job.evaluate(final=False)
            logger.scalars(initial, 0)
            counters["initial"] = initial
    for index in bar:
        step = index + 1
        outcome = job.step(index)
        metrics = dict(outcome.metrics)
        if outcome.finite:
            counters["nonfinite_in_a_row"] = 0
        else:
            counters["nonfinite_total"] += 1
            counters["nonfinite_in_a_row"] += 1
            log.warning("outer step %d skipped: %s", step, outcome.reason)
        metrics["outer/skipped_total"] = counters["nonfinite_total"]
        for note in outcome.notes:
            log.warning("outer step %d: %s", step, note)
            logger.text("warnings", f"outer step {step}: {note}")
        logger.scalars(metrics, step)
        _log_meta(job, logger, step, force_figure=False, final=step == outer_steps)
        if progress:
            bar.set_postfix(
                {k.split("/")[0]: f"{v:.4g}" for k, v in metrics.items() if k.endswith("/loss")}
            )
        if counters["nonfinite_in_a_row"] >= max_nonfinite:
            logger.flush()
            raise NonFiniteError(
                f"stopped at outer step {step}: {counters['nonfinite_in_a_row']} outer steps in a "
                f"row had a non-finite meta-gradient or loss (last: {outcome.reason}); lower the "
                "learning rates (inner_optim.lr, outer_optim.lr) or raise max_nonfinite"
            )
        if step % val_every == 0 or step == outer_steps:
            val = job.evaluate(final=False)
            logger.scalars(val, step)
            losses = {k: v for k, v in metrics.items() if k.endswith("/loss")}
            shown = ", ".join(f"{k} {v:.4g}" for k, v in {**losses, **val}.items())
            log.info("outer step %d/%d: %s", step, outer_steps, shown)
        counters["step"] = step
        signum = stop()
        if (checkpoint_path is not None or save is not None) and (
            signum is not None
            or (checkpoint_every and (step % checkpoint_every == 0 or step == outer_steps))
        ):
            payload = {**(checkpoint_extra or {}), "job": job.state_dict(), "loop": dict(counters)}
            if save is not None:
                save(payload)
            else:
                payload["torch_rng"] = torch.get_rng_state()
                assert checkpoint_path is not None
                save_checkpoint(checkpoint_path, payload)
            logger.flush()
        if signum is not None and step < outer_steps:
            bar.close()
            logger.flush()
            raise Interrupted(step, signum)
    bar.close()
    final = job.evaluate(final=True)
    if "initial" not in counters and first == 0:
        counters["initial"] = {k: v for k, v in final.items() if not k.startswith("test/")}
    logger.scalars({f"final/{k.replace('/', '_')}": v for k, v in final.items()}, outer_steps)
    logger.flush()
    return LoopResult(
        final=final,
        steps=outer_steps,
        nonfinite_total=counters["nonfinite_total"],
        initial=dict(counters.get("initial", {})),
    )


def _log_meta(
    job: Job, logger: NullLogger, step: int, force_figure: bool, final: bool = False
) -> None:
    logger.scalars(job.meta_scalars(), step)
    tensors = job.meta_tensors()
    if tensors:
        logger.histograms(tensors, step)
    schedules = job.meta_schedules()
    if schedules:
        logger.schedules(schedules, step, force=force_figure, final=final)
