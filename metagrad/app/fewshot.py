"""Few-shot meta-learning on task batches (`loop=fewshot`): the MAML family on sinusoids."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .._introspect import accepted_arguments
from ..learners import MetaLearner
from ..tasks import SinusoidTasks, TaskBatch
from .hpo import mix_seed
from .loop import StepOutcome
from .schema import ConfigError

__all__ = ["SinusoidTask", "FewShotJob", "build_fewshot"]


class SinusoidTask:
    """Sinusoid regression tasks (Finn et al. 2017) with the sizes of one experiment.

    Every outer step draws its meta-batch from a sampler seeded by `(seed, step)`, so runs are
    reproducible and a resumed run sees the batches it would have seen.

    Args:
        shots: support points per task (K).
        query_shots: query points per task during meta-training.
        meta_batch: tasks per outer step.
        eval_tasks: new tasks for the final evaluation (periodic validation uses a sixth).
        eval_query: query points per evaluation task.
        eval_steps: inner-step counts at which evaluation reports the query MSE.
        dtype: "float32" or "float64".
        in_features, out_features: 1 and 1; given so model configs can read them.
    """

    def __init__(
        self,
        shots: int = 10,
        query_shots: int = 10,
        meta_batch: int = 25,
        eval_tasks: int = 600,
        eval_query: int = 100,
        eval_steps: list[int] | tuple[int, ...] = (1, 10),
        dtype: str = "float32",
        in_features: int = 1,
        out_features: int = 1,
    ) -> None:
        if in_features != 1 or out_features != 1:
            raise ValueError("sinusoid tasks have in_features=1 and out_features=1")
        self.shots, self.query_shots, self.meta_batch = shots, query_shots, meta_batch
        self.eval_tasks, self.eval_query = eval_tasks, eval_query
        self.eval_steps = tuple(int(s) for s in eval_steps)
        self.dtype = getattr(torch, dtype)
        self.in_features, self.out_features = in_features, out_features

    def batch(self, seed: int) -> TaskBatch:
        """The meta-batch drawn from a sampler seeded by `seed`."""
        tasks = SinusoidTasks(seed=seed, dtype=self.dtype)
        return tasks.sample(self.meta_batch, self.shots, self.query_shots)

    def eval_batch(self, seed: int, tasks: int) -> TaskBatch:
        """`tasks` new tasks with `eval_query` query points each."""
        return SinusoidTasks(seed=seed, dtype=self.dtype).sample(tasks, self.shots, self.eval_query)


class FewShotJob:
    """One outer step = one meta-batch: adapt to each task, step on the mean query loss.

    Args:
        task: the task distribution.
        algo: a `metagrad.learners` learner; its parameters are the meta-parameters.
        outer_optimizer: a torch.optim optimizer over `algo.parameters()`.
        seed: the run's seed.
    """

    def __init__(
        self,
        task: SinusoidTask,
        algo: MetaLearner,
        outer_optimizer: torch.optim.Optimizer,
        seed: int = 0,
    ) -> None:
        self.task = task
        self.algo = algo
        self.outer_optimizer = outer_optimizer
        self.seed = seed

    def step(self, index: int) -> StepOutcome:
        batch = self.task.batch(mix_seed(self.seed, index))
        self.outer_optimizer.zero_grad(set_to_none=True)
        loss = self.algo(*batch)
        if not bool(torch.isfinite(loss)):
            return StepOutcome({"outer/loss": float(loss)}, False, f"query loss is {float(loss)}")
        loss.backward()
        grads = [p.grad for p in self.algo.parameters() if p.grad is not None]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        metrics = {"outer/loss": float(loss.detach()), "hypergrad/norm": norm}
        if not math.isfinite(norm):
            return StepOutcome(metrics, False, "non-finite meta-gradient")
        self.outer_optimizer.step()
        return StepOutcome(metrics)

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Mean query MSE on new tasks after 0 and each of `eval_steps` inner steps."""
        tasks = self.task.eval_tasks if final else max(1, self.task.eval_tasks // 6)
        sx, sy, qx, qy = self.task.eval_batch(mix_seed(self.seed, 0, salt=1), tasks)
        prefix = "test" if final else "val"
        out = {}
        with torch.no_grad():
            out[f"{prefix}/mse_0"] = float(((self.algo.model(qx) - qy) ** 2).mean())
        for steps in self.task.eval_steps:
            if steps == 0:
                continue
            losses = []
            for i in range(0, tasks, 100):  # chunks keep memory small
                part = (t[i : i + 100] for t in (sx, sy, qx, qy))
                loss = self.algo(*part, steps=steps, reduction="none")
                losses.append(loss.detach())
            out[f"{prefix}/mse_{steps}"] = float(torch.cat(losses).mean())
        return out

    def _lrs(self) -> dict[str, Tensor]:
        lrs = getattr(self.algo, "lrs", None)
        if lrs is None:
            return {}
        with torch.no_grad():
            return {k.replace(".", "/"): v.detach() for k, v in lrs().items()}

    def meta_scalars(self) -> dict[str, float]:
        return {f"meta/inner_lr/{k}": float(v.mean()) for k, v in self._lrs().items()}

    def meta_tensors(self) -> dict[str, Tensor]:
        return {f"meta/inner_lr/{k}": v for k, v in self._lrs().items() if v.dim() > 1}

    def meta_schedules(self) -> dict[str, Tensor]:
        lrs = self._lrs()
        steps = getattr(self.algo, "inner_steps", 0)
        per_step = [v for v in lrs.values() if v.dim() == 1 and len(v) == steps and steps > 1]
        if not per_step or len(per_step) != len(lrs):
            return {}
        return {"schedule/inner_lr": torch.stack(per_step, dim=-1)}

    def layout(self) -> dict[str, list[str]]:
        groups = {"query mse": ["val/mse_.*"]}
        if self._lrs():
            groups["inner lr per layer"] = ["meta/inner_lr/.*"]
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {
            "algo": self.algo.state_dict(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.algo.load_state_dict(state["algo"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])


def _check_arguments(make: functools.partial, key: str) -> None:
    """Refuse config keys the target does not take (e.g. one added with `+`) by name."""
    parameters = accepted_arguments(make.func)
    if "**kwargs" in parameters:
        return
    unknown = sorted(set(make.keywords) - set(parameters))
    if unknown:
        takes = [n for n in parameters if n not in ("self", "model", "inner_optim")]
        raise ConfigError(f"{key}: {make.func.__name__} takes no {unknown} (it takes {takes})")


def build_fewshot(cfg: DictConfig) -> FewShotJob:
    """Task, model, meta-learner (`meta.algo`) and outer optimizer of a few-shot run."""
    if "algo" not in cfg.meta:
        raise ConfigError("loop=fewshot needs a meta config with 'algo' (e.g. meta=maml)")
    if cfg.get("outer_optim") is None:
        raise ConfigError("loop=fewshot needs an 'outer_optim' config")
    plain = functools.partial(OmegaConf.to_container, resolve=True)
    task = instantiate(plain(cfg.task))
    if not isinstance(task, SinusoidTask):
        raise ConfigError("loop=fewshot needs a few-shot task (task=sinusoid)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        model = instantiate(plain(cfg.model)).to(task.dtype)
    inner = plain(cfg.inner_optim)
    inner.pop("lr", None)  # the learner passes its own inner_lr
    make_algo = instantiate(plain(cfg.meta.algo))
    _check_arguments(make_algo, "meta.algo")
    algo = make_algo(model=model, inner_optim=instantiate(inner))
    lr_lr = cfg.meta.get("lr_outer_lr")
    learned = list(algo.meta.parameters())
    if learned and lr_lr is not None:
        lr_ids = {id(p) for p in learned}
        rest = [p for p in algo.parameters() if id(p) not in lr_ids]
        groups = [{"params": rest}, {"params": learned, "lr": float(lr_lr)}]
    else:
        groups = [{"params": list(algo.parameters())}]
    outer = instantiate(plain(cfg.outer_optim))(groups)
    return FewShotJob(task, algo, outer, seed=int(cfg.seed))
