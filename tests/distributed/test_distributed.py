"""metagrad.distributed: ranks give the single-process meta-gradient, faults stop with a message.

Worlds of 2 and 3 processes (gloo, CPU) are started as torchrun would start them: one
subprocess per rank with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; each runs a
scenario of tests/_dist_workers.py and saves what it computed. Each correctness world runs once
(a module fixture) and serves several tests; the references are computed here in one process,
in float64, without metagrad.distributed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import _dist_workers as W
import pytest
import torch

import metagrad
from metagrad import distributed as mdist

TOL = 1e-12
TESTS = Path(__file__).resolve().parent
ROOT = Path(metagrad.__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Group:
    """The ranks of one world, started as subprocesses the way torchrun starts them."""

    def __init__(self, scenario: str, world: int, out: Path, ranks=None, **params) -> None:
        self.scenario, self.world, self.out = scenario, world, out
        out.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        path = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
        env.update(PYTHONPATH=path, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
        cmd = [sys.executable, "-m", "_dist_workers", scenario, str(out), json.dumps(params)]
        self.procs = {}
        for r in range(world) if ranks is None else ranks:
            with open(out / f"rank{r}.log", "w") as log:
                rank_env = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
                self.procs[r] = subprocess.Popen(cmd, env=rank_env, stdout=log, stderr=log)
        self._results = None

    def results(self, limit: float = 120.0) -> dict:
        """Each rank's saved results (None for a rank that saved nothing)."""
        if self._results is None:
            deadline = time.monotonic() + limit
            try:
                for proc in self.procs.values():
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stop()
                pytest.fail(f"{self.scenario} ({self.world} ranks) hung:\n{self.logs()}")
            self._results = {}
            for r in self.procs:
                file = self.out / f"rank{r}.pt"
                got = torch.load(file, weights_only=True) if file.exists() else None
                if got is not None and "traceback" in got:
                    pytest.fail(f"rank {r} of {self.scenario} raised:\n{got['traceback']}")
                self._results[r] = got
        return self._results

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(f"{p.name}: {p.read_text()[-2000:]}" for p in self.out.glob("*.log"))


def max_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """Every world this file needs, started at once (most of their time is start-up)."""
    tmp = tmp_path_factory.mktemp("dist")
    started = {
        2: Group("main", 2, tmp / "world2"),
        3: Group("main", 3, tmp / "world3"),
        "faults": Group("faults", 2, tmp / "faults", ports=[free_port() for _ in W.FAULTS]),
    }
    yield started
    for group in started.values():
        group.stop()


@pytest.fixture(scope="module")
def worlds(groups):
    """What every rank computed in worlds of 1 (this process), 2 and 3."""
    single: dict = {}
    with mdist.init(environ={}):
        W.main(single, 1)
    return {1: {0: single}, 2: groups[2].results(), 3: groups[3].results()}


def fewshot_reference(name: str, tasks: int) -> dict[str, torch.Tensor]:
    algo = W.LEARNERS[name](W.tiny_mlp(0))
    algo(*W.meta_batch(tasks)).backward()
    return W.grads_of(algo)


# ------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("tasks", W.META_BATCHES, ids=lambda n: f"{n}tasks")
@pytest.mark.parametrize("name", list(W.LEARNERS))
def test_fewshot_meta_gradient_equals_single_process(worlds, name, tasks):
    """5 tasks split 3+2 and 2+2+1 (and 6 tasks evenly) give the mean over all tasks."""
    reference = fewshot_reference(name, tasks)
    algo = W.LEARNERS[name](W.tiny_mlp(0))
    loss = algo(*W.meta_batch(tasks)).detach()
    for world, ranks in worlds.items():
        assert len(ranks) == world
        for r, out in ranks.items():
            got = out[f"fewshot/{name}-{tasks}"]
            assert max_err(got, reference) < TOL, (world, r)
            assert abs(float(out[f"fewshot-loss/{name}-{tasks}"] - loss)) < TOL, (world, r)
    # The test can fail: a rank's own shard alone gives another meta-gradient.
    own = W.LEARNERS[name](W.tiny_mlp(0))
    own(*mdist.shard_batch(W.meta_batch(tasks), rank=0, world=2)).backward()
    assert max_err(W.grads_of(own), reference) > 1e-4


