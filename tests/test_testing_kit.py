"""The conformance kit catches the mistakes a plug-in author makes, each with its check's name."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

import taskbalance as tb
from taskbalance.testing import CHECKS, ConformanceError, check_strategy


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
    with pytest.raises(ConformanceError, match=rf"(?m)^{check}: .*{message}") as raised:
        check_strategy(strategy, [check])
    assert list(raised.value.failures) == [check]
    assert message in raised.value.failures[check]


def test_kit_passes_a_correct_plug_in() -> None:
    class Halves(tb.LossWeighting):
        def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
            return torch.full_like(losses, 0.5)

    assert check_strategy(Halves) is None


class Broken(tb.LossWeighting):
    """Four independent defects, each for its own check to name."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        # Defect 1: state in a plain tensor attribute (not saved, not undone, not per task).
        self.ema = torch.ones(len(self.tasks))
        self.add_state("calls", torch.zeros(()), per_task=False)

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        # Defect 2: a state change in loss_weights, which evaluation calls too.
        self.calls += 1
        return 1 / self.ema[index].to(losses.dtype)

    def objective(self, losses: Tensor, index: Tensor) -> Tensor:
        # Defect 3: an objective whose gradient (2 / ema) is not the weights (1 / ema).
        return (2 * losses / self.ema[index].to(losses.dtype)).sum()

    def on_train_step(self, losses: Tensor, index: Tensor) -> None:
        self.ema[index] = 0.9 * self.ema[index] + 0.1 * losses.to(self.ema.dtype)

    def extras(self, index: Tensor) -> dict[str, Tensor]:
        # Defect 4: a raw torch error (a shape mismatch) when a task is absent.
        return {"ema": self.ema[index] + self.ema}


def test_kit_reports_every_failure_with_its_cause() -> None:
    with pytest.raises(ConformanceError) as raised:
        check_strategy(Broken)
    failures = raised.value.failures
    expected = {
        "declared_state": "Broken.ema is a plain tensor attribute",
        "forward_matches_backward": "weights are not d objective / d losses (task 'a': weight ",
        "evaluation": "evaluation: state 'calls' changed",
        "hooks": "evaluation changed ['calls']",
        "partial_labels": "raised RuntimeError: The size of tensor a (2) must match",
        "resume": "resumed weights differ",
    }
    assert set(failures) == set(expected), failures
    for check, fragment in expected.items():
        assert fragment in failures[check], (check, failures[check])
    assert "self.add_state('ema', ...)" in failures["declared_state"]
    # the raw error names the call it happened in and the plug-in's line
    assert "in backward(" in failures["partial_labels"]
    assert "test_testing_kit.py" in failures["partial_labels"]
    assert "in extras" in failures["partial_labels"]
    # one line per failed check, under a header; an AssertionError for pytest and for users
    message = str(raised.value)
    assert isinstance(raised.value, AssertionError)
    assert message.startswith(f"6 of {len(CHECKS)} conformance checks failed for Broken:")
    lines = message.splitlines()
    for check in expected:
        assert sum(line.startswith(f"{check}: ") for line in lines) == 1
    assert "Traceback" not in message


class UndeclaredBuffer(tb.LossWeighting):
    """Counts steps in a buffer it registered itself, not with add_state."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.register_buffer("seen", torch.zeros(len(self.tasks)))

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.ones_like(losses)

    def on_train_step(self, losses: Tensor, index: Tensor) -> None:
        self.seen[index] += 1


def test_kit_names_an_undeclared_buffer_that_changes() -> None:
    with pytest.raises(ConformanceError) as raised:
        check_strategy(UndeclaredBuffer, ["declared_state", "forward_matches_backward"])
    assert set(raised.value.failures) == {"declared_state"}
    assert raised.value.failures["declared_state"].startswith(
        "buffer 'seen' changes during training but is not declared with add_state"
    )


class StateInLossWeights(tb.LossWeighting):
    """Moves an EMA (a plain attribute) in loss_weights: the objective and the weights, read
    one after the other, see different states; yet the weights are the objective's gradient."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.scale = torch.ones(len(self.tasks))

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        self.scale[index] = self.scale[index] + 1
        return self.scale[index].to(losses.dtype)


def test_kit_does_not_blame_the_objective_for_moving_state() -> None:
    with pytest.raises(ConformanceError) as raised:
        check_strategy(StateInLossWeights, ["forward_matches_backward", "declared_state"])
    assert set(raised.value.failures) == {"declared_state"}
    assert "StateInLossWeights.scale is a plain tensor attribute" in str(raised.value)


