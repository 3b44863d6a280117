"""Meta-learning on task batches: the MAML family, vectorized over tasks with torch.func.vmap.

>>> from metagrad.learners import MAML
>>> learner = MAML(model, loss_fn="mse", inner_lr=0.01, inner_steps=5)
>>> loss = learner(support_x, support_y, query_x, query_y)  # leading task dimension
>>> loss.backward()                                       # reaches learner.parameters()
"""

from .anil import ANIL
from .base import MetaLearner
from .imaml import iMAML
from .maml import MAML
from .mamlpp import MAMLPlusPlus
from .metasgd import MetaSGD
from .reptile import Reptile

__all__ = ["MetaLearner", "MAML", "MetaSGD", "ANIL", "MAMLPlusPlus", "iMAML", "Reptile"]
