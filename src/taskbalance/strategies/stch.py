"""Smooth Tchebycheff scalarization, STCH (Lin, Zhang, Yang, Liu, Wang & Zhang, ICML 2024)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from taskbalance.errors import StrategyError
from taskbalance.loss_weighting import LossWeighting, present_rows, write_rows
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

    **Phases on the host.** Which tasks have a reference and how many epochs are done change
    only in :meth:`end_epoch` and ``load_state_dict``, so the strategy keeps a copy of them on
    the host (read back there: once per epoch while a reference is being fixed, and at a load).
    A step of the warm-up is then ``Σ f_i`` alone and a step where every task has its reference
    the smooth maximum alone, with no work for the other phase and without a host sync. Change
    ``ideal_ready`` or ``epochs_done`` through these two only.

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
        self._epochs = 0  # the host's copies of epochs_done and of any/all of ideal_ready
        self._any_ready = self._all_ready = self.fixed_ideal
        self.register_load_state_dict_post_hook(_read_phase)

    # ----------------------------------------------------------------- the method
    def _objectives(self, losses: Tensor) -> Tensor:
        return losses.log() if self.log_losses else losses

    def _scaled_gaps(self, values: Tensor, index: Tensor, ready: Tensor | None) -> Tensor:
        """``λ (f − z*)/μ``; with ``ready`` (some tasks have no reference yet), the dtype's
        lowest finite value for the others (a −∞ without NaN gradients)."""
        ideal = present_rows(self.ideal_point, index).to(values.dtype)
        gaps = present_rows(self.preference, index).to(values.dtype) * (values - ideal)
        scaled = gaps / self.mu if self.mu != 1 else gaps
        return scaled if ready is None else scaled.masked_fill(~ready, torch.finfo(gaps.dtype).min)

    def objective(self, losses: Tensor, index: Tensor) -> Tensor:
        values = self._objectives(losses)
        if not self._any_ready:  # the warm-up
            return values.sum()
        if self._all_ready:
            scaled = self._scaled_gaps(values, index, None)
            return index.shape[0] * self.mu * torch.logsumexp(scaled, dim=0)
        ready = present_rows(self.ideal_ready, index)
        scaled = self._scaled_gaps(values, index, ready)
        # Without a present ready task the count is 0 and so is the smooth maximum (finite).
        smooth_max = ready.sum() * self.mu * torch.logsumexp(scaled, dim=0)
        return values.masked_fill(ready, 0).sum() + smooth_max

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        if not self._any_ready:  # the warm-up: the gradient of Σ f_i
            return losses.reciprocal() if self.log_losses else torch.ones_like(losses)
        values = self._objectives(losses)
        preference = present_rows(self.preference, index).to(losses.dtype)
        if self._all_ready:
            scaled = self._scaled_gaps(values, index, None)
            weights = index.shape[0] * preference * torch.softmax(scaled, 0)
        else:
            ready = present_rows(self.ideal_ready, index)
            scaled = self._scaled_gaps(values, index, ready)
            weights = ready.sum() * preference * torch.softmax(scaled, 0)
            weights = weights.masked_fill_(~ready, 1)
        return weights / losses if self.log_losses else weights

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Close a training epoch; after the warm-up this fixes the reference point."""
        if not self.fixed_ideal and self._epochs >= self.warmup_epochs and not self._all_ready:
            fix = ~self.ideal_ready & (self.epoch_steps > 0)  # an averaging epoch's tasks
            self.ideal_point.copy_(
                torch.where(fix, self._objectives(self.epoch_mean), self.ideal_point)
            )
            self.ideal_ready |= fix
            ready = self.ideal_ready.tolist()  # once per averaging epoch: the next phase
            self._any_ready, self._all_ready = any(ready), all(ready)
        self.epoch_mean.zero_()
        self.epoch_steps.zero_()
        self.epochs_done += 1
        self._epochs += 1

    # ----------------------------------------------------------------- bookkeeping
    def check_losses(self, losses: Tensor, index: Tensor) -> None:
        if not self.log_losses:
            return
        positive = losses > 0

        def error() -> StrategyError:
            bad = self.first_failing(positive, index)
            assert bad is not None  # built only when the check failed
            name, position = bad
            return StrategyError(
                f"STCH with log_losses=True needs positive losses; loss of task {name!r} is "
                f"{losses[position].item()}"
            )

        self.defer_check(positive.all(), error)

    def on_train_step(self, losses: Tensor, index: Tensor) -> None:
        if self.fixed_ideal or self._all_ready or self._epochs < self.warmup_epochs:
            return  # no task averages its loss in this epoch
        values = losses.to(self.epoch_mean.dtype)
        averaging = ~present_rows(self.ideal_ready, index)
        steps = present_rows(self.epoch_steps, index) + averaging
        mean = present_rows(self.epoch_mean, index)
        # the running mean moves only for the averaging tasks (a weight of 0 for the others)
        write_rows(self.epoch_mean, index, mean.lerp(values, averaging / steps.clamp(min=1)))
        write_rows(self.epoch_steps, index, steps)


def _read_phase(strategy: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict``: the host's copy of the loaded phase (one read)."""
    assert isinstance(strategy, STCH)
    strategy._epochs = int(strategy.epochs_done)
    ready = strategy.ideal_ready.tolist()
    strategy._any_ready, strategy._all_ready = any(ready), all(ready)