class HooksTwice(tb.LossWeighting):
    """Calls its own on_train_step again from loss_weights in training (an update per call)."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.add_state("seen", torch.zeros(len(self.tasks)))

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        if torch.is_grad_enabled() or self.training:
            self.on_train_step(losses, index)
        return torch.ones_like(losses)

    def on_train_step(self, losses: Tensor, index: Tensor) -> None:
        self.seen[index] += 1


def test_kit_counts_the_training_hooks() -> None:
    with pytest.raises(ConformanceError, match=r"(?m)^hooks: .*called on_train_step 2 times"):
        check_strategy(HooksTwice, ["hooks"])


class WrongCombine(tb.LossWeighting):
    """``combine`` scaled by 2: ``total.backward()`` is not what ``backward`` writes."""

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.ones_like(losses)

    def combine(self, losses, **kwargs):  # type: ignore[no-untyped-def, override]
        total, report = super().combine(losses, **kwargs)
        return 2 * total, report


def test_kit_compares_combine_with_backward() -> None:
    with pytest.raises(ConformanceError) as raised:
        check_strategy(WrongCombine, ["combine_matches_backward"])
    cause = raised.value.failures["combine_matches_backward"]
    assert cause.startswith("shared_params step 0: combine's total.backward() and backward() give")
    assert "off by" in cause


class NoEndEpoch(tb.LossWeighting):
    end_epoch = None  # type: ignore[assignment]

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.ones_like(losses)


def test_kit_requires_end_epoch() -> None:
    with pytest.raises(ConformanceError, match=r"(?m)^hooks: NoEndEpoch.end_epoch is missing"):
        check_strategy(NoEndEpoch, ["hooks"])


class RaisesInWeights(tb.LossWeighting):
    """A raw torch error in every step: a matrix product of mismatched shapes."""

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.ones(len(losses), 2) @ torch.ones(3)


def test_kit_turns_a_raw_error_into_the_checks_failure() -> None:
    with pytest.raises(ConformanceError) as raised:
        check_strategy(RaisesInWeights, ["repr", "backward_paths", "evaluation"])
    failures = raised.value.failures
    assert set(failures) == {"backward_paths", "evaluation"}  # repr passes
    for check in failures:
        assert failures[check].startswith("raised RuntimeError: "), failures[check]
        assert "in loss_weights" in failures[check]
    assert "in backward(shared_params=...)" in failures["backward_paths"]
    assert "in backward(features=...)" in failures["evaluation"]  # its training steps
    assert str(raised.value).splitlines()[1].startswith("backward_paths: raised RuntimeError: ")


def test_kit_rejects_an_unknown_check() -> None:
    with pytest.raises(ValueError, match="unknown conformance checks"):
        check_strategy("equal", ["no_such_check"])


def test_conformance_error_survives_pickling() -> None:
    import pickle

    error = ConformanceError({"hooks": "a cause"}, "X", 3)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.failures == {"hooks": "a cause"} and str(copy) == str(error)


class LearnedScale(tb.LossWeighting):
    """A learned per-task scale ``s``: objective ``Σ e^(s_i) L_i − s_i``, so ∂/∂s_i is
    ``w_i L_i − 1``; ``error`` adds to the closed form's gradient (0: right)."""

    error = 0.0

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.add_learned_parameter("s", torch.zeros(len(self.tasks)), lr=0.1)

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.exp(self.s[index])

    def objective(self, losses: Tensor, index: Tensor) -> Tensor:
        return (torch.exp(self.s[index]) * losses - self.s[index]).sum()

    def objective_and_gradients(
        self, losses: Tensor, index: Tensor, weights: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        weighted = weights * losses
        value = (weighted - self.s[index]).sum()
        return value, {"s": weighted - 1 + self.error * index}


class WrongGradient(LearnedScale):
    error = 0.5  # off for every task but the first


class WrongValue(LearnedScale):
    def objective_and_gradients(
        self, losses: Tensor, index: Tensor, weights: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        value, grads = super().objective_and_gradients(losses, index, weights)
        return value + 1, grads  # the objective without its constant: not its value


class EveryRow(LearnedScale):
    """Returns the gradient of every task, not the rows of the present ones."""

    def objective_and_gradients(
        self, losses: Tensor, index: Tensor, weights: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        value, grads = super().objective_and_gradients(losses, index, weights)
        full = torch.zeros_like(self.s)
        full[index] = grads["s"]
        return value, {"s": full}


def test_kit_checks_a_closed_form_against_the_objective() -> None:
    assert check_strategy(LearnedScale) is None
    check = ["objective_and_gradients"]
    with pytest.raises(ConformanceError) as raised:
        check_strategy(WrongGradient, check)
    cause = raised.value.failures["objective_and_gradients"]
    assert cause.startswith(
        "objective_and_gradients() with tasks ('a', 'b', 'c'): 's' is not the gradient of "
        "objective (task 'b': closed form "
    )
    assert "task 'c': closed form" in cause
    assert "task 'a'" not in cause  # right for the first task: not named
    with pytest.raises(ConformanceError) as raised:
        check_strategy(WrongValue, check)
    assert raised.value.failures["objective_and_gradients"].startswith(
        "objective_and_gradients() with tasks ('a', 'b', 'c'): the value is not objective's ("
    )
    with pytest.raises(ConformanceError) as raised:
        check_strategy(EveryRow, check)
    assert raised.value.failures["objective_and_gradients"] == (
        "objective_and_gradients() with tasks ('a', 'c'): the gradient of 's' must have the "
        "present tasks' rows, shape (2,), got (3,)"
    )
