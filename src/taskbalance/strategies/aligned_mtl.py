"""Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, CVPR 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.registry import register_strategy
from taskbalance.solvers import solver_dtype

ScaleMode = Literal["min", "median", "rmse"]


def aligned_weights(gramian: Tensor, scale_mode: ScaleMode = "min") -> Tensor:
    """Aligned-MTL weights ``B 1`` with ``B = √λ_s · V Λ^(−½) Vᵀ`` over the non-null spectrum.

    ``G = V Λ Vᵀ`` (``torch.linalg.eigh``). Eigenvalues at or below
    ``λ_max · k · eps(G.dtype)`` (the official code's rank tolerance) are treated as zero:
    their directions are dropped (``Λ^(−½)`` is taken on the rest only), which handles
    duplicate, dependent and zero gradients. ``λ_s`` is the smallest kept eigenvalue
    (``"min"``), their median (``"median"``, the lower one for an even count, as
    ``torch.median``) or their mean (``"rmse"``: ``√λ_s`` is the root mean square singular
    value). Every gradient zero: the weights are zero.
    """
    count = gramian.shape[0]
    tolerance_eps = torch.finfo(gramian.dtype).eps
    work = gramian.to(solver_dtype(gramian.device))
    work = 0.5 * (work + work.mT)
    scale = work.diagonal().max()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values, vectors = torch.linalg.eigh(work / scale)  # ascending; weights are scale-free
    keep = values > values.max().clamp(min=0) * count * tolerance_eps
    kept = keep.sum()
    if scale_mode == "min":
        target = torch.where(keep, values, torch.full_like(values, torch.inf)).min()
    elif scale_mode == "median":
        # Kept eigenvalues are the top `kept` of the ascending list; torch.median's lower
        # median is the ((kept − 1) // 2)-th of them counted from the smallest kept.
        position = (count - kept + (kept - 1).clamp(min=0) // 2).clamp(max=count - 1)
        target = values[position]
    else:
        target = torch.where(keep, values, 0.0).sum() / kept.clamp(min=1)
    inverse_root = torch.where(keep, torch.where(keep, values, 1.0).rsqrt(), 0.0)
    factor = torch.where(kept > 0, target.clamp(min=0).sqrt(), 0.0)
    weights = factor * (vectors @ (inverse_root * vectors.sum(dim=0)))  # B 1
    return weights.to(gramian.dtype)


@register_strategy(
    "aligned_mtl",
    paper="Senushkin, Patakin, Kuznetsov & Konushin, 'Independent Component Alignment for "
    "Multi-Task Learning', CVPR 2023, arXiv:2305.19000",
)
class AlignedMTL(GradientAggregation):
    """Aligned-MTL: make the task gradients orthogonal and of equal norm, then sum them.

    Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023, arXiv:2305.19000. The gradient matrix ``J`` (rows ``g_i``) is
    replaced by the closest matrix ``Ĵ = B J`` with orthogonal rows of equal norm
    (``Ĵ Ĵᵀ = λ_s I`` on the non-null part, i.e. condition number 1), from the Gramian's
    eigendecomposition ``G = V Λ Vᵀ``:

        ``B = √λ_s · V Λ^(−½) Vᵀ``,   update ``d = Σ_i ĝ_i = Jᵀ B 1``

    so the weights are ``B 1``. ``scale_mode`` picks ``λ_s``: ``"min"`` (default, the paper
    and the authors' code: the smallest non-zero eigenvalue), ``"median"``, ``"rmse"`` (the
    mean eigenvalue), as in the authors' code. The eigendecomposition is
    ``torch.linalg.eigh`` (the authors' code and LibMTL call ``torch.symeig``, which recent
    torch no longer has). Rank deficiency is explicit: eigenvalues below the authors' rank
    tolerance are dropped, see :func:`aligned_weights`.

    With ``features=`` this is the paper's Aligned-MTL-UB (the gradients of the shared
    representation). Scaling: every gradient times ``k > 0`` keeps the weights and multiplies
    ``d`` by ``k``.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("aligned_mtl", tasks=["a", "b"])
        >>> s.aggregate(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))  # λ = (4, 1), λ_s = 1
        tensor([1., 1.])
    """

    def __init__(self, tasks: Sequence[str], *, scale_mode: ScaleMode = "min") -> None:
        super().__init__(tasks)
        if scale_mode not in ("min", "median", "rmse"):
            raise StrategyError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        self.scale_mode = scale_mode

    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        return aligned_weights(gramian, self.scale_mode)
