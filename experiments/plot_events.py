"""Plot scalars from TensorBoard event files into a PNG.

One panel per tag pattern, one line per (run, matching tag). Patterns use shell wildcards, so
`meta/lr/*` draws every per-layer learning rate in one panel.

    python experiments/plot_events.py outputs/2026-01-01/12-00-00 \
        --tags outer/loss val/loss "meta/lr/*" --out experiments/hpo_digits/hpo_digits.png
    python experiments/plot_events.py run_a run_b --labels SGD-HD SGD --tags train/loss meta/lr
"""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

__all__ = ["read_scalars", "plot"]


def read_scalars(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar series of a run folder: tag -> (steps, values)."""
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    out = {}
    for tag in ea.Tags()["scalars"]:
        events = ea.Scalars(tag)
        out[tag] = ([e.step for e in events], [e.value for e in events])
    return out


def _ema(values: list[float], weight: float) -> list[float]:
    out, last = [], values[0]
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot(
    runs: list[str | Path],
    patterns: list[str],
    out: str | Path,
    labels: list[str] | None = None,
    log_tags: tuple[str, ...] = ("meta/lr*", "*loss*", "schedule/*"),
    xlabels: dict[str, str] | None = None,
    smooth: float = 0.0,
) -> Path:
    """Draw the tags matching `patterns` for each run and save the figure to `out`.

    `smooth` in [0, 1) applies TensorBoard-style exponential smoothing to series of more than
    50 points (0: none).
    """
    labels = labels or [Path(r).name for r in runs]
    data = [read_scalars(r) for r in runs]
    fig, axes = plt.subplots(1, len(patterns), figsize=(4.2 * len(patterns), 3.4), dpi=110)
    axes = [axes] if len(patterns) == 1 else list(axes)
    for ax, pattern in zip(axes, patterns, strict=True):
        drawn = 0
        for label, scalars in zip(labels, data, strict=True):
            for tag in sorted(t for t in scalars if fnmatch.fnmatch(t, pattern)):
                steps, values = scalars[tag]
                if smooth and len(values) > 50:
                    values = _ema(values, smooth)
                name = (
                    label if tag == pattern else f"{label} {tag.removeprefix(pattern.rstrip('*'))}"
                )
                ax.plot(steps, values, label=name.strip(), lw=1.4)
                drawn += 1
        ax.set_title(pattern)
        ax.set_xlabel((xlabels or {}).get(pattern, "outer step"))
        if drawn and any(fnmatch.fnmatch(pattern, p) for p in log_tags):
            ax.set_yscale("log")
        if 1 < drawn <= 8:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders holding event files")
    parser.add_argument("--tags", nargs="+", default=["outer/loss", "val/loss"])
    parser.add_argument("--labels", nargs="+", default=None)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument(
        "--xlabel",
        nargs=2,
        action="append",
        default=[],
        metavar=("TAG", "LABEL"),
        help="x-axis label of one panel (default: outer step)",
    )
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1)")
    args = parser.parse_args()
    path = plot(
        args.runs, args.tags, args.out, args.labels, xlabels=dict(args.xlabel), smooth=args.smooth
    )
    print(path)


if __name__ == "__main__":
    main()
