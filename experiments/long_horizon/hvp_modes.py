"""Time one Hessian-vector product of the digits MLP's loss, three ways (and a plain gradient).

The second-order term of one inner step, `H v`, for the MLP 64-128-10 on a batch of 100 digits
(float32, one thread):

* reverse over reverse: `torch.autograd.grad` with `create_graph=True`, then the gradient of
  `grad . v` (what `MixedMode(hvp="reverse")` and `Reversible` do);
* forward over reverse with `torch.autograd.forward_ad`: the params are dual tensors with
  tangent `v`, and the tangent of their gradient is `H v` (`MixedMode(hvp="forward")`);
* forward over reverse with `torch.func.jvp(torch.func.grad(loss))`.

All three give the same product (checked here to float32 rounding). Prints CPU times, best of
interleaved rounds, relative to the plain gradient.

    OMP_NUM_THREADS=1 python experiments/long_horizon/hvp_modes.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_hypergrad import digits  # noqa: E402


def main(rounds: int = 20, calls: int = 50) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y, _, _ = digits()
    x, y = x[:100], y[:100]
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    params = {n: p.detach() for n, p in model.named_parameters()}
    v = {n: torch.randn_like(p) for n, p in params.items()}
    names = list(params)

    def loss(p: dict) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    def gradient() -> list:
        p = {n: t.clone().requires_grad_() for n, t in params.items()}
        return list(torch.autograd.grad(loss(p), list(p.values())))

    def reverse_over_reverse() -> list:
        p = {n: t.clone().requires_grad_() for n, t in params.items()}
        g = torch.autograd.grad(loss(p), list(p.values()), create_graph=True)
        return list(torch.autograd.grad(g, list(p.values()), [v[n] for n in names]))

    def forward_ad() -> list:
        with fwAD.dual_level():
            p = {n: fwAD.make_dual(t.clone(), v[n]).requires_grad_() for n, t in params.items()}
            g = torch.autograd.grad(loss(p), list(p.values()))
            return [fwAD.unpack_dual(t).tangent for t in g]

    grad_fn = torch.func.grad(loss)

    def func_jvp() -> list:
        _, tangent = torch.func.jvp(grad_fn, (params,), (v,))
        return [tangent[n] for n in names]

    reference = reverse_over_reverse()
    for fn in (forward_ad, func_jvp):
        for a, b in zip(fn(), reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    fns = [gradient, reverse_over_reverse, forward_ad, func_jvp]
    best = {fn.__name__: float("inf") for fn in fns}
    for _ in range(rounds):
        for fn in fns:
            started = time.process_time()
            for _ in range(calls):
                fn()
            best[fn.__name__] = min(best[fn.__name__], (time.process_time() - started) / calls)
    for name, seconds in best.items():
        print(f"{name:22s} {seconds * 1e3:6.2f} ms  {seconds / best['gradient']:.2f}x gradient")


if __name__ == "__main__":
    main()
