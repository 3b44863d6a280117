"""Few-shot classification on digits: every meta-learner of metagrad through the training app.

Each learner (MAML, FOMAML, Meta-SGD, ANIL, MAML++, iMAML, Reptile) is meta-trained by
`python -m metagrad.train experiment=maml_digits learner=<name>` (one subprocess per run, its
CPU time measured), and its `metrics.json` gives the query accuracy on 600 new 5-way tasks of
the meta-test digits (6-9), with a 95% interval, after 0, 1 and 5 inner steps. Two baselines
without meta-learning use the same 600 test tasks: the nearest class mean in pixel space, and
the same conv net pretrained on all 24 meta-training classes whose head is replaced by a zero
one and fine-tuned on each task's support set (Chen et al. 2019's "Baseline").

    OMP_NUM_THREADS=1 python experiments/maml_digits/run.py             # the full run
    OMP_NUM_THREADS=1 python experiments/maml_digits/run.py --quick     # tiny runs, seconds

writes results.json, results.md and accuracy.png next to this script (or into --out); the
app's run folders go to --runs (default outputs/experiments/maml_digits). --quick runs the
app in this process (`metagrad.train.train`, what the command line calls after composing the
config) to skip the per-run start-up of a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

#: Each learner's own settings on top of the preset (empty: the preset as it is).
LEARNERS: dict[str, list[str]] = {
    "maml": [],
    "fomaml": [],
    "metasgd": [],
    "anil": [],
    "mamlplusplus": [],
    "imaml": [],
    "reptile": [],
}
LABELS = {
    "maml": "MAML",
    "fomaml": "FOMAML",
    "metasgd": "Meta-SGD",
    "anil": "ANIL",
    "mamlplusplus": "MAML++",
    "imaml": "iMAML",
    "reptile": "Reptile",
}
#: Support images per class of the two settings.
SHOTS = (1,)  # --shots 1,5 adds the 5-shot setting
#: Tiny runs for --quick (a few outer steps of a narrow net, few test tasks).
QUICK = [
    "outer_steps=2",
    "meta_batch=2",
    "eval_tasks=12",
    "model.hidden=8",
    "val_every=2",
    "checkpoint_every=2",
    "learner.inner_steps=1",
]
#: Learning rates of the baseline's fine-tuning, chosen on meta-training-class tasks.
FINETUNE_LRS = (0.03, 0.1, 0.3, 1.0)


def app_overrides(learner: str, shots: int, quick: bool) -> list[str]:
    """The overrides of one run (after `python -m metagrad.train`)."""
    extra = QUICK if quick else []
    return ["experiment=maml_digits", f"learner={learner}", f"task.shots={shots}"] + [
        *LEARNERS[learner],
        *extra,
    ]


def command(overrides: list[str]) -> str:
    """The command line a user types for a run."""
    return "python -m metagrad.train " + " ".join(shlex.quote(o) for o in overrides)


def compose(overrides: list[str]) -> Any:
    """The app's config for `overrides`, composed in this process."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from metagrad.app.configs import register_configs
    from metagrad.train import config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def children_cpu() -> float:
    """CPU seconds of this process's finished children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_app(overrides: list[str], run_dir: Path, in_process: bool) -> tuple[dict, float, float]:
    """Run the app once; its metrics.json, CPU seconds and wall seconds."""
    started = time.perf_counter()
    if in_process:
        from metagrad.train import train

        cpu = time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):  # the app's closing report
            train(compose([*overrides, "logger=none"]), run_dir=run_dir)
        cpu = time.process_time() - cpu
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "metagrad.train", *overrides, f"hydra.run.dir={run_dir}"]
        cpu = children_cpu()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        cpu = children_cpu() - cpu
        if proc.returncode:
            raise RuntimeError(f"{command(overrides)} failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - started
    return json.loads((run_dir / "metrics.json").read_text()), cpu, wall


def accuracies(final: dict[str, float], steps: list[int]) -> dict[str, list[float]]:
    """`{steps: [mean, ci95]}` from an app run's final metrics."""
    return {str(s): [final[f"test/accuracy_{s}"], final[f"test/accuracy_{s}_ci95"]] for s in steps}


def interval(values: torch.Tensor) -> list[float]:
    """Mean and half-width of the 95% interval of the mean over tasks."""
    v = values.double()
    return [float(v.mean()), 1.96 * float(v.std()) / math.sqrt(len(v))]


# ---------------------------------------------------------------------- the baselines
def test_tasks(cfg: Any) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """The episodic task of `cfg` and the test tasks the app evaluates on (same seed)."""
    from metagrad.app.runtime import mix_seed, plain
    from metagrad.tasks import DigitsFewShot

    node = {k: v for k, v in plain(cfg.task).items() if k != "_target_"}
    task = DigitsFewShot(**node)
    return task, task.episodes("test", int(cfg.eval_tasks), mix_seed(int(cfg.seed), 0, salt=1))


