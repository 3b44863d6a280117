"""Rank programs for tests/test_distributed.py, and the problems they share with the tests.

`python -m _dist_workers SCENARIO OUT_DIR PARAMS_JSON` runs one rank; the launcher's variables
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...) come from the environment, as under torchrun.
Each rank saves what it computed to OUT_DIR/rank<r>.pt. `main(...)` also runs in the test
process itself, as a world of one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed
import torch.nn.functional as F
from torch import nn

import metagrad
from metagrad import distributed as mdist
from metagrad.hypergrad import Checkpointed, Implicit, Unrolled
from metagrad.learners import MAML, MetaSGD, Reptile, iMAML
from metagrad.optim import SGD
from metagrad.tasks import SinusoidTasks

DT = torch.float64

# ------------------------------------------------------------------------------ few-shot
LEARNERS = {
    "maml": lambda m: MAML(m, inner_lr=0.05, inner_steps=2),
    "fomaml": lambda m: MAML(m, inner_lr=0.05, inner_steps=2, first_order=True),
    "metasgd": lambda m: MetaSGD(m, inner_lr=0.05, inner_steps=2),
    "reptile": lambda m: Reptile(m, inner_lr=0.05, inner_steps=3),
    "imaml": lambda m: iMAML(m, inner_lr=0.05, inner_steps=5, lam=1.0, solver_iters=5),
}
META_BATCHES = (6, 5)  # 5 tasks split unevenly over 2 and over 3 ranks


def tiny_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)


def meta_batch(tasks: int, seed: int = 1):
    return SinusoidTasks(seed=seed, dtype=DT).sample(tasks, shots=5, query_shots=5)


def grads_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


# ----------------------------------------------------------------------- HPO population
POPULATION = 4
HPO_KINDS = ("unrolled", "checkpointed", "implicit")


def hpo_meta(kind: str) -> metagrad.MetaParameters:
    meta = metagrad.MetaParameters()
    if kind == "implicit":  # the IFT sees loss meta-parameters only: a per-layer L2
        meta.add("l2", 0.1, scope="per_layer", params=linear_init(0), dtype=DT)
    else:
        meta.add("lr", 0.1, dtype=DT)
        meta.add("momentum", 0.5, constraint="unit", dtype=DT)
    return meta


def linear_init(member: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(member)
    return {"w": 0.1 * torch.randn(3, generator=g, dtype=DT), "b": torch.zeros(1, dtype=DT)}


def hpo_problem(kind: str, member: int) -> metagrad.InnerProblem:
    """Inner run `member` of the population: its own initial weights and data."""
    g = torch.Generator().manual_seed(100 + member)
    X, Xv = (torch.randn(12, 3, generator=g, dtype=DT) for _ in range(2))
    y, yv = X.sum(1) + 0.3 * torch.randn(12, generator=g, dtype=DT), Xv.sum(1)
    if kind == "implicit":

        def inner(p, m, b):
            l2 = m.value("l2")
            fit = (b[0] @ p["w"] + p["b"] - b[1]).pow(2).mean()
            return fit + sum(0.5 * l2[k] * p[k].pow(2).sum() for k in p)

        return metagrad.InnerProblem(
            init=linear_init(member),
            optimizer=lambda m, t: SGD(lr=0.2, momentum=0.5),
            inner_loss=inner,
            outer_loss=lambda p, m, b: (b[0] @ p["w"] + p["b"] - b[1]).pow(2).mean(),
            inner_batches=lambda t: (X, y),
            outer_batch=(Xv, yv),
            steps=80,
        )
    fmodel = metagrad.Functional(mlp_3_5_1())
    init = {
        n: 0.5 * torch.randn(p.shape, generator=g, dtype=DT) for n, p in fmodel.params().items()
    }

    def loss(p, m, b):
        return F.mse_loss(fmodel(p, b[0]).squeeze(-1), b[1])

    return metagrad.InnerProblem(
        init=init,
        optimizer=lambda m, t: SGD(lr=m.value("lr"), momentum=m.value("momentum")),
        inner_loss=loss,
        outer_loss=loss,
        inner_batches=[(X[t % 3 :: 3], y[t % 3 :: 3]) for t in range(6)],
        outer_batch=(Xv, yv),
        steps=6,
    )


def mlp_3_5_1() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


def hpo_method(kind: str):
    return {"unrolled": Unrolled(), "checkpointed": Checkpointed(2), "implicit": Implicit()}[kind]


def hpo_reference(kind: str, members: int = POPULATION) -> dict[str, torch.Tensor]:
    """The population's mean meta-gradient in one process, without metagrad.distributed."""
    meta = hpo_meta(kind)
    results = [hpo_method(kind)(hpo_problem(kind, i), meta) for i in range(members)]
    return {n: sum(r.grads[n] for r in results) / members for n in results[0].grads}


