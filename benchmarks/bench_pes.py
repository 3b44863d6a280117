"""Benchmark of online truncated training: PES variance against particles, time per truncation.

Variance: the linear dynamical system of `experiments/pes_unbiased` (w in R^4, T = 100,
K = 10, float64). For each number of antithetic pairs N, R independent sessions (seeds) each
sum their PES estimates over one inner run; the variance of that full-run estimate across the
R repeats (trace of the covariance) should fall like 1/N, so N * variance stays flat and the
slope of log variance against log N is about -1.

Time: sklearn's digits, an MLP 64-128-10, SGD with momentum 0.9 on batches of 100, learned
per-layer learning rates and momentum (5 scalars), K = 10, float32, one thread. One
`session.step(meta)` (a truncation) of TBPTT, and of PES with N pairs vmapped and looped, is
timed against K plain `torch.optim.SGD` steps of the same model in the same process, in
interleaved rounds (median CPU time per method; CPU time is disturbed far less than wall time
by other processes on a shared machine). Reported: each method's ratio to plain training and
PES's ratio to TBPTT (same run), and the loop / vmap ratio.

    OMP_NUM_THREADS=1 python benchmarks/bench_pes.py            # about 2 minutes of CPU time
    OMP_NUM_THREADS=1 python benchmarks/bench_pes.py --quick
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import metagrad
from metagrad.hypergrad import PES, TBPTT, TruncatedSession
from metagrad.optim import SGD

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- variance
def variance_against_pairs(pairs: list[int], repeats: int) -> tuple[list[dict], float]:
    path = ROOT / "experiments" / "pes_unbiased" / "run.py"  # the experiment's system
    spec = importlib.util.spec_from_file_location("pes_unbiased_run", path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    one_run, system = experiment.one_run, experiment.system

    horizon, k = 100, 10
    make, meta = system(horizon)
    rows = []
    for n in pairs:
        started = time.process_time()
        estimates = torch.stack(
            [
                one_run(make, meta, horizon, k, PES(particles=n, sigma=0.5), seed=seed)["estimate"]
                for seed in range(repeats)
            ]
        )
        var = float(estimates.var(0).sum())
        rows.append(
            {
                "pairs": n,
                "variance": var,
                "pairs_x_variance": n * var,
                "seconds": time.process_time() - started,
            }
        )
        print(f"N={n:4d}: variance {var:10.4f}   N x variance {n * var:8.3f}", flush=True)
    logs = [(math.log(r["pairs"]), math.log(r["variance"])) for r in rows]
    mx = sum(x for x, _ in logs) / len(logs)
    my = sum(y for _, y in logs) / len(logs)
    slope = sum((x - mx) * (y - my) for x, y in logs) / sum((x - mx) ** 2 for x, _ in logs)
    print(f"slope of log variance against log N: {slope:.3f} (1/N: -1)")
    return rows, slope


# ---------------------------------------------------------------------- time
def digits_problem(k: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1200], perm[1200:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    fmodel = metagrad.Functional(model)
    params0 = fmodel.params(detach=True)
    g = torch.Generator().manual_seed(1)
    steps = 10_000  # long enough that no session in the benchmark reaches its end
    batches = [train[torch.randperm(len(train), generator=g)[:100]] for _ in range(64)]

    def loss(p, m, idx):
        return F.cross_entropy(fmodel(p, x[idx]), y[idx])

    meta = metagrad.MetaParameters()
    meta.add("lr", 0.1, scope="per_layer", params=params0)
    meta.add("momentum", 0.9, constraint="unit")
    problem = metagrad.InnerProblem(
        init=params0,
        optimizer=lambda m, t: SGD(lr=m.value("lr"), momentum=m.value("momentum")),
        inner_loss=loss,
        outer_loss=loss,
        inner_batches=lambda t: batches[t % len(batches)],
        outer_batch=val,
        steps=steps,
    )

    def plain():
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

        def run():
            for t in range(k):
                idx = batches[t]
                opt.zero_grad()
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
            with torch.no_grad():
                F.cross_entropy(net(x[val]), y[val])

        return run

    return problem, meta, plain()


def time_per_truncation(k: int, pairs: list[int], rounds: int) -> dict[str, float]:
    problem, meta, plain = digits_problem(k)
    sessions = {"TBPTT": TruncatedSession(problem, TBPTT(), truncation=k)}
    for n in pairs:
        sessions[f"PES N={n} vmap"] = TruncatedSession(
            problem, PES(particles=n, vectorize=True), truncation=k
        )
        sessions[f"PES N={n} loop"] = TruncatedSession(
            problem, PES(particles=n, vectorize=False), truncation=k
        )
    calls = {"plain SGD": plain}
    for name, session in sessions.items():
        calls[name] = lambda s=session: s.step(meta)
    for call in calls.values():  # warm-up (vmap's one-time initialisation, allocator)
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.process_time()
            call()
            times[name].append(time.process_time() - started)
    medians = {name: statistics.median(v) for name, v in times.items()}
    base, tbptt = medians["plain SGD"], medians["TBPTT"]
    out = {}
    for name, t in medians.items():
        out[name] = {"ms": t * 1e3, "vs_plain": t / base, "vs_tbptt": t / tbptt}
        print(f"{name:18s} {t * 1e3:8.2f} ms  {t / base:7.2f}x plain  {t / tbptt:6.2f}x TBPTT")
    for n in pairs:
        ratio = medians[f"PES N={n} loop"] / medians[f"PES N={n} vmap"]
        out[f"PES N={n} loop/vmap"] = ratio
        print(f"PES N={n}: loop / vmap = {ratio:.2f}")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        var_pairs, repeats, time_pairs, rounds = [1, 4, 16], 40, [1, 4], 3
    else:
        var_pairs, repeats, time_pairs, rounds = [1, 4, 16, 64], 200, [1, 4, 16], 15
    print("== variance of the full-run PES estimate (quadratic system, T=100, K=10) ==")
    rows, slope = variance_against_pairs(var_pairs, repeats)
    print("== time per truncation (digits MLP 64-128-10, K=10, float32, one thread) ==")
    timing = time_per_truncation(10, time_pairs, rounds)
    results = {"variance": rows, "slope": slope, "repeats": repeats, "time": timing}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
