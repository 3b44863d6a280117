"""A refused run changes nothing: every refusal happens before anything is written, so the
folder's files stay byte-identical (and a new folder is not left behind)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _train_utils import TINY, run_train, snapshot

RUN = [*TINY, "outer_steps=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("refusals") / "run"
    proc = run_train(run, *RUN)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


@pytest.mark.parametrize(
    "overrides, message",
    [
        (RUN, "already holds a checkpoint"),
        (["resume=true", "inner_optim.weight_decay=0.5"], "weight_decay=0.5 (the run used 0.0)"),
        (["resume=true", "experiment=maml_sine"], "experiment=maml_sine"),
        (["resume=true", "learn=lr"], "learn=lr (the run used learn=lr_momentum_per_layer)"),
        (["resume=true", "outer_steps=1"], "below the 2 outer steps"),
        (["resume=true", "outer_steps=4", "val_every=0"], "val_every: Invalid val_every"),
        (["resume=true", "device=cuda:7"], "device"),
    ],
    ids=[
        "new-run",
        "changed-value",
        "experiment",
        "group-choice",
        "fewer-steps",
        "bad-value",
        "device",
    ],
)
def test_refusals_leave_the_folder_byte_identical(finished: Path, overrides, message) -> None:
    before = snapshot(finished)
    proc = run_train(finished, *overrides)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(finished) == before


def test_a_refused_new_run_leaves_no_folder(tmp_path: Path) -> None:
    run = tmp_path / "new"
    proc = run_train(run, *RUN, "inner_optim.lr=-1")
    assert proc.returncode == 2
    assert not run.exists()


def test_a_resumed_run_keeps_its_records_and_appends_a_history(
    finished: Path, tmp_path: Path
) -> None:
    import shutil

    import yaml

    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    config = (run / ".hydra" / "config.yaml").read_text()
    proc = run_train(run, "resume=true", "outer_steps=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / ".hydra" / "overrides.yaml").read_text() == overrides
    assert (run / ".hydra" / "config.yaml").read_text() == config
    history = yaml.safe_load((run / ".hydra" / "resumes.yaml").read_text())
    assert history[-1]["from_step"] == 2
    assert history[-1]["overrides"][-2:] == ["resume=true", "outer_steps=3"]