def hpo_distributed(kind: str) -> dict[str, torch.Tensor]:
    """This rank's share of the population, then one all-reduce; each kind uses another form."""
    meta = mdist.broadcast(hpo_meta(kind))
    method, part = hpo_method(kind), mdist.shard(POPULATION)
    results = [method(hpo_problem(kind, i), meta) for i in part]
    if kind == "unrolled":  # sums accumulated into .grad by result.apply
        for r in results:
            r.apply(meta)
        mdist.all_reduce_grads(meta, sum_of=len(part))
        return grads_of(meta)
    summed = {n: sum(r.grads[n] for r in results) for n in results[0].grads}
    if kind == "checkpointed":  # a dict of sums
        return mdist.all_reduce_grads(summed, sum_of=len(part))
    local_mean = {n: g / len(part) for n, g in summed.items()}  # a dict of local means
    return mdist.all_reduce_grads(local_mean, mean_of=len(part))


# ------------------------------------------------------------------------ the scenarios
class CountCalls:
    """Counts calls of `torch.distributed.all_reduce` (the module looks it up at call time)."""

    def __init__(self) -> None:
        self.calls = 0

    def __enter__(self) -> CountCalls:
        self._orig = torch.distributed.all_reduce

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self._orig(*args, **kwargs)

        torch.distributed.all_reduce = counted
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.distributed.all_reduce = self._orig

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def main(out: dict[str, Any], world: int) -> None:
    """Every correctness check of one rank; `out` collects what the tests compare."""
    with CountCalls() as counter:
        checks(out, world, counter)


def checks(out: dict[str, Any], world: int, counter: CountCalls) -> None:
    calls = out.setdefault("calls", {})
    # Few-shot: the rank's model starts elsewhere; broadcast gives it rank 0's (seed 0).
    for name, make in LEARNERS.items():
        for tasks in META_BATCHES:
            algo = mdist.broadcast(make(tiny_mlp(0 if mdist.rank() == 0 else 10 + mdist.rank())))
            mine = mdist.shard_batch(meta_batch(tasks))
            algo.zero_grad()
            loss = algo(*mine)
            loss.backward()
            counter.take()
            reduced = mdist.all_reduce_grads(algo, mean_of=len(mine[0]), loss=loss.detach())
            calls[f"{name}-{tasks}"] = counter.take()
            out[f"fewshot/{name}-{tasks}"] = grads_of(algo)
            out[f"fewshot-loss/{name}-{tasks}"] = reduced
    # HPO populations.
    for kind in HPO_KINDS:
        out[f"hpo/{kind}"] = hpo_distributed(kind)
        calls[f"hpo-{kind}"] = counter.take()
    # One inner run per rank, handed over as a HypergradResult.
    meta = hpo_meta("unrolled")
    result = Unrolled()(hpo_problem("unrolled", mdist.rank()), meta)
    reduced = mdist.all_reduce_grads(result, mean_of=1)
    out["result/grads"], out["result/outer_loss"] = reduced.grads, reduced.outer_loss
    out["result/metric_loss"] = reduced.metrics["outer/loss"]
    calls["result"] = counter.take()
    # Two dtypes: two buffers, two calls. Each rank holds rank + 1 items.
    mixed = {
        "a": torch.full((3,), float(mdist.rank()), dtype=torch.float32),
        "b": torch.full((2,), 2.0 * mdist.rank(), dtype=DT),
        "c": torch.ones(1, dtype=torch.float32),
    }
    out["mixed"] = mdist.all_reduce_grads(mixed, mean_of=mdist.rank() + 1)
    calls["mixed"] = counter.take()
    # A short outer loop (MAML, Adam), then an outer optimizer broadcast as after a resume.
    algo = mdist.broadcast(LEARNERS["maml"](tiny_mlp(0 if mdist.rank() == 0 else 99)))
    outer = torch.optim.Adam(algo.parameters(), lr=0.01)
    out["loop"] = outer_loop(algo, outer, steps=3, tasks=5)
    fresh = torch.optim.Adam(algo.parameters(), lr=0.01)
    out["adam_state"] = mdist.broadcast(outer if mdist.rank() == 0 else fresh).state_dict()
    # Plain tensors of two dtypes from the last rank: two broadcasts, in place.
    sent = {
        "x": torch.full((2,), float(mdist.rank()), dtype=DT),
        "n": torch.arange(3) + mdist.rank(),
    }
    mdist.broadcast(sent, src=world - 1)
    out["broadcast"] = sent
    # Per-rank random streams, saved and restored.
    gen = mdist.rank_generator(7)
    out["rng/first"] = torch.randn(3, generator=gen, dtype=DT)
    states = mdist.rng_states(gen)
    out["rng/after"] = torch.randn(3, generator=gen, dtype=DT)
    mdist.restore_rng_state(states, gen)
    out["rng/restored"] = torch.randn(3, generator=gen, dtype=DT)
    if world > 1:  # rank 0 passes another shape (same size): refused, not mixed
        shape = (3,) if mdist.rank() == 0 else (1, 3)
        try:
            mdist.all_reduce_grads({"a": torch.zeros(shape, dtype=DT)}, mean_of=1)
        except mdist.DistributedError as err:
            out["mismatch"] = str(err)
    if world == 2:
        ddp_demo(out)


