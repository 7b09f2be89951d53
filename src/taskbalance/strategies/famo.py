"""FAMO: Fast Adaptive Multitask Optimization (Liu, Feng, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from taskbalance.errors import StrategyError
from taskbalance.loss_weighting import LossWeighting, present_rows, write_rows
from taskbalance.registry import register_strategy
from taskbalance.strategy import TaskParameterOptimizer
from taskbalance.validation import per_task_vector


@register_strategy(
    "famo",
    paper="Liu, Feng, Stone & Liu, 'FAMO: Fast Adaptive Multitask Optimization', NeurIPS 2023, "
    "arXiv:2306.03792",
)
class FAMO(LossWeighting):
    """FAMO: decrease every task's log-loss at the same rate, with O(1) cost per step.

    Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
    arXiv:2306.03792, Algorithm 1. Task logits ``ξ`` (start 0), ``z = softmax(ξ)``, minimum
    losses ``ℓ*`` (``min_losses=``, default 0) and ``D_i = ℓ_i − ℓ*_i + ε`` (``ε = 1e-8``):

    * model objective ``Σ_i z_i log D_i / c`` with ``c = stopgrad(Σ_j z_j / D_j)``, whose
      gradient is ``Σ_i w_i ∇ℓ_i`` with ``w_i = (z_i / D_i) / Σ_j (z_j / D_j)`` (the reported
      weights; they sum to 1);
    * logit update from the losses before (``ℓ_t``, kept in the ``previous_losses`` buffer) and
      after (``ℓ_{t+1}``) the model's step:
      ``δ = ∇_ξ softmax(ξ)ᵀ (log D_t − log D_{t+1})`` and ``ξ ← ξ − β(δ + γ ξ)``, run as Adam
      with ``lr = β`` and L2 weight decay ``γ`` (as the official code uses
      ``torch.optim.Adam(lr=β, weight_decay=γ)``). A task whose log-loss fell faster than the
      weighted average loses weight.

    **Where ℓ_{t+1} comes from.**

    * ``s.update(losses_after)``: the paper's benchmark trainers run an extra forward pass
      without gradients after ``optimizer.step()`` on the *same* batch and pass its losses.
      Exact, costs one forward per step::

          report = strategy.backward(losses)
          optimizer.step()
          with torch.no_grad():
              strategy.update(compute_losses(model, batch))

    * Cheaper (the default, ``update_on_next_step=True``): if :meth:`update` was not called,
      the next training step uses *its own* losses as ``ℓ_{t+1}`` before computing its
      weights. On a different batch this is a noisier estimate of the change; in the paper's
      toy, which has no data, the two are the same. Calling :meth:`update` consumes the
      pending step, so the two never update twice. ``update_on_next_step=False`` updates only
      through :meth:`update`.

    **Defaults and where the sources differ.**

    * ``lr = 0.025`` (β): paper and code agree.
    * ``gamma`` (γ, the logits' weight decay): the paper's text gives 0.001 and is followed
      here; the official ``famo.py`` class defaults to 0.01, the copy in its
      ``methods/weight_methods.py`` to 1e-5, its per-dataset scripts use 0.001 or 0.01, and its
      toy uses 0 with ``ℓ* = (−2.1, −21)``.
    * The official ``famo.py`` also clips the shared parameters' gradient norm at 1.0
      (``max_norm``) when given them; that is a model-side choice and not done here (use
      ``torch.nn.utils.clip_grad_norm_`` after ``backward``).

    **Partial labels.** The softmax runs over the tasks present; the update uses the tasks both
    present in ``losses_after`` and waiting from the previous step; every other task's logit,
    Adam moments and stored loss stay as they were.

    The losses must stay above ``min_losses``; a loss at or below its minimum raises
    :class:`StrategyError` naming the task. Reported extra: ``logit`` (``ξ``).

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("famo", tasks=["a", "b"])
        >>> losses = {"a": torch.tensor(1.0, requires_grad=True),
        ...           "b": torch.tensor(4.0, requires_grad=True)}
        >>> [round(w.item(), 4) for w in s.backward(losses).weight_values]  # ∝ 1/ℓ at ξ = 0
        [0.8, 0.2]
        >>> s.update({"a": torch.tensor(0.5), "b": torch.tensor(3.0)})  # a fell faster
        >>> [round(x, 4) for x in s.logits.tolist()]  # Adam's first step: −β·sign(δ)
        [-0.025, 0.025]
    """

    logits: nn.Parameter
    min_losses: Tensor
    previous_losses: Tensor
    pending: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        lr: float = 0.025,
        gamma: float = 0.001,
        min_losses: Mapping[str, float] | Sequence[float] | float = 0.0,
        eps: float = 1e-8,
        optimizer: Literal["adam", "sgd"] = "adam",
        update_on_next_step: bool = True,
    ) -> None:
        super().__init__(tasks)
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
            raise StrategyError(f"gamma must be a finite number >= 0, got {gamma!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise StrategyError(f"eps must be a finite number >= 0, got {eps!r}")
        if not isinstance(update_on_next_step, bool):
            raise StrategyError(
                f"update_on_next_step must be True or False, got {update_on_next_step!r}"
            )
        self.eps = float(eps)
        self.update_on_next_step = update_on_next_step
        count = len(self.tasks)
        # Trained by update(), not by autograd: no gradient, so a model optimizer ignores it.
        self.add_state("logits", nn.Parameter(torch.zeros(count), requires_grad=False))
        self.logit_optimizer = TaskParameterOptimizer(
            (count,), kind=optimizer, lr=lr, weight_decay=gamma
        )
        minimum = per_task_vector(min_losses, self.tasks, argument="min_losses")
        self.register_buffer("min_losses", minimum)
        self.add_state("previous_losses", torch.ones(count))
        self.add_state("pending", torch.zeros(count, dtype=torch.bool))

    # ----------------------------------------------------------------- the method
    def _gaps(self, losses: Tensor, index: Tensor) -> Tensor:
        return losses - present_rows(self.min_losses, index).to(losses.dtype) + self.eps

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        z = torch.softmax(present_rows(self.logits, index), dim=0).to(losses.dtype)
        scaled = z / self._gaps(losses, index)
        return scaled / scaled.sum()

    def objective(self, losses: Tensor, index: Tensor) -> Tensor:
        z = torch.softmax(present_rows(self.logits, index), dim=0).to(losses.dtype)
        gaps = self._gaps(losses, index)
        normaliser = (z / gaps.detach()).sum()
        return (z * gaps.log()).sum() / normaliser

    def objective_and_gradients(
        self, losses: Tensor, index: Tensor, weights: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        # Σ_i z_i log D_i / c = Σ_i w_i D_i log D_i, as w_i = z_i / (c D_i); the logits take
        # their own step (not the objective's gradient)
        gaps = self._gaps(losses, index)
        return (weights * gaps * gaps.log()).sum(), {}

    def extras(self, index: Tensor) -> dict[str, Tensor]:
        return {"logit": self.logits.detach()[index]}

    @torch.no_grad()
    def update(self, losses_after: Mapping[str, Tensor]) -> None:
        """Update the logits from the losses after the model's step (``ℓ_{t+1}``).

        ``losses_after`` holds scalar losses (a graph is not needed) of some of the tasks of the
        last training step; the logits of those tasks take one step.
        """
        batch = self.gather(losses_after)
        after, index = batch.values.detach(), batch.index
        names = list(batch.names)
        with self.transaction():
            self.defer_check(
                self.pending[index].any(),
                lambda: StrategyError(
                    f"update() needs a training step first: no step is waiting for tasks "
                    f"{names} (call strategy.backward(losses) before update)"
                ),
            )
            self.check_losses(after, index)
            self._step_logits(after, index)

    def _step_logits(self, after: Tensor, index: Tensor) -> None:
        """One logit step for the present tasks that wait for theirs (no host sync)."""
        everyone = index.shape[0] == len(self.tasks)
        waiting = present_rows(self.pending, index)
        idle = ~waiting
        before = present_rows(self.previous_losses, index)
        after = after.to(before.dtype)
        # softmax over the waiting tasks only: the others get the lowest logit, then z = 0 (the
        # lowest finite value keeps a step where no task waits free of NaN)
        logits = present_rows(self.logits, index)
        z = torch.softmax(logits.masked_fill(idle, torch.finfo(logits.dtype).min), dim=0)
        z.masked_fill_(idle, 0)
        # a stored loss of a task that does not wait may be stale (a NaN log): not used
        drop = (self._gaps(before, index) / self._gaps(after, index)).log_().masked_fill_(idle, 0)
        # ∇softmax(ξ)ᵀ·Δ = z ⊙ (Δ − zᵀΔ): the Jacobian of softmax is diag(z) − zzᵀ.
        grad = z * (drop - (z * drop).sum())
        if everyone:  # index is 0, 1, ..., T-1
            self.logit_optimizer.step(self.logits, grad, waiting)
            self.pending.zero_()
            return
        full = torch.zeros_like(self.logits).index_put_((index,), grad)
        mask = torch.zeros_like(self.pending).index_put_((index,), waiting)
        self.logit_optimizer.step(self.logits, full, mask)
        self.pending[index] = False

    def check_losses(self, losses: Tensor, index: Tensor) -> None:
        minimum = present_rows(self.min_losses, index).to(losses.dtype)
        above = losses > minimum

        def error() -> StrategyError:
            bad = self.first_failing(above, index)
            assert bad is not None  # built only when the check failed
            name, position = bad
            return StrategyError(
                f"FAMO needs losses above min_losses; loss of task {name!r} is "
                f"{losses[position].item()}, its minimum {minimum[position].item()}"
            )

        self.defer_check(above.all(), error)

    def before_train_step(self, losses: Tensor, index: Tensor) -> None:
        if self.update_on_next_step:  # this step's losses are the last step's ℓ_{t+1}
            self._step_logits(losses, index)

    def on_train_step(self, losses: Tensor, index: Tensor) -> None:
        write_rows(self.previous_losses, index, losses.to(self.previous_losses.dtype))
        write_rows(self.pending, index, True)
