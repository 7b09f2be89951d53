"""DualProj (Quinton & Rey, 2024): the mean gradient projected onto the dual cone."""

from __future__ import annotations

from torch import Tensor

from taskbalance.cone import project_solution
from taskbalance.registry import register_strategy
from taskbalance.strategies.upgrad import UPGrad, present_preference


@register_strategy(
    "dualproj",
    paper="Quinton & Rey, 'Jacobian Descent for Multi-Objective Optimization', 2024, "
    "arXiv:2406.16232",
)
class DualProj(UPGrad):
    """DualProj: project the (preference-weighted) mean gradient onto the dual cone.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, arXiv:2406.16232
    (the "DualProj" baseline of the paper, as in TorchJD). With ``C = {v : J v ≥ 0}``,

        d = Π_C(Σ_i p_i g_i) = Jᵀ w(p),   w(p) = argmin_{w ≥ p} ½ wᵀ G w,

    ``p_i = 1/k`` by default. ``J d ≥ 0`` (non-conflicting) and ``d(sJ) = s·d(J)``. When the mean
    conflicts with no task, ``d`` is the mean itself. The arguments ``pref_vector``, ``reg_eps``
    (default ``1e-8``; TorchJD ``1e-4``), ``tol``, ``max_iter`` and ``on_failure`` are those of
    :class:`~taskbalance.strategies.upgrad.UPGrad`, with the same choices.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("dualproj", tasks=["a", "b"])
        >>> J = torch.tensor([[1.0, 0.0], [-2.0, 1.0]])  # mean (-0.5, 0.5) conflicts with g1
        >>> [round(x, 4) + 0.0 for x in s.aggregate(J).tolist()]  # + 0.0 turns -0.0 into 0.0
        [0.0, 0.5]
    """

    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        pref = present_preference(self.pref, index, gramian)
        weights = self.solved(
            lambda: project_solution(
                gramian, pref, reg_eps=self.reg_eps, tol=self.tol, max_iter=self.max_iter
            ),
            index,
        )
        return weights.to(gramian.dtype)
