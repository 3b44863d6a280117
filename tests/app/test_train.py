"""End to end: `python -m metagrad.train` runs, reports, and writes what a user looks for."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from _train_utils import TINY, compose_cfg, metrics, run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metagrad.app.errors import ConfigError, RunRefused
from metagrad.app.loop import NonFiniteError, StepOutcome, run_loop
from metagrad.train import build, train

# Per-layer learning rates, a per-step momentum schedule and per-element weight decay: one run
# that exercises every kind of meta-parameter record.
RICH = [
    *TINY,
    "learn.momentum.per_step=true",
    "+learn.weight_decay={init:0.001,constraint:positive,scope:per_element}",
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


def test_writes_metrics_checkpoint_records_and_log(e2e_run: Path) -> None:
    m = metrics(e2e_run)
    assert set(m["final"]) >= {"val/loss", "val/accuracy", "test/accuracy"}
    assert 0.0 <= m["final"]["test/accuracy"] <= 1.0
    assert m["outer_steps"] == 4 and m["skipped_steps"] == 0
    # Per-element values are summarized too (not left out of metrics.json).
    assert m["learned_tensors"]["weight_decay/0.weight"]["numel"] == 16 * 64
    assert (e2e_run / "checkpoint.pt").is_file()
    assert {p.name for p in (e2e_run / ".hydra").iterdir()} == {
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    }
    assert "outer step 4/4" in (e2e_run / "train.log").read_text()
    assert not (e2e_run / ".lock").exists(), "the lock is released at the end"


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
    assert [e.step for e in ea.Scalars("outer/loss")] == [1, 2, 3, 4]
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
    assert "hypergrad:" in config_text and "horizon: 5" in config_text
    # No stray sub-folder (SummaryWriter.add_hparams would create one: a second "run").
    assert not [p for p in e2e_run.iterdir() if p.is_dir() and p.name != ".hydra"]


def test_same_seed_same_numbers_in_process(tmp_path: Path, e2e_run: Path) -> None:
    result = train(compose_cfg(*RICH), run_dir=tmp_path / "again")
    again = metrics(tmp_path / "again")
    assert again["final"] == metrics(e2e_run)["final"]
    assert again["learned"] == metrics(e2e_run)["learned"]
    assert result.final == metrics(e2e_run)["final"]
    with pytest.raises(RunRefused, match="already holds a checkpoint"):
        train(compose_cfg(*RICH), run_dir=tmp_path / "again")


def test_logger_none_writes_no_event_files_and_prints_no_dashboard(tmp_path: Path) -> None:
    proc = run_train(tmp_path / "run", *TINY, "outer_steps=1", "logger=none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert not list((tmp_path / "run").glob("events.out.tfevents*"))
    assert "tensorboard --logdir" not in proc.stdout


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

    def layout(self) -> dict:
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


def test_diverging_inner_loop_is_skipped_then_stops_the_run_with_a_clear_message(
    tmp_path: Path,
) -> None:
    cfg = compose_cfg(*TINY, "learn.lr.init=1e30", "max_nonfinite=2", "logger=none")
    with pytest.raises(NonFiniteError, match=r"stopped at outer step 2: 2 outer steps in a row"):
        train(cfg, run_dir=tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_plot_events_draws_a_png_from_the_event_files(e2e_run: Path, tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "experiments" / "plot_events.py"
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
        "learn=lr",
        "+learn.beta1={init:0.8,constraint:unit}",
        "+learn.beta2={constraint:unit}",  # init: the configured 0.999
    )
    _, job = build(cfg)
    before = job.meta_scalars()
    assert before["meta/beta1"] == pytest.approx(0.8)
    assert before["meta/beta2"] == pytest.approx(0.999)
    betas = job.optimizer(job.meta, 0).betas
    assert all(b.requires_grad for b in betas), "both betas come from the meta-parameters"
    assert job.step(0).finite
    after = job.meta_scalars()
    assert after["meta/beta1"] != before["meta/beta1"], "the outer step moved beta1"
    assert after["meta/beta2"] != before["meta/beta2"], "the outer step moved beta2"


def test_a_bounded_hyperparameter_needs_a_constraint_that_keeps_it_in_range() -> None:
    cfg = compose_cfg(*TINY, "inner_optim=adam", "learn=lr", "+learn.beta1={init:0.9}")
    with pytest.raises(ConfigError, match="learn.beta1.constraint: .*in \\[0.0, 1.0\\).*unit"):
        build(cfg)


def test_learn_none_trains_once_with_the_given_hyperparameters(tmp_path: Path) -> None:
    cfg = compose_cfg(*TINY, "learn=none", "inner_optim.lr=0.1", "logger=none")
    result = train(cfg, run_dir=tmp_path)
    assert result.steps == 0 and result.final["val/loss"] < 2.3
    assert metrics(tmp_path)["learned"] == {}


def test_float64_runs_everything_in_float64() -> None:
    _, job = build(compose_cfg(*TINY, "dtype=float64"))
    assert all(p.dtype == torch.float64 for p in job.meta.parameters())
    problem = job.problem(0)
    assert all(p.dtype == torch.float64 for p in problem.init.values())
    assert problem.batch(0)[0].dtype == torch.float64
    assert job.step(0).finite


def test_l2_implicit_preset_improves_the_validation_loss_without_warnings(tmp_path: Path) -> None:
    cfg = compose_cfg("experiment=l2_implicit", "outer_steps=8", "horizon=200", "logger=none")
    result = train(cfg, run_dir=tmp_path)
    assert result.final["val/loss"] < result.initial["val/loss"] - 0.05
    assert "ImplicitBiasWarning" not in (tmp_path / "train.log").read_text()


def test_implicit_far_from_an_optimum_warns_once_in_the_log(tmp_path: Path) -> None:
    cfg = compose_cfg(*TINY, "learn=l2", "hypergrad=implicit", "logger=none")
    train(cfg, run_dir=tmp_path)
    log = (tmp_path / "train.log").read_text()
    assert log.count("ImplicitBiasWarning") == 1
    assert "Run the inner loop longer" in log
