"""How far apart are hypergradients of nearly identical long training runs?

`Reversible` differentiates its own fixed-point run, which differs from the float32 run that
`Unrolled` differentiates by rounding (the fixed-point run is the more precise one: 2^-48) and
by the momentum, applied as a multiple of 2^-16 (0.9 becomes 0.89999390). Over hundreds of
steps of SGD on an MLP such tiny differences grow, and so do the differences between the
hypergradients. This script separates the causes on the digits benchmark problem (MLP
64-128-10, per-layer learning rates and momentum): it compares

* `Unrolled` in float32 with `Unrolled` in float64 (float32 rounding alone);
* `Reversible` (float32 gradients) with `Unrolled` in float64, both with the momentum 0.875
  (a multiple of 2^-16, so only rounding differs);
* `Reversible` in float64 with `Unrolled` in float64, momentum 0.875.

Prints the largest relative difference over the meta-gradients (max |a - b| / max |b|).

    OMP_NUM_THREADS=1 python experiments/long_horizon/sensitivity.py --steps 100 1000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_hypergrad import build  # noqa: E402

from metagrad.hypergrad import Reversible, Unrolled  # noqa: E402


def rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k]).abs().max() / b[k].abs().max()) for k in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--hidden", type=int, default=128, help="width of the hidden layer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| T | Unrolled f32 vs f64 (mu 0.9) | Reversible f32 vs Unrolled f64 (mu 0.875) | "
        "Reversible f64 vs Unrolled f64 (mu 0.875) |"
    )
    print("|---|---|---|---|")
    for steps in args.steps:
        row = []
        runs = {}
        for dtype, momentum in ((torch.float32, 0.9), (torch.float64, 0.9)):
            problem, meta, _ = build(steps, hidden=args.hidden, dtype=dtype, momentum=momentum)
            runs[dtype] = Unrolled()(problem, meta).grads
        row.append(rel_diff(runs[torch.float32], runs[torch.float64]))
        problem64, meta64, _ = build(steps, hidden=args.hidden, dtype=torch.float64, momentum=0.875)
        reference = Unrolled()(problem64, meta64).grads
        problem32, meta32, _ = build(steps, hidden=args.hidden, momentum=0.875)
        row.append(rel_diff(Reversible()(problem32, meta32).grads, reference))
        row.append(rel_diff(Reversible()(problem64, meta64).grads, reference))
        print(f"| {steps} | " + " | ".join(f"{x:.1e}" for x in row) + " |")


if __name__ == "__main__":
    main()
