"""Time a differentiable unroll with metagrad.optim against the same unroll written by hand.

For each optimizer: 100 steps of an MLP 64-128-10 on sklearn's digits (batch 100, float32, one
thread), each step's gradient taken with `create_graph=True`, then one backward pass of a final
validation loss into the learning rate and the initial parameters. The hand-written version calls
the model with `torch.func.functional_call` and applies the textbook update with plain tensor
arithmetic (and plain `torch.sqrt`). Both run in the same process, interleaved, and the table
shows the median CPU time of each (process time, which a shared machine disturbs less than wall
time) and the median and spread of the per-repetition ratio.

    python benchmarks/bench_optim_unroll.py [--reps 7] [--steps 100]

Note that the hand-written Adam, AdamW, RMSprop and Adagrad return NaN hypergradients on this
data (some pixels are always 0, so some second moments are exactly 0 and `torch.sqrt` has an
infinite derivative there); the timing is still the cost of the same computation. For those
four the table adds a second hand-written baseline with the usual NaN-free square root (two
`where`s, derivative 0 at 0), which computes the same finite hypergradient as metagrad.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

import metagrad
import metagrad.optim as mo

Params = dict[str, Tensor]

# Optimizers whose update takes a square root (hand-written twice: plain and NaN-free).
SQRT_USERS = ("Adam", "AdamW", "RMSprop", "Adagrad")

HYPERS = {
    "SGD": dict(lr=0.1),
    "SGD-momentum": dict(lr=0.1, momentum=0.9),
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3, weight_decay=1e-2),
    "RMSprop": dict(lr=1e-3),
    "Adagrad": dict(lr=1e-2),
}


def metagrad_optimizer(name: str, lr: Tensor):
    kwargs = {**HYPERS[name], "lr": lr}
    cls = {"SGD-momentum": "SGD"}.get(name, name)
    return getattr(mo, cls)(**kwargs)


# --- hand-written textbook updates (torch.optim's math, plain tensor arithmetic) -------------


def hand_init(name: str, params: Params) -> dict:
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    if name in ("Adam", "AdamW"):
        return {"t": 0, "m": zeros, "v": dict(zeros)}
    if name in ("RMSprop", "Adagrad"):
        return {"t": 0, "v": zeros}
    return {"t": 0, "buf": {}}


def where_sqrt(x: Tensor) -> Tensor:
    """The usual hand-written NaN-free square root (derivative 0 at 0): two `where`s."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


def hand_step(name: str, lr: Tensor, params: Params, grads: Params, s: dict, sqrt=torch.sqrt):
    t = s["t"] + 1
    new: Params = {}
    if name == "SGD":
        new = {n: p - lr * grads[n] for n, p in params.items()}
        return new, {"t": t}
    if name == "SGD-momentum":
        mu = HYPERS[name]["momentum"]
        buf = {n: grads[n] if t == 1 else mu * s["buf"][n] + grads[n] for n in params}
        new = {n: p - lr * buf[n] for n, p in params.items()}
        return new, {"t": t, "buf": buf}
    if name in ("Adam", "AdamW"):
        b1, b2, eps = 0.9, 0.999, 1e-8
        wd = HYPERS[name].get("weight_decay", 0.0)
        m, v = {}, {}
        for n, p in params.items():
            g = grads[n]
            if name == "AdamW":
                p = p * (1 - lr * wd)
            m[n] = b1 * s["m"][n] + (1 - b1) * g
            v[n] = b2 * s["v"][n] + (1 - b2) * (g * g)
            denom = sqrt(v[n]) / (1 - b2**t) ** 0.5 + eps
            new[n] = p - (lr / (1 - b1**t)) * (m[n] / denom)
        return new, {"t": t, "m": m, "v": v}
    if name == "RMSprop":
        alpha, eps = 0.99, 1e-8
        v = {n: alpha * s["v"][n] + (1 - alpha) * (grads[n] * grads[n]) for n in params}
        new = {n: p - lr * (grads[n] / (sqrt(v[n]) + eps)) for n, p in params.items()}
        return new, {"t": t, "v": v}
    if name == "Adagrad":
        eps = 1e-10
        v = {n: s["v"][n] + grads[n] * grads[n] for n in params}
        new = {n: p - lr * (grads[n] / (sqrt(v[n]) + eps)) for n, p in params.items()}
        return new, {"t": t, "v": v}
    raise ValueError(f"unknown optimizer {name!r}")


# --- the unrolls -----------------------------------------------------------------------------


def make_setup(steps: int, batch: int = 100, seed: int = 0):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        batches.append((x[idx], y[idx]))
    val = (x[-300:], y[-300:])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return model, batches, val


