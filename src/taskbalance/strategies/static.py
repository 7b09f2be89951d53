"""Fixed weights: the everyday ``alpha * loss_cls + beta * loss_reg``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.loss_weighting import LossWeighting
from taskbalance.registry import register_strategy
from taskbalance.validation import per_task_vector


@register_strategy("static", paper="(baseline) fixed weighted sum of the task losses")
class Static(LossWeighting):
    """Fixed per-task weights: ``sum_i weights[i] * L_i``.

    ``weights`` is a mapping task -> weight, a sequence in ``tasks`` order, or one number for
    every task; the default is all ones. Weights must be finite and non-negative.

    Example (the article's ``alpha * loss_cls + beta * loss_reg``)::

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("static", tasks=["cls", "reg"], weights={"cls": 0.7, "reg": 0.3})
        >>> s({"cls": torch.tensor(2.0), "reg": torch.tensor(1.0)})
        tensor(1.7000)
    """

    task_weights: Tensor

    def __init__(
        self, tasks: Sequence[str], *, weights: Mapping[str, float] | Sequence[float] | float = 1.0
    ) -> None:
        super().__init__(tasks)
        vector = per_task_vector(weights, self.tasks, argument="weights")
        if (vector < 0).any():
            raise StrategyError(f"weights must be non-negative, got {vector.tolist()}")
        self.register_buffer("task_weights", vector)

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return self.task_weights[index]


@register_strategy("equal", paper="(baseline) unweighted sum of the task losses")
class Equal(LossWeighting):
    """The plain sum ``sum_i L_i`` (every weight is 1)."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.ones_like(losses)
