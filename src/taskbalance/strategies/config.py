"""ConFIG (Liu, Chu & Thuerey, ICLR 2025): the conflict-free direction of equal projections."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.registry import register_strategy
from taskbalance.solvers import solver_dtype
from taskbalance.strategies.upgrad import preference_buffer


@register_strategy(
    "config",
    paper="Liu, Chu & Thuerey, 'ConFIG: Towards Conflict-free Training of Physics Informed "
    "Neural Networks', ICLR 2025, arXiv:2408.11104",
)
class ConFIG(GradientAggregation):
    """ConFIG: a direction with equal (positive) cosine to every task gradient, rescaled.

    Qiang Liu, Mengyu Chu & Nils Thuerey, "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", ICLR 2025, arXiv:2408.11104, eq. (2)–(3). With unit rows
    ``U = [g_1/‖g_1‖; …; g_k/‖g_k‖]`` and the preference ``p`` (default all ones),

        g_u = U⁺ p,     ĝ = g_u / ‖g_u‖,     d = (Σ_i g_iᵀ ĝ) · ĝ,

    so ``cos(g_i, d) ∝ p_i``: with equal preference every task improves by the same angle, and
    the length is the sum of the gradients' projections on ``ĝ`` (the official
    ``ProjectionLength``). ``d(sJ) = s·d(J)``.

    As a weighting of the Gramian (exact, not an approximation): ``U⁺ = Uᵀ(UUᵀ)⁺`` and
    ``UUᵀ = D⁻¹ G D⁻¹ = C`` (the cosine matrix, ``D = diag ‖g_i‖``), so
    ``g_u = Jᵀ c`` with ``c = D⁻¹ C⁺ p``, ``‖g_u‖² = cᵀGc`` and

        d = Jᵀ c · (1ᵀ G c) / (cᵀ G c).

    ``C⁺`` is taken from ``torch.linalg.eigh`` with eigenvalues below ``rcond·λ_max`` dropped;
    default ``rcond`` = ``10·k·ε`` of the Gramian's dtype, the accuracy with which ``C`` is known.
    (The official code and TorchJD take the pseudo-inverse of ``U`` itself, ``[k, P]``; the
    results agree where ``U`` has full row rank.) A zero gradient gets weight 0 (its unit vector
    is taken as zero, as in TorchJD); when ``g_u = 0`` (e.g. two opposite gradients) ``d = 0``.
    The official code also offers a momentum variant (M-ConFIG) and a closed form for two tasks
    that equals this one; neither is needed here.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("config", tasks=["a", "b"])
        >>> [round(x, 4) for x in s.aggregate(torch.tensor([[2.0, 0.0], [0.0, 1.0]])).tolist()]
        [1.5, 1.5]
    """

    pref: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        pref_vector: Mapping[str, float] | Sequence[float] | None = None,
        rcond: float | None = None,
    ) -> None:
        super().__init__(tasks)
        if rcond is not None and not (math.isfinite(rcond) and 0 <= rcond < 1):
            raise StrategyError(f"rcond must be a number in [0, 1) or None, got {rcond!r}")
        self.rcond = rcond
        pref = preference_buffer(pref_vector, self.tasks)
        # A constructor argument, not state: kept out of the state_dict.
        self.register_buffer("pref", torch.nan_to_num(pref, nan=1.0), persistent=False)

    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        k = gramian.shape[0]
        rcond = self.rcond if self.rcond is not None else 10 * k * torch.finfo(gramian.dtype).eps
        g = gramian.to(solver_dtype(gramian.device))
        g = 0.5 * (g + g.mT)
        norms = g.diagonal().clamp(min=0).sqrt()
        inverse_norms = torch.where(norms > 0, 1 / norms.clamp(min=torch.finfo(g.dtype).tiny), 0)
        cosines = inverse_norms[:, None] * g * inverse_norms[None, :]
        values, vectors = torch.linalg.eigh(cosines)
        keep = values > rcond * values.amax().clamp(min=0)
        inverse_values = torch.where(keep, 1 / torch.where(keep, values, 1.0), 0.0)
        pref = self.pref[index].to(g.dtype)
        c = inverse_norms * (vectors @ (inverse_values * (vectors.mT @ pref)))
        gc = g @ c
        squared = c @ gc
        scale = torch.where(squared > 0, gc.sum() / torch.where(squared > 0, squared, 1.0), 0.0)
        return (scale * c).to(gramian.dtype)
