"""Learning to reweight training examples on corrupted digits: every method, several seeds.

Two corruptions of the digits training split (40% of labels flipped; classes long-tailed at
100:1), a clean validation split of 10 images per class as the outer objective, a clean test
split of 50 per class for reporting. For each corruption, method and seed, `reweight.run`
trains softmax regression and reports test accuracy, cost and the learned weights.

    OMP_NUM_THREADS=1 python experiments/reweight_digits/run.py            # the full run
    OMP_NUM_THREADS=1 python experiments/reweight_digits/run.py --quick    # a few seconds

writes results.json, results.md and the plots (weights_flip.png, weights_imbalance.png,
mwn_functions.png) next to this script (or into --out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reweight import BASELINES, ReweightResult, run  # noqa: E402

# (label, method, estimator): the rows of the table, run for each corruption.
ROWS = [
    ("plain (corrupted train)", "plain", "unrolled"),
    ("clean validation only", "clean_only", "unrolled"),
    ("union (train + validation)", "union", "unrolled"),
    ("oracle", "oracle", "unrolled"),
    ("per-example, Unrolled", "weights", "unrolled"),
    ("per-example, Truncated(10)", "weights", "truncated"),
    ("per-example, FirstOrder", "weights", "first_order"),
    ("per-example, Implicit", "weights", "implicit"),
    ("MW-Net, Unrolled", "mwn", "unrolled"),
    ("MW-Net, Truncated(10)", "mwn", "truncated"),
    ("MW-Net, Implicit", "mwn", "implicit"),
    ("per-example, online", "weights_online", "unrolled"),
    ("MW-Net, online (Shu et al.)", "mwn_online", "unrolled"),
    ("L2RW, online (Ren et al.)", "l2rw", "unrolled"),
]
SETTINGS = {"flip": {"noise": "flip", "rate": 0.4}, "imbalance": {"noise": "imbalance"}}
# Two-sided 95% quantiles of Student's t for 1..9 degrees of freedom (normal beyond).
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262]


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of a 95% t-interval over seeds (0 for one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T95[n - 2] if n - 2 < len(T95) else 1.96
    return mean, t * sd / math.sqrt(n)


def summarize(per_seed: list[dict[str, float]]) -> dict[str, list[float]]:
    keys = sorted({k for m in per_seed for k in m})
    return {k: list(interval([m[k] for m in per_seed if k in m])) for k in keys}


def class_weights(result: ReweightResult) -> list[float]:
    """Mean learned weight per observed class."""
    return [float(result.weights[result.labels == c].mean()) for c in range(10)]


def plot(results: dict[str, Any], examples: dict[str, dict[str, ReweightResult]], out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The learned weightings (FirstOrder's stay uniform: it sees no data weights).
    learned = [r for r in ROWS if r[1] not in BASELINES and r[2] != "first_order"]

    # Flip: histograms of the learned weights, flipped vs clean labels (seed 0).
    fig, axes = plt.subplots(2, 5, figsize=(17, 6.5), sharex=True)
    bins = torch.logspace(-4, 1, 41).tolist()
    for ax, (label, method, estimator) in zip(axes.flat, learned, strict=False):
        r = examples["flip"][f"{method}/{estimator}"]
        w = r.weights.clamp(1e-4, 10)
        ax.hist(w[~r.corrupted].tolist(), bins=bins, alpha=0.6, label="clean label")
        ax.hist(w[r.corrupted].tolist(), bins=bins, alpha=0.6, label="flipped label")
        mc, mf = float(r.weights[~r.corrupted].mean()), float(r.weights[r.corrupted].mean())
        ax.set_title(f"{label}\nmean clean {mc:.2f}, flipped {mf:.2f}", fontsize=9)
        ax.set_xscale("log")
    for ax in axes.flat[len(learned) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("learned weight (mean 1)")
    fig.suptitle("40% flipped labels: learned weight of each training example (seed 0)")
    fig.tight_layout()
    fig.savefig(out / "weights_flip.png", dpi=80)
    plt.close(fig)

    # Imbalance: mean learned weight per class against the class's size (seed 0).
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, method, estimator in learned:
        r = examples["imbalance"][f"{method}/{estimator}"]
        counts = torch.bincount(r.labels, minlength=10)
        order = counts.argsort(descending=True)
        ax.plot(
            counts[order].tolist(),
            [class_weights(r)[i] for i in order.tolist()],
            marker="o",
            label=label,
        )
    first = examples["imbalance"]["mwn/unrolled"]
    counts = torch.bincount(first.labels, minlength=10).double()
    balanced = (1 / counts) / (1 / counts)[first.labels].mean()
    ax.plot(
        sorted(counts.tolist(), reverse=True),
        sorted(balanced.tolist()),
        "k--",
        label="class-balanced (1 / count)",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("mean learned weight of the class (mean 1)")
    ax.set_title("100:1 imbalance: learned weight per class (seed 0)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "weights_imbalance.png", dpi=80)
    plt.close(fig)

    # The Meta-Weight-Nets' learned weighting functions.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, setting in zip(axes, SETTINGS, strict=True):
        for label, method, estimator in learned:
            r = examples[setting][f"{method}/{estimator}"]
            if r.weight_fn is not None:
                grid, w = r.weight_fn
                ax.plot(grid.tolist(), w.tolist(), label=label)
        ax.set_xlabel("training loss of the example")
        ax.set_ylabel("weight (network output)")
        ax.set_title(f"{setting}: learned weighting function (seed 0)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "mwn_functions.png", dpi=80)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    """Markdown tables: means over seeds (test accuracy with its 95% interval)."""
    weight_columns = {
        "flip": ("weight flipped / clean | AUC", "mean_corrupted", "mean_clean"),
        "imbalance": ("weight 5 rarest / 5 largest classes", "mean_tail", "mean_head"),
    }
    lines = []
    for setting in SETTINGS:
        title, low, high = weight_columns[setting]
        header = f"| method | test accuracy | val loss | CPU seconds | {title} |"
        lines += [f"### {setting}", "", header, "|---" * header.count(" | ") + "|---|"]
        for label, method, estimator in ROWS:
            s = results["settings"][setting][f"{method}/{estimator}"]["summary"]
            acc, ci = s["test/accuracy"]
            cells = [label, f"{acc:.3f} ± {ci:.3f}", f"{s['val/loss'][0]:.3f}"]
            cells.append(f"{s['cpu_seconds'][0]:.1f}")
            if f"weights/{low}" in s:
                cells.append(f"{s[f'weights/{low}'][0]:.2f} / {s[f'weights/{high}'][0]:.2f}")
                if setting == "flip":
                    cells.append(f"{s['weights/auc_corrupted'][0]:.3f}")
            else:  # a baseline: uniform weights
                cells += [""] * (2 if setting == "flip" else 1)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--outer-steps", type=int, default=20)
    parser.add_argument("--inner-steps", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny runs (seconds)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.outer_steps, args.inner_steps = 1, 2, 10
    torch.set_num_threads(1)
    # The first torch.optim optimizer imports torch's compiler stack (seconds): not a cost of
    # the first method that happens to build one.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    run("plain", inner_steps=1)  # and the first run imports scikit-learn's datasets
    args.out.mkdir(parents=True, exist_ok=True)
    settings = dict(outer_steps=args.outer_steps, inner_steps=args.inner_steps, k=10)
    results: dict[str, Any] = {"config": {**settings, "seeds": args.seeds}, "settings": {}}
    examples: dict[str, dict[str, ReweightResult]] = {}
    started, started_cpu = time.perf_counter(), time.process_time()
    for setting, data_args in SETTINGS.items():
        results["settings"][setting] = {}
        examples[setting] = {}
        for label, method, estimator in ROWS:
            per_seed = []
            for seed in range(args.seeds):
                r = run(method, estimator=estimator, seed=seed, **data_args, **settings)
                per_seed.append(r.metrics)
                if seed == 0:
                    examples[setting][f"{method}/{estimator}"] = r
            entry = {"label": label, "per_seed": per_seed, "summary": summarize(per_seed)}
            if setting == "imbalance" and method != "plain":
                r0 = examples[setting][f"{method}/{estimator}"]
                entry["class_counts_seed0"] = torch.bincount(r0.labels, minlength=10).tolist()
                entry["class_weights_seed0"] = class_weights(r0)
            results["settings"][setting][f"{method}/{estimator}"] = entry
            acc, ci = entry["summary"]["test/accuracy"]
            elapsed = time.perf_counter() - started
            print(f"[{elapsed:6.1f}s] {setting:9s} {label:30s} test acc {acc:.3f} ± {ci:.3f}")
    results["total_seconds"] = time.perf_counter() - started
    results["total_cpu_seconds"] = time.process_time() - started_cpu
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(table(results))
    plot(results, examples, args.out)
    print(table(results))
    print(
        f"total {results['total_seconds']:.0f} s wall, "
        f"{results['total_cpu_seconds']:.0f} s CPU (one thread)"
    )
    return results


if __name__ == "__main__":
    main()
