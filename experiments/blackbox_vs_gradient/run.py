"""Hypergradients against black-box search (Optuna's TPE and random search) at equal CPU.

The question: to tune the hyperparameters of a training run, is a gradient through the run better
than black-box search, given the same compute? Four search spaces of growing size on sklearn's
digits, every configuration judged by one objective, the validation loss after training:

    (a) lr, momentum                                          2 values
    (b) per-layer lr, momentum, per-layer weight decay         9
    (c) a per-step learning-rate schedule                    100
    (d) per-element weight decay                            2410

The inner run (the same on both sides): an MLP 64-32-10 (ReLU) trained by SGD for 100 steps on
minibatches of 100 from a training split of 200 images (validation 800, test 797; a small
training set, so that weight decay matters), from the initialization and batches of the run's
seed. `val/loss` of `python -m metagrad.train` with nothing learned is the objective.

Every side runs as a user would run it:

- Black-box, as run: `python -m metagrad.train -m hydra/sweeper=optuna` with the TPE sampler,
  or its RandomSampler, one process, every trial a full inner training run (Hydra's basic
  launcher, one trial at a time). Per-layer, per-step and per-element values are `learn`
  entries with `fixed: true`, one sweep parameter per value (`learn.lr.init.3`, ...); the
  search space of each case is a generated preset (`configs/experiment/bb_<case>.yaml` in the
  output folder).
- Gradient: `python -m metagrad.train loop=hpo hypergrad=unrolled` learning the same
  entries (preset `gd_<case>.yaml`), Adam with lr 0.1 on the constrained-away values
  (log lr, logit momentum), from a plain start (lr 0.1, momentum 0.5, weight decay 1e-4).
- Black-box, search only: the same TPE sampler asked in this process over the same objective,
  evaluated through the app's Python API (`metagrad.train.build` and the job's evaluation)
  with no Hydra composition per trial and no process start: what the search itself costs.

Equal compute: every run of every side gets the same budget of CPU seconds per case (process
CPU time, user + system, of the run's process: `resource.getrusage(RUSAGE_CHILDREN)` around
the subprocess; `time.process_time()` inside it dates each trial and each validation; the
process start, imports, sampling and Hydra's work count). A side's result at the budget is its
best configuration by validation loss among those finished within it; its test accuracy is
that configuration's, on the untouched test split. The gradient side's configurations are its
validated hyperparameters (every 5 outer steps), evaluated again afterwards as fixed values
with the black-box objective, which reproduces the validation loss the run reported.

    OMP_NUM_THREADS=1 python experiments/blackbox_vs_gradient/run.py          # about 40 CPU-minutes
    OMP_NUM_THREADS=1 python experiments/blackbox_vs_gradient/run.py --quick  # about a minute

writes results.json, blackbox_vs_gradient.png and the runs (runs/, configs/) into --out
(default: next to this script; runs/ and configs/ are left out of version control).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

#: The inner run of every case, on both sides.
BASE = ["model.hidden=[32]", "task.val_size=800", "task.test_size=797", "horizon=100", "threads=1"]
#: The gradient side's outer loop.
GRADIENT = ["loop=hpo", "hypergrad=unrolled", "outer_optim.lr=0.1", "val_every=5"]
#: The arms, in the order they are run and plotted.
ARMS = ("gradient", "tpe", "random", "tpe_inprocess")
LABELS = {
    "gradient": "hypergradient (Unrolled, loop=hpo)",
    "tpe": "Optuna TPE (Hydra sweep)",
    "random": "random search (Hydra sweep)",
    "tpe_inprocess": "Optuna TPE, search only (in-process)",
}
LR = (1e-3, 3.0, True)
MOMENTUM = (0.01, 0.99, False)
WEIGHT_DECAY = (1e-6, 0.1, True)


@dataclass
class Group:
    """One `learn` entry searched by both sides: its range and the gradient side's start."""

    name: str
    scope: str = "scalar"
    per_step: bool = False
    space: tuple[float, float, bool] = LR  # low, high, log
    start: float = 0.1
    constraint: str = "positive"

    def count(self, layers: int, elements: int, horizon: int) -> int:
        width = {"scalar": 1, "per_layer": layers, "per_element": elements}[self.scope]
        return width * (horizon if self.per_step else 1)

    def listed(self, layers: int, elements: int, horizon: int) -> bool:
        """Whether `init` is a list (anything but one scalar value)."""
        return self.count(layers, elements, horizon) > 1


