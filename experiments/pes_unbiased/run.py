"""PES is unbiased for the full-horizon gradient; TBPTT and truncated ES are not.

A linear dynamical system small enough for the exact gradient: inner params w in R^4, inner
loss 0.5 (w - theta - b_t)' H (w - theta - b_t) with fixed shifts b_t (H = A A'/4 + 0.1 I, A
Gaussian), SGD with momentum 0.5 at lr 0.05 (plain numbers) for T = 100 steps, outer loss
0.5 |w - c|^2, meta-parameter theta in R^4 (free). The run is cut into truncations of K = 10
steps. The objective is that of `TruncatedSession`: the outer loss at the end of every
truncation, summed over the run; its exact gradient is the sum of `Unrolled` over every prefix
that ends at a truncation boundary.
Every iterate is affine in theta, so the losses are quadratic in the values theta takes in
each truncation and Gaussian smoothing leaves their gradient unchanged: an unbiased estimator
of the smoothed objective is unbiased for the exact gradient.

For each estimator we sum its per-truncation estimates over one run. PES and truncated ES
return one estimate per antithetic pair (`result.samples`), independent across pairs, so the
mean over pairs has a standard error from their spread; z = (mean - exact) / SE.

    OMP_NUM_THREADS=1 python experiments/pes_unbiased/run.py           # ~1 minute
    OMP_NUM_THREADS=1 python experiments/pes_unbiased/run.py --quick   # seconds

writes results.json and pes_unbiased.png next to this script (or into --out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import metagrad
from metagrad.hypergrad import PES, TBPTT, TruncatedES, TruncatedSession, Unrolled
from metagrad.optim import SGD

HERE = Path(__file__).resolve().parent
DT = torch.float64
DIM = 4
Z_MATCH = 4.5  # |z| below this in every coordinate: consistent with the exact gradient
Z_MISS = 8.0  # |z| above this in some coordinate: biased


def system(horizon: int, seed: int = 0):
    """`make(steps)` builds the problem's first `steps` steps; `meta` holds theta."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(DIM, DIM, generator=g, dtype=DT)
    h = a @ a.T / DIM + 0.1 * torch.eye(DIM, dtype=DT)
    target = torch.randn(DIM, generator=g, dtype=DT)
    shifts = torch.randn(horizon, DIM, generator=g, dtype=DT) * 0.3

    def inner(p, m, b):
        r = p["w"] - m.value("theta")["w"] - b
        return 0.5 * (r @ h @ r)

    def make(steps: int) -> metagrad.InnerProblem:
        return metagrad.InnerProblem(
            init={"w": torch.zeros(DIM, dtype=DT)},
            optimizer=lambda m, t: SGD(lr=0.05, momentum=0.5),
            inner_loss=inner,
            outer_loss=lambda p, m, b: 0.5 * (p["w"] - target).pow(2).sum(),
            inner_batches=shifts,
            outer_batch=None,
            steps=steps,
        )

    meta = metagrad.MetaParameters()
    zeros = {"w": torch.zeros(DIM, dtype=DT)}
    meta.add("theta", 0.0, constraint=None, scope="per_element", params=zeros)
    return make, meta