def outer_loop(algo: nn.Module, outer: torch.optim.Optimizer, steps: int, tasks: int):
    """A user's own loop: the same meta-batch everywhere, each rank on its shard."""
    for step in range(steps):
        mine = mdist.shard_batch(meta_batch(tasks, seed=10 + step))
        outer.zero_grad()
        algo(*mine).backward()
        mdist.all_reduce_grads(algo, mean_of=len(mine[0]))
        outer.step()
    return {n: p.detach().clone() for n, p in algo.named_parameters()}


def ddp_demo(out: dict[str, Any]) -> None:
    """DistributedDataParallel around the inner model, against metagrad.distributed.

    (1) A hypergradient method takes meta-gradients with torch.autograd.grad, which DDP never
    sees: each rank keeps its own (population member = rank). (2) An inner loop that calls
    backward() (Reptile by hand): DDP averages the inner gradients of both ranks' tasks.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    problem = hpo_problem("unrolled", mdist.rank())  # population member = rank
    fwrapped = metagrad.Functional(DDP(mlp_3_5_1()))

    def loss(p, m, b):
        return F.mse_loss(fwrapped(p, b[0]).squeeze(-1), b[1])

    wrapped = metagrad.InnerProblem(
        init={f"module.{n}": v for n, v in problem.init.items()},
        optimizer=problem.optimizer,
        inner_loss=loss,
        outer_loss=loss,
        inner_batches=problem.inner_batches,
        outer_batch=problem.outer_batch,
        steps=problem.steps,
    )
    meta = hpo_meta("unrolled")
    out["ddp/hpo"] = Unrolled()(wrapped, meta).grads
    out["ours/hpo"] = mdist.all_reduce_grads(Unrolled()(problem, meta), mean_of=1).grads

    # Reptile with a torch.optim inner loop, one task per rank; the same loop without DDP.
    batch = mdist.shard_batch(meta_batch(2))
    for key, wrap in (("ddp/reptile", True), ("plain/reptile", False)):
        net = tiny_mlp(0)
        theta = {n: p.detach().clone() for n, p in net.named_parameters()}
        forward = DDP(net) if wrap else net
        inner = torch.optim.SGD(net.parameters(), lr=0.05)
        for _ in range(3):
            inner.zero_grad()
            F.mse_loss(forward(batch.support_x[0]), batch.support_y[0]).backward()
            inner.step()
        local = {n: theta[n] - p.detach() for n, p in net.named_parameters()}
        out[key] = mdist.all_reduce_grads(local, mean_of=1)  # averaged correctly afterwards
    algo = LEARNERS["reptile"](tiny_mlp(0))
    algo(*batch).backward()
    mdist.all_reduce_grads(algo, mean_of=1)
    out["ours/reptile"] = {n.removeprefix("model."): g for n, g in grads_of(algo).items()}


def wait_for_peers(out_dir: str, world: int, tag: str) -> None:
    """A file barrier before `init`, so that a short timeout does not also time the imports."""
    Path(out_dir, f"{tag}-ready{os.environ['RANK']}").touch()
    deadline = time.monotonic() + 120
    while not all(Path(out_dir, f"{tag}-ready{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError("the other ranks did not start")
        time.sleep(0.01)


FAULTS = {"raise": 10.0, "hang": 2.0, "kill": 10.0}  # what rank 1 does: the timeout of init


def faults(out: dict[str, Any], ports: list[int], out_dir: str) -> None:
    """Three failures in turn, each in a new process group of two: rank 1 leaves `init()` by
    an exception and lives on, stays away (sleeps past the timeout), dies (SIGKILL). Rank 0
    records the error it got in its next all-reduce and how long that took."""
    grads = {"g": torch.ones(4, dtype=DT)}
    for (mode, timeout), port in zip(FAULTS.items(), ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        wait_for_peers(out_dir, 2, mode)
        seen = out.setdefault(mode, {})
        try:
            with mdist.init(timeout=timeout):
                mdist.all_reduce_grads(grads, mean_of=1)  # all connections are up
                if mdist.rank() == 1:
                    if mode == "raise":
                        raise KeyError("a bug on rank 1")
                    if mode == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    time.sleep(timeout + 1)
                    continue  # leaving `with` normally: the barrier fails, rank 0 has left
                start = time.perf_counter()
                try:
                    mdist.all_reduce_grads(grads, mean_of=1)
                finally:
                    seen["elapsed"] = time.perf_counter() - start
        except mdist.DistributedError as err:
            seen["error"] = str(err)
        except KeyError:
            pass  # rank 1 lives on into the next round
        if mdist.world_size() != 1:
            raise AssertionError("the failed group was not left")


def run(scenario: str, out_dir: str, params: dict[str, Any]) -> None:
    out: dict[str, Any] = {}
    try:
        if scenario == "main":
            with mdist.init(timeout=60) as world:
                main(out, world.world_size)
        elif scenario == "faults":
            faults(out, **params, out_dir=out_dir)
        else:
            raise ValueError(scenario)
    except BaseException:
        out["traceback"] = traceback.format_exc()
    rank = int(os.environ["RANK"])
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
