"""The few-shot digits experiment (`experiments/maml_digits`): its quick mode runs every learner
through the app and both baselines on the same test tasks, and every full-run command is a
valid app configuration."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from metagrad.train import build

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "maml_digits" / "run.py"


def _load():
    spec = importlib.util.spec_from_file_location("experiment_maml_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


experiment = _load()


def test_quick_mode_runs_every_learner_and_the_baselines(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        results = experiment.main(
            ["--quick", "--shots", "1", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
        )
    finally:
        torch.set_num_threads(threads)  # the script runs on one thread
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["quick"] is True and saved == json.loads(json.dumps(results))
    entry = saved["shots"]["1"]
    assert list(entry["runs"]) == list(experiment.LEARNERS)
    for name, run in entry["runs"].items():
        assert set(run["accuracy"]) == {"0", "1", "5"}, name
        for mean, ci in run["accuracy"].values():
            assert 0.0 <= mean <= 1.0 and 0.0 <= ci < 0.5, name
        assert run["command"].startswith(
            f"python -m metagrad.train experiment=maml_digits learner={name} task.shots=1"
        )
        # What the app wrote is what the table reports.
        metrics = json.loads((Path(run["run_dir"]) / "metrics.json").read_text())
        assert metrics["final"]["test/accuracy_5"] == run["accuracy"]["5"][0]
        assert run["cpu_seconds"] > 0
    # The nearest class mean in pixel space needs no training and is far above chance.
    assert entry["pixel_prototypes"]["accuracy"]["-"][0] > 0.5
    # The pretrained net's new head starts at zero: every query gets the same class.
    base = entry["pretrained"]
    assert base["accuracy"]["0"] == [pytest.approx(0.2), 0.0]
    assert set(base["accuracy"]) == {"0", "1", "5", "25"}
    assert base["finetune_lr"] in experiment.FINETUNE_LRS
    assert "| MAML |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


@pytest.mark.parametrize("shots", [1, 5])
def test_every_full_run_command_is_a_valid_config(shots: int) -> None:
    for name in experiment.LEARNERS:
        overrides = experiment.app_overrides(name, shots, quick=False)
        cfg, job = build(experiment.compose([*overrides, "logger=none"]))
        assert cfg.task.shots == shots and cfg.eval_tasks == 600
        assert list(cfg.eval_inner_steps) == [0, 1, 5]
        assert type(job.learner).__name__.lower() == name.replace("fomaml", "maml"), name
