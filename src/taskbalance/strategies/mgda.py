"""MGDA / MGDA-UB (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.gradient_aggregation import GradientAggregation, OnFailure
from taskbalance.registry import register_strategy
from taskbalance.solvers import min_norm_solution

Normalization = Literal["none", "l2", "loss", "loss+"]
_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@register_strategy(
    "mgda",
    paper="Sener & Koltun, 'Multi-Task Learning as Multi-Objective Optimization', NeurIPS 2018, "
    "arXiv:1810.04650",
)
class MGDA(GradientAggregation):
    """MGDA: the min-norm point of the convex hull of the task gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    arXiv:1810.04650. The multiple-gradient descent direction is ``d = Σ w_i g_i`` with

        ``w = argmin_{w ∈ Δ} ‖Σ_i w_i g_i‖²``      (Δ: the probability simplex)

    Either ``d = 0`` (the point is Pareto-stationary) or ``g_iᵀ d ≥ ‖d‖² > 0`` for every task:
    the step decreases every loss to first order. Two tasks have the closed form
    ``w₁ = clip((g₂ − g₁)ᵀg₂ / ‖g₁ − g₂‖², 0, 1)`` (the paper's Algorithm 1); more tasks are
    solved by :func:`taskbalance.solvers.min_norm_weights` in torch (the paper uses Frank–Wolfe;
    here a primal-dual interior-point method that also solves the problem exactly on the face
    its iterates approach, accepted on optimality conditions measured per task in units of that
    task's gradient norm, so gradients of very different sizes get the exact min-norm point; an
    unconverged solve is a failure handled by ``on_failure``, never returned as the answer).

    ``normalization`` rescales the gradients before the weights are solved for, as the
    authors' code does (it is not in the paper): ``"none"`` (the default: the paper's method),
    ``"l2"`` (``g_i / ‖g_i‖``), ``"loss"`` (``g_i / L_i``), ``"loss+"`` (``g_i / (L_i ‖g_i‖)``).
    As in that code, the weights found for the normalised gradients multiply the raw losses,
    so with a normalisation the no-conflict guarantee holds for the normalised gradients, not
    for the update. The authors' sample configuration uses ``"loss+"``; Nash-MTL's and
    LibMTL's copies default to ``"none"``, as here. ``"loss"``/``"loss+"`` need positive
    losses.

    The weights lie on the simplex (they sum to 1, like the paper and the authors' code;
    Nash-MTL's copy multiplies them by the number of tasks). With ``features=`` the gradients
    are taken w.r.t. the shared representation: that is MGDA-UB, the paper's upper-bound
    approximation (Sec. 3.3), one backward per task through the heads only.

    ``on_failure`` (default ``"reuse"``): when the solver does not reach ``tol`` in
    ``max_iter`` iterations, the step takes the previous step's weights (equal weights before
    any solution), warns once and counts the fallback in the report; ``"raise"`` raises
    :class:`~taskbalance.SolverError` instead. The default follows the authors' code, whose
    Frank–Wolfe loop returns its last iterate at the iteration cap and never stops training.

    Scaling: multiplying every gradient by ``k > 0`` keeps the weights and multiplies the
    update by ``k``.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("mgda", tasks=["a", "b"])
        >>> s.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # w = (0.8, 0.2)
        tensor([0.8000, 0.4000])
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        normalization: Normalization = "none",
        tol: float | None = None,
        max_iter: int = 200,
        on_failure: OnFailure = "reuse",
    ) -> None:
        super().__init__(tasks)
        self.add_failure_policy(on_failure)
        if normalization not in _NORMALIZATIONS:
            raise StrategyError(
                f"normalization must be one of {list(_NORMALIZATIONS)}, got {normalization!r}"
            )
        if tol is not None and not (tol > 0):
            raise StrategyError(f"tol must be a positive number, got {tol!r}")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise StrategyError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        self.normalization = normalization
        self.tol = tol
        self.max_iter = max_iter

    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        norms = gramian.diagonal().clamp(min=0).sqrt()
        if self.normalization == "none":
            scale = None
        elif self.normalization == "l2":
            scale = norms
        else:
            losses = losses.to(gramian.dtype)
            self.defer_check(
                losses > 0,
                lambda: StrategyError(
                    f"normalization={self.normalization!r} needs positive losses, got {losses}"
                ),
            )
            scale = losses if self.normalization == "loss" else losses * norms
        if scale is not None:
            # A zero gradient stays zero: divide by 1 there.
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            gramian = gramian / torch.outer(scale, scale)
        weights = self.solved(
            lambda: min_norm_solution(gramian, tol=self.tol, max_iter=self.max_iter), index
        )
        return weights.to(gramian.dtype)
