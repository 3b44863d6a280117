"""A run folder is data, never code: crafted, foreign or damaged checkpoints are refused with
one clear line, touch nothing, and no code they name is run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _train_utils import TINY, compose_cfg, run_train, snapshot

from metagrad.app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metagrad.app.errors import RunRefused
from metagrad.train import train

RUN = [*TINY, "outer_steps=2", "logger=none"]


@pytest.fixture
def finished(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    train(compose_cfg(*RUN), run_dir=run)
    return run


def _rewrite(run: Path, change) -> None:
    path = run / "checkpoint.pt"
    data = torch.load(path, weights_only=True)
    data.pop("format")
    change(data)
    save_checkpoint(path, data)


def test_a_checkpoint_naming_foreign_code_is_refused_and_the_code_never_runs(
    finished: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    crafted = f"""
model:
  _target_: builtins.open
  file: {victim}
  mode: w
"""

    def craft(data):
        data["config"] = data["config"].replace(
            "model:\n  _target_: metagrad.models.mlp", crafted.strip().replace("\n", "\n", 1)
        )
        assert "builtins.open" in data["config"]

    _rewrite(finished, craft)
    before = snapshot(finished)
    proc = run_train(finished, "resume=true", "outer_steps=3")
    assert proc.returncode == 2
    assert "builtins.open" in proc.stderr and "trusted_targets" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert victim.read_text() == "precious"
    assert snapshot(finished) == before


def test_own_code_resumes_once_trusted(tmp_path: Path) -> None:
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "import torch\n"
        "def tiny(in_features, out_features):\n"
        "    return torch.nn.Linear(in_features, out_features)\n"
    )
    user = {"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    run = tmp_path / "run"
    proc = run_train(run, *RUN, "model._target_=userpkg.nets.tiny", extra_env=user)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = snapshot(run)
    proc = run_train(run, "resume=true", "outer_steps=3", extra_env=user)
    assert proc.returncode == 2
    assert "trusted_targets=[userpkg.nets]" in proc.stderr
    assert snapshot(run) == before
    proc = run_train(
        run, "resume=true", "outer_steps=3", "trusted_targets=[userpkg]", extra_env=user
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_checkpoint(run / "checkpoint.pt")["loop"]["step"] == 3


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(p.read_bytes()[:200]), "not a readable metagrad checkpoint"),
        (lambda p: p.write_bytes(b"\x00garbage" * 50), "not a readable metagrad checkpoint"),
        (lambda p: torch.save({"x": _Evil()}, p), "not a readable metagrad checkpoint"),
        (lambda p: torch.save({"format": "other"}, p), "format 'other'"),
    ],
    ids=["empty", "truncated", "garbage", "pickled-object", "foreign-format"],
)
def test_damaged_checkpoints_are_refused_with_one_line(finished: Path, damage, message) -> None:
    damage(finished / "checkpoint.pt")
    before = snapshot(finished)
    proc = run_train(finished, "resume=true", "outer_steps=3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr
    assert "code ran" not in proc.stdout
    assert snapshot(finished) == before


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["loop"].update(step=-1), "loop counter 'step' is -1"),
        (lambda d: d.update(torch_rng=torch.zeros(3)), "random-number state"),
        (lambda d: d.update(config="[1, 2"), "cannot read"),
        (lambda d: d.update(config=d["config"].replace("horizon: 5", "horizon: -5")), "horizon"),
        (lambda d: d["job"]["module"].update({"lr": torch.zeros(7)}), "does not match the run"),
    ],
    ids=["negative-step", "rng", "config-syntax", "config-range", "tensor-shape"],
)
def test_everything_read_from_disk_is_validated(finished: Path, change, message) -> None:
    _rewrite(finished, change)
    before = snapshot(finished)
    with pytest.raises(RunRefused, match=message):
        train(compose_cfg(*RUN, "resume=true", "outer_steps=3"), run_dir=finished)
    assert snapshot(finished) == before


def test_load_checkpoint_reads_data_only(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable metagrad checkpoint"):
        load_checkpoint(path)