@dataclass
class Case:
    key: str
    title: str
    groups: list[Group]
    fixed: list[str] = field(default_factory=list)  # overrides of both sides


CASES = [
    Case(
        "a_lr_momentum",
        "(a) lr, momentum",
        [Group("lr"), Group("momentum", space=MOMENTUM, start=0.5, constraint="unit")],
    ),
    Case(
        "b_per_layer",
        "(b) per-layer lr and weight decay, momentum",
        [
            Group("lr", scope="per_layer"),
            Group("momentum", space=MOMENTUM, start=0.5, constraint="unit"),
            Group("weight_decay", scope="per_layer", space=WEIGHT_DECAY, start=1e-4),
        ],
    ),
    Case(
        "c_lr_schedule",
        "(c) per-step lr schedule",
        [Group("lr", per_step=True)],
        ["inner_optim.momentum=0.5"],
    ),
    Case(
        "d_per_element_wd",
        "(d) per-element weight decay",
        [Group("weight_decay", scope="per_element", space=WEIGHT_DECAY, start=1e-4)],
        ["inner_optim.lr=1.0", "inner_optim.momentum=0.5"],
    ),
]


@dataclass
class Settings:
    """Sizes of a full or a quick run."""

    seeds: list[int]
    budget: float  # CPU seconds per run of each arm
    cases: list[str]
    hidden: int = 32
    horizon: int = 100
    #: More trials and outer steps than any budget here allows: the runs end on the budget.
    units: int = 100_000

    def base(self) -> list[str]:
        out = [o for o in BASE if not o.startswith(("model.hidden", "horizon"))]
        return [f"model.hidden=[{self.hidden}]", f"horizon={self.horizon}", *out]


def full_settings() -> Settings:
    return Settings(seeds=[0, 1, 2], budget=35.0, cases=[c.key for c in CASES])


def quick_settings() -> Settings:
    return Settings(seeds=[0], budget=16.0, cases=["d_per_element_wd"], hidden=4, horizon=10)


# --------------------------------------------------------------------------- the model's sizes
def layout(hidden: int) -> list[tuple[str, int]]:
    """(parameter name, numel) of the MLP 64-hidden-10, in the model's order."""
    from metagrad.models import mlp

    return [(n, p.numel()) for n, p in mlp(64, 10, hidden=[hidden]).named_parameters()]


# --------------------------------------------------------------------------- presets
def _space_expr(space: tuple[float, float, bool]) -> str:
    low, high, log = space
    return f"tag(log, interval({low}, {high}))" if log else f"interval({low}, {high})"


def param_names(case: Case, s: Settings) -> list[tuple[str, tuple[float, float, bool]]]:
    """The sweep parameters of a case (Hydra keys, also Optuna's names) and their ranges."""
    sizes = layout(s.hidden)
    layers, elements = len(sizes), sum(n for _, n in sizes)
    out = []
    for g in case.groups:
        n = g.count(layers, elements, s.horizon)
        if g.listed(layers, elements, s.horizon):
            out += [(f"learn.{g.name}.init.{i}", g.space) for i in range(n)]
        else:
            out.append((f"learn.{g.name}.init", g.space))
    return out


def _entry(g: Group, init: Any, fixed: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "init": init,
        "constraint": g.constraint,
        "scope": g.scope,
        "per_step": g.per_step,
    }
    if fixed:
        entry["fixed"] = True
    return entry