@pytest.mark.parametrize("kind", W.HPO_KINDS)
def test_hpo_population_meta_gradient_on_1_2_3_ranks(worlds, kind):
    """4 inner runs per outer step, averaged, whatever the number of ranks (2+2, 2+1+1)."""
    reference = W.hpo_reference(kind)
    for world, ranks in worlds.items():
        for r, out in ranks.items():
            assert max_err(out[f"hpo/{kind}"], reference) < TOL, (world, r)
    members = [W.hpo_reference(kind, 1), W.hpo_reference(kind, 2)]
    assert max_err(members[0], reference) > 1e-4 and max_err(members[1], reference) > 1e-5


def test_hypergrad_result_form_averages_grads_and_loss(worlds):
    """One run per rank as a HypergradResult: grads and outer loss are both averaged."""
    for world, ranks in worlds.items():
        meta = W.hpo_meta("unrolled")
        results = [W.Unrolled()(W.hpo_problem("unrolled", i), meta) for i in range(world)]
        grads = {n: sum(r.grads[n] for r in results) / world for n in results[0].grads}
        loss = sum(r.outer_loss for r in results) / world
        for out in ranks.values():
            assert max_err(out["result/grads"], grads) < TOL
            assert abs(float(out["result/outer_loss"] - loss)) < TOL
            assert abs(out["result/metric_loss"] - float(loss)) < TOL


def test_one_all_reduce_per_bucket_per_outer_step(worlds):
    """Every outer step above made exactly one all_reduce call (one float64 buffer); two
    dtypes make two; a world of one makes none."""
    for world in (2, 3):
        for out in worlds[world].values():
            calls = out["calls"]
            assert calls.pop("mixed") == 2
            assert set(calls.values()) == {1}, calls
            mixed = out["mixed"]  # rank r holds r + 1 items of mean r (a, b: 2r), c is 1
            weights = torch.arange(1, world + 1, dtype=torch.float64)
            mean = float((weights * (weights - 1)).sum() / weights.sum())
            assert mixed["a"].dtype == torch.float32 and mixed["b"].dtype == torch.float64
            torch.testing.assert_close(mixed["a"], torch.full((3,), mean, dtype=torch.float32))
            torch.testing.assert_close(mixed["b"], torch.full((2,), 2 * mean, dtype=torch.float64))
            torch.testing.assert_close(mixed["c"], torch.ones(1))
    assert set(worlds[1][0]["calls"].values()) == {0}


def test_ranks_with_different_layouts_are_refused(worlds):
    for world in (2, 3):
        for out in worlds[world].values():
            assert "the ranks passed different gradients" in out["mismatch"]


def test_outer_loop_and_broadcast(worlds):
    """Three MAML outer steps with Adam from models that start apart (broadcast): the same
    meta-parameters as one process; an optimizer broadcast hands rank 0's state to all."""
    algo = W.LEARNERS["maml"](W.tiny_mlp(0))
    outer = torch.optim.Adam(algo.parameters(), lr=0.01)
    reference = W.outer_loop(algo, outer, steps=3, tasks=5)
    start = W.LEARNERS["maml"](W.tiny_mlp(0)).named_parameters()
    assert max_err(reference, {n: p.detach() for n, p in start}) > 1e-3  # the loop moved
    for world, ranks in worlds.items():
        states = [out["adam_state"]["state"] for out in ranks.values()]
        for out in ranks.values():
            assert max_err(out["loop"], reference) < 1e-11, world
            for key, state in out["adam_state"]["state"].items():
                torch.testing.assert_close(state["exp_avg"], states[0][key]["exp_avg"])
                assert int(state["step"]) == 3


def test_broadcast_tensors_from_any_rank(worlds):
    for world, ranks in worlds.items():
        for out in ranks.values():
            assert out["broadcast"]["x"].tolist() == [world - 1.0] * 2
            assert out["broadcast"]["n"].tolist() == [world - 1, world, world + 1]


