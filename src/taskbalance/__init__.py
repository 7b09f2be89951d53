"""taskbalance: how should the losses (or gradients) of several tasks become one update?"""

from __future__ import annotations

from taskbalance import strategies as _strategies  # noqa: F401  (registers the built-ins)
from taskbalance.errors import (
    NonFiniteLossError,
    SolverError,
    StrategyError,
    TaskSpecificInputWarning,
)
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.loss_weighting import LossWeighting
from taskbalance.losses import MultiTaskLoss
from taskbalance.optim import TaskOptimizers, list_optimizers, make_optimizer
from taskbalance.registry import (
    StrategyInfo,
    create_strategy,
    list_strategies,
    register_strategy,
    strategy_info,
)
from taskbalance.report import StepReport
from taskbalance.strategy import Strategy

__version__ = "0.1.0"

__all__ = [
    "GradientAggregation",
    "LossWeighting",
    "MultiTaskLoss",
    "NonFiniteLossError",
    "SolverError",
    "StepReport",
    "Strategy",
    "StrategyError",
    "StrategyInfo",
    "TaskOptimizers",
    "TaskSpecificInputWarning",
    "create_strategy",
    "list_optimizers",
    "list_strategies",
    "make_optimizer",
    "register_strategy",
    "strategy_info",
]
