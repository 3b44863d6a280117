"""Learning to reweight training examples on corrupted digits: data, methods and one run.

`run(method, noise=..., estimator=..., seed=...)` trains softmax regression on sklearn's digits
whose training split is corrupted (labels flipped, or classes made long-tailed), with a small
clean, balanced validation split as the outer objective, and returns the test metrics and the
learned weight of every training example. Everything is a plain argument, so a training
application or a sweep can call it as is; `run.py` next to this file runs the whole
experiment.

Methods (each trains the same model for the same `inner_steps` full-batch SGD steps):

- baselines: "plain" (corrupted training split, uniform weights), "clean_only" (the clean
  validation split alone), "union" (both), "oracle" (flip: only the examples whose labels
  were not flipped; imbalance: weights inversely proportional to the class counts).
- bilevel, train to completion (data hyper-cleaning, Franceschi et al. 2017): every outer step
  trains from scratch with the current weights, takes the hypergradient of the validation
  loss with `estimator` and takes one Adam step. "weights": one weight per example
  (`metagrad.weighting.ExampleWeights`); "mwn": a Meta-Weight-Net (Shu et al. 2019).
- online, one run (Ren et al. 2018; Shu et al. 2019): before every training step, the
  hypergradient of the validation loss after a one-step lookahead (exact, `Unrolled` of a
  one-step problem), then the step with the updated weights. "weights_online" and
  "mwn_online" take one Adam step on the learned weights; "l2rw" uses Ren et al.'s rule
  `w_i = max(-dL_val/d eps_i, 0)`, normalized, fresh at every step.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import metagrad
from metagrad.hypergrad import Checkpointed, FirstOrder, Implicit, Truncated, Unrolled
from metagrad.optim import SGD
from metagrad.tasks import CorruptedSplits, corrupt_digits
from metagrad.tasks.noisy import NOISES
from metagrad.weighting import ExampleWeights, MetaWeightNet, weighted_loss

__all__ = [
    "BASELINES",
    "BILEVEL",
    "ESTIMATORS",
    "METHODS",
    "NOISES",
    "ONLINE",
    "Data",
    "ReweightResult",
    "make_data",
    "run",
]

BASELINES = ("plain", "clean_only", "union", "oracle")
BILEVEL = ("weights", "mwn")
ONLINE = ("weights_online", "mwn_online", "l2rw")
METHODS = BASELINES + BILEVEL + ONLINE
ESTIMATORS = ("unrolled", "truncated", "first_order", "implicit", "checkpointed")
CLASSES = 10
OUTER_LR = {"weights": 0.1, "mwn": 3e-3, "weights_online": 0.1, "mwn_online": 3e-3}

Params = dict[str, Tensor]


#: The corrupted digits splits (one implementation, shared with the training application's
#: `task=noisy_digits`): `Data` is `metagrad.tasks.CorruptedSplits`.
Data = CorruptedSplits


#: Split sklearn's digits and corrupt the training split ("flip": a fraction `rate` of the
#: training labels replaced by another class; "imbalance": long-tailed classes at ratio
#: `imbalance`): `metagrad.tasks.corrupt_digits`, the data of `task=noisy_digits`.
make_data = corrupt_digits


@dataclass
class ReweightResult:
    """What `run` returns.

    Attributes:
        metrics: final numbers: `test/accuracy`, `test/loss`, `val/accuracy`, `val/loss`,
            `seconds` (wall) and `cpu_seconds` (this process), and for learned weightings
            `weights/mean_corrupted`, `weights/mean_clean`, `weights/auc_corrupted` (flip),
            `weights/mean_tail`, `weights/mean_head` (imbalance: the five rarest classes and
            the others), `outer/loss_first`, `outer/loss_last`, and for Implicit
            `implicit/inner_grad_norm`.
        weights: the learned weight of every training example, scaled to mean 1 (uniform for
            the baselines; for a Meta-Weight-Net its weights at the final params' losses; for
            l2rw the mean over the training steps).
        corrupted: which training labels were flipped.
        labels: the observed training labels.
        weight_fn: for a Meta-Weight-Net, `(losses, weights)` on a grid of losses; else None.
        history: per outer step (bilevel) or training step (online), a dict of metrics.
    """

    metrics: dict[str, float]
    weights: Tensor
    corrupted: Tensor
    labels: Tensor
    weight_fn: tuple[Tensor, Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def _logits(params: Params, x: Tensor) -> Tensor:
    return x @ params["w"] + params["b"]


def _zeros() -> Params:
    return {"w": torch.zeros(64, CLASSES), "b": torch.zeros(CLASSES)}


def _estimator(estimator: str, k: int, method: str, inner_lr: float) -> Any:
    if estimator == "unrolled":
        return Unrolled()
    if estimator == "truncated":
        return Truncated(k)
    if estimator == "first_order":
        return FirstOrder()
    if estimator == "implicit" and method == "mwn":
        # The inner gradient's Jacobian is not symmetric for a Meta-Weight-Net under the
        # weights' sum as normalizer (CG assumes it is): a Neumann series with the inner
        # learning rate as its step (Lorraine et al. 2020), below 2 / the largest curvature.
        return Implicit(solver="neumann", iters=30, step_size=inner_lr)
    if estimator == "implicit":
        return Implicit(solver="cg", iters=30)
    if estimator == "checkpointed":
        return Checkpointed()
    raise ValueError(f"Invalid estimator: {estimator!r} (expected one of {ESTIMATORS})")


def _evaluate(params: Params, data: Data) -> dict[str, float]:
    out = {}
    for split, x, y in (("val", data.x_val, data.y_val), ("test", data.x_test, data.y_test)):
        logits = _logits(params, x).detach()
        out[f"{split}/loss"] = float(F.cross_entropy(logits, y))
        out[f"{split}/accuracy"] = float((logits.argmax(1) == y).float().mean())
    return out


def _train(
    x: Tensor,
    y: Tensor,
    weights: Callable[[Params, Tensor], Tensor],
    *,
    steps: int,
    lr: float,
    momentum: float,
    l2: float,
) -> Params:
    """Full-batch training with per-example weights `weights(params, losses)` held constant."""
    opt = SGD(lr=lr, momentum=momentum)
    params = {n: p.requires_grad_() for n, p in _zeros().items()}
    state = opt.init(params)
    for _ in range(steps):
        losses = F.cross_entropy(_logits(params, x), y, reduction="none")
        w = weights(params, losses.detach()).detach()
        loss = weighted_loss(losses, w) + 0.5 * l2 * params["w"].pow(2).sum()
        params, state = metagrad.differentiable_step(opt, loss, params, state, create_graph=False)
        params = {n: p.detach().requires_grad_() for n, p in params.items()}
    return {n: p.detach() for n, p in params.items()}


def _uniform(params: Params, losses: Tensor) -> Tensor:
    return torch.ones_like(losses)


def _baseline(method: str, data: Data, training: dict[str, Any]) -> Params:
    x, y = data.x_train, data.y_train
    weights: Callable[[Params, Tensor], Tensor] = _uniform
    if method == "clean_only":
        x, y = data.x_val, data.y_val
    elif method == "union":
        x, y = torch.cat([x, data.x_val]), torch.cat([y, data.y_val])
    elif method == "oracle" and bool(data.corrupted.any()):
        x, y = x[~data.corrupted], y[~data.corrupted]
    elif method == "oracle":  # class-balanced: each class carries the same total weight
        per_class = 1.0 / torch.bincount(y, minlength=CLASSES).clamp_min(1).float()
        weights = lambda params, losses: per_class[y]  # noqa: E731
    return _train(x, y, weights, **training)


def _learned(method: str, n: int, hidden: int, seed: int) -> ExampleWeights | MetaWeightNet:
    if method.startswith("weights"):
        return ExampleWeights(n)  # log storage, starting at 1: the unweighted loss
    with torch.random.fork_rng(devices=[]):  # seeded, leaving the global generator alone
        torch.manual_seed(seed)
        return MetaWeightNet(hidden)


def _losses(params: Params, data: Data, idx: Tensor) -> Tensor:
    return F.cross_entropy(_logits(params, data.x_train[idx]), data.y_train[idx], reduction="none")


def _batch_weights(weighting: ExampleWeights | MetaWeightNet, idx: Tensor, losses: Tensor):
    return weighting(idx) if isinstance(weighting, ExampleWeights) else weighting(losses)


def _problem(
    data: Data,
    training: dict[str, Any],
    init: Params,
    steps: int,
    weights_of: Callable[[metagrad.MetaParameters, Tensor, Tensor], Tensor],
    normalize: str = "weights",
    momentum_buffer: Params | None = None,
) -> metagrad.InnerProblem:
    """The weighted training run as an `InnerProblem`; `weights_of(meta, idx, losses)`.

    With `momentum_buffer` (the training run's, for a one-step lookahead), the step is SGD
    without momentum on the loss plus `momentum * <buffer, params>`: the same step as SGD
    with momentum from that buffer, `params - lr * (momentum * buffer + grad)`.
    """
    everything = torch.arange(len(data.y_train))
    l2, momentum = training["l2"], training["momentum"]
    # The lookahead's step carries the momentum in the linear term below instead.
    step_momentum = momentum if momentum_buffer is None else 0.0

    def inner_loss(params: Params, meta: metagrad.MetaParameters, idx: Tensor) -> Tensor:
        losses = _losses(params, data, idx)
        penalty = 0.5 * l2 * params["w"].pow(2).sum()
        if momentum_buffer:
            penalty = penalty + sum(
                momentum * (momentum_buffer[n] * params[n]).sum() for n in params
            )
        w = weights_of(meta, idx, losses)
        return weighted_loss(losses, w, normalize=normalize) + penalty

    def outer_loss(params: Params, meta: metagrad.MetaParameters, batch: Any) -> Tensor:
        return F.cross_entropy(_logits(params, data.x_val), data.y_val)

    return metagrad.InnerProblem(
        init=init,
        optimizer=lambda meta, t: SGD(lr=training["lr"], momentum=step_momentum),
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        inner_batches=lambda t: everything,
        outer_batch=None,
        steps=steps,
    )


def _final_weights(weighting, params: Params, data: Data) -> Tensor:
    """The learned weight of every training example, scaled to mean 1."""
    everything = torch.arange(len(data.y_train))
    losses = _losses(params, data, everything).detach()
    w = _batch_weights(weighting, everything, losses).detach()
    return w / w.mean()


def _weight_fn(weighting, data: Data) -> tuple[Tensor, Tensor] | None:
    if not isinstance(weighting, MetaWeightNet):
        return None
    grid = torch.linspace(0.0, 8.0, 161)
    return grid, weighting(grid).detach()


def _bilevel(method, data, training, estimator, k, outer_steps, lr, hidden, seed, on_step):
    meta = metagrad.MetaParameters()
    meta.add_module("weights", _learned(method, len(data.y_train), hidden, seed))

    def weights_of(m: metagrad.MetaParameters, idx: Tensor, losses: Tensor) -> Tensor:
        return _batch_weights(m.value("weights"), idx, losses)

    problem = _problem(data, training, _zeros(), training["steps"], weights_of)
    hypergrad = _estimator(estimator, k, method, training["lr"])
    outer = torch.optim.Adam(meta.parameters(), lr=lr)
    history = []
    for step in range(outer_steps):
        outer.zero_grad()
        with warnings.catch_warnings():
            # FirstOrder sees no data weights: the zero gradient is the result to report.
            warnings.filterwarnings("ignore", message=".*do not affect the outer loss")
            result = hypergrad(problem, meta)
        result.apply(meta)
        outer.step()
        history.append(dict(result.metrics))
        if on_step is not None:
            on_step(step, history[-1], _final_weights(meta.weights, result.params, data))
    # The model the learned weights give: one more training run with the final weights.
    w = meta.weights
    params = _train(
        data.x_train,
        data.y_train,
        lambda params, losses: _batch_weights(w, torch.arange(len(losses)), losses),
        **training,
    )
    return params, _final_weights(w, params, data), history, _weight_fn(w, data)


def _online(method, data, training, lr, hidden, seed, on_step):
    n = len(data.y_train)
    everything = torch.arange(n)
    opt = SGD(lr=training["lr"], momentum=training["momentum"])
    params = {name: p.requires_grad_() for name, p in _zeros().items()}
    state = opt.init(params)
    meta = metagrad.MetaParameters()
    if method == "l2rw":
        # Ren et al.: perturbations eps_i of sum_i eps_i loss_i, at 0 for every step.
        meta.add_module("weights", ExampleWeights(n, 0.0, constraint=None))
        outer = None
        normalize = "none"
        used = torch.zeros(n)
    else:
        meta.add_module("weights", _learned(method, n, hidden, seed))
        outer = torch.optim.Adam(meta.parameters(), lr=lr)
        normalize = "weights"

    def weights_of(m: metagrad.MetaParameters, idx: Tensor, losses: Tensor) -> Tensor:
        return _batch_weights(m.value("weights"), idx, losses)

    history = []
    lookahead = Unrolled()
    for step in range(training["steps"]):
        init = {name: p.detach() for name, p in params.items()}
        buffer = {name: b.detach() for name, b in state.momentum_buffer.items()}
        problem = _problem(data, training, init, 1, weights_of, normalize, buffer)
        result = lookahead(problem, meta)
        losses = _losses(params, data, everything)
        if outer is None:
            w = (-result.grads["weights.raw"]).clamp_min(0.0)
            w = w / w.sum() if float(w.sum()) > 0 else w
            used = used + (w / w.mean() if float(w.sum()) > 0 else w)
        else:
            result.apply(meta)
            outer.step()
            outer.zero_grad()
            w = _batch_weights(meta.weights, everything, losses.detach()).detach()
        loss = weighted_loss(losses, w) + 0.5 * training["l2"] * params["w"].pow(2).sum()
        params, state = metagrad.differentiable_step(opt, loss, params, state, create_graph=False)
        params = {name: p.detach().requires_grad_() for name, p in params.items()}
        history.append(dict(result.metrics))
        if on_step is not None:
            on_step(step, history[-1], w / w.mean() if float(w.sum()) > 0 else w)
    params = {name: p.detach() for name, p in params.items()}
    if outer is None:
        weights = used / training["steps"]
        weights = weights / weights.mean()
    else:
        weights = _final_weights(meta.weights, params, data)
    return params, weights, history, _weight_fn(meta.weights, data)


def _auc(scores: Tensor, positive: Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def _weight_metrics(weights: Tensor, data: Data) -> dict[str, float]:
    out = {}
    if bool(data.corrupted.any()):
        out["weights/mean_corrupted"] = float(weights[data.corrupted].mean())
        out["weights/mean_clean"] = float(weights[~data.corrupted].mean())
        # How well a low weight finds a flipped label: 1 is perfect, 0.5 is chance.
        out["weights/auc_corrupted"] = _auc(-weights, data.corrupted)
    else:
        # The five rarest classes against the five most frequent ones.
        tail = data.tail()
        out["weights/mean_tail"] = float(weights[tail].mean())
        out["weights/mean_head"] = float(weights[~tail].mean())
    return out


def run(
    method: str,
    *,
    noise: str = "flip",
    rate: float = 0.4,
    imbalance: float = 100.0,
    estimator: str = "unrolled",
    k: int = 10,
    outer_steps: int = 30,
    outer_lr: float | None = None,
    inner_steps: int = 100,
    inner_lr: float = 0.5,
    momentum: float = 0.9,
    l2: float = 1e-3,
    hidden: int = 100,
    val_per_class: int = 10,
    test_per_class: int = 50,
    seed: int = 0,
    on_step: Callable[[int, dict[str, float], Tensor], None] | None = None,
) -> ReweightResult:
    """Train softmax regression on corrupted digits with `method`; return metrics and weights.

    Args:
        method: one of `METHODS` (see the module docstring).
        noise, rate, imbalance, val_per_class, test_per_class, seed: the data, as in
            `make_data`; `seed` also seeds the Meta-Weight-Net's initialization.
        estimator: the hypergradient of the bilevel methods ("weights", "mwn"): one of
            `ESTIMATORS`. The online methods take the exact one-step lookahead and accept
            only "unrolled"; baselines ignore it.
        k: the horizon of `estimator="truncated"`.
        outer_steps: Adam steps of the bilevel methods (each one a training run).
        outer_lr: Adam's learning rate on the weights (None: 0.1 for per-example log-weights,
            3e-3 for a Meta-Weight-Net).
        inner_steps, inner_lr, momentum, l2: the training run: full-batch SGD with momentum on
            the weighted cross-entropy plus `l2 / 2 * ||W||^2`, from zero weights.
        hidden: the Meta-Weight-Net's hidden units.
        on_step: called after every outer step (bilevel) or training step (online) with the
            step, its metrics and the current weights (scaled to mean 1), e.g. for TensorBoard.

    Returns:
        A `ReweightResult`.
    """
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {METHODS})")
    if estimator not in ESTIMATORS:
        raise ValueError(f"Invalid estimator: {estimator!r} (expected one of {ESTIMATORS})")
    if method in ONLINE and estimator != "unrolled":
        raise ValueError(
            f"Invalid estimator for {method!r}: {estimator!r}; the online methods take the "
            "exact one-step lookahead (estimator='unrolled')"
        )
    for name, value in (("outer_steps", outer_steps), ("inner_steps", inner_steps), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (must be an int >= 1)")
    data = make_data(
        noise,
        rate=rate,
        imbalance=imbalance,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        seed=seed,
    )
    training = dict(steps=inner_steps, lr=inner_lr, momentum=momentum, l2=l2)
    lr = OUTER_LR.get(method) if outer_lr is None else outer_lr
    started, started_cpu = time.perf_counter(), time.process_time()
    if method in BASELINES:
        params = _baseline(method, data, training)
        weights, history, weight_fn = torch.ones(len(data.y_train)), [], None
    elif method in BILEVEL:
        params, weights, history, weight_fn = _bilevel(
            method, data, training, estimator, k, outer_steps, lr, hidden, seed, on_step
        )
    else:
        params, weights, history, weight_fn = _online(
            method, data, training, lr, hidden, seed, on_step
        )
    metrics = _evaluate(params, data)
    metrics["seconds"] = time.perf_counter() - started
    # CPU time of this process (one thread): what the run costs, apart from other load.
    metrics["cpu_seconds"] = time.process_time() - started_cpu
    if method not in BASELINES:
        metrics.update(_weight_metrics(weights, data))
        if history and "outer/loss" in history[0]:
            metrics["outer/loss_first"] = history[0]["outer/loss"]
            metrics["outer/loss_last"] = history[-1]["outer/loss"]
        if history and "implicit/inner_grad_norm" in history[-1]:
            # How far the inner run is from the optimum Implicit assumes (0 there).
            metrics["implicit/inner_grad_norm"] = history[-1]["implicit/inner_grad_norm"]
    return ReweightResult(metrics, weights, data.corrupted, data.y_train, weight_fn, history)
