"""metagrad.learners: bad input, BatchNorm, the vmap fallback, test-time adaptation."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad.learners import ANIL, MAML, MAMLPlusPlus, MetaSGD, Reptile, iMAML
from metagrad.optim import Adam

DTYPE = torch.float64


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(DTYPE)


def batch(tasks: int = 3, shots: int = 4, query: int = 5, dim: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(tasks, shots, dim, generator=g, dtype=DTYPE),
        torch.randn(tasks, shots, 1, generator=g, dtype=DTYPE),
        torch.randn(tasks, query, dim, generator=g, dtype=DTYPE),
        torch.randn(tasks, query, 1, generator=g, dtype=DTYPE),
    )


def grads_of(algo: nn.Module, data) -> list[torch.Tensor]:
    algo.zero_grad()
    loss = algo(*data)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in algo.parameters()]


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: (b[0], b[1], b[2][:2], b[3][:2]), "Mismatched task dimensions"),
        (lambda b: (b[0][:, :0], b[1][:, :0], b[2], b[3]), "zero shots"),
        (lambda b: (b[0], b[1][:, :3], b[2], b[3]), "support_x has 4 shots but support_y has 3"),
        (lambda b: (b[0][0], b[1], b[2], b[3]), "Mismatched task dimensions"),
        (lambda b: (b[0][0, 0], b[1], b[2], b[3]), "leading task dimension"),
        (lambda b: (b[0], b[1], b[2][:, :0], b[3][:, :0]), "query set: it has zero shots"),
        (lambda b: (b[0].numpy(), b[1], b[2], b[3]), "expected a tensor"),
    ],
    ids=["tasks", "zero-shot", "shots", "missing-task-dim", "scalar", "zero-query", "ndarray"],
)
def test_bad_meta_batches_get_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        MAML(mlp())(*change(batch()))


def test_model_without_trainable_parameters_is_refused():
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    for cls in (MAML, MetaSGD, MAMLPlusPlus, Reptile, iMAML):
        with pytest.raises(ValueError, match="no trainable parameters"):
            cls(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        MAML(nn.ReLU())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(inner_lr=0.0), "inner_lr"),
        (dict(inner_lr=-1), "inner_lr"),
        (dict(inner_steps=0), "inner_steps"),
        (dict(vectorize="yes"), "vectorize"),
        (dict(loss_fn="hinge"), "loss_fn"),
        (dict(inner_optim=lambda lr: "sgd"), "inner_optim"),
        (dict(inner_optim="adam"), "inner_optim"),
        (dict(randomness="sometimes"), "randomness"),
    ],
    ids=[
        "lr-zero",
        "lr-negative",
        "steps",
        "vectorize",
        "loss",
        "not-an-optimizer",
        "string",
        "randomness",
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAML(mlp(), **kwargs)


def test_bad_learner_specific_arguments_are_refused():
    with pytest.raises(ValueError, match="head"):
        ANIL(mlp(), head="classifier")
    with pytest.raises(ValueError, match="step_weights"):
        MAMLPlusPlus(mlp(), inner_steps=3, step_weights=[1.0])
    with pytest.raises(ValueError, match="lam"):
        iMAML(mlp(), lam=0.0)
    with pytest.raises(ValueError, match="solver"):
        iMAML(mlp(), solver="lu")
    with pytest.raises(ValueError, match="steps"):
        MAML(mlp())(*batch(), steps=0)


# ------------------------------------------------------------------------------ BatchNorm
def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1)).to(DTYPE)


def test_batchnorm_second_order_falls_back_to_the_loop_with_one_message(caplog):
    data = batch()
    auto = MAML(bn_model(), inner_lr=0.1, inner_steps=2)
    looped = MAML(bn_model(), inner_lr=0.1, inner_steps=2, vectorize=False)
    with caplog.at_level(logging.WARNING, logger="metagrad.learners"):
        first = grads_of(auto, data)
        grads_of(auto, data)
    messages = [r.getMessage() for r in caplog.records if r.name == "metagrad.learners"]
    assert len(messages) == 1 and "BatchNorm1d" in messages[0] and "one at a time" in messages[0]
    for a, b in zip(first, grads_of(looped, data), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_batchnorm_uses_per_task_statistics_and_leaves_running_stats_alone():
    model = bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sx, sy, qx, qy = batch(tasks=2)
    algo = MAML(model, inner_lr=0.1, inner_steps=1)
    together = algo(sx, sy, qx, qy, reduction="none")
    # A task's loss does not depend on the other tasks of the meta-batch.
    alone = algo(sx[1:], sy[1:], qx[1:], qy[1:], reduction="none")
    torch.testing.assert_close(together[1:], alone, atol=1e-12, rtol=0)
    together.sum().backward()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_batchnorm_first_order_runs_vmapped_and_matches_the_loop():
    data = batch()
    vmapped = MAML(bn_model(), inner_lr=0.1, inner_steps=2, first_order=True, vectorize=True)
    looped = MAML(bn_model(), inner_lr=0.1, inner_steps=2, first_order=True, vectorize=False)
    for a, b in zip(grads_of(vmapped, data), grads_of(looped, data), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_forcing_vmap_where_it_would_be_wrong_is_refused():
    with pytest.raises(ValueError, match="vectorize=True.*BatchNorm1d"):
        MAML(bn_model(), vectorize=True)(*batch())
    layer_norm = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 1)).to(DTYPE)
    with pytest.raises(ValueError, match="LayerNorm"):
        MAML(layer_norm, vectorize=True)(*batch())


# ---------------------------------------------------------------------------- fallback
class DataDependent(nn.Module):
    """A model vmap cannot batch: Python control flow on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        return out * 2 if out.sum() > 0 else out


