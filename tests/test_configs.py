"""Every config group option and every experiment preset composes and builds a working run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _train_utils import TINY, compose_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metagrad.app.build import build_job
from metagrad.app.schema import validate
from metagrad.train import config_dir

CONFIGS = config_dir()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _plain(node):
    return OmegaConf.to_container(node, resolve=True)


GROUPS = ["task", "model", "inner_optim", "meta", "hypergrad", "outer_optim", "logger"]

# What each option needs from the other groups to form a run.
FEWSHOT = ["experiment=maml_sine", "outer_steps=2", "task.eval_tasks=12", "task.meta_batch=4"]
ONLINE = ["experiment=hd_digits", "outer_steps=2", "model.hidden=[16]"]
NEEDS = {
    ("task", "sinusoid"): FEWSHOT,
    ("meta", "maml"): FEWSHOT,
    ("meta", "fomaml"): FEWSHOT,
    ("meta", "metasgd"): FEWSHOT,
    ("meta", "anil"): FEWSHOT,
    ("meta", "mamlpp"): FEWSHOT,
    ("meta", "none"): ONLINE,
    ("hypergrad", "implicit"): [*TINY, "meta=l2"],
    ("inner_optim", "adam"): [*TINY, "meta=lr"],
    ("inner_optim", "adamw"): [*TINY, "meta=lr"],
    ("inner_optim", "rmsprop"): [*TINY, "meta=lr"],
    ("inner_optim", "adagrad"): [*TINY, "meta=lr"],
    ("inner_optim", "sgdhd"): ONLINE,
    ("inner_optim", "adamhd"): ONLINE,
    ("inner_optim", "torch_sgd"): ONLINE,
}

CASES = [(g, o) for g in GROUPS for o in _options(g)]


def test_every_group_has_options_and_a_schema() -> None:
    for group in GROUPS:
        assert _options(group), group
        for option in _options(group):
            text = (CONFIGS / group / f"{option}.yaml").read_text()
            assert f"- /schema/{group}/" in text, (
                f"{group}/{option}.yaml does not start from a schema"
            )


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_group_option_composes_instantiates_and_runs_one_step(
    group: str, option: str, tmp_path: Path
) -> None:
    overrides = NEEDS.get((group, option), TINY)
    cfg = compose_cfg(*overrides, f"{group}={option}")
    validate(cfg)
    node = cfg[group]
    if group == "logger":
        logger = instantiate(_plain(node))(run_dir=tmp_path)
        logger.scalars({"outer/loss": 1.0}, 1)
        logger.close()
        return
    if group == "model":
        model = instantiate(_plain(node))
        assert isinstance(model, torch.nn.Module)
    if group == "hypergrad":
        estimator = instantiate(_plain(node.estimator))
        assert callable(estimator)
    job = build_job(cfg)
    outcome = job.step(0)
    assert outcome.finite, outcome.reason
    assert all(isinstance(v, float) for v in job.evaluate().values())


EXPERIMENTS = _options("experiment")


def test_the_four_presets_exist() -> None:
    assert {"maml_sine", "hpo_digits", "hd_digits", "lr_schedule_digits"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_composes_and_builds(name: str) -> None:
    cfg = compose_cfg(f"experiment={name}")
    validate(cfg)
    text = (CONFIGS / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert f"experiment={name}" in text, "the preset's comment shows its command"
    small = {
        "maml_sine": ["task.meta_batch=4"],
        "hd_digits": [],
        "hpo_digits": ["hypergrad.steps=5"],
        "lr_schedule_digits": ["hypergrad.steps=5"],
    }.get(name, [])
    job = build_job(compose_cfg(f"experiment={name}", *small))
    assert job.step(0).finite


def test_default_run_learns_per_layer_lr_and_momentum_with_unrolled() -> None:
    cfg = compose_cfg()
    assert cfg.loop == "hpo"
    assert cfg.task._target_.endswith("DigitsTask")
    assert cfg.hypergrad.estimator._target_ == "metagrad.hypergrad.Unrolled"
    assert cfg.meta.learn.lr.scope == "per_layer" and "momentum" in cfg.meta.learn
    job = build_job(cfg)
    assert set(job.meta_scalars()) == {
        "meta/lr/0.weight",
        "meta/lr/0.bias",
        "meta/lr/2.weight",
        "meta/lr/2.bias",
        "meta/momentum",
    }


@pytest.mark.parametrize(
    "choice, target",
    [
        ("parallel", "JoblibLauncher"),
        ("joblib", "JoblibLauncher"),
        ("local", "LocalLauncher"),
        ("submitit_local", "LocalLauncher"),
        ("slurm", "SlurmLauncher"),
        ("submitit_slurm", "SlurmLauncher"),
    ],
)
def test_launcher_choices_are_offered(choice: str, target: str) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={choice}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if choice == "slurm":
        assert cfg.hydra.launcher.cpus_per_task == 2 and cfg.hydra.launcher.timeout_min == 60
