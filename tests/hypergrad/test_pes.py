"""PES and truncated ES: unbiasedness on a quadratic system, vmap against loop, bad options.

The unbiasedness check is the claim of Vicol et al. (2021): on a problem whose losses are
quadratic in the meta-parameters (so Gaussian smoothing changes nothing), PES's estimate of the
full-horizon gradient, averaged over many particles, matches the exact gradient (from
`Unrolled` over every prefix of the run) within its standard error, while TBPTT's (and truncated
ES's) misses it by many standard errors. The threshold is |z| < 4.5 per coordinate (3
coordinates: a false alarm has probability below 1e-4), and a miss is |z| > 8.
"""

from __future__ import annotations

import logging

import pytest
import torch
from _truncated_problems import mlp, quadratic

from metagrad.hypergrad import PES, TBPTT, FirstOrder, TruncatedES, TruncatedSession, Unrolled
from metagrad.hypergrad.base import inner_steps, meta_gradients, outer_loss, start

T, K = 12, 3
PAIRS = 3000
Z_MATCH, Z_MISS = 4.5, 8.0


def _run(make, meta, estimator, seed=0):
    """One inner run of T steps: summed estimates, summed per-pair samples, last estimate."""
    session = TruncatedSession(make(), estimator, truncation=K, seed=seed)
    total, samples, last = 0, 0, None
    while not session.done:
        last = session.step(meta)
        total = total + last.grads["theta.w"]
        if last.samples is not None:
            samples = samples + last.samples["theta.w"]
    return total, samples, last


def _z(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    se = samples.std(0) / samples.shape[0] ** 0.5
    return (samples.mean(0) - target) / se, se


def test_pes_is_unbiased_for_the_full_horizon_and_tbptt_is_not():
    make, meta = quadratic(T)
    # The session's objective: the outer loss at the end of every truncation, summed.
    exact = sum(Unrolled()(make(s), meta).grads["theta.w"] for s in range(K, T + 1, K))
    final = Unrolled()(make(T), meta).grads["theta.w"]

    pes, pes_samples, pes_last = _run(make, meta, PES(particles=PAIRS, sigma=0.5))
    z, se = _z(pes_samples, exact)
    assert torch.allclose(pes_samples.mean(0), pes)
    assert z.abs().max() < Z_MATCH, (pes, exact, z)
    z_final, _ = _z(pes_last.samples["theta.w"], final)  # the last truncation: the final loss
    assert z_final.abs().max() < Z_MATCH, z_final

    tbptt = _run(make, meta, TBPTT())[0]
    assert ((tbptt - exact) / se).abs().max() > Z_MISS
    assert (tbptt - exact).norm() > 0.2 * exact.norm()

    # Truncated ES is the ES counterpart of TBPTT: it matches TBPTT, not the exact gradient.
    es, es_samples, _ = _run(make, meta, TruncatedES(particles=PAIRS, sigma=0.5), seed=1)
    z_es, se_es = _z(es_samples, tbptt)
    assert z_es.abs().max() < Z_MATCH, z_es
    assert ((es - exact) / se_es).abs().max() > Z_MISS


@pytest.mark.parametrize(("create_graph", "reference"), [(True, Unrolled), (False, FirstOrder)])
def test_functional_inner_steps_match_the_autograd_loop(create_graph, reference):
    """`inner_steps(functional=True)` (torch.func.grad, usable under vmap) is the same loop."""
    problem, meta = mlp(5, optimizer="adam", learned_init=True)
    run = start(problem, meta)
    run = inner_steps(
        problem, meta, run, range(problem.steps), create_graph=create_graph, functional=True
    )
    loss = outer_loss(problem, meta, run.params)
    grads = meta_gradients(loss, meta)
    expected = reference()(problem, meta)
    for name, g in expected.grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-12)
    for name, p in expected.params.items():
        torch.testing.assert_close(run.params[name].detach(), p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("estimator", [PES, TruncatedES])
@pytest.mark.parametrize("schedule", ["fixed", "random"])
def test_vmap_and_loop_give_the_same_numbers(estimator, schedule):
    problem, meta = mlp(7, optimizer="adam", learned_init=True)
    results = {}
    for vectorize in (True, False):
        session = TruncatedSession(
            problem, estimator(particles=2, sigma=0.1, vectorize=vectorize), 2, schedule=schedule
        )
        results[vectorize] = [session.step(meta) for _ in range(6)]  # crosses a new run
        assert session.run == 1
    for a, b in zip(results[True], results[False], strict=True):
        for name in a.grads:
            torch.testing.assert_close(a.grads[name], b.grads[name], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(a.samples[name], b.samples[name], rtol=1e-10, atol=1e-12)
        for name in a.params:
            torch.testing.assert_close(a.params[name], b.params[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.outer_loss, b.outer_loss, rtol=1e-12, atol=1e-14)
        assert a.metrics["truncation/length"] == b.metrics["truncation/length"]
    # the learned initialization gets an estimate (every truncation, through the particles)
    assert any(r.grads["init.w1"].abs().max() > 0 for r in results[True])


def test_pes_starts_like_truncated_es_and_then_persists():
    problem, meta = mlp(6, optimizer="sgd", learned_init=False)
    pes = TruncatedSession(problem, PES(particles=3, sigma=0.1), truncation=2, seed=5)
    es = TruncatedSession(problem, TruncatedES(particles=3, sigma=0.1), truncation=2, seed=5)
    first_pes, first_es = pes.step(meta), es.step(meta)
    for name in first_pes.grads:
        torch.testing.assert_close(first_pes.grads[name], first_es.grads[name])
    second_pes, second_es = pes.step(meta), es.step(meta)
    # the unperturbed run is the same; the estimates are not (PES weights accumulated noise)
    torch.testing.assert_close(second_pes.outer_loss, second_es.outer_loss)
    assert not torch.allclose(second_pes.grads["lr"], second_es.grads["lr"])
    assert second_pes.metrics["pes/noise_rms"] > first_pes.metrics["pes/noise_rms"]


def test_auto_falls_back_to_the_loop_where_vmap_cannot_run(caplog):
    problem, meta = mlp(4, optimizer="sgd", learned_init=False)
    plain = problem.inner_loss

    def inner_loss(p, m, b):
        loss = plain(p, m, b)
        if loss.item() > 1e6:  # data-dependent Python control flow: vmap cannot batch it
            raise AssertionError("diverged")
        return loss

    problem.inner_loss = inner_loss
    with pytest.raises(RuntimeError):
        TruncatedSession(problem, PES(particles=2, vectorize=True), 2).step(meta)
    loop = TruncatedSession(problem, PES(particles=2, vectorize=False), 2).step(meta)
    with caplog.at_level(logging.WARNING, logger="metagrad.hypergrad"):
        session = TruncatedSession(problem, PES(particles=2, vectorize="auto"), 2)
        auto = session.step(meta)
        session.step(meta)
    assert sum("one at a time" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(auto.grads["lr"], loop.grads["lr"])


@pytest.mark.parametrize("estimator", [PES, TruncatedES])
@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"particles": 0}, "particles"),
        ({"particles": -2}, "particles"),
        ({"particles": 2.0}, "particles"),
        ({"particles": True}, "particles"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"sigma": float("inf")}, "sigma"),
        ({"sigma": "0.1"}, "sigma"),
        ({"vectorize": "yes"}, "vectorize"),
    ],
)
def test_bad_options_are_refused_by_name(estimator, kwargs, arg):
    with pytest.raises(ValueError, match=f"Invalid {arg}"):
        estimator(**kwargs)
