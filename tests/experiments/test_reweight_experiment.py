"""The reweighting experiment (`experiments/reweight_digits`): its data, its runs, its quick mode.

The quick mode runs every method of the table for a few steps and must write
its results and plots; single runs must return finite weights in range, and the data must be
corrupted as documented.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "experiments" / "reweight_digits"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"reweight_digits_{name}", FOLDER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


reweight = load("reweight")
experiment = load("run")


def test_quick_mode_writes_results_and_plots(tmp_path):
    threads = torch.get_num_threads()
    try:
        experiment.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the script runs on one thread
    for name in ("results.json", "results.md", "weights_flip.png", "weights_imbalance.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert (tmp_path / "mwn_functions.png").stat().st_size > 1000

    results = json.loads((tmp_path / "results.json").read_text())
    rows = experiment.ROWS
    for setting in ("flip", "imbalance"):
        entries = results["settings"][setting]
        assert set(entries) == {f"{m}/{e}" for _, m, e in rows}
        for key, entry in entries.items():
            (metrics,) = entry["per_seed"]  # one seed in quick mode
            assert 0.0 <= metrics["test/accuracy"] <= 1.0, key
            assert math.isfinite(metrics["val/loss"]) and metrics["seconds"] >= 0, key
    flip = results["settings"]["flip"]
    # FirstOrder sees no data weights: its weights stay uniform, its model is plain training.
    first_order = flip["weights/first_order"]["per_seed"][0]
    assert first_order["weights/mean_corrupted"] == pytest.approx(1.0)
    assert first_order["test/accuracy"] == flip["plain/unrolled"]["per_seed"][0]["test/accuracy"]
    assert "| per-example, Unrolled |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("method", ["weights", "mwn", "weights_online", "mwn_online", "l2rw"])
def test_learned_weights_are_finite_in_range_and_find_flipped_labels(method):
    seen = []
    result = reweight.run(
        method,
        outer_steps=3,
        inner_steps=8,
        on_step=lambda step, metrics, w: seen.append((step, metrics["outer/loss"], w)),
    )
    w, n = result.weights, len(result.labels)
    assert w.shape == (n,) and bool(torch.isfinite(w).all())
    assert bool((w >= 0).all()) and float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    assert len(seen) == (3 if method in ("weights", "mwn") else 8)
    assert all(math.isfinite(loss) and v.shape == (n,) for _, loss, v in seen)
    # Even a few steps give flipped labels lower weights than clean ones.
    assert result.metrics["weights/mean_corrupted"] < result.metrics["weights/mean_clean"]
    assert result.metrics["weights/auc_corrupted"] > 0.7
    if method in ("mwn", "mwn_online"):
        grid, values = result.weight_fn
        assert bool(((values > 0) & (values < 1)).all())  # a sigmoid's output
    else:
        assert result.weight_fn is None


def test_flip_corrupts_exactly_the_rate_and_keeps_clean_splits():
    data = reweight.make_data("flip", rate=0.4, seed=3)
    n = len(data.y_train)
    assert int(data.corrupted.sum()) == round(0.4 * n)
    assert bool((data.y_train[data.corrupted] != data.y_true[data.corrupted]).all())
    assert torch.equal(data.y_train[~data.corrupted], data.y_true[~data.corrupted])
    assert torch.bincount(data.y_val, minlength=10).tolist() == [10] * 10
    assert torch.bincount(data.y_test, minlength=10).tolist() == [50] * 10
    assert n + len(data.y_val) + len(data.y_test) == 1797  # every digit used once
    again = reweight.make_data("flip", rate=0.4, seed=3)
    assert torch.equal(again.y_train, data.y_train)  # seeded


def test_imbalance_is_long_tailed_at_the_ratio():
    data = reweight.make_data("imbalance", imbalance=100.0, seed=1)
    counts = sorted(data.class_counts(), reverse=True)
    assert counts[0] >= 100 and counts[-1] == 1  # about 117 : 1 after rounding
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert not bool(data.corrupted.any())
    assert torch.equal(data.y_train, data.y_true)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "reweight"}, "Invalid method"),
        ({"method": "weights", "estimator": "exact"}, "Invalid estimator"),
        ({"method": "l2rw", "estimator": "implicit"}, "online methods take"),
        ({"method": "weights", "outer_steps": 0}, "Invalid outer_steps"),
        ({"method": "plain", "noise": "blur"}, "Invalid noise"),
        ({"method": "plain", "rate": 1.0}, "Invalid rate"),
        ({"method": "plain", "noise": "imbalance", "imbalance": 0.5}, "Invalid imbalance"),
        ({"method": "plain", "val_per_class": 0}, "Invalid val_per_class"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reweight.run(**kwargs)
