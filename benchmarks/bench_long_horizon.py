"""Memory and time of the exact hypergradient methods over long horizons (T = 100 to 10000).

Setup (as `bench_hypergrad.py`): an MLP 64-128-10 on sklearn's digits, batches of 100, SGD
with momentum 0.9, per-layer learning rates and the momentum learned (5 scalars), float32, one
thread. Methods: `Unrolled`, `Checkpointed()`, `MixedMode()` with both ways of forming its
Hessian-vector products, and `Reversible()`.

Every measurement runs in a fresh subprocess that builds the problem, warms up on a tiny model
(one-time initialisation excluded), resets the kernel's peak-RSS mark and makes one
hypergradient call:
  time: CPU seconds of the call (`time.process_time`; one thread). Ratios are against
    `Unrolled` at the same T, the best of the repeats, with the methods interleaved so that
    slow phases of a shared machine hit all of them.
  memory: peak RSS the call adds above the process's RSS just before it (`VmHWM` after
    resetting it through `/proc/self/clear_refs`; a thread sampling `VmRSS` where that fails).
  tensor bytes kept (T <= 1000, a separate subprocess, as hooks slow the call down): the
    peak of the bytes autograd keeps saved for backward (`torch.autograd.graph.
    saved_tensors_hooks`, storages counted once while alive) plus what the method itself holds
    (checkpoints, saved steps, the information buffer), from its metrics.

Unrolled at T = 10000 runs only if its memory, extrapolated linearly from T = 100 and 1000, is
below half the available memory; the script also prints the horizon at which Unrolled would
exceed a 24 GiB machine. Results go to a JSON file for `experiments/long_horizon/plot.py`.

Run (about 10 minutes on one core; T = 10000 dominates):
    OMP_NUM_THREADS=1 python benchmarks/bench_long_horizon.py
    OMP_NUM_THREADS=1 python benchmarks/bench_long_horizon.py --horizons 100 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_hypergrad import build  # the digits problem of the hypergradient benchmark

from metagrad.hypergrad import Checkpointed, MixedMode, Reversible, Unrolled

METHODS: dict[str, Callable[[], Callable]] = {
    "Unrolled": Unrolled,
    "Checkpointed": Checkpointed,
    "MixedMode(forward)": lambda: MixedMode(hvp="forward"),
    "MixedMode(reverse)": lambda: MixedMode(hvp="reverse"),
    "Reversible": Reversible,
}
# Forward-mode AD keeps the saved-tensor hooks' packed objects alive until the call ends, so the
# meter would count every step's tensors as kept.
NO_TENSOR_METER = {"MixedMode(forward)"}
MACHINE_GIB = 24.0
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "experiments" / "long_horizon" / "results.json"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise RuntimeError("MemAvailable not in /proc/meminfo")


class SavedBytes:
    """Peak bytes of tensors autograd keeps for backward while the block runs.

    Each saved tensor is wrapped in a holder whose deletion (when its graph node is freed)
    releases it; storages shared by several saved tensors are counted once.
    """

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, references]
        self.total = 0
        self.peak = 0

    def _pack(self, tensor: torch.Tensor) -> object:
        meter = self
        try:
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except RuntimeError:  # no plain storage (a forward-mode dual tensor's tangent, ...)
            key, size = id(tensor), tensor.numel() * tensor.element_size()

        class Holder:
            def __init__(self) -> None:
                self.tensor = tensor
                entry = meter.live.setdefault(key, [size, 0])
                if entry[1] == 0:
                    meter.total += size
                    meter.peak = max(meter.peak, meter.total)
                entry[1] += 1

            def __del__(self) -> None:
                entry = meter.live.get(key)
                if entry is not None:
                    entry[1] -= 1
                    if entry[1] == 0:
                        meter.total -= entry[0]
                        del meter.live[key]

        return Holder()

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.tensor)


def held_bytes(name: str, metrics: dict, steps: int, hidden: int = 128) -> float:
    """Bytes the method holds itself (not as saved tensors), from its metrics and layout."""
    numel, itemsize = 64 * hidden + hidden + hidden * 10 + 10, 4
    if name == "Checkpointed":  # a boundary (params + momentum buffers) per segment
        segment = Checkpointed().segment_for(steps)
        return (steps + segment - 1) // segment * 2 * numel * itemsize
    if name.startswith("MixedMode"):
        return metrics["hypergrad/stored_bytes"]
    if name == "Reversible":  # int64 weights and velocities, and the information buffer
        return 2 * numel * 8 + metrics["reversible/buffer_bytes"]
    return 0.0


def _release_free_heap() -> None:
    """Return freed heap pages to the system (glibc), so that the RSS before the call holds
    no free memory the call could reuse unseen (building a long horizon's batches frees
    about 10 KB per step)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(name: str, steps: int, tensors: bool, hidden: int = 128) -> dict:
    """One hypergradient in this (fresh) process: time and peak RSS, or tensor bytes."""
    torch.set_num_threads(1)
    problem, meta, _ = build(steps, hidden=hidden)
    warm, warm_meta, _ = build(3, hidden=4, batch_size=4)
    METHODS[name]()(warm, warm_meta)
    method = METHODS[name]()
    gc.collect()
    _release_free_heap()
    if tensors:
        meter = SavedBytes()
        with meter.hooks():
            result = method(problem, meta)
        held = held_bytes(name, result.metrics, steps, hidden)
        return {"saved_mib": meter.peak / 2**20, "kept_mib": (meter.peak + held) / 2**20}
    baseline = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark to the current RSS
        hwm_ok = _status_kib("VmHWM") <= baseline + 1024
    except OSError:
        hwm_ok = False
    peak, done = [baseline], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status_kib("VmRSS"))
            time.sleep(0.001)

    sampler = None
    if not hwm_ok:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    cpu, wall = time.process_time(), time.perf_counter()
    result = method(problem, meta)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done.set()
    if sampler is not None:
        sampler.join()
    top = _status_kib("VmHWM") if hwm_ok else peak[0]
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "added_mib": (top - baseline) / 1024,
        "source": "VmHWM" if hwm_ok else "VmRSS sampling",
        "outer_loss": float(result.outer_loss),
        "grads": {k: v.tolist() for k, v in result.grads.items()},
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, float)},
    }


