"""Influence balancing (Vicol, Metz & Sohl-Dickstein 2021, Section 5.1; Tallec & Ollivier 2017).

A linear system with state s in R^23 and one scalar parameter theta:

    s_{t+1} = A s_t + theta * (1, ..., 1, -1, ..., -1)      (10 ones, 13 minus ones)
    A = 0.5 I + 0.5 (ones on the superdiagonal),  s_0 = (1, ..., 1),  loss = 0.5 (s[0] - 1)^2

The loss is taken at the end of every truncation of K steps and theta is updated by SGD
(lr 1e-4) after each one, in one endless inner run. theta's influence on s[0] is positive over
the first ~40 steps and negative in the long run: at the fixed point s[0] = -6 theta, so the
optimum is theta* = -1/6, while a truncation of K <= 10 steps sees only the positive part.
TBPTT with K = 1 and 10 and truncated ES with K = 1 push theta the wrong way; TBPTT with
K = 100 sees the whole influence; PES with K = 1 is unbiased and reaches theta*.

    OMP_NUM_THREADS=1 python experiments/influence_balancing/run.py          # ~3 minutes
    OMP_NUM_THREADS=1 python experiments/influence_balancing/run.py --quick  # seconds

writes results.json and influence_balancing.png next to this script (or into --out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import metagrad
from metagrad.hypergrad import PES, TBPTT, TruncatedES, TruncatedSession

HERE = Path(__file__).resolve().parent
DT = torch.float64
N, POSITIVE = 23, 10
A = 0.5 * torch.eye(N, dtype=DT) + 0.5 * torch.diag(torch.ones(N - 1, dtype=DT), 1)
SIGN = torch.tensor([1.0] * POSITIVE + [-1.0] * (N - POSITIVE), dtype=DT)
THETA0 = 0.5
THETA_STAR = -1.0 / 6.0  # s[0] = -6 theta at the fixed point, and the loss wants s[0] = 1
LONG = 500  # the paper's "long unroll" metric: the loss after 500 steps from s_0


class Dynamics:
    """The system's update, in the place of an inner optimizer (the gradient is ignored)."""

    def __init__(self, theta: torch.Tensor) -> None:
        self.theta = theta

    def init(self, params: dict[str, torch.Tensor]) -> tuple:
        return ()

    def step(self, params, grads, state):
        return {"s": A @ params["s"] + self.theta * SIGN}, state


def loss(params, meta, batch) -> torch.Tensor:
    return 0.5 * (params["s"][0] - 1) ** 2


def problem(steps: int) -> metagrad.InnerProblem:
    return metagrad.InnerProblem(
        init={"s": torch.ones(N, dtype=DT)},
        optimizer=lambda meta, t: Dynamics(meta.value("theta")),
        inner_loss=loss,  # its gradient is computed and ignored: the dynamics are fixed
        outer_loss=loss,
        inner_batches=lambda t: None,
        outer_batch=None,
        steps=steps,
    )


def long_unroll_coefficients() -> tuple[float, float]:
    """s[0] after LONG steps from s_0 is a + b theta (the system is affine in theta)."""
    s, v = torch.ones(N, dtype=DT), torch.zeros(N, dtype=DT)
    for _ in range(LONG):
        s, v = A @ s, A @ v + SIGN
    return float(s[0]), float(v[0])