def fixed_learn(case: Case, s: Settings, values: dict[str, float]) -> dict[str, Any]:
    """The `learn` group fixing every searched value (`values`: sweep name -> value)."""
    sizes = layout(s.hidden)
    layers, elements = len(sizes), sum(n for _, n in sizes)
    learn = {}
    for g in case.groups:
        n = g.count(layers, elements, s.horizon)
        if g.listed(layers, elements, s.horizon):
            init: Any = [float(values[f"learn.{g.name}.init.{i}"]) for i in range(n)]
        else:
            init = float(values[f"learn.{g.name}.init"])
        learn[g.name] = _entry(g, init, fixed=True)
    return learn


def write_presets(case: Case, s: Settings, folder: Path) -> None:
    """`bb_<case>.yaml` (fixed entries and the sweep's search space) and `gd_<case>.yaml`."""
    import yaml

    sizes = layout(s.hidden)
    layers, elements = len(sizes), sum(n for _, n in sizes)
    folder.mkdir(parents=True, exist_ok=True)
    start = {}
    for g in case.groups:
        n = g.count(layers, elements, s.horizon)
        if g.listed(layers, elements, s.horizon):
            start.update({f"learn.{g.name}.init.{i}": g.start for i in range(n)})
        else:
            start[f"learn.{g.name}.init"] = g.start
    params = "".join(f"      {k}: {_space_expr(sp)}\n" for k, sp in param_names(case, s))
    gd = {"learn": {g.name: _entry(g, g.start, fixed=False) for g in case.groups}}
    head = (
        "# @package _global_\n# Generated by experiments/blackbox_vs_gradient/run.py: {what} of "
        f"case {case.title} (MLP 64-{s.hidden}-10, {s.horizon} SGD steps).\n"
    )
    dump = {"default_flow_style": None, "sort_keys": False, "width": 100}
    (folder / f"bb_{case.key}.yaml").write_text(
        head.format(what="the black-box search space (fixed learn entries, sweep parameters)")
        + yaml.safe_dump({"learn": fixed_learn(case, s, start)}, **dump)
        + "hydra:\n  sweeper:\n    params:\n"
        + params
    )
    (folder / f"gd_{case.key}.yaml").write_text(
        head.format(what="the learned hyperparameters") + yaml.safe_dump(gd, **dump)
    )


