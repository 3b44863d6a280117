"""`loop=truncated`: online truncated training (TBPTT, ES, PES) from the app, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
from _train_utils import compose_cfg, metrics

from metagrad.train import build, train

SMALL = [
    "experiment=pes_digits",
    "model.hidden=[8]",
    "horizon=12",
    "truncation=4",
    "eval_horizon=12",
    "outer_steps=7",
    "val_every=7",
    "checkpoint_every=3",
    "truncated.particles=2",
    "logger=none",
]


@pytest.mark.parametrize("estimator", ["pes", "truncatedes", "tbptt"])
def test_each_estimator_runs_truncations_across_inner_runs(estimator: str) -> None:
    overrides = (
        [o for o in SMALL if not o.startswith("truncated.")] if estimator == "tbptt" else SMALL
    )
    _, job = build(compose_cfg(*overrides, f"truncated={estimator}"))
    seen = []
    for i in range(4):  # three truncations per run of 12 steps: the fourth starts a new run
        outcome = job.step(i)
        assert outcome.finite, outcome.reason
        seen.append((outcome.metrics["truncation/run"], outcome.metrics["truncation/start"]))
    assert seen == [(0.0, 0.0), (0.0, 4.0), (0.0, 8.0), (1.0, 0.0)]


def test_a_resumed_truncated_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(compose_cfg(*SMALL), run_dir=straight)
    part = tmp_path / "part"
    train(compose_cfg(*SMALL, "outer_steps=5"), run_dir=part)  # a checkpoint at step 5
    train(compose_cfg(*SMALL, "resume=true"), run_dir=part)
    assert metrics(part)["final"] == metrics(straight)["final"]
    assert metrics(part)["learned"] == metrics(straight)["learned"]
