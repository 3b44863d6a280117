"""Meta-data-parallel training on `torch.distributed`: one averaged all-reduce per outer step.

What runs in parallel is the outer objective's independent pieces: the tasks of a meta-batch,
the inner runs of a hyperparameter population (seeds, data orders, shards), the particles of a
stochastic estimator. Each rank runs any learner or hypergradient method on its share; the
meta-gradients are then averaged with one all-reduce per dtype and device (`all_reduce_grads`),
weighted by how many items each rank holds, so the result is the single-process mean even when
the shares are unequal. Meta-parameters are broadcast from rank 0 at the start and after a
resume (`broadcast`).

>>> from metagrad import distributed as dist
>>> with dist.init():                                     # torchrun, SLURM or one process
...     dist.broadcast(learner)                              # the same meta-parameters everywhere
...     for step in range(steps):
...         batch = tasks.sample(32)                      # the same meta-batch on every rank
...         mine = dist.shard_batch(batch)                # this rank's contiguous share
...         outer.zero_grad()
...         learner(*mine).backward()
...         dist.all_reduce_grads(learner, mean_of=len(mine[0]))
...         outer.step()

Without a launcher (no torchrun or SLURM variables) everything runs as a world of one process:
no process group, no communication, the same numbers. `DistributedDataParallel` is not used:
it averages `.grad` with equal weights after each `backward()`, so it mixes the *inner*
gradients of different ranks' tasks when an inner loop calls `backward()`, never sees
meta-gradients taken with `torch.autograd.grad` (every `metagrad.hypergrad` method), and
weights unequal shares wrongly; each of these gives a wrong meta-gradient without an error.

Backends: gloo on CPU, NCCL on GPU (one device per local rank). A collective whose peer died
or stopped responding raises `DistributedError` (gloo: at once when the peer's process is gone,
after `timeout` when it is alive but absent). With NCCL, torch's watchdog ends the process
after `timeout` with its own message instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .hypergrad.base import HypergradResult

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedError",
    "LaunchEnv",
    "World",
    "launch_env",
    "slurm_hosts",
    "init",
    "shutdown",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "device",
    "barrier",
    "shard",
    "shard_batch",
    "all_reduce_grads",
    "broadcast",
    "rank_seed",
    "rank_generator",
    "rng_states",
    "restore_rng_state",
]

#: Seconds a collective waits for the other ranks before raising. It must exceed the longest
#: time one rank spends away from the collectives while the others wait (rank 0 evaluating or
#: writing a checkpoint alone, a slow share).
DEFAULT_TIMEOUT = 600.0


class DistributedError(RuntimeError):
    """A collective or the start-up failed; the message names the likely cause."""


# ------------------------------------------------------------------------------ launch env
@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as its launcher describes it.

    Attributes:
        rank, world_size, local_rank: global rank, number of processes, rank on this node.
        master_addr, master_port: the rendezvous address (rank 0's host).
        source: "torchrun" (RANK, WORLD_SIZE, ...), "slurm" (SLURM_PROCID, ...) or "single".
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"


def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"Invalid environment: {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Invalid environment: {name}={value!r} is not an integer") from None


def slurm_hosts(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as `node[01-03,07],gpu5` into host names, in order.

    Ranges keep their zero padding (`[08-10]` gives 08, 09, 10); several bracket groups in one
    name expand as a product (`r[1-2]n[1-2]` gives r1n1, r1n2, r2n1, r2n2). No `scontrol`
    call is made.

    Raises:
        ValueError: an empty list, unbalanced brackets or a malformed range.
    """
    if not isinstance(nodelist, str) or not nodelist.strip():
        raise ValueError(f"Invalid SLURM node list: {nodelist!r} is empty")
    items, depth, current = [], 0, ""
    for ch in nodelist.strip():
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"Invalid SLURM node list: unbalanced brackets in {nodelist!r}")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth != 0:
        raise ValueError(f"Invalid SLURM node list: unbalanced brackets in {nodelist!r}")
    items.append(current)
    hosts: list[str] = []
    for item in items:
        if not item:
            raise ValueError(f"Invalid SLURM node list: empty entry in {nodelist!r}")
        hosts.extend(_expand_host(item, nodelist))
    return hosts