# --------------------------------------------------------------------------- subprocess runs
def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(HERE), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_child(cmd: list[str], log: Path) -> float:
    """Run `cmd`, its output into `log`; returns its CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{tail}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _common(case: Case, s: Settings, seed: int, configs: Path) -> list[str]:
    return [
        f"hydra.searchpath=[file://{configs}]",
        "learn=none",
        *s.base(),
        *case.fixed,
        f"seed={seed}",
        "logger=none",
        "logger._target_=cpu_clock.CPUClockLogger",
        f"+logger.stop_after={s.budget}",  # the process ends once its CPU time passes it
    ]


def run_sweep(
    case: Case, s: Settings, seed: int, sampler: str, trials: int, configs: Path, folder: Path
) -> dict[str, Any]:
    """One Hydra Optuna sweep; returns its trials in order (CPU stamp, val loss, test acc)."""
    cmd = [
        sys.executable,
        "-m",
        "metagrad.train",
        "-m",
        "hydra/sweeper=optuna",
        f"hydra/sweeper/sampler={sampler}",
        f"hydra.sweeper.n_trials={trials}",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.max_failure_rate=1.0",  # a diverged trial (NaN loss) fails alone
        f"hydra.sweeper.sampler.seed={seed}",
        f"experiment=bb_{case.key}",
        *_common(case, s, seed, configs),
        f"hydra.sweep.dir={folder}",
    ]
    cpu = run_child(cmd, folder.parent / f"{folder.name}.log")
    points = []
    trials = sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for trial in trials:
        if not (trial / "cpu_clock.json").is_file():
            continue  # a trial that did not finish
        clock = json.loads((trial / "cpu_clock.json").read_text())
        final = clock["final"]
        points.append(
            {
                "cpu": clock["closed"],
                "train_cpu": clock["closed"] - clock["created"],
                "val_loss": final.get("final/val_loss", float("nan")),
                "test_accuracy": final.get("final/test_accuracy", float("nan")),
            }
        )
    return {"cpu_total": cpu, "units": len(points), "points": points}


def run_gradient(
    case: Case, s: Settings, seed: int, steps: int, configs: Path, folder: Path
) -> dict[str, Any]:
    """One `loop=hpo` run; returns its validations (CPU stamp, val loss, hyperparameters)."""
    cmd = [
        sys.executable,
        "-m",
        "metagrad.train",
        f"experiment=gd_{case.key}",
        *_common(case, s, seed, configs),
        *GRADIENT,
        f"outer_steps={steps}",
        f"checkpoint_every={steps}",
        f"hydra.run.dir={folder}",
    ]
    cpu = run_child(cmd, folder.parent / f"{folder.name}.log")
    clock = json.loads((folder / "cpu_clock.json").read_text())
    steps_done = clock["points"][-1]["step"] if clock["points"] else 0
    return {"cpu_total": cpu, "units": steps_done, "points": clock["points"]}


def gradient_values(case: Case, s: Settings, point: dict[str, Any]) -> dict[str, float]:
    """A validated configuration of the gradient side as sweep values (name -> value)."""
    sizes = layout(s.hidden)
    out: dict[str, float] = {}
    for g in case.groups:
        if g.per_step:
            vals = list(point["schedules"][f"schedule/{g.name}"])
        elif g.scope == "per_layer":
            vals = [point["meta"][f"meta/{g.name}/{n}"] for n, _ in sizes]
        elif g.scope == "per_element":
            vals = [v for n, _ in sizes for v in point["tensors"][f"meta/{g.name}/{n}"]]
        else:
            out[f"learn.{g.name}.init"] = point["meta"][f"meta/{g.name}"]
            continue
        out.update({f"learn.{g.name}.init.{i}": v for i, v in enumerate(vals)})
    return out


# --------------------------------------------------------------------------- in-process objective
class Objective:
    """The black-box objective in this process: train once with fixed values, evaluate.

    The config is composed once; each call sets the `learn` entries and builds the job with
    `metagrad.train.build`, then evaluates it as `learn=none` runs do (`val/loss`, and the test
    split's metrics).
    """

    def __init__(self, case: Case, s: Settings, seed: int) -> None:
        from hydra import compose, initialize_config_dir

        from metagrad.app.configs import register_configs
        from metagrad.train import config_dir

        register_configs()
        overrides = ["learn=none", *s.base(), *case.fixed, f"seed={seed}", "logger=none"]
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            self.cfg = compose("train", overrides=overrides)
        self.case, self.settings = case, s

    def __call__(self, values: dict[str, float]) -> dict[str, float]:
        from omegaconf import OmegaConf, open_dict

        from metagrad.train import build

        cfg = copy.deepcopy(self.cfg)
        with open_dict(cfg):
            cfg.learn = OmegaConf.create(fixed_learn(self.case, self.settings, values))
        _, job = build(cfg)
        return job.evaluate(final=True)


def run_inprocess(case: Case, s: Settings, seed: int) -> dict[str, Any]:
    """TPE asked and told in this process until the CPU budget is spent."""
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    objective = Objective(case, s, seed)
    names = param_names(case, s)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    points = []
    best: dict[str, Any] = {"val_loss": math.inf, "values": None}
    start = time.process_time()
    while time.process_time() - start < s.budget:
        trial = study.ask()
        values = {n: trial.suggest_float(n, low, high, log=log) for n, (low, high, log) in names}
        final = objective(values)
        loss = final["val/loss"]
        if math.isfinite(loss):
            study.tell(trial, loss)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        points.append(
            {
                "cpu": time.process_time() - start,
                "val_loss": loss,
                "test_accuracy": final.get("test/accuracy", float("nan")),
            }
        )
        if math.isfinite(loss) and loss < best["val_loss"] and points[-1]["cpu"] <= s.budget:
            best = {"val_loss": loss, "values": values}
    return {
        "cpu_total": time.process_time() - start,
        "units": len(points),
        "points": points,
        "best_values": best["values"],
    }


# --------------------------------------------------------------------------- held-out seeds
#: Fresh training seeds (initialization and batch order) that no side tuned on.
FRESH_SEEDS = (1000, 1001, 1002, 1003, 1004)


def chosen_values(
    case: Case, s: Settings, arm: str, run: dict[str, Any], folder: Path
) -> dict[str, float] | None:
    """The values of the configuration an arm chose within the budget (None: none, or unknown).

    Read back from the run's records: the trial's overrides (`.hydra/overrides.yaml`) of a sweep,
    the validated hyperparameters (`cpu_clock.json`) of the gradient run, the values kept by the
    in-process search.
    """
    if arm == "tpe_inprocess":
        return run.get("best_values") or replay_inprocess(case, s, run)
    if arm == "gradient":
        best = run.get("at_budget")
        if best is None:
            return None
        clock = json.loads((folder / "cpu_clock.json").read_text())
        point = next(p for p in clock["points"] if p["step"] == best["step"])
        return gradient_values(case, s, point)
    trials = []
    for trial in (p for p in folder.iterdir() if p.name.isdigit()):
        if (trial / "cpu_clock.json").is_file():
            clock = json.loads((trial / "cpu_clock.json").read_text())
            loss = clock["final"].get("final/val_loss", float("nan"))
            if clock["closed"] <= s.budget and _finite(loss):
                trials.append((loss, int(trial.name), trial))
    if not trials:
        return None
    _, _, trial = min(trials)
    values = {}
    for line in (trial / ".hydra" / "overrides.yaml").read_text().splitlines():
        item = line.removeprefix("- ").strip()
        if item.startswith("learn."):
            key, value = item.split("=", 1)
            values[key] = float(value)
    return values


def replay_inprocess(case: Case, s: Settings, run: dict[str, Any]) -> dict[str, float] | None:
    """The values of the in-process search's best trial within the budget, asked again.

    TPE with a seed proposes the same values when told the same losses, so replaying the
    recorded losses (no training) gives back every trial's values.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    best = best_within(run["points"], s.budget)
    if best is None:
        return None
    upto = run["points"].index(best)
    names = param_names(case, s)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=run["seed"]))
    for point in run["points"][: upto + 1]:
        trial = study.ask()
        values = {n: trial.suggest_float(n, low, high, log=log) for n, (low, high, log) in names}
        if _finite(point["val_loss"]):
            study.tell(trial, point["val_loss"])
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return values


