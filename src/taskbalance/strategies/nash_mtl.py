"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, ICML 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.gradient_aggregation import (
    GradientAggregation,
    OnFailure,
)
from taskbalance.registry import register_strategy
from taskbalance.solvers import nash_solution


@register_strategy(
    "nash_mtl",
    paper="Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, 'Multi-Task Learning "
    "as a Bargaining Game', ICML 2022, arXiv:2202.01017",
)
class NashMTL(GradientAggregation):
    """Nash-MTL: the Nash bargaining solution among the tasks.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022, arXiv:2202.01017. The update ``d = Σ α_i g_i`` with ``α > 0``
    solving (the paper's Sec. 3)

        ``(G α)_i = 1 / α_i``  for every task,  i.e.  ``g_iᵀ d = 1 / α_i > 0``

    so every task improves (no conflict), and the result is invariant to rescaling any single
    task's loss (``g_i → k_i g_i`` gives ``α_i → α_i / k_i`` and the same ``d``). Before
    clipping, ``‖d‖² = αᵀGα = T``.

    The system is solved in torch by :func:`taskbalance.solvers.nash_weights`: Newton's method
    on the convex ``½ αᵀGα − Σ log α_i`` (closed form ``α_i = 1/(‖g_i‖√(1 + cos θ))`` for two
    tasks). The official code runs ``optim_niter = 20`` concave-convex iterations of a cvxpy
    (ECOS) problem per step. Here ``optim_niter`` caps the Newton steps (default 50:
    well-conditioned problems converge in under 10), and ``tol`` is the accepted residual
    ``max_i |α_i(Gα)_i − 1|`` (default 1e-6).

    * ``on_failure`` (default ``"reuse"``): the problem has no solution when a non-negative
      combination of the task gradients vanishes (a zero gradient, two opposite gradients — as
      at a Pareto front), or the solver may not reach ``tol``. ``"reuse"`` then takes the
      previous step's ``α`` (``α = 1`` before any solution), warns once and counts the fallback
      in the report (``failed``, ``failures``), as the official code keeps its previous ``α``
      when ECOS fails (it starts from ``α = 1``) and goes on training; hence the default.
      ``"raise"`` raises :class:`~taskbalance.SolverError`. (LibMTL's copy silently keeps
      ``α = 1``.)
    * ``update_weights_every`` (default 1): solve for ``α`` every that many steps and reuse
      the last solution in between, as the official code does. A step that reuses it takes no
      per-task gradients: one backward of ``Σ α_i L_i``, then the clip. The step counter is a
      buffer (saved with the state); the host keeps a copy of it, read from the buffer only
      when something else wrote it (a restored or loaded state), so the decision costs no host
      sync in a run. With partial labels a reused step takes the stored ``α`` of the tasks
      present (``α = 1`` for all of them if one has none yet).
    * ``max_norm`` (default 1.0, as in the official code; 0 disables): the official code calls
      ``clip_grad_norm_(shared_parameters, max_norm)`` after every backward, reused weights
      included, and so does the engine: this step's gradient of the shared parameters (of
      ``shared_params``, or on ``features=`` the parameters the features are computed from) is
      scaled by ``min(1, max_norm / (‖d‖ + 1e-6))``; the heads keep ``α_i ∇L_i``. Gradients
      accumulated before the step keep their size. The clip is active whenever ``‖d‖ > 1``: at
      the bargaining solution ``‖d‖² = αᵀGα = k``. On ``features=`` ``α`` comes from the
      features' Gramian and scales as ``1/‖g‖`` of their gradients, so the heads' update differs
      from the official one by about the ratio of the two gradient norms; pass
      ``shared_params`` to reproduce the paper. ``combine(features=...)`` refuses a clip.
    * The reported task weights and the stored solution (buffer ``last_weights``) are ``α``.

    Scaling: ``d`` does not change when the gradients are scaled, jointly or per task.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("nash_mtl", tasks=["a", "b"], max_norm=0)
        >>> s.aggregate(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))  # α = (½, 2): d = (1, 1)
        tensor([1., 1.])
    """

    step: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        update_weights_every: int = 1,
        max_norm: float = 1.0,
        optim_niter: int = 50,
        tol: float = 1e-6,
        on_failure: OnFailure = "reuse",
    ) -> None:
        super().__init__(tasks)
        self.add_failure_policy(on_failure)
        if not (isinstance(update_weights_every, int) and update_weights_every >= 1):
            raise StrategyError(
                f"update_weights_every must be an integer >= 1, got {update_weights_every!r}"
            )
        if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm >= 0):
            raise StrategyError(f"max_norm must be a finite number >= 0, got {max_norm!r}")
        if not (isinstance(optim_niter, int) and optim_niter >= 1):
            raise StrategyError(f"optim_niter must be an integer >= 1, got {optim_niter!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise StrategyError(f"tol must be a positive number, got {tol!r}")
        self.update_weights_every = update_weights_every
        self.max_norm = float(max_norm)
        self.optim_niter = optim_niter
        self.tol = float(tol)
        self.add_state("step", torch.zeros((), dtype=torch.long), per_task=False)
        self._host_copy: tuple[Tensor | None, int, int] = (None, 0, 0)

    def _host_step(self) -> int:
        """The step counter, from the host's copy while the buffer is the tensor this strategy
        last saw (same object, same version); otherwise read from the buffer (one host sync:
        after a restored or loaded state, or a move to another device)."""
        buffer, version, value = self._host_copy
        if buffer is not self.step or buffer._version != version:
            value = int(self.step)
            self._host_copy = (self.step, self.step._version, value)
        return value

    def _count_step(self) -> None:
        if self.update_weights_every == 1:  # never read in a step
            self.step += 1
            return
        value = self._host_step()
        self.step += 1
        self._host_copy = (self.step, self.step._version, value + 1)

    def reused_weights(self, losses: Tensor, index: Tensor) -> Tensor | None:
        every = self.update_weights_every
        if every == 1 or self._host_step() % every == 0:
            return None
        self._count_step()
        return self.previous_weights(index, equal="sum")

    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        self._count_step()
        return self.solved(
            lambda: nash_solution(gramian, tol=self.tol, max_iter=self.optim_niter),
            index,
            equal="sum",
        )
