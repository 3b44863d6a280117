"""Meta-train MAML, first-order MAML and Meta-SGD on sinusoids and evaluate them on new tasks.

The setup of Finn et al. (2017): an MLP 1-40-40-1 with ReLU, K = 10 support points, a
meta-batch of 25 tasks, inner SGD with learning rate 0.01, Adam with learning rate 1e-3 in the
outer loop. After meta-training, each method adapts to 600 new tasks (K = 10 support points,
100 query points each) with 1 and with 10 inner steps, and we report the mean query MSE. A
baseline trained jointly on all tasks (ordinary regression on the mixture) is fine-tuned the
same way.

    OMP_NUM_THREADS=1 python experiments/maml_sine/run.py --iterations 20000

writes results.json and results.md next to this script (or into --out).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from metagrad.learners import MAML, MetaLearner, MetaSGD
from metagrad.tasks import SinusoidTasks

HERE = Path(__file__).resolve().parent


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def build(method: str, args: argparse.Namespace) -> tuple[MetaLearner, torch.optim.Optimizer]:
    model = mlp(args.seed)
    common = dict(loss_fn="mse", inner_lr=args.inner_lr, inner_steps=args.inner_steps)
    if method == "maml":
        algo: MetaLearner = MAML(model, **common)
    elif method == "fomaml":
        algo = MAML(model, first_order=True, **common)
    elif method == "metasgd":
        algo = MetaSGD(model, **common)
    else:
        raise ValueError(f"unknown method {method!r}")
    groups = [{"params": list(model.parameters()), "lr": args.outer_lr}]
    if method == "metasgd":
        # The learning rates are stored as logs: a larger outer step lets them move.
        groups.append({"params": list(algo.meta.parameters()), "lr": args.lr_outer_lr})
    return algo, torch.optim.Adam(groups)


def evaluate(algo: MetaLearner, args: argparse.Namespace) -> dict[str, float]:
    """Mean query MSE over new tasks after 0, 1 and 10 inner steps (and a 95% interval)."""
    sampler = SinusoidTasks(seed=args.seed + 10_000)
    batch = sampler.sample(args.eval_tasks, args.shots, args.eval_query)
    out: dict[str, float] = {}
    for steps in (0, 1, 10):
        losses = []
        for i in range(0, args.eval_tasks, 100):
            sx, sy, qx, qy = (t[i : i + 100] for t in batch)
            with torch.no_grad():
                if steps == 0:
                    pred = algo.model(qx)
                    losses.append(((pred - qy) ** 2).mean(dim=(1, 2)))
                else:
                    losses.append(algo(sx, sy, qx, qy, steps=steps, reduction="none").detach())
        per_task = torch.cat(losses)
        out[f"mse_{steps}"] = per_task.mean().item()
        out[f"ci95_{steps}"] = 1.96 * per_task.std().item() / math.sqrt(len(per_task))
    return out


def train_meta(method: str, args: argparse.Namespace, log) -> dict[str, float]:
    algo, opt = build(method, args)
    sampler = SinusoidTasks(seed=args.seed)
    start = time.perf_counter()
    running = None
    for it in range(1, args.iterations + 1):
        batch = sampler.sample(args.meta_batch, args.shots)
        opt.zero_grad()
        loss = algo(*batch)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if it % args.log_every == 0 or it == args.iterations:
            log(
                f"{method} it {it} query loss (smoothed) {running:.4f} "
                f"{(time.perf_counter() - start) / it * 1000:.1f} ms/it"
            )
    seconds = time.perf_counter() - start
    result = evaluate(algo, args)
    result.update(train_seconds=seconds, ms_per_iteration=1000 * seconds / args.iterations)
    if method == "metasgd":
        lrs = torch.cat([v.flatten() for v in algo.lrs().values()])
        result.update(lr_mean=lrs.mean().item(), lr_min=lrs.min().item(), lr_max=lrs.max().item())
    return result


def train_pretrained(args: argparse.Namespace, log) -> dict[str, float]:
    """Ordinary regression on samples from all tasks, then fine-tuned like the others."""
    model = mlp(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    sampler = SinusoidTasks(seed=args.seed)
    start = time.perf_counter()
    for _ in range(args.iterations):
        sx, sy, _, _ = sampler.sample(args.meta_batch, args.shots)
        opt.zero_grad()
        loss = ((model(sx) - sy) ** 2).mean()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    log(f"pretrained: {seconds:.0f} s")
    # Fine-tune with the same inner loop as MAML (plain SGD at inner_lr).
    algo = MAML(model, loss_fn="mse", inner_lr=args.inner_lr, inner_steps=1)
    result = evaluate(algo, args)
    result.update(train_seconds=seconds)
    return result


def write_markdown(results: dict, args: argparse.Namespace, path: Path) -> None:
    lines = [
        "| method | MSE, 0 steps | MSE, 1 step | MSE, 10 steps | train time | ms / iteration |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["methods"].items():
        ms = f"{r['ms_per_iteration']:.1f}" if "ms_per_iteration" in r else "-"
        lines.append(
            f"| {name} | {r['mse_0']:.3f} ± {r['ci95_0']:.3f} | {r['mse_1']:.3f} ± "
            f"{r['ci95_1']:.3f} | {r['mse_10']:.3f} ± {r['ci95_10']:.3f} | "
            f"{r['train_seconds']:.0f} s | {ms} |"
        )
    header = (
        f"Meta-iterations: {args.iterations}, inner steps in training: {args.inner_steps}, "
        f"inner lr {args.inner_lr}, outer Adam lr {args.outer_lr}, meta-batch "
        f"{args.meta_batch}, K = {args.shots}; evaluation: {args.eval_tasks} new tasks, "
        f"{args.eval_query} query points each, mean ± 95% interval.\n\n"
    )
    path.write_text(header + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--methods", default="maml,fomaml,metasgd,pretrained")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--outer-lr", type=float, default=1e-3)
    parser.add_argument(
        "--lr-outer-lr",
        type=float,
        default=1e-2,
        help="outer Adam learning rate of Meta-SGD's log learning rates",
    )
    parser.add_argument("--meta-batch", type=int, default=25)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--eval-tasks", type=int, default=600)
    parser.add_argument("--eval-query", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=500)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    logfile = (args.out / "train.log").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logfile.write(msg + "\n")
        logfile.flush()

    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "methods": {}}
    for method in args.methods.split(","):
        if method == "pretrained":
            results["methods"][method] = train_pretrained(args, log)
        else:
            results["methods"][method] = train_meta(method, args, log)
        log(f"{method}: {json.dumps(results['methods'][method])}")
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        write_markdown(results, args, args.out / "results.md")


if __name__ == "__main__":
    main()
