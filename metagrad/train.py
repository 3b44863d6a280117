"""`python -m metagrad.train`: compose a config with Hydra, build the run, train, report.

With no arguments it meta-learns per-layer learning rates and momentum of an MLP on sklearn's
digits with exact unrolled hypergradients. `train(cfg)` does the work and can be called
without Hydra's command line (tests do); `main()` is the thin command-line entry point.

    python -m metagrad.train                              # the default run
    python -m metagrad.train experiment=lr_schedule_digits
    python -m metagrad.train -m hypergrad=unrolled,checkpointed,forward
    python -m metagrad.train hydra.run.dir=outputs/my_run resume=true   # continue a run
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .app.build import build_job, flat_hparams
from .app.checkpoint import CHECKPOINT_NAME, load_checkpoint
from .app.loop import LoopResult, resume_state, run_loop
from .app.resume import config_for_resume, config_yaml
from .app.schema import ConfigError, register_configs, validate

__all__ = ["train", "main", "config_dir"]

log = logging.getLogger("metagrad.train")


def config_dir() -> Path:
    """The `configs/` folder: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"metagrad's configs/ folder was not found next to {here}")


def _hydra_context() -> tuple[Path | None, dict[str, str], list[str] | None]:
    """Hydra's output folder, the chosen group options and the keys overridden on the command
    line (None outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, {}, None
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    explicit = [o.split("=", 1)[0].lstrip("+~") for o in hc.overrides.task]
    return Path(hc.runtime.output_dir), choices, explicit


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> LoopResult:
    """Validate `cfg`, build the run it describes, train it and write its results.

    Args:
        cfg: a config composed from `configs/train.yaml`.
        run_dir: the run folder; None uses Hydra's output folder (or the current directory).

    Returns:
        The final metrics and counts. `<run_dir>/metrics.json` holds the same numbers.

    Raises:
        ConfigError: a value is out of range (the message names the key).
        FileNotFoundError: `resume=true` without a checkpoint in the run folder.
        FileExistsError: a checkpoint exists but `resume` is false.
        NonFiniteError: too many non-finite meta-gradients in a row.
    """
    validate(cfg)
    hydra_dir, choices, explicit = _hydra_context()
    run = Path(run_dir) if run_dir is not None else (hydra_dir or Path.cwd())
    run = run.resolve()
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))

    ckpt = run / CHECKPOINT_NAME
    start = None
    if cfg.resume:
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"resume=true but {run} has no {CHECKPOINT_NAME}; point hydra.run.dir at the "
                "folder of the run to continue"
            )
        checkpoint = load_checkpoint(ckpt)
        cfg = config_for_resume(cfg, checkpoint["config"], explicit, run)
        job = build_job(cfg)
        start = resume_state(checkpoint, job)
        log.info("resuming %s from outer step %d", run, start["step"])
        if hydra_dir is not None and (run / ".hydra").is_dir():
            # Hydra just wrote the config composed now; record the one the run continues with.
            (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    elif ckpt.is_file():
        raise FileExistsError(
            f"{run} already holds a checkpoint; pass resume=true to continue that run, or "
            "choose another hydra.run.dir"
        )
    else:
        job = build_job(cfg)

    logger = _make_logger(cfg, run, start)
    if start is None:
        logger.text("config", OmegaConf.to_yaml(cfg, resolve=True))
        if hasattr(job, "layout"):
            logger.layout(job.layout())
    progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    try:
        result = run_loop(
            job,
            outer_steps=int(cfg.outer_steps),
            logger=logger,
            val_every=int(cfg.val_every),
            checkpoint_every=int(cfg.checkpoint_every),
            checkpoint_path=ckpt,
            max_nonfinite=int(cfg.max_nonfinite),
            progress=bool(progress),
            start=start,
            checkpoint_extra={"config": config_yaml(cfg)},
        )
        final_tags = {f"final/{k.replace('/', '_')}": v for k, v in result.final.items()}
        logger.hparams(flat_hparams(cfg, choices), final_tags)
    finally:
        logger.close()

    learned = {k.removeprefix("meta/"): v for k, v in job.meta_scalars().items()}
    summary = {
        "final": result.final,
        "initial": result.initial,
        "learned": learned,
        "outer_steps": result.steps,
        "skipped_steps": result.nonfinite_total,
    }
    (run / "metrics.json").write_text(json.dumps(summary, indent=2))
    log.info("final metrics: %s", json.dumps(result.final))
    _report(result, learned, run, _sweep_dir())
    return result


def _sweep_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).resolve()


def _make_logger(cfg: DictConfig, run: Path, start: dict | None):
    from hydra.utils import instantiate

    make = instantiate(OmegaConf.to_container(cfg.logger, resolve=True))
    return make(run_dir=run, purge_step=None if start is None else start["step"] + 1)


def _report(
    result: LoopResult, learned: dict[str, float], run: Path, sweep: Path | None = None
) -> None:
    f = result.final
    lines = [f"\nfinished {result.steps} outer steps ({result.nonfinite_total} skipped)"]
    shown = "  ".join(f"{k} {v:.4f}" for k, v in f.items())
    if result.initial:
        before = "  ".join(f"{k} {v:.4f}" for k, v in result.initial.items())
        lines.append(f"before:         {before}")
    lines.append(f"final metrics:  {shown}")
    if learned:
        lines.append("learned:        " + "  ".join(f"{k}={v:.4g}" for k, v in learned.items()))
    lines.append(f"run folder:     {run}")
    lines.append(f"dashboard:      tensorboard --logdir {run}")
    if sweep is not None:
        lines.append(f"whole sweep:    tensorboard --logdir {sweep}")
    print("\n".join(lines), flush=True)


def main() -> None:
    """Command-line entry point (Hydra parses the arguments)."""
    import hydra

    register_configs()

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        try:
            result = train(cfg)
        except ConfigError as e:
            log.error("%s", e)
            sys.exit(2)
        # Returned so that sweepers that optimize (e.g. Optuna) can read the objective.
        return result.final.get("val/loss")

    os.environ.setdefault("HYDRA_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR", "0"))
    _main()


if __name__ == "__main__":
    main()
