"""Plot memory and time against the horizon T from `benchmarks/bench_long_horizon.py`'s JSON.

    python experiments/long_horizon/plot.py experiments/long_horizon/results.json \
        --out experiments/long_horizon/long_horizon.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot"]

HERE = Path(__file__).resolve().parent


def plot(results_file: Path, out: Path, machine_gib: float = 24.0) -> None:
    """Two panels against T: peak RSS added (log-log) and CPU time relative to `Unrolled`."""
    payload = json.loads(results_file.read_text())
    results = payload["results"]
    horizons = sorted(int(t) for t in results)
    methods = list(next(iter(results.values())))
    fig, (mem, cpu) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in methods:
        ts = [t for t in horizons if "added_mib" in results[str(t)].get(name, {})]
        if not ts:
            continue
        memory = [results[str(t)][name]["added_mib"] for t in ts]
        (line,) = mem.plot(ts, memory, marker="o", label=name)
        ratios = [(t, results[str(t)][name].get("time_ratio")) for t in ts]
        ratios = [(t, r) for t, r in ratios if r is not None]
        if ratios:
            cpu.plot(*zip(*ratios, strict=True), marker="o", label=name, color=line.get_color())
    slope = payload.get("unrolled_mib_per_step")
    if slope:
        span = [horizons[0], max(horizons[-1], machine_gib * 1024 / slope)]
        mem.plot(span, [slope * t for t in span], ":", color="gray", label="Unrolled, extrapolated")
        mem.axhline(machine_gib * 1024, color="red", lw=0.8)
        mem.text(span[0], machine_gib * 1024 * 1.15, f"{machine_gib:.0f} GiB", color="red")
    cpu.axhline(1.25, color="red", lw=0.8)
    cpu.text(horizons[0], 1.28, "target 1.25x", color="red")
    mem.set(xscale="log", yscale="log", xlabel="inner steps T", ylabel="peak RSS added (MiB)")
    cpu.set(xscale="log", xlabel="inner steps T", ylabel="CPU time / Unrolled's")
    cpu.set_ylim(bottom=0)
    mem.set_title("memory of one hypergradient")
    cpu.set_title("time of one hypergradient, relative to Unrolled (one thread)")
    for ax in (mem, cpu):
        ax.grid(True, which="both", alpha=0.3)
    mem.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, nargs="?", default=HERE / "results.json")
    parser.add_argument("--out", type=Path, default=HERE / "long_horizon.png")
    args = parser.parse_args()
    plot(args.results, args.out)


if __name__ == "__main__":
    main()
