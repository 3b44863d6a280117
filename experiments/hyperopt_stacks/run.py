"""Hyperoptimizer stacks on digits: do taller stacks depend less on the initial learning rate?

Chandra et al. (2022) report that as stacks of hyperoptimizers grow taller, the result becomes
less sensitive to the initial hyperparameters. This script trains the digits MLP (sklearn's
`load_digits`, 64-128-10 with ReLU, batch 100, cross-entropy) with `metagrad.online.
Hyperoptimizer` stacks of height 1-4 from initial learning rates 1e-4 ... 1 and records the
final test error of each run:

* `sgd`: SGD (learns its lr) / SGD / SGD / SGD, each level learning the lr of the one below;
* `adam-sgd`: Adam (learns its lr, beta1 and beta2) / SGD / SGD / SGD;
* `adam`: Adam / Adam / Adam / Adam (every level learns the lr and betas of the one below).

Height 1 is plain SGD or Adam. The learning rates of the levels above level 0 are fixed per
family before any run, the same for every initial learning rate and seed, in two settings
("small" and "large", see `SETTINGS`), so that the result does not rest on one choice.

Data: 1200 training and 597 test images, split with a fixed seed; the seed of a run sets the
initial weights and the order of the batches. A run whose loss becomes non-finite is marked
diverged and its test error counted as 1.

    OMP_NUM_THREADS=1 python experiments/hyperopt_stacks/run.py            # ~5-8 min
    OMP_NUM_THREADS=1 python experiments/hyperopt_stacks/run.py --quick    # a smoke test
    python experiments/hyperopt_stacks/run.py --plot-only    # summary and figure from results
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from metagrad.online import HyperAdam, Hyperoptimizer, HyperSGD

HERE = Path(__file__).resolve().parent
LRS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
HEIGHTS = [1, 2, 3, 4]
SEEDS = [0, 1, 2]
EPOCHS = 20
BATCH = 100
# Per family: the optimizer of level 0, that of the levels above, and the learning rates of
# levels 1, 2, 3 in two settings, fixed before any run.
# sgd: Baydin et al.'s SGD-HD value 1e-3 at every level, and ten times it.
# adam-sgd: gdtuo's README value 1e-5 for the SGD above Adam and 100 times less per level
#   above that (early in training the hypergradients of this stack grow by one to two orders
#   of magnitude per level), and the same ladder a hundred times larger.
# adam: an Adam level moves each value below it by about its lr per step, whatever the size
#   of the hypergradient; each level moves the one below by about 1% of its lr per step.
FAMILIES: dict[str, tuple[str, str]] = {
    "sgd": ("sgd", "sgd"),
    "adam-sgd": ("adam", "sgd"),
    "adam": ("adam", "adam"),
}
SETTINGS: dict[str, dict[str, list[float]]] = {
    "sgd": {"small": [1e-3, 1e-3, 1e-3], "large": [1e-2, 1e-2, 1e-2]},
    "adam-sgd": {"small": [1e-5, 1e-7, 1e-9], "large": [1e-3, 1e-5, 1e-7]},
    "adam": {"small": [1e-4, 1e-6, 1e-8], "large": [1e-3, 1e-5, 1e-7]},
}
NAMES = {"sgd": "SGD / SGD / ...", "adam-sgd": "Adam / SGD / ...", "adam": "Adam / Adam / ..."}


def load_data() -> dict[str, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def make_levels(family: str, setting: str, lr: float, height: int) -> list[Any]:
    kinds = {"sgd": HyperSGD, "adam": HyperAdam}
    base, above = (kinds[k] for k in FAMILIES[family])
    return [base(lr=lr)] + [above(lr=h) for h in SETTINGS[family][setting][: height - 1]]


def train_one(data: dict[str, torch.Tensor], levels: list[Any], seed: int) -> dict[str, Any]:
    """One training run; returns the final test error, learned values and timing."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = Hyperoptimizer(model.parameters(), levels=levels)
    order = torch.Generator().manual_seed(seed)
    n = len(data["y_train"])
    diverged = False
    for _ in range(EPOCHS):
        perm = torch.randperm(n, generator=order)
        for i in range(0, n - BATCH + 1, BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad()
            loss = F.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx])
            if not math.isfinite(float(loss)):
                diverged = True
                break
            loss.backward()
            opt.step()
        if diverged:
            break
    with torch.no_grad():
        logits = model(data["x_test"])
        right = (logits.argmax(-1) == data["y_test"]) & torch.isfinite(logits).all(-1)
        test_error = 1.0 if diverged else 1.0 - float(right.double().mean())
        train_loss = float(F.cross_entropy(model(data["x_train"]), data["y_train"]))
    group = opt.param_groups[0]
    return {
        "test_error": test_error,
        "train_loss": train_loss if math.isfinite(train_loss) else None,
        "diverged": diverged,
        "final_lr": group["lr"] if math.isfinite(group["lr"]) else None,
        "final_betas": list(group["betas"]) if "betas" in group else None,
        "final_hyper_lrs": [h["lr"] for h in group["hyper"]],
        "seconds": time.perf_counter() - started,
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per family, setting and height: mean test error per initial lr and its spread."""
    keys = sorted({(r["family"], r["setting"], r["height"]) for r in runs})
    rows = []
    for family, setting, height in keys:
        mine = [
            r for r in runs if (r["family"], r["setting"], r["height"]) == (family, setting, height)
        ]
        by_lr = {}
        for lr in LRS:
            errors = [r["test_error"] for r in mine if r["lr"] == lr]
            by_lr[repr(lr)] = {
                "mean": statistics.fmean(errors),
                "std": statistics.pstdev(errors),
                "diverged": sum(r["diverged"] for r in mine if r["lr"] == lr),
            }
        means = [v["mean"] for v in by_lr.values()]
        below_one = [by_lr[repr(lr)]["mean"] for lr in LRS if lr < 1]
        rows.append(
            {
                "family": family,
                "setting": setting,
                "height": height,
                "by_lr": by_lr,
                "spread": max(means) - min(means),
                "spread_below_1": max(below_one) - min(below_one),
                "worst": max(means),
                "best": min(means),
            }
        )
    return rows


def with_height_one(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Height 1 has no levels above: its runs (made once per optimizer of level 0) count for
    both settings of every family with that level 0."""
    out = []
    for r in runs:
        if r["height"] != 1:
            out.append(r)
            continue
        for family, (base, _) in FAMILIES.items():
            if base == r["family"]:
                out.extend(r | {"family": family, "setting": s} for s in SETTINGS[family])
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]
    families = list(SETTINGS)
    fig, axes = plt.subplots(
        len(families), 2, figsize=(9, 3.2 * len(families)), sharex=True, sharey=True
    )
    for r, family in enumerate(families):
        for c, setting in enumerate(SETTINGS[family]):
            ax = axes[r][c]
            for row in rows:
                if (row["family"], row["setting"]) != (family, setting):
                    continue
                means = [row["by_lr"][repr(lr)]["mean"] for lr in LRS]
                stds = [row["by_lr"][repr(lr)]["std"] for lr in LRS]
                ax.errorbar(
                    LRS, means, yerr=stds, marker="o", capsize=3, label=f"height {row['height']}"
                )
            hyper = ", ".join(f"{h:g}" for h in SETTINGS[family][setting])
            ax.set_title(f"{NAMES[family]}, {setting}: levels 1-3 lr {hyper}", fontsize=9)
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            if r == len(families) - 1:
                ax.set_xlabel("initial learning rate of level 0")
            if c == 0:
                ax.set_ylabel("test error")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"digits MLP, {EPOCHS} epochs: final test error (mean and std of {len(SEEDS)} seeds; "
        "diverged runs count as 1)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = " ".join(f"{lr:>7g}" for lr in LRS)
    print(f"{'family':<8} {'setting':<7} {'h':>2}  {header}   spread  (lr < 1)")
    for row in rows:
        cells = []
        for lr in LRS:
            cell = row["by_lr"][repr(lr)]
            mark = "*" if cell["diverged"] else " "
            cells.append(f"{cell['mean']:6.3f}{mark}")
        print(
            f"{row['family']:<8} {row['setting']:<7} {row['height']:>2}  {' '.join(cells)}"
            f"   {row['spread']:.3f}  ({row['spread_below_1']:.3f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, two epochs, no files")
    parser.add_argument("--plot-only", action="store_true", help="redraw from results.json")
    args = parser.parse_args()
    if args.plot_only:
        results = json.loads((HERE / "results.json").read_text())
        results["summary"] = summarize(with_height_one(results["runs"]))
        (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, HERE / "hyperopt_stacks.png")
        print_table(results["summary"])
        return
    global EPOCHS, SEEDS
    if args.quick:
        EPOCHS, SEEDS = 2, [0]
    torch.set_num_threads(1)
    data = load_data()
    started = time.perf_counter()
    runs = []
    for family in SETTINGS:
        for height in HEIGHTS:
            if height == 1 and family not in ("sgd", "adam"):
                continue  # height 1 is plain SGD or Adam: run once per optimizer
            settings = ["-"] if height == 1 else list(SETTINGS[family])
            for setting in settings:
                for lr in LRS:
                    for seed in SEEDS:
                        levels = make_levels(family, setting if height > 1 else "small", lr, height)
                        out = train_one(data, levels, seed)
                        runs.append(
                            {
                                "family": family,
                                "setting": setting,
                                "height": height,
                                "lr": lr,
                                "seed": seed,
                            }
                            | out
                        )
                        print(
                            f"{family} {setting} h={height} lr={lr:g} seed={seed}: "
                            f"test error {out['test_error']:.3f}, lr -> {out['final_lr']}, "
                            f"{out['seconds']:.1f}s",
                            flush=True,
                        )
    total = time.perf_counter() - started
    summary = summarize(with_height_one(runs))
    print_table(summary)
    print(f"total {total:.0f} s")
    if args.quick:
        return
    results = {
        "config": {
            "data": "sklearn load_digits, 1200 train / 597 test (split seed 0), pixels / 16",
            "model": "MLP 64-128-10, ReLU, cross-entropy",
            "batch": BATCH,
            "epochs": EPOCHS,
            "seeds": SEEDS,
            "initial_lrs": LRS,
            "heights": HEIGHTS,
            "hyper_lrs": SETTINGS,
            "threads": 1,
            "torch": torch.__version__,
        },
        "total_seconds": total,
        "summary": summary,
        "runs": runs,
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, HERE / "hyperopt_stacks.png")


if __name__ == "__main__":
    main()
