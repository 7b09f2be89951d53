"""torch.distributed support: the one place where a strategy talks to the other ranks.

With the model in :class:`~torch.nn.parallel.DistributedDataParallel` (DDP) and the same strategy
built on every rank, nothing else has to change in the training loop::

    model = DistributedDataParallel(model)
    strategy = tb.create_strategy("mgda", tasks=["seg", "depth"])
    ...
    report = strategy.backward(losses, shared_params=model.module.trunk.parameters())
    optimizer.step()

Every rank then computes the same weights and ends the step with the same parameters.

How it works (the base classes call the two functions below; no strategy has to):

* **Loss statistics.** In a training step (training mode, grad mode on, losses with a graph)
  :meth:`Strategy.gather <taskbalance.Strategy.gather>` all-reduces the detached loss vector
  once (:func:`reduce_losses`). ``batch.values`` then holds the *global* mean loss of each task
  while its gradient stays the rank's local one: ``L + (mean_r L_r − L).detach()``. So DWA's
  loss ratios, GradNorm's training rates, FAMO's log-loss differences, STCH's nadir point and any
  weight computed from the losses see the statistics of the whole global batch, and the final
  backward of ``Σ w_i L_i`` produces local gradients that DDP averages as usual.
* **Per-task gradients.** :func:`taskbalance.gradient_aggregation.per_task_jacobian`
  differentiates the local losses with ``torch.autograd.grad``, which does *not* trigger DDP's
  reducer (DDP hooks the gradient accumulators, which ``autograd.grad(..., inputs)`` does not
  run). The rows are then
  made global (:func:`reduce_rows`): w.r.t. shared parameters the Jacobian is the mean of the
  ranks' Jacobians (one all-reduce); w.r.t. features (``features=``, a per-sample tensor) the
  global Jacobian is the ranks' blocks side by side, divided by the number of ranks (an
  all-gather). Weights come from the global Gramian, identical on every rank. The final
  ``Σ w_i L_i`` backward then goes through DDP once, which averages it: nothing is reduced
  twice. Methods that write a vector instead of weights (GradDrop) write the global direction
  (parameters: identical on every rank, so DDP's average leaves it as it is; features: the
  rank's own block, times the number of ranks to undo DDP's average). GradDrop's features rule
  also needs the signs of every rank's activations: it all-reduces (:func:`all_reduce_sum`) its
  batch-summed signed gradients, ``k`` × the per-example size.
* **Overflow and NaN.** A non-finite loss on any rank makes the global mean non-finite, so every
  rank raises :class:`~taskbalance.NonFiniteLossError` together instead of one rank leaving the
  others waiting in a collective. Every rank must pass the same tasks in a step (checked in the
  same collective; a mismatch raises :class:`~taskbalance.StrategyError` on every rank).

Partial labels work as in one process if every rank passes the same tasks in a step; the heads
of absent tasks then get no gradient, so build DDP with ``find_unused_parameters=True``. Random
strategies (RLW, PCGrad's order, GradDrop's masks) draw from a generator in the strategy's
state: seed torch identically on every rank before building them (or load the same checkpoint)
and the ranks draw the same numbers. :class:`~taskbalance.accumulation.GradientAccumulator`
reduces once per optimizer step, in ``step()``, whatever the number of micro-batches.

Evaluation (``s(losses)`` without a graph, under ``torch.no_grad()`` or in ``.eval()`` mode)
never communicates, so evaluating on rank 0 only is safe; its statistics are the local ones.
Set ``strategy.process_group`` to a process group to reduce over that group, or to
:data:`LOCAL` to turn communication off for a strategy (each rank then uses its own
statistics, and the ranks may diverge).

Communication per training step, on top of DDP's own all-reduce of ``P_all`` gradient entries
(``T`` tasks, ``k`` of them present, ``P`` shared parameters or ``F`` local feature entries):

========================================  ==================================================
strategy family                           extra communication per step
========================================  ==================================================
loss weighting (static, equal,            one all-reduce of ``2T`` numbers (the loss
uncertainty, dwa, rlw, geometric, famo,   vector and which tasks are present); nothing
imtl_l, stch, db_mtl, ...)                else
gradnorm (loss weighting that needs       the ``2T`` all-reduce, plus the per-task
gradients)                                gradients: ``k·P`` (shared_params) or
                                          ``k·F·R`` all-gathered (features, ``R`` ranks)
gradient methods (mgda, pcgrad, cagrad,   the ``2T`` all-reduce, plus one all-reduce of the
nash_mtl, imtl_g, aligned_mtl, upgrad,    ``k × P`` Jacobian (shared_params), or an
dualproj, config, fairgrad, moco,         all-gather of the ``k × F`` Jacobian blocks and
graddrop, gradvac, ...)                   of their sizes (features)
graddrop with features                    the above, plus one all-reduce of ``k·F/B + 1``
                                          numbers (``B`` the local batch size)
========================================  ==================================================

The Jacobian all-reduce costs ``k`` times DDP's own traffic for the shared part, the price of
per-task gradients that are global; ``features=`` (MGDA-UB style) is usually far cheaper.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "LOCAL",
    "all_reduce_mean",
    "all_reduce_sum",
    "is_distributed",
    "rank",
    "reduce_losses",
    "reduce_rows",
    "resolve_group",
    "world_size",
]

LOCAL = "local"
"""Set ``strategy.process_group = LOCAL`` to keep a strategy's statistics local (no collective)."""


