"""`loop=hpo`: hyperparameters learned by gradient through whole inner training runs.

Each outer step trains a freshly initialized model for `horizon` inner steps with the inner
optimizer built from the current meta-parameters, differentiates the validation loss through
the run with the chosen estimator, and updates the meta-parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ... import distributed as dist
from ..._checks import ArgumentError, Params
from ...functional import Functional
from ...hypergrad import NonFiniteLossError
from ...hypergrad.base import inner_steps, start
from ...meta_params import MetaParameters
from ...optim.base import Optimizer
from ...problem import InnerProblem
from ...tasks.protocols import SupervisedTask
from ..errors import ConfigError, at
from ..runtime import Runtime, build_model, build_task, make, mix_seed, plain
from ..settings import learn_entry
from .base import MetaJob

__all__ = ["HPOJob", "LOSS_HYPERS", "build"]

#: Learnable hyperparameters of the inner loss rather than of the optimizer: `l2` adds
#: 0.5 * l2 * ||w||^2 (per layer or per element with those scopes) to the training loss. The
#: implicit estimator sees only these.
LOSS_HYPERS = ("l2",)


class HPOJob(MetaJob):
    """Each outer step trains a fresh model for `horizon` steps and updates the hyperparameters.

    The initial weights, the inner batches and the outer batch of outer step `i` come from
    seeds derived from `(seed, i)`, so a run is reproducible and a resumed run continues with
    exactly the batches it would have seen.

    Args:
        task: the data (a `SupervisedTask`).
        make_model: builds the model (called under a fixed seed for each initialization).
        make_optimizer: `(**hyperparameters) -> metagrad.optim optimizer` with the fixed
            hyperparameters already bound.
        meta: the learned hyperparameters.
        per_step: the names of entries of `meta` that are per-step schedules.
        method: the hypergradient estimator.
        outer_optimizer: a torch.optim optimizer over `meta.parameters()`.
        horizon: the inner horizon T.
        rt: device, dtype, seed, loss and metric.
        eval_horizon: inner steps of evaluation runs (None: `horizon`).
        population: inner runs per outer step (independent seeds), whose meta-gradients are
            averaged: a lower-variance estimate, spread over the processes of a distributed
            run.
        fixed: hyperparameters given per layer, step or element but not learned (`learn`
            entries with `fixed: true`); read like `meta`, never updated.
    """

    def __init__(
        self,
        *,
        task: SupervisedTask,
        make_model: Callable[[int], nn.Module],
        make_optimizer: Callable[..., Optimizer],
        meta: MetaParameters,
        per_step: set[str],
        method: Callable[[InnerProblem, MetaParameters], Any] | None,
        outer_optimizer: torch.optim.Optimizer,
        horizon: int,
        rt: Runtime,
        eval_horizon: int | None = None,
        population: int = 1,
        fixed: MetaParameters | None = None,
    ) -> None:
        super().__init__(meta, meta, outer_optimizer)
        self.population = population
        self.fixed = fixed if fixed is not None else MetaParameters()
        self.task = task
        self.make_model = make_model
        self.fmodel = Functional(make_model(rt.seed))
        self.make_optimizer = make_optimizer
        self.per_step = set(per_step)
        overlap = set(self.fixed.entry_names()) & set(meta.entry_names())
        if overlap:
            raise ArgumentError("fixed", f"{sorted(overlap)} are both learned and fixed")
        self.method = method
        self.horizon = horizon
        self.eval_horizon = eval_horizon or horizon
        self.rt = rt
        self.pairs = {
            name: where
            for name, where in make_optimizer.func.learnable_names().items()  # type: ignore[attr-defined]
            if where[1] is not None
        }

    # ------------------------------------------------------------------ the inner problem
    def init_params(self, seed: int) -> Params:
        """Freshly initialized weights, the same for the same seed."""
        return {n: p.detach() for n, p in self.make_model(seed).named_parameters()}

    def optimizer(self, meta: MetaParameters, t: int) -> Optimizer:
        """The inner optimizer of inner step `t`, built from the meta-parameters' values."""
        values: dict[str, Any] = {}
        sources = [(meta, n) for n in meta.entry_names()]
        sources += [(self.fixed, n) for n in self.fixed.entry_names()]
        for source, name in sources:
            if name in LOSS_HYPERS:
                continue
            # A schedule in longer runs (eval_horizon > horizon) keeps its last value.
            step = min(t, self.horizon - 1) if name in self.per_step else None
            value = source.value(name, step=step)
            if name in self.pairs:
                field, i = self.pairs[name]
                configured = self.make_optimizer.keywords.get(field)  # type: ignore[attr-defined]
                if configured is None:
                    configured = self.make_optimizer.func.defaults()[field]  # type: ignore[attr-defined]
                pair = list(values.get(field, configured))
                pair[i] = value
                values[field] = tuple(pair)
            else:
                values[name] = value
        return self.make_optimizer(**values)

    def loss(self, params: Params, meta: MetaParameters, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The task's loss of the model with `params` on `batch`."""
        x, y = batch
        return self.rt.loss(self.fmodel(params, x), y)

    def inner_loss(
        self, params: Params, meta: MetaParameters, batch: tuple[Tensor, Tensor]
    ) -> Tensor:
        """The training loss: the task's loss plus any learned L2 penalty."""
        loss = self.loss(params, meta, batch)
        source = meta if "l2" in meta.entry_names() else self.fixed
        if "l2" in source.entry_names():
            l2 = source.value("l2")
            for name, p in params.items():
                coef = l2[name] if isinstance(l2, dict) else l2
                loss = loss + 0.5 * (coef * p * p).sum()
        return loss

    def problem(self, index: int, horizon: int | None = None, salt: int = 0) -> InnerProblem:
        """The inner problem of outer step `index`."""
        s = mix_seed(self.rt.seed, index, salt)
        steps = horizon or self.horizon
        train = self.task.split("train")
        return InnerProblem(
            init=self.rt.to(self.init_params(s)),
            optimizer=self.optimizer,
            inner_loss=self.inner_loss,
            outer_loss=self.loss,
            inner_batches=self.rt.batches(self.task.train_batches(s, steps)),
            outer_batch=self.rt.to(self.task.val_batch(s)),
            steps=steps,
            implicit_batch=None if train is None else self.rt.to(train),
        )

    # ------------------------------------------------------------------ the job
    def compute(self, index: int) -> dict[str, float]:
        """The meta-gradient averaged over the population's inner runs (1 by default).

        Member k of outer step `index` trains from its own initialization and batches; in a
        distributed run each process takes a contiguous share of the population and one
        all-reduce averages the meta-gradients.
        """
        members = range(self.population)
        if self.rt.world_size > 1:
            members = dist.shard(self.population, self.rt.rank, self.rt.world_size)
        metrics: dict[str, float] = {}
        losses = []
        failed: NonFiniteLossError | None = None
        assert self.method is not None
        for k in members:
            try:
                result = self.method(self.problem(index, salt=_member_salt(k)), self.meta)
            except NonFiniteLossError as e:
                if self.rt.world_size == 1:
                    raise
                failed = e  # still join the all-reduce, with a non-finite contribution
                for p in self.meta.parameters():
                    p.grad = torch.full_like(p, float("nan"))
                continue
            result.apply(self.meta)  # non-finite values too: the skeleton names and skips them
            losses.append(result.outer_loss)
            metrics = dict(result.metrics)
        local = torch.stack(losses).sum() if losses else torch.zeros(())
        if self.rt.world_size > 1:
            loss = dist.all_reduce_grads(
                self.meta, sum_of=len(members), loss=local.to(self.rt.device)
            )
        else:
            loss = local / max(len(losses), 1)
            if self.population > 1:
                for p in self.meta.parameters():
                    if p.grad is not None:
                        p.grad = p.grad / self.population
        if failed is not None:
            raise failed
        metrics["outer/loss"] = float(loss)
        return metrics

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Train a fresh model with the current hyperparameters (no graph) and score it.

        Only the reporting process (rank 0) evaluates; the others return nothing.
        """
        if not self.rt.main:
            return {}
        problem = self.problem(0, self.eval_horizon, salt=1)
        out: dict[str, float] = {}
        try:
            run = start(problem, self.meta, track=False)
            run = inner_steps(
                problem, self.meta, run, range(problem.steps), create_graph=False, track=False
            )
        except NonFiniteLossError:
            return {"val/train_loss": float("nan"), "val/loss": float("nan")}
        params = run.params
        last = run.last_loss
        out["val/train_loss"] = float("nan") if last is None else float(last.detach())
        names = ("val", "test") if final else ("val",)
        out.update(self.rt.scores(self.task, lambda x: self.fmodel(params, x), names))
        return out

    @property
    def learns_nothing(self) -> bool:
        """True when no hyperparameter is learned (`learn=none`): the run only evaluates."""
        return not self.meta.entry_names()


def _member_salt(k: int) -> int:
    """Seeds of population member k: member 0 is the plain run; evaluation uses salt 1."""
    return 0 if k == 0 else 100 + k


def build_parts(cfg: DictConfig, rt: Runtime, loop: str = "hpo") -> dict[str, Any]:
    """What every hyperparameter-learning job needs: task, model factory, inner optimizer,
    meta-parameters (from `learn`) and outer optimizer, checked and named by config key."""
    task = build_task(cfg, rt)
    if not isinstance(task, SupervisedTask):
        raise ConfigError(
            f"task: loop={loop} trains on a supervised task (train_batches, val_batch, split), "
            f"but {type(task).__name__} is not one; use task=digits or your own TensorTask, or "
            "loop=fewshot for episodic tasks"
        )
    for key in ("inner_optim", "outer_optim"):
        if cfg.get(key) is None:
            raise ConfigError(f"{key}: loop={loop} needs one (e.g. {key}=<option>)")
    make_model = functools.partial(build_model, cfg, task, rt)
    make_optimizer = make("inner_optim", cfg.inner_optim)
    if not (
        isinstance(make_optimizer, functools.partial)
        and isinstance(make_optimizer.func, type)
        and issubclass(make_optimizer.func, Optimizer)
    ):
        raise ConfigError(
            f"inner_optim: loop={loop} needs a metagrad.optim optimizer (e.g. inner_optim=sgd)"
        )
    with at("inner_optim"):
        make_optimizer()  # validates the fixed hyperparameters now, naming the bad one
    params = {n: p.detach() for n, p in make_model(rt.seed).named_parameters()}
    meta, fixed, per_step = _meta_parameters(cfg, make_optimizer, params)
    meta.to(rt.device)
    fixed.to(rt.device)
    outer = make("outer_optim", cfg.outer_optim)
    with at("outer_optim"):
        learned: list[Tensor] = list(meta.parameters())
        outer = outer(learned or [torch.zeros(1, requires_grad=True)])
    return dict(
        task=task,
        make_model=make_model,
        make_optimizer=make_optimizer,
        meta=meta,
        per_step=per_step,
        outer_optimizer=outer,
        horizon=int(cfg.horizon),
        rt=rt,
        eval_horizon=cfg.eval_horizon,
        population=int(cfg.population),
        fixed=fixed,
    )


def _meta_parameters(
    cfg: DictConfig, make_optimizer: Any, params: Params
) -> tuple[MetaParameters, MetaParameters, set[str]]:
    """The `learn` entries as `MetaParameters`: the learned ones, the fixed ones (not learned,
    no gradient), and the names of the per-step ones."""
    learnable = make_optimizer.func.learnable_names()
    meta = MetaParameters()
    fixed = MetaParameters()
    per_step: set[str] = set()
    for name, raw in (plain(cfg.learn) or {}).items():
        path = f"learn.{name}"
        try:
            entry = learn_entry(name, raw)
        except ArgumentError as e:
            raise ConfigError(f"{e.arg}: {e}") from None
        if name not in learnable and name not in LOSS_HYPERS:
            raise ConfigError(
                f"{path}: {make_optimizer.func.__name__} has no learnable hyperparameter "
                f"'{name}' (it has {list(learnable)}; the inner loss has {list(LOSS_HYPERS)})"
            )
        init = entry.init
        if init is None:
            if name in LOSS_HYPERS:
                raise ConfigError(f"{path}.init: {name} needs an initial value")
            field, i = learnable[name]
            value = make_optimizer.keywords.get(field, make_optimizer.func.defaults()[field])
            init = value if i is None else list(value)[i]
        if name in LOSS_HYPERS and entry.per_step:
            raise ConfigError(f"{path}.per_step: {name} is a term of the loss, not a schedule")
        constraint = None if entry.constraint == "none" else entry.constraint
        if name in learnable:
            low, high, high_open = make_optimizer.func.bounds(name)
            if high is not None and constraint != "unit":
                allowed = f"[{low}, {high}{')' if high_open else ']'}"
                raise ConfigError(
                    f"{path}.constraint: {name} must stay in {allowed}, which only "
                    "constraint: unit guarantees while it is learned (got "
                    f"{entry.constraint})"
                )
        steps = int(cfg.horizon) if entry.per_step else None
        if isinstance(init, (list, tuple)):
            init = _listed_init(path, init, entry.scope, steps, params)
        else:
            init = float(init)
        target = fixed if entry.fixed else meta
        with at(path):
            target.add(
                name, init, constraint=constraint, scope=entry.scope, params=params, steps=steps
            )
        if entry.per_step:
            per_step.add(name)
    for p in fixed.parameters():
        p.requires_grad_(False)
    return meta, fixed, per_step


def _listed_init(
    path: str, values: list[float], scope: str, steps: int | None, params: Params
) -> Tensor | dict[str, Tensor]:
    """A list `init` as `MetaParameters.add` takes it, its length checked against the scope.

    The order is steps first (per-step entries), then the layer (per-layer: one value per
    parameter tensor) or the elements (per-element: each parameter flattened), with the
    parameters in the model's order.
    """
    flat = torch.tensor([float(v) for v in values], dtype=torch.float64)
    lead = (steps,) if steps is not None else ()
    width = {
        "scalar": 1,
        "per_layer": len(params),
        "per_element": sum(p.numel() for p in params.values()),
    }[scope]
    expected = (steps or 1) * width
    if flat.numel() != expected:
        what = {
            "scalar": "",
            "per_layer": f"{width} parameter tensors",
            "per_element": f"{width} elements",
        }[scope]
        parts = [f"{steps} steps"] if steps is not None else []
        parts += [what] if what else []
        raise ConfigError(
            f"{path}.init: a list needs one value per {' x '.join(parts) or 'entry'} "
            f"({expected} values), got {flat.numel()}"
            + ("" if parts else "; give a number for a scalar entry")
        )
    dtype = next(iter(params.values())).dtype
    if scope == "scalar":
        return flat.reshape(lead).to(dtype)
    if scope == "per_layer":
        return flat.reshape(*lead, width).to(dtype)
    table = flat.reshape(*lead, width)
    out: dict[str, Tensor] = {}
    start = 0
    for name, p in params.items():
        n = p.numel()
        out[name] = table[..., start : start + n].reshape(*lead, *p.shape).to(dtype)
        start += n
    return out


def build(cfg: DictConfig, rt: Runtime) -> HPOJob:
    """Task, model, inner optimizer, meta-parameters, estimator and outer optimizer."""
    parts = build_parts(cfg, rt)
    if cfg.get("hypergrad") is None:
        raise ConfigError("hypergrad: loop=hpo needs an estimator (e.g. hypergrad=unrolled)")
    return HPOJob(method=make("hypergrad", cfg.hypergrad), **parts)
