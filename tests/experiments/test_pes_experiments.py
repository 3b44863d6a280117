"""The online truncated-training experiments run in quick mode and their checks hold.

`experiments/pes_unbiased`, `experiments/influence_balancing` and `experiments/pes_lr_digits`
each have a `--quick` mode (seconds): it must write results.json and the plot, and every check
the script states (PES matches the exact gradient, TBPTT moves the wrong way, ...) must pass.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    path = ROOT / "experiments" / name / "run.py"
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["pes_unbiased", "influence_balancing", "pes_lr_digits"])
def test_experiments_run_in_quick_mode(name, tmp_path):
    threads = torch.get_num_threads()
    try:
        results = _load(name).main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the scripts run on one thread
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["quick"] is True
    assert (tmp_path / f"{name}.png").is_file()
    assert results["checks"] == saved["checks"]
    assert saved["checks"] and all(saved["checks"].values()), saved["checks"]
