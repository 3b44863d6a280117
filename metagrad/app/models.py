"""Small models built from config values."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["mlp"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    activation: str = "relu",
) -> nn.Sequential:
    """A multilayer perceptron `in -> hidden[0] -> ... -> out` with one activation between.

    Args:
        in_features: input size.
        hidden: sizes of the hidden layers (may be empty: a linear model).
        out_features: output size.
        activation: "relu", "tanh", "gelu" or "sigmoid".

    Returns:
        An `nn.Sequential` whose parameter names are `0.weight`, `0.bias`, `2.weight`, ...
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"Invalid activation: {activation!r} (one of {sorted(_ACTIVATIONS)})")
    sizes = [in_features, *hidden, out_features]
    if any(int(s) < 1 for s in sizes):
        raise ValueError(f"Invalid layer sizes: {sizes} (all must be >= 1)")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i:
            layers.append(_ACTIVATIONS[activation]())
        layers.append(nn.Linear(int(a), int(b)))
    return nn.Sequential(*layers)
