"""`-m` sweeps: over hypergradient estimators, and through submitit's local executor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _train_utils import TINY, env, metrics

SMALL = [o for o in TINY if not o.startswith(("outer_steps", "val_every", "checkpoint_every"))]
SMALL += ["outer_steps=3", "val_every=3", "checkpoint_every=3"]


def _multirun(sweep_dir: Path, *overrides: str, timeout: float = 240) -> str:
    cmd = [sys.executable, "-m", "metagrad.train", "-m", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(
        [*cmd, *SMALL, *overrides],
        cwd=sweep_dir.parent,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_sweep_over_exact_estimators_gives_one_run_each_with_the_same_numbers(
    tmp_path: Path,
) -> None:
    sweep = tmp_path / "sweep"
    out = _multirun(sweep, "hypergrad=unrolled,checkpointed,forwardmode")
    assert "Launching 3 jobs" in out
    runs = [sweep / str(i) for i in range(3)]
    finals = []
    for run, name in zip(runs, ["unrolled", "checkpointed", "forwardmode"], strict=True):
        assert list(run.glob("events.out.tfevents*")), f"no event file in {run}"
        assert f"hypergrad: {name}" in (run / ".hydra" / "hydra.yaml").read_text()
        finals.append(metrics(run)["final"])
    # Three exact estimators of the same hypergradient: the same training, up to rounding.
    for other in finals[1:]:
        for key, value in finals[0].items():
            assert other[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_submitit_local_launcher_runs_a_sweep_job_in_its_own_process(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    out = _multirun(sweep, "hydra/launcher=local", "seed=3")
    assert "Submitit 'local' sweep output dir" in out
    assert (sweep / ".submitit").is_dir()
    result = metrics(sweep / "0")
    assert result["outer_steps"] == 3 and 0.0 <= result["final"]["test/accuracy"] <= 1.0
