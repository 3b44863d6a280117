"""Outer steps per second on 1 and 2 processes with metagrad.distributed (gloo, CPU).

Workloads (float32, one thread per process):

* maml: second-order MAML on digits few-shot (`DigitsFewShot`, 5-way 1-shot, 15 query images
  per class, 8x8 images), meta-batch 32, 5 inner SGD steps, a small conv net (two 3x3
  convolutions with 32 channels, max-pooling, a linear head), Adam outer optimizer. Every rank
  draws the same meta-batch and keeps its 16 tasks.
* hpo: a population of 8 inner runs per outer step (`Unrolled`, 20 SGD-with-momentum steps of
  an MLP 64-128-10 on digits, batch 100, each run with its own initialization and data order),
  learning a per-layer learning rate and the momentum; every rank runs 4.

Each configuration runs under torchrun (`--nproc_per_node` 1 or 2), warms up, times `--steps`
outer steps between two barriers, and reports steps/s; rounds alternate 1 and 2 processes so
that load from other jobs affects both alike (medians over rounds). "comm" is the share of a
step spent inside `all_reduce_grads` (the all-reduce and any wait for the slower rank);
"latency" is one all-reduce of the same buffers with both ranks already waiting. On a shared
machine the wall-clock speed-up understates the method; the ratio of CPU seconds per step
(the busiest rank's) is what an otherwise idle machine shows, communication aside. The first
meta-gradient of both runs is compared (float32: equal to rounding).

    python benchmarks/bench_distributed.py [--workload maml hpo] [--steps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import metagrad
from metagrad import distributed as mdist
from metagrad.hypergrad import Unrolled
from metagrad.learners import MAML
from metagrad.optim import SGD
from metagrad.tasks import DigitsFewShot

META_BATCH, POPULATION, T = 32, 8, 20


Build = tuple[Callable[[int], float], nn.Module, torch.optim.Optimizer]


def build_maml() -> Build:
    """MAML meta-gradients of this rank's share of a meta-batch, averaged over the ranks."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 5),
    )  # fmt: skip
    learner = mdist.broadcast(MAML(model, loss_fn="cross_entropy", inner_lr=0.4, inner_steps=5))
    outer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    tasks = DigitsFewShot(ways=5, shots=1, query=15, split="train", seed=0, flatten=False)

    def meta_grad(i: int) -> float:
        mine = mdist.shard_batch(tasks.sample(META_BATCH))  # the same draws on every rank
        outer.zero_grad()
        learner(*mine).backward()
        start = time.perf_counter()
        mdist.all_reduce_grads(learner, mean_of=len(mine[0]))
        return time.perf_counter() - start

    return meta_grad, learner, outer


