"""The training application behind `python -m metagrad.train`: configs, jobs, loop, logging.

`metagrad.train.train(cfg)` checks a composed config, builds a job from it (`jobs.JOBS`), and
runs `loop.run_loop`, which writes TensorBoard event files and atomic checkpoints into the run
folder. Config options are generated from the library's signatures (`configs.py`).
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .configs import register_configs
from .errors import ConfigError, RunRefused
from .jobs import JOBS, Job, MetaJob, StepOutcome
from .loop import Interrupted, LoopResult, NonFiniteError, run_loop

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Interrupted",
    "JOBS",
    "Job",
    "LoopResult",
    "MetaJob",
    "NonFiniteError",
    "RunRefused",
    "StepOutcome",
    "load_checkpoint",
    "register_configs",
    "run_loop",
    "save_checkpoint",
]
