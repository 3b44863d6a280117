"""Sinusoid regression tasks (Finn et al. 2017), sampled from an explicit seed.

Each task is `y = amplitude * sin(x - phase)` with amplitude ~ U[0.1, 5], phase ~ U[0, pi] and
inputs x ~ U[-5, 5]. A meta-batch holds support and query points of the same tasks.

>>> tasks = SinusoidTasks(seed=0)
>>> sx, sy, qx, qy = tasks.sample(meta_batch=25, shots=10, query_shots=10)  # [25, 10, 1] each
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TaskBatch", "SinusoidTasks"]


class TaskBatch(NamedTuple):
    """A meta-batch of tasks; every tensor has a leading task dimension.

    Unpacks as `support_x, support_y, query_x, query_y`, the argument order of every
    `metagrad.learners` algorithm.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


def _interval(value: tuple[float, float], arg: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {arg}: expected a pair (low, high), got {value!r}") from None
    if not low <= high:
        raise ValueError(f"Invalid {arg}: low {low} must not exceed high {high}")
    return low, high


def _count(value: int, arg: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {arg}: {value!r} (must be an integer >= {minimum})")
    return value


class SinusoidTasks:
    """A seeded, reproducible stream of sinusoid regression tasks.

    Two samplers built with the same seed return the same batches in the same order.

    Args:
        amplitude: range (low, high) of the uniform amplitude.
        phase: range of the uniform phase.
        x_range: range of the uniform inputs.
        seed: seed of the sampler's own `torch.Generator` (the global RNG is not used).
        dtype: dtype of the returned tensors.
    """

    def __init__(
        self,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.amplitude = _interval(amplitude, "amplitude")
        self.phase = _interval(phase, "phase")
        self.x_range = _interval(x_range, "x_range")
        self.seed = int(seed)
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(self.seed)

    def _uniform(self, shape: tuple[int, ...], interval: tuple[float, float]) -> Tensor:
        low, high = interval
        u = torch.rand(shape, generator=self.generator, dtype=torch.float64)
        return low + (high - low) * u

    def sample_functions(self, meta_batch: int) -> tuple[Tensor, Tensor]:
        """Draw `meta_batch` tasks; returns (amplitude, phase), each of shape [meta_batch]."""
        _count(meta_batch, "meta_batch", 1)
        amplitude = self._uniform((meta_batch,), self.amplitude)
        return amplitude, self._uniform((meta_batch,), self.phase)

    def points(self, amplitude: Tensor, phase: Tensor, shots: int) -> tuple[Tensor, Tensor]:
        """Draw `shots` inputs per task and their targets, each of shape [tasks, shots, 1]."""
        _count(shots, "shots", 1)
        x = self._uniform((amplitude.shape[0], shots, 1), self.x_range)
        y = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
        return x.to(self.dtype), y.to(self.dtype)

    def sample(self, meta_batch: int, shots: int, query_shots: int | None = None) -> TaskBatch:
        """Draw a meta-batch of tasks with `shots` support and `query_shots` query points.

        Args:
            meta_batch: number of tasks.
            shots: support points per task (K).
            query_shots: query points per task; defaults to `shots`.

        Returns:
            A `TaskBatch` of tensors shaped [meta_batch, shots or query_shots, 1].
        """
        query_shots = shots if query_shots is None else query_shots
        _count(shots, "shots", 1)
        _count(query_shots, "query_shots", 1)
        amplitude, phase = self.sample_functions(meta_batch)
        sx, sy = self.points(amplitude, phase, shots)
        qx, qy = self.points(amplitude, phase, query_shots)
        return TaskBatch(sx, sy, qx, qy)

    def __repr__(self) -> str:
        return (
            f"SinusoidTasks(amplitude={self.amplitude}, phase={self.phase}, "
            f"x_range={self.x_range}, seed={self.seed})"
        )
