"""Benchmark of the exact hypergradient methods on sklearn's digits.

Setup: an MLP 64-128-10 trained by SGD with momentum for T inner steps on batches of 100
digits; the meta-parameters are per-layer learning rates and one momentum (5 scalars),
learned through `metagrad.MetaParameters`; the outer loss is the cross-entropy on a held-out
validation split. float32, one thread.

Measures
  time: one hypergradient for T = 100, relative to 100 plain `torch.optim.SGD` training steps
    (same model, batches and hyperparameters) in the same process; the best of several runs,
    interleaved. Ratios use the process's CPU time (`time.process_time`; one thread, so it
    equals wall time on an idle machine), which other processes on a shared machine disturb
    far less than wall time; wall times are printed as well.
  memory: the peak resident memory (RSS) that one hypergradient adds above the process's own
    RSS just before the call, for T = 100 and T = 1000. Each measurement runs in a fresh
    subprocess that first builds the problem and runs one warm-up hypergradient on a tiny
    model (one-time initialisation excluded, the working set not pre-allocated), then
    resets the kernel's peak-RSS mark (`/proc/self/clear_refs`, value 5) and reads `VmHWM`
    from `/proc/self/status` after the call; a thread sampling `VmRSS` every millisecond is
    the fallback where the mark cannot be reset. RSS counts everything the process touches
    (tensors, autograd graph, Python objects, the allocator's retained pages).

Run (about 3 minutes on one core; ForwardMode at T = 1000 dominates):
    OMP_NUM_THREADS=1 python benchmarks/bench_hypergrad.py
    OMP_NUM_THREADS=1 python benchmarks/bench_hypergrad.py --skip-memory   # times only
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metagrad
from metagrad.hypergrad import Checkpointed, ForwardMode, Unrolled
from metagrad.optim import SGD

BATCH = 100
LR = 0.1
MOMENTUM = 0.9
METHODS: dict[str, Callable[[], Callable]] = {
    "Unrolled": Unrolled,
    "Checkpointed": Checkpointed,
    "ForwardMode": lambda: ForwardMode(max_directions=16),
}


def digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and validation splits of sklearn's digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32) / 16.0
    y = torch.as_tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = order[:1300], order[1300:]
    return x[train], y[train], x[val], y[val]


def build(
    steps: int,
    seed: int = 0,
    hidden: int = 128,
    batch_size: int = BATCH,
    dtype: torch.dtype = torch.float32,
    momentum: float = MOMENTUM,
) -> tuple[metagrad.InnerProblem, metagrad.MetaParameters, dict]:
    """The inner problem, its meta-parameters, and what plain training needs."""
    torch.manual_seed(seed)
    xtr, ytr, xval, yval = (t.to(dtype) if t.is_floating_point() else t for t in digits(seed))
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(dtype)
    fmodel = metagrad.Functional(model)
    params0 = fmodel.params(detach=True)
    gen = torch.Generator().manual_seed(seed + 1)
    index = torch.stack(
        [torch.randperm(len(xtr), generator=gen)[:batch_size] for _ in range(steps)]
    )

    def batch(t: int) -> tuple[Tensor, Tensor]:
        return xtr[index[t]], ytr[index[t]]

    meta = metagrad.MetaParameters()
    meta.add("lr", LR, constraint="positive", scope="per_layer", params=params0)
    meta.add("momentum", momentum, constraint="unit", dtype=dtype)

    def loss(params: dict, _meta: metagrad.MetaParameters, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(fmodel(params, b[0]), b[1])

    problem = metagrad.InnerProblem(
        init=params0,
        optimizer=lambda m, t: SGD(lr=m.value("lr"), momentum=m.value("momentum")),
        inner_loss=loss,
        outer_loss=loss,
        inner_batches=batch,
        outer_batch=(xval, yval),
        steps=steps,
    )
    return problem, meta, {"model": model, "batch": batch}


def plain_training(model: nn.Module, batch: Callable, steps: int) -> float:
    """Seconds for `steps` ordinary torch.optim.SGD training steps."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    started = time.perf_counter()
    for t in range(steps):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - started


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(method: str, steps: int) -> dict[str, float]:
    """Peak RSS added by one hypergradient (run in a fresh process)."""
    torch.set_num_threads(1)
    problem, meta, _ = build(steps)
    # Warm-up on a tiny model (hidden 4, batch 4): one-time initialisation (imports, kernels,
    # dispatcher caches) is excluded, but the allocator's free lists are not pre-filled with
    # the measured call's working set.
    warm, warm_meta, _ = build(3, hidden=4, batch_size=4)
    METHODS[method]()(warm, warm_meta)
    gc.collect()
    baseline = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark to the current RSS
        hwm_ok = _rss_kib("VmHWM") <= baseline + 1024
    except OSError:
        hwm_ok = False
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib("VmRSS"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    METHODS[method]()(problem, meta)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    top = max(_rss_kib("VmHWM"), peak[0]) if hwm_ok else peak[0]
    return {
        "added_mib": (top - baseline) / 1024,
        "baseline_mib": baseline / 1024,
        "seconds": seconds,
        "source": "VmHWM" if hwm_ok else "VmRSS sampling",
    }


def memory_in_subprocess(method: str, steps: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure-memory", method, str(steps)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure-memory", nargs=2, metavar=("METHOD", "T"))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.measure_memory:
        method, steps = args.measure_memory
        print(json.dumps(measure_memory(method, int(steps))))
        return

    steps = 100
    problem, meta, plain = build(steps)
    model, batch = plain["model"], plain["batch"]
    methods = {name: make() for name, make in METHODS.items()}
    plain_training(model, batch, 10)  # warm-up
    for method in methods.values():
        method(build(3)[0], meta)
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], **{n: [] for n in methods}}
    for _ in range(args.repeats):  # interleaved, so slow phases of a shared machine hit all
        runs["plain"].append(timed(lambda: plain_training(model, batch, steps)))
        for name, method in methods.items():
            if name != "ForwardMode" or len(runs[name]) < 2:
                runs[name].append(timed(lambda m=method: m(problem, meta)))
    cpu = {n: min(c for c, _ in r) for n, r in runs.items()}
    wall = {n: min(w for _, w in r) for n, r in runs.items()}
    ratio = {n: cpu[n] / cpu["plain"] for n in methods}
    print(
        f"100 plain torch.optim.SGD steps: {cpu['plain'] * 1e3:.1f} ms CPU "
        f"({wall['plain'] * 1e3:.1f} ms wall)"
    )

    memory: dict[tuple[str, int], dict] = {}
    if not args.skip_memory:
        for name in METHODS:
            for t in (100, 1000):
                memory[name, t] = memory_in_subprocess(name, t)

    print()
    print("| method | T=100 CPU (wall) | x plain SGD | RSS added T=100 | T=1000 | T=1000 time |")
    print("|---|---|---|---|---|---|")
    for name in methods:
        m100, m1000 = memory.get((name, 100)), memory.get((name, 1000))
        mem = [f"{m['added_mib']:.1f} MiB" if m else "-" for m in (m100, m1000)]
        t1000 = f"{m1000['seconds']:.1f} s" if m1000 else "-"
        print(
            f"| {name} | {cpu[name] * 1e3:.0f} ms ({wall[name] * 1e3:.0f} ms) | "
            f"{ratio[name]:.2f}x | {mem[0]} | {mem[1]} | {t1000} |"
        )
    if memory:
        print(f"\n(memory source: {memory['Unrolled', 100]['source']})")
        u, c, f = (memory[n, 1000] for n in ("Unrolled", "Checkpointed", "ForwardMode"))
        growth = f["added_mib"] / max(memory["ForwardMode", 100]["added_mib"], 1e-9)
        print(
            f"targets: Unrolled {ratio['Unrolled']:.2f}x plain (<= 2.3); "
            f"ForwardMode T=1000/T=100 memory {growth:.2f} (<= 1.3); "
            f"Checkpointed/Unrolled memory at T=1000 {c['added_mib'] / u['added_mib']:.3f} "
            f"(<= 0.1); Checkpointed/Unrolled time at T=100 "
            f"{cpu['Checkpointed'] / cpu['Unrolled']:.2f} (<= 1.7)"
        )


if __name__ == "__main__":
    main()
