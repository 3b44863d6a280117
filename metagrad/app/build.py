"""Turn a composed config into the objects of a run (a `Job`), through `hydra.utils.instantiate`.

Only this module and `metagrad.train` read configs; everything they build takes plain Python
arguments.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..meta_params import MetaParameters
from .hpo import BETA_NAMES, LOSS_HYPERS, HPOJob, LearnedHyper, configured_betas, mix_seed
from .schema import ConfigError, meta_entry

__all__ = ["build_job", "flat_hparams"]


_NOT_LEARNABLE = ("nesterov", "amsgrad", "centered", "betas")


def _plain(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def build_job(cfg: DictConfig) -> Any:
    """The job of `cfg.loop`: `hpo`, `online` or `fewshot`."""
    if cfg.loop == "hpo":
        return build_hpo(cfg)
    if cfg.loop == "online":
        from .online import build_online

        return build_online(cfg)
    if cfg.loop == "fewshot":
        from .fewshot import build_fewshot

        return build_fewshot(cfg)
    raise ConfigError(f"Invalid loop: {cfg.loop!r}")


def build_hpo(cfg: DictConfig) -> HPOJob:
    """Hyperparameter gradients: task, model, inner optimizer, meta-parameters, estimator."""
    for key in ("hypergrad", "outer_optim"):
        if cfg.get(key) is None:
            raise ConfigError(f"loop=hpo needs a '{key}' config")
    if "learn" not in cfg.meta:
        raise ConfigError("loop=hpo needs a meta config with 'learn' (e.g. meta=lr)")
    task = instantiate(_plain(cfg.task))
    model_cfg = _plain(cfg.model)
    make_optimizer = instantiate(_plain(cfg.inner_optim))
    steps = int(cfg.hypergrad.steps)
    seed = int(cfg.seed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, 0))
        params = {
            n: p.detach().to(task.train.x.dtype)
            for n, p in instantiate(model_cfg).named_parameters()
        }
    known = tuple(make_optimizer.func.learnable_names())
    # Flags cannot be learned; a `betas` pair is learned as `beta1` and `beta2`.
    if "betas" in known:
        known = (*known, *BETA_NAMES)
    known = tuple(k for k in known if k not in _NOT_LEARNABLE)
    meta = MetaParameters()
    learned = {}
    for name, node in cfg.meta.learn.items():
        entry = meta_entry(node)
        if name in LOSS_HYPERS:
            if entry.init is None or entry.per_step:
                raise ConfigError(f"meta.learn.{name}: needs an init value and per_step: false")
        elif name not in known:
            raise ConfigError(
                f"meta.learn.{name}: {make_optimizer.func.__name__} has no learnable "
                f"hyperparameter '{name}' (it has {list(known)}; the inner loss has "
                f"{list(LOSS_HYPERS)})"
            )
        if name in BETA_NAMES and entry.constraint != "unit":
            raise ConfigError(
                f"meta.learn.{name}: needs constraint: unit (a beta lies in [0, 1)), "
                f"got {entry.constraint}"
            )
        init = entry.init
        if init is None:
            if name in BETA_NAMES:
                init = configured_betas(make_optimizer)[BETA_NAMES.index(name)]
            else:
                init = make_optimizer.keywords.get(name)
        constraint = None if entry.constraint == "none" else entry.constraint
        try:
            meta.add(
                name,
                float(init),
                constraint=constraint,
                scope=entry.scope,
                params=params,
                steps=steps if entry.per_step else None,
                dtype=task.train.x.dtype,
            )
        except ValueError as e:
            raise ConfigError(f"meta.learn.{name}: {e}") from None
        learned[name] = LearnedHyper(scope=entry.scope, per_step=bool(entry.per_step))

    method = instantiate(_plain(cfg.hypergrad.estimator))
    outer = instantiate(_plain(cfg.outer_optim))(meta.parameters())
    return HPOJob(
        task=task,
        make_model=functools.partial(instantiate, model_cfg),
        make_optimizer=make_optimizer,
        meta=meta,
        learned=learned,
        method=method,
        outer_optimizer=outer,
        steps=steps,
        seed=seed,
        eval_steps=cfg.get("eval_steps"),
    )


def flat_hparams(cfg: DictConfig, choices: dict[str, str] | None = None) -> dict[str, Any]:
    """The run's settings as one flat dict of scalars (`group.key` -> value) for HParams."""
    out: dict[str, Any] = {f"choice/{k}": v for k, v in (choices or {}).items() if v is not None}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k not in ("_target_", "_partial_"):
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list):
            out[prefix] = str(node)
        elif node is not None:
            out[prefix] = node

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out
