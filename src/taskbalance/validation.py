"""Checks of what a user hands a strategy; every error names the task or argument at fault."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from taskbalance.errors import NonFiniteLossError, StrategyError

__all__ = [
    "TaskLosses",
    "check_finite",
    "check_graphs",
    "check_tasks",
    "non_finite_error",
    "nonempty_list",
    "per_task_vector",
    "validate_losses",
]


@dataclass(frozen=True)
class TaskLosses:
    """The validated losses of one step: the tasks present, in the strategy's order.

    ``values`` is ``torch.stack(parts)``: each task's loss keeps its own backward root, so that
    per-task gradients never run through another task's branch.
    """

    names: tuple[str, ...]
    values: Tensor  # [k], with the autograd graph (global values under torch.distributed)
    index: Tensor  # [k] positions of the present tasks in ``strategy.tasks``
    mask: Tensor  # [T] bool, True for the present tasks
    group: Any = None  # the process group the step is reduced over; None: a local step
    parts: tuple[Tensor, ...] = ()  # the 0-d losses that ``values`` stacks
    training: bool = False  # a training step: training mode, grad mode, losses with a graph

    @property
    def has_graph(self) -> bool:
        return self.values.requires_grad


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str) or not isinstance(tasks, Iterable):
        raise StrategyError(f"tasks must be a sequence of task names, got {tasks!r}")
    if isinstance(tasks, Mapping):  # its keys would be taken silently, its values dropped
        raise StrategyError(
            f"tasks must be a sequence of task names, got a mapping {dict(tasks)!r}: pass "
            "list(...) of its keys, and any per-task values as the strategy's own argument "
            "(e.g. static's weights=)"
        )
    names = tuple(tasks)
    if not names:
        raise StrategyError("tasks must name at least one task")
    for name in names:
        if not isinstance(name, str) or not name:
            raise StrategyError(f"tasks must be non-empty strings, got {name!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise StrategyError(f"tasks must be unique, {duplicates} appear more than once")
    return names


def per_task_vector(
    values: Mapping[str, float] | Sequence[float] | float,
    tasks: Sequence[str],
    *,
    argument: str,
) -> Tensor:
    """A float tensor with one entry per task from a mapping, a sequence or one number."""
    if isinstance(values, Mapping):
        unknown = sorted(set(values) - set(tasks))
        if unknown:
            raise StrategyError(
                f"{argument} names unknown tasks {unknown}; tasks are {list(tasks)}"
            )
        missing = [t for t in tasks if t not in values]
        if missing:
            raise StrategyError(f"{argument} gives no value for tasks {missing}")
        items = [values[t] for t in tasks]
    elif isinstance(values, (int, float)):
        items = [values] * len(tasks)
    else:
        items = list(values)
        if len(items) != len(tasks):
            raise StrategyError(
                f"{argument} has {len(items)} values for {len(tasks)} tasks {list(tasks)}"
            )
    try:
        # The default dtype, like a module's parameters: state and its optimizer agree in dtype.
        vector = torch.tensor([float(v) for v in items], dtype=torch.get_default_dtype())
    except (TypeError, ValueError) as error:
        raise StrategyError(f"{argument} must hold numbers, got {items!r}") from error
    if not torch.isfinite(vector).all():
        raise StrategyError(f"{argument} must be finite, got {items!r}")
    return vector


def validate_losses(
    losses: Mapping[str, Tensor], tasks: Sequence[str]
) -> tuple[tuple[str, ...], list[Tensor]]:
    """Check a ``task -> scalar loss`` mapping; return the present tasks in ``tasks`` order and
    their losses as 0-d tensors of one dtype (on one device). Errors name the culprit."""
    if not isinstance(losses, Mapping):
        raise StrategyError(
            f"losses must be a mapping task name -> scalar tensor, got {type(losses).__name__}"
        )
    if not losses:
        raise StrategyError(f"losses is empty; expected some of the tasks {list(tasks)}")
    unknown = [name for name in losses if name not in tasks]
    if unknown:
        raise StrategyError(f"unknown task {unknown[0]!r} in losses; tasks are {list(tasks)}")
    names = tuple(t for t in tasks if t in losses)
    device = None
    for name in names:
        loss = losses[name]
        if not isinstance(loss, Tensor):
            raise StrategyError(
                f"loss of task {name!r} must be a tensor, got {type(loss).__name__}"
            )
        if loss.numel() != 1 or loss.dim() > 1:
            raise StrategyError(
                f"loss of task {name!r} must be a scalar, got shape {tuple(loss.shape)}"
            )
        if not loss.is_floating_point():
            raise StrategyError(f"loss of task {name!r} must be floating point, got {loss.dtype}")
        if device is None:
            device = loss.device
        elif loss.device != device:
            raise StrategyError(
                f"loss of task {name!r} is on {loss.device}, task {names[0]!r} on {device}"
            )
    dtype = functools.reduce(torch.promote_types, (losses[n].dtype for n in names))
    # The losses themselves where they already are 0-d of that dtype: a view or a cast would
    # add a node per task to the graph (and cost more than the rest of the checks).
    return names, [_scalar(losses[n], dtype) for n in names]


def _scalar(loss: Tensor, dtype: torch.dtype) -> Tensor:
    loss = loss if loss.dim() == 0 else loss.reshape(())
    return loss if loss.dtype == dtype else loss.to(dtype)


def check_graphs(names: Sequence[str], parts: Sequence[Tensor]) -> None:
    """A training step (some loss has a graph) needs every present task's loss to have one.

    A loss computed under ``torch.no_grad()`` or detached would otherwise be weighted, reported
    and never trained. Without any graph (evaluation) nothing is checked.
    """
    if not torch.is_grad_enabled():
        return
    graphs = [part.requires_grad for part in parts]
    if any(graphs) and not all(graphs):
        name = names[graphs.index(False)]
        raise StrategyError(
            f"loss of task {name!r} has no graph (computed under torch.no_grad() or detached?) "
            "while other tasks' losses have one: it would not be trained. Leave a task without "
            "a loss out of the mapping (partial labels)"
        )


def nonempty_list(given: Iterable[Tensor], argument: str) -> list[Tensor]:
    """``list(given)``, refused when empty; an iterator already used up (``model.parameters()``,
    a generator, kept and passed again at a later step) is named as the cause."""
    tensors = list(given)
    if not tensors:
        used_up = iter(given) is given
        raise StrategyError(
            f"{argument} is empty"
            + (
                ": it is an iterator that an earlier step used up (model.parameters() is a "
                "generator); pass model.trunk.parameters() anew at every step, or a list"
                if used_up
                else ""
            )
        )
    return tensors


def check_finite(names: Sequence[str], values: Tensor) -> None:
    """Raise :class:`NonFiniteLossError` naming the first task whose loss is NaN or infinite.
    One host sync: a NaN must fail loudly, before anything is updated. (A strategy's step
    defers this check to its one verdict instead, with :func:`non_finite_error` as the message.)
    """
    if not bool(torch.isfinite(values.detach()).all()):
        raise non_finite_error(names, values)


def non_finite_error(names: Sequence[str], values: Tensor) -> NonFiniteLossError:
    """The error for the first task of ``names`` whose loss in ``values`` is not finite (reads
    the values back: call it only once a loss is known not to be finite)."""
    finite = torch.isfinite(values.detach()).tolist()
    position = finite.index(False)
    return NonFiniteLossError(
        f"loss of task {names[position]!r} is not finite ({values[position].item()})",
        task=names[position],
    )
