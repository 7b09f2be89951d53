"""Smooth Tchebycheff scalarization, STCH (Lin, Zhang, Yang, Liu, Wang & Zhang, ICML 2024)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.loss_weighting import LossWeighting
from taskbalance.registry import register_strategy
from taskbalance.validation import per_task_vector


@register_strategy(
    "stch",
    paper="Lin, Zhang, Yang, Liu, Wang & Zhang, 'Smooth Tchebycheff Scalarization for "
    "Multi-Objective Optimization', ICML 2024, arXiv:2402.19078",
)
class STCH(LossWeighting):
    """Smooth Tchebycheff scalarization: a smooth maximum of the preference-weighted gaps.

    Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization", ICML 2024, arXiv:2402.19078:

        ``g_μ(x | λ) = μ · log Σ_i exp(λ_i (f_i(x) − z*_i) / μ)``

    a smooth upper bound of the Tchebycheff ``max_i λ_i (f_i − z*_i)`` within ``μ log k``. Its
    gradient weights are ``λ_i · softmax_i(λ (f − z*)/μ)``: the worst-off task (largest
    weighted gap) gets the most weight, the more so the smaller ``μ``.

    **Multi-task recipe (the authors' STCH_MTL code, followed here by default).**

    * ``f_i = log L_i`` (``log_losses=True``); with ``log_losses=False``, ``f_i = L_i``.
    * Warm-up: for ``warmup_epochs = 4`` epochs the model trains on ``Σ_i log L_i``; the next
      epoch also trains on it while the strategy averages each task's loss ``L̄_i``; from then
      on ``z*_i = log L̄_i``, so ``f_i − z*_i = log(L_i / L̄_i)`` is each loss relative to its
      early level. Mark epochs with :meth:`end_epoch` after each epoch's last training step
      (without it the strategy stays in the warm-up). The reference is kept in buffers
      (``ideal_point``, ``ideal_ready``) and saved with ``state_dict()``.
    * Fixed ideal point instead: ``ideal=`` (a number, a sequence or a mapping, in loss units;
      ``z*_i = log ideal_i`` with ``log_losses``) skips the warm-up. The paper's own
      definition takes ``z*`` slightly below the best value of each objective; ``ideal=0``
      with ``log_losses=False`` does that for non-negative losses.
    * ``mu = 1`` (the code's default; the paper studies several values), preference
      ``λ_i = 1`` (``pref_vector=``, the name UPGrad, DualProj and ConFIG use; the code uses ones).
    * The code multiplies the objective by the number of tasks ``k``; so does this class, so
      that with equal gaps the step equals the warm-up's ``Σ log L`` step.

    Training steps (training mode, grad enabled, losses with a graph) feed the averages;
    evaluation changes nothing. Partial labels: each task has its own average and reference; a
    task without a reference yet keeps the warm-up objective ``f_i`` while the others use the
    smooth maximum over the present tasks that have one. ``log_losses`` needs positive losses
    (a zero or negative loss raises :class:`StrategyError` naming the task; the code adds
    1e-20 instead).

        >>> import math, torch, taskbalance as tb
        >>> s = tb.create_strategy("stch", tasks=["a", "b"], ideal=0.0, log_losses=False)
        >>> losses = {"a": torch.tensor(1.0, requires_grad=True),
        ...           "b": torch.tensor(1.0 + math.log(3.0), requires_grad=True)}
        >>> [round(w.item(), 4) for w in s.backward(losses).weight_values]  # 2·softmax(L)
        [0.5, 1.5]
    """

    preference: Tensor
    ideal_point: Tensor
    ideal_ready: Tensor
    epochs_done: Tensor
    epoch_mean: Tensor
    epoch_steps: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        mu: float = 1.0,
        pref_vector: Mapping[str, float] | Sequence[float] | float = 1.0,
        ideal: Mapping[str, float] | Sequence[float] | float | None = None,
        log_losses: bool = True,
        warmup_epochs: int = 4,
    ) -> None:
        super().__init__(tasks)
        if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu > 0):
            raise StrategyError(f"mu must be a positive number, got {mu!r}")
        weights = per_task_vector(pref_vector, self.tasks, argument="pref_vector")
        if not bool((weights > 0).all()):
            raise StrategyError(f"pref_vector must be positive, got {weights.tolist()}")
        if not isinstance(log_losses, bool):
            raise StrategyError(f"log_losses must be True or False, got {log_losses!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int):
            raise StrategyError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        if warmup_epochs < 0:
            raise StrategyError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        self.mu = float(mu)
        self.log_losses = log_losses
        self.warmup_epochs = warmup_epochs
        self.fixed_ideal = ideal is not None
        count = len(self.tasks)
        self.register_buffer("preference", weights)
        if ideal is not None:
            point = per_task_vector(ideal, self.tasks, argument="ideal")
            if log_losses and not bool((point > 0).all()):
                raise StrategyError(
                    f"ideal must be positive with log_losses=True, got {point.tolist()}"
                )
            self.register_buffer("ideal_point", point.log() if log_losses else point)
            self.register_buffer("ideal_ready", torch.ones(count, dtype=torch.bool))
        else:
            self.add_state("ideal_point", torch.zeros(count))
            self.add_state("ideal_ready", torch.zeros(count, dtype=torch.bool))
        self.add_state("epochs_done", torch.zeros((), dtype=torch.long), per_task=False)
        self.add_state("epoch_mean", torch.zeros(count))
        self.add_state("epoch_steps", torch.zeros(count, dtype=torch.long))

    # ----------------------------------------------------------------- the method
    def _objectives(self, losses: Tensor) -> Tensor:
        return losses.log() if self.log_losses else losses

    def _scaled_gaps(self, losses: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """``λ (f − z*)/μ`` for the tasks with a reference (a huge negative for the others)."""
        ready = self.ideal_ready[index]
        gaps = self.preference[index].to(losses.dtype) * (
            self._objectives(losses) - self.ideal_point[index].to(losses.dtype)
        )
        # The dtype's lowest finite value stands for −∞: masked out without NaN gradients.
        negligible = torch.full_like(gaps, torch.finfo(gaps.dtype).min)
        scaled = torch.where(ready, gaps / self.mu, negligible)
        return scaled, ready

    def objective(self, losses: Tensor, index: Tensor) -> Tensor:
        scaled, ready = self._scaled_gaps(losses, index)
        smooth_max = ready.sum() * self.mu * torch.logsumexp(scaled, dim=0)
        warmup = torch.where(ready, torch.zeros_like(losses), self._objectives(losses)).sum()
        return warmup + torch.where(ready.any(), smooth_max, torch.zeros_like(smooth_max))

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        scaled, ready = self._scaled_gaps(losses, index)
        soft = ready.sum() * self.preference[index].to(losses.dtype) * torch.softmax(scaled, 0)
        weights = torch.where(ready, soft, torch.ones_like(losses))
        return weights / losses if self.log_losses else weights

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Close a training epoch; after the warm-up this fixes the reference point."""
        if not self.fixed_ideal:
            averaging = self.epochs_done >= self.warmup_epochs
            fix = averaging & ~self.ideal_ready & (self.epoch_steps > 0)
            self.ideal_point.copy_(
                torch.where(fix, self._objectives(self.epoch_mean), self.ideal_point)
            )
            self.ideal_ready |= fix
        self.epoch_mean.zero_()
        self.epoch_steps.zero_()
        self.epochs_done += 1

    # ----------------------------------------------------------------- bookkeeping
    def check_losses(self, losses: Tensor, index: Tensor) -> None:
        if not self.log_losses:
            return
        # One host sync, the price of failing loudly instead of training on NaN.
        bad = self.first_failing(losses > 0, index)
        if bad is not None:
            name, position = bad
            raise StrategyError(
                f"STCH with log_losses=True needs positive losses; loss of task {name!r} is "
                f"{losses[position].item()}"
            )

    def on_train_step(self, losses: Tensor, index: Tensor) -> None:
        if self.fixed_ideal:
            return
        values = losses.to(self.epoch_mean.dtype)
        averaging = (self.epochs_done >= self.warmup_epochs) & ~self.ideal_ready[index]
        steps = self.epoch_steps[index] + averaging.long()
        mean = self.epoch_mean[index]
        update = mean + (values - mean) / steps.clamp(min=1)
        self.epoch_mean[index] = torch.where(averaging, update, mean)
        self.epoch_steps[index] = steps
