"""Config options generated from the library's own signatures: one source of truth.

Every option of the groups below is a structured config built from its target's signature
(names, defaults and types), so the library's constructors are the only place where an
argument, a default or a range is written. Adding a public optimizer to `metagrad.optim`, an
estimator to `metagrad.hypergrad` or a learner to `metagrad.learners` makes it an option
(`inner_optim=<class name in lower case>`) with no config edit.

A YAML file `configs/<group>/<option>.yaml` may refine an option (state only what differs);
it starts from the generated schema with `defaults: [/schema/<group>/<option>@_here_, _self_]`.
Options with no YAML file are stored directly as `<group>/<option>`.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from .._introspect import accepted_arguments

__all__ = ["GROUPS", "Group", "options", "register_configs", "schema_for", "target_path"]


@dataclass(frozen=True)
class Group:
    """A config group whose options are library objects.

    Attributes:
        discover: returns the options, `name -> (import path, target)`.
        supplied: constructor arguments the application passes itself (left out of configs).
        partial: the config builds a partial (`_partial_: true`) the application completes.
        what: one line for the docs.
    """

    discover: Callable[[], dict[str, tuple[str, Any]]]
    supplied: tuple[str, ...] = ()
    partial: bool = False
    what: str = ""


def _public(
    module: Any, base: type, *, exclude: tuple[type, ...] = ()
) -> dict[str, tuple[str, Any]]:
    """Public classes of `module` deriving from `base` (not `base` itself), by lowercase name."""
    out = {}
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if (
            inspect.isclass(obj)
            and issubclass(obj, base)
            and obj is not base
            and not inspect.isabstract(obj)
            and obj not in exclude
        ):
            out[name.lower()] = (f"{module.__name__}.{name}", obj)
    return out


def _inner_optimizers() -> dict[str, tuple[str, Any]]:
    import metagrad.optim as optim

    return _public(optim, optim.Optimizer)


def _estimators() -> dict[str, tuple[str, Any]]:
    import metagrad.hypergrad as hypergrad

    return _public(hypergrad, hypergrad.Estimator)


def _truncated_estimators() -> dict[str, tuple[str, Any]]:
    import metagrad.hypergrad as hypergrad

    return _public(hypergrad, hypergrad.TruncatedEstimator)


def _learners() -> dict[str, tuple[str, Any]]:
    import metagrad.learners as learners

    return _public(learners, learners.MetaLearner)


def _online_optimizers() -> dict[str, tuple[str, Any]]:
    import metagrad.online as online

    out = _public(online, torch.optim.Optimizer)
    # The fixed-rate baselines.
    out["torch_sgd"] = ("torch.optim.SGD", torch.optim.SGD)
    out["torch_adam"] = ("torch.optim.Adam", torch.optim.Adam)
    return out


def _outer_optimizers() -> dict[str, tuple[str, Any]]:
    return {
        name.lower(): (f"torch.optim.{name}", getattr(torch.optim, name))
        for name in ("Adam", "AdamW", "SGD", "RMSprop")
    }


def _models() -> dict[str, tuple[str, Any]]:
    from .. import models

    return {
        name: (f"metagrad.models.{name}", getattr(models, name))
        for name in models.__all__
        if callable(getattr(models, name))
    }


def _tasks() -> dict[str, tuple[str, Any]]:
    from .. import tasks

    return {
        "digits": ("metagrad.tasks.Digits", tasks.Digits),
        "noisy_digits": ("metagrad.tasks.NoisyDigits", tasks.NoisyDigits),
        "sinusoid": ("metagrad.tasks.SinusoidTasks", tasks.SinusoidTasks),
        "digits_fewshot": ("metagrad.tasks.DigitsFewShot", tasks.DigitsFewShot),
        "image_folder": ("metagrad.tasks.ImageFolderFewShot", tasks.ImageFolderFewShot),
    }


def _loggers() -> dict[str, tuple[str, Any]]:
    from . import logger

    return {
        "tensorboard": ("metagrad.app.logger.TensorBoardLogger", logger.TensorBoardLogger),
        "none": ("metagrad.app.logger.NullLogger", logger.NullLogger),
    }


#: The groups whose options are generated, and what the application supplies to each.
GROUPS: dict[str, Group] = {
    "task": Group(_tasks, supplied=("dtype", "seed", "split"), what="the data"),
    "model": Group(_models, what="the network (unset sizes come from the task)"),
    "inner_optim": Group(_inner_optimizers, partial=True, what="differentiable inner optimizer"),
    "hypergrad": Group(_estimators, what="hypergradient estimator (loop=hpo)"),
    "truncated": Group(
        _truncated_estimators, what="estimator of online truncated training (loop=truncated)"
    ),
    "learner": Group(
        _learners,
        supplied=("model", "inner_optim", "loss_fn"),
        partial=True,
        what="few-shot meta-learner (loop=fewshot)",
    ),
    "online_optim": Group(
        _online_optimizers,
        supplied=("params",),
        partial=True,
        what="torch.optim-style optimizer (loop=online)",
    ),
    "outer_optim": Group(
        _outer_optimizers,
        supplied=("params",),
        partial=True,
        what="optimizer of the meta-parameters",
    ),
    "logger": Group(
        _loggers, supplied=("run_dir", "purge_step"), partial=True, what="where metrics go"
    ),
}


def options(group: str) -> dict[str, tuple[str, Any]]:
    """The generated options of `group`: name -> (import path, target)."""
    return GROUPS[group].discover()


def target_path(group: str, target: Any) -> str | None:
    """The config `_target_` under which `group` offers `target`, if it does."""
    for path, t in options(group).values():
        if t is target:
            return path
    return None


_PRIMITIVES = (bool, int, float, str)


def _config_type(annotation: Any) -> Any:
    """The OmegaConf type for a Python annotation (Any where it has none)."""
    if annotation is inspect.Parameter.empty:
        return Any
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation in _PRIMITIVES:
        return annotation
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        # A hyperparameter (a number, a tensor or a mapping) is a number in a config.
        chosen = next((t for t in (float, int, bool, str) if t in rest), None)
        if chosen is None:
            return Any
        if len(rest) > 1 and chosen is not float:
            return Any
        return chosen | None if optional else chosen
    return Any


def _config_default(value: Any) -> Any:
    if value is inspect.Parameter.empty:
        return MISSING
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        items = list(value)
        return dataclasses.field(default_factory=lambda: list(items))
    if value is None or isinstance(value, _PRIMITIVES):
        return value
    raise TypeError("not representable")


def schema_for(
    path: str, target: Any, supplied: tuple[str, ...] = (), partial: bool = False
) -> type:
    """A structured-config dataclass for `target`: `_target_`, `_partial_` and its arguments.

    Arguments in `supplied` are left out (the application passes them), and so are optional
    arguments whose default a config cannot express (e.g. a `torch.dtype`).
    """
    hints: dict[str, Any] = {}
    try:
        fn = target.__init__ if inspect.isclass(target) else target
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: fall back to untyped fields
        hints = {}
    fields: list[Any] = [("_target_", str, dataclasses.field(default=path))]
    if partial:
        fields.append(("_partial_", bool, dataclasses.field(default=True)))
    for name, p in accepted_arguments(target).items():
        if name in supplied or name.startswith("**"):
            continue
        try:
            default = _config_default(p.default)
        except TypeError:
            continue
        kind = _config_type(hints.get(name, p.annotation))
        if default is None and kind is not Any and not isinstance(kind, types.UnionType):
            kind = kind | None
        if isinstance(default, dataclasses.Field):
            fields.append((name, Any, default))
        else:
            fields.append((name, kind, dataclasses.field(default=default)))
    name = "".join(part.capitalize() for part in path.split(".")[-1:]) + "Config"
    return dataclasses.make_dataclass(name, fields)


def _yaml_options(group: str) -> set[str]:
    from ..train import config_dir

    folder = config_dir() / group
    return {p.stem for p in folder.glob("*.yaml")} if folder.is_dir() else set()


def register_configs() -> None:
    """Store every generated option in Hydra's ConfigStore (idempotent).

    Each goes to `schema/<group>/<option>`, and also to `<group>/<option>` unless a YAML file
    of that name refines it.
    """
    from .settings import TrainSettings

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainSettings)
    for group, spec in GROUPS.items():
        yaml = _yaml_options(group)
        for option, (path, target) in spec.discover().items():
            node = schema_for(path, target, spec.supplied, spec.partial)
            cs.store(group=f"schema/{group}", name=option, node=node)
            if option not in yaml:
                cs.store(group=group, name=option, node=node)