def _expand_host(item: str, nodelist: str) -> list[str]:
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", item)
    if match is None:
        if "[" in item or "]" in item:
            raise ValueError(f"Invalid SLURM node list: cannot parse {item!r} in {nodelist!r}")
        return [item]
    prefix, ranges, rest = match.groups()
    tails = _expand_host(rest, nodelist) if rest else [""]
    out: list[str] = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        high = high or low
        if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
            raise ValueError(f"Invalid SLURM node list: bad range {part!r} in {nodelist!r}")
        for i in range(int(low), int(high) + 1):
            out.extend(prefix + str(i).zfill(len(low)) + tail for tail in tails)
    return out


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read this process's place in the world from the launcher's environment variables.

    torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT come first; then SLURM's
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with rank 0's address taken as the first host of
    SLURM_STEP_NODELIST (or SLURM_NODELIST, SLURM_JOB_NODELIST) and a port derived from
    SLURM_JOB_ID and SLURM_STEP_ID (MASTER_ADDR and MASTER_PORT override both). Neither: one
    process.

    Args:
        environ: the variables (default: `os.environ`).

    Raises:
        ValueError: a variable is not an integer, the rank is outside the world, or a
            multi-process launch lacks the rendezvous address.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        local = _int_var(env, "LOCAL_RANK", rank)
        if world > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
            raise ValueError(
                "Invalid environment: RANK and WORLD_SIZE are set but MASTER_ADDR "
                "or MASTER_PORT is not (start the processes with torchrun)"
            )
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), _int_var(env, "MASTER_PORT", 29500)
        source = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_NTASKS")
        local = _int_var(env, "SLURM_LOCALID", 0)
        given = env.get("MASTER_ADDR")
        if given is not None:
            addr = given
        else:
            nodes = next(
                (
                    env[k]
                    for k in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
                    if env.get(k)
                ),
                None,
            )
            if nodes is None:
                if world > 1:
                    raise ValueError(
                        "Invalid environment: SLURM_NTASKS > 1 but no "
                        "SLURM_NODELIST (or MASTER_ADDR) names rank 0's host"
                    )
                nodes = "127.0.0.1"
            addr = slurm_hosts(nodes)[0]
        if "MASTER_PORT" in env:
            port = _int_var(env, "MASTER_PORT")
        else:  # the same on every task of a step; different steps and jobs rarely collide
            job, step = _int_var(env, "SLURM_JOB_ID", 0), _int_var(env, "SLURM_STEP_ID", 0)
            port = 10000 + (job * 64 + step % 64) % 20000
        source = "slurm"
    else:
        return LaunchEnv()
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"Invalid environment: rank {rank} outside a world of {world} ({source})")
    if local < 0:
        raise ValueError(f"Invalid environment: local rank {local} is negative ({source})")
    return LaunchEnv(rank, world, local, addr, port, source)


