"""Every config group option and every experiment preset composes and builds a working run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _train_utils import TINY, compose_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metagrad.app.build import build_job
from metagrad.app.schema import ConfigError, validate
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
    ("meta", "reptile"): FEWSHOT,
    ("meta", "imaml"): FEWSHOT,
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


def test_every_fewshot_learner_is_offered() -> None:
    fewshot = [m for m in _options("meta") if NEEDS.get(("meta", m)) == FEWSHOT]
    targets = {compose_cfg(*FEWSHOT, f"meta={m}").meta.algo._target_ for m in fewshot}
    assert targets == {
        f"metagrad.learners.{name}"
        for name in ("MAML", "MetaSGD", "ANIL", "MAMLPlusPlus", "Reptile", "iMAML")
    }


def test_learner_schemas_hold_only_their_constructor_arguments() -> None:
    reptile = compose_cfg(*FEWSHOT, "meta=reptile").meta
    imaml = compose_cfg(*FEWSHOT, "meta=imaml").meta
    assert "first_order" not in reptile.algo and "lr_outer_lr" not in reptile
    assert {"lam", "solver", "solver_iters", "damping", "step_size"} <= set(imaml.algo)
    assert "first_order" not in imaml.algo and "lr_outer_lr" not in imaml
    assert "first_order" in compose_cfg(*FEWSHOT, "meta=maml").meta.algo


# A bad value of each few-shot learner fails when the config is checked, naming the key.
BAD_LEARNER_VALUES = [
    ("maml", "meta.algo.inner_lr=0", "meta.algo.inner_lr must be > 0, got 0.0"),
    ("reptile", "meta.algo.inner_steps=0", "meta.algo.inner_steps must be > 0, got 0"),
    ("reptile", "meta.algo.vectorize=sometimes", "meta.algo.vectorize must be auto, true or"),
    ("imaml", "meta.algo.lam=0", "meta.algo.lam must be > 0, got 0.0"),
    ("imaml", "meta.algo.lam=-1", "meta.algo.lam must be > 0, got -1.0"),
    ("imaml", "meta.algo.solver=lu", "meta.algo.solver must be one of ('cg', 'neumann', "),
    ("imaml", "meta.algo.solver_iters=0", "meta.algo.solver_iters must be > 0, got 0"),
    ("imaml", "meta.algo.damping=-0.5", "meta.algo.damping must be >= 0, got -0.5"),
    ("imaml", "meta.algo.step_size=0", "meta.algo.step_size must be > 0, got 0.0"),
]


@pytest.mark.parametrize(
    "option, override, message",
    BAD_LEARNER_VALUES,
    ids=[
        f"{o}-{v.split('=')[0].rsplit('.', 1)[1]}={v.split('=')[1]}"
        for o, v, _ in BAD_LEARNER_VALUES
    ],
)
def test_bad_learner_value_fails_when_checked(option: str, override: str, message: str) -> None:
    cfg = compose_cfg(*FEWSHOT, f"meta={option}", override)
    with pytest.raises(ConfigError, match=re.escape(f"Invalid config: {message}")):
        validate(cfg)


@pytest.mark.parametrize(
    "option, override",
    [
        ("reptile", "meta.algo.first_order=true"),
        ("reptile", "meta.lr_outer_lr=0.01"),
        ("imaml", "meta.algo.first_order=true"),
        ("imaml", "meta.algo.lam=strong"),
    ],
    ids=[
        "reptile-first_order",
        "reptile-lr_outer_lr",
        "imaml-first_order",
        "imaml-lam-not-a-number",
    ],
)
def test_key_a_learner_does_not_take_or_mistyped_value_fails_to_compose(
    option: str, override: str
) -> None:
    from hydra.errors import ConfigCompositionException

    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException, match=re.escape(key)):
        compose_cfg(*FEWSHOT, f"meta={option}", override)


def test_key_added_with_plus_that_a_learner_does_not_take_is_refused_by_name() -> None:
    # `+` bypasses the schema; the builder still names the key instead of a TypeError.
    cfg = compose_cfg(*FEWSHOT, "meta=reptile", "+meta.algo.first_order=true")
    with pytest.raises(ConfigError, match=re.escape("meta.algo: Reptile takes no ['first_order']")):
        build_job(cfg)


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


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_composes_without_event_files(name: str) -> None:
    cfg = compose_cfg(f"experiment={name}", "logger=none")
    validate(cfg)
    assert cfg.logger._target_.endswith("NullLogger")


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