def test_rank_streams_differ_and_restore(worlds):
    for world in (2, 3):
        ranks = worlds[world]
        firsts = [out["rng/first"] for out in ranks.values()]
        assert all(not torch.equal(firsts[0], f) for f in firsts[1:])
        for out in ranks.values():
            assert torch.equal(out["rng/after"], out["rng/restored"])
    assert torch.equal(worlds[1][0]["rng/first"], worlds[2][0]["rng/first"])


def test_ddp_around_the_inner_model_gives_wrong_meta_gradients(worlds):
    """DDP (1) never sees meta-gradients taken with torch.autograd.grad: each rank keeps its
    own; (2) averages the inner gradients of both ranks' tasks when the inner loop calls
    backward(). metagrad.distributed gives the single-process answer in both cases."""
    hpo = W.hpo_reference("unrolled", members=2)
    reptile = fewshot_reference("reptile", 2)
    reptile = {n.removeprefix("model."): g for n, g in reptile.items()}
    ranks = worlds[2]
    for out in ranks.values():
        assert max_err(out["ours/hpo"], hpo) < TOL
        assert max_err(out["ddp/hpo"], hpo) > 1e-3
        assert max_err(out["ours/reptile"], reptile) < TOL
        assert max_err(out["plain/reptile"], reptile) < TOL  # the same loop without DDP
        assert max_err(out["ddp/reptile"], reptile) > 1e-3
    # (1) silently: ranks disagree and nothing raised
    assert max_err(ranks[0]["ddp/hpo"], ranks[1]["ddp/hpo"]) > 1e-3


# ------------------------------------------------------------------------------ faults
@pytest.fixture(scope="module")
def faults(groups):
    """What rank 0 saw when rank 1 failed in each way (in turn, in new process groups)."""
    ranks = groups["faults"].results()
    assert ranks[1] is None  # SIGKILLed in the last round, before saving anything
    return ranks[0]


def test_killed_rank_stops_the_other_with_a_message(faults):
    error, elapsed = faults["kill"]["error"], faults["kill"]["elapsed"]
    assert "all_reduce_grads failed on rank 0 of 2" in error and "another rank" in error
    assert elapsed < W.FAULTS["kill"]  # the dead peer's closed connection is seen at once


def test_rank_that_raises_stops_the_other_at_once(faults):
    """Leaving `with init():` by an exception closes the group; the process lives on."""
    assert "all_reduce_grads failed on rank 0 of 2" in faults["raise"]["error"]
    assert faults["raise"]["elapsed"] < 3.0  # the timeout is 10 s


def test_absent_rank_times_out_with_a_message(faults):
    error, elapsed = faults["hang"]["error"], faults["hang"]["elapsed"]
    assert "all_reduce_grads failed" in error and "timeout of 2 s" in error
    assert 1.5 < elapsed < 6.0


def test_start_up_times_out_when_a_rank_never_starts():
    """Rank 0 of two, alone: the rendezvous gives up after the timeout, with a message."""
    environ = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    environ["MASTER_PORT"] = str(free_port())
    start = time.perf_counter()
    with pytest.raises(mdist.DistributedError, match="start-up failed on rank 0 of 2") as err:
        mdist.init(timeout=1.0, environ=environ)
    assert "srun" in str(err.value) and time.perf_counter() - start < 8.0
    assert mdist.world_size() == 1  # nothing was left initialized


# ---------------------------------------------------------------------- pure functions
@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node07", ["node07"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu[8-10],cpu1", ["gpu8", "gpu9", "gpu10", "cpu1"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]n[1-2],login", ["r1n1", "r1n2", "r2n1", "r2n2", "login"]),
        ("a-b[3],c.d", ["a-b3", "c.d"]),
    ],
)
def test_slurm_hosts(nodelist, hosts):
    assert mdist.slurm_hosts(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[01-03", "node01]", "n[3-1]", "n[a-b]", "n[1,,2]", ","])
def test_slurm_hosts_refuses_malformed_lists(bad):
    with pytest.raises(ValueError, match="SLURM node list"):
        mdist.slurm_hosts(bad)


SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODELIST": "gpu[12-15]",
    "SLURM_JOB_ID": "4242",
}


