"""Which settings a resumed run uses: those of the run it continues, stored in its checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .schema import ConfigError

__all__ = ["RESUMABLE", "config_for_resume", "config_yaml"]

log = logging.getLogger("metagrad.train")

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
)


def config_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, as stored in checkpoints."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: node}


def config_for_resume(
    cfg: DictConfig, saved_yaml: str, explicit: Sequence[str] | None, run: Any
) -> DictConfig:
    """The config to continue a run with: the checkpointed one, with `RESUMABLE` settings given
    now (e.g. a larger `outer_steps` to extend the run).

    Args:
        cfg: the config composed for this invocation.
        saved_yaml: the resolved config stored in the checkpoint.
        explicit: keys given on the command line (None: treat every key as given, as when
            `train(cfg)` is called directly).
        run: the run folder, for messages.

    Raises:
        ConfigError: a key given explicitly differs from the run being continued.
    """
    saved = OmegaConf.create(saved_yaml)
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    before = _flat(OmegaConf.to_container(saved, resolve=True))
    missing = object()
    differ = sorted(
        k
        for k in set(now) | set(before)
        if k.split(".")[0] not in RESUMABLE and now.get(k, missing) != before.get(k, missing)
    )
    if explicit is None:
        conflicts = differ
    else:
        conflicts = [k for k in differ if any(k == e or k.startswith(e + ".") for e in explicit)]
    if conflicts:
        shown = ", ".join(
            f"{k}: {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in conflicts[:8]
        )
        raise ConfigError(
            f"resume=true continues the run in {run} with its own settings, but these differ: "
            f"{shown}. Drop those overrides, or start a new run in another folder"
        )
    # The resumable settings keep the run's values unless given now.
    for key in RESUMABLE:
        given = (
            explicit is None
            or key == "resume"
            or any(e == key or e.startswith(key + ".") or key.startswith(e + ".") for e in explicit)
        )
        if given and key in cfg:
            saved[key] = cfg[key]
    if differ:
        log.info(
            "resuming with the settings stored in the checkpoint (%d differ from the "
            "defaults composed now)",
            len(differ),
        )
    return saved
