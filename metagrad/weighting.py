"""Data weighting meta-parameters: per-example weights, Meta-Weight-Net and the weighted loss.

A data weighting gives each training example of a batch a weight `w_i >= 0`; the inner loss is
`weighted_loss(losses, w) = sum_i w_i * loss_i / Z`. Learning the weights on a clean validation
loss through the inner training run down-weights examples whose gradients hurt it (flipped
labels) and up-weights rare ones (Ren et al. 2018, "Learning to Reweight Examples for Robust
Deep Learning"; Shu et al. 2019, "Meta-Weight-Net"; Franceschi et al. 2017's data
hyper-cleaning). Both weightings are `nn.Module`s, added to the meta-parameters with
`meta.add_module`:

>>> meta = MetaParameters()
>>> meta.add_module("weights", ExampleWeights(len(train)))       # one weight per example
>>> def inner_loss(params, meta, idx):
...     losses = F.cross_entropy(fmodel(params, X[idx]), y[idx], reduction="none")
...     return weighted_loss(losses, meta.value("weights")(idx))
>>> # or a Meta-Weight-Net, mapping each example's loss to its weight:
>>> meta.add_module("weights", MetaWeightNet(hidden=100))
>>> ...     return weighted_loss(losses, meta.value("weights")(losses))

Data weights act on training only through the inner gradient, so `FirstOrder` (which takes
the inner gradients as constants) gives them a zero meta-gradient; `Unrolled`, `Truncated`,
`Checkpointed`, `ForwardMode` and `Implicit` (they are inner-loss meta-parameters) see them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._checks import ArgumentError, check_choice, check_count
from .meta_params import (
    Constraint,
    _check_constraint,
    _check_init,
    _to_constrained,
    _to_unconstrained,
)

__all__ = ["ExampleWeights", "MetaWeightNet", "weighted_loss", "NORMALIZERS"]

NORMALIZERS = ("weights", "count", "none")


class ExampleWeights(nn.Module):
    """One learnable weight per training example, looked up by the example indices of a batch.

    The weights are stored unconstrained in `raw` (shape `[num_examples]`) and read through
    `constraint`, with `MetaParameters`' vocabulary:

    - `"positive"` (default): `w = exp(raw)`. A weight can shrink geometrically towards zero
      (an outer Adam step of size `lr` changes it by a factor of about `exp(lr)`) but never
      turns negative, which would make the inner loss reward fitting the example worse. With
      `weighted_loss(..., normalize="weights")` only the ratios of the weights matter, and a
      log storage moves ratios evenly. Starts at 1 (the unweighted loss).
    - `"unit"`: `w = sigmoid(raw)` in (0, 1), as in data hyper-cleaning (Franceschi et al.
      2017); it cannot start at 1 and its gradient fades near both ends.
    - `None`: free weights, as Ren et al.'s perturbations `eps_i` (start at 0 and take the
      meta-gradient at 0); negative values are allowed, so normalize with "count" or "none".

    Args:
        num_examples: the number of training examples (indices run over `0..num_examples-1`).
        init: the initial (constrained) weight: a number, or a tensor of shape
            `[num_examples]`.
        constraint: "positive", "unit", None or a pair (low, high).
        dtype: storage dtype (default: a floating-point `init`'s, else torch's default).
    """

    def __init__(
        self,
        num_examples: int,
        init: float | Tensor = 1.0,
        *,
        constraint: Constraint = "positive",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_count(num_examples, "num_examples")
        _check_constraint(constraint, "ExampleWeights")
        _check_init(init, "ExampleWeights")
        if dtype is None:
            floating = isinstance(init, Tensor) and init.is_floating_point()
            dtype = (
                init.dtype if isinstance(init, Tensor) and floating else torch.get_default_dtype()
            )
        value = torch.as_tensor(init.detach() if isinstance(init, Tensor) else init, dtype=dtype)
        if value.dim() == 0:
            value = value.expand(num_examples)
        if value.shape != (num_examples,):
            raise ArgumentError(
                "init",
                f"Invalid init: shape {tuple(value.shape)}, expected a number or shape "
                f"({num_examples},)",
            )
        self.constraint = constraint
        self.raw = nn.Parameter(_to_unconstrained(value.clone(), constraint, "ExampleWeights"))

    @property
    def num_examples(self) -> int:
        """The number of training examples."""
        return self.raw.shape[0]

    def values(self) -> Tensor:
        """All weights (constrained), shape `[num_examples]`, differentiable into `raw`."""
        return _to_constrained(self.raw, self.constraint)

    def forward(self, indices: Tensor) -> Tensor:
        """The weights of the examples `indices` (a 1-D integer tensor), shape `[len(indices)]`.

        Raises:
            ArgumentError (a ValueError): `indices` is not a 1-D integer tensor or holds an
                index outside `0..num_examples-1`.
        """
        indices = _check_indices(indices, self.num_examples)
        return _to_constrained(self.raw.index_select(0, indices), self.constraint)

    def extra_repr(self) -> str:
        return f"num_examples={self.num_examples}, constraint={self.constraint!r}"


def _check_indices(indices: Any, n: int) -> Tensor:
    if not isinstance(indices, Tensor):
        raise ArgumentError(
            "indices", f"indices must be a tensor of example indices, got {type(indices)}"
        )
    if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex():
        raise ArgumentError(
            "indices",
            f"indices must be a 1-D integer tensor, got dtype {indices.dtype} and shape "
            f"{tuple(indices.shape)}",
        )
    if indices.dtype == torch.bool:
        raise ArgumentError(
            "indices", "indices must be integer example indices, not a boolean mask"
        )
    if indices.numel() and bool(((indices < 0) | (indices >= n)).any()):
        bad = indices[(indices < 0) | (indices >= n)]
        raise ArgumentError(
            "indices",
            f"indices out of range: {bad[:5].tolist()} (the weights cover examples 0..{n - 1})",
        )
    return indices.long()


class MetaWeightNet(nn.Module):
    """Meta-Weight-Net (Shu et al. 2019): an MLP mapping an example's loss to its weight.

    `w = sigmoid(W2 relu(W1 loss + b1) + b2)`, a network 1 -> `hidden` -> 1 (100 hidden units
    in the paper), so `0 < w < 1`. It learns a weighting function shared by all examples:
    decreasing in the loss under label noise (large losses are likely flipped labels),
    increasing under class imbalance (large losses are likely rare classes). Initialized by
    `nn.Linear`'s default (from torch's global random generator): at the start the weights are
    near 0.5 and depend little on the loss.

    The loss enters the network as a value: `weighted_loss` treats the weights as constants in
    the inner gradient (the update of Shu et al.'s eq. 3), while the meta-gradient follows the
    weights' dependence on the network and, over an unrolled run, on the model's params.

    Args:
        hidden: hidden units (>= 1).
        dtype: dtype of the network's parameters (default: torch's default).
    """

    def __init__(self, hidden: int = 100, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_count(hidden, "hidden")
        self.net = nn.Sequential(
            nn.Linear(1, hidden, dtype=dtype), nn.ReLU(), nn.Linear(hidden, 1, dtype=dtype)
        )

    def forward(self, losses: Tensor) -> Tensor:
        """The weights of examples with per-example `losses` (shape `[B]`), shape `[B]`.

        Raises:
            ArgumentError (a ValueError): `losses` is not a 1-D floating-point tensor.
        """
        if not isinstance(losses, Tensor) or losses.dim() != 1 or not losses.is_floating_point():
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ArgumentError(
                "losses",
                f"losses must be a 1-D floating-point tensor of per-example losses "
                f"(reduction='none'), got {shape}",
            )
        return torch.sigmoid(self.net(losses.unsqueeze(-1))).squeeze(-1)


class _WeightedSum(torch.autograd.Function):
    """`sum_i w_i l_i / Z` whose gradient reaches the losses only: `d/d l_i = w_i / Z`.

    The backward pass is written with differentiable operations, so with `create_graph=True`
    the inner gradient `sum_i (w_i / Z) grad l_i` keeps its graph into the weights (and
    through them into the meta-parameters and the params); only the first-order path from
    the loss value into the weights is absent.
    """

    @staticmethod
    def forward(ctx: Any, losses: Tensor, weights: Tensor, normalize: str) -> Tensor:
        ctx.normalize = normalize
        ctx.save_for_backward(weights)
        ctx.save_for_forward(losses, weights)
        return (weights * losses).sum() / _normalizer(weights, normalize)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (weights,) = ctx.saved_tensors
        return grad * weights / _normalizer(weights, ctx.normalize), None, None

    @staticmethod
    def jvp(ctx: Any, d_losses: Tensor | None, d_weights: Tensor | None, _: Any) -> Tensor:
        losses, weights = ctx.saved_tensors
        if d_losses is None:
            return torch.zeros((), dtype=losses.dtype, device=losses.device)
        return (weights * d_losses).sum() / _normalizer(weights, ctx.normalize)


def _normalizer(weights: Tensor, normalize: str) -> Tensor | float:
    if normalize == "weights":
        # All-zero weights give a zero loss rather than 0 / 0.
        return weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
    if normalize == "count":
        return float(max(weights.numel(), 1))
    return 1.0


def weighted_loss(losses: Tensor, weights: Tensor, *, normalize: str = "weights") -> Tensor:
    """The weighted inner loss `sum_i w_i * loss_i / Z` of a batch.

    The weights act as given values in the inner gradient: `d loss / d loss_i = w_i / Z`, and
    the loss has no gradient of its own into the weights. Data weights reach the meta-gradient
    through the inner gradient `sum_i (w_i / Z) grad loss_i` only, which keeps its graph into
    them (take it with `create_graph=True`, as the inner loops of `metagrad.hypergrad` do). For
    per-example weights this is the plain weighted sum's gradient; for a Meta-Weight-Net,
    whose weights depend on the losses, it is the method's update (the model does not lower
    an example's loss by changing its weight). The Jacobian of that inner gradient is then
    symmetric for "count" and "none" (it is the Hessian of `sum_i G(loss_i)`, `G' = net`) but
    not for "weights": there `Implicit` needs `solver="neumann"` or `"fixed_point"`, as
    conjugate gradient assumes symmetry.

    Args:
        losses: per-example losses, shape `[B]` (e.g. `cross_entropy(..., reduction="none")`).
        weights: their weights, shape `[B]`, nonnegative for `normalize="weights"`.
        normalize: `Z`. "weights": the sum of the batch's weights (Ren et al.): the loss is a
            weighted mean, and scaling all weights changes nothing (the outer loop cannot
            raise the inner learning rate through them). "count": the batch size B
            (Meta-Weight-Net's released code). "none": 1.

    Returns:
        A scalar tensor.

    Raises:
        ArgumentError (a ValueError): the shapes do not match, either is not 1-D floating
            point, or `normalize` is unknown.
    """
    check_choice(normalize, "normalize", NORMALIZERS)
    for name, t in (("losses", losses), ("weights", weights)):
        if not isinstance(t, Tensor) or t.dim() != 1 or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ArgumentError(name, f"{name} must be a 1-D floating-point tensor, got {shape}")
    if losses.shape != weights.shape:
        raise ArgumentError(
            "weights",
            f"losses and weights must have the same shape, got {tuple(losses.shape)} and "
            f"{tuple(weights.shape)}",
        )
    if weights.dtype != losses.dtype:
        weights = weights.to(losses.dtype)
    return _WeightedSum.apply(losses, weights, normalize)
