"""End to end: `python -m metagrad.train` writes the TensorBoard records a user looks for."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from _train_utils import TINY, compose_cfg, metrics, run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metagrad.app.build import build_job
from metagrad.app.checkpoint import load_checkpoint, save_checkpoint
from metagrad.app.loop import NonFiniteError, StepOutcome, run_loop
from metagrad.app.schema import ConfigError, validate
from metagrad.train import train

# Per-layer learning rates, a per-step momentum schedule and per-element weight decay: one run
# that exercises every kind of meta-parameter record.
RICH = [
    *TINY,
    "meta.learn.momentum.per_step=true",
    "+meta.learn.weight_decay={init:0.001,constraint:positive,scope:per_element}",
]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    proc = run_train(run_dir, *RICH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


@pytest.fixture(scope="module")
def e2e_run(e2e: tuple[Path, subprocess.CompletedProcess]) -> Path:
    return e2e[0]


def _accumulator(run_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    return ea


def test_prints_final_metrics_folder_and_dashboard_command(e2e_run: Path) -> None:
    m = metrics(e2e_run)
    assert set(m["final"]) >= {"val/loss", "val/accuracy", "test/accuracy"}
    assert 0.0 <= m["final"]["test/accuracy"] <= 1.0
    assert m["outer_steps"] == 4 and m["skipped_steps"] == 0
    assert (e2e_run / "checkpoint.pt").is_file()
    assert (e2e_run / ".hydra" / "config.yaml").is_file()
    assert any(p.suffix == ".log" for p in e2e_run.iterdir()), "Hydra's log file is missing"


def test_stdout_reports_metrics_run_folder_and_tensorboard_command(
    e2e: tuple[Path, subprocess.CompletedProcess],
) -> None:
    run_dir, proc = e2e
    assert f"tensorboard --logdir {run_dir.resolve()}" in proc.stdout
    assert f"run folder:     {run_dir.resolve()}" in proc.stdout
    assert "final metrics:" in proc.stdout and "val/accuracy" in proc.stdout
    assert "\r" not in proc.stderr, "progress bar drawn although stderr is not a terminal"


def test_event_files_hold_losses_meta_values_and_validation(e2e_run: Path) -> None:
    ea = _accumulator(e2e_run)
    scalars = set(ea.Tags()["scalars"])
    expected = {
        "outer/loss",
        "inner/loss",
        "hypergrad/norm",
        "val/loss",
        "val/accuracy",
        "meta/momentum",
        "meta/lr/0.weight",
        "meta/lr/0.bias",
        "meta/lr/2.weight",
        "meta/lr/2.bias",
        "final/test_accuracy",
    }
    assert expected <= scalars, expected - scalars
    steps = [e.step for e in ea.Scalars("outer/loss")]
    assert steps == [1, 2, 3, 4], "one outer/loss value per outer step"
    assert [e.step for e in ea.Scalars("val/loss")] == [0, 2, 4]
    assert len(ea.Scalars("meta/lr/0.weight")) == 5  # the start, then after every step


def test_event_files_hold_histograms_schedule_config_layout_and_hparams(e2e_run: Path) -> None:
    ea = _accumulator(e2e_run)
    tags = ea.Tags()
    assert {"meta/weight_decay/0.weight", "meta/weight_decay/2.bias"} <= set(tags["histograms"])
    assert "schedule/momentum" in tags["images"]
    plugins = {t: ea.SummaryMetadata(t).plugin_data.plugin_name for t in tags["tensors"]}
    assert "text" in plugins.values(), plugins
    assert "custom_scalars" in plugins.values(), plugins
    hparams = ea.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    config_text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "hypergrad:" in config_text and "steps: 5" in config_text
    # No stray sub-folder (SummaryWriter.add_hparams would create one: a second "run").
    assert not [p for p in e2e_run.iterdir() if p.is_dir() and p.name != ".hydra"]


def test_same_seed_same_numbers_in_process(tmp_path: Path, e2e_run: Path) -> None:
    result = train(compose_cfg(*RICH), run_dir=tmp_path / "again")
    assert metrics(tmp_path / "again") == metrics(e2e_run)
    assert result.final == metrics(e2e_run)["final"]
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        train(compose_cfg(*RICH), run_dir=tmp_path / "again")


def test_logger_none_writes_no_event_files(tmp_path: Path) -> None:
    train(compose_cfg(*TINY, "outer_steps=1", "logger=none"), run_dir=tmp_path)
    assert (tmp_path / "metrics.json").is_file()
    assert not list(tmp_path.glob("events.out.tfevents*"))


def test_bad_config_fails_at_start_on_the_command_line(tmp_path: Path) -> None:
    proc = run_train(tmp_path / "run", *TINY, "inner_optim.lr=-1", timeout=60)
    assert proc.returncode == 2
    assert "Invalid config: inner_optim.lr must be > 0, got -1.0" in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "override, error, message",
    [
        ("hypergrad.steps=abc", Exception, "hypergrad.steps"),
        ("meta.learn.lr.scope=layer", ConfigError, "meta.learn.lr.scope must be one of"),
        ("meta.learn.lr.init=-0.1", ConfigError, "meta.learn.lr: Initial value"),
        ("+meta.learn.betas={init:0.9}", ConfigError, "has no learnable hyperparameter 'betas'"),
        ("outer_steps=0", ConfigError, "outer_steps must be > 0"),
        ("task.batch_size=0", ConfigError, "task.batch_size must be > 0"),
        ("hypergrad=truncated", None, ""),
    ],
    ids=[
        "steps-not-int",
        "bad-scope",
        "negative-init",
        "unknown-hyper",
        "no-steps",
        "empty-batch",
        "valid",
    ],
)
def test_bad_config_fails_before_any_work(
    tmp_path: Path, override: str, error: type[Exception] | None, message: str
) -> None:
    def start() -> None:
        cfg = compose_cfg(*TINY, override)
        validate(cfg)
        build_job(cfg)

    if error is None:
        start()
        return
    with pytest.raises(error, match=re.escape(message)):
        start()


class _FlakyJob:
    """A job whose meta-gradient is non-finite at chosen steps."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad
        self.updates = 0

    def step(self, index: int) -> StepOutcome:
        if index in self.bad:
            return StepOutcome({"outer/loss": float("nan")}, finite=False, reason="nan")
        self.updates += 1
        return StepOutcome({"outer/loss": 1.0 / (index + 1)})

    def evaluate(self, final: bool = False) -> dict[str, float]:
        return {"val/loss": float(self.updates)}

    def meta_scalars(self) -> dict[str, float]:
        return {"meta/x": float(self.updates)}

    def meta_tensors(self) -> dict:
        return {}

    def meta_schedules(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]


