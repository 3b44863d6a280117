"""What every job builder shares: device and dtype, seeds, loss and metric, task and model.

Only the application reads configs; everything built here takes plain arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from .._introspect import accepted_arguments
from ..tasks.protocols import model_args
from .errors import ConfigError, at

__all__ = [
    "Runtime",
    "build_model",
    "build_task",
    "fresh_node",
    "make",
    "mix_seed",
    "plain",
    "resolve_device",
    "seeded",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

log = logging.getLogger("metagrad.train")


def mix_seed(seed: int, index: int, salt: int = 0) -> int:
    """A reproducible seed for outer step `index` of a run seeded by `seed`."""
    return (seed * 1_000_003 + index * 7_919 + salt * 104_729) % (2**62)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global RNG seeded by `seed`, restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def plain(node: Any) -> Any:
    """A config node as plain Python containers (resolved)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`; refuses CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: {name} was asked for, but this machine has no CUDA device (or this "
                "torch has no CUDA support); use device=cpu or device=auto"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {name} does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return torch.device(name)


def _accuracy(prediction: Tensor, target: Tensor) -> Tensor:
    return (prediction.argmax(-1) == target).to(prediction.dtype).mean()


_LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
_METRICS: dict[str, LossFn] = {"accuracy": _accuracy}


@dataclass
class Runtime:
    """Where and how a run computes, and what it optimizes and reports.

    Attributes:
        device: where models, meta-parameters and batches live.
        dtype: the floating dtype of models, meta-parameters and inputs.
        seed: the run's seed.
        loss: `loss(prediction, target)`, the inner and outer objective.
        metric: `(name, metric(prediction, target))` reported besides the loss, or None.
        explicit: config keys the user gave on the command line (None: unknown).
        rank, world_size: this process's place among the processes of a distributed run.
    """

    device: torch.device
    dtype: torch.dtype
    seed: int
    loss: LossFn = F.cross_entropy
    metric: tuple[str, LossFn] | None = None
    explicit: list[str] | None = field(default=None)
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process reports (rank 0)."""
        return self.rank == 0

    def to(self, tree: Any) -> Any:
        """Tensors of `tree` on the run's device; floating ones in its dtype."""

        def move(x: Any) -> Any:
            if not isinstance(x, Tensor):
                return x
            if x.is_floating_point():
                return x.to(device=self.device, dtype=self.dtype)
            return x.to(self.device)

        return torch.utils._pytree.tree_map(move, tree)

    def batches(self, batches: Sequence[Any]) -> list[Any]:
        """Every batch moved with `to`."""
        return [self.to(b) for b in batches]

    def scores(
        self, task: Any, predict: Callable[[Tensor], Tensor], splits: Sequence[str]
    ) -> dict[str, float]:
        """Loss (and metric) of `predict` on each of the task's `splits`, as `<split>/loss`.

        The training split is reported as `val/train_loss` and without the metric.
        """
        out: dict[str, float] = {}
        with torch.no_grad():
            for name in splits:
                split = task.split(name)
                if split is None:
                    continue
                x, y = self.to(split[:2])  # indexed batches carry example indices too
                prediction = predict(x)
                key = "val/train_loss" if name == "train" else f"{name}/loss"
                out[key] = float(self.loss(prediction, y))
                if self.metric is not None and name != "train":
                    label, fn = self.metric
                    out[f"{name}/{label}"] = float(fn(prediction, y))
        return out


def make(path: str, node: Any, **supplied: Any) -> Any:
    """`hydra.utils.instantiate(node, **supplied)`, with errors naming config key `path`."""
    with at(path):
        return instantiate(plain(node), _convert_="all", **supplied)


def _loss_spec(spec: Any, path: str, table: dict[str, LossFn]) -> tuple[str, LossFn] | None:
    if spec is None or spec == "none":
        return None
    if isinstance(spec, str):
        if spec not in table:
            raise ConfigError(
                f"{path}: unknown {path} {spec!r} (one of {sorted(table)}, none, or "
                "{_target_: your.function})"
            )
        return spec, table[spec]
    fn = make(path, spec)
    if not callable(fn):
        raise ConfigError(f"{path}: {spec} does not build a callable (prediction, target)")
    target = plain(spec).get("_target_", "custom")
    return str(target).rsplit(".", 1)[-1], fn


def resolve_objectives(cfg: DictConfig, task: Any) -> tuple[LossFn, tuple[str, LossFn] | None]:
    """The run's loss and metric: from the config, else the task's defaults."""
    loss_spec = cfg.loss if cfg.loss is not None else getattr(task, "loss", "cross_entropy")
    found = _loss_spec(plain(loss_spec), "loss", _LOSSES)
    if found is None:
        raise ConfigError("loss: a run needs a loss (cross_entropy, mse or {_target_: ...})")
    default_metric = "accuracy" if found[0] == "cross_entropy" else None
    default_metric = getattr(task, "metric", default_metric)
    metric_spec = cfg.metric if cfg.metric is not None else default_metric
    return found[1], _loss_spec(plain(metric_spec), "metric", _METRICS)


def fresh_node(node: Any, group: str) -> Any:
    """The node as plain data; when the user replaced the option's `_target_` (their own code),
    the option's own keys that the new target does not take are dropped (keys the user added
    stay, and a wrong one fails when the target is called)."""
    data = plain(node)
    schema = OmegaConf.get_type(node) if OmegaConf.is_config(node) else None
    if not (isinstance(data, dict) and dataclasses.is_dataclass(schema)):
        return data
    fields = {f.name: f.default for f in dataclasses.fields(schema)}
    if data.get("_target_") == fields.get("_target_"):
        return data
    try:
        accepted = accepted_arguments(_locate(data["_target_"]))
    except (ImportError, AttributeError, ValueError, TypeError):
        return data  # instantiate reports the bad target
    if "**kwargs" in accepted:
        return data
    dropped = [k for k in data if k in fields and k not in accepted and not k.startswith("_")]
    if dropped:
        log.info(
            "%s: %s does not take %s of the option it replaces; left out",
            group,
            data["_target_"],
            dropped,
        )
    return {k: v for k, v in data.items() if k not in dropped}


def _locate(path: str) -> Any:
    from hydra.utils import get_object

    return get_object(path)


def build_task(cfg: DictConfig, rt: Runtime) -> Any:
    """The task of `cfg.task`."""
    if cfg.get("task") is None:
        raise ConfigError("task: a run needs a task (e.g. task=digits)")
    task = make("task", plain(cfg.task))
    rt.loss, rt.metric = resolve_objectives(cfg, task)
    return task


def build_model(cfg: DictConfig, task: Any, rt: Runtime, seed: int) -> nn.Module:
    """The model of `cfg.model`, sizes it leaves unset taken from the task, built under `seed`."""
    if cfg.get("model") is None:
        raise ConfigError("model: a run needs a model (e.g. model=mlp)")
    node = plain(cfg.model)
    implied = model_args(task)
    missing = [k for k, v in node.items() if v == "???"]
    filled = {k: implied[k] for k in missing if k in implied}
    unknown = [k for k in missing if k not in implied]
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]} is not set and the task does not imply it; set it, e.g. "
            f"+model.{unknown[0]}=..."
        )
    node = {k: v for k, v in node.items() if k not in filled}
    with seeded(seed):
        model = make("model", node, **filled)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model: {node.get('_target_')} built a {type(model).__name__}, not an nn.Module"
        )
    return model.to(device=rt.device, dtype=rt.dtype)
