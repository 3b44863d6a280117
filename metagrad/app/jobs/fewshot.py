"""`loop=fewshot`: a learner of the MAML family meta-trained on episodes of an episodic task."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from omegaconf import DictConfig

from ... import distributed as dist
from ...learners import MetaLearner
from ...optim.base import Optimizer
from ...tasks.protocols import EpisodicTask
from ..errors import ConfigError, at
from ..runtime import Runtime, build_model, build_task, make, mix_seed, plain
from .base import MetaJob

__all__ = ["FewShotJob", "build"]

#: Tasks per call when evaluating (bounds memory).
_CHUNK = 100


class FewShotJob(MetaJob):
    """One outer step = one meta-batch: adapt to each task, step on the mean query loss.

    Args:
        task: the episodic task.
        learner: a `metagrad.learners` learner; its parameters are the meta-parameters.
        outer_optimizer: a torch.optim optimizer over `learner.parameters()`.
        rt: device, dtype, seed, loss and metric.
        meta_batch: tasks per outer step.
        eval_tasks: tasks of the final test evaluation (periodic validation uses a sixth).
        eval_inner_steps: inner-step counts at which evaluation reports (0: no adaptation).
    """

    def __init__(
        self,
        task: EpisodicTask,
        learner: MetaLearner,
        outer_optimizer: torch.optim.Optimizer,
        rt: Runtime,
        meta_batch: int,
        eval_tasks: int,
        eval_inner_steps: list[int],
    ) -> None:
        super().__init__(learner, learner.meta, outer_optimizer)
        self.task = task
        self.learner = learner
        self.rt = rt
        self.meta_batch = meta_batch
        self.eval_tasks = eval_tasks
        self.eval_inner_steps = eval_inner_steps

    def compute(self, index: int) -> dict[str, float]:
        batch = self.task.episodes("train", self.meta_batch, mix_seed(self.rt.seed, index))
        if self.rt.world_size > 1:  # this process's contiguous share of the meta-batch
            batch = dist.shard_batch(batch, self.rt.rank, self.rt.world_size)
        mine = len(batch[0])
        loss = torch.zeros((), dtype=self.rt.dtype, device=self.rt.device)
        if mine:
            loss = self.learner(*self.rt.to(batch))
            if bool(torch.isfinite(loss)):
                loss.backward()
            else:  # every process then sees a non-finite meta-gradient and skips the step
                for p in self.learner.parameters():
                    p.grad = torch.full_like(p, float("nan"))
        if self.rt.world_size > 1:
            # One all-reduce: the mean over every task of the meta-batch, loss included.
            loss = dist.all_reduce_grads(self.learner, mean_of=mine, loss=loss.detach())
        return {"outer/loss": float(loss.detach())}

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Query loss (and metric, with a 95% interval) on new tasks after each step count.

        Only the reporting process (rank 0) evaluates; the others return nothing.
        """
        if not self.rt.main:
            return {}
        split = "test" if final else "val"
        count = self.eval_tasks if final else max(2, self.eval_tasks // 6)
        sx, sy, qx, qy = self.task.episodes(split, count, mix_seed(self.rt.seed, 0, salt=1))
        out: dict[str, float] = {}
        for steps in self.eval_inner_steps:
            losses, values = [], []
            for i in range(0, count, _CHUNK):
                part = self.rt.to(tuple(t[i : i + _CHUNK] for t in (sx, sy, qx, qy)))
                loss, value = self.learner.evaluate(
                    *part, steps=steps, metric=None if self.rt.metric is None else self.rt.metric[1]
                )
                losses.append(loss)
                if value is not None:
                    values.append(value)
            out[f"{split}/loss_{steps}"] = float(torch.cat(losses).mean())
            if values:
                v = torch.cat(values).double()
                label = self.rt.metric[0] if self.rt.metric else "metric"
                out[f"{split}/{label}_{steps}"] = float(v.mean())
                # Half-width of the 95% confidence interval of the mean over tasks.
                out[f"{split}/{label}_{steps}_ci95"] = (
                    1.96 * float(v.std()) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
                )
        return out

    def layout(self) -> dict[str, list[str]]:
        groups = super().layout()
        groups["query loss"] = ["val/loss_.*"]
        return groups


def build(cfg: DictConfig, rt: Runtime) -> FewShotJob:
    """Task, model, learner and outer optimizer of a few-shot run."""
    task = build_task(cfg, rt)
    if not isinstance(task, EpisodicTask):
        raise ConfigError(
            f"task: loop=fewshot needs an episodic task (with episodes(split, count, seed)), "
            f"but {type(task).__name__} is not one; use task=sinusoid, task=digits_fewshot or "
            "task=image_folder (e.g. experiment=maml_sine), or loop=hpo for supervised tasks"
        )
    if cfg.get("learner") is None:
        raise ConfigError("learner: loop=fewshot needs a learner (e.g. learner=maml)")
    if cfg.get("outer_optim") is None:
        raise ConfigError("outer_optim: loop=fewshot needs one (e.g. outer_optim=adam)")
    model = build_model(cfg, task, rt, rt.seed)
    inner = plain(cfg.inner_optim) if cfg.get("inner_optim") is not None else None
    make_inner = None
    if inner is not None:
        inner.pop("lr", None)  # the learner passes its own inner_lr (or learned rates)
        make_inner = make("inner_optim", inner)
        if not (
            isinstance(make_inner, functools.partial)
            and isinstance(make_inner.func, type)
            and issubclass(make_inner.func, Optimizer)
        ):
            raise ConfigError(
                "inner_optim: the learner's inner loop needs a metagrad.optim optimizer"
            )
    make_learner = make("learner", cfg.learner)
    with at("learner"):
        learner = make_learner(model=model, inner_optim=make_inner, loss_fn=rt.loss)
    learner.to(device=rt.device, dtype=rt.dtype)
    learned = list(learner.meta.parameters())
    outer = make("outer_optim", cfg.outer_optim)
    if learned and cfg.learned_lr_outer_lr is not None:
        ids = {id(p) for p in learned}
        rest = [p for p in learner.parameters() if id(p) not in ids]
        groups: Any = [{"params": rest}, {"params": learned, "lr": float(cfg.learned_lr_outer_lr)}]
    else:
        groups = list(learner.parameters())
    with at("outer_optim"):
        outer = outer(groups)
    steps = cfg.eval_inner_steps
    if steps is None:
        steps = [0, learner.inner_steps]
    return FewShotJob(
        task,
        learner,
        outer,
        rt,
        meta_batch=int(cfg.meta_batch),
        eval_tasks=int(cfg.eval_tasks),
        eval_inner_steps=[int(s) for s in steps],
    )
