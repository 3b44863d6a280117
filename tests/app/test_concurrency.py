"""One writer per run folder: a second run is refused naming the holder, a killed run's lock
is taken over, and temporary checkpoint files are unique per writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _train_utils import TINY, env, metrics, run_train, snapshot, train_cmd

from metagrad.app.checkpoint import save_checkpoint
from metagrad.app.errors import RunRefused
from metagrad.app.runfolder import LOCK_NAME, RunFolder

LONG = [*TINY, "outer_steps=400", "val_every=1", "checkpoint_every=1000", "logger=none"]


def _start(run: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        train_cmd(run, *overrides),
        cwd=run.parent,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if text in line:
            return
        if not line and proc.poll() is not None:
            break
    pytest.fail(f"never saw {text!r}: {''.join(seen)[-2000:]}")


def test_a_second_run_in_a_busy_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _start(run, *LONG)
    try:
        _wait_for(first, "outer step 1/")
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid
        # The first run keeps appending to its log; everything else must stay as it is.
        before = {k: v for k, v in snapshot(run).items() if k != "train.log"}
        second = run_train(run, *TINY, "resume=true")
        assert second.returncode == 2
        assert f"in use by process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        after = {k: v for k, v in snapshot(run).items() if k != "train.log"}
        assert after == before, "the refused run changed the folder"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        first.stdout.close()


def test_a_killed_runs_lock_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _start(run, *TINY, "outer_steps=400", "val_every=1", "checkpoint_every=1")
    _wait_for(first, "outer step 2/")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    first.stdout.close()
    assert (run / LOCK_NAME).exists(), "a killed process leaves its lock file"
    proc = run_train(run, "resume=true", "outer_steps=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert metrics(run)["outer_steps"] == 4
    assert not (run / LOCK_NAME).exists()


def test_locking_in_process(tmp_path: Path) -> None:
    a = RunFolder(tmp_path / "run")
    a.lock()
    b = RunFolder(tmp_path / "run")
    with pytest.raises(RunRefused, match=f"in use by process {os.getpid()}"):
        b.lock()
    a.release()
    b.lock()
    b.release()


def test_temporary_checkpoint_files_are_unique_per_writer(tmp_path: Path, monkeypatch) -> None:
    names: list[str] = []
    real = torch.save

    def spy(obj, f, *args, **kwargs):
        names.append(Path(f.name).name)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spy)
    save_checkpoint(tmp_path / "checkpoint.pt", {"x": 1})
    save_checkpoint(tmp_path / "checkpoint.pt", {"x": 2})
    assert len(set(names)) == 2 and all(str(os.getpid()) in n for n in names)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
