"""Few-shot classification through the app: every learner on digits' N-way K-shot tasks with
the conv net, accuracy with a 95% interval; image-folder tasks; sinusoid regression."""

from __future__ import annotations

from pathlib import Path

import pytest
from _train_utils import FEWSHOT, compose_cfg, metrics
from PIL import Image

from metagrad.train import build, train

DIGITS = [
    "experiment=maml_digits",
    "outer_steps=2",
    "meta_batch=2",
    "eval_tasks=8",
    "val_every=2",
    "checkpoint_every=2",
    "model.hidden=8",
    "logger=none",
]
LEARNERS = ["maml", "fomaml", "metasgd", "anil", "mamlplusplus", "imaml", "reptile"]


@pytest.mark.parametrize("learner", LEARNERS)
def test_every_learner_classifies_digits_with_intervals(tmp_path: Path, learner: str) -> None:
    extra = ["learner.inner_steps=2"] if learner in ("mamlplusplus", "imaml", "reptile") else []
    result = train(compose_cfg(*DIGITS, f"learner={learner}", *extra), run_dir=tmp_path)
    final = result.final
    steps = [0, 1, 5]
    for s in steps:
        assert 0.0 <= final[f"test/accuracy_{s}"] <= 1.0
        assert 0.0 <= final[f"test/accuracy_{s}_ci95"] < 0.5
    assert any(final[f"test/accuracy_{s}_ci95"] > 0 for s in steps)
    assert result.initial["val/accuracy_0"] == pytest.approx(0.2, abs=0.15)  # 5-way chance


def test_maml_digits_learns_above_chance(tmp_path: Path) -> None:
    cfg = compose_cfg(
        *DIGITS, "outer_steps=60", "meta_batch=4", "eval_tasks=60", "model.hidden=16",
        "learner.inner_steps=1", "learner.inner_lr=0.4",
    )  # fmt: skip
    final = train(cfg, run_dir=tmp_path).final
    # Trained for one inner step: after one step it beats 5-way chance (0.2) clearly.
    assert final["test/accuracy_1"] > final["test/accuracy_0"] + 0.1, final


def _image_tree(root: Path) -> None:
    for split, classes in (("train", 6), ("test", 4)):
        for c in range(classes):
            for i in range(3):
                folder = root / split / f"c{c}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.new("L", (12, 12), 20 * c + i).save(folder / f"{i}.png")


def test_image_folder_task_runs_with_the_conv_net(tmp_path: Path) -> None:
    _image_tree(tmp_path / "data")
    cfg = compose_cfg(
        *DIGITS,
        "task=image_folder",
        f"task.root={tmp_path / 'data'}",
        "task.ways=3",
        "task.shots=1",
        "task.query=2",
        "task.image_size=8",
    )
    result = train(cfg, run_dir=tmp_path / "run")
    assert 0.0 <= result.final["test/accuracy_1"] <= 1.0
    assert metrics(tmp_path / "run")["outer_steps"] == 2


def test_sinusoid_regression_reports_losses_and_no_accuracy() -> None:
    _, job = build(compose_cfg(*FEWSHOT))
    out = job.evaluate()
    assert set(out) == {"val/loss_0", "val/loss_1", "val/loss_10"}
    assert job.step(0).finite