# ---------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class World:
    """The initialized world; a context manager that shuts it down on exit.

    Attributes:
        rank, world_size, local_rank: as in `LaunchEnv`.
        backend: "gloo", "nccl", or None for a world of one process (no process group).
        device: where this rank computes: `cuda:<local_rank>` with NCCL, else the CPU.
        source: "torchrun", "slurm", "single" or "external" (a group made elsewhere).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device
    source: str

    def __enter__(self) -> World:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # After an exception, leave at once: closing the connections tells the other ranks.
        shutdown(abort=exc_type is not None)


_state: dict[str, Any] = {
    "owned": False,  # whether `init` made the process group (and `shutdown` ends it)
    "source": "single",
    "local_rank": 0,
    "device": torch.device("cpu"),
    "timeout": None,
}


def _seconds(timeout: float | datetime.timedelta) -> float:
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"Invalid timeout: {timeout!r} (seconds > 0 or a timedelta)")
    return float(timeout)


def init(
    backend: str = "auto",
    timeout: float | datetime.timedelta = DEFAULT_TIMEOUT,
    *,
    environ: Mapping[str, str] | None = None,
) -> World:
    """Join the world the launcher started (torchrun, SLURM's srun), or a world of one.

    Use it as `with metagrad.distributed.init() as world: ...`, or call `shutdown()` at the
    end. A process group that already exists is adopted as it is.

    Args:
        backend: "auto" (NCCL when CUDA is available, else gloo), "gloo" or "nccl".
        timeout: seconds (or a timedelta) that the start-up and every collective wait for the
            other ranks before raising `DistributedError`.
        environ: the launcher's variables (default: `os.environ`), see `launch_env`.

    Returns:
        The `World`. With one process no process group is made and every function of this
        module works locally.

    Raises:
        ValueError: an unknown backend, a bad timeout or launcher variables, or NCCL with
            fewer GPUs than local ranks.
        DistributedError: the ranks did not all join within `timeout`.
    """
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"Invalid backend: {backend!r} (expected 'auto', 'gloo' or 'nccl')")
    seconds = _seconds(timeout)
    if _active():
        return _current(_state["source"] if _state["owned"] else "external")
    env = launch_env(environ)
    if backend == "auto":
        cuda = torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()
        backend = "nccl" if cuda else "gloo"
    dev = torch.device("cpu")
    if backend == "nccl":
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"Invalid backend: nccl needs a GPU for local rank {env.local_rank} "
                f"but {torch.cuda.device_count()} are visible"
            )
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
    _state.update(local_rank=env.local_rank, device=dev, timeout=seconds)
    if env.world_size == 1:
        return World(0, 1, env.local_rank, None, dev, env.source)
    # torchrun's agent may already serve the store at MASTER_PORT: join it through env://.
    from_env = environ is None or environ is os.environ
    tcp = f"tcp://{env.master_addr}:{env.master_port}"
    method = "env://" if env.source == "torchrun" and from_env else tcp
    extra: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
    try:
        dist.init_process_group(
            backend,
            init_method=method,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=seconds),
            **extra,
        )
    except RuntimeError as err:
        raise DistributedError(
            f"start-up failed on rank {env.rank} of {env.world_size} ({env.source}, rendezvous "
            f"at {env.master_addr}:{env.master_port}, timeout {seconds:g} s): not every rank "
            "joined in time, or the address is unreachable or the port taken. Check that all "
            f"{env.world_size} processes started (under SLURM, through srun) and the other "
            f"ranks' logs. Backend error: {err}"
        ) from err
    _state.update(owned=True, source=env.source)
    return _current(env.source)


def _current(source: str) -> World:
    return World(rank(), world_size(), local_rank(), dist.get_backend(), device(), source)


def shutdown(abort: bool = False) -> None:
    """Leave the world that `init` joined (nothing for a world of one or an adopted group).

    Args:
        abort: leave at once, without waiting for the other ranks (after an error), so that
            they see the closed connections and stop instead of waiting for the timeout.
    """
    if not (_state["owned"] and dist.is_available() and dist.is_initialized()):
        return
    try:
        if not abort:
            barrier()  # nobody leaves while another still needs it
    finally:
        _state["owned"] = False
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


_own_rank = rank  # for functions whose `rank` argument hides `rank()`


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def local_rank() -> int:
    """This process's rank on its node (its GPU index with NCCL)."""
    return int(_state["local_rank"])


def is_main() -> bool:
    """Whether this is rank 0, the one that logs, evaluates and writes checkpoints."""
    return rank() == 0


def device() -> torch.device:
    """Where this rank computes: `cuda:<local_rank>` with NCCL, else the CPU."""
    return _state["device"]


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a backend failure into a `DistributedError` that names the likely cause."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:
        limit = _state["timeout"]
        within = f"within the timeout of {limit:g} s" if limit else "within the group's timeout"
        raise DistributedError(
            f"{what} failed on rank {rank()} of {world_size()}: another rank probably stopped "
            "(killed, out of memory, or it raised an exception: see its log) or did not reach "
            f"this {what} {within} (a rank that works or waits elsewhere longer, e.g. "
            f"evaluating alone, needs a longer timeout= in init). Backend error: {err}"
        ) from err


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    if world_size() > 1:
        with _collective("barrier"):
            dist.barrier()


# ------------------------------------------------------------------------------ sharding
def _place(rank_: int | None, world: int | None) -> tuple[int, int]:
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"Invalid world: {world!r} (must be an integer >= 1)")
    if isinstance(rank_, bool) or not isinstance(rank_, int) or not 0 <= rank_ < world:
        raise ValueError(f"Invalid rank: {rank_!r} (must be an integer in [0, {world}))")
    return rank_, world