def test_unbatchable_model_falls_back_once_with_the_same_numbers(caplog):
    data = batch()
    torch.manual_seed(0)
    auto = MAML(DataDependent(), inner_lr=0.1, inner_steps=2)
    torch.manual_seed(0)
    looped = MAML(DataDependent(), inner_lr=0.1, inner_steps=2, vectorize=False)
    with caplog.at_level(logging.WARNING, logger="metagrad.learners"):
        first = grads_of(auto, data)
        grads_of(auto, data)
    messages = [r.getMessage() for r in caplog.records if r.name == "metagrad.learners"]
    assert len(messages) == 1 and "torch.func.vmap" in messages[0]
    for a, b in zip(first, grads_of(looped, data), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError):
        MAML(DataDependent(), vectorize=True)(*data)


def test_dropout_draws_different_masks_per_task_under_vmap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.Dropout(0.5), nn.Linear(64, 1)).to(DTYPE)
    sx, sy, qx, qy = batch(tasks=2)
    same = (sx[:1].expand(2, -1, -1), sy[:1].expand(2, -1, -1))
    losses = MAML(model, vectorize=True)(
        *same, qx[:1].expand(2, -1, -1), qy[:1].expand(2, -1, -1), reduction="none"
    )
    assert losses[0] != losses[1]


# ------------------------------------------------------------------------- adaptation
@pytest.mark.parametrize("steps", [0, 1, 7])
def test_adapt_runs_any_number_of_plain_sgd_steps(steps):
    model = mlp()
    algo = MAML(model, inner_lr=0.1, inner_steps=2)
    sx, sy, qx, _ = batch()
    params = algo.adapt(sx[0], sy[0], steps=steps)
    expected = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    for _ in range(steps):
        loss = F.mse_loss(torch.func.functional_call(model, expected, (sx[0],)), sy[0])
        grads = torch.autograd.grad(loss, list(expected.values()))
        expected = {
            n: (p - 0.1 * g).detach().requires_grad_()
            for (n, p), g in zip(expected.items(), grads, strict=True)
        }
    for n in expected:
        torch.testing.assert_close(params[n], expected[n], atol=1e-12, rtol=0)
    torch.testing.assert_close(
        algo.predict(params, qx[0]),
        torch.func.functional_call(model, expected, (qx[0],)),
        atol=1e-12,
        rtol=0,
    )