def test_launch_env_from_slurm():
    env = mdist.launch_env(SLURM)
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 8, 1, "slurm")
    assert env.master_addr == "gpu12"
    assert 10000 <= env.master_port < 30000
    assert mdist.launch_env({**SLURM, "SLURM_PROCID": "0"}).master_port == env.master_port
    other = mdist.launch_env({**SLURM, "SLURM_JOB_ID": "4243"})
    assert other.master_port != env.master_port
    step = mdist.launch_env({**SLURM, "SLURM_STEP_NODELIST": "gpu[14-15]"})
    assert step.master_addr == "gpu14"  # the step's nodes, where its rank 0 runs
    given = mdist.launch_env({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (given.master_addr, given.master_port) == ("head", 1234)


def test_launch_env_torchrun_first_and_single_otherwise():
    torchrun = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "29400",
    }
    env = mdist.launch_env({**SLURM, **torchrun})
    assert (env.rank, env.world_size, env.source, env.master_port) == (1, 2, "torchrun", 29400)
    assert mdist.launch_env({}) == mdist.LaunchEnv()
    assert mdist.launch_env({}).world_size == 1


@pytest.mark.parametrize(
    "environ, match",
    [
        ({**SLURM, "SLURM_PROCID": "8"}, "rank 8 outside a world of 8"),
        ({**SLURM, "SLURM_NTASKS": "two"}, "SLURM_NTASKS='two' is not an integer"),
        ({k: v for k, v in SLURM.items() if k != "SLURM_NODELIST"}, "SLURM_NODELIST"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ],
)
def test_launch_env_errors(environ, match):
    with pytest.raises(ValueError, match=match):
        mdist.launch_env(environ)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 25, 32])
@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shard_is_contiguous_balanced_and_covers_everything(n, world):
    parts = [mdist.shard(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert mdist.shard(25, 0, 2) == range(0, 13)


def test_shard_batch_keeps_the_type():
    batch = W.meta_batch(5)
    part = mdist.shard_batch(batch, rank=1, world=2)
    assert type(part) is type(batch) and part.support_x.shape[0] == 2
    assert torch.equal(part.query_y, batch.query_y[3:])
    d = mdist.shard_batch({"x": torch.arange(5), "y": torch.arange(5)}, rank=2, world=3)
    assert d["x"].tolist() == [4]
    with pytest.raises(ValueError, match="disagree on dimension 0"):
        mdist.shard_batch((torch.zeros(3), torch.zeros(4)), rank=0, world=2)
    with pytest.raises(ValueError, match="Invalid rank"):
        mdist.shard(4, rank=2, world=2)


def test_world_of_one_needs_an_explicit_count():
    """Without ranks the helpers are local, and a count is still required (no silent mean)."""
    grads = {"g": torch.tensor([3.0, 6.0])}
    with pytest.raises(ValueError, match="exactly one of mean_of"):
        mdist.all_reduce_grads(grads)
    with pytest.raises(ValueError, match="exactly one of mean_of"):
        mdist.all_reduce_grads(grads, mean_of=1, sum_of=1)
    with pytest.raises(ValueError, match="Invalid sum_of"):
        mdist.all_reduce_grads(grads, sum_of=-1)
    with pytest.raises(ValueError, match="0 items in total"):
        mdist.all_reduce_grads(grads, mean_of=0)
    assert mdist.all_reduce_grads(grads, mean_of=3)["g"].tolist() == [3.0, 6.0]
    assert mdist.all_reduce_grads(grads, sum_of=3)["g"].tolist() == [1.0, 2.0]
    lin = torch.nn.Linear(2, 1)
    assert mdist.all_reduce_grads(lin, sum_of=2) is None and lin.weight.grad is None
    assert (mdist.rank(), mdist.world_size(), mdist.is_main()) == (0, 1, True)
    assert mdist.broadcast(lin) is lin


def test_rank_seed_is_distinct_and_stable():
    seeds = [mdist.rank_seed(0, r) for r in range(200)]
    assert len(set(seeds)) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert mdist.rank_seed(0, 3) == mdist.rank_seed(0, 3) != mdist.rank_seed(1, 3)
    with pytest.raises(ValueError, match="saved for 2 ranks"):
        mdist.restore_rng_state([torch.get_rng_state()] * 2)
