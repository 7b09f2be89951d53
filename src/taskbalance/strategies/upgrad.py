"""UPGrad (Quinton & Rey, 2024): average of the task gradients projected onto the dual cone."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from taskbalance.cone import project_solution
from taskbalance.errors import StrategyError
from taskbalance.gradient_aggregation import GradientAggregation, OnFailure
from taskbalance.registry import register_strategy
from taskbalance.solvers import Solution
from taskbalance.validation import per_task_vector


def check_cone_arguments(reg_eps: float, tol: float, max_iter: int) -> None:
    """Argument checks shared by UPGrad and DualProj."""
    if not (math.isfinite(reg_eps) and reg_eps >= 0):
        raise StrategyError(f"reg_eps must be a finite number >= 0, got {reg_eps!r}")
    if not (math.isfinite(tol) and tol > 0):
        raise StrategyError(f"tol must be a positive finite number, got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise StrategyError(f"max_iter must be an integer >= 1, got {max_iter!r}")


def preference_buffer(
    pref_vector: Mapping[str, float] | Sequence[float] | None, tasks: Sequence[str]
) -> Tensor:
    """The preference per task; NaN marks "not given" (then the mean over present tasks)."""
    if pref_vector is None:
        return torch.full((len(tasks),), math.nan)
    vector = per_task_vector(pref_vector, tasks, argument="pref_vector")
    if (vector < 0).any():
        raise StrategyError(f"pref_vector must be non-negative, got {vector.tolist()}")
    return vector


def present_preference(pref: Tensor, index: Tensor, like: Tensor) -> Tensor:
    """``pref`` on the present tasks, or ``1/k`` each when no preference was given."""
    chosen = pref[index].to(like.dtype)
    return torch.where(torch.isnan(chosen), 1.0 / index.numel(), chosen)


@register_strategy(
    "upgrad",
    paper="Quinton & Rey, 'Jacobian Descent for Multi-Objective Optimization', 2024, "
    "arXiv:2406.16232",
)
class UPGrad(GradientAggregation):
    """UPGrad: project every task gradient onto the dual cone, then average the projections.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, arXiv:2406.16232.
    With ``J`` the Jacobian (rows ``g_i``) and ``C = {v : J v ≥ 0}`` its dual cone (the directions
    that conflict with no task),

        d = Σ_i p_i · Π_C(g_i),         p_i = 1/k by default (the mean),

    where ``Π_C(Jᵀu) = Jᵀw(u)`` with ``w(u) = argmin_{w ≥ u} ½ wᵀ G w``, ``G = J Jᵀ``
    (:func:`taskbalance.cone.project_weights`). So ``d = Jᵀ Σ_i p_i w(e_i)``: a weighting of the
    Gramian, and ``backward`` finishes with one backward of ``Σ_i w_i L_i``. Properties from the
    paper: ``J d ≥ 0`` (non-conflicting), ``d`` is a non-negative combination of the gradients
    (``w ≥ p ≥ 0``), and ``d`` is positively homogeneous in ``J``: ``d(sJ) = s·d(J)``.

    Arguments (TorchJD's ``UPGrad`` has the same three knobs):

    * ``pref_vector``: the ``p_i`` (mapping, sequence, or one number); default ``None`` = the mean
      over the tasks present in the step. A given preference is used as is on the present tasks.
    * ``reg_eps`` (default ``1e-8``): ``G/tr(G) + reg_eps·I`` is used, which makes the weights
      unique when gradients are dependent; the admitted conflict is
      ``g_i·d ≥ −reg_eps·tr(G)·w_i``. TorchJD uses ``1e-4``; ``1e-8`` keeps the promised
      no-conflict property much tighter while still making the problem strictly convex.
    * ``tol`` (``1e-7``), ``max_iter`` (``100``): the QP solver's relative KKT tolerance and
      iteration cap. An unconverged solve is a failure: ``on_failure="reuse"`` (default) takes
      the previous step's weights (the mean before any solution), warns once and counts it in
      the report; ``"raise"`` raises :class:`~taskbalance.SolverError`. TorchJD's quadprog
      solver raises; the default here keeps training going as the MGDA, CAGrad and Nash-MTL
      reference code does, and says so.

    TorchJD's ``norm_eps`` (a Gramian with trace below an absolute threshold is treated as zero)
    is not adopted: it makes the result depend on the scale of the losses. A zero Gramian gives
    the plain mean.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("upgrad", tasks=["a", "b"])
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # conflicting gradients
        >>> d = s.aggregate(J)
        >>> [round(x, 4) for x in d.tolist()]  # mean of (0.5, 0.5) and (0, 1)
        [0.25, 0.75]
        >>> bool((J @ d >= 0).all())
        True
    """

    pref: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        pref_vector: Mapping[str, float] | Sequence[float] | None = None,
        reg_eps: float = 1e-8,
        tol: float = 1e-7,
        max_iter: int = 100,
        on_failure: OnFailure = "reuse",
    ) -> None:
        super().__init__(tasks)
        self.add_failure_policy(on_failure)
        check_cone_arguments(reg_eps, tol, max_iter)
        self.reg_eps, self.tol, self.max_iter = reg_eps, tol, max_iter
        # A constructor argument, not state: kept out of the state_dict.
        self.register_buffer("pref", preference_buffer(pref_vector, self.tasks), persistent=False)

    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        pref = present_preference(self.pref, index, gramian)

        def solve() -> Solution:
            projected = project_solution(
                gramian, torch.diag(pref), reg_eps=self.reg_eps, tol=self.tol,
                max_iter=self.max_iter,
            )  # fmt: skip
            return projected._replace(weights=projected.weights.sum(0))

        return self.solved(solve, index).to(gramian.dtype)
