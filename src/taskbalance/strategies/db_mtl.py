"""DB-MTL (Lin et al., 2023): log losses, and averaged gradients scaled to the largest norm."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.registry import register_strategy
from taskbalance.strategies.moco import TrackedGradients


@register_strategy(
    "db_mtl",
    paper="Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, 'Dual-Balancing for Multi-Task "
    "Learning', 2023, arXiv:2308.12029",
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
    are ``1/(L_i + ε)``), as in LibMTL. The reported weights are the ``α_i``. The log is the
    ``transform_losses`` hook: ``aggregate(J, losses)`` takes the rows of the plain losses and
    scales them by ``1/(L_i + ε)`` itself. Under DDP the log is taken of the global mean loss
    (what one process on the global batch computes; before 0.2 it was each rank's own loss).

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
        self.add_state("alphas", torch.ones(len(self.tasks)))

    def check_losses(self, losses: Tensor, index: Tensor) -> None:
        ok = losses + self.eps > 0

        def error() -> StrategyError:
            name, position = self.first_failing(ok, index) or ("?", 0)
            return StrategyError(
                f"db_mtl trains on log(loss + {self.eps}); loss of task {name!r} is "
                f"{losses[position].item():.6g}, which has no logarithm"
            )

        self.defer_check(ok, error)

    def transform_losses(self, losses: Tensor) -> Tensor:
        return torch.log(losses + self.eps)

    def aggregate_rows(
        self,
        jacobian: Tensor,
        losses: Tensor,
        index: Tensor,
        features: Sequence[Tensor] | None = None,
    ) -> Tensor:
        # The rows are those of log(L_i + ε): h_i = g_i / (L_i + ε).
        self.steps[index] += 1
        rates = self.beta / self.steps[index] ** self.beta_sigma
        # ĝ ← β ĝ + (1 − β) h, in place.
        averaged = self._update_tracked(index, jacobian, 1 - rates)
        norms = averaged.norm(dim=1)
        self.alphas[index] = (norms.amax() / (norms + 1e-8)).to(self.alphas.dtype)
        return (self.alphas[index].to(averaged.dtype) @ averaged).to(jacobian.dtype)

    def report_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return self.alphas[index].to(losses.dtype)
