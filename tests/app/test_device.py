"""Devices: `device=cpu` places everything on the CPU, CUDA is refused where there is none (and
used where there is), and checkpoints load onto any device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _train_utils import FEWSHOT, TINY, compose_cfg

from metagrad.app.errors import ConfigError
from metagrad.train import build, train


def test_cpu_places_models_meta_parameters_and_batches() -> None:
    _, job = build(compose_cfg(*TINY, "device=cpu"))
    assert all(p.device.type == "cpu" for p in job.meta.parameters())
    assert job.problem(0).batch(0)[0].device.type == "cpu"
    _, fewshot = build(compose_cfg(*FEWSHOT, "device=cpu"))
    assert all(p.device.type == "cpu" for p in fewshot.learner.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_refused_before_any_work(tmp_path: Path, device: str) -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        train(compose_cfg(*TINY, f"device={device}"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_and_resumes_on_the_cpu(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(compose_cfg(*TINY, "device=cuda", "logger=none"), run_dir=run)
    train(compose_cfg(*TINY, "outer_steps=6", "resume=true", "device=cpu"), run_dir=run)


def test_auto_is_cpu_here_or_cuda_there() -> None:
    _, job = build(compose_cfg(*TINY, "device=auto"))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(job.meta.parameters()).device.type == expected
