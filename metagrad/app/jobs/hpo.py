"""`loop=hpo`: hyperparameters learned by gradient through whole inner training runs.

Each outer step trains a freshly initialized model for `horizon` inner steps with the inner
optimizer built from the current meta-parameters, differentiates the validation loss through
the run with the chosen estimator, and updates the meta-parameters.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
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
from ...weighting import ExampleWeights, MetaWeightNet, weighted_loss
from ..errors import ConfigError, at
from ..runtime import Runtime, build_model, build_task, make, mix_seed, plain, seeded
from ..settings import learn_entry, weighting_entry
from .base import MetaJob

__all__ = ["DATA_WEIGHTINGS", "DataWeighting", "HPOJob", "LOSS_HYPERS", "build"]

#: Learnable hyperparameters of the inner loss rather than of the optimizer: `l2` adds
#: 0.5 * l2 * ||w||^2 (per layer or per element with those scopes) to the training loss. The
#: implicit estimator sees only these (and the data weightings below).
LOSS_HYPERS = ("l2",)

#: Learned weightings of the training examples (`metagrad.weighting`), also terms of the inner
#: loss, which becomes `weighted_loss(per-example losses, weights)`: `example_weights`, one
#: weight per training example, looked up by the indices an indexed task's batches carry
#: (task=noisy_digits); `weight_net`, a Meta-Weight-Net that maps each example's loss to its
#: weight. One at a time; each is a module of the meta-parameters under its own name.
DATA_WEIGHTINGS = ("example_weights", "weight_net")


@dataclass
class DataWeighting:
    """How the inner loss weights its examples: the meta-parameter module and the normalizer.

    Attributes:
        name: the module's name in the meta-parameters ("example_weights" or "weight_net").
        normalize: `weighted_loss`'s normalizer ("weights", "count" or "none").
    """

    name: str
    normalize: str = "weights"

    def weights(self, meta: MetaParameters, batch: Any, losses: Tensor) -> Tensor:
        """The weights of a batch's examples: looked up by index, or the net's at `losses`."""
        module = meta.value(self.name)
        if isinstance(module, ExampleWeights):
            return module(batch[2])
        return module(losses)


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
        weighting: a learned weighting of the training examples (a module of `meta`), or None
            for the plain mean loss.
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
        weighting: DataWeighting | None = None,
    ) -> None:
        super().__init__(meta, meta, outer_optimizer)
        self.weighting = weighting
        self._last_params: Params | None = None  # of the last inner run, for weight summaries
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
                pair = list(values.get(field, _configured(self.make_optimizer, field)))
                pair[i] = value
                values[field] = tuple(pair)
            else:
                values[name] = value
        return self.make_optimizer(**values)

    def loss(self, params: Params, meta: MetaParameters, batch: tuple[Tensor, ...]) -> Tensor:
        """The task's loss of the model with `params` on `batch` (inputs, targets, ...)."""
        return self.rt.loss(self.fmodel(params, batch[0]), batch[1])

    def example_losses(self, params: Params, batch: tuple[Tensor, ...]) -> Tensor:
        """The loss of each example of `batch`, shape [batch size]."""
        out = self.rt.loss(self.fmodel(params, batch[0]), batch[1], reduction="none")  # type: ignore[call-arg]
        return out.reshape(len(out), -1).mean(1) if out.dim() > 1 else out

    def inner_loss(self, params: Params, meta: MetaParameters, batch: tuple[Tensor, ...]) -> Tensor:
        """The training loss: the task's loss (weighted per example if a weighting is learned)
        plus any L2 penalty, learned or fixed."""
        if self.weighting is None:
            loss = self.loss(params, meta, batch)
        else:
            losses = self.example_losses(params, batch)
            weights = self.weighting.weights(meta, batch, losses)
            loss = weighted_loss(losses, weights, normalize=self.weighting.normalize)
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
            if self.weighting is not None and result.params is not None:
                self._last_params = {n: p.detach() for n, p in result.params.items()}
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
        return not any(True for _ in self.meta.parameters())

    # ------------------------------------------------------------------ logging
    def example_weights(self) -> Tensor | None:
        """The current weight of every training example, scaled to mean 1 (None: no weighting).

        A Meta-Weight-Net's weights are those at the examples' losses under the last inner
        run's final parameters (before the first run: the initial ones).
        """
        train = self.task.split("train")
        if self.weighting is None or train is None:
            return None
        module = self.meta.value(self.weighting.name)
        with torch.no_grad():
            if isinstance(module, ExampleWeights):
                w = module.values()
            else:
                params = self._last_params or self.rt.to(self.init_params(self.rt.seed))
                w = module(self.example_losses(params, self.rt.to(train)))
        return w / w.mean().clamp_min(torch.finfo(w.dtype).tiny)

    def _weight_groups(self) -> dict[str, Tensor]:
        """The current weights of each group the task names (`example_groups()`), or of all."""
        w = self.example_weights()
        if w is None:
            return {}
        groups = getattr(self.task, "example_groups", None)
        masks = groups() if callable(groups) else {}
        if not masks:
            return {"weights/all": w}
        return {f"weights/{g}": w[mask.to(w.device)] for g, mask in masks.items()}

    def meta_scalars(self) -> dict[str, float]:
        out = super().meta_scalars()
        for tag, w in self._weight_groups().items():
            group = tag.removeprefix("weights/")
            out[f"weights/mean_{group}"] = float(w.mean())
        return out

    def meta_tensors(self) -> dict[str, Tensor]:
        return {**super().meta_tensors(), **self._weight_groups()}

    def layout(self) -> dict[str, list[str]]:
        groups = super().layout()
        if self.weighting is not None:
            groups["example weights (mean 1)"] = ["weights/mean_.*"]
        return groups


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
    weighting = _data_weighting(cfg, task, meta, rt)
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
        weighting=weighting,
    )


