"""DB-MTL (Lin et al., 2023): log losses, and averaged gradients scaled to the largest norm."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar

import torch
from torch import Tensor

from taskbalance.registry import register_strategy
from taskbalance.strategies.moco import TrackedGradients
from taskbalance.strategy import StepReport, StrategyError

# True while ``backward`` runs: the rows it hands to ``_aggregate_rows`` are log-loss gradients.
_LOG_ROWS: ContextVar[bool] = ContextVar("db_mtl_log_rows", default=False)


@register_strategy(
    "db_mtl",
    paper="Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, 'Dual-Balancing for Multi-Task "
    "Learning', 2023, arXiv:2308.12029",
    stateful=True,
)
class DBMTL(TrackedGradients):
    """DB-MTL: log-transformed losses, then every task's (averaged) gradient scaled to the largest.

    Baijiong Lin, Weisen Jiang, Feiyang Ye, Yu Zhang, Pengguang Chen, Ying-Cong Chen, Shu Liu &
    James T. Kwok, "Dual-Balancing for Multi-Task Learning", 2023, arXiv:2308.12029, Algorithm 1:

    * loss-scale balancing: train on ``log(L_i + ε)``, whose gradient is ``h_i = g_i/(L_i + ε)``;
    * an exponential moving average of those gradients, ``ĝ_i ← β_t ĝ_i + (1 − β_t) h_i``,
      ``β_t = beta / t^beta_sigma``, ``ĝ`` starting at zero;
    * gradient-magnitude balancing: ``d = Σ_i α_i ĝ_i`` with
      ``α_i = max_j ‖ĝ_j‖ / (‖ĝ_i‖ + 1e-8)``.

    Defaults are LibMTL's (the authors' library): ``beta = 0.9``, ``beta_sigma = 0`` (a constant
    ``β``), ``eps = 1e-8``. ``d`` depends on past gradients, so it is written into the gradient
    reaching the shared tensors; the heads get the gradient of ``log(L_i + ε)`` (their weights
    are ``1/(L_i + ε)``), as in LibMTL. The reported weights are the ``α_i``.

    A loss with ``L_i + ε ≤ 0`` has no logarithm: :class:`~taskbalance.StrategyError`
    naming the task. State: ``tracked`` (``ĝ``, ``[T, P]``, sized at the first step, see
    :class:`~taskbalance.strategies.moco.TrackedGradients`), per-task step counts ``steps`` and
    the last ``alphas`` (reported);
    with partial labels only the present tasks' rows change and ``α`` is taken over them.
    """

    alphas: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks)
        if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
            raise StrategyError(f"beta must be a number in [0, 1), got {beta!r}")
        if not (isinstance(beta_sigma, (int, float)) and math.isfinite(beta_sigma)):
            raise StrategyError(f"beta_sigma must be a finite number, got {beta_sigma!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise StrategyError(f"eps must be a finite number >= 0, got {eps!r}")
        self.beta, self.beta_sigma, self.eps = float(beta), float(beta_sigma), float(eps)
        self.register_buffer("alphas", torch.ones(len(self.tasks)))

    def _aggregate_rows(
        self,
        jacobian: Tensor,
        losses: Tensor,
        index: Tensor,
        features: Sequence[Tensor] | None = None,
    ) -> Tensor:
        if _LOG_ROWS.get():
            scales = torch.ones(index.numel(), dtype=jacobian.dtype, device=jacobian.device)
        else:  # rows of the plain losses: ∇log(L_i + ε) = g_i / (L_i + ε)
            self._check_logarithm([self.tasks[i] for i in index.tolist()], losses)
            scales = 1 / (losses.to(jacobian.dtype) + self.eps)
        self.steps[index] += 1
        rates = self.beta / self.steps[index] ** self.beta_sigma
        # ĝ ← β ĝ + (1 − β) h, in place.
        averaged = self._update_tracked(index, jacobian, rates, (1 - rates) * scales)
        norms = averaged.norm(dim=1)
        self.alphas[index] = (norms.amax() / (norms + 1e-8)).to(self.alphas.dtype)
        return (self.alphas[index].to(averaged.dtype) @ averaged).to(jacobian.dtype)

    def _check_logarithm(self, names: Sequence[str], losses: Tensor) -> None:
        positive = losses + self.eps > 0
        if not bool(positive.all()):  # a host sync, needed to name the task
            bad = names[positive.tolist().index(False)]
            raise StrategyError(
                f"db_mtl trains on log(loss + {self.eps}); loss of task {bad!r} is "
                f"{losses[list(names).index(bad)].item():.6g}, which has no logarithm"
            )

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared_params: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> StepReport:
        batch = self.gather(losses)
        detached = batch.values.detach()
        self._check_logarithm(batch.names, detached)
        # L_i / stopgrad(L_i + ε) has the gradient of log(L_i + ε): the heads get it, and the
        # per-task rows the base class computes are the log-loss gradients.
        scaled = {
            name: losses[name] / (value + self.eps) for name, value in zip(batch.names, detached)
        }
        token = _LOG_ROWS.set(True)
        try:
            report = super().backward(
                scaled, shared_params=shared_params, features=features, scaler=scaler
            )
        finally:
            _LOG_ROWS.reset(token)
        return StepReport(report.tasks, detached, self.alphas[batch.index].to(detached.dtype))
