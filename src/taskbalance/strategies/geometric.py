"""Geometric loss strategy, GLS (Chennupati, Sistu, Yogamani & Rawashdeh, CVPR Workshops 2019)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.loss_weighting import LossWeighting
from taskbalance.registry import register_strategy


@register_strategy(
    "geometric",
    paper="Chennupati, Sistu, Yogamani & Rawashdeh, 'MultiNet++: Multi-Stream Feature "
    "Aggregation and Geometric Loss Strategy for Multi-Task Learning', CVPR Workshops 2019, "
    "arXiv:1904.08492",
)
class Geometric(LossWeighting):
    """The geometric mean of the task losses (GLS).

    Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019, arXiv:1904.08492.
    With the ``k`` tasks present in the step:

    * objective ``G = (Π_i L_i)^(1/k)``, computed as ``exp(mean_i log L_i)`` so that a product of
      many small losses does not underflow (LibMTL's ``losses.prod() ** (1/k)`` does);
    * its gradient is ``Σ_i w_i ∇L_i`` with ``w_i = G / (k · L_i)``: a task's weight is inversely
      proportional to its loss, so the update does not depend on the scale of any one loss (up
      to the common factor ``G``).

    The losses must be positive; a zero or negative loss raises :class:`StrategyError` naming
    the task. No state and no hyper-parameters. ``s(losses)`` returns ``G``.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("geometric", tasks=["a", "b"])
        >>> s({"a": torch.tensor(2.0), "b": torch.tensor(8.0)})
        tensor(4.)
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return self.objective(losses, index) / (losses.numel() * losses)

    def objective(self, losses: Tensor, index: Tensor) -> Tensor:
        return losses.log().mean().exp()

    def check_losses(self, losses: Tensor, index: Tensor) -> None:
        positive = losses > 0

        def error() -> StrategyError:
            bad = self.first_failing(positive, index)
            assert bad is not None  # built only when the check failed
            name, position = bad
            return StrategyError(
                f"the geometric mean needs positive losses; loss of task {name!r} is "
                f"{losses[position].item()}"
            )

        self.defer_check(positive.all(), error)