def unroll_metagrad(name, model, batches, val) -> tuple[Tensor, Tensor, list[Tensor]]:
    fmodel = metagrad.Functional(model)
    params0 = fmodel.params(detach=True)
    lr = torch.tensor(HYPERS[name]["lr"], requires_grad=True)
    opt = metagrad_optimizer(name, lr)
    params, state = params0, opt.init(params0)
    for x, y in batches:
        loss = F.cross_entropy(fmodel(params, x), y)
        params, state = metagrad.differentiable_step(opt, loss, params, state)
    final = F.cross_entropy(fmodel(params, val[0]), val[1])
    grads = torch.autograd.grad(final, [lr, *params0.values()])
    return final.detach(), grads[0], list(grads[1:])


def unroll_by_hand(name, model, batches, val, sqrt=torch.sqrt) -> tuple[Tensor, Tensor, list]:
    params0 = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    lr = torch.tensor(HYPERS[name]["lr"], requires_grad=True)
    params, state = params0, hand_init(name, params0)
    for x, y in batches:
        loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        grads = dict(zip(params, grads, strict=True))
        params, state = hand_step(name, lr, params, grads, state, sqrt)
    final = F.cross_entropy(torch.func.functional_call(model, params, (val[0],)), val[1])
    grads = torch.autograd.grad(final, [lr, *params0.values()])
    return final.detach(), grads[0], list(grads[1:])


def timed(fn: Callable, *args) -> tuple[float, tuple]:
    """CPU time of this process for `fn(*args)`: less disturbed by other jobs than wall time."""
    gc.collect()
    start = time.process_time()
    out = fn(*args)
    return time.process_time() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--optimizers", nargs="*", default=list(HYPERS))
    args = parser.parse_args()

    torch.set_num_threads(1)
    model, batches, val = make_setup(args.steps)
    names = args.optimizers

    # warm-up, and check that both compute the same thing
    check = {}
    for name in names:
        lm, glr_m, _ = unroll_metagrad(name, model, batches, val)
        lh, glr_h, _ = unroll_by_hand(name, model, batches, val)
        loss_diff = float((lm - lh).abs() / lh.abs())
        lr_diff = float((glr_m - glr_h).abs() / glr_h.abs()) if torch.isfinite(glr_h) else None
        check[name] = (loss_diff, lr_diff, bool(torch.isfinite(glr_m)))

    def variants(name: str) -> dict[str, Callable]:
        out = {
            "metagrad": lambda: unroll_metagrad(name, model, batches, val),
            "hand": lambda: unroll_by_hand(name, model, batches, val),
        }
        if name in SQRT_USERS:
            out["hand, NaN-free"] = lambda: unroll_by_hand(name, model, batches, val, where_sqrt)
        return out

    for name in names:
        if name in SQRT_USERS:
            _, glr_safe, _ = variants(name)["hand, NaN-free"]()
            _, glr_m, _ = unroll_metagrad(name, model, batches, val)
            check[name] += (float((glr_m - glr_safe).abs() / glr_safe.abs()),)
        else:
            check[name] += (None,)

    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in variants(n)} for n in names}
    for rep in range(args.reps):
        for name in names:
            # rotate which one runs first, so drift in machine load hits all alike
            order = list(variants(name).items())
            order = order[rep % len(order) :] + order[: rep % len(order)]
            for which, fn in order:
                t, _ = timed(fn)
                times[name][which].append(t)

    print(
        f"{args.steps}-step differentiable unroll + backward into lr and initial params, "
        f"MLP 64-128-10 on digits, batch 100, float32, 1 thread, {args.reps} reps"
    )
    header = (
        f"{'optimizer':<14}{'metagrad s':>11}{'by hand s':>11}{'ratio':>8}{'ratio range':>16}"
        f"{'ratio of mins':>14}"
        f"{'loss rel diff':>15}{'d lr rel diff':>15}{'metagrad d lr':>15}"
        f"{'NaN-free s':>12}{'ratio':>8}{'d lr rel diff':>15}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        tm, th = times[name]["metagrad"], times[name]["hand"]
        ratios = [a / b for a, b in zip(tm, th, strict=True)]
        loss_diff, lr_diff, finite, safe_diff = check[name]
        lr_text = f"{lr_diff:.1e}" if lr_diff is not None else "by hand: NaN"
        safe = ""
        if "hand, NaN-free" in times[name]:
            ts = times[name]["hand, NaN-free"]
            safe_ratio = statistics.median(a / b for a, b in zip(tm, ts, strict=True))
            safe = f"{statistics.median(ts):>12.3f}{safe_ratio:>8.3f}{safe_diff:>15.1e}"
        print(
            f"{name:<14}{statistics.median(tm):>11.3f}{statistics.median(th):>11.3f}"
            f"{statistics.median(ratios):>8.3f}{f'{min(ratios):.3f}-{max(ratios):.3f}':>16}"
            f"{min(tm) / min(th):>14.3f}"
            f"{loss_diff:>15.1e}{lr_text:>15}{'finite' if finite else 'NaN':>15}{safe}"
        )


if __name__ == "__main__":
    main()
