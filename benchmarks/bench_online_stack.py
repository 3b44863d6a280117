"""Time one training step of hyperoptimizer stacks against torch.optim (and gdtuo if given).

Work: an MLP 64-128-10 on sklearn's digits, batch 100, cross-entropy, float32, one thread.
One step is `zero_grad()`, the forward pass, `backward()` and `step()`.

Contestants, timed in the same process, interleaved round by round:

* `torch.optim.SGD` and `torch.optim.Adam` (the baselines);
* `metagrad.online.Hyperoptimizer` stacks of height 1-4: SGD / SGD / ... and
  Adam / SGD / SGD / ... (level 0 learns lr and, for Adam, both betas; each level above
  learns the learning rate of the next);
* the same stacks in the `gdtuo` package (Chandra et al.'s reference implementation), when
  `--gdtuo` names the folder that holds its `gradient_descent_the_ultimate_optimizer`
  package (it is not on PyPI; nothing of it is part of metagrad). Its loop is the one its
  README gives: `begin()`, `zero_grad()`, forward, `backward(create_graph=True)`, `step()`.

Each round times `--steps` steps of every contestant; the table gives the median time per
step over the rounds and the median over rounds of its ratio to the torch.optim baseline of
the same base optimizer in that round (a ratio within one round is robust to the load of a
shared machine). Before timing, the SGD stacks of both implementations are run side by side in
float64 for 20 steps: the two implement the same rule, so their trajectories must agree.

    OMP_NUM_THREADS=1 python benchmarks/bench_online_stack.py [--rounds 15] [--gdtuo DIR]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from metagrad.online import HyperAdam, Hyperoptimizer, HyperSGD

HEIGHTS = (1, 2, 3, 4)
SGD_LRS = (0.1, 1e-3, 1e-5, 1e-7)  # level k's lr in an SGD stack
ADAM_LRS = (1e-3, 1e-5, 1e-7, 1e-9)  # level 0 is Adam, the others SGD


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return model.to(dtype)


def data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data[:100], dtype=dtype) / 16.0
    return x, torch.tensor(digits.target[:100])


def ours(base: str, height: int) -> Callable[[Any], torch.optim.Optimizer]:
    if base == "sgd":
        levels = [HyperSGD(lr=lr) for lr in SGD_LRS[:height]]
    else:
        levels = [HyperAdam(lr=ADAM_LRS[0])] + [HyperSGD(lr=lr) for lr in ADAM_LRS[1:height]]
    return lambda params: Hyperoptimizer(params, levels=levels)


def torch_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


class Gdtuo:
    """A model trained by a gdtuo stack, stepped the way gdtuo's README does."""

    def __init__(self, module: Any, model: nn.Module, base: str, height: int) -> None:
        opt = module.NoOpOptimizer()
        lrs = SGD_LRS if base == "sgd" else ADAM_LRS
        for k in reversed(range(1, height)):
            opt = module.SGD(alpha=lrs[k], optimizer=opt)
        if base == "sgd":
            opt = module.SGD(alpha=lrs[0], optimizer=opt)
        else:
            opt = module.Adam(alpha=lrs[0], optimizer=opt)
        self.wrapper = module.ModuleWrapper(model, optimizer=opt)
        self.wrapper.initialize()

    def step(self, x, y) -> None:
        mw = self.wrapper
        mw.begin()
        mw.zero_grad()
        F.cross_entropy(mw.forward(x), y).backward(create_graph=True)
        mw.step()


def load_gdtuo(folder: str | None) -> Any:
    if folder is None:
        return None
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("gradient_descent_the_ultimate_optimizer.gdtuo")
    except ImportError as err:
        print(f"gdtuo not importable from {folder}: {err}")
        return None


def check_agreement(module: Any) -> None:
    """SGD stacks of height 2-4: gdtuo and metagrad give the same trajectory (float64)."""
    x, y = data(torch.float64)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # gdtuo makes its hyperparameters with torch.tensor
    try:
        for height in (2, 3, 4):
            a, b = make_model(torch.float64), make_model(torch.float64)
            theirs = Gdtuo(module, a, "sgd", height)
            opt = ours("sgd", height)(b.parameters())
            for i in range(20):
                xb, yb = x[5 * i : 5 * i + 50], y[5 * i : 5 * i + 50]
                theirs.step(xb, yb)
                torch_step(b, opt, xb, yb)
            pa = dict(theirs.wrapper.parameters)
            diff = max(float((pa[n] - p).detach().abs().max()) for n, p in b.named_parameters())
            lr_theirs = float(theirs.wrapper.optimizer.parameters["alpha"].detach())
            lr_ours = opt.param_groups[0]["lr"]
            print(
                f"gdtuo agreement, SGD stack of height {height}, 20 steps: max |param diff| "
                f"{diff:.1e}, lr {lr_theirs:.6g} (gdtuo) vs {lr_ours:.6g} (metagrad)"
            )
    finally:
        torch.set_default_dtype(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--gdtuo", default=None, help="folder holding the gdtuo package")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    module = load_gdtuo(args.gdtuo)
    if module is not None:
        check_agreement(module)

    x, y = data()
    runners: dict[str, Callable[[], None]] = {}
    baseline_of: dict[str, str] = {}
    for base, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)):
        model = make_model()
        lr = SGD_LRS[0] if base == "sgd" else ADAM_LRS[0]
        opt = cls(model.parameters(), lr=lr)
        name = f"torch.optim.{cls.__name__}"
        runners[name] = lambda m=model, o=opt: torch_step(m, o, x, y)
        baseline_of[name] = name
        for height in HEIGHTS:
            model = make_model()
            opt = ours(base, height)(model.parameters())
            label = f"metagrad {base.upper() if base == 'sgd' else 'Adam'} height {height}"
            runners[label] = lambda m=model, o=opt: torch_step(m, o, x, y)
            baseline_of[label] = name
            if module is not None:
                theirs = Gdtuo(module, make_model(), base, height)
                label = f"gdtuo {base.upper() if base == 'sgd' else 'Adam'} height {height}"
                runners[label] = lambda t=theirs: t.step(x, y)
                baseline_of[label] = name

    for run in runners.values():  # warm up
        for _ in range(5):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    ratios: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        this_round = {}
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            this_round[name] = (time.perf_counter() - start) / args.steps * 1e3
        for name, ms in this_round.items():
            times[name].append(ms)
            ratios[name].append(ms / this_round[baseline_of[name]])

    print(f"\none training step (median of {args.rounds} rounds x {args.steps} steps)")
    print(f"{'contestant':<28} {'ms/step':>8} {'x torch.optim':>14}")
    for name in runners:
        med = statistics.median(times[name])
        ratio = statistics.median(ratios[name])
        print(f"{name:<28} {med:8.3f} {ratio:13.2f}x")


if __name__ == "__main__":
    main()
