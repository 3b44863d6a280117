"""Complete validation before any work: every number finite and in range (the outer
optimizer's too), unknown keys refused, options that do not fit the loop refused with the fix
named, and user-caused failures reported in one line naming the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _train_utils import FEWSHOT, TINY, compose_cfg, run_train

import metagrad
from metagrad.app.errors import ConfigError
from metagrad.optim import SGD
from metagrad.train import build

CASES = [
    # (overrides, message): a value the run would otherwise choke on later. TINY runs first.
    (["learn=none", "inner_optim.lr=inf"], "inner_optim.lr: inf is not a finite number"),
    (["inner_optim.weight_decay=inf"], "inner_optim.weight_decay: inf is not a finite number"),
    (["outer_optim.lr=nan"], "outer_optim.lr: nan is not a finite number"),
    (["outer_optim.betas=[1.5,0.999]"], "outer_optim: Invalid beta parameter at index 0: 1.5"),
    (["outer_optim.weight_decay=-1"], "outer_optim: Invalid weight_decay value: -1.0"),
    (["loop=fewshot"], "task: loop=fewshot needs an episodic task"),
    (["loop=online"], "online_optim: loop=online needs a torch.optim-style optimizer"),
    (["learn.lr.scope=layer"], "learn.lr.scope: Invalid learn.lr.scope: 'layer'"),
    (["learn.lr.init=-0.1"], "learn.lr.init: Initial value of meta-parameter 'lr' must be > 0"),
    (["+learn.betas={init:0.9}"], "has no learnable hyperparameter 'betas'"),
    (["+learn.lr.scop=per_layer"], "learn.lr has unknown keys ['scop']"),
    (["outer_steps=-1"], "outer_steps: Invalid outer_steps: -1"),
    (["task.batch_size=0"], "task.batch_size: Invalid batch_size: 0"),
    (["device=cuda"], "device: cuda was asked for, but this machine has no CUDA device"),
    (["device=tpu"], "device: Invalid device: 'tpu'"),
    (["dtype=float16"], "dtype: Invalid dtype: 'float16'"),
    (["loss=hinge"], "loss: unknown loss 'hinge'"),
    (["+model.depth=3"], "model: mlp() got an unexpected keyword argument 'depth'"),
    (["+inner_optim.lrr=0.1"], "inner_optim: SGD.__init__() got an unexpected keyword argument"),
]
# Cases that do not start from TINY (its digits settings do not fit them).
ALONE = [
    (["task=sinusoid"], "task: loop=hpo trains on a supervised task"),
    (
        ["loop=fewshot", "task=sinusoid"],
        "learner: loop=fewshot needs a learner (e.g. learner=maml)",
    ),
    ([*FEWSHOT, "learner.inner_lr=0"], "learner.inner_lr: Invalid inner_lr: 0.0"),
    ([*FEWSHOT, "learner=imaml", "learner.solver=lu"], "learner.solver: Invalid solver: 'lu'"),
    ([*FEWSHOT, "learner=reptile", "+learner.first_order=true"], "Reptile takes no first_order"),
]


ALL = [(TINY + o, m) for o, m in CASES] + ALONE


@pytest.mark.parametrize("overrides, message", ALL, ids=[" ".join(c[0][-2:])[-40:] for c in ALL])
def test_bad_values_are_refused_before_any_work_naming_the_key(overrides, message) -> None:
    if torch.cuda.is_available() and "device=cuda" in overrides:
        return  # this machine has CUDA: the value is valid here
    with pytest.raises(ConfigError) as info:
        build(compose_cfg(*overrides))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("+inner_optim.lrr=0.1", "inner_optim: SGD.__init__() got an unexpected keyword"),
        ("horizon=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ],
    ids=["unknown-key", "wrong-type"],
)
def test_unknown_keys_and_wrong_types_stop_before_a_folder_exists(
    tmp_path: Path, override, message
) -> None:
    proc = run_train(tmp_path / "run", *TINY, override)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_uncreatable_run_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_train(blocker / "run", *TINY, cwd=tmp_path)
    assert proc.returncode == 2
    assert "cannot create the run folder" in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_data_file_names_the_fix(monkeypatch) -> None:
    import sklearn.datasets

    def missing(*args, **kwargs):
        raise FileNotFoundError("[Errno 2] No such file or directory: '.../digits.csv.gz'")

    monkeypatch.setattr(sklearn.datasets, "load_digits", missing)
    with pytest.raises(ConfigError, match=r"digits.csv.gz.*reinstall scikit-learn"):
        build(compose_cfg(*TINY))


# The library refuses what the app refuses, naming the argument.
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SGD(lr=float("inf")), "Invalid lr: inf"),
        (lambda: SGD(lr=torch.tensor(float("nan"))), "Invalid lr"),
        (lambda: SGD(weight_decay=float("inf")), "Invalid weight_decay: inf"),
        (lambda: metagrad.MetaParameters().add("x", 1.0, constraint=(0.0, float("inf"))), "finite"),
        (lambda: metagrad.MetaParameters().add("x", "a"), "Invalid init for meta-parameter 'x'"),
        (lambda: metagrad.MetaParameters().add("x", True), "Invalid init for meta-parameter 'x'"),
        (
            lambda: SGD(lr=0.1).step(
                {"w": torch.zeros(2)}, {"w": None}, SGD().init({"w": torch.zeros(2)})
            ),
            "grad for parameter 'w' must be a tensor, got NoneType (use torch.zeros_like",
        ),
    ],
    ids=[
        "sgd-inf",
        "sgd-nan-tensor",
        "wd-inf",
        "infinite-bound",
        "string-init",
        "bool-init",
        "none-grad",
    ],
)
def test_the_library_refuses_the_same_values(make, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make()
