"""A resource guard: estimate the peak memory of one hypergradient before the first step.

The estimate comes from measured short runs, extrapolated the way the estimator scales: the
graph of an inner step is measured as the bytes of the tensors autograd saves for the
backward pass in an unrolled run of 1 and 3 steps, and multiplied by the number of steps
whose graph the estimator keeps alive at once (`Estimator.live_steps`); the data of every
inner batch (held for the whole inner run) is added.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..hypergrad.base import inner_steps, start

__all__ = ["MemoryEstimate", "available_memory", "estimate_hpo_memory"]


@dataclass
class MemoryEstimate:
    """Bytes of one outer step's peak, and how it was obtained."""

    total: int
    per_step_graph: int
    per_step_data: int
    live_steps: int
    horizon: int

    def describe(self) -> str:
        return (
            f"{_gib(self.total)} (graph {_gib(self.per_step_graph)} per inner step x "
            f"{self.live_steps} steps kept, data {_gib(self.per_step_data)} per step x "
            f"{self.horizon} steps)"
        )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def available_memory(device: torch.device) -> int | None:
    """Bytes available for a new allocation on `device` (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _saved_bytes(job: Any, steps: int) -> int:
    """Bytes of the tensors saved for backward by an unrolled run of `steps` inner steps."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    problem = job.problem(0, horizon=steps)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run = inner_steps(problem, job.meta, start(problem, job.meta), range(steps))
        problem.outer_loss(run.params, job.meta, problem.outer_batch)
    return sum(seen.values())


def estimate_hpo_memory(job: Any) -> MemoryEstimate:
    """The estimated peak bytes of one outer step of an `HPOJob` (see the module docstring)."""
    one, three = _saved_bytes(job, 1), _saved_bytes(job, 3)
    per_step = max((three - one) // 2, 0)
    base = max(one - per_step, 0)
    batch = job.problem(0, horizon=1).batch(0)
    data = sum(t.numel() * t.element_size() for t in batch if isinstance(t, torch.Tensor))
    live_fn = getattr(job.method, "live_steps", None)
    live = int(live_fn(job.horizon)) if callable(live_fn) else job.horizon
    total = base + per_step * live + data * job.horizon
    return MemoryEstimate(total, per_step, data, live, job.horizon)
