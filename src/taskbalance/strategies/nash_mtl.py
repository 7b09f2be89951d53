"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, ICML 2022)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from taskbalance.registry import register_strategy
from taskbalance.solvers import nash_weights
from taskbalance.strategy import GradientAggregation, StepReport, StrategyError, scaled_backward


@register_strategy(
    "nash_mtl",
    paper="Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, 'Multi-Task Learning "
    "as a Bargaining Game', ICML 2022, arXiv:2202.01017",
    stateful=True,
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
    (ECOS) problem per step, and keeps the previous ``α`` when the solver fails; LibMTL's copy
    keeps ``α = 1``. Here ``optim_niter`` caps the Newton steps (default 50: well-conditioned
    problems converge in under 10) and a problem without a solution — a zero task gradient,
    two opposite gradients, any non-negative combination of gradients that vanishes — or one
    that does not reach ``tol`` (``max_i |α_i(Gα)_i − 1|``, default 1e-6) raises
    :class:`~taskbalance.StrategyError`. Nothing falls back in silence.

    * ``update_weights_every`` (default 1): solve for ``α`` every that many steps and reuse
      the last weights in between. Steps that reuse them skip the per-task gradients entirely
      (one ordinary backward). The step counter is a buffer; with a value above 1 reading it
      costs one host sync per step. With partial labels a reused step takes the stored
      weights of the tasks present.
    * ``max_norm`` (default 1.0, as in the official code; 0 disables): the official code
      clips the norm of the shared parameters' gradient at ``max_norm`` after the backward.
      Here the clip is folded into the weights, ``α ← α · min(1, max_norm / ‖d‖)``, with
      ``‖d‖² = αᵀGα = Σ_i α_i (Gα)_i = k`` for ``k`` tasks present (exact at the solution,
      to ``tol`` here; ``d`` w.r.t. the tensors passed as ``shared_params`` or ``features``):
      the shared update is the official clipped one (up to ``clip_grad_norm_``'s 1e-6), and
      the task heads get the same factor (the official code leaves them unclipped). So the
      default clip is active for two tasks or more.
    * The weights after clipping are kept in the buffer ``alpha`` (per task) for reuse and
      reported as the task weights.

    Scaling: ``d`` does not change when the gradients are scaled, jointly or per task.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("nash_mtl", tasks=["a", "b"], max_norm=0)
        >>> s.aggregate(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))  # α = (½, 2): d = (1, 1)
        tensor([1., 1.])
    """

    alpha: Tensor
    step: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        update_weights_every: int = 1,
        max_norm: float = 1.0,
        optim_niter: int = 50,
        tol: float = 1e-6,
    ) -> None:
        super().__init__(tasks)
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
        self.register_buffer("alpha", torch.ones(len(self.tasks)))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _reuses(self) -> bool:
        every = self.update_weights_every
        return every > 1 and int(self.step) % every != 0  # one host sync, only when every > 1

    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        if self._reuses():
            self.step += 1
            return self.alpha[index].to(gramian.dtype)
        alpha = nash_weights(gramian, tol=self.tol, max_iter=self.optim_niter)
        if self.max_norm > 0:
            # ‖d‖² = αᵀGα = Σ α_i (Gα)_i = k at the solution (to the solver's tolerance).
            alpha = alpha * min(1.0, self.max_norm / math.sqrt(gramian.shape[0]))
        with torch.no_grad():
            self.alpha[index] = alpha.to(self.alpha.dtype)
            self.step += 1
        return alpha.to(gramian.dtype)

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared_params: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> StepReport:
        if not self._reuses():
            return super().backward(
                losses, shared_params=shared_params, features=features, scaler=scaler
            )
        # A step between updates: the stored weights, no per-task gradients.
        batch = self.gather(losses)
        self._require_graph(batch)
        self._grad_inputs(shared_params, features)  # same argument checks as an update step
        with self.transaction():
            weights = self.alpha[batch.index].to(batch.values.dtype)
            scaled_backward((weights * batch.values).sum(), scaler)
            with torch.no_grad():
                self.step += 1
        return StepReport(batch.names, batch.values.detach(), weights)
