"""The conformance kit catches the mistakes a plug-in author makes, each with its check's name."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

import taskbalance as tb
from taskbalance.testing import check_strategy


class WeightsNotGradient(tb.LossWeighting):
    """Weights 1, but an objective whose gradient is 2: forward and backward disagree."""

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.ones_like(losses)

    def objective(self, losses: Tensor, index: Tensor) -> Tensor:
        return 2 * losses.sum()


class CountsInEvaluation(tb.LossWeighting):
    """Counts every call, evaluation included."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.register_buffer("calls", torch.zeros(()))

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        self.calls += 1
        return torch.ones_like(losses)


class StateInPlainAttribute(tb.LossWeighting):
    """Keeps its step counter in a Python attribute, which state_dict() does not save."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.steps = 0

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.full_like(losses, 1.0 + self.steps)

    def backward(self, losses, **kwargs):  # type: ignore[no-untyped-def, override]
        report = super().backward(losses, **kwargs)
        self.steps += 1
        return report


class OrderDependent(tb.LossWeighting):
    """Weights by position in ``tasks``: not equivariant, yet claims to be deterministic."""

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return (index + 1).to(losses.dtype)


class TouchesAbsentTasks(tb.LossWeighting):
    """Updates every task's statistic, present or not."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.register_buffer("seen_steps", torch.zeros(len(self.tasks)))

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.ones_like(losses)

    def backward(self, losses, **kwargs):  # type: ignore[no-untyped-def, override]
        report = super().backward(losses, **kwargs)
        self.seen_steps += 1
        return report


class FreezesUnderPartialLabels(tb.LossWeighting):
    """Counts each task's steps, but only when every task is present."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.register_buffer("seen_steps", torch.zeros(len(self.tasks)))

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.ones_like(losses)

    def backward(self, losses, **kwargs):  # type: ignore[no-untyped-def, override]
        report = super().backward(losses, **kwargs)
        if len(report.tasks) == len(self.tasks):
            self.seen_steps += 1
        return report


@pytest.mark.parametrize(
    ("strategy", "check", "message"),
    [
        (WeightsNotGradient, "forward_matches_backward", "not d objective / d losses"),
        (CountsInEvaluation, "evaluation", "evaluation"),
        (StateInPlainAttribute, "resume", "resumed weights differ"),
        (OrderDependent, "permutation", "permuting the tasks"),
        (TouchesAbsentTasks, "partial_labels", "absent task 'b' changed"),
        (FreezesUnderPartialLabels, "partial_labels", "present task 'a' did not move"),
    ],
)
def test_kit_names_the_failed_check(strategy: type[tb.Strategy], check: str, message: str) -> None:
    with pytest.raises(AssertionError, match=rf"conformance check '{check}' failed: .*{message}"):
        check_strategy(strategy, [check])


def test_kit_passes_a_correct_plug_in() -> None:
    class Halves(tb.LossWeighting):
        def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
            return torch.full_like(losses, 0.5)

    check_strategy(Halves)