def _takes_reduction(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "reduction" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _data_weighting(
    cfg: DictConfig, task: Any, meta: MetaParameters, rt: Runtime
) -> DataWeighting | None:
    """The `learn` entry that weights the training examples, added to `meta` (or None)."""
    learn = plain(cfg.learn) or {}
    chosen = [name for name in learn if name in DATA_WEIGHTINGS]
    if not chosen:
        return None
    if len(chosen) > 1:
        raise ConfigError(f"learn.{chosen[1]}: one data weighting at a time (got {chosen})")
    name = chosen[0]
    path = f"learn.{name}"
    try:
        entry = weighting_entry(name, learn[name])
    except ArgumentError as e:
        raise ConfigError(f"{e.arg}: {e}") from None
    if not _takes_reduction(rt.loss):
        raise ConfigError(
            f"loss: {path} weights each example's loss, so the loss must take "
            "reduction='none' (cross_entropy, mse, or a function with that argument)"
        )
    train = task.split("train")
    if train is None:
        raise ConfigError(f"task: {path} weights training examples, but the task has none")
    if name == "example_weights":
        if len(train) < 3:
            raise ConfigError(
                f"{path}: per-example weights look up the indices of each batch's examples, "
                f"but the batches of {type(task).__name__} carry none; use an indexed task "
                "(task=noisy_digits, task=digits task.indexed=true, or TensorTask(indexed=True))"
            )
        constraint = None if entry.constraint == "none" else entry.constraint
        with at(path):
            module: Any = ExampleWeights(
                len(train[1]), entry.init, constraint=constraint, dtype=rt.dtype
            )
    else:
        with at(path), seeded(mix_seed(rt.seed, 0, salt=2)):
            module = MetaWeightNet(entry.hidden, dtype=rt.dtype)
    meta.add_module(name, module)
    return DataWeighting(name, entry.normalize)


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
        if name in DATA_WEIGHTINGS:
            continue  # a module of the inner loss (`_data_weighting`)
        try:
            entry = learn_entry(name, raw)
        except ArgumentError as e:
            raise ConfigError(f"{e.arg}: {e}") from None
        if name not in learnable and name not in LOSS_HYPERS:
            raise ConfigError(
                f"{path}: {make_optimizer.func.__name__} has no learnable hyperparameter "
                f"'{name}' (it has {list(learnable)}; the inner loss has "
                f"{list(LOSS_HYPERS + DATA_WEIGHTINGS)})"
            )
        init = entry.init
        if name in learnable:
            field, i = learnable[name]
            value = _configured(make_optimizer, field, i)
            default = make_optimizer.func.defaults()[field]
            default = default if i is None else list(default)[i]
            if init is not None and _plain_value(value) not in (_plain_value(default), init):
                raise ConfigError(
                    f"{path}.init: {name} is given twice, {init} here and {value} as "
                    f"inner_optim.{field}{'' if i is None else f'[{i}]'}; set it in one place "
                    f"(learn.{name}.init=null starts from inner_optim.{field})"
                )
        if init is None:
            if name in LOSS_HYPERS:
                raise ConfigError(f"{path}.init: {name} needs an initial value")
            init = value
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


def _configured(make_optimizer: Any, field: str, index: int | None = None) -> Any:
    """The inner optimizer's configured value of `field` (its default where the config has
    none); `index` picks one member of a pair such as Adam's betas."""
    value = make_optimizer.keywords.get(field)
    if value is None:
        value = make_optimizer.func.defaults()[field]
    return value if index is None else list(value)[index]


def _plain_value(value: Any) -> Any:
    """A config value comparable with a signature default (lists and tuples alike)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _listed_init(
    path: str, values: list[Any] | tuple[Any, ...], scope: str, steps: int | None, params: Params
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
