"""The GPU check: the default job, `experiment=maml_digits` and the hypergradient benchmark on
CUDA, with their timings (and the CPU's, for comparison).

Run it on a machine with a GPU (one prepared command; a few minutes):
    python benchmarks/gpu_check.py --out gpu_check.json
    python benchmarks/gpu_check.py --quick --device cpu   # the same script, small, on the CPU

Prints, for each part, the wall time on the device (and on the CPU with --compare-cpu), and for
the hypergradients the time per hypergradient and the peak device memory of `Unrolled` and
`Checkpointed` at T = 100 and T = 1000 on the digits MLP 64-128-10 (batch 100).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _run(args: list[str], device: str, folder: Path) -> dict:
    """One `python -m metagrad.train` run; its wall time and final metrics."""
    cmd = [sys.executable, "-m", "metagrad.train", f"hydra.run.dir={folder}", f"device={device}"]
    cmd += ["logger=none", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    final = json.loads((folder / "metrics.json").read_text())["final"]
    return {"seconds": seconds, "final": final}


def _hypergradients(device: str, horizons: list[int], repeats: int) -> dict:
    """Time and peak memory of one hypergradient of the default job's problem."""
    from hydra import compose, initialize_config_dir

    from metagrad.app.configs import register_configs
    from metagrad.hypergrad import Checkpointed, Unrolled
    from metagrad.train import build, config_dir

    register_configs()
    out: dict = {}
    for horizon in horizons:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"device={device}", f"horizon={horizon}"])
        _, job = build(cfg)
        problem = job.problem(0)
        for name, method in (("Unrolled", Unrolled()), ("Checkpointed", Checkpointed())):
            times = []
            for _ in range(repeats + 1):  # the first run warms up
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                method(problem, job.meta)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
            out[f"{name}/T={horizon}"] = {
                "seconds": sorted(times[1:])[len(times[1:]) // 2],
                "peak_bytes": peak,
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small runs (a smoke test)")
    parser.add_argument("--compare-cpu", action="store_true", help="also time the CPU")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu, or on a machine with a GPU")
        sys.exit(2)
    quick = ["outer_steps=3", "horizon=10", "val_every=3", "checkpoint_every=3"]
    fewshot = ["experiment=maml_digits", "meta_batch=4", "eval_tasks=20"]
    jobs = {
        "default job": quick if args.quick else [],
        "maml_digits": [*fewshot, *(quick if args.quick else ["outer_steps=300"])],
    }
    devices = [args.device] + (["cpu"] if args.compare_cpu and args.device != "cpu" else [])
    report: dict = {"device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in jobs.items():
            for device in devices:
                folder = Path(tmp) / f"{name.replace(' ', '_')}-{device.replace(':', '')}"
                result = _run(overrides, device, folder)
                report[f"{name} on {device}"] = result
                print(f"{name:>12} on {device:>6}: {result['seconds']:7.1f} s  {result['final']}")
    horizons = [10] if args.quick else [100, 1000]
    for device in devices:
        found = _hypergradients(device, horizons, 1 if args.quick else 5)
        report[f"hypergradients on {device}"] = found
        for key, value in found.items():
            peak = value["peak_bytes"]
            shown = "" if peak is None else f"  peak {peak / 2**20:8.1f} MiB"
            print(f"{key:>20} on {device:>6}: {value['seconds'] * 1e3:8.1f} ms{shown}")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