def heldout(results: dict[str, Any], s: Settings, runs_dir: Path) -> None:
    """Retrain each chosen configuration from fresh seeds; record the mean val and test metrics.

    Each side chose its configuration by the validation loss of runs from the experiment's
    seed (black-box search: of the very run it scores; the gradient: of runs from other
    initializations and batches). What a configuration is worth is what it gives a new run.
    """
    for key, per_arm in results.items():
        case = next(c for c in CASES if c.key == key)
        objectives = [Objective(case, s, seed) for seed in FRESH_SEEDS]
        for arm, runs in per_arm.items():
            for run in runs:
                if "heldout" in run:
                    continue
                folder = runs_dir / key / f"{arm}_seed{run['seed']}"
                values = chosen_values(case, s, arm, run, folder)
                if values is None:
                    run["heldout"] = None
                    continue
                # The values read back give the loss the arm recorded for them.
                again = Objective(case, s, run["seed"])(values)["val/loss"]
                run["values_reproduce_val_loss"] = bool(
                    abs(again - run["at_budget"]["val_loss"]) <= 1e-3 * run["at_budget"]["val_loss"]
                )
                finals = [objective(values) for objective in objectives]
                run["heldout"] = {
                    name: statistics.fmean(f.get(metric, float("nan")) for f in finals)
                    for name, metric in (
                        ("val_loss", "val/loss"),
                        ("test_loss", "test/loss"),
                        ("test_accuracy", "test/accuracy"),
                    )
                }
                run["heldout"]["seeds"] = list(FRESH_SEEDS)


