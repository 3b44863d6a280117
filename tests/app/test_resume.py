"""A run killed by SIGKILL after a checkpoint, then resumed, ends with the uninterrupted numbers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _train_utils import compose_cfg, env, metrics, run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metagrad.app.checkpoint import load_checkpoint
from metagrad.app.errors import RunRefused
from metagrad.train import train

STEPS = 30
RUN = [
    "learn=lr_momentum_per_layer",
    "model.hidden=[16]",
    "horizon=10",
    "task.batch_size=32",
    "task.outer_batch_size=64",
    f"outer_steps={STEPS}",
    "val_every=10",
    "checkpoint_every=3",
    "threads=1",
    "learn.momentum.per_step=true",
]


def _kill_after_first_checkpoint(run_dir: Path) -> int:
    """Start a run, SIGKILL it as soon as a checkpoint exists; return the checkpoint's step."""
    cmd = [sys.executable, "-m", "metagrad.train", f"hydra.run.dir={run_dir}", *RUN]
    proc = subprocess.Popen(
        cmd, cwd=run_dir.parent, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    ckpt = run_dir / "checkpoint.pt"
    deadline = time.monotonic() + 120
    try:
        while not ckpt.exists():
            if proc.poll() is not None:
                pytest.fail(f"run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 120 s")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return load_checkpoint(ckpt)["loop"]["step"]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    killed.mkdir()
    step = _kill_after_first_checkpoint(killed)
    assert 3 <= step < STEPS, "the run was not interrupted before its end"
    assert not (killed / "metrics.json").exists()
    assert not list(killed.glob(".*.tmp")), "a temporary checkpoint file was left behind"

    # Only resume=true: the run's own settings come from its checkpoint.
    proc = run_train(killed, "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {killed.resolve()} from outer step" in proc.stdout + proc.stderr

    straight = tmp_path / "straight"
    train(compose_cfg(*RUN), run_dir=straight)

    resumed, reference = metrics(killed), metrics(straight)
    assert resumed["final"] == reference["final"]  # bit for bit
    assert resumed["learned"] == reference["learned"]
    assert resumed["initial"] == reference["initial"]

    ea = EventAccumulator(str(killed), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("outer/loss")] == list(range(1, STEPS + 1))
    ref = EventAccumulator(str(straight), size_guidance={"scalars": 0})
    ref.Reload()
    assert [e.value for e in ea.Scalars("outer/loss")] == [
        e.value for e in ref.Scalars("outer/loss")
    ]

    # An override that contradicts the run being continued is refused.
    with pytest.raises(RunRefused, match=r"inner_optim.weight_decay: 0.0 -> 0.5"):
        train(compose_cfg(*RUN, "inner_optim.weight_decay=0.5", "resume=true"), run_dir=killed)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RunRefused, match="resume=true but .* has no checkpoint.pt"):
        train(compose_cfg(*RUN, "resume=true"), run_dir=tmp_path)
