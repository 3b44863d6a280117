"""Online hyperparameter adaptation during ordinary training (`loop=online`), e.g. SGD-HD.

One outer step is one training step of a stock `torch.optim`-style optimizer on a real model;
hypergradient-descent optimizers (`metagrad.online.SGDHD`, `AdamHD`) adapt their learning rate
as they go, and the loop logs it under `meta/lr`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from .data import DigitsTask
from .hpo import mix_seed
from .loop import StepOutcome
from .schema import ConfigError

__all__ = ["OnlineJob", "build_online"]


class OnlineJob:
    """Plain minibatch training; each outer step is one optimizer step on one batch.

    Args:
        task: the data.
        model: the model, trained in place.
        optimizer: a `torch.optim.Optimizer` over `model.parameters()`.
        seed: the run's seed (batch `i` is drawn from a generator seeded by `(seed, i)`).
    """

    def __init__(
        self, task: DigitsTask, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0
    ) -> None:
        self.task = task
        self.model = model
        self.optimizer = optimizer
        self.seed = seed

    def step(self, index: int) -> StepOutcome:
        (x, y) = self.task.inner_batches(mix_seed(self.seed, index), 1)[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        if not bool(torch.isfinite(loss)):
            return StepOutcome(
                {"train/loss": float(loss)}, False, f"training loss is {float(loss)}"
            )
        loss.backward()
        self.optimizer.step()
        return StepOutcome({"train/loss": float(loss.detach())})

    def evaluate(self, final: bool = False) -> dict[str, float]:
        splits = {"val/train": self.task.train, "val": self.task.val}
        if final:
            splits["test"] = self.task.test
        out = {}
        with torch.no_grad():
            for name, split in splits.items():
                if len(split.y) == 0:
                    continue
                logits = self.model(split.x)
                out[f"{name}_loss" if name == "val/train" else f"{name}/loss"] = float(
                    F.cross_entropy(logits, split.y)
                )
                if name != "val/train":
                    out[f"{name}/accuracy"] = float((logits.argmax(-1) == split.y).double().mean())
        return out

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


def build_online(cfg: DictConfig) -> OnlineJob:
    """Task, model and a torch.optim-style optimizer (`inner_optim`) of an online run."""
    plain = functools.partial(OmegaConf.to_container, resolve=True)
    task = instantiate(plain(cfg.task))
    if not isinstance(task, DigitsTask):
        raise ConfigError("loop=online trains on task=digits")
    opt_cfg = plain(cfg.inner_optim)
    if "hypergrad_lr" not in opt_cfg:
        raise ConfigError(
            "loop=online needs a torch.optim-style inner_optim (inner_optim=sgdhd, adamhd or "
            "torch_sgd)"
        )
    for key in ("hypergrad_lr", "multiplicative"):  # None: the optimizer has no such argument
        if opt_cfg.get(key, 0) is None:
            opt_cfg.pop(key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(int(cfg.seed), 0, salt=1))
        model = instantiate(plain(cfg.model)).to(task.train.x.dtype)
    optimizer = instantiate(opt_cfg)(model.parameters())
    return OnlineJob(task, model, optimizer, seed=int(cfg.seed))
