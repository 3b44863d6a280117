"""Learning a learning rate online with short truncations: PES against TBPTT on digits.

The short-horizon bias (Wu et al. 2018): a meta-objective that looks only a few steps ahead
prefers learning rates that are too small for the run as a whole, because a smaller step lowers
the loss right away (less noise) while the progress a larger step buys shows up later. Vicol et
al. (2021) show that PES, unbiased for the whole run, avoids it where truncated
backpropagation falls into it.

Setup: sklearn's digits (1797 images, 8x8; 1200 for training, 597 for validation), an MLP
64-32-10 with tanh, plain SGD on minibatches of 32 for T inner steps (default 2000), one
learned learning rate (stored as a log). A `TruncatedSession` cuts each run into truncations of
K = 10 steps; after each, Adam (lr 0.05) updates the log learning rate with the estimate, and
the run continues; after T steps a new run starts from the same initial weights. The
objective of both methods is the session's: the validation loss at the end of every
truncation, summed over the run (here reported as its mean, the area under the validation
curve). A grid of constant learning rates, each trained for a whole run, shows where that
objective is lowest.

    OMP_NUM_THREADS=1 python experiments/pes_lr_digits/run.py           # a few minutes
    OMP_NUM_THREADS=1 python experiments/pes_lr_digits/run.py --quick   # seconds

writes results.json and pes_lr_digits.png next to this script (or into --out).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import metagrad
from metagrad.hypergrad import PES, TBPTT, TruncatedSession
from metagrad.hypergrad.base import inner_steps, outer_loss, start
from metagrad.optim import SGD

HERE = Path(__file__).resolve().parent
HIDDEN = 32


def data(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:1200], perm[1200:]
    return x, y, train, val


def initial_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(64, HIDDEN, generator=g) / 8.0,
        "b1": torch.zeros(HIDDEN),
        "w2": torch.randn(HIDDEN, 10, generator=g) / math.sqrt(HIDDEN),
        "b2": torch.zeros(10),
    }


def make_problem(steps: int, batch: int, seed: int = 0):
    x, y, train, val = data(seed)
    g = torch.Generator().manual_seed(seed + 1)
    batches = train[torch.randint(len(train), (steps, batch), generator=g)]

    def loss(p, idx):
        hidden = torch.tanh(x[idx] @ p["w1"] + p["b1"])
        return F.cross_entropy(hidden @ p["w2"] + p["b2"], y[idx])

    return metagrad.InnerProblem(
        init=initial_params(seed),
        optimizer=lambda meta, t: SGD(lr=meta.value("lr")),
        inner_loss=lambda p, m, idx: loss(p, idx),
        outer_loss=lambda p, m, idx: loss(p, idx),
        inner_batches=lambda t: batches[t],
        outer_batch=val,
        steps=steps,
    )


def make_meta(lr: float) -> metagrad.MetaParameters:
    meta = metagrad.MetaParameters()
    meta.add("lr", lr, constraint="positive")
    return meta


def objective(problem: metagrad.InnerProblem, lr: float, k: int) -> dict[str, float]:
    """One run at constant `lr`: the mean validation loss at the truncation ends, the last."""
    meta = make_meta(lr)
    run = start(problem, meta, track=False)
    losses = []
    for begin in range(0, problem.steps, k):
        steps = range(begin, min(begin + k, problem.steps))
        try:
            run = inner_steps(problem, meta, run, steps, create_graph=False, track=False)
        except metagrad.hypergrad.NonFiniteLossError:
            return {"lr": lr, "objective": math.inf, "final": math.inf}
        losses.append(float(outer_loss(problem, meta, run.params).detach()))
    value = sum(losses) / len(losses)
    return {"lr": lr, "objective": value if math.isfinite(value) else math.inf, "final": losses[-1]}


def train(problem, estimator, k: int, runs: int, lr0: float, outer_lr: float, seed: int) -> dict:
    """Online meta-training over `runs` inner runs; the learning rate after every truncation."""
    meta = make_meta(lr0)
    outer = torch.optim.Adam(meta.parameters(), lr=outer_lr)
    session = TruncatedSession(problem, estimator, truncation=k, seed=seed)
    lrs, losses, run_objectives = [], [], []
    current: list[float] = []
    started = time.perf_counter()
    while True:
        outer.zero_grad()
        result = session.step(meta)
        result.apply(meta)
        outer.step()
        lrs.append(float(meta.value("lr").detach()))
        losses.append(result.metrics["outer/loss"])
        current.append(result.metrics["outer/loss"])
        if session.done:
            run_objectives.append(sum(current) / len(current))
            current = []
            if len(run_objectives) == runs:
                break
    seconds = time.perf_counter() - started
    return {
        "lr": lrs,
        "truncation_loss": losses,
        "run_objective": run_objectives,
        "final_lr": lrs[-1],
        "seconds": seconds,
        "seconds_per_truncation": seconds / len(lrs),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    per_run = results["truncations_per_run"]
    for name, r in results["methods"].items():
        x = [i / per_run for i in range(1, len(r["lr"]) + 1)]
        left.semilogy(x, r["lr"], label=f"{name} (end {r['final_lr']:.3g})")
    best = results["grid_best"]
    left.axhline(best["lr"], color="k", ls="--", lw=1, label=f"grid optimum {best['lr']:.3g}")
    left.set_xlabel("inner runs (T steps each)")
    left.set_ylabel("learning rate")
    left.set_title(f"Learned learning rate, K={results['K']}, T={results['T']}")
    left.legend(fontsize=8)

    grid = [g for g in results["grid"] if math.isfinite(g["objective"])]
    right.semilogx([g["lr"] for g in grid], [g["objective"] for g in grid], "k.-", label="grid")
    for i, (name, r) in enumerate(results["methods"].items()):
        e = r["evaluation"]
        right.plot([e["lr"]], [e["objective"]], "o", color=f"C{i}", ms=9, label=name)
    right.set_yscale("log")
    right.set_xlabel("constant learning rate")
    right.set_ylabel("mean validation loss at truncation ends")
    right.set_title("The run's objective at constant learning rates")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run for tests")
    parser.add_argument("--horizon", type=int, default=2000)
    parser.add_argument("--truncation", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5, help="inner runs of meta-training")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr0", type=float, default=0.1)
    parser.add_argument("--outer-lr", type=float, default=0.05)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    if args.quick:
        args.horizon, args.runs, args.pairs = 200, 2, 4
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    k = args.truncation
    problem = make_problem(args.horizon, args.batch, args.seed)

    started = time.perf_counter()
    grid_lrs = [10 ** (e / 4) for e in range(-10, 3, 2 if args.quick else 1)]  # 0.0032 .. 3.2
    grid = [objective(problem, lr, k) for lr in grid_lrs]
    best = min(grid, key=lambda g: g["objective"])
    print(
        f"grid ({time.perf_counter() - started:.0f} s): best lr {best['lr']:.3g}, "
        f"objective {best['objective']:.4f}"
    )

    plan = {
        "TBPTT": TBPTT(),
        "PES": PES(particles=args.pairs, sigma=args.sigma),
    }
    methods = {}
    for name, estimator in plan.items():
        r = train(problem, estimator, k, args.runs, args.lr0, args.outer_lr, args.seed)
        r["evaluation"] = objective(problem, r["final_lr"], k)
        methods[name] = r
        print(
            f"{name:6s} final lr {r['final_lr']:.4g}, objective at it "
            f"{r['evaluation']['objective']:.4f}, {r['seconds_per_truncation'] * 1e3:.1f} ms per "
            f"truncation, {r['seconds']:.0f} s"
        )
    tbptt, pes = methods["TBPTT"], methods["PES"]
    log_gap = {n: abs(math.log(m["final_lr"] / best["lr"])) for n, m in methods.items()}
    checks = {
        "tbptt_lr_below_pes": tbptt["final_lr"] < pes["final_lr"],
        "tbptt_lr_below_grid_optimum": tbptt["final_lr"] < best["lr"],
        "pes_closer_to_grid_optimum": log_gap["PES"] < log_gap["TBPTT"],
        "pes_objective_better": pes["evaluation"]["objective"] < tbptt["evaluation"]["objective"],
        "pes_last_online_run_better": pes["run_objective"][-1] < tbptt["run_objective"][-1],
    }
    results = {
        "quick": args.quick,
        "T": args.horizon,
        "K": k,
        "truncations_per_run": -(-args.horizon // k),
        "setup": {k_: (str(v) if isinstance(v, Path) else v) for k_, v in vars(args).items()},
        "grid": grid,
        "grid_best": best,
        "methods": methods,
        "log_gap_to_grid_optimum": log_gap,
        "checks": checks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "pes_lr_digits.png")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(checks, indent=2))
    return results


if __name__ == "__main__":
    main()