def run_method(name: str, estimator, k: int, iterations: int, lr: float, seed: int) -> dict:
    a, b = long_unroll_coefficients()
    meta = metagrad.MetaParameters()
    meta.add("theta", THETA0, constraint=None, dtype=DT)
    outer = torch.optim.SGD(meta.parameters(), lr=lr)
    session = TruncatedSession(problem(iterations * k), estimator, truncation=k, seed=seed)
    thetas, long_losses, losses = [], [], []
    started = time.perf_counter()
    for _ in range(iterations):
        outer.zero_grad()
        result = session.step(meta)
        result.apply(meta)
        outer.step()
        theta = float(meta.theta.detach())
        thetas.append(theta)
        long_losses.append(0.5 * (a + b * theta - 1) ** 2)
        losses.append(result.metrics["outer/loss"])
    seconds = time.perf_counter() - started
    print(
        f"{name:12s} theta {thetas[-1]: .5g}  long-unroll loss {long_losses[-1]:.3g}  "
        f"{seconds:.1f} s"
    )
    return {
        "K": k,
        "iterations": iterations,
        "theta_final": thetas[-1],
        "long_loss_final": long_losses[-1],
        "seconds": seconds,
        "theta": thetas,
        "long_loss": long_losses,
        "truncation_loss": losses,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results["methods"].items():
        steps = range(1, len(r["theta"]) + 1)
        left.plot(steps, [max(v, 1e-16) for v in r["long_loss"]], label=name)
        right.plot(steps, r["theta"], label=f"{name} (end {r['theta_final']:.3g})")
    left.set_yscale("log")
    left.set_xlabel("outer iteration (one truncation each)")
    left.set_ylabel(f"loss after a {LONG}-step unroll")
    left.set_title("Influence balancing: long-unroll loss")
    right.axhline(THETA_STAR, color="k", ls="--", lw=1, label="theta* = -1/6")
    right.set_ylim(-0.5, 1.5)  # TBPTT K=1 and ES K=1 follow the same (wrong) expected path
    right.set_xlabel("outer iteration")
    right.set_ylabel("theta")
    right.set_title("theta (clipped to [-0.5, 1.5])")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run for tests")
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--iterations-k10", type=int, default=3000)
    parser.add_argument("--iterations-k100", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--pairs", type=int, default=500, help="antithetic pairs (ES, PES)")
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    if args.quick:  # the first tenth of the run, fewer particles: the trends, in seconds
        args.iterations, args.iterations_k10, args.iterations_k100, args.pairs = 300, 100, 10, 100
    torch.set_num_threads(1)

    plan = [
        ("TBPTT K=1", TBPTT(), 1, args.iterations),
        ("TBPTT K=10", TBPTT(), 10, args.iterations_k10),
        ("TBPTT K=100", TBPTT(), 100, args.iterations_k100),
        ("ES K=1", TruncatedES(particles=args.pairs, sigma=args.sigma), 1, args.iterations),
        ("PES K=1", PES(particles=args.pairs, sigma=args.sigma), 1, args.iterations),
    ]
    methods = {
        name: run_method(name, est, k, iters, args.lr, args.seed) for name, est, k, iters in plan
    }
    start_gap = abs(THETA0 - THETA_STAR)

    def gap(name: str) -> float:
        return abs(methods[name]["theta_final"] - THETA_STAR)

    checks = {
        # PES reaches the optimum of the full-horizon loss
        "pes_reaches_theta_star": gap("PES K=1") < (0.25 * start_gap if args.quick else 1e-3),
        # short truncations push theta away from it
        "tbptt_k1_moves_away": gap("TBPTT K=1") > start_gap,
        "tbptt_k10_moves_away": gap("TBPTT K=10") > start_gap,
        "es_k1_moves_away": gap("ES K=1") > start_gap,
        # a truncation long enough to see the negative long-term influence moves toward it
        "tbptt_k100_moves_toward": gap("TBPTT K=100") < start_gap,
    }
    results = {
        "quick": args.quick,
        "setup": {
            "n": N,
            "positive": POSITIVE,
            "theta0": THETA0,
            "theta_star": THETA_STAR,
            "outer_lr": args.lr,
            "pairs": args.pairs,
            "sigma": args.sigma,
            "seed": args.seed,
            "long_unroll": LONG,
        },
        "methods": methods,
        "checks": checks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "influence_balancing.png")
    summary = {
        **results,
        "methods": {
            name: {k: v for k, v in r.items() if k not in ("theta", "long_loss", "truncation_loss")}
            | {"theta_every_10": r["theta"][::10]}
            for name, r in methods.items()
        },
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(checks, indent=2))
    return summary


if __name__ == "__main__":
    main()
