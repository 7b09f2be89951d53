"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.loss_weighting import LossWeighting, present_rows, write_rows
from taskbalance.registry import register_strategy


@register_strategy(
    "dwa",
    paper="Liu, Johns & Davison, 'End-to-End Multi-Task Learning with Attention', CVPR 2019, "
    "arXiv:1803.10704",
)
class DWA(LossWeighting):
    """Dynamic Weight Average: weight each task by how slowly its loss has been falling.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019,
    arXiv:1803.10704. With ``L_k(t)`` the average training loss of task ``k`` in epoch
    ``t`` and ``K`` tasks:

        ``w_k(t − 1) = L_k(t − 1) / L_k(t − 2)``,
        ``λ_k(t) = K · exp(w_k(t − 1)/T) / Σ_i exp(w_i(t − 1)/T)``

    with temperature ``T = 2`` (``temperature=``) and ``λ_k = 1`` in the first two epochs. The
    weights sum to ``K``; a task whose loss fell less in the last epoch gets more weight.

    **Marking epochs.** The strategy averages the losses of the training steps itself (only
    steps in training mode with a graph count: evaluation changes nothing). Call
    :meth:`end_epoch` after the last training step of each epoch::

        for epoch in range(epochs):
            for batch in loader:
                ...
                strategy.backward(losses)
                optimizer.step()
            strategy.end_epoch()

    **Window of steps instead of epochs** (``window=N``). The Nash-MTL code replaces epochs by
    the last ``2N`` steps (``N = 25`` there): ``w_k`` is the mean loss of the last ``N`` steps
    over the mean of the ``N`` before, updated every step; :meth:`end_epoch` then does nothing.
    Differences from that code: here the window holds the steps *before* the current one (the
    current loss does not enter its own weight, as with epochs), weights stay 1 until a task
    has ``2N`` losses (that code pads with ones after ``N``), and the combination is the
    weighted sum (that code takes the mean, a factor ``1/K``).

    **Partial labels.** Every task keeps its own averages, counts and history; with ``k`` of
    the tasks present the weights are ``k · softmax(w/T)`` over those ``k``. A task with fewer
    than two finished epochs (or ``2N`` steps) has ``w_k = 1`` (when no task has a history this
    gives exactly the paper's ``λ = 1``). A task missing from a whole epoch keeps its history.

    Reported extra: ``ratio`` (``w_k``).

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("dwa", tasks=["a", "b"])
        >>> for epoch_losses in ([4.0, 2.0], [2.0, 2.0]):
        ...     a = torch.tensor(epoch_losses[0], requires_grad=True)
        ...     b = torch.tensor(epoch_losses[1], requires_grad=True)
        ...     _ = s.backward({"a": a, "b": b})
        ...     s.end_epoch()
        >>> report = s.backward({"a": a, "b": b})
        >>> [round(w.item(), 4) for w in report.weight_values]  # w = (0.5, 1): 2·softmax(w/2)
        [0.8756, 1.1244]
    """

    ratio: Tensor
    epoch_mean: Tensor
    epoch_steps: Tensor
    previous: Tensor
    epochs_seen: Tensor
    recent: Tensor
    steps_seen: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        temperature: float = 2.0,
        window: int | None = None,
    ) -> None:
        super().__init__(tasks)
        if not (
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
        ):
            raise StrategyError(f"temperature must be a positive number, got {temperature!r}")
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise StrategyError(f"window must be a positive int or None, got {window!r}")
        self.temperature = float(temperature)
        self.window = window
        count = len(self.tasks)
        self.add_state("ratio", torch.ones(count))  # w_k, refreshed with the history
        if window is None:
            # Running mean of the current epoch, and the means of the last two finished epochs.
            self.add_state("epoch_mean", torch.zeros(count))
            self.add_state("epoch_steps", torch.zeros(count, dtype=torch.long))
            self.add_state("previous", torch.ones(count, 2))  # [L(t-2), L(t-1)]
            self.add_state("epochs_seen", torch.zeros(count, dtype=torch.long))
        else:
            self.add_state("recent", torch.ones(count, 2 * window))  # oldest first
            self.add_state("steps_seen", torch.zeros(count, dtype=torch.long))

    # ----------------------------------------------------------------- the method
    def ratios(self, index: Tensor) -> Tensor:
        """``w_k``: last period's mean loss over the one before (1 without enough history)."""
        return self.ratio[index]

    @torch.no_grad()
    def _refresh_ratios(self, index: Tensor) -> None:
        # Kept in a buffer: recomputed when the history changes, not at every weight request.
        if self.window is None:
            older, newer = self.previous[index].unbind(1)
            ready = self.epochs_seen[index] >= 2
        else:
            older, newer = self.recent[index].chunk(2, dim=1)
            older, newer = older.mean(1), newer.mean(1)
            ready = self.steps_seen[index] >= 2 * self.window
        # A zero mean loss would divide by zero; a fully fitted task gets ratio 0 instead.
        ratio = newer / older.clamp(min=torch.finfo(older.dtype).tiny)
        self.ratio[index] = torch.where(ready, ratio, torch.ones_like(ratio))

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        weights = torch.softmax(present_rows(self.ratio, index) / self.temperature, dim=0)
        return (losses.numel() * weights).to(losses.dtype)

    def extras(self, index: Tensor) -> dict[str, Tensor]:
        return {"ratio": self.ratios(index)}

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Close the epoch: its mean losses become ``L(t − 1)``; no-op with ``window=``."""
        if self.window is not None:
            return
        seen = self.epoch_steps > 0
        shifted = torch.stack([self.previous[:, 1], self.epoch_mean], dim=1)
        self.previous.copy_(torch.where(seen.unsqueeze(1), shifted, self.previous))
        self.epochs_seen.add_(seen.long()).clamp_(max=2)
        self._refresh_ratios(torch.arange(len(self.tasks), device=seen.device))  # unseen: same
        self.epoch_mean.zero_()
        self.epoch_steps.zero_()

    # ----------------------------------------------------------------- bookkeeping
    def on_train_step(self, losses: Tensor, index: Tensor) -> None:
        values = losses.to(self._state_dtype)
        if self.window is None:
            steps = present_rows(self.epoch_steps, index) + 1
            mean = present_rows(self.epoch_mean, index)
            write_rows(self.epoch_mean, index, mean + (values - mean) / steps)
            write_rows(self.epoch_steps, index, steps)
        else:
            self.recent[index] = torch.cat([self.recent[index, 1:], values[:, None]], 1)
            self.steps_seen[index] = (self.steps_seen[index] + 1).clamp(max=2 * self.window)
            self._refresh_ratios(index)

    @property
    def _state_dtype(self) -> torch.dtype:
        return (self.epoch_mean if self.window is None else self.recent).dtype