def exact_gradients(make, meta, horizon: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact gradients of the summed objective and of the final loss."""
    ends = list(range(k, horizon, k)) + [horizon]
    total = sum(Unrolled()(make(end), meta).grads["theta.w"] for end in ends)
    return total, Unrolled()(make(horizon), meta).grads["theta.w"]


def one_run(make, meta, horizon, k, estimator, seed=0) -> dict[str, Any]:
    """Sum the estimates (and per-pair samples) of one inner run; keep the last truncation's."""
    session = TruncatedSession(make(horizon), estimator, truncation=k, seed=seed)
    total, samples, last = 0, None, None
    started = time.perf_counter()
    while not session.done:
        last = session.step(meta)
        total = total + last.grads["theta.w"]
        if last.samples is not None:
            s = last.samples["theta.w"]
            samples = s if samples is None else samples + s
    out = {"estimate": total, "samples": samples, "seconds": time.perf_counter() - started}
    out["last_samples"] = None if last.samples is None else last.samples["theta.w"]
    return out


def z_scores(samples: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    se = samples.std(0) / samples.shape[0] ** 0.5
    return (samples.mean(0) - target) / se, se


def as_list(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t]


def running_error(samples: torch.Tensor, exact: torch.Tensor, counts: list[int]) -> list[float]:
    return [float((samples[:n].mean(0) - exact).norm()) for n in counts]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    main = results["main"]
    coords = range(DIM)
    width = 0.2
    ax = axes[0]
    ax.bar([c - 1.5 * width for c in coords], main["exact"], width, label="exact (Unrolled)")
    ax.bar(
        [c - 0.5 * width for c in coords],
        main["pes"]["mean"],
        width,
        yerr=[2 * s for s in main["pes"]["se"]],
        label="PES ± 2 SE",
    )
    ax.bar([c + 0.5 * width for c in coords], main["tbptt"]["estimate"], width, label="TBPTT")
    ax.bar(
        [c + 1.5 * width for c in coords],
        main["es"]["mean"],
        width,
        yerr=[2 * s for s in main["es"]["se"]],
        label="truncated ES ± 2 SE",
    )
    ax.set_xticks(list(coords), [f"theta[{c}]" for c in coords])
    ax.set_title(f"Full-horizon gradient (T={results['T']}, K={results['K']})")
    ax.legend(fontsize=8)

    ax = axes[1]
    counts = main["pairs_axis"]
    ax.loglog(counts, main["pes"]["running_error"], color="C1", label="PES: |mean - exact|")
    ax.loglog(counts, main["es"]["running_error"], color="C3", label="truncated ES: |mean - exact|")
    ax.axhline(main["tbptt"]["error"], color="C2", ls="--", label="TBPTT: |estimate - exact|")
    ref = main["pes"]["running_error"][0] * (counts[0] ** 0.5)
    ax.loglog(counts, [ref / n**0.5 for n in counts], "k:", lw=1, label="1/sqrt(pairs)")
    ax.set_xlabel("antithetic pairs averaged")
    ax.set_ylabel("error norm")
    ax.set_title("Error against the number of pairs")
    ax.legend(fontsize=8)

    ax = axes[2]
    sweep = results["sweep"]
    ks = [row["K"] for row in sweep]
    ax.semilogx(ks, [row["tbptt_rel_error"] for row in sweep], "o-", color="C2", label="TBPTT")
    ax.semilogx(ks, [row["pes_rel_error"] for row in sweep], "s-", color="C1", label="PES")
    ax.fill_between(
        ks,
        [0] * len(ks),
        [row["pes_rel_2se"] for row in sweep],
        color="C1",
        alpha=0.2,
        label="PES: 2 standard errors",
    )
    ax.set_xlabel("truncation length K")
    ax.set_ylabel("|estimate - exact| / |exact|")
    ax.set_title("Relative error against K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run for tests")
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--truncation", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--sweep", type=int, nargs="*", default=[1, 2, 5, 10, 20, 50, 100])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    if args.quick:
        args.horizon, args.truncation, args.pairs, args.sweep = 30, 2, 2000, [3, 30]
    torch.set_num_threads(1)
    horizon, k = args.horizon, args.truncation
    make, meta = system(horizon)

    exact, final = exact_gradients(make, meta, horizon, k)
    pes = one_run(make, meta, horizon, k, PES(particles=args.pairs, sigma=0.5), seed=0)
    es = one_run(make, meta, horizon, k, TruncatedES(particles=args.pairs, sigma=0.5), seed=1)
    tbptt = one_run(make, meta, horizon, k, TBPTT())
    z_pes, se_pes = z_scores(pes["samples"], exact)
    z_final, se_final = z_scores(pes["last_samples"], final)
    z_es, se_es = z_scores(es["samples"], exact)
    z_es_tbptt, _ = z_scores(es["samples"], tbptt["estimate"])
    z_tbptt = (tbptt["estimate"] - exact) / se_pes
    counts = sorted({int(round(10 ** (e / 4))) for e in range(4, 100)} | {args.pairs})
    counts = [n for n in counts if n <= args.pairs]
    main_results = {
        "exact": as_list(exact),
        "exact_final_loss": as_list(final),
        "pairs_axis": counts,
        "pes": {
            "mean": as_list(pes["samples"].mean(0)),
            "se": as_list(se_pes),
            "z": as_list(z_pes),
            "final_loss_mean": as_list(pes["last_samples"].mean(0)),
            "final_loss_se": as_list(se_final),
            "final_loss_z": as_list(z_final),
            "seconds": pes["seconds"],
            "running_error": running_error(pes["samples"], exact, counts),
        },
        "es": {
            "mean": as_list(es["samples"].mean(0)),
            "se": as_list(se_es),
            "z": as_list(z_es),
            "z_vs_tbptt": as_list(z_es_tbptt),
            "seconds": es["seconds"],
            "running_error": running_error(es["samples"], exact, counts),
        },
        "tbptt": {
            "estimate": as_list(tbptt["estimate"]),
            "z_on_pes_se": as_list(z_tbptt),
            "error": float((tbptt["estimate"] - exact).norm()),
            "rel_error": float((tbptt["estimate"] - exact).norm() / exact.norm()),
            "seconds": tbptt["seconds"],
        },
    }
    print(f"exact {as_list(exact)}")
    print(
        f"PES   max|z| {float(z_pes.abs().max()):.2f} (final loss {float(z_final.abs().max()):.2f})"
    )
    print(
        f"TBPTT max|z| {float(z_tbptt.abs().max()):.1f}, "
        f"relative error {main_results['tbptt']['rel_error']:.3f}"
    )
    print(
        f"ES    max|z| {float(z_es.abs().max()):.1f} vs exact, "
        f"{float(z_es_tbptt.abs().max()):.2f} vs TBPTT"
    )

    sweep = []
    for kk in args.sweep:
        ex, _ = exact_gradients(make, meta, horizon, kk)
        p = one_run(make, meta, horizon, kk, PES(particles=args.pairs, sigma=0.5), seed=2)
        t = one_run(make, meta, horizon, kk, TBPTT())
        z, se = z_scores(p["samples"], ex)
        row = {
            "K": kk,
            "truncations": -(-horizon // kk),
            "exact": as_list(ex),
            "pes_max_abs_z": float(z.abs().max()),
            "pes_rel_error": float((p["samples"].mean(0) - ex).norm() / ex.norm()),
            "pes_rel_2se": float(2 * se.norm() / ex.norm()),
            "tbptt_rel_error": float((t["estimate"] - ex).norm() / ex.norm()),
            "tbptt_max_abs_z_on_pes_se": float(((t["estimate"] - ex) / se).abs().max()),
        }
        sweep.append(row)
        print(
            f"K={kk:4d}: PES max|z| {row['pes_max_abs_z']:.2f} rel err {row['pes_rel_error']:.4f}"
            f" | TBPTT rel err {row['tbptt_rel_error']:.4f}"
        )

    checks = {
        "pes_matches_exact": float(z_pes.abs().max()) < Z_MATCH,
        "pes_last_truncation_matches_final_loss_gradient": float(z_final.abs().max()) < Z_MATCH,
        "tbptt_misses_exact": float(z_tbptt.abs().max()) > Z_MISS,
        "es_misses_exact": float(z_es.abs().max()) > Z_MISS,
        "es_matches_tbptt": float(z_es_tbptt.abs().max()) < Z_MATCH,
        "pes_matches_exact_for_every_k": all(r["pes_max_abs_z"] < Z_MATCH for r in sweep),
        "tbptt_exact_only_when_k_covers_the_run": all(
            (r["tbptt_rel_error"] < 1e-10) == (r["K"] >= horizon) for r in sweep
        ),
    }
    results = {
        "quick": args.quick,
        "T": horizon,
        "K": k,
        "pairs": args.pairs,
        "z_match": Z_MATCH,
        "z_miss": Z_MISS,
        "main": main_results,
        "sweep": sweep,
        "checks": checks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "pes_unbiased.png")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(checks, indent=2))
    return results


if __name__ == "__main__":
    main()
