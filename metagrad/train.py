"""`python -m metagrad.train`: compose a config with Hydra, check it, train, report.

With no arguments it meta-learns one weight decay per weight of an MLP trained by SGD on 200 of
sklearn's digits, with exact unrolled hypergradients. `train(cfg)` does the work and can
be called without Hydra's command line (tests do); `main()` is the thin command-line entry.

    python -m metagrad.train                              # the default run
    python -m metagrad.train experiment=maml_sine         # a preset
    python -m metagrad.train -m hypergrad=unrolled,checkpointed,forwardmode
    python -m metagrad.train hydra.run.dir=outputs/my_run resume=true   # continue a run

Every check happens before anything is written into the run folder: a refused run (a bad
value, a folder in use, a checkpoint it would overwrite, an override a resumed run cannot
take) leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from . import distributed as dist
from ._checks import ArgumentError
from .app.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from .app.configs import register_configs
from .app.errors import ConfigError, RunRefused, check_finite_numbers
from .app.guard import available_memory, estimate_hpo_memory
from .app.jobs import GROUPS_USED, JOBS
from .app.logger import NullLogger
from .app.loop import Interrupted, LoopResult, NonFiniteError, resume_state, run_loop
from .app.resume import check_targets, config_yaml, continue_config, recorded_config
from .app.runfolder import RunFolder
from .app.runtime import Runtime, fresh_node, plain, resolve_device
from .app.settings import check_settings
from .hypergrad import NonFiniteLossError

__all__ = ["build", "train", "main", "config_dir"]

log = logging.getLogger("metagrad.train")

#: Exit codes of the command line.
EXIT_REFUSED = 2  # a bad config or a refused run: nothing was done
EXIT_FAILED = 1  # the run started and failed (non-finite, disk full, ...)


def config_dir() -> Path:
    """The `configs/` folder: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"metagrad's configs/ folder was not found next to {here}")


@dataclass
class _Context:
    """What Hydra tells about this invocation (empty outside a Hydra run)."""

    output_dir: Path | None = None
    choices: dict[str, str | None] = field(default_factory=dict)
    overrides: list[str] | None = None
    hydra_yaml: str | None = None
    multirun: bool = False
    sweep_dir: Path | None = None


def _hydra_context() -> _Context:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return _Context()
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    multirun = hc.mode == RunMode.MULTIRUN
    return _Context(
        output_dir=Path(hc.runtime.output_dir),
        choices=choices,
        overrides=list(hc.overrides.task),
        hydra_yaml=OmegaConf.to_yaml(hc),
        multirun=multirun,
        sweep_dir=Path(hc.sweep.dir).resolve() if multirun else None,
    )