# --------------------------------------------------------------------------- analysis
def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def best_within(points: list[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    """The point of lowest validation loss among those stamped within `budget` CPU seconds."""
    done = [p for p in points if p["cpu"] <= budget and _finite(p["val_loss"])]
    return min(done, key=lambda p: p["val_loss"]) if done else None


def curve(points: list[dict[str, Any]], grid: list[float]) -> list[float]:
    """The best validation loss so far at each CPU time of `grid` (NaN before the first)."""
    out = []
    for t in grid:
        b = best_within(points, t)
        out.append(b["val_loss"] if b is not None else float("nan"))
    return out


def _stats(xs: Sequence[float]) -> dict[str, float]:
    xs = [x for x in xs if _finite(x)]
    if not xs:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
    }


def summarize(results: dict[str, Any], s: Settings) -> dict[str, Any]:
    """Per case and arm: the result at the budget, mean and spread over seeds."""
    table: dict[str, Any] = {}
    for key, per_arm in results.items():
        table[key] = {}
        for arm, runs in per_arm.items():
            val, acc, cpu, units, reached = [], [], [], [], []
            h_loss, h_acc = [], []
            for run in runs:
                h = run.get("heldout")
                h_loss.append(h["test_loss"] if h else float("nan"))
                h_acc.append(h["test_accuracy"] if h else float("nan"))
                b = run["at_budget"]
                val.append(b["val_loss"] if b else float("nan"))
                acc.append(b["test_accuracy"] if b else float("nan"))
                cpu.append(run["cpu_total"])
                units.append(run["units_within_budget"])
                reached.append(run["reached_budget"])
            table[key][arm] = {
                "val_loss": _stats(val),
                "test_accuracy": _stats(acc),
                "cpu_total": _stats(cpu),
                "units_within_budget": _stats(units),
                "all_reached_budget": all(reached),
                "heldout_test_loss": _stats(h_loss),
                "heldout_test_accuracy": _stats(h_acc),
            }
    return table


def plot(results: dict[str, Any], s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 4.0), squeeze=False)
    colors = {"gradient": "C3", "tpe": "C0", "random": "C2", "tpe_inprocess": "C0"}
    styles = {"gradient": "-", "tpe": "-", "random": "-", "tpe_inprocess": "--"}
    grid = [s.budget * i / 200 for i in range(1, 201)]
    for ax, key in zip(axes[0], keys, strict=True):
        case = next(c for c in CASES if c.key == key)
        n = len(param_names(case, s))
        for arm, runs in results[key].items():
            curves = [curve(r["points"], grid) for r in runs]
            mean, low, high = [], [], []
            for i in range(len(grid)):
                col = [c[i] for c in curves]
                if any(not _finite(x) for x in col):
                    mean.append(float("nan"))
                    low.append(float("nan"))
                    high.append(float("nan"))
                else:
                    mean.append(statistics.fmean(col))
                    low.append(min(col))
                    high.append(max(col))
            ax.plot(grid, mean, styles[arm], color=colors[arm], label=LABELS[arm])
            if arm != "tpe_inprocess":
                ax.fill_between(grid, low, high, color=colors[arm], alpha=0.15, linewidth=0)
        ax.set_title(f"{case.title}: {n} values", fontsize=10)
        ax.set_xlabel("CPU seconds")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("best validation loss so far")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"Hyperparameters of a 100-step SGD run (MLP 64-{s.hidden}-10, digits): best validation "
        f"loss against CPU time; mean over {len(s.seeds)} seeds, band: min to max",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small check (about a minute)")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    parser.add_argument("--budget", type=float, help="CPU seconds per run (default 40)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--cases", nargs="+", choices=[c.key for c in CASES], help="cases")
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="merge the results.json of runs over separate cases (e.g. run side by side with "
        "--cases and --out) into --out, without running anything",
    )
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    s = quick_settings() if args.quick else full_settings()
    if args.budget is not None:
        s.budget = args.budget
    if args.seeds:
        s.seeds = args.seeds
    if args.cases:
        s.cases = args.cases
    logging.basicConfig(level=logging.WARNING)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    configs = out / "configs"
    runs_dir = out / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    wall = time.time()
    cpu_start = resource.getrusage(resource.RUSAGE_CHILDREN)
    self_start = time.process_time()
    results: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    for case in (c for c in CASES if c.key in s.cases):
        write_presets(case, s, configs / "experiment")
        results[case.key] = {arm: [] for arm in ARMS}
        for seed in s.seeds:
            for arm in ARMS:
                folder = runs_dir / case.key / f"{arm}_seed{seed}"
                folder.parent.mkdir(parents=True, exist_ok=True)
                if arm == "gradient":
                    run = run_gradient(case, s, seed, s.units, configs, folder)
                elif arm == "tpe_inprocess":
                    run = run_inprocess(case, s, seed)
                else:
                    run = run_sweep(case, s, seed, arm, s.units, configs, folder)
                best = best_within(run["points"], s.budget)
                run["reached_budget"] = run["cpu_total"] >= s.budget or arm == "tpe_inprocess"
                run["units_within_budget"] = sum(1 for p in run["points"] if p["cpu"] <= s.budget)
                if arm == "gradient" and best is not None:
                    again = Objective(case, s, seed)(gradient_values(case, s, best))
                    checks[f"{case.key}/seed{seed}: fixed values reproduce the gradient's val"] = (
                        abs(again["val/loss"] - best["val_loss"]) <= 1e-3 * abs(best["val_loss"])
                    )
                    best = {
                        "step": best["step"],
                        "cpu": best["cpu"],
                        "val_loss": again["val/loss"],
                        "val_loss_reported": best["val_loss"],
                        "test_accuracy": again.get("test/accuracy", float("nan")),
                    }
                    for p in run["points"]:  # the values themselves are not kept
                        p.pop("tensors", None)
                        p.pop("schedules", None)
                run["at_budget"] = best
                results[case.key][arm].append({"seed": seed, **run})
                shown = "none" if best is None else f"{best['val_loss']:.4f}"
                print(
                    f"{case.key} seed {seed} {arm:>13}: {run['units']:4d} units, "
                    f"{run['cpu_total']:6.1f} CPU s, best val within {s.budget:.0f} s: {shown}",
                    flush=True,
                )
    heldout(results, s, runs_dir)
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    table = summarize(results, s)
    summary = {
        "quick": bool(args.quick),
        "settings": {
            "seeds": s.seeds,
            "budget_cpu_s": s.budget,
            "hidden": s.hidden,
            "horizon": s.horizon,
            "base_overrides": s.base(),
            "gradient_overrides": GRADIENT,
            "cases": {
                c.key: {
                    "title": c.title,
                    "values": len(param_names(c, s)),
                    "fixed": c.fixed,
                    "groups": [g.__dict__ for g in c.groups],
                }
                for c in CASES
                if c.key in s.cases
            },
        },
        "table": table,
        "checks": checks,
        "cpu_seconds": {"children": children, "this_process": time.process_time() - self_start},
        "wall_seconds": time.time() - wall,
        "runs": results,
    }
    return write_outputs(summary, s, out)


