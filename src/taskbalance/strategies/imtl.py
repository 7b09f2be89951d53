"""IMTL: IMTL-G on top of IMTL-L's learned loss scales (Liu et al., ICLR 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from taskbalance.errors import StrategyError
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.registry import register_strategy
from taskbalance.strategies.imtl_g import PAPER, imtl_g_weights
from taskbalance.strategy import TaskParameterOptimizer


@register_strategy("imtl", paper=PAPER)
class Imtl(GradientAggregation):
    """IMTL (hybrid): IMTL-G applied to the gradients of IMTL-L's scaled losses.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021 (OpenReview IMPnRXEWpvr; no arXiv version), Sec. 3 (the hybrid method). Each task
    has a learned ``s_i``; its scaled loss is ``e^(s_i) L_i − s_i`` (IMTL-L), whose gradient
    w.r.t. the shared parameters is ``e^(s_i) g_i``. IMTL-G then finds ``α`` (``Σ α_i = 1``)
    for these scaled gradients, and the shared update is ``Σ α_i e^(s_i) g_i``: weights
    ``w_i = α_i e^(s_i)`` on the raw losses, computed from the Gramian
    (``diag(e^s) G diag(e^s)``) and applied with one backward.

    ``s`` descends the gradient of the scaled loss, ``e^(s_i) L_i − 1`` (optimum
    ``s_i = −log L_i``), with its own :class:`~taskbalance.strategy.TaskParameterOptimizer`
    (Adam, ``lr = 1e-3``, ``init = 0``: the same defaults as ``imtl_l``; the paper trains ``s``
    with the network's optimizer, so pass the model's learning rate as ``lr`` to mirror it).
    The step of ``s`` is taken after each successful training step (``on_train_step``), from
    the weights computed with the old ``s``; ``aggregate`` only reads ``s``. Absent tasks (partial
    labels) keep their ``s`` and its Adam moments. ``s`` is reported as ``scale``.

    Differences from the paper, both from this package's one-backward design: the task heads
    get ``w_i ∇L_i`` (the paper: the gradient of the scaled loss, ``e^(s_i) ∇L_i``), and ``s``
    is a parameter of the strategy, not of the model (nobody adds it to an optimizer).
    """

    scale: nn.Parameter
    scale_optimizer: TaskParameterOptimizer

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        init: float = 0.0,
    ) -> None:
        super().__init__(tasks)
        if not (isinstance(init, (int, float)) and math.isfinite(init)):
            raise StrategyError(f"init must be a finite number, got {init!r}")
        count = len(self.tasks)
        # Trained by scale_optimizer below, never by autograd: no .grad, not in any optimizer.
        self.add_state(
            "scale", nn.Parameter(torch.full((count,), float(init)), requires_grad=False)
        )
        self.scale_optimizer = TaskParameterOptimizer((count,), kind=optimizer, lr=lr)

    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        factors = torch.exp(self.scale[index]).to(gramian.dtype)
        alpha = imtl_g_weights(gramian * torch.outer(factors, factors))
        return alpha * factors

    def on_train_step(self, losses: Tensor, index: Tensor) -> None:
        grad = torch.zeros_like(self.scale)
        grad[index] = torch.exp(self.scale[index]) * losses.to(grad.dtype) - 1  # d(e^s L − s)/ds
        self.scale_optimizer.step(self.scale, grad, self.task_mask(index))

    def extras(self, index: Tensor) -> dict[str, Tensor]:
        return {"scale": self.scale.detach()[index]}
