"""MultiTaskLoss: one criterion per task plus any strategy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn

from taskbalance.errors import StrategyError
from taskbalance.registry import create_strategy
from taskbalance.report import StepReport
from taskbalance.strategy import Strategy

Criterion = Callable[[Tensor, Tensor], Tensor]


class MultiTaskOutput(NamedTuple):
    """The combined loss (``None`` for strategies that need gradients) and the task losses."""

    total: Tensor | None
    losses: dict[str, Tensor]


class _Function(nn.Module):
    def __init__(self, function: Criterion) -> None:
        super().__init__()
        self.function = function

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        return self.function(output, target)


class MultiTaskLoss(nn.Module):
    """The article's ``MultiTaskLoss(alpha, beta)`` generalised to any tasks and any strategy.

    ``criteria`` maps each task to a loss function ``(output, target) -> scalar``; ``strategy``
    is a :class:`Strategy` or a registry name (built for the criteria's tasks with
    ``strategy_kwargs``). Targets may hold a subset of the tasks (partial labels): only those
    losses are computed.

        >>> import torch, taskbalance as tb
        >>> mtl = tb.MultiTaskLoss({"cls": torch.nn.CrossEntropyLoss(), "reg": torch.nn.MSELoss()},
        ...                        "static", weights={"cls": 0.5, "reg": 2.0})
        >>> outputs = {"cls": torch.tensor([[2.0, 0.0]]), "reg": torch.tensor([1.5])}
        >>> targets = {"cls": torch.tensor([0]), "reg": torch.tensor([1.0])}
        >>> total, losses = mtl(outputs, targets)
        >>> torch.allclose(total, 0.5 * losses["cls"] + 2.0 * losses["reg"])
        True
    """

    def __init__(
        self,
        criteria: Mapping[str, Criterion],
        strategy: Strategy | str = "equal",
        **strategy_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(criteria, Mapping) or not criteria:
            raise StrategyError("criteria must be a non-empty mapping task -> loss function")
        for task, criterion in criteria.items():
            if not callable(criterion):
                raise StrategyError(f"criterion of task {task!r} is not callable")
        self.criteria = nn.ModuleDict(
            {t: c if isinstance(c, nn.Module) else _Function(c) for t, c in criteria.items()}
        )
        if isinstance(strategy, str):
            strategy = create_strategy(strategy, list(criteria), **strategy_kwargs)
        elif strategy_kwargs:
            raise StrategyError("strategy_kwargs are only used when strategy is a name")
        if set(strategy.tasks) != set(criteria):
            raise StrategyError(
                f"strategy tasks {list(strategy.tasks)} differ from criteria tasks {list(criteria)}"
            )
        self.strategy = strategy

    def losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The loss of every task that has a target."""
        losses = {}
        for task, target in targets.items():
            if task not in self.criteria:
                raise StrategyError(
                    f"unknown task {task!r} in targets; tasks are {list(self.criteria)}"
                )
            if task not in outputs:
                raise StrategyError(f"outputs have no entry for task {task!r}")
            losses[task] = self.criteria[task](outputs[task], target)
        return losses

    def forward(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> MultiTaskOutput:
        losses = self.losses(outputs, targets)
        needs_grads = (
            self.strategy.needs_grads
            and self.training
            and any(loss.requires_grad for loss in losses.values())
        )
        return MultiTaskOutput(None if needs_grads else self.strategy(losses), losses)

    def backward(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], **kwargs: Any
    ) -> StepReport:
        """``strategy.backward`` on the task losses; ``kwargs`` go to it (shared_params=, ...)."""
        return self.strategy.backward(self.losses(outputs, targets), **kwargs)