def write_outputs(summary: dict[str, Any], s: Settings, out: Path) -> dict[str, Any]:
    """results.json, the plot and the table on stdout."""
    for key, per_arm in summary["runs"].items():
        for arm, runs in per_arm.items():
            for run in runs:
                if "values_reproduce_val_loss" in run:
                    name = (
                        f"{key}/{arm}/seed{run['seed']}: the chosen values reproduce its val loss"
                    )
                    summary["checks"][name] = run["values_reproduce_val_loss"]
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    plot(summary["runs"], s, out / "blackbox_vs_gradient.png")
    print(format_table(summary["table"], summary["settings"]))
    total = summary["cpu_seconds"]["children"] + summary["cpu_seconds"]["this_process"]
    print(f"CPU {total:.0f} s in all, wall {summary['wall_seconds']:.0f} s")
    return summary


def combine(folders: list[Path], out: Path) -> dict[str, Any]:
    """Merge runs over separate cases (same settings otherwise) into one set of outputs."""
    parts = []
    for folder in folders:
        part = json.loads((folder / "results.json").read_text())
        st = part["settings"]
        s = Settings(
            st["seeds"], st["budget_cpu_s"], list(part["runs"]), st["hidden"], st["horizon"]
        )
        heldout(part["runs"], s, folder / "runs")  # runs recorded without it
        parts.append(part)
    first = parts[0]
    summary = copy.deepcopy(first)
    for part in parts[1:]:
        for key in ("seeds", "budget_cpu_s", "hidden", "horizon"):
            if part["settings"][key] != first["settings"][key]:
                raise ValueError(f"--combine: the runs differ in {key}")
        summary["settings"]["cases"].update(part["settings"]["cases"])
        summary["runs"].update(part["runs"])
        summary["checks"].update(part["checks"])
        for key in ("children", "this_process"):
            summary["cpu_seconds"][key] += part["cpu_seconds"][key]
        summary["wall_seconds"] = max(summary["wall_seconds"], part["wall_seconds"])
    order = [c.key for c in CASES]
    summary["runs"] = {k: summary["runs"][k] for k in order if k in summary["runs"]}
    summary["settings"]["cases"] = {
        k: summary["settings"]["cases"][k] for k in order if k in summary["settings"]["cases"]
    }
    st = summary["settings"]
    s = Settings(
        seeds=st["seeds"],
        budget=st["budget_cpu_s"],
        cases=list(summary["runs"]),
        hidden=st["hidden"],
        horizon=st["horizon"],
    )
    summary["table"] = summarize(summary["runs"], s)
    out.mkdir(parents=True, exist_ok=True)
    return write_outputs(summary, s, out)


def format_table(table: dict[str, Any], settings: dict[str, Any]) -> str:
    """The results as a Markdown table (mean ± standard deviation over seeds)."""
    lines = [
        f"| space | values | method | best val loss at {settings['budget_cpu_s']:.0f} CPU s "
        "| its test accuracy | fresh seeds: test loss | fresh seeds: test accuracy "
        "| trials / steps | CPU s used |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, arms in table.items():
        case = settings["cases"][key]
        for arm, row in arms.items():
            v, a = row["val_loss"], row["test_accuracy"]
            hl, ha = row["heldout_test_loss"], row["heldout_test_accuracy"]
            u, c = row["units_within_budget"], row["cpu_total"]
            lines.append(
                f"| {case['title']} | {case['values']} | {LABELS[arm]} "
                f"| {v['mean']:.4f} ± {v['std']:.4f} "
                f"| {100 * a['mean']:.1f} ± {100 * a['std']:.1f} % "
                f"| {hl['mean']:.4f} ± {hl['std']:.4f} "
                f"| {100 * ha['mean']:.1f} ± {100 * ha['std']:.1f} % "
                f"| {u['mean']:.0f} | {c['mean']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
