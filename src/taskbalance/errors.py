"""The errors every part of taskbalance raises on bad input; a message names the culprit."""

from __future__ import annotations

from typing import Any

__all__ = ["NonFiniteLossError", "SolverError", "StrategyError", "TaskSpecificInputWarning"]


class StrategyError(ValueError):
    """Bad input to a strategy; the message names the task or argument at fault."""


class NonFiniteLossError(StrategyError):
    """A task loss is NaN or infinite. Nothing was updated; ``task`` names the task.

    >>> error = NonFiniteLossError("loss of task 'depth' is not finite (nan)", task="depth")
    >>> error.task
    'depth'
    """

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message)
        self.task = task

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (multiprocessing) keep the task
        return (_non_finite, (str(self), self.task))


def _non_finite(message: str, task: str | None) -> NonFiniteLossError:
    return NonFiniteLossError(message, task=task)


class SolverError(StrategyError):
    """A strategy's per-step problem has no solution, or its solver did not converge.

    Strategies with such a problem (Nash-MTL, FairGrad, CAGrad, MGDA, UPGrad, DualProj) take an
    ``on_failure`` argument: ``"reuse"`` falls back to the previous step's weights (and counts
    the fallback in the step report), ``"raise"`` raises this error.
    """


class TaskSpecificInputWarning(UserWarning):
    """A tensor passed as ``shared_params=`` or ``features=`` is reached by some tasks only.

    Such a tensor is task-specific (a head's parameter, one task's branch of the features): in
    the per-task gradients it adds a block that only those tasks have, which changes the weights
    of every gradient method (Nash-MTL's, MGDA's, ...). It is a warning, not an error, because
    differentiating w.r.t. every parameter is a legitimate variant (Jacobian descent over the
    whole model); make it an error with ``warnings.simplefilter("error",
    tb.TaskSpecificInputWarning)``, or silence it with ``"ignore"``.
    """
