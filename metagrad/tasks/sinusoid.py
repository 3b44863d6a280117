"""Sinusoid regression tasks (Finn et al. 2017), sampled from an explicit seed.

Each task is `y = amplitude * sin(x - phase)` with amplitude ~ U[0.1, 5], phase ~ U[0, pi] and
inputs x ~ U[-5, 5]. A meta-batch holds support and query points of the same tasks.

>>> tasks = SinusoidTasks(seed=0)
>>> sx, sy, qx, qy = tasks.sample(meta_batch=25, shots=10, query_shots=10)  # [25, 10, 1] each
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._checks import ArgumentError, check_choice, check_count
from .protocols import SPLITS, TaskBatch

__all__ = ["TaskBatch", "SinusoidTasks", "split_seed"]


def split_seed(seed: int, split: str) -> int:
    """A seed for `split`'s episodes, so that the splits of one seed draw different tasks."""
    return (int(seed) * len(SPLITS) + SPLITS.index(check_choice(split, "split", SPLITS))) % 2**62


def _interval(value: tuple[float, float], arg: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ArgumentError(
            arg, f"Invalid {arg}: expected a pair (low, high), got {value!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ArgumentError(arg, f"Invalid {arg}: low {low} must not exceed high {high}")
    return low, high


class SinusoidTasks:
    """A seeded, reproducible stream of sinusoid regression tasks.

    Two samplers built with the same seed return the same batches in the same order. As an
    episodic task (`episodes`) it draws every meta-batch from its own seed instead; its splits
    come from the same distribution of functions (new functions, not new kinds of function).

    Args:
        amplitude: range (low, high) of the uniform amplitude.
        phase: range of the uniform phase.
        x_range: range of the uniform inputs.
        seed: seed of the sampler's own `torch.Generator` (the global RNG is not used).
        dtype: dtype of the returned tensors.
        shots: support points per task of `episodes` (K).
        query: query points per task of `episodes`.
    """

    #: The loss of the training loops (a regression), and no further metric.
    loss = "mse"
    metric = None

    def __init__(
        self,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        shots: int = 10,
        query: int = 10,
    ) -> None:
        self.amplitude = _interval(amplitude, "amplitude")
        self.phase = _interval(phase, "phase")
        self.x_range = _interval(x_range, "x_range")
        self.seed = int(seed)
        self.dtype = dtype
        self.shots = check_count(shots, "shots")
        self.query = check_count(query, "query")
        self.generator = torch.Generator().manual_seed(self.seed)

    def _uniform(self, shape: tuple[int, ...], interval: tuple[float, float]) -> Tensor:
        low, high = interval
        u = torch.rand(shape, generator=self.generator, dtype=torch.float64)
        return low + (high - low) * u

    def sample_functions(self, meta_batch: int) -> tuple[Tensor, Tensor]:
        """Draw `meta_batch` tasks; returns (amplitude, phase), each of shape [meta_batch]."""
        check_count(meta_batch, "meta_batch", 1)
        amplitude = self._uniform((meta_batch,), self.amplitude)
        return amplitude, self._uniform((meta_batch,), self.phase)

    def points(self, amplitude: Tensor, phase: Tensor, shots: int) -> tuple[Tensor, Tensor]:
        """Draw `shots` inputs per task and their targets, each of shape [tasks, shots, 1]."""
        check_count(shots, "shots", 1)
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
        check_count(shots, "shots", 1)
        check_count(query_shots, "query_shots", 1)
        amplitude, phase = self.sample_functions(meta_batch)
        sx, sy = self.points(amplitude, phase, shots)
        qx, qy = self.points(amplitude, phase, query_shots)
        return TaskBatch(sx, sy, qx, qy)

    def episodes(self, split: str, count: int, seed: int) -> TaskBatch:
        """`count` tasks with `shots` support and `query` query points (the episodic protocol)."""
        sampler = SinusoidTasks(
            self.amplitude, self.phase, self.x_range, split_seed(seed, split), self.dtype
        )
        return sampler.sample(count, self.shots, self.query)

    def model_args(self) -> dict[str, Any]:
        """Inputs and outputs are scalars."""
        return {"in_features": 1, "out_features": 1}

    def __repr__(self) -> str:
        return (
            f"SinusoidTasks(amplitude={self.amplitude}, phase={self.phase}, "
            f"x_range={self.x_range}, seed={self.seed})"
        )
