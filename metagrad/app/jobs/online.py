"""`loop=online`: ordinary training with an optimizer that adapts its own hyperparameters.

One outer step is one training step of a `torch.optim`-style optimizer (`online_optim`, e.g.
`metagrad.online.SGDHD`) on a real model; the loop logs the learning rate it adapts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ...tasks.protocols import SupervisedTask
from ..errors import ConfigError, at
from ..runtime import Runtime, build_model, build_task, make, mix_seed
from .base import StepOutcome

__all__ = ["OnlineJob", "build"]


class OnlineJob:
    """Plain minibatch training; each outer step is one optimizer step on one batch.

    Args:
        task: the data (a `SupervisedTask`).
        model: the model, trained in place.
        optimizer: a `torch.optim.Optimizer` over `model.parameters()`.
        rt: device, dtype, seed, loss and metric.
    """

    def __init__(
        self, task: SupervisedTask, model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime
    ) -> None:
        self.task = task
        self.model = model
        self.optimizer = optimizer
        self.rt = rt

    def step(self, index: int) -> StepOutcome:
        (batch,) = self.rt.batches(self.task.train_batches(mix_seed(self.rt.seed, index), 1))
        x, y = batch[0], batch[1]  # an indexed task's batches carry indices too
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.rt.loss(self.model(x), y)
        if not bool(torch.isfinite(loss)):
            return StepOutcome(
                {"train/loss": float(loss)}, False, f"training loss is {float(loss)}"
            )
        loss.backward()
        self.optimizer.step()
        return StepOutcome({"train/loss": float(loss.detach())})

    def evaluate(self, final: bool = False) -> dict[str, float]:
        names = ("train", "val", "test") if final else ("train", "val")
        return self.rt.scores(self.task, self.model, names)

    def meta_scalars(self) -> dict[str, float]:
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        if len(lrs) == 1:
            return {"meta/lr": lrs[0]}
        return {f"meta/lr/group{i}": lr for i, lr in enumerate(lrs)}

    def meta_tensors(self) -> dict[str, Tensor]:
        return {}

    def meta_schedules(self) -> dict[str, Tensor]:
        return {}

    def layout(self) -> dict[str, list[str]]:
        return {"losses": ["train/loss", "val/train_loss", "val/loss"]}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def build(cfg: DictConfig, rt: Runtime) -> OnlineJob:
    """Task, model and a torch.optim-style optimizer (`online_optim`) of an online run."""
    task = build_task(cfg, rt)
    if not isinstance(task, SupervisedTask):
        raise ConfigError(
            f"task: loop=online trains on a supervised task, but {type(task).__name__} is not "
            "one; use task=digits or your own TensorTask"
        )
    if cfg.get("online_optim") is None:
        raise ConfigError(
            "online_optim: loop=online needs a torch.optim-style optimizer (online_optim=sgdhd, "
            "adamhd, torch_sgd, ...)"
        )
    model = build_model(cfg, task, rt, mix_seed(rt.seed, 0, salt=1))
    make_optimizer = make("online_optim", cfg.online_optim)
    with at("online_optim"):
        optimizer = make_optimizer(model.parameters())
    return OnlineJob(task, model, optimizer, rt)
