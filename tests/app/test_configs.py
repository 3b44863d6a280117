"""Config options come from the library's signatures: every public class is an option that
composes and builds, YAML options state only what differs, and --help lists what users pick."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_utils import FEWSHOT, ONLINE, TINY, compose_cfg, env
from hydra.utils import instantiate
from omegaconf import OmegaConf

import metagrad.hypergrad
import metagrad.learners
import metagrad.optim
from metagrad.app.configs import GROUPS, options, schema_for
from metagrad.app.errors import ConfigError
from metagrad.train import build, config_dir

CONFIGS = config_dir()


def _all_options(group: str) -> list[str]:
    yaml = (
        {p.stem for p in (CONFIGS / group).glob("*.yaml")} if (CONFIGS / group).is_dir() else set()
    )
    return sorted(set(options(group)) | yaml) if group in GROUPS else sorted(yaml)


def _public(module, base) -> set[type]:
    return {
        getattr(module, n)
        for n in module.__all__
        if inspect.isclass(getattr(module, n))
        and issubclass(getattr(module, n), base)
        and getattr(module, n) is not base
    }


@pytest.mark.parametrize(
    "module, base, group",
    [
        (metagrad.optim, metagrad.optim.Optimizer, "inner_optim"),
        (metagrad.hypergrad, metagrad.hypergrad.Estimator, "hypergrad"),
        (metagrad.learners, metagrad.learners.MetaLearner, "learner"),
    ],
    ids=["optim", "hypergrad", "learners"],
)
def test_every_public_class_is_an_option_with_its_full_signature(module, base, group) -> None:
    offered = {target for _, target in options(group).values()}
    assert _public(module, base) <= offered, _public(module, base) - offered
    for name, (path, target) in options(group).items():
        cfg = compose_cfg(f"{group}={name}")
        node = OmegaConf.to_container(cfg[group])
        assert node["_target_"] == path
        # The defaults are the library's, taken from its signature.
        for arg, p in inspect.signature(target).parameters.items():
            if arg in node and p.default is not inspect.Parameter.empty:
                default = list(p.default) if isinstance(p.default, tuple) else p.default
                assert node[arg] == default, (name, arg)


DIGITS_FEWSHOT = ["experiment=maml_digits", "meta_batch=2", "eval_tasks=6"]

# What each option needs from the other groups to form a run.
NEEDS = {
    "learner": FEWSHOT,
    "online_optim": ONLINE,
    ("task", "sinusoid"): FEWSHOT,
    ("online_optim", "hyperoptimizer"): ["loop=online", "outer_steps=2", "model.hidden=[16]"],
    ("task", "digits_fewshot"): DIGITS_FEWSHOT,
    ("task", "image_folder"): None,  # needs image files: tests/tasks/test_image_folder.py
    ("model", "conv4"): DIGITS_FEWSHOT,
    ("model", "conv4_digits"): DIGITS_FEWSHOT,
    ("model", "resnet"): [*DIGITS_FEWSHOT, "model.widths=[4,8]"],
    ("hypergrad", "implicit"): [*TINY, "learn=l2"],
    ("learn", "none"): TINY,
    ("learn", "example_weights"): [*TINY, "task.indexed=true"],  # batches carry indices
}
CASES = [
    (g, o)
    for g in [
        "task",
        "model",
        "inner_optim",
        "learn",
        "hypergrad",
        "learner",
        "online_optim",
        "outer_optim",
        "logger",
    ]
    for o in _all_options(g)
    if NEEDS.get((g, o), 0) is not None
]


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_group_option_composes_builds_and_runs_one_step(
    group: str, option: str, tmp_path: Path
) -> None:
    overrides = NEEDS.get((group, option)) or NEEDS.get(group) or TINY
    extra = [] if (group, option) in NEEDS and group == "model" else []
    if group == "inner_optim" and option != "sgd":
        extra = ["learn=lr"]
    if group == "learn":
        extra = ["inner_optim.momentum=0.5"]  # a unit-constrained init must lie in (0, 1)
    cfg = compose_cfg(*overrides, *extra, f"{group}={option}")
    if group == "logger":
        logger = instantiate(OmegaConf.to_container(cfg.logger))(run_dir=tmp_path)
        logger.scalars({"outer/loss": 1.0}, 1)
        logger.close()
        return
    _, job = build(cfg)
    if getattr(job, "learns_nothing", False):
        assert job.evaluate()["val/loss"] > 0
        return
    outcome = job.step(0)
    assert outcome.finite, outcome.reason
    assert all(isinstance(v, float) for v in job.evaluate().values())


def test_yaml_options_state_only_what_differs_from_the_generated_schema() -> None:
    for path in CONFIGS.glob("*/*.yaml"):
        group = path.parent.name
        if group not in GROUPS or path.stem not in options(group):
            continue
        text = OmegaConf.load(path)
        body = {k: v for k, v in OmegaConf.to_container(text).items() if k != "defaults"}
        target_path, target = options(group)[path.stem]
        schema = OmegaConf.structured(schema_for(target_path, target, GROUPS[group].supplied))
        same = [k for k, v in body.items() if k in schema and schema[k] == v]
        assert not same, f"{path} repeats the library's defaults for {same}"


def test_learner_schemas_hold_only_what_the_learner_takes() -> None:
    reptile = compose_cfg(*FEWSHOT, "learner=reptile").learner
    imaml = compose_cfg(*FEWSHOT, "learner=imaml").learner
    assert "first_order" not in reptile and "first_order" not in imaml
    assert {"lam", "solver", "solver_iters", "damping", "step_size"} <= set(imaml)
    assert compose_cfg(*FEWSHOT, "learner=fomaml").learner.first_order is True
    for learner in (reptile, imaml):
        assert not {"model", "inner_optim", "loss_fn"} & set(learner), "supplied by the app"


# Ranges are the library's: the old schema's drift cases now follow the constructors.
@pytest.mark.parametrize(
    "override, ok, message",
    [
        ("inner_optim.momentum=1.5", True, ""),  # torch.optim.SGD accepts it, so does metagrad
        ("inner_optim.dampening=2.0", False, "inner_optim.dampening: Invalid dampening: 2.0"),
        ("inner_optim.lr=-1", False, "inner_optim.lr: Invalid lr: -1.0"),
    ],
    ids=["momentum-1.5", "dampening-2", "negative-lr"],
)
def test_ranges_come_from_the_library(override: str, ok: bool, message: str) -> None:
    cfg = compose_cfg(*TINY, "learn=none", override)
    if ok:
        build(cfg)
        return
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        build(cfg)


def test_help_lists_the_options_users_pick_and_not_the_schemas() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "metagrad.train", "--help"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path.cwd(),
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "schema" not in out
    for line in ("inner_optim: adagrad, adam, adamw, rmsprop, sgd", "learner: anil, fomaml, imaml"):
        assert line in out, out


def test_every_experiment_preset_composes_and_builds() -> None:
    for preset in _all_options("experiment"):
        cfg = compose_cfg(f"experiment={preset}", "outer_steps=1", "eval_tasks=6")
        cfg, job = build(cfg)
        assert job is not None, preset


def test_a_new_optimizer_is_an_option_without_any_config_edit(monkeypatch) -> None:
    from dataclasses import dataclass

    from metagrad.optim import SGD
    from metagrad.optim.base import hyper

    @dataclass(eq=False, repr=False)
    class HalfSGD(SGD):
        """SGD with a learning rate of its own default."""

        lr: float = hyper(0.05)

    monkeypatch.setattr(metagrad.optim, "HalfSGD", HalfSGD, raising=False)
    monkeypatch.setattr(metagrad.optim, "__all__", [*metagrad.optim.__all__, "HalfSGD"])
    assert "halfsgd" in options("inner_optim")
    node = OmegaConf.structured(schema_for("metagrad.optim.HalfSGD", HalfSGD, (), True))
    assert node.lr == 0.05 and node.momentum == 0.0
    made = instantiate(OmegaConf.to_container(node))  # a partial
    assert isinstance(made(), HalfSGD)
    assert torch.is_tensor(made(lr=torch.tensor(0.1)).lr)