def _submitit_job() -> str | None:
    """The submitit job id when this process runs under submitit (SLURM or its local executor)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # not a submitit job after all
        return None


@dataclass
class _Prepared:
    cfg: DictConfig
    job: Any
    start: dict[str, Any] | None
    choices: dict[str, str | None]


def _prune(cfg: DictConfig, ctx: _Context) -> DictConfig:
    """The config without the groups its loop does not read (with a warning for given ones)."""
    used = GROUPS_USED.get(cfg.loop)
    if used is None:
        return cfg  # an unknown loop: check_settings names it
    cfg = copy.deepcopy(cfg)
    groups = ("inner_optim", "learn", "hypergrad", "truncated", "learner", "online_optim")
    for group in (*groups, "outer_optim"):
        if group in cfg and group not in used and cfg[group] is not None:
            given = [
                o
                for o in ctx.overrides or []
                if o.lstrip("+~").split("=")[0].split(".")[0] == group
            ]
            if given:
                log.warning(
                    "loop=%s does not use %s; ignoring %s", cfg.loop, group, ", ".join(given)
                )
            with open_dict(cfg):
                cfg[group] = None
    return cfg


def _check(cfg: DictConfig) -> None:
    check_finite_numbers(cfg)
    try:
        check_settings(cfg)
    except ArgumentError as e:
        raise ConfigError(f"{e.arg}: {e}") from None


def _prepare(cfg: DictConfig, run: RunFolder, ctx: _Context, world_size: int = 1) -> _Prepared:
    """Every check and the whole build of the run; writes nothing."""
    ckpt = run.path / CHECKPOINT_NAME
    choices = dict(ctx.choices)
    checkpoint = None
    resume = bool(cfg.resume)
    if not resume and ckpt.is_file():
        job_id, run_id = _submitit_job(), _torchrun_id()
        restarted = job_id is not None or (
            run_id is not None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        )
        checkpoint = load_checkpoint(ckpt) if restarted else None
        if checkpoint is not None and (
            (job_id is not None and checkpoint.get("submitit_job") == job_id)
            or (run_id is not None and checkpoint.get("torchrun_id") == run_id)
        ):
            log.info("the launcher restarted this run: continuing from its checkpoint")
            resume = True
        else:
            raise RunRefused(
                f"{run.path} already holds a checkpoint; pass resume=true to continue that run, "
                "or choose another hydra.run.dir"
            )
    if resume:
        if not ckpt.is_file():
            raise RunRefused(
                f"resume=true but {run.path} has no {CHECKPOINT_NAME}; point hydra.run.dir at "
                "the folder of the run to continue"
            )
        checkpoint = checkpoint or load_checkpoint(ckpt)
        check_targets(recorded_config(checkpoint["config"], ckpt), list(cfg.trusted_targets), ckpt)
        saved_choices = dict(checkpoint.get("choices", {}))
        cfg = continue_config(
            _prune(cfg, _Context()),  # compared with the recorded config, which was pruned too
            checkpoint["config"],
            saved_choices,
            choices,
            ctx.overrides,
            run.path,
            int(checkpoint["loop"]["step"]),
        )
        choices = saved_choices or choices
    cfg, job = build(cfg, ctx.overrides, 0, world_size)
    start = None
    if checkpoint is not None:
        try:
            start = resume_state(checkpoint, job)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{ckpt} does not match the run's config ({str(e).splitlines()[0][:200]}); it "
                "was not used"
            ) from None
    if cfg.loop == "hpo":
        _guard_memory(cfg, job, job.rt)
    return _Prepared(cfg, job, start, choices)


def build(
    cfg: DictConfig, overrides: list[str] | None = None, rank: int = 0, world_size: int = 1
) -> tuple[DictConfig, Any]:
    """Check `cfg` and build its job, without a run folder (nothing is written).

    Args:
        cfg: a composed config.
        overrides: the command-line overrides (None: unknown).
        rank, world_size: this process's place in a distributed run.

    Returns:
        The config the job was built from (groups its loop does not use set to None) and
        the job.

    Raises:
        ConfigError: naming the key of the first bad value.
    """
    _check(cfg)
    cfg = _prune(cfg, _Context(overrides=overrides))
    with open_dict(cfg):
        for group in ("task", "model"):
            if cfg.get(group) is not None:
                cfg[group] = fresh_node(cfg[group], group)
    rt = Runtime(
        device=resolve_device(cfg.device),
        dtype=getattr(torch, cfg.dtype),
        seed=int(cfg.seed),
        explicit=None
        if overrides is None
        else [o.split("=", 1)[0].lstrip("+~") for o in overrides],
        rank=rank,
        world_size=world_size,
    )
    if world_size > 1 and cfg.loop in ("online", "truncated"):
        raise ConfigError(
            f"loop: loop={cfg.loop} runs in one process; start it with python, not torchrun or "
            "srun with several tasks (loop=hpo spreads population=N inner runs, loop=fewshot "
            "the tasks of each meta-batch)"
        )
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))
    try:
        job = JOBS[cfg.loop](cfg, rt)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    return cfg, job


def _guard_memory(cfg: DictConfig, job: Any, rt: Runtime) -> None:
    if job.learns_nothing:
        return
    try:
        estimate = estimate_hpo_memory(job)
    except NonFiniteLossError as e:
        log.warning("memory estimate skipped: a short probe run failed (%s)", e)
        return
    free = available_memory(rt.device)
    log.info(
        "estimated peak memory of one outer step: %s; available: %s",
        estimate.describe(),
        "unknown" if free is None else f"{free / 2**30:.2f} GiB",
    )
    if cfg.memory_guard and free is not None and estimate.total > 0.9 * free:
        raise RunRefused(
            f"one outer step would need about {estimate.describe()}, but only "
            f"{free / 2**30:.2f} GiB is available. Use a memory-lean estimator "
            "(hypergrad=checkpointed, or hypergrad=truncated with hypergrad.k=...), a shorter "
            "horizon, or a smaller model or batch; memory_guard=false runs anyway"
        )


@contextlib.contextmanager
def _stop_requests() -> Iterator[Any]:
    """Signals ask the loop to stop after the current outer step (with a checkpoint).

    SIGINT and SIGTERM (what SLURM sends before preemption or at the time limit) set the
    request; a second SIGINT stops at once. Under submitit, its timeout signal sets the request
    too, and submitit's own handler (which requeues the job) runs once the checkpoint is
    written.
    """
    state: dict[str, Any] = {"signum": None, "chained": None}

    def request(signum: int, frame: Any) -> None:
        if state["signum"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        state["signum"] = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this outer step with a checkpoint"
            + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""),
            file=sys.stderr,
            flush=True,
        )

    handled = [signal.SIGINT, signal.SIGTERM]
    usr = getattr(signal, "SIGUSR2", None)
    if usr is not None and os.environ.get("SUBMITIT_EXECUTOR"):
        previous = signal.getsignal(usr)
        if callable(previous):
            state["chained"] = previous
        handled.append(usr)
    old = {}
    try:
        for s in handled:
            old[s] = signal.signal(s, request)
    except ValueError:  # not the main thread: no signal handling
        old = {}
    try:
        yield state
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> LoopResult:
    """Check `cfg`, build the run it describes, train it and write its results.

    Args:
        cfg: a config composed from `configs/train.yaml`.
        run_dir: the run folder; None uses Hydra's output folder (or the current directory).

    Returns:
        The final metrics and counts. `<run_dir>/metrics.json` holds the same numbers.

    Raises:
        ConfigError: a value is out of range, unknown or does not fit the loop (names the key).
        RunRefused: the folder is in use, holds a checkpoint (without `resume`), its
            checkpoint is unreadable, or a resumed run was asked to change what it computes.
            Nothing was written.
        CheckpointError: a checkpoint cannot be written (the previous one is kept).
        Interrupted: a signal stopped the run; its checkpoint holds every finished step.
        NonFiniteError: too many non-finite meta-gradients in a row.
    """
    ctx = _hydra_context()
    try:
        world = dist.init(timeout=float(cfg.get("dist_timeout", 600.0)))
    except ValueError as e:
        raise ConfigError(f"dist_timeout: {e}") from None
    with world:
        if world.world_size == 1:
            return _train_alone(cfg, run_dir, ctx)
        return _train_together(cfg, run_dir, ctx, world)


def _train_alone(cfg: DictConfig, run_dir: str | Path | None, ctx: _Context) -> LoopResult:
    run = RunFolder(run_dir if run_dir is not None else (ctx.output_dir or Path.cwd()))
    try:
        run.lock()
        prepared = _prepare(cfg, run, ctx)
    except (ConfigError, RunRefused):
        run.refused()
        raise
    except CheckpointError as e:
        run.refused()
        raise RunRefused(str(e)) from None
    except BaseException:
        run.release()
        raise
    try:
        return _run(prepared, run, ctx)
    finally:
        run.release()


class FollowerStop(RuntimeError):
    """A process other than rank 0 stops because rank 0 refused the run (rank 0 says why)."""

    def __init__(self, code: int) -> None:
        super().__init__("the run was refused on rank 0")
        self.code = code


def _train_together(
    cfg: DictConfig, run_dir: str | Path | None, ctx: _Context, world: dist.World
) -> LoopResult:
    """A distributed run: rank 0 checks, writes and reports; every process computes its share.

    Rank 0 takes the folder's lock and runs every check (as a single process does), then
    sends the outcome and the config to the others, which build the same job from it (and
    read the same checkpoint when resuming). Meta-parameters and the outer optimizer's state
    are then broadcast from rank 0, so every process starts from the same values.
    """
    import torch.distributed as tdist

    status: dict[str, Any] = {"code": 0, "message": "", "kind": ""}
    run: RunFolder | None = None
    prepared = None
    if world.rank == 0:
        run = RunFolder(run_dir if run_dir is not None else (ctx.output_dir or Path.cwd()))
        try:
            run.lock()
            prepared = _prepare(cfg, run, ctx, world.world_size)
            status.update(
                run=str(run.path),
                config=config_yaml(prepared.cfg),
                resume=prepared.start is not None,
            )
        except (ConfigError, RunRefused, CheckpointError) as e:
            run.refused()
            status.update(code=EXIT_REFUSED, message=str(e), kind=type(e).__name__)
            error: BaseException = e
    box = [status]
    tdist.broadcast_object_list(box, src=0)
    status = box[0]
    if status["code"]:
        if world.rank == 0:
            raise error if not isinstance(error, CheckpointError) else RunRefused(str(error))
        raise FollowerStop(status["code"])
    if world.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports
        path = Path(status["run"])
        if ctx.output_dir is not None and ctx.output_dir.resolve() != path:
            with contextlib.suppress(OSError):  # Hydra made this process its own folder
                ctx.output_dir.rmdir()
        follower_cfg = OmegaConf.create(status["config"])
        follower_cfg, job = build(follower_cfg, None, world.rank, world.world_size)
        start = None
        if status["resume"]:
            checkpoint = load_checkpoint(path / CHECKPOINT_NAME)
            job.load_state_dict(checkpoint["job"])
            start = dict(checkpoint["loop"])
        prepared = _Prepared(follower_cfg, job, start, {})
        run = RunFolder.__new__(RunFolder)  # a view of rank 0's folder: no lock, no writes
        run.path = path
    assert prepared is not None and run is not None
    dist.broadcast(prepared.job.module)
    dist.broadcast(prepared.job.outer_optimizer)
    # Per-process random streams: from the seed and the rank, or as saved.
    if prepared.start is not None:
        states = _saved_rng(run.path)
        if states is not None and len(states) == world.world_size:
            dist.restore_rng_state(states)
    elif world.rank > 0:
        torch.manual_seed(dist.rank_seed(int(prepared.cfg.seed), world.rank))
    try:
        return _run(prepared, run, ctx, world)
    finally:
        if world.rank == 0:
            run.release()


def _saved_rng(path: Path) -> list[Any] | None:
    states = load_checkpoint(path / CHECKPOINT_NAME).get("rng_by_rank")
    return list(states) if isinstance(states, list) else None


def _run(
    prepared: _Prepared, run: RunFolder, ctx: _Context, world: dist.World | None = None
) -> LoopResult:
    cfg, job, start = prepared.cfg, prepared.job, prepared.start
    main = world is None or world.rank == 0
    overrides = list(ctx.overrides or [])
    handler = None
    if main:
        if start is None:
            run.write_records(OmegaConf.to_yaml(cfg), ctx.hydra_yaml, overrides)
        else:
            run.append_resume(overrides, int(start["step"]))
            log.info("resuming %s from outer step %d", run.path, start["step"])
        handler = logging.FileHandler(run.path / "train.log")
        handler.setFormatter(
            logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        )
        logging.getLogger().addHandler(handler)
    from hydra.utils import instantiate

    outer_steps = int(cfg.outer_steps)
    if getattr(job, "learns_nothing", False):
        log.info("learn is empty: nothing is learned, the run only evaluates (outer_steps=0)")
        outer_steps = 0
    if main:
        make_logger = instantiate(plain(cfg.logger))
        purge = None if start is None else start["step"] + 1
        logger = make_logger(run_dir=run.path, purge_step=purge)
    else:
        logger = NullLogger()
    if start is None:
        logger.text("config", OmegaConf.to_yaml(cfg, resolve=True))
        logger.layout(job.layout())
    progress = main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
    extra = {
        "config": config_yaml(cfg),
        "choices": dict(prepared.choices),
        "submitit_job": _submitit_job(),
        "torchrun_id": _torchrun_id(),
    }
    ckpt = run.path / CHECKPOINT_NAME
    try:
        with _stop_requests() as stop:
            try:
                result = run_loop(
                    job,
                    outer_steps=outer_steps,
                    logger=logger,
                    val_every=int(cfg.val_every),
                    checkpoint_every=int(cfg.checkpoint_every),
                    checkpoint_path=ckpt,
                    max_nonfinite=int(cfg.max_nonfinite),
                    progress=bool(progress),
                    start=start,
                    checkpoint_extra=extra,
                    stop=(lambda: stop["signum"]) if world is None else _agreed(stop),
                    save=None if world is None else _saver(ckpt, main),
                )
            except Interrupted as e:
                if stop["chained"] is not None and e.signum != signal.SIGINT:
                    stop["chained"](e.signum, None)  # submitit requeues the job and exits
                raise
        final_tags = {f"final/{k.replace('/', '_')}": v for k, v in result.final.items()}
        logger.hparams(_flat_hparams(cfg, prepared.choices), final_tags)
    finally:
        logger.close()
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    if not main:
        return result

    learned = {k.removeprefix("meta/"): v for k, v in job.meta_scalars().items()}
    tensors = job.meta_tensors()
    summary = {
        "final": result.final,
        "initial": result.initial,
        "learned": learned,
        "learned_tensors": {k.removeprefix("meta/"): _describe(v) for k, v in tensors.items()},
        "outer_steps": result.steps,
        "skipped_steps": result.nonfinite_total,
    }
    (run.path / "metrics.json").write_text(json.dumps(summary, indent=2))
    log.info("final metrics: %s", json.dumps(result.final))
    _report(
        result,
        learned,
        _entry_tensors(tensors),
        run.path,
        ctx.sweep_dir,
        has_events=bool(getattr(logger, "writes_events", False)),
    )
    return result


def _agreed(stop: dict[str, Any]) -> Any:
    """A stop request any process received, agreed on by all (one small all-reduce a step)."""
    import torch.distributed as tdist

    def agreed() -> int | None:
        flag = torch.tensor([stop["signum"] or 0], dtype=torch.int64, device=dist.device())
        try:
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        except RuntimeError as e:
            raise dist.DistributedError(
                f"another process of the run stopped or failed ({str(e).splitlines()[0]})"
            ) from None
        return int(flag) or None

    return agreed


def _saver(path: Path, main: bool) -> Any:
    """Every process gives its RNG state; rank 0 writes the checkpoint."""

    def save(payload: dict[str, Any]) -> None:
        states = dist.rng_states()
        if main:
            save_checkpoint(path, {**payload, "torch_rng": states[0], "rng_by_rank": states})

    return save


def _follower() -> bool:
    """Whether this process is a rank other than 0 of a distributed run (it stays quiet)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) > 0