def shard(n: int, rank: int | None = None, world: int | None = None) -> range:
    """The indices of `n` items (tasks, population members) that `rank` owns.

    Shares are contiguous and balanced (the first `n % world` ranks hold one more), and their
    union over the ranks is `range(n)` in order. A rank may own nothing when `n < world`.

    Args:
        n: the number of items.
        rank: the rank whose share is wanted; default: this process's.
        world: the number of ranks; default: this process's world size.

    Returns:
        A `range`; `len()` of it is the count to give `all_reduce_grads`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"Invalid n: {n!r} (must be an integer >= 0)")
    r, w = _place(rank, world)
    size, extra = divmod(n, w)
    start = r * size + min(r, extra)
    return range(start, start + size + (r < extra))


def shard_batch(batch: Any, rank: int | None = None, world: int | None = None) -> Any:
    """This rank's share of a batch split along dimension 0 (see `shard`).

    Args:
        batch: a tensor, or a tuple (e.g. a `TaskBatch`), list or dict of tensors with the
            same size along dimension 0.
        rank: the rank whose share is wanted; default: this process's.
        world: the number of ranks; default: this process's world size.

    Returns:
        The same kind of object holding views of the rank's rows.
    """
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise ValueError("Invalid batch: a 0-d tensor has no dimension 0 to split")
        part = shard(batch.shape[0], rank, world)
        return batch[part.start : part.stop]
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, tuple | list):
        items = list(batch)
    else:
        raise ValueError(
            f"Invalid batch: expected a tensor, tuple, list or dict of tensors, "
            f"got {type(batch).__name__}"
        )
    if not items or not all(isinstance(t, Tensor) and t.dim() > 0 for t in items):
        raise ValueError("Invalid batch: every element must be a tensor with a dimension 0")
    sizes = {t.shape[0] for t in items}
    if len(sizes) != 1:
        raise ValueError(f"Invalid batch: its tensors disagree on dimension 0 ({sorted(sizes)})")
    part = shard(sizes.pop(), rank, world)
    parts = [t[part.start : part.stop] for t in items]
    if isinstance(batch, Mapping):
        return type(batch)(zip(batch.keys(), parts, strict=True))  # type: ignore[call-arg]
    if hasattr(batch, "_fields"):  # a NamedTuple such as TaskBatch
        return type(batch)(*parts)
    return type(batch)(parts)


# ------------------------------------------------------------------------ communication
def _buckets(tensors: list[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """Indices of `tensors` grouped by (dtype, device), in order of first appearance."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def _count(mean_of: float | None, sum_of: float | None) -> tuple[float, bool]:
    if (mean_of is None) == (sum_of is None):
        raise ValueError(
            "Invalid count: pass exactly one of mean_of= (the local gradients are a mean over "
            "that many items: tasks, inner runs) or sum_of= (they are a sum over that many)"
        )
    name, value = ("mean_of", mean_of) if sum_of is None else ("sum_of", sum_of)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")
    return float(value), sum_of is None


def all_reduce_grads(
    grads: HypergradResult | Mapping[str, Tensor] | nn.Module | Iterable[Tensor],
    *,
    mean_of: float | None = None,
    sum_of: float | None = None,
    loss: Tensor | None = None,
) -> Any:
    """Average meta-gradients over all ranks, weighting each rank by how many items it holds.

    Say what the local gradients are: `mean_of=k` (a mean over the rank's k tasks or runs, as
    `learner(...).backward()` gives) or `sum_of=k` (a sum over k, as accumulating several
    `result.apply(meta)` gives). The result is the mean over all items of all ranks, equal to
    the single-process mean however unequal the shares (13 and 12 of 25 tasks); a rank with
    k = 0 contributes nothing. All tensors travel in one flat buffer per dtype and device
    (float16 and bfloat16 are summed in float32) with the counts appended: one all-reduce call
    per buffer.

    Args:
        grads: a `HypergradResult` (its grads and outer loss are averaged), a dict of tensors,
            or an `nn.Module` / iterable of parameters whose `.grad` is averaged in place (a
            `.grad` of None counts as zero, and stays None only if it is None on every rank).
            Every rank must pass the same names, shapes and dtypes.
        mean_of: the number (or total weight) of local items when the local gradients are
            their mean; give exactly one of `mean_of` and `sum_of`.
        sum_of: the number (or total weight) of local items when the local gradients are
            their sum.
        loss: with parameters only: a local loss reduced the same way in the same call.

    Returns:
        A new `HypergradResult` (metrics `outer/loss` and `hypergrad/norm` global, the rest
        local), a new dict, or for parameters the reduced `loss` (None without one).

    Raises:
        ValueError: bad counts or inputs, or a count of 0 on every rank.
        DistributedError: a rank failed or timed out.
    """
    count, is_mean = _count(mean_of, sum_of)
    params: list[Tensor] | None = None
    names: list[Any]
    if isinstance(grads, HypergradResult):
        names, tensors = list(grads.grads) + [None], [*grads.grads.values(), grads.outer_loss]
    elif isinstance(grads, Mapping):
        names, tensors = list(grads), list(grads.values())
    else:
        params = [p for p in (grads.parameters() if isinstance(grads, nn.Module) else grads)]
        if not all(isinstance(p, Tensor) for p in params):
            raise ValueError(
                "Invalid grads: expected a HypergradResult, a dict of tensors, a "
                "module or an iterable of parameters"
            )
        params = [p for p in params if p.requires_grad]
        names = list(range(len(params)))
        tensors = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    if loss is not None:
        if params is None:
            raise ValueError(
                "Invalid loss: only with parameters (a dict or HypergradResult "
                "carries its loss inside)"
            )
        if not isinstance(loss, Tensor):
            raise ValueError(f"Invalid loss: expected a tensor, got {type(loss).__name__}")
        tensors.append(loss)
    for name, t in zip(names + ["loss"], tensors, strict=False):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"Invalid grads: entry {name!r} is not a floating-point tensor")
    present = [float(p.grad is not None) for p in params] if params is not None else []
    if world_size() == 1:
        if count == 0:
            raise ValueError("Invalid count: 0 items in total (mean_of/sum_of is 0 everywhere)")
        reduced = [t.detach() if is_mean else t.detach() / count for t in tensors]
    else:
        reduced, present = _reduce(tensors, present, count, is_mean)
    return _repack(grads, params, names, reduced, present, loss is not None)


