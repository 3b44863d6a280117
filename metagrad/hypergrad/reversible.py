"""Exact hypergradients of SGD with momentum by reversing the training run (reversible learning)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import Params, check_count, detach_tree
from ..functional import inner_grads
from ..meta_params import MetaParameters
from ..optim import SGD
from ..optim._hyper import is_zero, resolve
from ..optim._ops import coupled_decay
from ..optim.sgd import SGDState
from ..problem import InnerProblem
from ._sweep import ValueGrads, add_into, hessian_vector
from .base import Estimate, Estimator, InnerRun, _check_finite, outer_loss, start

__all__ = ["FixedPointSGD", "InfoBuffer", "Reversible"]

_SPILL_BITS = 32


class _Ints:
    """Integer kernels on flat vectors: NumPy for CPU tensors, PyTorch on other devices.

    NumPy divides int64 vectors by a constant several times faster than PyTorch on CPU
    (libdivide) and has less overhead per operation; both compute the same bits. Arrays cross
    to PyTorch without copies (`torch.from_numpy`, `Tensor.numpy`).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, use_numpy: bool | None) -> None:
        if use_numpy is None:
            use_numpy = device.type == "cpu" and dtype in (torch.float32, torch.float64)
        self.numpy = use_numpy
        self.device = device
        self.dtype = dtype
        self.np_float = torch.empty((), dtype=dtype).numpy().dtype if use_numpy else None

    def array(self, x: Tensor) -> Any:
        """A backend array of `x` (no copy for a contiguous CPU tensor)."""
        return x.detach().contiguous().numpy() if self.numpy else x.detach()

    def tensor(self, a: Any) -> Tensor:
        """A tensor of a backend array (no copy)."""
        return torch.from_numpy(a) if self.numpy else a

    def zeros(self, numel: int) -> Any:
        if self.numpy:
            return np.zeros(numel, dtype=np.int64)
        return torch.zeros(numel, dtype=torch.int64, device=self.device)

    def cat(self, pieces: list[Any]) -> Any:
        return np.concatenate(pieces) if self.numpy else torch.cat(pieces)

    def rint(self, x: Any) -> Any:
        """Round a float array to the nearest integers (ties to even), as int64."""
        if self.numpy:
            return np.rint(x).astype(np.int64)
        return torch.round(x).to(torch.int64)

    def to_float(self, a: Any, scale: float) -> Any:
        """`a * scale` in the params' float type (`scale` a power of two: exact)."""
        if self.np_float is not None:
            return a.astype(self.np_float) * self.np_float.type(scale)
        return a.to(self.dtype) * scale

    def to_double(self, a: Any) -> Any:
        return a.astype(np.float64) if self.numpy else a.double()

    def floordiv(self, a: Any, n: Any) -> Any:
        """`a div n` (floor), for `n` a number, an array or a `_Ratio` (a number per segment)."""
        if isinstance(n, _Ratio):
            if self.numpy:  # one division by a constant per segment
                pairs = zip(n.segments, n.numbers, strict=True)
                pieces = [a[o : o + size] // m for (o, size), m in pairs]
                return self.cat(pieces)
            n = n.elements
        return a // n if self.numpy else torch.div(a, n, rounding_mode="floor")

    def to_int32(self, a: Any) -> Any:
        return a.astype(np.int32) if self.numpy else a.to(torch.int32)

    def to_int64(self, a: Any) -> Any:
        return a.astype(np.int64) if self.numpy else a.to(torch.int64)

    def abs_max(self, a: Any) -> float:
        return float(abs(a).max()) if len(a) else 0.0


class _Ratio:
    """Per-segment momentum ratios: one number per parameter tensor, and the same laid out per
    element (multiplications use the elements, divisions the numbers)."""

    def __init__(self, elements: Any, numbers: list[int], segments: list[tuple[int, int]]):
        self.elements = elements
        self.numbers = numbers
        self.segments = segments


def _elements(n: Any) -> Any:
    return n.elements if isinstance(n, _Ratio) else n


class InfoBuffer:
    """Exact storage for the bits lost when integers are multiplied by a ratio `n / 2^k`.

    Algorithm 3 of Maclaurin et al. 2015: to multiply an integer `c` by `n / d` (`d = 2^k`), the
    remainder `c mod d` is appended to the buffer `i` (`i <- i d + c mod d`), `c` is divided by
    `d` and multiplied by `n`, and `i mod n` is moved from the buffer into `c` (`c <- c + i mod
    n`, `i <- i div n`). The buffer grows by `log2(d / n)` bits per multiplication on average,
    and `divide` undoes `multiply` exactly.

    The buffer is one int64 per element, in segments (one per parameter tensor). When the
    largest element of a segment could overflow at the next multiplication, the segment's low
    32 bits move to a stack (a "spill", recorded with the step), from which `divide` takes them
    back at the same step.

    Args:
        segments: `(offset, size)` of each segment of the flat vector of integers.
        k: `d = 2^k`, the ratio's denominator.
        ints: the integer kernels (NumPy or PyTorch).
    """

    def __init__(self, segments: list[tuple[int, int]], k: int, ints: _Ints) -> None:
        self.k = k
        self.segments = segments
        self.ints = ints
        self._value = ints.zeros(sum(size for _, size in segments))
        self.spills: list[tuple[int, int, Any]] = []
        self.limit = 1 << (62 - k)  # value * 2^k + (2^k - 1) stays below 2^63

    @property
    def value(self) -> Tensor:
        """The buffer (int64, one element per integer multiplied)."""
        return self.ints.tensor(self._value)

    def spill(self, step: int) -> None:
        """Move the low 32 bits of every segment that reached the limit onto the stack."""
        pieces = []
        for j, (offset, size) in enumerate(self.segments):
            piece = self._value[offset : offset + size]
            if size and int(piece.max()) >= self.limit:
                low = piece & ((1 << _SPILL_BITS) - 1)
                # int32 holding the same 32-bit pattern (two's complement)
                self.spills.append((step, j, self.ints.to_int32(low - ((low >> 31) << 32))))
                piece = piece >> _SPILL_BITS
            pieces.append(piece)
        self._value = self.ints.cat(pieces)

    def multiply(self, c: Any, n: Any) -> Any:
        """`c * n / 2^k`, rounded so that `divide` can undo it exactly; updates the buffer.

        The caller spills first (`spill`) when the buffer may reach `limit`.
        """
        buffer = (self._value << self.k) | (c & ((1 << self.k) - 1))  # i d + c mod d
        self._value = self.ints.floordiv(buffer, n)  # i div n
        # (c div d) n + (i mod n) = ((c div d) - (i div n)) n + i
        return ((c >> self.k) - self._value) * _elements(n) + buffer

    def divide(self, c: Any, n: Any, step: int) -> Any:
        """The inverse of `multiply(c, n)` at step `step` (restoring that step's spills)."""
        quotient = self.ints.floordiv(c, n)
        buffer = (self._value - quotient) * _elements(n) + c  # i n + c mod n
        c = quotient * (1 << self.k) + (buffer & ((1 << self.k) - 1))
        self._value = buffer >> self.k
        if self.spills and self.spills[-1][0] == step:
            pieces = [self._value[o : o + size] for o, size in self.segments]
            while self.spills and self.spills[-1][0] == step:
                _, j, spilled = self.spills.pop()
                low = self.ints.to_int64(spilled) & 0xFFFFFFFF
                pieces[j] = (pieces[j] << _SPILL_BITS) | low
            self._value = self.ints.cat(pieces)
        return c

    def nbytes(self) -> int:
        """Bytes held: the int64 buffer and the spilled words."""
        return len(self._value) * 8 + sum(len(s) * 4 for *_, s in self.spills)

    def bits(self) -> float:
        """Information held, in bits: 32 per spilled word plus the bit length of each element."""
        spilled = _SPILL_BITS * sum(len(s) for *_, s in self.spills)
        return spilled + float(torch.log2(self.value.double() + 1).sum())

    def is_empty(self) -> bool:
        """Whether every multiplication has been undone (a zero buffer, nothing spilled)."""
        return not self.spills and not bool(self._value.any())


def _number(x: float | Tensor) -> float | Tensor:
    return x.detach() if isinstance(x, Tensor) else x


@dataclass
class _Group:
    """A hyperparameter value and the segments (parameters) that use it."""

    value: Tensor
    segments: list[int]


@dataclass
class StepHypers:
    """One step's hyperparameters laid out over the flat vector of params.

    Numbers stay numbers (broadcast); tensors become flat per-element vectors.

    Attributes:
        lr64: the learning rate in float64 (integer kernels' type), for `round(lr B)`.
        lr: the learning rate in the params' dtype (for adjoints).
        ratio: `n = round(momentum 2^k)`, an int or an int64 vector (integer kernels' type).
        momentum: `n / 2^k`, the momentum the integer arithmetic applies (params' dtype).
        weight_decay: the weight decay (0 when absent).
        groups: for each of "lr", "momentum", "weight_decay", the values that require grad and
            the parameters using each.
        lost_bits: `sum log2(2^k / n)` over the elements: bits one step adds to the buffer.
        lr_max, ratio_min, ratio_max: the largest `|lr|` and the extreme `n`, for the range
            bounds of the forward pass.
    """

    lr64: Any
    lr: float | Tensor
    ratio: Any
    momentum: float | Tensor
    weight_decay: float | Tensor
    groups: dict[str, list[_Group]]
    lost_bits: float
    lr_max: float
    ratio_min: int
    ratio_max: int


class FixedPointSGD:
    """SGD with momentum on integers, exactly reversible (Maclaurin et al. 2015, Algorithm 2).

    Weights `W` and velocities `B` are int64 at radix `2^-radix_bits` (the real value of `W` is
    `W 2^-r`), kept as one flat vector over all parameters. One step with the inner gradient
    `g` at the weights `w = W 2^-r`, learning rate `lr`, momentum `mu` and weight decay `wd`
    (the update of `metagrad.optim.SGD`):

        G = round((g + wd w) 2^r)
        B <- mu (x) B + G            (exact multiplication by n / 2^k, n = round(mu 2^k))
        W <- W - round(lr B)

    Only the momentum multiplication loses information, about `log2(1 / mu)` bits per element
    and step, which `InfoBuffer` keeps. `reverse_weights` and `reverse_velocity` undo a step
    given the same gradient, so a run can be walked backwards exactly, bit for bit. The
    velocity starts at 0, which reproduces SGD's first step `b_1 = g`. The integer arithmetic
    runs in NumPy for CPU tensors and in PyTorch elsewhere (`use_numpy`).

    Args:
        params: the initial (floating-point) params; they are rounded to the radix.
        radix_bits: `r`; weights, velocities and gradients must stay below `2^(61 - r)` in
            magnitude.
        momentum_bits: `k`; the momentum is rounded to a multiple of `2^-k`.
        use_numpy: force (True) or avoid (False) the NumPy kernels; None: NumPy on CPU.

    Raises:
        ValueError: a value does not fit the radix; a momentum rounds to 0.
    """

    def __init__(
        self,
        params: Params,
        radix_bits: int = 52,
        momentum_bits: int = 24,
        *,
        use_numpy: bool | None = None,
    ) -> None:
        if not params:
            raise ValueError("FixedPointSGD needs at least one parameter")
        self.radix_bits = radix_bits
        self.momentum_bits = momentum_bits
        self.names = list(params)
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.dtypes = [params[n].dtype for n in self.names]
        self.dtype = self.dtypes[0]
        self.device = params[self.names[0]].device
        self._uniform = all(d == self.dtype for d in self.dtypes)
        self._like = [torch.empty(shape, device="meta") for shape in self.shapes]
        offsets = [sum(self.sizes[:j]) for j in range(len(self.sizes))]
        self.segments = list(zip(offsets, self.sizes, strict=True))
        self.ints = _Ints(self.device, self.dtype, use_numpy)
        self._w = self.ints.array(self.to_fixed(self.flat({n: p for n, p in params.items()})))
        self._b = self.ints.zeros(len(self._w))
        self.buffer = InfoBuffer(self.segments, momentum_bits, self.ints)
        self.lost_bits = 0.0  # sum over steps and elements of log2(2^k / n)
        self._velocity_bound = 0.0  # >= max |velocity|
        self._buffer_bound = 0.0  # >= max buffer element
        self._cache: tuple[tuple, list, StepHypers] | None = None

    @property
    def weights(self) -> Tensor:
        """The weights `W` (int64, flat)."""
        return self.ints.tensor(self._w)

    @property
    def velocity(self) -> Tensor:
        """The velocities `B` (int64, flat)."""
        return self.ints.tensor(self._b)

    # ------------------------------------------------------------------ layout and conversions
    def flat(self, tensors: dict[str, Tensor]) -> Tensor:
        """One flat vector (in the params' dtype) from tensors keyed like the params."""
        pieces = [tensors[n].detach().reshape(-1) for n in self.names]
        if not self._uniform:
            pieces = [x.to(self.dtype) for x in pieces]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def unflat(self, x: Tensor) -> dict[str, Tensor]:
        """Tensors keyed and shaped like the params (views of `x`, each in its own dtype)."""
        pieces = x.split(self.sizes) if len(self.names) > 1 else (x,)
        views = [
            piece if len(shape) == 1 else piece.view(shape)
            for piece, shape in zip(pieces, self.shapes, strict=True)
        ]
        out = dict(zip(self.names, views, strict=True))
        if not self._uniform:
            out = {n: v.to(d) for (n, v), d in zip(out.items(), self.dtypes, strict=True)}
        return out

    def to_fixed(self, x: Tensor) -> Tensor:
        """`round(x 2^r)` as int64; refuses values too large for the radix."""
        scaled = x.detach() * (2.0**self.radix_bits)
        top = float(scaled.abs().max()) if scaled.numel() else 0.0
        if not top < 2.0**61:
            raise ValueError(
                f"Reversible: a value of magnitude {top * 2.0**-self.radix_bits:g} does not fit "
                f"the fixed-point radix 2^-{self.radix_bits} (largest 2^"
                f"{61 - self.radix_bits}); lower radix_bits or the learning rate"
            )
        return torch.round(scaled).to(torch.int64)

    def to_float(self, x: Tensor) -> Tensor:
        """`x 2^-r` in the params' dtype, for a flat int64 tensor `x` (weights or velocities)."""
        return self.ints.tensor(self.ints.to_float(self.ints.array(x), 2.0**-self.radix_bits))

    def float_weights(self) -> Tensor:
        """The weights as a flat float vector (params' dtype)."""
        return self.ints.tensor(self.ints.to_float(self._w, 2.0**-self.radix_bits))

    def float_velocity(self) -> Tensor:
        """The velocities as a flat float vector (params' dtype)."""
        return self.ints.tensor(self.ints.to_float(self._b, 2.0**-self.radix_bits))

    def zeros(self, name: str) -> Tensor:
        """Zeros shaped like parameter `name`, in the params' dtype and device."""
        shape = self.shapes[self.names.index(name)]
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def params(self) -> Params:
        """The current weights as floats, keyed like the params."""
        return self.unflat(self.float_weights())

    def velocities(self) -> Params:
        """The current velocities (momentum buffers) as floats, keyed like the params."""
        return self.unflat(self.float_velocity())

    # ------------------------------------------------------------------ hyperparameters
    def hypers(self, optimizer: SGD) -> StepHypers:
        """The step's learning rate, momentum and weight decay laid out over the flat params.

        Values are looked up per parameter (any hyperparameter form); the layout is reused
        while the same values (numbers, or the same tensors) come back.
        """
        fields = ("lr", "momentum", "weight_decay")
        resolved = {
            f: [
                resolve(getattr(optimizer, f), f, n, like)
                for n, like in zip(self.names, self._like, strict=True)
            ]
            for f in fields
        }
        key = tuple(
            id(v) if isinstance(v, Tensor) else ("n", v) for f in fields for v in resolved[f]
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[2]
        hypers = self._layout(resolved)
        self._cache = (key, [v for f in fields for v in resolved[f]], hypers)
        return hypers

    def _layout(self, resolved: dict[str, list[float | Tensor]]) -> StepHypers:
        groups: dict[str, list[_Group]] = {}
        for f, values in resolved.items():
            by_id: dict[int, _Group] = {}
            for j, v in enumerate(values):
                if isinstance(v, Tensor) and v.requires_grad:
                    by_id.setdefault(id(v), _Group(v, [])).segments.append(j)
            groups[f] = list(by_id.values())
        lr64 = self._spread(resolved["lr"], torch.float64)
        scale = 2**self.momentum_bits
        ratios: list[int | Tensor] = []
        for name, mu in zip(self.names, resolved["momentum"], strict=True):
            n: int | Tensor
            if isinstance(mu, Tensor):
                rounded = torch.round(mu.detach().double() * scale).to(torch.int64)
                bad = not bool((rounded >= 1).all())
                # a 0-d value becomes a number: division by a constant is much faster
                n = int(rounded) if rounded.dim() == 0 else rounded
            else:
                n = round(mu * scale)
                bad = bool(n < 1)
            if bad:
                raise ValueError(
                    f"Reversible: the momentum for parameter '{name}' rounds to 0 at "
                    f"momentum_bits={self.momentum_bits}; SGD without momentum cannot be "
                    "reversed (raise the momentum or momentum_bits)"
                )
            ratios.append(n)
        ratio = self._spread(ratios, torch.int64)
        if isinstance(ratio, Tensor):
            momentum: float | Tensor = ratio.to(self.dtype) / scale
            lost = float((self.momentum_bits - torch.log2(ratio.double())).sum())
            ratio_min, ratio_max = int(ratio.min()), int(ratio.max())
            ratio = self.ints.array(ratio)
            numbers = [n for n in ratios if isinstance(n, int)]
            if len(numbers) == len(ratios):  # one number per segment
                ratio = _Ratio(ratio, numbers, self.segments)
        else:
            momentum = ratio / scale
            lost = sum(self.sizes) * (self.momentum_bits - math.log2(ratio))
            ratio_min = ratio_max = ratio
        lr = lr64.to(self.dtype) if isinstance(lr64, Tensor) else lr64
        lr_max = float(lr64.abs().max()) if isinstance(lr64, Tensor) else abs(lr64)
        return StepHypers(
            lr64=self.ints.array(lr64) if isinstance(lr64, Tensor) else lr64,
            lr=lr,
            ratio=ratio,
            momentum=momentum,
            weight_decay=self._spread(resolved["weight_decay"], self.dtype),
            groups=groups,
            lost_bits=lost,
            lr_max=lr_max,
            ratio_min=ratio_min,
            ratio_max=ratio_max,
        )

    def _spread(self, values: list[Any], dtype: torch.dtype) -> Any:
        """One number if all values are the same number, else a flat per-element vector."""
        first = values[0]
        if not isinstance(first, Tensor) and all(
            not isinstance(v, Tensor) and v == first for v in values
        ):
            return first
        pieces = [
            torch.as_tensor(_number(v), dtype=dtype, device=self.device).expand(shape).reshape(-1)
            for v, shape in zip(values, self.shapes, strict=True)
        ]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    # ------------------------------------------------------------------ the step and its inverse
    def step(self, hypers: StepHypers, params: Tensor, grads: Tensor, step: int) -> None:
        """One SGD step at the flat float params `params` with flat inner gradients `grads`.

        Raises:
            ValueError: the gradients, weights or velocities leave the fixed-point range.
        """
        decayed = self.ints.array(_decayed(grads, params, hypers.weight_decay))
        scale = 2.0**self.radix_bits
        top_grad = self.ints.abs_max(decayed)
        top_weight = self.ints.abs_max(self.ints.array(params))
        # Bounds (no further reductions): |B'| <= |B| n / d + 2 n + |G| after the exact
        # multiplication, |round(lr B')| <= lr_max |B'| + 1, and the buffer grows by at most a
        # factor d / n (plus d / n) per multiplication.
        ratio = hypers.ratio_max / 2**self.momentum_bits
        self._velocity_bound = (
            self._velocity_bound * ratio + 2 * hypers.ratio_max + top_grad * scale + 1
        )
        largest = max(top_grad * scale, top_weight * scale, self._velocity_bound)
        if not max(largest, hypers.lr_max * self._velocity_bound) < 2.0**61:
            raise ValueError(
                f"Reversible: weights, velocities or gradients left the fixed-point range at "
                f"inner step {step} (magnitude 2^{61 - self.radix_bits} at radix "
                f"2^-{self.radix_bits}); lower radix_bits or the learning rate"
            )
        if self._buffer_bound >= self.buffer.limit:
            self.buffer.spill(step)
            self._buffer_bound = float(self.buffer.value.max())
        growth = 2**self.momentum_bits / hypers.ratio_min
        self._buffer_bound = (self._buffer_bound + 1) * growth
        fixed = self.ints.rint(decayed * scale)
        self._b = self.buffer.multiply(self._b, hypers.ratio) + fixed
        self._w = self._w - self._update(hypers)
        self.lost_bits += hypers.lost_bits

    def reverse_weights(self, hypers: StepHypers) -> None:
        """Undo the weight update of a step with these hyperparameters: `W <- W + round(lr B)`."""
        self._w = self._w + self._update(hypers)

    def reverse_velocity(
        self, hypers: StepHypers, params: Tensor, grads: Tensor, step: int
    ) -> None:
        """Undo the velocity update of step `step`, given its params and inner gradients (after
        `reverse_weights`)."""
        decayed = self.ints.array(_decayed(grads, params, hypers.weight_decay))
        fixed = self.ints.rint(decayed * 2.0**self.radix_bits)
        self._b = self.buffer.divide(self._b - fixed, hypers.ratio, step)

    def _update(self, hypers: StepHypers) -> Any:
        return self.ints.rint(self.ints.to_double(self._b) * hypers.lr64)


def _decayed(grads: Tensor, params: Tensor, weight_decay: float | Tensor) -> Tensor:
    return coupled_decay(grads.detach(), params.detach(), weight_decay)


def check_reversible(optimizer: Any, step: int) -> SGD:
    """`optimizer` if `Reversible` can reverse it, else a ValueError saying why."""
    if type(optimizer) is not SGD:
        raise ValueError(
            "Reversible reverses SGD with momentum only: problem.optimizer(meta, "
            f"{step}) returned {type(optimizer).__name__}; use MixedMode or Checkpointed for "
            "other optimizers"
        )
    if optimizer.nesterov:
        raise ValueError(
            f"Reversible: problem.optimizer(meta, {step}) uses Nesterov momentum, which the "
            "reversible update does not reproduce; use nesterov=False or MixedMode"
        )
    if not is_zero(optimizer.dampening):
        raise ValueError(
            f"Reversible: problem.optimizer(meta, {step}) uses dampening, which the reversible "
            "update does not reproduce; use dampening=0 or MixedMode"
        )
    if is_zero(optimizer.momentum):
        raise ValueError(
            f"Reversible: problem.optimizer(meta, {step}) has no momentum; SGD without "
            "momentum cannot be reversed exactly (each step would have to store the params). "
            "Give a momentum > 0, or use MixedMode"
        )
    return optimizer


@dataclass(frozen=True)
class Reversible(Estimator):
    """Exact hypergradients of SGD with momentum by running the training backwards.

    Follows Maclaurin, Duvenaud & Adams 2015 ("Gradient-based hyperparameter optimization
    through reversible learning"). The inner run is SGD with momentum in exactly reversible
    fixed-point arithmetic (`FixedPointSGD`): weights and velocities are integers, and the bits
    that multiplying the velocity by the momentum destroys are kept in an information buffer
    (about `log2(1 / momentum)` bits per parameter and step). The backward pass walks the run
    from the last step to the first, recomputing `w_t, v_t` exactly from `w_{t+1}, v_{t+1}`,
    the step's gradient and the stored bits, and accumulates the adjoints of the weights and
    velocities and the gradients of every hyperparameter value on the way. Each step costs one
    inner gradient with its Hessian-vector product (reverse over reverse, one step's graph at
    a time) and a few element-wise operations.

    The hypergradient is that of the SGD recursion `v <- mu v + g + wd w`, `w <- w - lr v` along
    the fixed-point trajectory, with every rounding taken as the identity (a straight-through
    derivative; the momentum acts as `round(mu 2^k) / 2^k`). It agrees with `Unrolled` on an
    inner problem whose optimizer applies the same rounded updates, and with `Unrolled` on the
    plain problem up to the rounding of the trajectory (2^-radix_bits per operation, and up to
    `momentum * 2^(momentum_bits - radix_bits)` per momentum multiplication).

    What it reads from the problem: `problem.optimizer(meta, t)` must return a
    `metagrad.optim.SGD` with a momentum (number or tensor, rounding to at least 2^-k), without
    Nesterov momentum or dampening; anything else is refused with a ValueError naming the
    reason. Its `lr`, `momentum` and `weight_decay` may be numbers or meta-parameter values in
    any scope (scalar, per layer, per element, per-step schedules); a learned initialization
    and meta-parameters of the inner or outer loss (a module) get their gradients too.

    Bias: none beyond the rounded forward pass described above. Over long horizons the
    hypergradient can be sensitive to the momentum itself: on the digits benchmark at T = 1000,
    applying 0.9 as a multiple of 2^-16 instead of 2^-24 moves it by 8%. The default
    `momentum_bits=24` applies a float32 momentum in [0.5, 1) exactly, and `radix_bits=52`
    keeps the exact multiplication's error (up to `momentum * 2^(24 - 52)` per step) below
    float32 rounding; the result then agrees with float64 `Unrolled` as closely as float32
    `Unrolled` does.
    Cost: one inner run without graph, then one gradient with a Hessian-vector product per
    step, plus integer arithmetic (NumPy on CPU, PyTorch elsewhere); 1.7-1.9x `Unrolled` on
    the digits benchmark (CPU, `benchmarks/bench_long_horizon.py`).
    Memory: flat in T but for the information buffer: the weights and velocities (int64), one
    step's graph, and about `log2(1 / momentum)` bits per parameter and step (0.15 bits for
    momentum 0.9, against 64 bits per parameter and step to store float32 weights and
    velocities).

    Args:
        radix_bits: fixed-point fraction bits `r` (8 to 56): resolution 2^-r, range
            +-2^(61 - r) for weights, velocities and gradients (512 at the default 52).
        momentum_bits: `k` (1 to 24): the momentum is applied as a multiple of 2^-k.
    """

    radix_bits: int = 52
    momentum_bits: int = 24

    def __post_init__(self) -> None:
        check_count(self.radix_bits, "radix_bits", minimum=8)
        check_count(self.momentum_bits, "momentum_bits")
        if self.radix_bits > 56:
            raise ValueError(f"Invalid radix_bits: {self.radix_bits} (must be <= 56)")
        if self.momentum_bits > 24:
            raise ValueError(f"Invalid momentum_bits: {self.momentum_bits} (must be <= 24)")

    def live_steps(self, steps: int) -> int:
        # One step's second-order graph, and the int64 weights, velocities and buffer (about
        # one more); the buffer's growth (log2(1/momentum) bits per parameter and step) is
        # small against a step's graph for any horizon the application runs.
        return 2

    def estimate(self, problem: InnerProblem, meta: MetaParameters) -> Estimate:
        steps = problem.steps
        named = dict(meta.named_parameters())
        meta_tensors: list[Tensor] = list(named.values())

        # Forward: the run in fixed point, without graph.
        initial = start(problem, meta)  # keeps the graph from meta into the initial params
        engine = FixedPointSGD(initial.params, self.radix_bits, self.momentum_bits)
        first = engine.weights.clone()
        last_loss = None
        # Each step's hyperparameter layout, kept (by reference) where consecutive steps share
        # it (values computed once, with their graph to the meta-parameters), so the backward
        # pass need not rebuild the optimizer; None where it changes at every step (a schedule).
        layouts: list[StepHypers | None] = []
        with meta.reuse_values():
            for t in range(steps):
                hypers = engine.hypers(check_reversible(problem.optimizer(meta, t), t))
                if layouts and layouts[-1] is not None and layouts[-1] is not hypers:
                    if len(layouts) < 2 or layouts[-2] is not layouts[-1]:
                        layouts[-1] = None  # used by one step only
                layouts.append(hypers)
                flat = engine.float_weights()
                params = {n: p.requires_grad_() for n, p in engine.unflat(flat).items()}
                last_loss = problem.inner_loss(params, meta, problem.batch(t))
                _check_finite(last_loss, t, steps)
                grads = inner_grads(last_loss, params, create_graph=False)
                engine.step(hypers, flat, engine.flat(grads), t)
        buffer_bytes, buffer_bits = engine.buffer.nbytes(), engine.buffer.bits()
        final = InnerRun(
            engine.params(), SGDState(steps, engine.velocities()), detach_tree(last_loss)
        )

        # The outer loss and its gradient with respect to the final params.
        params_T = {n: p.detach().requires_grad_() for n, p in final.params.items()}
        names = list(params_T)
        loss = outer_loss(problem, meta, params_T)
        found = torch.autograd.grad(
            loss, [params_T[n] for n in names] + meta_tensors, allow_unused=True
        )
        totals = ValueGrads(meta_tensors)
        totals.add_meta(found[len(names) :])
        w_bar = _flat_or_none(engine, dict(zip(names, found[: len(names)], strict=True)))
        b_bar: Tensor | None = None

        # Backward: undo the steps one by one, accumulating adjoints.
        hyper_grads = _HyperGrads(totals, engine)
        b_next = engine.float_velocity()
        with meta.reuse_values():
            for t in reversed(range(steps)):
                layout = layouts.pop()
                if layout is None:
                    layout = engine.hypers(check_reversible(problem.optimizer(meta, t), t))
                w_bar, b_bar, b_next = self._step_back(
                    problem, meta, engine, layout, t, w_bar, b_bar, b_next, hyper_grads
                )
                if t % 64 == 0:
                    hyper_grads.flush()
                    totals.flush()
            if (
                not torch.equal(engine.weights, first)
                or bool(engine.velocity.any())
                or not engine.buffer.is_empty()
            ):
                raise RuntimeError(
                    "Reversible: the backward pass did not recover the initial weights exactly; "
                    "the inner loss must be deterministic (the same gradient for the same "
                    "params and step)"
                )
            if w_bar is not None:
                adjoints = engine.unflat(w_bar)
                pairs = [
                    (initial.params[n], adjoints[n])
                    for n in names
                    if initial.params[n].requires_grad
                ]
                if pairs and meta_tensors:
                    totals.add_meta(
                        torch.autograd.grad(
                            [o for o, _ in pairs],
                            meta_tensors,
                            [a for _, a in pairs],
                            allow_unused=True,
                        )
                    )
            meta_grads = dict(zip(named, totals.result(), strict=True))

        numel = sum(engine.sizes)
        itemsize = torch.empty((), dtype=engine.dtype).element_size()
        metrics = {
            "reversible/buffer_bytes": float(buffer_bytes),
            "reversible/bits_per_param_step": buffer_bits / (numel * steps),
            "reversible/lost_bits_per_param_step": engine.lost_bits / (numel * steps),
            "reversible/trajectory_bytes": float(2 * steps * numel * itemsize),
        }
        return Estimate(meta_grads, loss, final, metrics)

    def _step_back(
        self,
        problem: InnerProblem,
        meta: MetaParameters,
        engine: FixedPointSGD,
        hypers: StepHypers,
        t: int,
        w_bar: Tensor | None,
        b_bar: Tensor | None,
        b_next: Tensor,
        hyper_grads: _HyperGrads,
    ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """Undo step `t`; return the (flat) adjoints of its params and velocity, and its
        velocity.

        The step is `b' = mu b + g(w) + wd w`, `w' = w - lr b'` (SGD's first step has no
        `mu b`), with adjoints `w_bar`, `b_bar` of `w'`, `b'` from the later steps and `b_next`
        the velocity `b'` (as floats).
        """
        engine.reverse_weights(hypers)
        flat = engine.float_weights()
        out: dict[str, Tensor | None] = {}

        def through_update(grads: Params) -> dict[str, Tensor | None]:
            engine.reverse_velocity(hypers, flat, engine.flat(grads), t)
            b = out["velocity"] = engine.float_velocity()
            total_b = b_bar  # the adjoint of b' in full: from later steps and from w'
            if w_bar is not None:
                hyper_grads.add("lr", hypers.groups["lr"], w_bar, b_next, -1.0)
                total_b = _sub_scaled(total_b, hypers.lr, w_bar)
            direct, previous = w_bar, None
            if total_b is not None:
                if t > 0:  # SGD's first step is b_1 = g: the momentum is not used
                    hyper_grads.add("momentum", hypers.groups["momentum"], total_b, b, 1.0)
                    previous = hypers.momentum * total_b
                if not is_zero(hypers.weight_decay):
                    groups = hypers.groups["weight_decay"]
                    hyper_grads.add("weight_decay", groups, total_b, flat, 1.0)
                    direct = _add_scaled(direct, hypers.weight_decay, total_b)
            out.update(direct=direct, previous=previous)
            if total_b is None:
                return {}
            return {n: v for n, v in engine.unflat(total_b).items()}

        hv, meta_hv = hessian_vector(
            problem,
            meta,
            engine.unflat(flat),
            t,
            {},
            hyper_grads.totals.meta_tensors,
            mode="reverse",
            on_gradient=through_update,
        )
        hyper_grads.totals.add_meta(meta_hv)
        w_prev = add_into(out["direct"], _flat_or_none(engine, hv))
        velocity = out["velocity"]
        if velocity is None:  # the loss was evaluated, so the velocity was reversed
            raise RuntimeError(f"inner step {t} was not reversed")
        return w_prev, out["previous"], velocity


def _sub_scaled(x: Tensor | None, scale: float | Tensor, y: Tensor) -> Tensor:
    """`x - scale * y` (x None: zero), one operation where possible."""
    if x is None:
        return -scale * y
    if isinstance(scale, Tensor):
        return torch.addcmul(x, scale, y, value=-1)
    return torch.add(x, y, alpha=-scale)


def _add_scaled(x: Tensor | None, scale: float | Tensor, y: Tensor) -> Tensor:
    """`x + scale * y` (x None: zero)."""
    if x is None:
        return scale * y
    if isinstance(scale, Tensor):
        return torch.addcmul(x, scale, y)
    return torch.add(x, y, alpha=scale)


def _or_zeros(engine: FixedPointSGD, name: str, x: Tensor | None) -> Tensor:
    return engine.zeros(name) if x is None else x


def _flat_or_none(engine: FixedPointSGD, tensors: dict[str, Tensor | None]) -> Tensor | None:
    """The flat vector of `tensors` (None entries as zeros), or None if all are None."""
    if all(x is None for x in tensors.values()):
        return None
    return engine.flat({n: _or_zeros(engine, n, tensors.get(n)) for n in engine.names})


class _HyperGrads:
    """Gradients of hyperparameter values, accumulated element-wise over the flat params.

    `add(field, groups, x, y, sign)` adds `sign * x * y` (one operation) to the field's
    element-wise sum while its values stay the same tensors (a constant or per-layer learning
    rate); the sum is reduced to each value's shape (per layer, per element or one number) and
    handed to `totals` when the values change (a schedule) or at `flush`.
    """

    def __init__(self, totals: ValueGrads, engine: FixedPointSGD) -> None:
        self.totals = totals
        self.engine = engine
        self.pending: dict[str, tuple[tuple[int, ...], list[_Group], Tensor]] = {}

    def add(self, field: str, groups: list[_Group], x: Tensor, y: Tensor, sign: float) -> None:
        """Add `sign * x * y` to the gradients of `groups` (the values of `field`)."""
        if not groups:
            return
        key = tuple(id(g.value) for g in groups)
        found = self.pending.get(field)
        if found is not None and found[0] == key:
            self.pending[field] = (key, groups, torch.addcmul(found[2], x, y, value=sign))
            return
        if found is not None:
            self._reduce(found[1], found[2])
        self.pending[field] = (key, groups, x * y if sign == 1 else -(x * y))

    def flush(self) -> None:
        """Hand every pending sum to `totals`."""
        for _, groups, summed in self.pending.values():
            self._reduce(groups, summed)
        self.pending.clear()

    def _reduce(self, groups: list[_Group], summed: Tensor) -> None:
        segments = self.engine.segments
        for group in groups:
            value = group.value
            pieces = [summed[o : o + n] for o, n in (segments[j] for j in group.segments)]
            if value.dim() == 0:
                whole = len(group.segments) == len(segments)
                grad = summed.sum() if whole else torch.stack([p.sum() for p in pieces]).sum()
            else:
                grad = pieces[0].view(value.shape)
                for piece in pieces[1:]:
                    grad = grad + piece.view(value.shape)
            self.totals.add(value, grad.to(value.dtype))
