"""The shared machinery of the meta-learners: one per-task function, vmapped over tasks.

A learner adapts a model to each task of a meta-batch with a differentiable inner loop and
returns the mean query loss after adaptation. The per-task computation is a pure function of
(support, query, per-task buffer copies) that reads the meta-parameters by closure; it runs
under `torch.func.vmap` over the task dimension or, as a fallback, in a Python loop. Inner
gradients are taken with `torch.func.grad_and_value`, which works under vmap (where
`torch.autograd.grad` does not) and whose results the outer `loss.backward()` differentiates
again: second-order meta-gradients. First-order variants take the inner gradients at detached
parameters instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import ArgumentError, Params, check_choice, check_count, check_number, detach_tree
from ..functional import Functional, inner_grads
from ..meta_params import MetaParameters
from ..optim import SGD
from ..optim.base import Optimizer
from ._vectorize import check_vectorize, map_tasks, report_fallback, vmap_blocker

__all__ = ["MetaLearner", "OptimizerFactory", "LossFn", "Plan", "resolve_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]
#: Builds the inner optimizer from its learning rate, e.g. `metagrad.optim.Adam`,
#: `functools.partial(Adam, betas=(0.0, 0.999))` or `lambda lr: SGD(lr=lr, momentum=0.9)`.
OptimizerFactory = Callable[..., Optimizer]

_LOSSES: dict[str, LossFn] = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


def resolve_loss(loss_fn: LossFn | str) -> LossFn:
    """A loss callable from a callable or a name ("mse", "cross_entropy")."""
    if isinstance(loss_fn, str):
        if loss_fn not in _LOSSES:
            raise ArgumentError(
                "loss_fn",
                f"Invalid loss_fn: {loss_fn!r} (expected a callable or one of {sorted(_LOSSES)})",
            )
        return _LOSSES[loss_fn]
    if not callable(loss_fn):
        raise ArgumentError(
            "loss_fn", f"Invalid loss_fn: expected a callable, got {type(loss_fn).__name__}"
        )
    return loss_fn


@dataclass
class Plan:
    """What one forward pass shares across its tasks, computed once outside the task map.

    Attributes:
        theta: the meta-learned initial values of the adapted parameters.
        shared: the trainable parameters the inner loop does not adapt (ANIL's body).
        lrs: the inner learning rate of each inner step, in a form the optimizer accepts.
        steps: the number of inner steps.
        vectorized: whether the tasks run under `torch.func.vmap`. Inner gradients then come
            from `torch.func.grad`; in a loop, from `torch.autograd.grad`, which computes the
            same numbers faster outside vmap.
        explicit_steps: the caller chose the number of steps (an evaluation): the loss is the
            query loss after the last step, without training-only objectives.
        step_weights: MAML++'s multi-step loss weights for this pass, or None.
    """

    theta: Params
    shared: Params
    lrs: list[Any]
    steps: int
    vectorized: bool = False
    explicit_steps: bool = False
    step_weights: list[float] | None = None


class MetaLearner(nn.Module):
    """Base class of the meta-learners in `metagrad.learners`.

    `learner(support_x, support_y, query_x, query_y)` takes tensors with a leading task
    dimension ([tasks, shots, ...]), adapts the model to each task on its support set and
    returns the mean query loss, differentiable into `learner.parameters()`.

    Args:
        model: the network; its trainable parameters are the meta-learned initialization.
        loss_fn: `loss_fn(prediction, target) -> scalar` for the support and query sets, or a
            name: "mse" or "cross_entropy".
        inner_lr: the inner learning rate (the initial one, for learners that learn it).
        inner_steps: inner steps per task during meta-training.
        first_order: drop the second-order terms (inner gradients are taken at detached
            parameters): cheaper, biased.
        inner_optim: builds the inner optimizer from `lr=`; any `metagrad.optim` optimizer
            (default: plain SGD). Called as `inner_optim(lr=lr)`, e.g. `metagrad.optim.Adam`
            or `functools.partial(metagrad.optim.SGD, momentum=0.9)`.
        vectorize: True runs the tasks of a meta-batch in one `torch.func.vmap` call, False in
            a Python loop (same numbers), "auto" tries vmap and falls back to the loop with one
            logged warning when the model cannot be vmapped.
        randomness: vmap's randomness mode for random layers such as dropout: "different"
            (each task its own random numbers), "same" or "error".

    Raises:
        ValueError: the model has no trainable parameters, or an argument is out of range.
    """

    #: Arguments a learner fixes by construction (Reptile is always first order); passing
    #: them is refused, and they are not part of its configuration.
    fixed_arguments: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_fn: LossFn | str = "mse",
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        inner_optim: OptimizerFactory | None = None,
        vectorize: bool | str = "auto",
        randomness: str = "different",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ArgumentError(
                "model", f"Invalid model: expected an nn.Module, got {type(model).__name__}"
            )
        self.model = model
        self.fmodel = Functional(model)
        self.loss_fn = resolve_loss(loss_fn)
        self.inner_lr = check_number(inner_lr, "inner_lr", 0.0, low_open=True)
        self.inner_steps = check_count(inner_steps, "inner_steps")
        self.first_order = bool(self.fixed_arguments.get("first_order", first_order))
        self.inner_optim: OptimizerFactory = SGD if inner_optim is None else inner_optim
        if not callable(self.inner_optim):
            raise ArgumentError(
                "inner_optim",
                "Invalid inner_optim: expected a callable that takes lr= and returns a "
                f"metagrad optimizer, got {type(inner_optim).__name__}",
            )
        probe = self.inner_optim(lr=self.inner_lr)
        if not isinstance(probe, Optimizer):
            raise ArgumentError(
                "inner_optim",
                "Invalid inner_optim: inner_optim(lr=...) must return a metagrad.optim "
                f"optimizer, got {type(probe).__name__}",
            )
        self.vectorize = check_vectorize(vectorize)
        self.randomness = check_choice(randomness, "randomness", ("different", "same", "error"))
        self._vmap_failed = False
        if not any(p.requires_grad for p in model.parameters()):
            raise ArgumentError(
                "model",
                "Invalid model: it has no trainable parameters (none requires grad), so there "
                "is nothing to adapt or meta-learn",
            )
        #: Learned hyperparameters of the inner loop (Meta-SGD's and MAML++'s learning rates);
        #: empty for the others. The model's parameters are the learned initialization.
        self.meta = MetaParameters()

    @classmethod
    def refuse_fixed(cls, kwargs: Mapping[str, Any]) -> None:
        """Refuse arguments this learner fixes by construction (see `fixed_arguments`)."""
        for arg in cls.fixed_arguments:
            if arg in kwargs:
                raise ArgumentError(
                    arg,
                    f"{cls.__name__} takes no {arg}: it is {cls.fixed_arguments[arg]} by "
                    "construction",
                )

    def adapted_params(self) -> Params:
        """The model parameters the inner loop adapts, by name."""
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self.adapted_names()}

    # ----------------------------------------------------------------------------- hooks
    def adapted_names(self) -> list[str]:
        """Names of the model parameters the inner loop adapts (all trainable ones here)."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def inner_lr_at(self, step: int) -> Any:
        """The inner learning rate of inner step `step` (a number or tensors)."""
        return self.inner_lr

    def second_order(self) -> bool:
        """Whether the meta-gradient differentiates through inner gradients."""
        return not self.first_order

    def plan(self, steps: int) -> Plan:
        """Gather the meta-parameter values that every task of one forward pass uses."""
        adapted = set(self.adapted_names())
        trainable: Params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        theta = {n: p for n, p in trainable.items() if n in adapted}
        shared = {n: p for n, p in trainable.items() if n not in adapted}
        return Plan(theta, shared, [self.inner_lr_at(t) for t in range(steps)], steps)

    def task_loss(
        self, plan: Plan, buffers: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> Tensor:
        """The loss of one task: adapt on the support set, evaluate on the query set.

        Pure in its tensor arguments (the unit that vmap batches); subclasses override it.
        """
        params = self.inner_loop(plan, buffers, sx, sy, first_order=self.first_order)
        return self.query_loss(plan, params, buffers, qx, qy)

    # ------------------------------------------------------------------------- pieces
    def call_model(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor
    ) -> Tensor:
        """The model's output with `params`; buffers are copied first, so a BatchNorm layer in
        training mode updates a private copy (its statistics are those of this task's batch).
        """
        return self.fmodel(params, x, buffers={k: b.clone() for k, b in buffers.items()})

    def support_loss(
        self, plan: Plan, adapted: Params, buffers: Params, x: Tensor, y: Tensor
    ) -> Tensor:
        """The inner objective on the support set (iMAML adds its proximal term)."""
        return self.loss_fn(self.call_model({**plan.shared, **adapted}, buffers, x), y)

    def query_loss(
        self, plan: Plan, adapted: Params, buffers: Params, x: Tensor, y: Tensor
    ) -> Tensor:
        """The loss of the adapted parameters on the query set."""
        return self.loss_fn(self.call_model({**plan.shared, **adapted}, buffers, x), y)

    def inner_loop(
        self,
        plan: Plan,
        buffers: Params,
        x: Tensor,
        y: Tensor,
        *,
        first_order: bool,
        start: Params | None = None,
        steps: int | None = None,
        on_step: Callable[[int, Params], None] | None = None,
    ) -> Params:
        """Run the inner optimizer on the support loss from `start` (default: `plan.theta`).

        With `first_order` each inner gradient is taken at detached parameters, so no
        second-order term reaches the meta-parameters; the update itself still depends on them.
        `on_step(t, params)` is called after each step (MAML++'s multi-step loss).
        """
        params = dict(plan.theta if start is None else start)
        steps = plan.steps if steps is None else steps
        state = self.inner_optim(lr=plan.lrs[0] if plan.lrs else self.inner_lr).init(params)

        def objective(p: Params, bufs: Params) -> Tensor:
            return self.support_loss(plan, p, bufs, x, y)

        grad_fn: Callable[[Params, Params], Params]
        if plan.vectorized:
            grad_fn = torch.func.grad(objective)
        else:
            grad_fn = _autograd_grad(objective, not first_order and torch.is_grad_enabled())
        for t in range(steps):
            grads = grad_fn(detach_tree(params) if first_order else params, buffers)
            if first_order:
                grads = detach_tree(grads)
            optimizer = self.inner_optim(lr=plan.lrs[min(t, len(plan.lrs) - 1)])
            params, state = optimizer.step(params, grads, state)
            if on_step is not None:
                on_step(t, params)
        return params

    # ------------------------------------------------------------------------- public
    def forward(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        *,
        steps: int | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """Adapt to every task of the meta-batch and return the query loss after adaptation.

        Args:
            support_x: support inputs, [tasks, shots, ...].
            support_y: support targets, [tasks, shots, ...].
            query_x: query inputs, [tasks, query_shots, ...].
            query_y: query targets, [tasks, query_shots, ...].
            steps: inner steps (default: `inner_steps`), e.g. more steps at evaluation time.
                Given explicitly, the loss is the query loss after the last step (no
                training-only objective such as MAML++'s multi-step loss).
            reduction: "mean" over tasks (a scalar) or "none" (one loss per task).

        Returns:
            The query loss, differentiable into `self.parameters()`.

        Raises:
            ValueError: the four tensors disagree on the number of tasks, a set has zero
                shots, inputs and targets disagree on the number of shots.
        """
        tasks = _check_meta_batch(support_x, support_y, query_x, query_y)
        evaluating = steps is not None
        steps = self._check_steps(steps)
        check_choice(reduction, "reduction", ("mean", "none"))
        plan = self.plan(steps)
        plan.explicit_steps = evaluating

        def fn(bufs: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            return self.task_loss(plan, bufs, sx, sy, qx, qy)

        losses = self._map_tasks(fn, plan, tasks, (support_x, support_y, query_x, query_y))
        return losses.mean() if reduction == "mean" else losses

    def evaluate(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        *,
        steps: int | None = None,
        metric: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Per-task query loss (and metric) after adapting with `steps` inner steps.

        Evaluation keeps no graph to the meta-parameters (inner gradients are taken first
        order; the adapted values are the same as in training).

        Args:
            support_x: support inputs of a meta-batch, as for `forward`.
            support_y: support targets.
            query_x: query inputs.
            query_y: query targets.
            steps: inner steps (default `inner_steps`); 0 evaluates the initialization itself.
            metric: `metric(prediction, target) -> scalar`, e.g. accuracy; None for none.

        Returns:
            The query losses [tasks] and the metric values [tasks] (or None), detached.
        """
        tasks = _check_meta_batch(support_x, support_y, query_x, query_y)
        steps = self._check_steps(steps, allow_zero=True)
        plan = self.plan(max(steps, 1))
        plan.explicit_steps = True

        def fn(bufs: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            adapted = dict(plan.theta)
            if steps:
                adapted = self.inner_loop(plan, bufs, sx, sy, first_order=True, steps=steps)
            prediction = self.call_model({**plan.shared, **adapted}, bufs, qx)
            loss = self.loss_fn(prediction, qy)
            value = loss if metric is None else metric(prediction, qy).to(loss.dtype)
            return torch.stack([loss, value])

        with torch.no_grad():
            out = self._map_tasks(fn, plan, tasks, (support_x, support_y, query_x, query_y))
        return out[:, 0], None if metric is None else out[:, 1]

    def _map_tasks(
        self, fn: Callable[..., Tensor], plan: Plan, tasks: int, sets: tuple[Tensor, ...]
    ) -> Tensor:
        """`fn(buffers, *sets)` for each task, vmapped where possible, else in a loop."""
        buffers = {k: b.expand(tasks, *b.shape) for k, b in self.model.named_buffers()}
        args = (buffers, *sets)
        if self._use_vmap():
            plan.vectorized = True
            try:
                return map_tasks(fn, args, tasks, vectorize=True, randomness=self.randomness)
            except (RuntimeError, NotImplementedError) as err:
                if self.vectorize is True:
                    raise
                # An error the loop raises too is the model's, not vmap's: it propagates, and
                # later calls still try vmap.
                plan.vectorized = False
                out = map_tasks(fn, args, tasks, vectorize=False)
                self._vmap_failed = True
                report_fallback(type(self).__name__, err)
                return out
        plan.vectorized = False
        return map_tasks(fn, args, tasks, vectorize=False)

    def adapt(self, x: Tensor, y: Tensor, steps: int | None = None) -> Params:
        """Adapt to one new task (no task dimension) and return all the model's parameters.

        Args:
            x: the task's support inputs, [shots, ...].
            y: the task's support targets, [shots, ...].
            steps: inner steps; any number, default `inner_steps`.

        Returns:
            The adapted parameters by name (shared ones included), for `predict`. They carry
            the graph back to the meta-parameters unless called under `torch.no_grad()`.
        """
        _check_set(x, y, "support")
        steps = self._check_steps(steps, allow_zero=True)
        plan = self.plan(max(steps, 1))
        buffers = dict(self.model.named_buffers())
        adapted = self.inner_loop(plan, buffers, x, y, first_order=self.first_order, steps=steps)
        return {**plan.shared, **adapted}

    def predict(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The model's output on `x` with `params` (e.g. from `adapt`); buffers are copied."""
        return self.call_model(params, dict(self.model.named_buffers()), x)

    # ----------------------------------------------------------------------- helpers
    def _check_steps(self, steps: int | None, allow_zero: bool = False) -> int:
        if steps is None:
            return self.inner_steps
        return check_count(steps, "steps", 0 if allow_zero else 1)

    def _use_vmap(self) -> bool:
        if self.vectorize is False:
            return False
        blocker = vmap_blocker(self.model, self.second_order())
        if self.vectorize is True:
            if blocker is not None:
                raise ValueError(
                    f"vectorize=True cannot give correct meta-gradients here: {blocker}. Use "
                    "vectorize='auto' or vectorize=False (tasks in a loop), or first_order=True"
                )
            return True
        if self._vmap_failed:
            return False
        if blocker is not None:
            self._vmap_failed = True
            report_fallback(type(self).__name__, blocker)
            return False
        return True

    def extra_repr(self) -> str:
        optim = getattr(self.inner_optim, "__name__", type(self.inner_optim).__name__)
        return (
            f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, "
            f"first_order={self.first_order}, inner_optim={optim}, vectorize={self.vectorize!r}"
        )


def _autograd_grad(
    objective: Callable[[Params, Params], Tensor], create_graph: bool
) -> Callable[[Params, Params], Params]:
    """`torch.func.grad(objective)` computed with `torch.autograd.grad` (outside vmap only).

    Parameters that do not require grad (detached, for first-order steps) are differentiated
    as fresh leaves; with `create_graph` the gradients are differentiable (second order).
    """

    def grad(params: Params, buffers: Params) -> Params:
        leaves = {
            k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()
        }
        with torch.enable_grad():
            loss = objective(leaves, buffers)
            return inner_grads(loss, leaves, create_graph=create_graph)

    return grad


def _check_set(x: Tensor, y: Tensor, name: str, batched: bool = False) -> None:
    for arg, t in ((f"{name}_x", x), (f"{name}_y", y)):
        if not isinstance(t, Tensor):
            raise ValueError(f"Invalid {arg}: expected a tensor, got {type(t).__name__}")
    dim = 1 if batched else 0
    need = 2 if batched else 1
    for arg, t in ((f"{name}_x", x), (f"{name}_y", y)):
        if t.dim() < need:
            layout = "[tasks, shots, ...]" if batched else "[shots, ...]"
            raise ValueError(f"Invalid {arg}: expected {layout}, got shape {tuple(t.shape)}")
    if x.shape[dim] == 0:
        raise ValueError(
            f"Invalid {name} set: it has zero shots ({name}_x has shape "
            f"{tuple(x.shape)}); every task needs at least one example"
        )
    if x.shape[dim] != y.shape[dim]:
        raise ValueError(
            f"Invalid {name} set: {name}_x has {x.shape[dim]} shots but {name}_y has "
            f"{y.shape[dim]} (shapes {tuple(x.shape)} and {tuple(y.shape)})"
        )


def _check_meta_batch(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> int:
    """Validate a meta-batch and return its number of tasks."""
    named = {"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy}
    for arg, t in named.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"Invalid {arg}: expected a tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"Invalid {arg}: expected a leading task dimension, [tasks, shots, ...], got "
                f"shape {tuple(t.shape)}"
            )
    counts = {arg: t.shape[0] for arg, t in named.items()}
    if len(set(counts.values())) != 1:
        shown = ", ".join(f"{a}: {c}" for a, c in counts.items())
        raise ValueError(
            f"Mismatched task dimensions: the tensors hold different numbers of tasks ({shown})"
        )
    if counts["support_x"] == 0:
        raise ValueError("Invalid meta-batch: it holds zero tasks")
    _check_set(sx, sy, "support", batched=True)
    _check_set(qx, qy, "query", batched=True)
    return counts["support_x"]