def _layout_check(tensors: list[Tensor]) -> list[float]:
    """Two numbers in [1, 2) from the shapes and dtypes: their sum over ranks is exactly
    `world` times them (multiples of 1/256 add exactly, even in float32) unless the ranks
    passed different layouts, which an all-reduce would otherwise mix without an error."""
    crc = zlib.crc32(repr([(tuple(t.shape), str(t.dtype)) for t in tensors]).encode())
    return [1 + (crc & 255) / 256, 1 + ((crc >> 8) & 255) / 256]


def _reduce(
    tensors: list[Tensor], present: list[float], count: float, is_mean: bool
) -> tuple[list[Tensor], list[float]]:
    """Sum `count`-weighted tensors over ranks, one call per (dtype, device) buffer.

    Each buffer ends with [count, layout check] and the first also with the `.grad` flags.
    """
    scale = count if is_mean else 1.0
    zero = count == 0  # a mean over nothing may be NaN: contribute exact zeros
    check = _layout_check(tensors)
    out: list[Tensor] = list(tensors)
    groups = _buckets(tensors)
    first = next(iter(groups))
    with torch.no_grad(), _collective("all_reduce_grads"):
        for key, idx in groups.items():
            comm = torch.float32 if key[0] in (torch.float16, torch.bfloat16) else key[0]
            parts = [tensors[i].detach().reshape(-1).to(comm) * scale for i in idx]
            if zero:
                parts = [torch.zeros_like(part) for part in parts]
            tail = [count, *check, *(present if key == first else [])]
            buffer = torch.cat([*parts, torch.tensor(tail, dtype=comm, device=key[1])])
            dist.all_reduce(buffer)
            n = len(buffer) - len(tail)
            total, *checks = buffer[n : n + 3].tolist()
            if checks != [world_size() * c for c in check]:
                raise DistributedError(
                    "all_reduce_grads: the ranks passed different gradients (the number, "
                    "shapes or dtypes of the tensors differ between ranks); every rank must "
                    "pass the same meta-parameters in the same order"
                )
            if total <= 0:
                raise ValueError("Invalid count: 0 items in total (0 on every rank)")
            if key == first:
                present = buffer[n + 3 :].tolist()
            chunks = (buffer[:n] / total).split([tensors[i].numel() for i in idx])
            for i, chunk in zip(idx, chunks, strict=True):
                out[i] = chunk.reshape(tensors[i].shape).to(key[0])
    return out, present


def _repack(
    grads: Any,
    params: list[Tensor] | None,
    names: list[Any],
    reduced: list[Tensor],
    present: list[float],
    with_loss: bool,
) -> Any:
    if isinstance(grads, HypergradResult):
        new = dict(zip(names[:-1], reduced[:-1], strict=True))
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in new.values()))
        metrics = {**grads.metrics, "outer/loss": float(reduced[-1]), "hypergrad/norm": norm}
        return dataclasses.replace(grads, grads=new, outer_loss=reduced[-1], metrics=metrics)
    if params is None:
        return dict(zip(names, reduced, strict=True))
    for p, g, flag in zip(params, reduced, present, strict=False):
        p.grad = g if flag > 0 else None
    return reduced[-1] if with_loss else None