def pixel_prototypes(cfg: Any) -> dict[str, Any]:
    """Nearest class mean of the support images in pixel space: no learning at all."""
    started = time.process_time()
    _, (sx, sy, qx, qy) = test_tasks(cfg)
    ways = int(cfg.task.ways)
    flat = [t.flatten(2) for t in (sx, qx)]
    onehot = F.one_hot(sy, ways).to(flat[0].dtype)  # [tasks, shots, ways]
    means = onehot.transpose(1, 2) @ flat[0] / onehot.sum(1).unsqueeze(-1)
    correct = (torch.cdist(flat[1], means).argmin(-1) == qy).to(torch.float64).mean(1)
    return {"accuracy": {"-": interval(correct)}, "cpu_seconds": time.process_time() - started}


def train_classes(cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the meta-training classes ((digit, rotation) pairs), labelled 0..C-1."""
    from metagrad.tasks import load_digits

    x, y = load_digits()
    x = x.reshape(-1, 8, 8)
    turns = (0, 1, 2, 3) if cfg.task.rotations else (0,)
    images, labels = [], []
    classes = [(d, k) for d in cfg.task.train_digits for k in turns]
    for c, (d, k) in enumerate(classes):
        pool = torch.rot90(x[y == d], k, dims=(1, 2))
        images.append(pool)
        labels.append(torch.full((len(pool),), c))
    return torch.cat(images).unsqueeze(1), torch.cat(labels)


def pretrained(
    cfg: Any, steps: int, batch: int, eval_steps: list[int], choose_tasks: int = 200
) -> dict[str, Any]:
    """The preset's conv net trained on all meta-training classes, then fine-tuned per task.

    Ordinary classification of the meta-training images (Adam, lr 1e-3, `steps` minibatches of
    `batch`); for each test task the classifier is replaced by a zero-initialized one for the
    task's classes and fine-tuned on the support set with the inner loop the learners use
    (plain SGD, `ANIL`: the body stays fixed). Its learning rate is chosen from
    `FINETUNE_LRS` on `choose_tasks` meta-training-class tasks (best accuracy after the most
    steps), so the test tasks play no part in it.
    """
    from metagrad.app.runtime import mix_seed, plain
    from metagrad.learners import ANIL
    from metagrad.models import conv4

    started = time.process_time()
    task, test = test_tasks(cfg)
    x, y = train_classes(cfg)
    model_args = {k: v for k, v in plain(cfg.model).items() if k not in ("_target_",)}
    model_args.update(in_channels=1, image_size=8)
    torch.manual_seed(int(cfg.seed))
    net = conv4(**{**model_args, "num_classes": int(y.max()) + 1})
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(int(cfg.seed))
    for _ in range(steps):
        idx = torch.randint(len(y), (batch,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    few = conv4(**{**model_args, "num_classes": int(cfg.task.ways)})
    body = {k: v for k, v in net.state_dict().items() if not k.startswith(f"{len(net) - 1}.")}
    few.load_state_dict(body, strict=False)
    head = few[len(few) - 1]
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)

    def accuracy(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (prediction.argmax(-1) == target).to(prediction.dtype).mean()

    def evaluate(lr: float, tasks: tuple[torch.Tensor, ...], at: list[int]) -> dict[str, Any]:
        learner = ANIL(few, inner_lr=lr, loss_fn="cross_entropy")
        out = {}
        for s in at:
            values = [
                learner.evaluate(*(t[i : i + 100] for t in tasks), steps=s, metric=accuracy)[1]
                for i in range(0, len(tasks[0]), 100)
            ]
            out[str(s)] = interval(torch.cat(values))
        return out

    choose = task.episodes("train", choose_tasks, mix_seed(int(cfg.seed), 0, salt=2))
    last = max(eval_steps)
    scores = {lr: evaluate(lr, choose, [last])[str(last)][0] for lr in FINETUNE_LRS}
    lr = max(scores, key=scores.get)
    return {
        "accuracy": evaluate(lr, test, eval_steps),
        "cpu_seconds": time.process_time() - started,
        "finetune_lr": lr,
        "finetune_lr_scores": {str(k): v for k, v in scores.items()},
        "pretrain_loss": float(loss.detach()),
    }


# ---------------------------------------------------------------------- reporting
def table(results: dict[str, Any]) -> str:
    """Markdown tables: accuracy ± 95% interval after each step count, CPU seconds."""
    lines = []
    for shots, entry in results["shots"].items():
        steps = results["eval_inner_steps"]
        head = " | ".join(f"{s} step{'s' if s != 1 else ''}" for s in steps)
        lines += [
            f"### 5-way {shots}-shot",
            "",
            f"| method | {head} | CPU s |",
            "|---" * (len(steps) + 2) + "|",
        ]
        for name, run in entry["runs"].items():
            cells = [LABELS.get(name, name)]
            for s in steps:
                a = run["accuracy"].get(str(s))
                cells.append("" if a is None else f"{a[0]:.3f} ± {a[1]:.3f}")
            cells.append(f"{run['cpu_seconds']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        pix = entry["pixel_prototypes"]["accuracy"]["-"]
        lines.append(
            f"| nearest class mean, pixels (no learning) | {pix[0]:.3f} ± {pix[1]:.3f} |"
            + " |" * (len(steps) - 1)
            + f" {entry['pixel_prototypes']['cpu_seconds']:.1f} |"
        )
        base = entry["pretrained"]
        cells = [f"pretrained + fine-tuned head (lr {base['finetune_lr']:g})"]
        for s in steps:
            a = base["accuracy"].get(str(s))
            cells.append("" if a is None else f"{a[0]:.3f} ± {a[1]:.3f}")
        cells.append(f"{base['cpu_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
        extra = [s for s in base["accuracy"] if int(s) not in steps]
        for s in extra:
            a = base["accuracy"][s]
            lines.append(f"\nThe fine-tuned baseline after {s} steps: {a[0]:.3f} ± {a[1]:.3f}.")
        lines.append("")
    lines += ["Commands:", "", "```bash"]
    for entry in results["shots"].values():
        for run in entry["runs"].values():
            lines.append(run["command"])
    lines += ["```", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results["shots"].items())
    steps = results["eval_inner_steps"]
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4), squeeze=False)
    for ax, (shots, entry) in zip(axes[0], settings, strict=True):
        rows = {LABELS.get(n, n): r["accuracy"] for n, r in entry["runs"].items()}
        rows["pretrained + FT"] = entry["pretrained"]["accuracy"]
        width = 0.8 / len(steps)
        for j, s in enumerate(steps):
            means = [rows[r].get(str(s), [math.nan, 0])[0] for r in rows]
            cis = [rows[r].get(str(s), [math.nan, 0])[1] for r in rows]
            xs = [i + (j - (len(steps) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, means, width, yerr=cis, capsize=2, label=f"{s} inner steps")
        pix = entry["pixel_prototypes"]["accuracy"]["-"][0]
        ax.axhline(pix, color="k", ls="--", lw=1, label="nearest class mean, pixels")
        ax.axhline(1 / results["ways"], color="gray", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(rows)), list(rows), rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("query accuracy (600 test tasks, 95% interval)")
        ax.set_title(f"5-way {shots}-shot, meta-test digits 6-9")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs in this process")
    parser.add_argument("--learners", default=",".join(LEARNERS))
    parser.add_argument("--shots", default=",".join(str(s) for s in SHOTS))
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs/experiments/maml_digits")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    learners = [n for n in args.learners.split(",") if n]
    unknown = [n for n in learners if n not in LEARNERS]
    if unknown:
        parser.error(f"unknown learners {unknown} (choose from {list(LEARNERS)})")
    shots_list = [int(s) for s in args.shots.split(",") if s]
    pretrain_steps = 5 if args.quick else args.pretrain_steps
    choose_tasks = 10 if args.quick else 200
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    results: dict[str, Any] = {"quick": args.quick, "shots": {}}
    started = time.perf_counter()
    for shots in shots_list:
        cfg = compose(app_overrides("maml", shots, args.quick))
        steps = [int(s) for s in cfg.eval_inner_steps]
        results.update(eval_inner_steps=steps, ways=int(cfg.task.ways))
        entry: dict[str, Any] = {"runs": {}}
        for name in learners:
            overrides = app_overrides(name, shots, args.quick)
            run_dir = args.runs / stamp / f"{shots}shot" / name
            metrics, cpu, wall = run_app(overrides, run_dir, in_process=args.quick)
            entry["runs"][name] = {
                "accuracy": accuracies(metrics["final"], steps),
                "cpu_seconds": cpu,
                "wall_seconds": wall,
                "command": command(overrides),
                "final": metrics["final"],
                "learned": metrics["learned"],
                "run_dir": str(run_dir),
            }
            acc = entry["runs"][name]["accuracy"]
            print(
                f"{shots}-shot {name}: "
                + ", ".join(f"{s} steps {a[0]:.3f} ± {a[1]:.3f}" for s, a in acc.items())
                + f" ({cpu:.0f} CPU s)",
                flush=True,
            )
        entry["pixel_prototypes"] = pixel_prototypes(cfg)
        entry["pretrained"] = pretrained(
            cfg, pretrain_steps, 64, sorted({*steps, max(steps) * 5}), choose_tasks
        )
        print(
            f"{shots}-shot baselines: pixels {entry['pixel_prototypes']['accuracy']}, "
            f"pretrained {entry['pretrained']['accuracy']}",
            flush=True,
        )
        results["shots"][str(shots)] = entry
    results["seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(table(results))
    plot(results, args.out / "accuracy.png")
    return results


if __name__ == "__main__":
    main()
