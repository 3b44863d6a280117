"""Guard: every public learner is in the tables that check it (vmap against the loop, and the
meta-gradient against finite differences or a closed form)."""

from __future__ import annotations

from test_learner_gradients import FD_LEARNERS, LEARNERS

import metagrad.learners as ml

# Learners whose meta-gradient is checked another way, and where.
CLOSED_FORM = {
    "iMAML": "test_learner_gradients: the proximal optimum's implicit gradient, and Implicit",
    "Reptile": "test_learner_gradients: the Reptile direction theta - mean(phi)",
}


def _public() -> set[str]:
    return {
        n
        for n in ml.__all__
        if isinstance(getattr(ml, n), type)
        and issubclass(getattr(ml, n), ml.MetaLearner)
        and getattr(ml, n) is not ml.MetaLearner
    }


def _built(table, *args) -> set[str]:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    return {type(make(model, *args)).__name__ for make in table.values()}


def test_every_learner_vmaps_like_its_loop() -> None:
    assert _public() <= _built(LEARNERS, False), _public() - _built(LEARNERS, False)


def test_every_learner_meta_gradient_is_checked() -> None:
    covered = _built(FD_LEARNERS) | set(CLOSED_FORM)
    assert _public() <= covered, _public() - covered
