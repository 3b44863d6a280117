"""A metagrad logger that records process CPU time, for the black-box-vs-gradient experiment.

`python -m metagrad.train ... logger=none logger._target_=cpu_clock.CPUClockLogger` (with this
folder on PYTHONPATH) writes `<run>/cpu_clock.json` when the run closes: the process CPU seconds
(`time.process_time()`, user + system, since the process started) when the logger was created
and closed, and, at every validation of a `loop=hpo` run, the CPU seconds, the validation loss
and the hyperparameters being validated (scalars, per-step schedules and per-element tensors),
so that the configuration found within any CPU budget can be evaluated again afterwards.

In a Hydra sweep (`-m`) every trial is a run of the same process with a logger of its own, so
`closed` of trial i is the sweep's CPU time once trial i has been trained and evaluated:
sampling, Hydra's composition and the runs before it included.

`+logger.stop_after=SECONDS` enforces a CPU budget: the process ends (exit status 0, its records
written) at the first validation of a `loop=hpo` run, or the end of the first sweep trial, that
finds the process's CPU time past it. Neither Hydra's sweepers nor the training loop stop on a
CPU budget of their own, so this is how every side of the experiment gets the same one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from metagrad.app.logger import NullLogger

__all__ = ["CPUClockLogger", "FILE_NAME"]

#: The file each run gets.
FILE_NAME = "cpu_clock.json"


class CPUClockLogger(NullLogger):
    """Records CPU time and the validated hyperparameters; writes them when closed.

    Args:
        run_dir: the run folder (`cpu_clock.json` goes there).
        purge_step: unused (accepted like every metagrad logger).
        stop_after: end the process once its CPU seconds pass this (None: never).
        options: the logger group's options (flush_secs, ...), unused.
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        purge_step: int | None = None,
        stop_after: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(run_dir, purge_step)
        self.stop_after = stop_after
        self.created = time.process_time()
        self.points: list[dict[str, Any]] = []
        self.meta: dict[str, float] = {}
        self.tensors: dict[str, Tensor] = {}
        self.schedule_values: dict[str, Tensor] = {}
        self.final: dict[str, float] = {}

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Keep the latest hyperparameters; at a validation, record the CPU time and them."""
        if any(k.startswith("meta/") for k in values):
            self.meta = {k: float(v) for k, v in values.items() if k.startswith("meta/")}
        if any(k.startswith("final/") for k in values):
            self.final = {k: float(v) for k, v in values.items()}
        if "val/loss" in values:
            self.points.append(
                {
                    "step": step,
                    "cpu": time.process_time(),
                    "val_loss": float(values["val/loss"]),
                    "meta": dict(self.meta),
                    "schedules": {k: v.tolist() for k, v in self.schedule_values.items()},
                    "tensors": {k: v.flatten().tolist() for k, v in self.tensors.items()},
                }
            )
            if not self.final and self._spent():
                self._stop()

    def histograms(self, values: Mapping[str, Tensor], step: int) -> None:
        """Keep the latest per-element values (recorded at the next validation)."""
        self.tensors = {k: v.detach().clone() for k, v in values.items()}

    def schedules(
        self, values: Mapping[str, Tensor], step: int, force: bool = False, final: bool = False
    ) -> None:
        """Keep the latest per-step schedules (recorded at the next validation)."""
        self.schedule_values = {k: v.detach().clone() for k, v in values.items()}

    def close(self) -> None:
        """Write `cpu_clock.json` into the run folder (and end the process past the budget)."""
        self._write()
        if self._spent():
            self._stop()

    def _spent(self) -> bool:
        return self.stop_after is not None and time.process_time() >= self.stop_after

    def _stop(self) -> None:
        self._write(stopped=True)
        os._exit(0)  # the budget is spent: no further trial or outer step

    def _write(self, stopped: bool = False) -> None:
        if self.run_dir is None:
            return
        record = {
            "created": self.created,
            "closed": time.process_time(),
            "points": self.points,
            "final": self.final,
            "stopped_by_budget": stopped,
        }
        (self.run_dir / FILE_NAME).write_text(json.dumps(record))
