"""CAGrad (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.gradient_aggregation import GradientAggregation, OnFailure
from taskbalance.registry import register_strategy
from taskbalance.solvers import cagrad_solution, solver_dtype

# g_w counts as zero when ‖g_w‖² ≤ 1e-16 (Σ_i w_i ‖g_i‖)², relative to the size of its terms:
# below its rounding error from the Gramian.
_ZERO = 1e-16


@register_strategy(
    "cagrad",
    paper="Liu, Liu, Jin, Stone & Liu, 'Conflict-Averse Gradient Descent for Multi-task "
    "Learning', NeurIPS 2021, arXiv:2110.14048",
)
class CAGrad(GradientAggregation):
    """CAGrad: the best worst-case improvement near the average gradient.

    Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, arXiv:2110.14048. With ``g₀ = (1/T) Σ g_i`` the update solves

        ``max_d min_i g_iᵀ d``   subject to   ``‖d − g₀‖ ≤ c ‖g₀‖``

    through its dual over the simplex (the paper's Sec. 3 and Algorithm 1):
    ``w = argmin_{w ∈ Δ} g_wᵀ g₀ + √φ ‖g_w‖`` with ``g_w = Σ w_i g_i``, ``φ = c² ‖g₀‖²``, and
    ``d = g₀ + (√φ / ‖g_w‖) g_w``. The dual needs only the Gramian; it is solved in torch by
    :func:`taskbalance.solvers.cagrad_weights` (the official code calls scipy's SLSQP every
    step), and ``d`` is a combination of the task gradients, applied with one backward.

    Choices, following the authors' NYUv2/Cityscapes code (``utils.py``):

    * ``c = 0.4`` by default, the value of the paper's image benchmarks (its toy example and
      ``toy.py`` use 0.5; the paper's ``c`` is the code's ``alpha``).
    * ``rescale``: ``1`` (default, as in that code) divides ``d`` by ``1 + c²``; ``2`` by
      ``1 + c``; ``0`` leaves it.
    * The official code multiplies ``d`` by the number of tasks before writing it ("to match
      the sum loss"), so the update has the scale of ``Σ L_i``; so does this one. The task
      weights reported are therefore ``(1 + T·λ·w_i) / rescale`` with ``λ = √φ / ‖g_w‖``,
      ``w`` the exact dual solution (the solver uses no smoothing). Where ``g_w`` vanishes
      (``‖g_w‖² ≤ 1e-16 (Σ_i w_i ‖g_i‖)²``, its rounding error from the Gramian: a
      Pareto-stationary optimum of the dual, which leaves the direction of ``g_w``
      undetermined) ``λ g_w`` is dropped: ``d = T g₀ / rescale`` and every weight is
      ``1 / rescale``, where ``λ`` of order 1e8 would hand the heads enormous weights for a
      shared update that is the same. The official code smooths instead, with 1e-8 under the
      square root of the dual objective and ``λ = √φ / (‖g_w‖ + 1e-8)`` in raw units, so that
      ``d = g₀`` there too (``g_w = 0``).

    ``on_failure`` (default ``"reuse"``): when the dual solver does not converge, the step
    reuses the previous step's dual solution ``w`` (``1/T`` each before any) with this step's
    gradients, warns once and counts the fallback in the report; ``"raise"`` raises
    :class:`~taskbalance.SolverError`. The official code takes whatever SLSQP returns and never
    stops training, hence the default.

    ``c = 0`` gives the sum of the gradients. Scaling: every gradient times ``k > 0`` keeps the
    weights and multiplies the update by ``k``.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("cagrad", tasks=["a", "b"], c=0.5)
        >>> s.gramian_weights(torch.eye(2), torch.ones(2), torch.arange(2))  # (1 + c)/(1 + c²)
        tensor([1.2000, 1.2000])
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        c: float = 0.4,
        rescale: int = 1,
        tol: float | None = None,
        max_iter: int = 200,
        on_failure: OnFailure = "reuse",
    ) -> None:
        super().__init__(tasks)
        self.add_failure_policy(on_failure)
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
            raise StrategyError(f"c must be a finite number >= 0, got {c!r}")
        if rescale not in (0, 1, 2):
            raise StrategyError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        if tol is not None and not (tol > 0):
            raise StrategyError(f"tol must be a positive number, got {tol!r}")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise StrategyError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        self.c = float(c)
        self.rescale = rescale
        self.tol = tol
        self.max_iter = max_iter

    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        count = gramian.shape[0]
        work = gramian.to(solver_dtype(gramian.device))
        dual = self.solved(
            lambda: cagrad_solution(work, self.c, tol=self.tol, max_iter=self.max_iter), index
        ).to(work.dtype)
        mean_norm = work.mean().clamp(min=0).sqrt()  # ‖g₀‖ = √(1ᵀG1) / T
        squared = dual @ work @ dual  # ‖g_w‖²
        vanishes = squared <= _ZERO * (dual @ work.diagonal().clamp(min=0).sqrt()) ** 2
        safe = torch.where(vanishes, torch.ones_like(squared), squared)
        ratio = torch.where(vanishes, torch.zeros_like(squared), mean_norm / safe.sqrt())
        weights = 1 + count * self.c * ratio * dual
        divisor = {0: 1.0, 1: 1 + self.c**2, 2: 1 + self.c}[self.rescale]
        return (weights / divisor).to(gramian.dtype)
