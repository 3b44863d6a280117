"""Guard: every public optimizer is in the tables that check it; adding one without its table
entries fails here (one new file, one line in metagrad/optim/__init__.py, and these entries)."""

from __future__ import annotations

from test_optim_hypergrad import CONFIGS as GRADCHECK
from test_optim_trajectory import CASES as TRAJECTORY
from test_optim_zero_grads import CONFIGS as ZERO_GRADS

import metagrad.optim as mo


def _public() -> set[str]:
    return {
        n
        for n in mo.__all__
        if isinstance(getattr(mo, n), type)
        and issubclass(getattr(mo, n), mo.Optimizer)
        and getattr(mo, n) is not mo.Optimizer
    }


def test_every_optimizer_follows_torch_optim_in_the_trajectory_table() -> None:
    assert _public() <= {case[1] for case in TRAJECTORY}, _public() - {c[1] for c in TRAJECTORY}


def test_every_optimizer_passes_gradcheck_for_every_hyperparameter() -> None:
    covered = {case[1] for case in GRADCHECK}
    assert _public() <= covered, _public() - covered
    for name in _public():
        cls = getattr(mo, name)
        checked = {h for case in GRADCHECK if case[1] == name for h in case[2]}
        names = set(cls.hyperparameter_names())
        assert names <= checked, f"{name}: no gradcheck for {names - checked}"


def test_every_optimizer_is_checked_where_gradients_are_exactly_zero() -> None:
    # Optimizers without a square root cannot produce NaN there; they are listed anyway.
    covered = {case[1] for case in ZERO_GRADS}
    assert _public() - {"SGD"} <= covered, _public() - covered
