"""Guard: every public estimator is in the tables that check it. An exact estimator must
agree with `Unrolled` in every scope; a biased one must be shown finite and different; each
must name the inner step where a loss turns non-finite. A new estimator without its table
entries fails here."""

from __future__ import annotations

from test_hypergrad_agreement import BIASED, EXACT
from test_hypergrad_exact import ALL as NON_FINITE
from test_truncated_session import _estimators as truncated_estimators

import metagrad.hypergrad as hg

# Estimators checked elsewhere, and where.
ELSEWHERE = {
    "Unrolled": "the reference of test_hypergrad_agreement; closed forms in test_hypergrad_exact",
    "Implicit": "exact only at an optimum: closed forms in test_hypergrad_implicit",
    # SGD with momentum only, and exact for its own fixed-point run (not the float run of the
    # agreement tables): against Unrolled on the same rounded run, a bit-exact reversal,
    # finite differences and non-finite losses in test_hypergrad_reversible.
    "Reversible": "test_hypergrad_reversible",
}


def _public(base: type) -> set[str]:
    return {
        n
        for n in hg.__all__
        if isinstance(getattr(hg, n), type)
        and issubclass(getattr(hg, n), base)
        and getattr(hg, n) is not base
    }


def _types(params) -> set[str]:
    return {type(p.values[0]).__name__ for p in params}


def test_every_estimator_agrees_with_unrolled_or_is_shown_biased() -> None:
    covered = _types(EXACT) | _types(BIASED) | set(ELSEWHERE)
    assert _public(hg.Estimator) <= covered, _public(hg.Estimator) - covered


def test_every_estimator_names_the_step_of_a_non_finite_loss() -> None:
    # test_hypergrad_errors covers Implicit, test_hypergrad_reversible Reversible
    covered = _types(NON_FINITE) | {"Implicit", "Reversible"}
    assert _public(hg.Estimator) <= covered, _public(hg.Estimator) - covered


def test_every_truncated_estimator_runs_in_the_session_tests() -> None:
    covered = {type(e).__name__ for e in truncated_estimators()}
    missing = _public(hg.TruncatedEstimator) - covered
    assert not missing, missing
