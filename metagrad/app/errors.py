"""How the application reports a bad config: one error type, naming the key."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from .._checks import ArgumentError

__all__ = ["ConfigError", "RunRefused", "at", "check_finite_numbers"]


class ConfigError(ValueError):
    """A config value is out of range, unknown or does not fit the run; names the key."""


class RunRefused(RuntimeError):
    """The run cannot start (or continue) as asked; nothing was changed. Says what to do."""


@contextmanager
def at(path: str) -> Iterator[None]:
    """Re-raise argument errors from building `path` as `ConfigError`s naming the config key.

    `inner_optim` + the library's "Invalid lr: -1.0 (...)" becomes
    "inner_optim.lr: Invalid lr: -1.0 (...)".
    """
    try:
        try:
            yield
        except InstantiationException as e:
            cause = e.__cause__
            if isinstance(cause, TypeError):  # the target called with arguments it does not take
                raise ConfigError(f"{path}: {cause}") from None
            if isinstance(cause, (ArgumentError, ValueError)):
                raise cause from None
            raise ConfigError(f"{path}: {str(e).splitlines()[-1].strip()}") from None
    except ConfigError:
        raise
    except ArgumentError as e:
        raise ConfigError(f"{path}.{e.arg}: {e}") from None
    except TypeError as e:
        text = str(e)
        if "unexpected keyword argument" in text or "required positional argument" in text:
            raise ConfigError(f"{path}: {text}") from None
        raise
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def check_finite_numbers(cfg: Any, prefix: str = "") -> None:
    """Refuse NaN and infinite numbers anywhere in the config, naming the key."""
    if isinstance(cfg, DictConfig):
        items: Any = ((k, cfg._get_node(k)) for k in cfg)
    elif isinstance(cfg, ListConfig):
        items = ((i, cfg._get_node(i)) for i in range(len(cfg)))
    else:
        return
    for key, node in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(node, (DictConfig, ListConfig)):
            check_finite_numbers(node, path)
            continue
        value = OmegaConf.select(cfg, str(key)) if isinstance(cfg, DictConfig) else cfg[key]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: {value} is not a finite number")
