"""The resource guard: before the first outer step the peak memory of one hypergradient is
estimated from short measured runs, scaled the way the estimator scales, and a run that would
not fit is refused with the estimate and the remedies."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from _train_utils import TINY, compose_cfg, run_train

from metagrad.app.errors import RunRefused
from metagrad.app.guard import estimate_hpo_memory
from metagrad.hypergrad.base import inner_steps, start
from metagrad.train import build, train


def test_a_huge_horizon_is_refused_quickly_with_the_estimate(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = run_train(tmp_path / "run", *TINY, "horizon=1000000000")
    assert proc.returncode == 2
    assert time.monotonic() - started < 120
    err = proc.stderr
    assert "one outer step would need about" in err and "GiB is available" in err
    assert "hypergrad=checkpointed" in err and "memory_guard=false" in err
    assert not (tmp_path / "run").exists()


def _measured(job, steps: int) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    problem = job.problem(0, horizon=steps)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run = inner_steps(problem, job.meta, start(problem, job.meta), range(steps))
        problem.outer_loss(run.params, job.meta, problem.outer_batch)
    return sum(seen.values())


def test_the_unrolled_estimate_matches_a_measured_long_run() -> None:
    _, job = build(compose_cfg(*TINY, "horizon=40"))
    estimate = estimate_hpo_memory(job)
    graph = _measured(job, 40)
    predicted_graph = estimate.total - estimate.per_step_data * 40
    assert abs(predicted_graph - graph) <= 0.1 * graph


def test_memory_lean_estimators_are_estimated_smaller() -> None:
    totals = {}
    for method in ("unrolled", "checkpointed", "truncated", "implicit"):
        extra = ["learn=l2"] if method == "implicit" else []
        _, job = build(compose_cfg(*TINY, "horizon=400", f"hypergrad={method}", *extra))
        e = estimate_hpo_memory(job)
        totals[method] = e.total - e.per_step_data * e.horizon  # the batches are the same
    assert totals["checkpointed"] < totals["unrolled"] / 5
    assert totals["truncated"] < totals["unrolled"] / 5
    assert totals["implicit"] < totals["unrolled"] / 5


def test_the_guard_can_be_overridden(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("metagrad.train.available_memory", lambda device: 1024)
    with pytest.raises(RunRefused, match="only 0.00 GiB is available"):
        train(compose_cfg(*TINY, "outer_steps=1", "logger=none"), run_dir=tmp_path / "a")
    train(
        compose_cfg(*TINY, "outer_steps=1", "logger=none", "memory_guard=false"),
        run_dir=tmp_path / "b",
    )
    assert (tmp_path / "b" / "metrics.json").is_file()