def test_non_finite_steps_are_skipped_and_counted() -> None:
    job = _FlakyJob(bad={1, 3, 4})
    result = run_loop(job, outer_steps=6, max_nonfinite=3)
    assert result.nonfinite_total == 3
    assert job.updates == 3


def test_too_many_non_finite_steps_in_a_row_stop_the_run() -> None:
    job = _FlakyJob(bad={2, 3, 4, 5})
    with pytest.raises(NonFiniteError, match="stopped at outer step 5: 3 outer steps in a row"):
        run_loop(job, outer_steps=10, max_nonfinite=3)
    assert job.updates == 2


def test_checkpoint_is_atomic_and_loads_only_data(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"job": {"w": torch.ones(2)}, "loop": {"step": 3}})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert load_checkpoint(path)["loop"]["step"] == 3

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"x": Evil()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(path)


def test_diverging_inner_loop_is_skipped_then_stops_the_run_with_a_clear_message(
    tmp_path: Path,
) -> None:
    cfg = compose_cfg(*TINY, "inner_optim.lr=1e30", "max_nonfinite=2", "logger=none")
    with pytest.raises(NonFiniteError, match=r"stopped at outer step 2: 2 outer steps in a row"):
        train(cfg, run_dir=tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_plot_events_draws_a_png_from_the_event_files(e2e_run: Path, tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "experiments" / "plot_events.py"
    spec = importlib.util.spec_from_file_location("plot_events", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scalars = module.read_scalars(e2e_run)
    assert scalars["outer/loss"][0] == [1, 2, 3, 4]
    out = module.plot([e2e_run], ["outer/loss", "meta/lr/*"], tmp_path / "plot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adam_betas_are_learned_as_beta1_and_beta2() -> None:
    cfg = compose_cfg(
        *TINY,
        "inner_optim=adam",
        "meta=lr",
        "+meta.learn.beta1={init:0.8,constraint:unit}",
        "+meta.learn.beta2={constraint:unit}",  # init: the configured 0.999
    )
    validate(cfg)
    job = build_job(cfg)
    before = job.meta_scalars()
    assert before["meta/beta1"] == pytest.approx(0.8)
    assert before["meta/beta2"] == pytest.approx(0.999)
    betas = job.optimizer(job.meta, 0).betas
    assert all(b.requires_grad for b in betas), "both betas come from the meta-parameters"
    assert job.step(0).finite
    after = job.meta_scalars()
    assert after["meta/beta1"] != before["meta/beta1"], "the outer step moved beta1"
    assert after["meta/beta2"] != before["meta/beta2"], "the outer step moved beta2"


def test_a_beta_needs_the_unit_constraint() -> None:
    cfg = compose_cfg(*TINY, "inner_optim=adam", "meta=lr", "+meta.learn.beta1={init:0.9}")
    with pytest.raises(ConfigError, match=re.escape("meta.learn.beta1: needs constraint: unit")):
        build_job(cfg)
