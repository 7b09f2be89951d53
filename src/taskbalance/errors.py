"""The errors every part of taskbalance raises on bad input; a message names the culprit."""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "SolverError", "StrategyError"]


class StrategyError(ValueError):
    """Bad input to a strategy; the message names the task or argument at fault."""


class NonFiniteLossError(StrategyError):
    """A task loss is NaN or infinite. Nothing was updated."""


class SolverError(StrategyError):
    """A strategy's per-step problem has no solution, or its solver did not converge.

    Strategies with such a problem (Nash-MTL, FairGrad, CAGrad, MGDA, UPGrad, DualProj) take an
    ``on_failure`` argument: ``"reuse"`` falls back to the previous step's weights (and counts
    the fallback in the step report), ``"raise"`` raises this error.
    """
