"""PCGrad (Yu, Kumar, Gupta, Levine, Hausman & Finn, NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.registry import register_strategy


@register_strategy(
    "pcgrad",
    paper="Yu, Kumar, Gupta, Levine, Hausman & Finn, 'Gradient Surgery for Multi-Task "
    "Learning', NeurIPS 2020, arXiv:2001.06782",
)
class PCGrad(GradientAggregation):
    """PCGrad: project each task gradient off the gradients it conflicts with.

    Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020, arXiv:2001.06782, Algorithm 1. For each task ``i``, starting from
    ``g̃_i = g_i`` and visiting the other tasks ``j`` in a random order:

        if ``g̃_iᵀ g_j < 0``:  ``g̃_i ← g̃_i − (g̃_iᵀ g_j / ‖g_j‖²) g_j``

    (always against the *original* ``g_j``), and the update is ``Σ_i g̃_i``.

    Every projection subtracts a multiple of an original gradient, so ``g̃_i = Σ_j C_ij g_j``
    and the update is ``Σ_j (Σ_i C_ij) g_j``: a combination of the task gradients whose
    coefficients need only the inner products ``g_jᵀ g_l``. They are computed here from the
    Gramian, exactly (``g̃_iᵀ g_j = (C G)_ij``), and the update is one backward of
    ``Σ_j w_j L_j``; so the task heads get ``w_j ∇L_j`` too (the paper leaves heads alone:
    their gradients do not conflict).

    ``reduction``: ``"sum"`` (default: the paper's Algorithm 1, the authors' TensorFlow code
    and TorchJD) or ``"mean"`` (divides by the number of tasks, as some PyTorch ports do).
    The random orders (one independent permutation of the other tasks per task, as in
    Algorithm 1; the authors' code shuffles once for all tasks and also visits ``j = i``) are
    drawn from a CPU ``torch.Generator`` seeded with ``seed``, whose state is a buffer: a
    resumed run draws the same orders. On an accelerator that costs one small copy of the
    generator state to the host per step. For two tasks the order does not matter and the
    result is ``g₁ + g₂`` minus, for a conflicting pair, both projections.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("pcgrad", tasks=["a", "b"])
        >>> s.aggregate(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))  # (½, ½) + (0, 1)
        tensor([0.5000, 1.5000])
    """

    deterministic = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        reduction: Literal["sum", "mean"] = "sum",
        seed: int = 0,
    ) -> None:
        super().__init__(tasks)
        if reduction not in ("sum", "mean"):
            raise StrategyError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.add_random_state(seed)

    def _orders(self, count: int, device: torch.device) -> Tensor:
        """``[count, count − 1]``: row ``i`` is a random order of the tasks other than ``i``."""
        keys = self.draw(lambda generator: torch.rand(count, count, generator=generator))
        keys.fill_diagonal_(2.0)  # self sorts last and is dropped
        return keys.argsort(dim=1)[:, : count - 1].to(device, non_blocking=True)

    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        count = gramian.shape[0]
        orders = self._orders(count, gramian.device)
        squared_norms = gramian.diagonal()
        safe_norms = torch.where(squared_norms > 0, squared_norms, torch.ones_like(squared_norms))
        visited = gramian[orders]  # [i, step]: the row of G of the task i visits at that step
        divisors = safe_norms[orders]
        products = gramian  # C G: row i holds g̃_iᵀ g_l for every task l
        shifts = [gramian.new_zeros(count, 0)]
        for step in range(count - 1):
            other = orders[:, step : step + 1]  # task j visited by each i at this step
            inner = products.gather(1, other)[:, 0]  # g̃_iᵀ g_j = (C G)_ij
            # A zero g_j has inner product 0 and is never projected on.
            shift = torch.where(inner < 0, inner / divisors[:, step], 0.0)
            products = products - shift[:, None] * visited[:, step]  # C_ij -= shift_i
            shifts.append(shift[:, None])
        # Σ_i C_ij: 1 from C = I, minus the shifts of every (i, j) visited
        weights = torch.ones_like(squared_norms).index_add(
            0, orders.flatten(), -torch.cat(shifts, dim=1).flatten()
        )
        return weights / count if self.reduction == "mean" else weights
