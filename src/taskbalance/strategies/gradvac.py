"""Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.registry import register_strategy
from taskbalance.solvers import solver_dtype


@register_strategy(
    "gradvac",
    paper="Wang, Tsvetkov, Firat & Cao, 'Gradient Vaccine: Investigating and Improving "
    "Multi-task Optimization in Massively Multilingual Models', ICLR 2021, arXiv:2010.05874",
)
class GradVac(GradientAggregation):
    """GradVac: raise each pair's gradient cosine to an adaptive target, PCGrad-style.

    Zirui Wang, Yulia Tsvetkov, Orhan Firat & Yuan Cao, "Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021,
    arXiv:2010.05874, Algorithm 1. Each task ``i`` starts from ``g_i' = g_i`` and visits the other
    tasks ``j`` in random order; with ``φ_ij = cos(g_i', g_j)`` and the target ``φ̂_ij``:

    * if ``φ_ij < φ̂_ij``:  ``g_i' ← g_i' + a·g_j`` with
      ``a = ‖g_i'‖ (φ̂_ij √(1 − φ_ij²) − φ_ij √(1 − φ̂_ij²)) / (‖g_j‖ √(1 − φ̂_ij²))``
      (eq. 3), which makes ``cos(g_i', g_j) = φ̂_ij``;
    * ``φ̂_ij ← (1 − β) φ̂_ij + β φ_ij`` (the exponential moving average of the cosine,
      starting at 0);

    and the update is ``d = Σ_i g_i'``. With ``φ̂ = 0`` the correction is PCGrad's projection.

    Every ``g_i'`` stays a combination ``Σ_k C_ik g_k`` of the original gradients, and the
    quantities the rule needs (``g_i'·g_j``, ``‖g_i'‖``) are ``(C G)_ij`` and ``(C G Cᵀ)_ii``: so
    this is an exact weighting of the Gramian, ``w = Σ_i C_i``, and ``backward`` finishes with one
    backward of ``Σ_i w_i L_i``. The ``k`` tasks' sweeps are independent and run side by side
    (``k − 1`` vectorised rounds).

    Choices and reference code:

    * ``beta = 0.01``: the paper's value. LibMTL and TorchJD default to 0.5.
    * ``φ̂_ij`` is updated after every comparison, corrected or not, as in the paper's
      Algorithm 1 and TorchJD's ``GradVac``. LibMTL's copies differ between versions: the ones
      read for this text (``LibMTL/weighting/GradVac.py`` at commit 13f5fc7 and earlier) update
      it only inside the correction branch, and newer LibMTL is reported to update it after
      every comparison, as here. Check the version you compare against.
    * Granularity: one target per task pair over the whole shared tensor set (LibMTL's default
      ``group_type=0``; the paper also applies it per layer).
    * ``eps`` (1e-8) floors ``√(1 − φ̂²)`` so a target of ±1 does not divide by zero; a pair
      where either gradient is zero is skipped and its target left unchanged.
    * The random order comes from a CPU generator seeded with ``seed``; its state is a buffer,
      so a resumed run draws the same orders. Targets are kept in the ``targets`` buffer
      ``[T, T]``; with partial labels only the present pairs change.
    """

    targets: Tensor

    deterministic = False

    def __init__(
        self, tasks: Sequence[str], *, beta: float = 0.01, eps: float = 1e-8, seed: int = 0
    ) -> None:
        super().__init__(tasks)
        if not (isinstance(beta, (int, float)) and 0 < beta <= 1):
            raise StrategyError(f"beta must be a number in (0, 1], got {beta!r}")
        if not (math.isfinite(eps) and eps > 0):
            raise StrategyError(f"eps must be a positive finite number, got {eps!r}")
        self.beta, self.eps = float(beta), eps
        count = len(self.tasks)
        self.add_state("targets", torch.zeros(count, count))
        self.add_random_state(seed)

    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        k = gramian.shape[0]
        dtype = solver_dtype(gramian.device)
        g = gramian.to(dtype)
        device = g.device
        keys = self.draw(lambda generator: torch.rand(k, k, generator=generator))
        if k == 1:  # no pair to compare (drawn all the same: the generator moves every step)
            return gramian.new_ones(1)
        keys = keys.to(device, non_blocking=True)
        # Row i: the other tasks in random order (the diagonal key 2 sorts i itself last).
        order = keys.masked_fill(torch.eye(k, dtype=torch.bool, device=device), 2.0).argsort(1)
        order = order[:, : k - 1]
        targets = self.targets[index[:, None], index[None, :]].to(dtype)
        # Per round r, once for all rounds: the partner's row of G, its squared norm, the target
        # and what depends on them alone; round-major, so that round r reads contiguous rows.
        partner_rows = g[order].transpose(0, 1)  # [k − 1, k, k]
        partner_squares = g.diagonal()[order]
        partner_targets = targets.gather(1, order)
        partner_live = partner_squares > 0
        partner_norms = partner_squares.clamp(min=0).sqrt()
        sin_targets = (1 - partner_targets**2).clamp(min=0).sqrt().clamp(min=self.eps)
        divisors = torch.where(partner_live, partner_norms, 1.0) * sin_targets
        per_task = (partner_targets, partner_live, partner_norms, partner_squares, sin_targets)
        rounds = zip(
            order.mT.unbind(0),
            *(x.mT.unbind(0) for x in (*per_task, divisors)),
            partner_rows.unbind(0),
        )
        zero, one = g.new_zeros(()), g.new_ones(())
        dots = g  # dots[i, j] = g_i'·g_j
        squares = g.diagonal()  # ‖g_i'‖²
        steps, cosines, valids = [], [], []
        # Launch-bound (k − 1 rounds of [k]-sized work): few kernels per round.
        for partner, target, live, partner_norm, partner_square, sin_target, divisor, row in rounds:
            dot = dots.gather(1, partner[:, None])[:, 0]
            norm = squares.clamp(min=0).sqrt()
            valid = (norm > zero) & live  # a tensor, not 0: a Python scalar costs a copy
            cosine = torch.where(valid, dot / (norm * partner_norm), zero).clamp_(-1.0, 1.0)
            sin_cosine = torch.addcmul(one, cosine, cosine, value=-1).clamp_(min=0).sqrt_()
            step = torch.addcmul(target * sin_cosine, cosine, sin_target, value=-1)
            step = torch.where(valid & (cosine < target), step.mul_(norm).div_(divisor), zero)
            # ‖g_i' + a g_j‖² = ‖g_i'‖² + a (2 g_i'·g_j + a ‖g_j‖²)
            squares = torch.addcmul(squares, step, torch.addcmul(dot + dot, step, partner_square))
            dots = torch.addcmul(dots, step[:, None], row)
            steps.append(step)
            cosines.append(cosine)
            valids.append(valid)
        # φ̂ ← (1 − β) φ̂ + β φ for the pairs compared, all rounds at once
        emas = torch.where(
            torch.stack(valids, 1),
            (1 - self.beta) * partner_targets + self.beta * torch.stack(cosines, 1),
            partner_targets,
        )
        coefficients = torch.eye(k, dtype=dtype, device=device).scatter_add(
            1, order, torch.stack(steps, 1)
        )
        updated = targets.scatter(1, order, emas)
        with torch.no_grad():
            self.targets[index[:, None], index[None, :]] = updated.to(self.targets.dtype)
        return coefficients.sum(0).to(gramian.dtype)
