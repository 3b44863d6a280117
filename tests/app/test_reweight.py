"""Learning to reweight training data through the app (`experiment=reweight_digits`): learned
per-example weights or a Meta-Weight-Net in the inner loss of loop=hpo, on digits with flipped
labels or long-tailed classes; the weights of corrupted and clean examples in TensorBoard and
metrics.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _train_utils import compose_cfg, metrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metagrad.app.errors import ConfigError
from metagrad.hypergrad import Unrolled
from metagrad.train import build, train

# The preset, shortened: 3 outer steps of 30-step inner runs (the full preset runs 20 of 100).
QUICK = [
    "experiment=reweight_digits",
    "outer_steps=3",
    "horizon=30",
    "val_every=3",
    "checkpoint_every=3",
    "threads=1",
]


@pytest.mark.parametrize(
    "learn",
    [["learn=weight_net"], ["learn=example_weights", "outer_optim.lr=0.1"]],
    ids=["weight_net", "example_weights"],
)
def test_preset_lowers_the_weights_of_flipped_labels(tmp_path: Path, learn: list[str]) -> None:
    result = train(compose_cfg(*QUICK, *learn), run_dir=tmp_path)
    m = metrics(tmp_path)
    learned = m["learned"]
    # 40% of the 1197 training labels are flipped; weights are scaled to mean 1.
    assert m["learned_tensors"]["weights/corrupted"]["numel"] == 479
    assert m["learned_tensors"]["weights/clean"]["numel"] == 718
    mean = (479 * learned["weights/mean_corrupted"] + 718 * learned["weights/mean_clean"]) / 1197
    assert mean == pytest.approx(1.0, rel=1e-4)
    # Three outer steps already push the flipped labels' weights well below the clean ones'.
    assert learned["weights/mean_corrupted"] < 0.9 * learned["weights/mean_clean"], learned
    assert 0.0 <= result.final["test/accuracy"] <= 1.0

    ea = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"weights/corrupted", "weights/clean"} <= set(tags["histograms"])
    corrupted = ea.Scalars("weights/mean_corrupted")
    clean = ea.Scalars("weights/mean_clean")
    assert [e.step for e in corrupted] == [0, 1, 2, 3]
    # Before the first outer step every example weighs (about) the same.
    assert corrupted[0].value == pytest.approx(clean[0].value, rel=0.1)
    assert corrupted[-1].value < corrupted[0].value
    assert corrupted[-1].value == pytest.approx(learned["weights/mean_corrupted"], rel=1e-5)


def test_imbalance_override_compares_rare_and_frequent_classes(tmp_path: Path) -> None:
    cfg = compose_cfg(*QUICK, "task.noise=imbalance", "outer_steps=1", "logger=none")
    train(cfg, run_dir=tmp_path)
    m = metrics(tmp_path)
    assert set(m["learned"]) == {"weights/mean_tail", "weights/mean_head"}
    assert m["learned_tensors"]["weights/tail"]["numel"] < 50  # the five rarest classes
    assert m["learned_tensors"]["weights/head"]["numel"] > 200


def test_example_weight_hypergradient_matches_finite_differences() -> None:
    """The app's weighted inner loss, differentiated by Unrolled, against central differences
    of the validation loss in three example weights (float64, a short full-batch run)."""
    _, job = build(
        compose_cfg(
            *QUICK,
            "learn=example_weights",
            "dtype=float64",
            "horizon=5",
            "task.batch_size=40",
            "logger=none",
        )
    )
    problem = job.problem(0)
    result = Unrolled()(problem, job.meta)
    raw = job.meta.example_weights.raw
    used = problem.batch(0)[2][:3]  # examples the first inner batch uses
    grads = result.grads["example_weights.raw"][used]
    assert bool((grads != 0).any())
    eps = 1e-5
    for i, g in zip(used.tolist(), grads.tolist(), strict=True):
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                raw[i] += sign * eps
            values.append(float(Unrolled()(job.problem(0), job.meta).outer_loss))
            with torch.no_grad():
                raw[i] -= sign * eps
        assert g == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-4, abs=1e-10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+learn.weight_net.init=0.5"],
            "learn.weight_net has unknown keys ['init']",
        ),
        (
            ["+learn.example_weights={init:1.0}"],
            "learn.example_weights: one data weighting at a time",
        ),
        (
            ["learn=example_weights", "learn.example_weights.constraint=none"],
            "learn.example_weights.normalize: free weights",
        ),
        (["learn.weight_net.normalize=sum"], "learn.weight_net.normalize: Invalid"),
        (["task.rate=1.0"], "task.rate: Invalid rate: 1.0"),
    ],
)
def test_bad_weighting_settings_are_refused_by_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(compose_cfg(*QUICK, *overrides, "logger=none"))
    assert message in str(info.value)


def test_example_weights_need_an_indexed_task() -> None:
    with pytest.raises(ConfigError) as info:
        build(compose_cfg("learn=example_weights", "model.hidden=[8]", "logger=none"))
    assert "learn.example_weights: per-example weights look up the indices" in str(info.value)
    assert "task.indexed=true" in str(info.value)


def test_indexed_digits_take_example_weights(tmp_path: Path) -> None:
    cfg = compose_cfg(
        "task=digits",
        "task.indexed=true",
        "task.batch_size=32",
        "model.hidden=[8]",
        "learn=example_weights",
        "horizon=4",
        "outer_steps=2",
        "val_every=2",
        "checkpoint_every=2",
        "logger=none",
    )
    train(cfg, run_dir=tmp_path)
    # No groups to compare: all training examples' weights, moved off 1 by two steps.
    summary = metrics(tmp_path)["learned_tensors"]["weights/all"]
    assert summary["numel"] == 1797 - 800 and summary["max"] > summary["min"]
