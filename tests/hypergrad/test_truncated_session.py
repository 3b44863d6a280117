"""TruncatedSession: truncation schedules, new runs, TBPTT against Truncated and Unrolled,
checkpoints that continue with identical numbers, and bad options."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch
from _truncated_problems import mlp, quadratic

from metagrad.hypergrad import (
    PES,
    TBPTT,
    NonFiniteLossError,
    Truncated,
    TruncatedES,
    TruncatedSession,
    Unrolled,
)


def _lengths(session, meta, count):
    out = []
    for _ in range(count):
        r = session.step(meta)
        out.append((int(r.metrics["truncation/start"]), int(r.metrics["truncation/length"])))
    return out


def test_fixed_schedule_covers_the_horizon_then_starts_a_new_run():
    make, meta = quadratic(7)
    session = TruncatedSession(make(), TBPTT(), truncation=3)
    assert (session.horizon, session.position, session.done) == (7, 0, False)
    assert _lengths(session, meta, 3) == [(0, 3), (3, 3), (6, 1)]  # K does not divide T
    assert session.done and session.position == 7 and session.run == 0
    result = session.step(meta)  # auto_reset: a new run from the initial params
    assert session.run == 1 and session.position == 3
    assert result.metrics["truncation/index"] == 0 and result.metrics["truncation/run"] == 1
    first = TruncatedSession(make(), TBPTT(), truncation=3).step(meta)
    torch.testing.assert_close(result.grads["theta.w"], first.grads["theta.w"], rtol=0, atol=0)

    strict = TruncatedSession(make(), TBPTT(), truncation=7, auto_reset=False)
    assert strict.step(meta).metrics["truncation/end_of_run"] == 1.0
    with pytest.raises(RuntimeError, match="reset"):
        strict.step(meta)
    strict.reset()
    assert strict.run == 1 and not strict.done
    strict.step(meta)


def test_random_schedule_draws_lengths_from_1_to_2k_minus_1():
    make, meta = quadratic(40)
    lengths = {}
    for seed in (0, 1):
        session = TruncatedSession(make(), TBPTT(), truncation=4, schedule="random", seed=seed)
        spans = []
        while not session.done:
            spans += _lengths(session, meta, 1)
        starts = [s for s, _ in spans]
        assert starts == [0] + [s + n for s, n in spans[:-1]]  # contiguous
        assert sum(n for _, n in spans) == 40
        assert all(1 <= n <= 7 for _, n in spans[:-1])
        lengths[seed] = [n for _, n in spans]
    assert lengths[0] != lengths[1]
    again = TruncatedSession(make(), TBPTT(), truncation=4, schedule="random", seed=0)
    assert [n for _, n in _lengths(again, meta, 3)] == lengths[0][:3]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_tbptt_is_truncated_reverse_mode_over_each_truncation(k):
    problem, meta = mlp(6, optimizer="adam", learned_init=False)
    session = TruncatedSession(problem, TBPTT(), truncation=k)
    while not session.done:
        result = session.step(meta)
        end = int(result.metrics["truncation/start"] + result.metrics["truncation/length"])
        prefix, _ = mlp(end, optimizer="adam", learned_init=False)
        reference = Truncated(k=k)(prefix, meta)
        for name in reference.grads:
            torch.testing.assert_close(result.grads[name], reference.grads[name])
        torch.testing.assert_close(result.outer_loss, reference.outer_loss)


def test_tbptt_over_the_whole_run_is_unrolled_including_a_learned_init():
    problem, meta = mlp(5, optimizer="sgd", learned_init=True)
    result = TruncatedSession(problem, TBPTT(), truncation=9).step(meta)
    reference = Unrolled()(problem, meta)
    for name in reference.grads:
        torch.testing.assert_close(result.grads[name], reference.grads[name])
    assert reference.grads["init.w1"].abs().max() > 0
    # Later truncations cannot see the initialization: zero, with the usual warning.
    session = TruncatedSession(problem, TBPTT(), truncation=2)
    session.step(meta)
    with pytest.warns(UserWarning, match="init"):
        later = session.step(meta)
    assert later.grads["init.w1"].abs().max() == 0
    assert later.samples is None


def _estimators():
    return [TBPTT(), TruncatedES(particles=2, sigma=0.1), PES(particles=2, sigma=0.1)]


@pytest.mark.parametrize("estimator", _estimators(), ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("schedule", ["fixed", "random"])
def test_state_dict_round_trip_continues_with_identical_numbers(estimator, schedule):
    problem, meta = mlp(5, optimizer="adam", learned_init=True)
    outer = torch.optim.SGD(meta.parameters(), lr=0.05)

    def advance(session, count):
        out = []
        for _ in range(count):
            outer.zero_grad()
            result = session.step(meta)
            result.apply(meta)
            outer.step()
            out.append(result)
        return out

    session = TruncatedSession(problem, estimator, truncation=2, schedule=schedule, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a learned init is unused after TBPTT's first step
        advance(session, 2)
        buffer = io.BytesIO()
        torch.save({"session": session.state_dict(), "meta": meta.state_dict()}, buffer)
        expected = advance(session, 4)  # crosses into a new inner run

        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)  # plain tensors and numbers only
        meta.load_state_dict(saved["meta"])
        resumed = TruncatedSession(problem, estimator, truncation=2, schedule=schedule, seed=0)
        resumed.load_state_dict(saved["session"])
        assert resumed.state_dict()["position"] == saved["session"]["position"]
        got = advance(resumed, 4)
    assert resumed.run == session.run and resumed.position == session.position
    for a, b in zip(expected, got, strict=True):
        assert a.metrics["truncation/start"] == b.metrics["truncation/start"]
        for name in a.grads:
            assert torch.equal(a.grads[name], b.grads[name]), name
        for name in a.params:
            assert torch.equal(a.params[name], b.params[name]), name
        assert torch.equal(a.outer_loss, b.outer_loss)


def test_load_state_dict_refuses_another_configuration():
    problem, meta = mlp(4)
    session = TruncatedSession(problem, PES(particles=2), truncation=2)
    session.step(meta)
    state = session.state_dict()
    with pytest.raises(ValueError, match="options"):
        TruncatedSession(problem, PES(particles=3), truncation=2).load_state_dict(state)
    with pytest.raises(ValueError, match="estimator"):
        TruncatedSession(problem, TruncatedES(particles=2), truncation=2).load_state_dict(state)
    with pytest.raises(ValueError, match="truncation"):
        TruncatedSession(problem, PES(particles=2), truncation=3).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        TruncatedSession(problem, PES(particles=2), truncation=2).load_state_dict({})
    # vectorize does not change the numbers: a looped session continues a vmapped one
    looped = TruncatedSession(problem, PES(particles=2, vectorize=False), truncation=2)
    looped.load_state_dict(state)
    torch.testing.assert_close(looped.step(meta).grads["lr"], session.step(meta).grads["lr"])


def test_a_non_finite_inner_loss_leaves_the_session_unchanged():
    problem, meta = mlp(6, optimizer="sgd", learned_init=False)
    batches = list(problem.inner_batches)
    batches[3] = batches[3] * float("nan")
    problem.inner_batches = batches
    for estimator in _estimators():
        session = TruncatedSession(problem, estimator, truncation=2)
        session.step(meta)
        before = session.state_dict()
        with pytest.raises(NonFiniteLossError, match="inner"):
            session.step(meta)
        after = session.state_dict()
        assert after["position"] == 2
        assert torch.equal(after["generator"], before["generator"])


@pytest.mark.parametrize("truncation", [0, -1, 1.5, True, None])
def test_bad_truncation_is_refused(truncation):
    make, _ = quadratic(5)
    with pytest.raises(ValueError, match="Invalid truncation"):
        TruncatedSession(make(), TBPTT(), truncation=truncation)


def test_bad_session_arguments_are_refused_by_name():
    make, _ = quadratic(5)
    with pytest.raises(ValueError, match="Invalid schedule"):
        TruncatedSession(make(), TBPTT(), truncation=2, schedule="poisson")
    with pytest.raises(ValueError, match="Invalid seed"):
        TruncatedSession(make(), TBPTT(), truncation=2, seed=-1)
    with pytest.raises(ValueError, match="truncated estimator"):
        TruncatedSession(make(), Truncated(k=2), truncation=2)
    with pytest.raises(ValueError, match="InnerProblem"):
        TruncatedSession(None, TBPTT(), truncation=2)


README = Path(__file__).resolve().parents[2] / "README.md"
