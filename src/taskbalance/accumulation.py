"""Gradient accumulation over micro-batches that is exact for every strategy.

Summing ``s.backward(...)`` over micro-batches is not the full-batch step for most strategies:
weights that depend on the losses (STCH, FAMO, geometric, DWA's ratios) would be computed per
micro-batch, gradient methods would combine each micro-batch's gradients with its own weights
(MGDA of a sum is not the sum of MGDAs), and strategies with state (uncertainty, GradNorm, FAMO,
random draws) would update it once per micro-batch instead of once per optimizer step.

:class:`GradientAccumulator` keeps, over the micro-batches, each task's mean loss and mean
gradient w.r.t. every parameter (a ``[T, P]`` matrix), and then runs the strategy **once**, on
exactly those values: it builds the linear surrogate ``L̃_i(θ) = L̄_i + ḡ_i·(θ − θ₀)``, whose
values and per-task gradients at ``θ₀`` are the accumulated ones, calls
``strategy.backward`` on it and adds the result to the parameters' ``.grad``. So any strategy
(loss-level, gradient-level, its own ``backward``, random) takes the step it would take on the
full batch, and its state moves once.

    >>> import torch, taskbalance as tb
    >>> from taskbalance.accumulation import GradientAccumulator
    >>> trunk, heads = torch.nn.Linear(3, 4), torch.nn.ModuleDict(
    ...     {"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)})
    >>> strategy = tb.create_strategy("mgda", tasks=["a", "b"])
    >>> params = [*trunk.parameters(), *heads.parameters()]
    >>> accumulator = GradientAccumulator(strategy, params, shared_params=trunk.parameters())
    >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
    >>> for xb, yb in zip(x.split(4), y.split(4)):  # two micro-batches of 4
    ...     z = torch.tanh(trunk(xb))
    ...     accumulator.backward({t: (heads[t](z).squeeze(1) - yb[:, i]).pow(2).mean()
    ...                           for i, t in enumerate(["a", "b"])})
    >>> report = accumulator.step()  # fills .grad once; then optimizer.step()
    >>> report.tasks
    ('a', 'b')

Cost: each micro-batch takes one backward per present task through the whole model (the
per-task gradients), and the accumulator holds ``T × P`` numbers (``P``: every parameter
passed). Micro-batches should have equal sizes, as the full-batch mean loss is then the mean of
the micro-batch means (a task absent from some micro-batches is averaged over the ones that hold
it). Under DDP call the micro-batches inside ``model.no_sync()`` or not: the accumulator never
runs a backward through the DDP graph; ``step()`` reduces the losses, the Jacobian (through
the strategy, as in any distributed step) and the final gradient once.

With a ``GradScaler``, pass ``scaler=`` to ``backward`` and ``step``: each micro-batch's
per-task gradients are taken of the scaled losses and unscaled; if any overflowed (or, without
a scaler, is not finite), ``step()`` writes NaN gradients (so ``scaler.step`` skips) and leaves
the strategy untouched.

Host syncs: none per micro-batch, and the strategy's one verdict in ``step()`` (none with
``strategy.check_finite = False``): the tasks present are counted on the host, and a non-finite
gradient is a flag on the device. A non-finite loss in any micro-batch therefore raises
:class:`~taskbalance.NonFiniteLossError` (naming the task) from ``step()``, which then drops
the micro-batches accumulated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from taskbalance import distributed
from taskbalance.errors import StrategyError
from taskbalance.jacobian import accumulate_grad, jacobian
from taskbalance.report import StepReport
from taskbalance.strategy import Strategy, loss_scale, mark_overflow
from taskbalance.validation import nonempty_list

__all__ = ["GradientAccumulator"]


class GradientAccumulator:
    """Accumulate per-task losses and gradients over micro-batches; one strategy step at the end.

    ``params`` are every parameter that the losses reach and that the optimizer updates (the
    model's parameters); ``shared_params`` the ones passed to gradient methods as
    ``shared_params`` (a subset of ``params``, e.g. the trunk's).
    """

    def __init__(
        self,
        strategy: Strategy,
        params: Iterable[Tensor],
        *,
        shared_params: Iterable[Tensor],
    ) -> None:
        params = [p for p in params if p.requires_grad]
        shared = nonempty_list(shared_params, "shared_params")
        known = {id(p) for p in params}
        if any(id(p) not in known for p in shared):
            raise StrategyError("shared_params must be a subset of params")
        shared_ids = {id(p) for p in shared}
        self.strategy = strategy
        self.shared = shared
        self.rest = [p for p in params if id(p) not in shared_ids]
        self._ordered = [*self.shared, *self.rest]
        self._shared_size = sum(p.numel() for p in self.shared)
        self.reset()

    def reset(self) -> None:
        """Forget the micro-batches accumulated so far."""
        self._rows: Tensor | None = None
        self._loss_sum: Tensor | None = None
        self._count: Tensor | None = None
        self._overflow: Tensor | None = None
        self._present: set[str] = set()  # on the host: no read of the counts
        self._micro_batches = 0

    @property
    def micro_batches(self) -> int:
        """The micro-batches added since the last step (counted on the host: no sync)."""
        return self._micro_batches

    def backward(
        self, losses: Mapping[str, Tensor], *, scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Add one micro-batch: its per-task losses and gradients (its graph is freed)."""
        batch = self.strategy.gather({t: v.detach() for t, v in losses.items()})
        # Validation only: whether the losses are finite is checked on their means, in step().
        self.strategy._engine.gathered = []
        values = torch.stack([losses[t].reshape(()) for t in batch.names])
        if not values.requires_grad:
            raise StrategyError(
                f"backward needs losses that require grad; task {batch.names[0]!r} has no graph"
            )
        scale = loss_scale(scaler, values.device)
        if scale is None:
            rows = jacobian(values, self._ordered, retain_graph=False)
        else:
            rows = jacobian(values, self._ordered, retain_graph=False, scale=scale).float() / scale
        if self._rows is None:
            count = len(self.strategy.tasks)
            self._rows = rows.new_zeros(count, rows.shape[1])
            self._loss_sum = torch.zeros(count, dtype=torch.float64, device=rows.device)
            self._count = torch.zeros(count, dtype=torch.float64, device=rows.device)
            self._overflow = torch.zeros((), dtype=torch.bool, device=rows.device)
        assert self._loss_sum is not None and self._count is not None
        assert self._overflow is not None
        self._overflow |= ~torch.isfinite(rows).all()
        self._rows.index_add_(0, batch.index, rows.to(self._rows.dtype))
        self._loss_sum.index_add_(0, batch.index, batch.values.to(torch.float64))
        self._count.index_add_(0, batch.index, torch.ones_like(batch.values, dtype=torch.float64))
        self._present.update(batch.names)
        self._micro_batches += 1

    def step(self, *, scaler: torch.amp.GradScaler | None = None) -> StepReport:
        """Run the strategy once on the accumulated values; add its update to ``.grad``."""
        if self._rows is None:
            raise StrategyError("step() before any backward(): no micro-batch was accumulated")
        assert self._loss_sum is not None and self._count is not None
        assert self._overflow is not None
        names = [t for t in self.strategy.tasks if t in self._present]
        overflow = self._overflow
        counts = self._count.clamp(min=1)  # absent tasks: zero rows, left out below
        # Zero rows after an overflow: the surrogate's value must stay the (finite) losses.
        rows = torch.where(overflow, 0.0, self._rows / counts.to(self._rows.dtype).unsqueeze(1))
        means = (self._loss_sum / counts).to(self._rows.dtype)
        shared = torch.zeros(self._shared_size, dtype=rows.dtype, device=rows.device)
        rest = torch.zeros(rows.shape[1] - self._shared_size, dtype=rows.dtype, device=rows.device)
        shared.requires_grad_(True)
        rest.requires_grad_(True)
        # Value L̄_i, gradient ḡ_i: the strategy sees the full batch's losses and gradients.
        surrogate = (
            means + rows[:, : self._shared_size] @ shared + rows[:, self._shared_size :] @ rest
        )
        parts = dict(zip(self.strategy.tasks, surrogate.unbind()))
        try:
            # An overflow (a flag on the device) skips the strategy's step: its checks pass,
            # its weights are NaN and its state is left as it was.
            with self.strategy.transaction():
                mark_overflow(overflow)
                report = self.strategy.backward(
                    {t: parts[t] for t in names}, shared_params=[shared], scaler=scaler
                )
        finally:
            self.reset()
        update = torch.cat(
            [
                torch.zeros_like(shared) if shared.grad is None else shared.grad,
                torch.zeros_like(rest) if rest.grad is None else rest.grad,
            ]
        )
        # NaN after an overflow (on every rank, once reduced), so that GradScaler.step skips.
        update = torch.where(overflow, math.nan, update)
        # The surrogate is no DDP graph: average the (local) update once, as DDP would.
        update = distributed.all_reduce_mean(update, self.strategy_group())
        accumulate_grad(self._ordered, update)
        weights = torch.where(overflow, math.nan, report.weight_values)
        return dataclasses.replace(report, weight_values=weights)

    def strategy_group(self) -> object:
        """The process group the strategy reduces over (``None``: the default group)."""
        return self.strategy.process_group
