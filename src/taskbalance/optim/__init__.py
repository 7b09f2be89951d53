"""Per-task optimizers and learning rates: :func:`make_optimizer` and :class:`TaskOptimizers`.

* :mod:`taskbalance.optim.task_optimizers`: :class:`TaskOptimizers`, one optimizer per task,
  each applying only its own task's gradient (simultaneous or sequential mode).
* :mod:`taskbalance.optim.catalogue`: :func:`make_optimizer` and :func:`list_optimizers`, every
  optimizer of ``torch.optim`` and ``torch_optimizer`` by name.
* :mod:`taskbalance.optim.lookahead`: :class:`Lookahead`, a checkpointable Lookahead
  (Zhang, Lucas, Hinton & Ba, NeurIPS 2019).
"""

from taskbalance.optim.catalogue import list_optimizers, make_optimizer
from taskbalance.optim.lookahead import Lookahead
from taskbalance.optim.task_optimizers import TaskOptimizers

__all__ = ["Lookahead", "TaskOptimizers", "list_optimizers", "make_optimizer"]
