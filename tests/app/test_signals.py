"""Interrupts lose nothing: SIGINT and SIGTERM finish the current outer step, write a
checkpoint, print the exact resume command and exit with 128 + the signal; resuming gives the
uninterrupted run's numbers. Under submitit, a timed-out or preempted job requeues itself and
continues from its checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _train_utils import TINY, compose_cfg, env, metrics, run_train, train_cmd

from metagrad.app.checkpoint import load_checkpoint
from metagrad.train import train

STEPS = 12
RUN = [*TINY, f"outer_steps={STEPS}", "val_every=1", "checkpoint_every=100", "logger=none"]


def _start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            pytest.fail(f"the run ended before {text!r}: {proc.stderr.read()[-2000:]}")
    pytest.fail(f"no {text!r} within {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = tmp_path_factory.mktemp("reference") / "run"
    train(compose_cfg(*RUN), run_dir=run)
    return metrics(run)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_stops_with_a_checkpoint_and_the_resume_command(
    tmp_path: Path, signum: int, reference: dict
) -> None:
    run = tmp_path / "run"
    proc = _start(train_cmd(run, *RUN), tmp_path)
    _wait_for_line(proc, "outer step 3/")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    step = load_checkpoint(run / "checkpoint.pt")["loop"]["step"]
    assert 3 <= step < STEPS
    assert f"stopped after outer step {step} with a checkpoint" in err
    command = f"python -m metagrad.train hydra.run.dir={run.resolve()} resume=true"
    assert command in err
    assert "Traceback" not in err
    assert not (run / ".lock").exists()

    # The printed command, as printed, continues the run to the uninterrupted numbers.
    resumed = run_train(run, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = metrics(run)
    assert got["final"] == reference["final"]  # bit for bit
    assert got["learned"] == reference["learned"]


def test_a_second_sigint_stops_at_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Long outer steps, so that both signals arrive within one of them.
    proc = _start(train_cmd(run, *RUN, "outer_steps=400", "horizon=2000"), tmp_path)
    _wait_for_line(proc, "outer step 1/")
    proc.send_signal(signal.SIGINT)
    assert "stopping after this outer step" in proc.stderr.readline() + proc.stderr.readline()
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "stopped at once" in err and "Traceback" not in err
    assert time.monotonic() - started < 10, "it waited for the outer step to end"


def test_submitit_requeues_a_timed_out_job_which_continues_from_its_checkpoint(
    tmp_path: Path, reference: dict
) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "metagrad.train",
        "-m",
        "hydra/launcher=local",
        f"hydra.sweep.dir={sweep}",
        "hydra.launcher.timeout_min=10",
        *RUN,
        "seed=0",
    ]
    proc = _start(cmd, tmp_path)
    job = sweep / "0"
    deadline = time.monotonic() + 180
    while not ((job / "train.log").exists() and "outer step 3/" in (job / "train.log").read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.2)
    pid = json.loads((job / ".lock").read_text())["pid"]
    # What SLURM (and submitit's local executor) sends shortly before the time limit.
    subprocess.run(["kill", "-USR2", str(pid)], check=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    history = (job / ".hydra" / "resumes.yaml").read_text()
    assert "from_step" in history, "the requeued job did not resume"
    got = metrics(job)
    assert got["final"] == reference["final"]
    assert got["learned"] == reference["learned"]
