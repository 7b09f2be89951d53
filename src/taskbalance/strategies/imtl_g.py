"""IMTL-G, the gradient half of Impartial Multi-Task Learning (Liu et al., ICLR 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.registry import register_strategy
from taskbalance.solvers import solver_dtype

PAPER = (
    "Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, 'Towards Impartial Multi-task Learning', "
    "ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr"
)


def imtl_g_weights(gramian: Tensor, *, rcond: float = 1e-10) -> Tensor:
    """IMTL-G weights from the Gramian: ``α ∝ G⁺ n`` with ``n_i = ‖g_i‖``, ``|Σ α_i| = 1``.

    The update ``d = Σ α_i g_i`` has equal projections on every unit gradient,
    ``dᵀ g_i / ‖g_i‖ = c``, i.e. ``G α = c n``. The pseudo-inverse gives the minimum-norm
    ``d`` when the gradients are linearly dependent (duplicate tasks then share the weight
    equally); it is taken of the cosine matrix ``G / (n nᵀ)``, dropping eigenvalues below
    ``rcond`` times the largest, so that the weights do not depend on the gradients' norms
    beyond the exact ``1/n_i`` factor. The normalisation
    divides by ``|1ᵀ G⁺ n|``, not by ``1ᵀ G⁺ n``: the sum can be negative (a task with a tiny
    gradient whose unit direction lies between others), and dividing by it would turn ``d``
    against every task. When the sum is 0 (every gradient zero) the weights are zero.
    Computed in float64 (float32 on MPS).
    """
    work = gramian.to(solver_dtype(gramian.device))
    work = 0.5 * (work + work.mT)
    # G = N C N with N = diag(n) and C the cosine matrix, so G⁺n = N⁻¹ C⁺ 1: working on C keeps
    # a task with a tiny gradient from vanishing below the pseudo-inverse's cut-off. A zero
    # gradient gets weight 0 (its row and column of G⁺ are zero).
    norms = work.diagonal().clamp(min=0).sqrt()
    present = norms > 0
    inverse_norms = torch.where(present, 1 / torch.where(present, norms, 1.0), 0.0)
    cosines = work * torch.outer(inverse_norms, inverse_norms)
    values, vectors = torch.linalg.eigh(cosines)
    keep = values > rcond * values.max().clamp(min=0)
    inverse = torch.where(keep, 1 / torch.where(keep, values, torch.ones_like(values)), 0.0)
    raw = inverse_norms * (vectors @ (inverse * (vectors.mT @ present.to(work.dtype))))
    total = raw.sum()
    # != 0, not abs() > 0: a NaN sum (a non-finite Gramian) must give NaN weights, not zeros
    weights = torch.where(total != 0, raw / total.abs(), torch.zeros_like(raw))
    return weights.to(gramian.dtype)


@register_strategy("imtl_g", paper=PAPER)
class ImtlG(GradientAggregation):
    """IMTL-G: the update whose projections on every unit task gradient are equal.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021 (OpenReview IMPnRXEWpvr; no arXiv version), Sec. 3. With unit gradients
    ``u_i = g_i / ‖g_i‖`` the paper asks for ``d = Σ α_i g_i``, ``Σ α_i = 1``, with
    ``dᵀu_1 = dᵀu_i`` for all ``i``, and gives the closed form
    ``α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹``, ``α_1 = 1 − Σ α_{2:T}`` with rows ``U_i = u_1 − u_i``,
    ``D_i = g_1 − g_i``. The same conditions read ``G α = c n`` (``n_i = ‖g_i‖``), so
    ``α = G⁻¹n / 1ᵀG⁻¹n``: the form used here (as in TorchJD), from the Gramian alone, with the
    pseudo-inverse where the gradients are linearly dependent (the paper's matrix inverse
    fails there). See :func:`imtl_g_weights`.

    Scaling: scaling one task's gradient does not change the direction of ``d`` (only the
    unit gradients enter the conditions); scaling all of them by ``k > 0`` keeps the weights
    and multiplies ``d`` by ``k``.

    The paper updates the task-specific parameters with their own loss gradients; here, as for
    every gradient-level strategy of this package, the heads get ``α_i ∇L_i``.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("imtl_g", tasks=["a", "b"])
        >>> s.aggregate(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))  # α = (¾, ¼)
        tensor([0.7500, 0.7500])
    """

    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        return imtl_g_weights(gramian)