def broadcast(obj: Any, src: int = 0) -> Any:
    """Copy meta-parameters (or an outer optimizer's state) from rank `src` to every rank.

    Call it after building the meta-parameters and after loading a checkpoint, so that every
    rank starts from rank `src`'s values.

    Args:
        obj: an `nn.Module` (parameters and buffers), a dict or iterable of tensors (copied in
            place, one broadcast per dtype and device), or a `torch.optim.Optimizer` (its
            state dict is sent whole and loaded on the other ranks).
        src: the rank that sends.

    Returns:
        `obj`, updated in place.
    """
    _place(src, None)
    if world_size() == 1:
        return obj
    if isinstance(obj, torch.optim.Optimizer):
        box = [obj.state_dict() if rank() == src else None]
        with _collective("broadcast"):
            dist.broadcast_object_list(box, src=src, device=_object_device())
        if rank() != src:
            assert box[0] is not None
            obj.load_state_dict(box[0])
        return obj
    if isinstance(obj, nn.Module):
        tensors = [*obj.parameters(), *obj.buffers()]
    elif isinstance(obj, Mapping):
        tensors = list(obj.values())
    else:
        tensors = list(obj)
    if not all(isinstance(t, Tensor) for t in tensors):
        raise ValueError("Invalid obj: expected a module, an optimizer, or tensors")
    with torch.no_grad(), _collective("broadcast"):
        for (dtype, _), idx in _buckets(tensors).items():
            buffer = torch.cat([tensors[i].detach().reshape(-1) for i in idx]).to(dtype)
            dist.broadcast(buffer, src=src)
            if rank() != src:
                chunks = buffer.split([tensors[i].numel() for i in idx])
                for i, chunk in zip(idx, chunks, strict=True):
                    tensors[i].copy_(chunk.reshape(tensors[i].shape))
    return obj


def _object_device() -> torch.device | None:
    return device() if dist.get_backend() == "nccl" else None


# ------------------------------------------------------------------------------ randomness
_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def rank_seed(seed: int, rank: int | None = None) -> int:
    """A seed for rank `rank`'s own random stream, derived from the run's `seed`.

    Distinct ranks get distinct seeds (two rounds of SplitMix64, a bijection), the same
    `(seed, rank)` always the same one. For numbers that must not depend on the number of
    ranks (which tasks a meta-batch holds), draw from the run's seed on every rank and keep
    your `shard` instead: per-rank streams are for per-rank noise (dropout).

    Returns:
        A non-negative integer below 2**63, for `torch.manual_seed` or a generator.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed: {seed!r} (must be an integer)")
    r = _own_rank() if rank is None else rank
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"Invalid rank: {rank!r} (must be an integer >= 0)")
    return _splitmix64(_splitmix64(seed & _MASK) ^ r) >> 1


def rank_generator(seed: int, rank: int | None = None, device: str = "cpu") -> torch.Generator:
    """A `torch.Generator` seeded with `rank_seed(seed, rank)`.

    Its state is saved with `rng_states` and restored with `restore_rng_state`.
    """
    return torch.Generator(device=device).manual_seed(rank_seed(seed, rank))


def rng_states(generator: torch.Generator | None = None) -> list[Tensor]:
    """Every rank's state of `generator` (default: the global CPU generator), on every rank.

    A collective: all ranks call it; rank 0 then writes the list into its checkpoint.
    """
    state = (torch.get_rng_state() if generator is None else generator.get_state()).cpu()
    if world_size() == 1:
        return [state]
    states: list[Any] = [None] * world_size()
    with _collective("rng_states"):
        dist.all_gather_object(states, state)
    return states


def restore_rng_state(states: list[Tensor], generator: torch.Generator | None = None) -> None:
    """Give this rank back its entry of `states` (from `rng_states`), e.g. after a resume.

    Raises:
        ValueError: the states were saved with a different number of ranks.
    """
    if not isinstance(states, list | tuple) or len(states) != world_size():
        size = len(states) if isinstance(states, list | tuple) else type(states).__name__
        raise ValueError(
            f"Invalid states: saved for {size} ranks, this world has "
            f"{world_size()}; per-rank streams resume only on as many ranks"
        )
    state = states[rank()]
    if generator is None:
        torch.set_rng_state(state)
    else:
        generator.set_state(state)
