"""Seeded, reproducible few-shot task distributions (no downloads).

>>> from metagrad.tasks import SinusoidTasks, DigitsFewShot
>>> sx, sy, qx, qy = SinusoidTasks(seed=0).sample(meta_batch=25, shots=10)
>>> sx, sy, qx, qy = DigitsFewShot(ways=5, shots=1, query=15, split="test").sample(8)
"""

from .digits import DigitsFewShot
from .sinusoid import SinusoidTasks, TaskBatch

__all__ = ["SinusoidTasks", "DigitsFewShot", "TaskBatch"]
