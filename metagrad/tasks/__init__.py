"""Tasks: the data the training loops run on, seeded and reproducible (no downloads).

Supervised tasks (`loop=hpo`, `loop=online`) follow `SupervisedTask` (`NoisyDigits`: digits
with flipped labels or long-tailed classes, for learning to reweight examples); episodic
few-shot tasks (`loop=fewshot`) follow `EpisodicTask` (see `metagrad.tasks.protocols`).

>>> from metagrad.tasks import SinusoidTasks, DigitsFewShot, Digits
>>> sx, sy, qx, qy = SinusoidTasks(seed=0).sample(meta_batch=25, shots=10)
>>> sx, sy, qx, qy = DigitsFewShot(ways=5, shots=1, query=15, split="test").sample(8)
>>> (x, y), = Digits(batch_size=100).train_batches(seed=0, count=1)
"""

from .digits import DigitsFewShot
from .image_folder import ImageFolderFewShot
from .noisy import CorruptedSplits, NoisyDigits, corrupt_digits
from .protocols import Batch, EpisodicTask, IndexedBatch, SupervisedTask, TaskBatch, model_args
from .sinusoid import SinusoidTasks
from .supervised import Digits, TensorTask, load_digits

__all__ = [
    "Batch",
    "CorruptedSplits",
    "Digits",
    "DigitsFewShot",
    "EpisodicTask",
    "ImageFolderFewShot",
    "IndexedBatch",
    "NoisyDigits",
    "SinusoidTasks",
    "SupervisedTask",
    "TaskBatch",
    "TensorTask",
    "corrupt_digits",
    "load_digits",
    "model_args",
]
