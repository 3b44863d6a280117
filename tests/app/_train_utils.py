"""Helpers shared by the training-application tests: run `python -m metagrad.train` quickly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

# A run small enough for a test: a tiny MLP, a short horizon, few outer steps.
# A small HPO run. It learns the per-layer learning rates and the momentum (scalars the tests read
# back), not the default job's per-element weight decay.
TINY = [
    "learn=lr_momentum_per_layer",
    "model.hidden=[16]",
    "horizon=5",
    "task.batch_size=32",
    "task.outer_batch_size=64",
    "outer_steps=4",
    "val_every=2",
    "checkpoint_every=2",
    "threads=1",
]

# A few-shot run small enough for a test.
FEWSHOT = [
    "experiment=maml_sine",
    "outer_steps=2",
    "eval_tasks=12",
    "meta_batch=4",
    "model.hidden=[8]",
    "val_every=1",
    "checkpoint_every=1",
]

# An online run small enough for a test.
ONLINE = ["experiment=hd_digits", "outer_steps=2", "model.hidden=[16]", "val_every=1"]


def env(**extra: str) -> dict[str, str]:
    """The environment of a child run: one thread, no progress bar, no full Hydra traces."""
    out = {**os.environ, **extra}
    out["OMP_NUM_THREADS"] = "1"
    out["MKL_NUM_THREADS"] = "1"
    out.pop("HYDRA_FULL_ERROR", None)
    return out


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    """The command line of a run into `run_dir`."""
    return [sys.executable, "-m", "metagrad.train", f"hydra.run.dir={run_dir}", *overrides]


def run_train(
    run_dir: Path,
    *overrides: str,
    cwd: Path | None = None,
    timeout: float = 180,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m metagrad.train` into `run_dir` and return the finished process."""
    return subprocess.run(
        train_cmd(run_dir, *overrides),
        cwd=cwd or run_dir.parent,
        env=env(**(extra_env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metrics(run_dir: Path) -> dict:
    """The `metrics.json` a finished run wrote."""
    return json.loads((run_dir / "metrics.json").read_text())


def compose_cfg(*overrides: str):
    """Compose `configs/train.yaml` in-process with `overrides` (no command line, no run)."""
    from hydra import compose, initialize_config_dir

    from metagrad.app.configs import register_configs
    from metagrad.train import config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` (hidden ones included) and a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
