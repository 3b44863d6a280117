"""Time one second-order MAML meta-iteration: metagrad vs hand-written loops and libraries.

Work: 25 sinusoid tasks, K = 10 support and 10 query points, 5 inner SGD steps at lr 0.01,
an MLP 1-40-40-1 with ReLU, float32, one thread. One meta-iteration is the forward pass over
the meta-batch, `backward()` into the initial weights, and zeroing the gradients.

Contestants, timed in the same process, interleaved round by round (medians reported):

* metagrad: `metagrad.learners.MAML(..., vectorize=True)`, and `vectorize=False` (its loop);
* hand-written sequential: a Python loop over tasks with `torch.func.functional_call` and
  `torch.autograd.grad(create_graph=True)`;
* hand-written vmap: `torch.func.vmap` over tasks of a function that takes inner gradients
  with `torch.func.grad`;
* higher and torchopt (sequential, their documented MAML usage) when importable. Their
  meta-gradients are checked against metagrad's first.

    OMP_NUM_THREADS=1 python benchmarks/bench_maml.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metagrad.learners import MAML
from metagrad.tasks import SinusoidTasks

TASKS, SHOTS, STEPS, LR = 25, 10, 5, 0.01


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def hand_sequential(model: nn.Module, sx, sy, qx, qy) -> None:
    theta = dict(model.named_parameters())
    total = 0.0
    for i in range(sx.shape[0]):
        params = theta
        for _ in range(STEPS):
            loss = F.mse_loss(torch.func.functional_call(model, params, (sx[i],)), sy[i])
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {n: p - LR * g for (n, p), g in zip(params.items(), grads, strict=True)}
        total = total + F.mse_loss(torch.func.functional_call(model, params, (qx[i],)), qy[i])
    (total / sx.shape[0]).backward()


def hand_vmap(model: nn.Module, sx, sy, qx, qy) -> None:
    theta = dict(model.named_parameters())

    def task(x, y, x_query, y_query):
        def inner(params):
            return F.mse_loss(torch.func.functional_call(model, params, (x,)), y)

        params = theta
        for _ in range(STEPS):
            grads = torch.func.grad(inner)(params)
            params = {n: params[n] - LR * grads[n] for n in params}
        return F.mse_loss(torch.func.functional_call(model, params, (x_query,)), y_query)

    torch.func.vmap(task)(sx, sy, qx, qy).mean().backward()


def with_higher(model: nn.Module, sx, sy, qx, qy) -> None:
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=LR)
    for i in range(sx.shape[0]):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fm, opt):
            for _ in range(STEPS):
                opt.step(F.mse_loss(fm(sx[i]), sy[i]))
            (F.mse_loss(fm(qx[i]), qy[i]) / sx.shape[0]).backward()


def with_torchopt(model: nn.Module, sx, sy, qx, qy) -> None:
    import torchopt

    inner_opt = torchopt.MetaSGD(model, lr=LR)
    net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt)
    for i in range(sx.shape[0]):
        for _ in range(STEPS):
            inner_opt.step(F.mse_loss(model(sx[i]), sy[i]))
        (F.mse_loss(model(qx[i]), qy[i]) / sx.shape[0]).backward()
        torchopt.recover_state_dict(model, net_state)
        torchopt.recover_state_dict(inner_opt, opt_state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = SinusoidTasks(seed=0).sample(TASKS, SHOTS)

    model = make_model()
    vmapped = MAML(model, loss_fn="mse", inner_lr=LR, inner_steps=STEPS, vectorize=True)
    looped = MAML(model, loss_fn="mse", inner_lr=LR, inner_steps=STEPS, vectorize=False)
    contestants: dict[str, Callable[[], None]] = {
        "metagrad MAML (vmap)": lambda: vmapped(*batch).backward(),
        "metagrad MAML (loop)": lambda: looped(*batch).backward(),
        "hand-written vmap": lambda: hand_vmap(model, *batch),
        "hand-written sequential": lambda: hand_sequential(model, *batch),
    }
    for name, fn in (("higher", with_higher), ("torchopt", with_torchopt)):
        try:
            __import__(name)
        except ImportError:
            print(f"{name}: not installed, skipped")
            continue
        contestants[name] = lambda fn=fn: fn(model, *batch)

    # Every contestant must compute the same meta-gradient before its time counts.
    reference = None
    for name, run in contestants.items():
        model.zero_grad()
        run()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        if reference is None:
            reference = grads
        err = ((grads - reference).abs().max() / reference.abs().max()).item()
        print(f"{name:26s} meta-gradient max relative difference to metagrad: {err:.1e}")
        assert err < 1e-4, f"{name} computes a different meta-gradient"

    times: dict[str, list[float]] = {name: [] for name in contestants}
    for r in range(args.warmup + args.rounds):
        for name, run in contestants.items():
            model.zero_grad()
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if r >= args.warmup:
                times[name].append(elapsed)

    base = statistics.median(times["hand-written vmap"])
    print(
        f"\n{args.rounds} rounds, medians, one thread, float32, {TASKS} tasks, K={SHOTS}, "
        f"{STEPS} inner steps"
    )
    print(f"{'':26s} {'ms':>8s} {'vs hand vmap':>13s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:26s} {1000 * med:8.2f} {med / base:12.2f}x")
    seq = statistics.median(times["hand-written sequential"])
    print(f"\nhand-written sequential / hand-written vmap: {seq / base:.2f}x")
    ratio = statistics.median(times["metagrad MAML (vmap)"]) / base
    print(f"metagrad (vmap) / hand-written vmap: {ratio:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
