"""Fixed `learn` entries: per-layer, per-step and per-element values given, not learned.

A `learn` entry with `fixed: true` takes its values from `init` (a number, or a list with one
value per layer, step or element) and keeps them; a black-box sweep sets them one by one
(`learn.lr.init.3=...`). A run whose entries are all fixed learns nothing and evaluates once.
"""

from __future__ import annotations

import json

import pytest
import torch
from _train_utils import TINY, compose_cfg

from metagrad.app.errors import ConfigError
from metagrad.app.loop import StepOutcome, run_loop
from metagrad.train import build

SMALL = [*TINY, "dtype=float64", "learn=none", "inner_optim.lr=0.1", "inner_optim.momentum=0.5"]
LAYERS = ["0.weight", "0.bias", "2.weight", "2.bias"]  # the MLP 64-16-10's tensors, in order


def _job(*overrides: str):
    # An entry's own init replaces the inner optimizer's value (giving both is refused).
    given = {o.split("=")[0].removeprefix("+learn.") for o in overrides if o.startswith("+learn.")}
    base = [o for o in SMALL if o.split("=")[0].removeprefix("inner_optim.") not in given]
    return build(compose_cfg(*base, *overrides))[1]


def _list(values: list[float]) -> str:
    return "[" + ",".join(repr(v) for v in values) + "]"


def test_fixed_per_layer_values_equal_the_learned_entry_at_the_same_values() -> None:
    values = [0.05, 0.2, 0.1, 0.3]
    fixed = _job(f"+learn.lr={{scope: per_layer, fixed: true, init: {_list(values)}}}")
    learned = _job(f"+learn.lr={{scope: per_layer, init: {_list(values)}}}")
    assert fixed.learns_nothing and not list(fixed.meta.parameters())
    assert not learned.learns_nothing
    assert all(not p.requires_grad for p in fixed.fixed.parameters())
    got = fixed.fixed.value("lr")
    assert list(got) == LAYERS
    assert [float(got[n]) for n in LAYERS] == pytest.approx(values, rel=1e-12)
    a, b = fixed.evaluate(final=True), learned.evaluate(final=True)
    assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-10)
    # The values matter: another layer's rate changes the run.
    changed = [0.05, 0.2, 0.1, 0.01]
    other = _job(f"+learn.lr={{scope: per_layer, fixed: true, init: {_list(changed)}}}")
    assert abs(other.evaluate()["val/loss"] - a["val/loss"]) > 1e-4


def test_a_fixed_constant_schedule_is_the_plain_run_and_each_step_counts() -> None:
    plain = _job().evaluate(final=True)
    constant = _job(f"+learn.lr={{per_step: true, fixed: true, init: {_list([0.1] * 5)}}}")
    assert constant.evaluate(final=True)["val/loss"] == pytest.approx(plain["val/loss"], rel=1e-10)
    changed = _job(f"+learn.lr={{per_step: true, fixed: true, init: {_list([0.1] * 4 + [0.5])}}}")
    assert abs(changed.evaluate()["val/loss"] - plain["val/loss"]) > 1e-4


def test_per_element_values_follow_the_model_order_flattened() -> None:
    numel = [16 * 64, 16, 10 * 16, 10]
    values = [float(i + 1) * 1e-5 for i in range(sum(numel))]
    job = _job(f"+learn.weight_decay={{scope: per_element, fixed: true, init: {_list(values)}}}")
    got = job.fixed.value("weight_decay")
    start = 0
    for name, n in zip(LAYERS, numel, strict=True):
        expected = torch.tensor(values[start : start + n], dtype=torch.float64)
        assert torch.allclose(got[name].flatten(), expected, rtol=1e-12)
        start += n
    assert got["0.weight"].shape == (16, 64)


def test_fixed_values_stay_while_the_other_entries_learn(tmp_path) -> None:
    from metagrad.train import train

    wd = [1e-3, 2e-3, 3e-3, 4e-3]
    cfg = compose_cfg(
        *SMALL,
        "logger=none",
        "+learn.lr={init: 0.1}",
        f"+learn.weight_decay={{scope: per_layer, fixed: true, init: {_list(wd)}}}",
    )
    _, job = build(cfg)
    before = float(job.meta.value("lr").detach())
    result = train(cfg, run_dir=tmp_path / "run")
    assert result.steps == 4 and result.nonfinite_total == 0
    _, again = build(cfg)
    assert [float(v) for v in again.fixed.value("weight_decay").values()] == pytest.approx(wd)
    learned = json.loads((tmp_path / "run" / "metrics.json").read_text())["learned"]
    assert set(learned) == {"lr"} and learned["lr"] != pytest.approx(before, rel=1e-6)


def test_a_sweep_override_sets_one_listed_value() -> None:
    job = _job(
        "+learn.lr={scope: per_layer, fixed: true, init: [0.1, 0.1, 0.1, 0.1]}",
        "learn.lr.init.2=0.5",
    )
    assert [float(v) for v in job.fixed.value("lr").values()] == pytest.approx([0.1, 0.1, 0.5, 0.1])


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{scope: per_layer, fixed: true, init: [0.1, 0.2]}", r"one value per 4 parameter tensors"),
        ("{per_step: true, init: [0.1, 0.2]}", r"one value per 5 steps \(5 values\), got 2"),
        ("{fixed: true, init: [0.1, 0.2]}", r"give a number for a scalar entry"),
        ("{fixed: true, init: []}", r"learn.lr.init is an empty list"),
        ("{fixed: true, init: [0.1, abc]}", r"learn.lr.init.1"),
        ("{fixed: 3, init: 0.1}", r"learn.lr.fixed"),
    ],
)
def test_bad_lists_are_refused_naming_the_key(entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _job(f"+learn.lr={entry}")


class _CountingJob:
    """A job that counts its evaluations (for the loop's handling of outer_steps=0)."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def step(self, index: int) -> StepOutcome:
        return StepOutcome({"outer/loss": 1.0})

    def evaluate(self, final: bool = False) -> dict[str, float]:
        self.calls.append(final)
        return {"val/loss": 0.5, **({"test/loss": 0.6} if final else {})}

    def meta_scalars(self):
        return {}

    def meta_tensors(self):
        return {}

    def meta_schedules(self):
        return {}

    def state_dict(self):
        return {}


def test_a_run_with_nothing_to_learn_evaluates_once() -> None:
    job = _CountingJob()
    result = run_loop(job, outer_steps=0)
    assert job.calls == [True], "one final evaluation, no separate initial one"
    assert result.initial == {"val/loss": 0.5} and result.final["test/loss"] == 0.6
    job = _CountingJob()
    run_loop(job, outer_steps=2, val_every=5)
    assert job.calls == [False, False, True]
