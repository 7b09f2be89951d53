"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.loss_weighting import LossWeighting, present_rows, write_rows
from taskbalance.registry import register_strategy
from taskbalance.strategy import TaskParameterOptimizer

_MIN_WEIGHT = 1e-6  # weights are kept positive: clamped here before renormalising


@register_strategy(
    "gradnorm",
    paper="Chen, Badrinarayanan, Lee & Rabinovich, 'GradNorm: Gradient Normalization for "
    "Adaptive Loss Balancing in Deep Multitask Networks', ICML 2018, arXiv:1711.02257",
)
class GradNorm(LossWeighting):
    """GradNorm: learn task weights so that the weighted gradient norms train tasks at equal rates.

    Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018, arXiv:1711.02257, Algorithm 1. Per step,
    with ``W`` the tensors passed as ``shared_params`` (or ``features``):

    * ``G_i = ‖∇_W (w_i L_i)‖ = w_i ‖∇_W L_i‖`` and ``Ḡ`` their mean;
    * ``L̃_i = L_i / L_i(0)``, ``r_i = L̃_i / mean_j L̃_j``;
    * ``L_grad = Σ_i |G_i − stopgrad(Ḡ · r_i^α)|``, whose gradient w.r.t. ``w_i`` is
      ``sign(G_i − target_i) · ‖∇_W L_i‖`` (the target is a constant, as in the paper);
    * the model takes the gradient of ``Σ w_i(t) L_i`` (the weights before their update), then
      ``w`` takes one step on ``L_grad`` and is renormalised so that ``Σ_i w_i = T``.

    Choices the paper leaves open, and the ones made here:

    * ``W``: pass the last shared layer's parameters as ``shared_params`` (the paper's choice,
      and much cheaper than the whole trunk); ``features=`` uses the shared representation.
    * Only the norms ``‖∇_W L_i‖`` are needed, not the gradients (:meth:`on_gradient_norms`).
      For a linear layer ``y = x Wᵀ + b`` (batch ``B``, widths ``in → out``) they come from
      ``‖D_iᵀ x‖² = ⟨(x xᵀ) D_i, D_i⟩`` with ``D_i = ∂L_i/∂y``: each task's backward stops at
      ``y`` (its head only) and the norms cost ``B²·in`` multiply-adds once plus ``B²·out`` per
      task, instead of a ``B·in·out`` weight gradient per task, whenever that is fewer
      (``B < in``; see :func:`~taskbalance.loss_weighting.task_squared_norms`). On the last
      512×512 layer of ``experiments.benchmark``'s MLP (``B = 256``, ``T = 10``): 0.37 G
      multiply-adds instead of 0.67 G, against about 0.54 G for the plain training step.
      Other tensors, ``features=`` and distributed steps use the per-task gradients.
    * ``L_i(0)``: the loss of task ``i`` at the first step in which it appears.
    * Optimizer of ``w``: Adam (``optimizer="sgd"`` is the other choice) with ``lr = 0.025``, the
      paper's value for its NYUv2 runs. ``alpha = 1.5`` (the paper's NYUv2 value; its toy uses
      0.12).
    * Positivity: weights are clamped at 1e-6 before renormalising.
    * Partial labels: only the present tasks enter ``Ḡ`` and ``r``; their weights are
      renormalised to keep their sum, so the absent tasks' weights and ``Σ w = T`` are kept.

    Without gradients (``s(losses)`` under ``torch.no_grad()``) it returns ``Σ w_i L_i``.
    """

    task_weights: Tensor
    initial_losses: Tensor
    seen: Tensor
    weight_optimizer: TaskParameterOptimizer

    needs_grads = True

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        alpha: float = 1.5,
        lr: float = 0.025,
        optimizer: Literal["adam", "sgd"] = "adam",
    ) -> None:
        super().__init__(tasks)
        if not (math.isfinite(alpha) and alpha >= 0):
            raise StrategyError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = alpha
        count = len(self.tasks)
        self.add_state("task_weights", torch.ones(count))
        self.add_state("initial_losses", torch.ones(count))
        self.add_state("seen", torch.zeros(count, dtype=torch.bool))
        self.weight_optimizer = TaskParameterOptimizer((count,), kind=optimizer, lr=lr)

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return self.task_weights[index]

    def on_gradient_norms(self, squared_norms: Tensor, losses: Tensor, index: Tensor) -> None:
        # One step of w on L_grad, from the weights this step trains with (computed before).
        dtype = self.task_weights.dtype
        norms = squared_norms.to(dtype).sqrt()
        current = self.task_weights[index]
        losses = losses.to(dtype)
        seen, before = present_rows(self.seen, index), present_rows(self.initial_losses, index)
        initial = torch.where(seen, before, losses)
        ratios = losses / initial
        rates = ratios / ratios.mean()
        weighted_norms = current * norms
        target = weighted_norms.mean() * rates**self.alpha
        grad = torch.sign(weighted_norms - target) * norms
        write_rows(self.initial_losses, index, initial)
        write_rows(self.seen, index, True)
        if losses.numel() == len(self.tasks):  # every task: index is 0, 1, ..., T-1
            self.weight_optimizer.step(self.task_weights, grad)
        else:
            full = torch.zeros_like(self.task_weights).index_put_((index,), grad)
            self.weight_optimizer.step(self.task_weights, full, self.task_mask(index))
        updated = present_rows(self.task_weights, index).clamp(min=_MIN_WEIGHT)
        write_rows(self.task_weights, index, updated * (current.sum() / updated.sum()))