def _torchrun_id() -> str | None:
    """torchrun's run id (the same for the restarts of one run), or None."""
    return os.environ.get("TORCHELASTIC_RUN_ID") if os.environ.get("TORCHELASTIC_RUN_ID") else None


def _describe(t: torch.Tensor) -> dict[str, float]:
    t = t.detach().double()
    return {
        "mean": float(t.mean()),
        "min": float(t.min()),
        "max": float(t.max()),
        "numel": t.numel(),
    }


def _flat_hparams(cfg: DictConfig, choices: Mapping[str, str | None]) -> dict[str, Any]:
    """The run's settings as one flat dict of scalars (`group.key` -> value) for HParams."""
    out: dict[str, Any] = {f"choice/{k}": v for k, v in choices.items() if v is not None}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k not in ("_target_", "_partial_"):
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list):
            out[prefix] = str(node)
        elif node is not None:
            out[prefix] = node

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out


def _entry_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-element meta-parameters joined by entry (`meta/weight_decay/0.weight` ->
    `weight_decay`); other tensors a job logs (example weights by group) are left out."""
    groups: dict[str, list[torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("meta/"):
            entry = key.removeprefix("meta/").split("/")[0]
            groups.setdefault(entry, []).append(value.detach().reshape(-1))
    return {name: torch.cat(parts) for name, parts in groups.items()}


def _report(
    result: LoopResult,
    learned: dict[str, float],
    per_element: Mapping[str, torch.Tensor],
    run: Path,
    sweep: Path | None,
    has_events: bool,
) -> None:
    f = result.final
    lines = [f"\nfinished {result.steps} outer steps ({result.nonfinite_total} skipped)"]
    if result.initial:
        before = "  ".join(f"{k} {v:.4f}" for k, v in result.initial.items())
        lines.append(f"before:         {before}")
    lines.append("final metrics:  " + "  ".join(f"{k} {v:.4f}" for k, v in f.items()))
    if learned:
        lines.append("learned:        " + "  ".join(f"{k}={v:.4g}" for k, v in learned.items()))
    for name, t in per_element.items():
        d = _describe(t)
        lines.append(
            f"learned:        {name}: {d['numel']} values from {d['min']:.3g} to {d['max']:.3g} "
            f"(mean {d['mean']:.3g})"
        )
    lines.append(f"run folder:     {run}")
    if has_events:
        lines.append(f"dashboard:      tensorboard --logdir {run}")
        if sweep is not None:
            lines.append(f"whole sweep:    tensorboard --logdir {sweep}")
    print("\n".join(lines), flush=True)


def _resume_command(run: Path, cfg_trusted: list[str]) -> str:
    trusted = f" trusted_targets=[{','.join(cfg_trusted)}]" if cfg_trusted else ""
    return f"python -m metagrad.train hydra.run.dir={run} resume=true{trusted}"


def usage() -> str:
    """The `--help` text: every group with the options a user picks, and how to run."""
    from .app.configs import GROUPS

    lines = [
        "python -m metagrad.train [group=option ...] [key=value ...]",
        "",
        "Meta-learning and hyperparameter gradients, configured with Hydra. Runs one of three",
        "loops (loop=hpo | truncated | fewshot | online); presets set up whole experiments.",
        "",
        "Config groups (group=option):",
    ]
    folder = config_dir()
    names = list(GROUPS) + ["learn", "experiment"]
    for group in sorted(set(names), key=names.index):
        found = (
            {p.stem for p in (folder / group).glob("*.yaml")}
            if (folder / group).is_dir()
            else set()
        )
        if group in GROUPS:
            found |= set(GROUPS[group].discover())
        what = (
            GROUPS[group].what
            if group in GROUPS
            else {
                "learn": "what loop=hpo or truncated learns (hyperparameters, scopes, schedules)",
                "experiment": "presets (configs/experiment/)",
            }[group]
        )
        lines.append(f"  {group}: {', '.join(sorted(found))}")
        lines.append(f"      {what}")
    lines += [
        "",
        "Show the composed config:    python -m metagrad.train --cfg job [overrides]",
        "Sweep (one run per value):   python -m metagrad.train -m hypergrad=unrolled,checkpointed",
        "Continue a run:              python -m metagrad.train hydra.run.dir=<run> resume=true",
        "Hydra's own options:         python -m metagrad.train --hydra-help",
    ]
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point (Hydra parses the arguments)."""
    import hydra

    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(usage())
        return
    register_configs()

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        ctx = _hydra_context()
        code, message = 0, ""
        try:
            result = train(cfg)
        except (ConfigError, RunRefused) as e:
            code, message = (
                EXIT_REFUSED,
                f"Invalid config: {e}" if isinstance(e, ConfigError) else f"Refused: {e}",
            )
        except (CheckpointError, NonFiniteError, dist.DistributedError) as e:
            code, message = EXIT_FAILED, f"Error: {e}"
        except FollowerStop as e:
            code, message = e.code, ""
        except Interrupted as e:
            run = ctx.output_dir.resolve() if ctx.output_dir else Path.cwd()
            code = 128 + e.signum
            message = (
                ""
                if _follower()
                else (
                    f"stopped after outer step {e.step} with a checkpoint; continue with:\n  "
                    f"{_resume_command(run, list(cfg.trusted_targets))}"
                )
            )
        except KeyboardInterrupt:
            code, message = (
                128 + signal.SIGINT,
                "stopped at once; the last periodic checkpoint is kept",
            )
        if code:
            with contextlib.suppress(ValueError):  # a further Ctrl-C while exiting changes nothing
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            if message:
                print(message, file=sys.stderr, flush=True)
            if ctx.multirun:
                raise RuntimeError(message)
            sys.exit(code)
        # Returned so that sweepers that optimize (e.g. Optuna) can read the objective.
        return result.final.get("val/loss")

    _main()


if __name__ == "__main__":
    main()
