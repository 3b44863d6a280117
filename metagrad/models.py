"""Standard networks for meta-learning experiments: an MLP, the few-shot conv net, a small ResNet.

All are plain `nn.Module`s (metagrad calls them through `torch.func.functional_call`). The
convolutional ones take a `norm` argument:

* `"batch"`: BatchNorm with the statistics of the current batch and no running statistics,
  as in MAML's reference code (each task normalizes with its own batch). PyTorch's vmap gives
  wrong second-order gradients through batch normalization, so second-order learners run the
  tasks of a meta-batch in a loop with this choice (see `metagrad.learners`).
* `"group"`: GroupNorm, which vmaps correctly in every learner (the fast choice).
* `"none"`: no normalization.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from ._checks import check_choice, check_count

__all__ = ["mlp", "conv4", "resnet", "NORMS"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}

#: The `norm` choices of the convolutional networks.
NORMS = ("batch", "group", "none")


def mlp(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (128,),
    activation: str = "relu",
) -> nn.Sequential:
    """A multilayer perceptron `in -> hidden[0] -> ... -> out` with one activation between.

    Args:
        in_features: input size.
        out_features: output size.
        hidden: sizes of the hidden layers (may be empty: a linear model).
        activation: "relu", "tanh", "gelu" or "sigmoid".

    Returns:
        An `nn.Sequential` whose parameter names are `0.weight`, `0.bias`, `2.weight`, ...
    """
    check_choice(activation, "activation", tuple(_ACTIVATIONS))
    sizes = [
        check_count(in_features, "in_features"),
        *(check_count(h, "hidden") for h in hidden),
        check_count(out_features, "out_features"),
    ]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i:
            layers.append(_ACTIVATIONS[activation]())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if kind == "group":
        # Groups of (about) four channels: a group of one channel at 1x1 resolution would
        # normalize a single number (a constant output, numerically fragile gradients).
        return nn.GroupNorm(math.gcd(channels, max(1, channels // 4)), channels)
    return nn.Identity()


class _Images(nn.Module):
    """Reshape flat inputs [batch, C*H*W] to images [batch, C, H, W]; images pass unchanged."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.shape = (channels, size, size)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape) if x.dim() == 2 else x


def conv4(
    in_channels: int,
    num_classes: int,
    image_size: int,
    hidden: int = 64,
    norm: str = "batch",
    blocks: int = 4,
) -> nn.Sequential:
    """The standard few-shot convolutional network (Vinyals et al. 2016; Finn et al. 2017).

    `blocks` blocks of 3x3 convolution (`hidden` channels, padding 1), normalization, ReLU and
    2x2 max-pooling, then a linear classifier. Pooling rounds up, so small images (digits'
    8x8) keep at least one pixel.

    Args:
        in_channels: channels of the input images (1 for Omniglot and digits, 3 for RGB).
        num_classes: outputs (N in N-way classification).
        image_size: side of the square input images.
        hidden: channels of every convolution (64 in the papers; 32 is common for
            mini-ImageNet).
        norm: "batch", "group" or "none" (see the module docstring).
        blocks: number of convolutional blocks.
    """
    check_choice(norm, "norm", NORMS)
    size = check_count(image_size, "image_size")
    layers: list[nn.Module] = [_Images(check_count(in_channels, "in_channels"), size)]
    channels = in_channels
    for _ in range(check_count(blocks, "blocks")):
        layers += [
            nn.Conv2d(channels, check_count(hidden, "hidden"), 3, padding=1),
            _norm(norm, hidden),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
        ]
        channels, size = hidden, math.ceil(size / 2)
    layers += [
        nn.Flatten(),
        nn.Linear(hidden * size * size, check_count(num_classes, "num_classes")),
    ]
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """A residual block: two 3x3 convolutions with normalization, a projected shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet(
    in_channels: int,
    num_classes: int,
    image_size: int,
    widths: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
    norm: str = "group",
) -> nn.Sequential:
    """A small ResNet: a 3x3 stem, stages of residual blocks, global average pooling, linear.

    With the defaults it is a ResNet-8 (three stages of one two-convolution block); the first
    stage keeps the resolution, each later one halves it.

    Args:
        in_channels: channels of the input images.
        num_classes: outputs.
        image_size: side of the square input images (flat inputs are reshaped to it).
        widths: channels of each stage.
        blocks_per_stage: residual blocks per stage.
        norm: "batch", "group" (default) or "none".
    """
    check_choice(norm, "norm", NORMS)
    if not widths:
        raise ValueError("Invalid widths: at least one stage is needed")
    widths = [check_count(w, "widths") for w in widths]
    layers: list[nn.Module] = [
        _Images(check_count(in_channels, "in_channels"), check_count(image_size, "image_size")),
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        _norm(norm, widths[0]),
        nn.ReLU(),
    ]
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(check_count(blocks_per_stage, "blocks_per_stage")):
            stride = 2 if i > 0 and j == 0 else 1
            layers.append(_Block(cin, w, stride, norm))
            cin = w
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(cin, check_count(num_classes, "num_classes")),
    ]
    return nn.Sequential(*layers)
