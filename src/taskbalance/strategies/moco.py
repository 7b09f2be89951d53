"""MoCo (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, ICLR 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.registry import register_strategy


def project_to_simplex(vector: Tensor) -> Tensor:
    """Euclidean projection of ``vector`` ``[k]`` onto ``{x ≥ 0, Σ x = 1}`` (sort-based, no sync).

    >>> import torch
    >>> project_to_simplex(torch.tensor([0.5, 0.9, -1.0])).tolist()
    [0.30000001192092896, 0.699999988079071, 0.0]
    """
    ordered, _ = vector.sort(descending=True)
    cumulative = ordered.cumsum(0) - 1
    ranks = torch.arange(1, vector.numel() + 1, device=vector.device, dtype=vector.dtype)
    support = ordered - cumulative / ranks > 0  # true on a prefix
    count = (support.to(ranks.dtype) * ranks).amax().clamp(min=1)
    theta = cumulative.gather(0, (count - 1).long().reshape(1)) / count
    return (vector - theta).clamp(min=0)


class TrackedGradients(GradientAggregation):
    """Base for strategies that keep a running per-task gradient ``[T, P]`` in a buffer.

    ``P`` is known only at the first step, so the state ``tracked`` starts empty and is sized
    then (``load_state_dict`` resizes it to the saved shape, see :meth:`Strategy.add_state`). A
    later step with another ``P`` (say ``features=`` with a smaller last batch) raises
    :class:`~taskbalance.StrategyError`.
    """

    tracked: Tensor
    steps: Tensor

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.add_state("tracked", torch.zeros(0, 0))
        self.add_state("steps", torch.zeros(len(self.tasks)))

    def _tracked(self, jacobian: Tensor) -> Tensor:
        size = jacobian.shape[1]
        if self.tracked.numel() == 0:
            # Zeros are the initial value, so sizing the buffer changes no state.
            self.tracked = torch.zeros(
                len(self.tasks), size, dtype=jacobian.dtype, device=jacobian.device
            )
        elif self.tracked.shape[1] != size:
            raise StrategyError(
                f"{type(self).__name__} keeps a running average of each task's gradient with "
                f"{self.tracked.shape[1]} entries, but this step's gradients have {size}: use "
                "shared_params= or batches of a fixed size (drop_last=True) with features="
            )
        return self.tracked

    def _update_tracked(
        self, index: Tensor, jacobian: Tensor, weight: Tensor, scale: Tensor | None = None
    ) -> Tensor:
        """Rows ``index`` of the running gradients move towards ``h_i = scale_i·jacobian_i``
        (``jacobian_i`` without ``scale``) by ``weight`` (one per row), ``y_i ← y_i + w_i (h_i −
        y_i)``, in place; returns them (``[k, P]``), without temporaries of the state's size when
        all tasks are present (one pass over the state without ``scale``: ``torch.lerp``)."""
        tracked = self._tracked(jacobian)
        weight, jacobian = weight.to(tracked.dtype).unsqueeze(1), jacobian.to(tracked.dtype)
        every = index.numel() == len(self.tasks)  # every task present: index is 0..T-1
        rows = tracked if every else tracked[index]
        if scale is None:
            rows.lerp_(jacobian, weight)
        else:
            rows.mul_(1 - weight).addcmul_(jacobian, weight * scale.to(tracked.dtype).unsqueeze(1))
        if not every:
            tracked[index] = rows
        return rows


@register_strategy(
    "moco",
    paper="Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, 'Mitigating Gradient Bias in "
    "Multi-objective Learning: A Provably Convergent Approach', ICLR 2023, arXiv:2210.12624",
)
class MoCo(TrackedGradients):
    """MoCo: MGDA on tracked (bias-corrected) gradients, with the weights updated by a step.

    Heshan Fernando, Han Shen, Miao Liu, Subhajit Chaudhury, Keerthiram Murugesan & Tianyi
    Chen, "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach",
    ICLR 2023, arXiv:2210.12624, Algorithm 1. Per step ``t`` with stochastic task gradients
    ``h_i``:

    * tracking: ``y_i ← y_i − β_t (y_i − h_i)``, ``β_t = beta / t^beta_sigma``;
    * weights: ``λ ← Π_Δ(λ − γ_t (Y Yᵀ + ρ I) λ)``, ``γ_t = gamma / t^gamma_sigma``, ``Π_Δ``
      the Euclidean projection onto the simplex, ``λ₀ = 1/T``;
    * update: ``d = Yᵀ λ``.

    The update is built from past gradients, so it is not a combination of this step's
    gradients: ``backward`` writes ``d`` into the gradient reaching the shared tensors, and the
    heads get their own task's plain gradient (as in LibMTL). The reported weights are ``λ``.

    Defaults are LibMTL's (its implementation is based on the authors' code): ``beta = 0.5``,
    ``beta_sigma = 0.5``, ``gamma = 0.1``, ``gamma_sigma = 0.5``, ``rho = 0``, and
    ``normalization = "loss"``: ``h_i = g_i / (‖g_i‖ + 1e-8) · L_i`` (the authors' code rescales
    every gradient to the size of its loss; ``"none"`` uses ``h_i = g_i``, Algorithm 1 as
    written). Deviation: LibMTL updates ``λ`` with a softmax of the step instead of the
    projection the paper specifies; the projection is used here. ``y`` starts at zero (LibMTL).

    State: ``tracked`` (``Y``, ``[T, P]``, sized at the first step: ``P`` is the number of shared
    parameters, or of feature entries with ``features=``), ``lambdas`` ``[T]``, per-task step
    counts ``steps`` (``β_t``) and the count of ``λ`` updates ``lambda_steps``. With partial
    labels only the present tasks' rows of ``Y`` are updated, and ``λ`` is updated on the face of
    the present tasks (their total weight is kept).
    """

    lambdas: Tensor
    lambda_steps: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalization: Literal["loss", "none"] = "loss",
    ) -> None:
        super().__init__(tasks)
        for name, value in (("beta", beta), ("gamma", gamma)):
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise StrategyError(f"{name} must be a number in (0, 1], got {value!r}")
        for name, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise StrategyError(f"{name} must be a finite number >= 0, got {value!r}")
        if normalization not in ("loss", "none"):
            raise StrategyError(f"normalization must be 'loss' or 'none', got {normalization!r}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma, self.rho = float(gamma), float(gamma_sigma), float(rho)
        self.normalization = normalization
        count = len(self.tasks)
        self.add_state("lambdas", torch.full((count,), 1.0 / count))
        self.add_state("lambda_steps", torch.zeros(()), per_task=False)

    def aggregate_rows(
        self,
        jacobian: Tensor,
        losses: Tensor,
        index: Tensor,
        features: Sequence[Tensor] | None = None,
    ) -> Tensor:
        factors = None
        if self.normalization == "loss":
            factors = losses.to(jacobian.dtype) / (jacobian.norm(dim=1) + 1e-8)
        self.steps[index] += 1
        rates = self.beta / self.steps[index] ** self.beta_sigma
        # y ← (1 − β) y + β h, in place: the [T, P] state is the big tensor here.
        y = self._update_tracked(index, jacobian, rates, factors)
        self.lambda_steps += 1
        rate = self.gamma / self.lambda_steps**self.gamma_sigma
        current = self.lambdas[index].to(y.dtype)
        mass = current.sum()
        share = torch.where(mass > 0, current / mass.clamp(min=1e-30), 1.0 / index.numel())
        # (Y Yᵀ + ρI) λ as Y (Yᵀλ) + ρλ: two passes over Y, not the k² P flops of Y Yᵀ
        step = y @ (share @ y) + self.rho * share
        share = project_to_simplex(share - rate.to(y.dtype) * step)
        self.lambdas[index] = (share * mass).to(self.lambdas.dtype)
        return (share @ y).to(jacobian.dtype)

    def report_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        lambdas = self.lambdas[index]
        return lambdas / lambdas.sum()
