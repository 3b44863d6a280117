"""Hyperparameter gradients through whole inner training runs (the default `loop=hpo`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import Functional
from ..hypergrad import NonFiniteLossError
from ..meta_params import MetaParameters
from ..optim.base import Optimizer
from ..problem import InnerProblem
from .data import DigitsTask
from .loop import StepOutcome

__all__ = ["HPOJob", "LearnedHyper", "mix_seed", "LOSS_HYPERS", "BETA_NAMES", "configured_betas"]

# Learnable hyperparameters of the inner loss rather than of the optimizer: `l2` adds
# 0.5 * l2 * ||w||^2 (per layer or per element with those scopes) to the training loss. The
# implicit estimator sees only these.
LOSS_HYPERS = ("l2",)

# The two coefficients of an Adam-family `betas` pair, learned as separate entries.
BETA_NAMES = ("beta1", "beta2")

Params = dict[str, Tensor]


def configured_betas(make_optimizer: Callable[..., Optimizer]) -> tuple[float, float]:
    """The `betas` a partial optimizer constructor was configured with (or its default)."""
    betas = getattr(make_optimizer, "keywords", {}).get("betas")
    if betas is None:
        func = getattr(make_optimizer, "func", make_optimizer)
        betas = inspect.signature(func).parameters["betas"].default
    return float(betas[0]), float(betas[1])


def mix_seed(seed: int, index: int, salt: int = 0) -> int:
    """A reproducible seed for outer step `index` of a run seeded by `seed`."""
    return (seed * 1_000_003 + index * 7_919 + salt * 104_729) % (2**62)


@dataclass(frozen=True)
class LearnedHyper:
    """How one learned hyperparameter is stored: its scope and whether it is a schedule."""

    scope: str
    per_step: bool


class HPOJob:
    """Each outer step trains a fresh model for `steps` inner steps and updates the hypers.

    The initial weights, the inner batches and the outer batch of outer step `i` come from a
    generator seeded by `(seed, i)`, so a run is reproducible and a resumed run continues with
    exactly the batches it would have seen.

    Args:
        task: the data (training batches for the inner loop, validation for the outer loss).
        make_model: builds the model (called under a fixed seed for each initialization).
        make_optimizer: `(**hyperparameters) -> metagrad.optim optimizer` with the fixed
            hyperparameters already bound.
        meta: the learnable hyperparameters (names are keyword arguments of `make_optimizer`).
        learned: scope and schedule flag of each entry of `meta`.
        method: the hypergradient estimator.
        outer_optimizer: a torch.optim optimizer over `meta.parameters()`.
        steps: the inner horizon T.
        seed: the run's seed.
        eval_steps: inner steps of validation runs (None: `steps`).
    """

    def __init__(
        self,
        *,
        task: DigitsTask,
        make_model: Callable[[], nn.Module],
        make_optimizer: Callable[..., Optimizer],
        meta: MetaParameters,
        learned: Mapping[str, LearnedHyper],
        method: Callable[[InnerProblem, MetaParameters], Any],
        outer_optimizer: torch.optim.Optimizer,
        steps: int,
        seed: int = 0,
        eval_steps: int | None = None,
    ) -> None:
        self.task = task
        self.make_model = make_model
        self.dtype = task.train.x.dtype
        self.fmodel = Functional(self._fresh_model(seed))
        self.make_optimizer = make_optimizer
        self.meta = meta
        self.learned = dict(learned)
        self.method = method
        self.outer_optimizer = outer_optimizer
        self.steps = steps
        self.seed = seed
        self.eval_steps = eval_steps or steps

    # ------------------------------------------------------------------ the inner problem
    def _fresh_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.make_model().to(self.dtype)

    def init_params(self, seed: int) -> Params:
        """Freshly initialized weights, the same for the same seed."""
        return {n: p.detach() for n, p in self._fresh_model(seed).named_parameters()}

    def optimizer(self, meta: MetaParameters, t: int) -> Optimizer:
        """The inner optimizer of inner step `t`, built from the meta-parameters' values."""
        values = {}
        for name, spec in self.learned.items():
            if name in LOSS_HYPERS:
                continue
            # A schedule longer runs (eval_steps > steps) keep its last value.
            step = min(t, self.steps - 1) if spec.per_step else None
            values[name] = meta.value(name, step=step)
        if any(b in values for b in BETA_NAMES):
            fixed = configured_betas(self.make_optimizer)
            values["betas"] = tuple(
                values.pop(b, f) for b, f in zip(BETA_NAMES, fixed, strict=True)
            )
        return self.make_optimizer(**values)

    def loss(self, params: Params, meta: MetaParameters, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Cross-entropy of the model with `params` on `batch`."""
        x, y = batch
        return F.cross_entropy(self.fmodel(params, x), y)

    def inner_loss(
        self, params: Params, meta: MetaParameters, batch: tuple[Tensor, Tensor]
    ) -> Tensor:
        """The training loss: cross-entropy plus any learned L2 penalty."""
        loss = self.loss(params, meta, batch)
        if "l2" in self.learned:
            l2 = meta.value("l2")
            for name, p in params.items():
                coef = l2[name] if isinstance(l2, dict) else l2
                loss = loss + 0.5 * (coef * p * p).sum()
        return loss

    def problem(self, index: int) -> InnerProblem:
        """The inner problem of outer step `index`."""
        s = mix_seed(self.seed, index)
        return InnerProblem(
            init=self.init_params(s),
            optimizer=self.optimizer,
            inner_loss=self.inner_loss,
            outer_loss=self.loss,
            inner_batches=self.task.inner_batches(s, self.steps),
            outer_batch=self.task.outer_batch(s),
            steps=self.steps,
            implicit_batch=(self.task.train.x, self.task.train.y),
        )

    # ------------------------------------------------------------------ the Job interface
    def step(self, index: int) -> StepOutcome:
        self.outer_optimizer.zero_grad(set_to_none=True)
        try:
            result = self.method(self.problem(index), self.meta)
        except NonFiniteLossError as e:
            return StepOutcome({}, finite=False, reason=str(e))
        metrics = dict(result.metrics)
        if not result.is_finite():
            bad = [n for n, g in result.grads.items() if not bool(torch.isfinite(g).all())]
            return StepOutcome(metrics, finite=False, reason=f"non-finite meta-gradient of {bad}")
        result.apply(self.meta)
        self.outer_optimizer.step()
        return StepOutcome(metrics)

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Train a fresh model with the current hyperparameters (no graph) and score it."""
        params = self.init_params(mix_seed(self.seed, 0, salt=1))
        batches = self.task.inner_batches(mix_seed(self.seed, 0, salt=2), self.eval_steps)
        params = {n: p.requires_grad_() for n, p in params.items()}
        state = None
        train_loss = torch.tensor(float("nan"))
        for t, batch in enumerate(batches):
            with torch.no_grad():
                opt = self.optimizer(self.meta, t)
            if state is None:
                state = opt.init(params)
            train_loss = self.inner_loss(params, self.meta, batch)
            if not bool(torch.isfinite(train_loss)):
                break
            grads = torch.autograd.grad(train_loss, list(params.values()))
            grads = dict(zip(params, grads, strict=True))
            with torch.no_grad():
                params, state = opt.step(params, grads, state)
            params = {n: p.detach().requires_grad_() for n, p in params.items()}
        out = {"val/train_loss": float(train_loss.detach())}
        splits = {"val": self.task.val} | ({"test": self.task.test} if final else {})
        with torch.no_grad():
            for name, split in splits.items():
                if len(split.y) == 0:
                    continue
                logits = self.fmodel(params, split.x)
                out[f"{name}/loss"] = float(F.cross_entropy(logits, split.y))
                out[f"{name}/accuracy"] = float((logits.argmax(-1) == split.y).double().mean())
        return out

    def meta_scalars(self) -> dict[str, float]:
        return {f"meta/{k}": v for k, v in self.meta.scalars().items()}

    def meta_tensors(self) -> dict[str, Tensor]:
        out = {}
        with torch.no_grad():
            for name, spec in self.learned.items():
                if spec.scope != "per_element":
                    continue
                if spec.per_step:
                    raw = self.meta.value(name, step=self.steps - 1)
                else:
                    raw = self.meta.value(name)
                out.update({f"meta/{name}/{p}": v for p, v in raw.items()})
        return out

    def meta_schedules(self) -> dict[str, Tensor]:
        return {
            f"schedule/{name}": self.meta.schedule(name)
            for name, spec in self.learned.items()
            if spec.per_step and spec.scope != "per_element"
        }

    def layout(self) -> dict[str, list[str]]:
        """Charts that group several tags: per-layer values of each hyperparameter, losses."""
        groups = {"losses": ["outer/loss", "inner/loss", "val/loss"]}
        for name, spec in self.learned.items():
            if spec.scope == "per_layer":
                groups[f"{name} per layer"] = [f"meta/{name}/.*"]
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta.state_dict(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.meta.load_state_dict(state["meta"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