def is_distributed(group: Any = None) -> bool:
    """Whether torch.distributed is initialised with more than one rank (in ``group``)."""
    if group == LOCAL or not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


def resolve_group(group: Any = None) -> Any:
    """``group`` itself, or the default (WORLD) group for ``None``."""
    return dist.group.WORLD if group is None else group


def world_size(group: Any = None) -> int:
    """The number of ranks in ``group`` (1 when torch.distributed is not in use)."""
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not in use)."""
    return dist.get_rank(group) if is_distributed(group) else 0


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """The sum of ``tensor`` over the ranks (a new tensor); ``tensor`` itself off distributed."""
    if not is_distributed(group):
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def all_reduce_mean(tensor: Tensor, group: Any = None) -> Tensor:
    """The mean of ``tensor`` over the ranks (a new tensor); ``tensor`` itself off distributed."""
    if not is_distributed(group):
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total / dist.get_world_size(group)


def reduce_losses(
    values: Tensor, index: Tensor, num_tasks: int, group: Any = None
) -> tuple[Tensor, Tensor]:
    """Global mean of the present tasks' (detached) losses and, per task, the ranks holding it.

    One all-reduce of ``2·num_tasks`` numbers. Returns ``(means [k], counts [num_tasks])``; a
    task present on some ranks only shows a count strictly between 0 and the world size.
    """
    values = values.detach()
    buffer = torch.zeros(2, num_tasks, dtype=torch.float64, device=values.device)
    buffer[0, index] = values.to(torch.float64)
    buffer[1, index] = 1.0
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    means = buffer[0, index] / dist.get_world_size(group)
    return means.to(values.dtype), buffer[1]


def reduce_rows(
    rows: Tensor, *, features: bool, group: Any = None
) -> tuple[Tensor, tuple[int, int]]:
    """The global per-task Jacobian from this rank's rows ``[k, P]``.

    ``features=False`` (rows w.r.t. parameters, the same on every rank): the mean over ranks.
    ``features=True`` (rows w.r.t. this rank's own samples): the ranks' blocks concatenated in
    rank order and divided by the number of ranks, i.e. the Jacobian of the global mean loss
    w.r.t. the global feature tensor. Also returns the span ``(start, stop)`` of this rank's
    columns in the result (all columns for parameters).
    """
    ranks = dist.get_world_size(group)
    if not features:
        total = rows.contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total / ranks, (0, rows.shape[1])
    size = torch.tensor([rows.shape[1]], device=rows.device)
    sizes = [torch.empty_like(size) for _ in range(ranks)]
    dist.all_gather(sizes, size, group=group)
    widths = torch.cat(sizes).tolist()  # host sync: the padding needs the sizes
    widest = max(widths)
    padded = torch.zeros(rows.shape[0], widest, dtype=rows.dtype, device=rows.device)
    padded[:, : rows.shape[1]] = rows
    blocks = [torch.empty_like(padded) for _ in range(ranks)]
    dist.all_gather(blocks, padded, group=group)
    merged = torch.cat([b[:, :w] for b, w in zip(blocks, widths)], dim=1) / ranks
    rank = dist.get_rank(group)
    start = sum(widths[:rank])
    return merged, (start, start + widths[rank])