def in_subprocess(name: str, steps: int, tensors: bool = False, hidden: int = 128) -> dict:
    args = [sys.executable, __file__, "--measure", name, str(steps), "--hidden", str(hidden)]
    if tensors:
        args.append("--tensors")
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def max_rel_diff(a: dict, b: dict) -> float:
    diffs = []
    for key, ref in b.items():
        ref_t, got = torch.tensor(ref), torch.tensor(a[key])
        diffs.append(float((got - ref_t).abs().max() / ref_t.abs().max()))
    return max(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", nargs=2, metavar=("METHOD", "T"))
    parser.add_argument("--tensors", action="store_true")
    parser.add_argument("--horizons", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=3, help="repeats at T <= 1000")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--hidden", type=int, default=128, help="width of the MLP's hidden layer")
    parser.add_argument(
        "--no-tensors", action="store_true", help="skip the saved-tensor measurements"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.measure:
        name, steps = args.measure
        print(json.dumps(measure(name, int(steps), args.tensors, args.hidden)))
        return

    started = time.perf_counter()
    results: dict[str, dict] = {}
    for steps in sorted(args.horizons):
        runs: dict[str, list[dict]] = {name: [] for name in args.methods}
        repeats = args.repeats if steps <= 1000 else 1
        skipped: dict[str, str] = {}
        if steps > 1000 and "Unrolled" in args.methods:
            per_step = unrolled_slope(results)
            if per_step is not None:
                estimate = per_step * steps / 1024  # GiB
                available = _available_kib() / 2**20
                if estimate > 0.5 * available:
                    skipped["Unrolled"] = (
                        f"estimated {estimate:.1f} GiB > half of the {available:.1f} GiB available"
                    )
        for _ in range(repeats):
            for name in args.methods:
                if name in skipped:
                    continue
                runs[name].append(in_subprocess(name, steps, hidden=args.hidden))
                print(
                    f"T={steps} {name}: {runs[name][-1]['cpu_s']:.2f} s CPU, "
                    f"{runs[name][-1]['added_mib']:.1f} MiB",
                    file=sys.stderr,
                )
        row: dict[str, dict] = {}
        for name in args.methods:
            if name in skipped:
                row[name] = {"skipped": skipped[name]}
                continue
            best = min(runs[name], key=lambda r: r["cpu_s"])
            entry = {
                "cpu_s": best["cpu_s"],
                "wall_s": min(r["wall_s"] for r in runs[name]),
                "added_mib": min(r["added_mib"] for r in runs[name]),
                "source": best["source"],
                "metrics": best["metrics"],
                "grads": best["grads"],
            }
            if steps <= 1000 and not args.no_tensors and name not in NO_TENSOR_METER:
                entry.update(in_subprocess(name, steps, tensors=True, hidden=args.hidden))
            row[name] = entry
        ref = row.get("Unrolled", {})
        for entry in row.values():
            if "cpu_s" in entry and "cpu_s" in ref:
                entry["time_ratio"] = entry["cpu_s"] / ref["cpu_s"]
                entry["memory_ratio"] = entry["added_mib"] / max(ref["added_mib"], 1e-9)
                entry["grad_rel_diff"] = max_rel_diff(entry["grads"], ref["grads"])
        results[str(steps)] = row

    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for row in results.values():
        for entry in row.values():
            entry.pop("grads", None)
    payload = {
        "hidden": args.hidden,
        "results": results,
        "unrolled_mib_per_step": unrolled_slope(results),
        "seconds": time.perf_counter() - started,
    }
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"\nwritten {args.out} ({payload['seconds'] / 60:.1f} min)")


def unrolled_slope(results: dict[str, dict]) -> float | None:
    """Unrolled's RSS per inner step (MiB), from the two longest horizons measured."""
    points = [
        (int(t), row["Unrolled"]["added_mib"])
        for t, row in results.items()
        if "added_mib" in row.get("Unrolled", {})
    ]
    if len(points) < 2:
        return None
    (t0, m0), (t1, m1) = sorted(points)[-2:]
    return (m1 - m0) / (t1 - t0)


def report(results: dict[str, dict]) -> None:
    print(
        "| T | method | CPU time | x Unrolled | RSS added | x Unrolled | tensors kept | "
        "grad vs Unrolled |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for steps, row in results.items():
        for name, e in row.items():
            if "skipped" in e:
                print(f"| {steps} | {name} | skipped: {e['skipped']} | | | | | |")
                continue
            kept = f"{e['kept_mib']:.1f} MiB" if "kept_mib" in e else "-"
            print(
                f"| {steps} | {name} | {e['cpu_s']:.2f} s | {e.get('time_ratio', float('nan')):.2f}"
                f" | {e['added_mib']:.1f} MiB | {e.get('memory_ratio', float('nan')):.3f} | "
                f"{kept} | {e.get('grad_rel_diff', float('nan')):.1e} |"
            )
    slope = unrolled_slope(results)
    if slope is not None:
        print(
            f"\nUnrolled: {slope * 1024:.0f} KiB per inner step; "
            f"T = 10000 needs about {slope * 10000 / 1024:.2f} GiB; it would exceed "
            f"{MACHINE_GIB:.0f} GiB from T = {MACHINE_GIB * 1024 / slope:,.0f}"
        )
    rev = results.get("1000", {}).get("Reversible", {}).get("metrics", {})
    if rev:
        print(
            "Reversible at T = 1000: information buffer "
            f"{rev['reversible/buffer_bytes'] / 2**20:.2f} MiB, "
            f"{rev['reversible/bits_per_param_step']:.3f} bits per parameter and step "
            f"(log2(1/momentum) = {rev['reversible/lost_bits_per_param_step']:.3f}); storing "
            f"the trajectory would take {rev['reversible/trajectory_bytes'] / 2**20:.1f} MiB "
            f"({rev['reversible/trajectory_bytes'] / rev['reversible/buffer_bytes']:.0f}x)"
        )


if __name__ == "__main__":
    main()