def test_forward_with_more_steps_equals_adapt_then_predict():
    algo = MetaSGD(mlp(), inner_lr=0.05, inner_steps=1, inner_optim=Adam)
    sx, sy, qx, qy = batch()
    losses = algo(sx, sy, qx, qy, steps=4, reduction="none")
    for i in range(3):
        params = algo.adapt(sx[i], sy[i], steps=4)
        loss = F.mse_loss(algo.predict(params, qx[i]), qy[i])
        torch.testing.assert_close(losses[i], loss, atol=1e-12, rtol=0)


def test_anil_adapts_only_the_head():
    model = mlp()
    algo = ANIL(model, inner_lr=0.1, inner_steps=3)
    assert algo.head == "2"
    sx, sy, _, _ = batch()
    params = algo.adapt(sx[0], sy[0])
    assert torch.equal(params["0.weight"], model[0].weight)
    assert not torch.equal(params["2.weight"], model[2].weight)


def test_learned_learning_rates_start_at_inner_lr_and_are_meta_parameters():
    metasgd = MetaSGD(mlp(), inner_lr=0.03)
    # Learned rates are entries of the learner's MetaParameters, like HPO meta-parameters.
    names = dict(metasgd.named_parameters())
    assert names["meta.inner_lr.0__weight"].shape == (6, 2)
    assert {f"meta.{n}" for n, _ in metasgd.meta.named_parameters()} <= set(names)
    for lr in metasgd.lrs().values():
        torch.testing.assert_close(lr, torch.full_like(lr, 0.03))
    pp = MAMLPlusPlus(mlp(), inner_lr=0.03, inner_steps=4)
    # per layer and per step: [inner_steps, layers]
    assert dict(pp.named_parameters())["meta.inner_lr"].shape == (4, 4)
    assert pp.lrs()["2.bias"].shape == (4,)
    torch.testing.assert_close(pp.lrs()["2.bias"], torch.full((4,), 0.03, dtype=torch.float64))
    pp.anneal_step_weights(1.0)
    assert pp.step_weights == [0.0, 0.0, 0.0, 1.0]
    pp.anneal_step_weights(0.0)
    assert pp.step_weights == pytest.approx([0.25] * 4)


def test_meta_training_lowers_the_query_loss():
    from metagrad.tasks import SinusoidTasks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1))
    algo = MAML(model, inner_lr=0.02, inner_steps=3)
    opt = torch.optim.Adam(algo.parameters(), lr=1e-2)
    tasks = SinusoidTasks(seed=0)
    held_out = SinusoidTasks(seed=1).sample(50, 10)
    before = algo(*held_out).item()
    for _ in range(150):
        opt.zero_grad()
        algo(*tasks.sample(10, 10)).backward()
        opt.step()
    assert algo(*held_out).item() < 0.8 * before


@pytest.mark.parametrize("cls", [MAML, ANIL], ids=["maml", "anil"])
def test_digits_classification_vmap_equals_loop(cls):
    from metagrad.tasks import DigitsFewShot

    data = DigitsFewShot(ways=3, shots=1, query=2, dtype=DTYPE).sample(3)
    results = []
    for vectorize in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)).to(DTYPE)
        algo = cls(model, loss_fn="cross_entropy", inner_lr=0.5, inner_steps=2, vectorize=vectorize)
        results.append(grads_of(algo, data))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_multi_step_loss_applies_in_training_calls_only():
    algo = MAMLPlusPlus(mlp(), inner_lr=0.1, inner_steps=2, step_weights=[0.5, 0.5])
    data = batch()
    plain = MAMLPlusPlus(mlp(), inner_lr=0.1, inner_steps=2)
    assert algo(*data, steps=2).item() == pytest.approx(plain(*data).item(), abs=1e-12)
    assert algo(*data).item() != pytest.approx(plain(*data).item(), abs=1e-6)


def test_an_error_of_the_model_itself_is_raised_not_hidden_by_the_fallback(caplog):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).to(DTYPE)  # expects 3 features
    algo = MAML(model)
    with caplog.at_level(logging.WARNING, logger="metagrad.learners"):
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            algo(*batch(dim=2))
    assert not [r for r in caplog.records if r.name == "metagrad.learners"]
    assert not algo._vmap_failed
