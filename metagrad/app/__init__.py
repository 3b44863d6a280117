"""The training application behind `python -m metagrad.train`: configs, jobs, loop, logging.

`metagrad.train.train(cfg)` validates a composed config, builds a job from it
(`build.build_job`), and runs `loop.run_loop`, which writes TensorBoard event files and atomic
checkpoints into the run folder.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .loop import LoopResult, NonFiniteError, StepOutcome, run_loop
from .schema import ConfigError, register_configs, validate

__all__ = [
    "ConfigError",
    "LoopResult",
    "NonFiniteError",
    "StepOutcome",
    "load_checkpoint",
    "register_configs",
    "run_loop",
    "save_checkpoint",
    "validate",
]
