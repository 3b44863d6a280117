"""The black-box-vs-gradient experiment runs in quick mode and writes its outputs.

`experiments/blackbox_vs_gradient/run.py --quick` runs every side on the per-element case of a
tiny MLP: a Hydra Optuna sweep with TPE and with random search over `learn` entries fixed value
by value, a `loop=hpo` run learning the same entries, and TPE in this process, each until its
CPU budget is spent. It needs Hydra's Optuna sweeper plugin (the `dev` extra installs it).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip(
    "hydra_plugins.hydra_optuna_sweeper", reason="needs hydra-optuna-sweeper (the dev extra)"
)
pytest.importorskip("optuna")


def _load():
    path = ROOT / "experiments" / "blackbox_vs_gradient" / "run.py"
    spec = importlib.util.spec_from_file_location("experiment_blackbox_vs_gradient", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_mode_writes_results_plot_and_presets(tmp_path: Path) -> None:
    run = _load()
    threads = torch.get_num_threads()
    try:
        summary = run.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["quick"] is True
    assert (tmp_path / "blackbox_vs_gradient.png").stat().st_size > 10_000
    budget = saved["settings"]["budget_cpu_s"]
    (key,) = saved["runs"]
    assert saved["settings"]["cases"][key]["values"] == 64 * 4 + 4 + 4 * 10 + 10
    preset = (tmp_path / "configs" / "experiment" / f"bb_{key}.yaml").read_text()
    assert "learn.weight_decay.init.309: tag(log, interval(1e-06, 0.1))\n" in preset
    runs = saved["runs"][key]
    assert set(runs) == {"gradient", "tpe", "random", "tpe_inprocess"}
    for arm, seeds in runs.items():
        (one,) = seeds
        points = one["points"]
        assert points, arm
        # Every side was held to the budget: it stopped at the first record past it.
        assert one["cpu_total"] >= budget, arm
        assert sum(p["cpu"] > budget for p in points) <= 1, arm
        stamps = [p["cpu"] for p in points]
        assert stamps == sorted(stamps), arm
    # The sweeps' trials each trained and evaluated a configuration of their own.
    assert len({p["val_loss"] for p in runs["random"][0]["points"]}) == len(
        runs["random"][0]["points"]
    )
    # The gradient side's configuration, fixed and evaluated again, gives its reported loss;
    # every chosen configuration read back (from a sweep's overrides, a replayed in-process
    # search) gives the loss its arm recorded.
    assert saved["checks"] and all(saved["checks"].values()), saved["checks"]
    # The chosen configurations were retrained from fresh seeds.
    for arm in ("gradient", "tpe_inprocess"):
        held = runs[arm][0]["heldout"]
        assert held["seeds"] == list(run.FRESH_SEEDS)
        assert 0.0 <= held["test_accuracy"] <= 1.0 and held["test_loss"] > 0
    assert summary["table"][key]["gradient"]["val_loss"]["mean"] > 0
