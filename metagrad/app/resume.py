"""Continuing a run: its own settings, strictly; nothing read from disk is trusted blindly.

A resumed run is rebuilt from the config recorded in its checkpoint. That config is data from
disk, so before anything is built from it, it is checked against the application's schema and
every `_target_` it names must be one that metagrad's config groups offer, or lie in a module
the user trusts explicitly (`trusted_targets=[mypkg]` on the resuming command line). Overrides
given with `resume=true` may change how long the run goes and how it reports, never what it
computes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .configs import GROUPS
from .errors import RunRefused
from .settings import TrainSettings

__all__ = [
    "RESUMABLE",
    "check_targets",
    "config_yaml",
    "continue_config",
    "recorded_config",
    "targets_in",
]

# Settings a resumed run may change: how long it runs and how it reports, not what it computes.
RESUMABLE = (
    "resume",
    "outer_steps",
    "val_every",
    "checkpoint_every",
    "max_nonfinite",
    "progress",
    "threads",
    "logger",
    "device",
    "memory_guard",
    "trusted_targets",
)


def config_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, as stored in checkpoints."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def recorded_config(text: str, source: Path) -> dict[str, Any]:
    """A config recorded on disk as plain data (never resolved, never instantiated).

    Raises:
        RunRefused: it is not YAML, or not a mapping.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise RunRefused(
            f"{source} records a config metagrad cannot read ({first}); it was not used"
        ) from None
    if not isinstance(data, dict):
        raise RunRefused(
            f"{source} records a config metagrad cannot read (not a mapping); it was not used"
        )
    return data


def targets_in(node: Any, path: str = "") -> list[tuple[str, str]]:
    """Every `(key, _target_)` in a plain config tree."""
    found: list[tuple[str, str]] = []
    if isinstance(node, Mapping):
        for k, v in node.items():
            key = f"{path}.{k}" if path else str(k)
            if k == "_target_":
                found.append((path or "<top>", str(v)))
            else:
                found.extend(targets_in(v, key))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found.extend(targets_in(v, f"{path}[{i}]"))
    return found


def offered_targets() -> set[str]:
    """The `_target_`s metagrad's own config groups offer."""
    return {path for group in GROUPS.values() for path, _ in group.discover().values()}


def check_targets(config: Any, trusted: Sequence[str], source: Path) -> None:
    """Refuse a recorded config that names a `_target_` neither offered nor trusted.

    Raises:
        RunRefused: naming the key and the target, and how to trust it.
    """
    offered = offered_targets()
    for key, target in targets_in(config):
        if target in offered:
            continue
        if any(target == t or target.startswith(t.rstrip(".") + ".") for t in trusted):
            continue
        module = target.rsplit(".", 1)[0]
        raise RunRefused(
            f"{source} names {key}._target_={target}, which metagrad's configs do not offer; "
            "a run folder is data and its code is not run unless you trust it. If this is "
            f"your own code, resume with trusted_targets=[{module}]"
        )


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: node}


def _select(flat: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if k == key or k.startswith(key + ".")}


def continue_config(
    cfg: DictConfig,
    saved_yaml: str,
    saved_choices: Mapping[str, str | None],
    choices: Mapping[str, str | None],
    overrides: Sequence[str] | None,
    run: Path,
    done: int,
) -> DictConfig:
    """The config to continue a run with: the recorded one, plus the `RESUMABLE` settings the
    user gives now (e.g. a larger `outer_steps` to extend the run).

    Args:
        cfg: the config composed for this invocation.
        saved_yaml: the resolved config stored in the checkpoint.
        saved_choices: the group options the run was started with.
        choices: the group options composed now.
        overrides: the command-line overrides of this invocation (None: unknown, as when
            `train(cfg)` is called directly; then every difference counts as given).
        run: the run folder, for messages.
        done: outer steps the checkpoint has done.

    Raises:
        RunRefused: an override changes what the run computes, `outer_steps` is below the
            steps done, or the recorded config is malformed.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainSettings), OmegaConf.create(saved_yaml))
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        first = str(e).splitlines()[0]
        raise RunRefused(
            f"the checkpoint in {run} records a config metagrad cannot read ({first}); it was "
            "not used"
        ) from None
    if not isinstance(merged, DictConfig):
        raise RunRefused(f"the checkpoint in {run} records a config that is not a mapping")
    saved: DictConfig = merged
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    before = _flat(OmegaConf.to_container(saved, resolve=True))
    missing = object()
    conflicts: list[str] = []
    given: list[str] = []
    if overrides is None:
        for k in sorted(set(now) | set(before)):
            if k.split(".")[0] in RESUMABLE:
                continue
            if now.get(k, missing) != before.get(k, missing):
                conflicts.append(f"{k}: {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}")
        given = list(RESUMABLE)
    else:
        for o in overrides:
            key = o.split("=", 1)[0].lstrip("+~")
            top = key.split(".")[0]
            if key.startswith("hydra"):
                continue
            if top in RESUMABLE:
                given.append(key)
                continue
            if "." not in key and (key in choices or key in saved_choices):
                if choices.get(key) != saved_choices.get(key):
                    conflicts.append(f"{o} (the run used {key}={saved_choices.get(key)})")
            elif _select(now, key) != _select(before, key):
                shown = _select(before, key)
                was = next(iter(shown.values())) if len(shown) == 1 else shown or "(unset)"
                conflicts.append(f"{o} (the run used {was})")
    if conflicts:
        raise RunRefused(
            f"resume=true continues the run in {run} with its own settings, and these overrides "
            f"would change what it computes: {'; '.join(conflicts[:8])}. Drop them, or start a "
            "new run in another folder"
        )
    for key in RESUMABLE:
        if key in cfg and any(g == key or g.startswith(key + ".") for g in given):
            saved[key] = cfg[key]
    saved.resume = True
    if int(saved.outer_steps) < done:
        raise RunRefused(
            f"outer_steps={saved.outer_steps} is below the {done} outer steps the run in {run} "
            f"has already done; give outer_steps >= {done}"
        )
    return saved
