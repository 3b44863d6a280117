"""MAML and first-order MAML (Finn et al. 2017)."""

from __future__ import annotations

from .base import MetaLearner

__all__ = ["MAML"]


class MAML(MetaLearner):
    r"""Model-agnostic meta-learning: learn an initialization that adapts in a few steps.

    For each task :math:`i` the inner loop runs the inner optimizer from the meta-learned
    initialization :math:`\theta` on the support loss, e.g. with SGD

    .. math::
        \phi_i^{(t+1)} = \phi_i^{(t)} - \alpha \nabla_\phi L^{s}_i(\phi_i^{(t)}),
        \qquad \phi_i^{(0)} = \theta,

    and the meta-objective is the mean query loss :math:`\frac1n \sum_i L^{q}_i(\phi_i^{(T)})`.
    Its gradient with respect to :math:`\theta` is exact (second order: it differentiates
    through the inner gradients, memory grows with the number of inner steps). With
    `first_order=True` (FOMAML) the inner gradients are treated as constants, so the
    meta-gradient is :math:`\frac1n\sum_i \nabla L^{q}_i(\phi_i^{(T)})` for SGD: biased, about
    the cost of plain training.

    The tasks of a meta-batch run in one `torch.func.vmap` call. Arguments are those of
    `MetaLearner`:

    >>> learner = MAML(model, loss_fn=F.mse_loss, inner_lr=0.01, inner_steps=5)
    >>> loss = learner(support_x, support_y, query_x, query_y)   # [tasks, shots, ...] tensors
    >>> loss.backward(); outer_opt.step()
    >>> params = learner.adapt(x, y, steps=10); pred = learner.predict(params, x_new)
    """