def build_hpo() -> Build:
    """Meta-gradients of this rank's share of a population of inner runs, averaged."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    fmodel = metagrad.Functional(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
    p0 = fmodel.params(detach=True)
    meta = metagrad.MetaParameters()
    meta.add("lr", 0.05, scope="per_layer", params=p0)
    meta.add("momentum", 0.5, constraint="unit")
    mdist.broadcast(meta)
    outer = torch.optim.Adam(meta.parameters(), lr=0.05)

    def loss(params, meta, idx):
        return F.cross_entropy(fmodel(params, X[idx]), y[idx])

    def problem(i: int, member: int) -> metagrad.InnerProblem:
        g = torch.Generator().manual_seed(1000 * i + member)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 * i + member)
            init = metagrad.Functional(
                nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
            ).params(detach=True)
        return metagrad.InnerProblem(
            init=init,
            optimizer=lambda m, t: SGD(lr=m.value("lr"), momentum=m.value("momentum")),
            inner_loss=loss,
            outer_loss=loss,
            inner_batches=[torch.randint(0, 1200, (100,), generator=g) for _ in range(T)],
            outer_batch=torch.arange(1200, 1797),
            steps=T,
        )

    method = Unrolled()

    def meta_grad(i: int) -> float:
        outer.zero_grad()
        for member in mdist.shard(POPULATION):
            method(problem(i, member), meta).apply(meta)  # sums into .grad
        start = time.perf_counter()
        mdist.all_reduce_grads(meta, sum_of=len(mdist.shard(POPULATION)))
        return time.perf_counter() - start

    return meta_grad, meta, outer


def worker(workload: str, steps: int, warmup: int) -> None:
    torch.set_num_threads(1)
    with mdist.init(backend="gloo", timeout=300):
        meta_grad, module, outer = {"maml": build_maml, "hpo": build_hpo}[workload]()
        meta_grad(10**6)  # at the starting point, compared between 1 and 2 processes
        check = torch.cat([p.grad.reshape(-1) for p in module.parameters()]).tolist()

        def step(i: int) -> float:
            comm = meta_grad(i)
            outer.step()
            return comm

        for i in range(warmup):
            step(i)
        mdist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        comm = sum(step(warmup + i) for i in range(steps))
        cpu = torch.tensor(time.process_time() - cpu, dtype=torch.float64)
        mdist.barrier()
        elapsed = time.perf_counter() - start
        if mdist.world_size() > 1:  # the busiest rank's CPU time
            torch.distributed.all_reduce(cpu, op=torch.distributed.ReduceOp.MAX)
        # Pure all-reduce latency: both ranks already waiting.
        latencies = []
        for _ in range(20):
            mdist.barrier()
            t0 = time.perf_counter()
            mdist.all_reduce_grads(module, mean_of=1)
            latencies.append(time.perf_counter() - t0)
        if mdist.is_main():
            size = sum(p.numel() for p in module.parameters())
            print(
                "RESULT "
                + json.dumps(
                    {
                        "steps_per_s": steps / elapsed,
                        "cpu_s_per_step": float(cpu) / steps,
                        "comm_share": comm / elapsed,
                        "latency_ms": 1000 * statistics.median(latencies),
                        "numel": size,
                        "meta_grad": check,
                    }
                ),
                flush=True,
            )


def launch(workload: str, procs: int, steps: int, warmup: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
        __file__, "--worker", workload, "--steps", str(steps), "--warmup", str(warmup),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{workload} on {procs} processes failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=["maml", "hpo"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup)
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    for workload in args.workload:
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for procs in (1, 2):
                load = os.getloadavg()[0]
                result = launch(workload, procs, args.steps, args.warmup)
                runs[procs].append(result | {"load": load})
        one, two = (statistics.median(r["steps_per_s"] for r in runs[p]) for p in (1, 2))
        one_grad, two_grad = (torch.tensor(runs[p][0]["meta_grad"]) for p in (1, 2))
        drift = float((two_grad - one_grad).norm() / one_grad.norm())
        comm = statistics.median(r["comm_share"] for r in runs[2])
        latency = statistics.median(r["latency_ms"] for r in runs[2])
        rounds = {p: [round(r["steps_per_s"], 2) for r in runs[p]] for p in (1, 2)}
        cpu1, cpu2 = (statistics.median(r["cpu_s_per_step"] for r in runs[p]) for p in (1, 2))
        print(
            f"{workload}: 1 process {one:.2f} steps/s, 2 processes {two:.2f} steps/s, "
            f"speed-up {two / one:.2f}x (efficiency {two / one / 2:.0%})\n"
            f"  CPU seconds per step: 1 process {cpu1:.3f}, busiest of 2 processes {cpu2:.3f}: "
            f"{cpu1 / cpu2:.2f}x (the speed-up without other load)\n"
            f"  2 processes: {comm:.1%} of a step inside all_reduce_grads; one all-reduce of "
            f"{runs[2][0]['numel']} floats takes {latency:.2f} ms with both ranks waiting\n"
            f"  rounds (steps/s): 1 process {rounds[1]}, 2 processes {rounds[2]}; load average "
            f"before each: {[round(r['load'], 1) for p in (1, 2) for r in runs[p]]}\n"
            f"  meta-gradient at the start, 2 vs 1 processes: relative difference {drift:.1e}"
        )
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
