"""A full disk while writing a checkpoint: the last good checkpoint survives, the run stops with
a message that says so, and the run resumes from it once there is space."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from _train_utils import TINY, compose_cfg, metrics

import metagrad.app.checkpoint as checkpoint_module
from metagrad.app.checkpoint import CheckpointError, load_checkpoint
from metagrad.train import train

RUN = [*TINY, "outer_steps=6", "checkpoint_every=2", "logger=none"]


def test_disk_full_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    real = torch.save
    calls = {"n": 0}

    def fills_up(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", fills_up)
    run = tmp_path / "run"
    with pytest.raises(
        CheckpointError, match="the disk is full; the last good checkpoint .* is unchanged"
    ):
        train(compose_cfg(*RUN), run_dir=run)
    assert load_checkpoint(run / "checkpoint.pt")["loop"]["step"] == 2
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    assert not (run / ".lock").exists()

    monkeypatch.setattr(checkpoint_module.torch, "save", real)
    train(compose_cfg(*RUN, "resume=true"), run_dir=run)
    straight = tmp_path / "straight"
    train(compose_cfg(*RUN), run_dir=straight)
    assert metrics(run)["final"] == metrics(straight)["final"]


def test_the_command_line_reports_it_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import sys

    from metagrad import train as train_module

    def full(path, payload):
        raise CheckpointError(
            f"could not write the checkpoint {path}: the disk is full; no checkpoint was "
            "written before"
        )

    monkeypatch.setattr("metagrad.app.loop.save_checkpoint", full)
    monkeypatch.setattr(sys, "argv", ["metagrad.train", f"hydra.run.dir={tmp_path / 'run'}", *RUN])
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Error: could not write the checkpoint" in err and "Traceback" not in err
