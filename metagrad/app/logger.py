"""Where a run's numbers go: TensorBoard event files in the run folder, or nowhere."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["TensorBoardLogger", "NullLogger", "Logger"]


class NullLogger:
    """A logger that keeps nothing (the console and Hydra's log file still report the run)."""

    #: Whether event files are written (and a dashboard command is worth printing).
    writes_events = False

    def __init__(
        self,
        run_dir: str | Path | None = None,
        purge_step: int | None = None,
        flush_secs: int = 10,
        histogram_every: int = 10,
        figure_every: int = 50,
    ) -> None:
        # The intervals are `TensorBoardLogger`'s; accepted so that a config written for it
        # also runs without event files.
        self.run_dir = Path(run_dir) if run_dir is not None else None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Record scalar values (tags as keys) at `step`."""

    def histograms(self, values: Mapping[str, Tensor], step: int) -> None:
        """Record the distribution of each tensor at `step`."""

    def schedules(
        self, values: Mapping[str, Tensor], step: int, force: bool = False, final: bool = False
    ) -> None:
        """Record per-step schedules (tensor of shape [steps] or [steps, k]) as a chart.

        `force` draws regardless of the interval; `final` also writes the values as scalars
        over the inner step (`<tag>/final`, or `<tag>/final/<k>` per column).
        """

    def layout(self, groups: Mapping[str, list[str]]) -> None:
        """Group scalar tags (regular expressions) on one chart per group."""

    def text(self, tag: str, text: str) -> None:
        """Record a block of text (e.g. the resolved config)."""

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Record the run's hyperparameters with its final metrics (HParams tab)."""

    def flush(self) -> None:
        """Write pending records."""

    def close(self) -> None:
        """Flush and release files."""


Logger = NullLogger


def _hparam_value(v: Any) -> int | float | str | bool:
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


class TensorBoardLogger(NullLogger):
    """TensorBoard event files written by one `SummaryWriter` into the run folder.

    Args:
        run_dir: the run folder (event files go directly into it).
        purge_step: when resuming, the first step that will be written again; TensorBoard
            discards earlier records of this run from that step on, so each step appears once.
        flush_secs: how often pending records are written to disk.
        histogram_every: log histograms only every this many steps.
        figure_every: draw schedules only every this many steps.
    """

    def __init__(
        self,
        run_dir: str | Path,
        purge_step: int | None = None,
        flush_secs: int = 10,
        histogram_every: int = 10,
        figure_every: int = 50,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(run_dir)
        self.writes_events = True
        self.writer = SummaryWriter(str(run_dir), purge_step=purge_step, flush_secs=flush_secs)
        self.histogram_every = histogram_every
        self.figure_every = figure_every

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, float(v), step)

    def histograms(self, values: Mapping[str, Tensor], step: int) -> None:
        if step % self.histogram_every and step != 1:
            return
        for tag, t in values.items():
            self.writer.add_histogram(tag, t.detach().float().cpu(), step)

    def schedules(
        self, values: Mapping[str, Tensor], step: int, force: bool = False, final: bool = False
    ) -> None:
        if final:
            for tag, sched in values.items():
                s = sched.detach().float().cpu()
                columns = [s] if s.dim() == 1 else list(s.T)
                for k, col in enumerate(columns):
                    name = f"{tag}/final" if s.dim() == 1 else f"{tag}/final/{k}"
                    for t, v in enumerate(col.tolist()):
                        self.writer.add_scalar(name, v, t)
        if not values or (step % self.figure_every and not (force or final)):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for tag, sched in values.items():
            s = sched.detach().float().cpu()
            fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
            ax.plot(range(len(s)), s.numpy() if s.dim() == 1 else s.numpy())
            ax.set_xlabel("inner step")
            ax.set_ylabel(tag.rsplit("/", 1)[-1])
            ax.set_title(f"{tag} after outer step {step}")
            if bool((s > 0).all()) and float(s.max() / s.min()) > 20:
                ax.set_yscale("log")
            fig.tight_layout()
            self.writer.add_figure(tag, fig, step, close=True)

    def layout(self, groups: Mapping[str, list[str]]) -> None:
        charts = {name: ["Multiline", tags] for name, tags in groups.items()}
        self.writer.add_custom_scalars({"metagrad": charts})

    def text(self, tag: str, text: str) -> None:
        # Four-space indentation makes TensorBoard's markdown show it verbatim.
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()))

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        # SummaryWriter.add_hparams would open a new writer in a subfolder (a second run in
        # TensorBoard); writing the three summaries here keeps them in this run.
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: _hparam_value(v) for k, v in hparams.items()}
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        exp, ssi, sei = hparams_summary(clean, finite)
        fw = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
