"""Per-step problems that can fail: the ``on_failure`` policy, and Nash-MTL's clip on reused
weights.

Every strategy whose weights solve a problem without a guaranteed solution takes
``on_failure="reuse"`` (default: the previous step's solution, equal weights before any, a
warning on the first fallback, the count in the report) or ``"raise"`` (:class:`SolverError`,
nothing changed). Failures are injected through the engine's ``solved``, where every strategy
hands its solver over, so that every strategy is tested the same way whatever its solver returns
(weights, or a :class:`~taskbalance.solvers.Solution`); real failures (no solution) are tested
too. (Failures that a Solution reports without a sync: ``test_syncs.py``.)
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import taskbalance as tb
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.solvers import Solution
from taskbalance.testing import ToyProblem

TASKS = ("a", "b", "c")
# strategy -> the solution meaning "equal weights"
SOLVERS = {
    "mgda": "mean",
    "cagrad": "mean",
    "nash_mtl": "sum",
    "fairgrad": "mean",
    "upgrad": "mean",
    "dualproj": "mean",
}


def has_failure_policy(name: str) -> bool:
    cls = tb.registry.strategy_info(name).cls
    declared = "on_failure" in inspect.signature(cls.__init__).parameters
    strategy = tb.create_strategy(name, TASKS)
    assert declared == (getattr(strategy, "on_failure", None) is not None), name
    return declared


def test_every_strategy_with_a_failing_problem_has_the_policy() -> None:
    assert {n for n in tb.list_strategies() if has_failure_policy(n)} == set(SOLVERS)
    for name in SOLVERS:
        strategy = tb.create_strategy(name, TASKS)
        assert strategy.on_failure == "reuse", f"{name}: the default is 'reuse'"
        assert "on_failure='reuse'" in repr(strategy)
        assert tb.registry.strategy_info(name).stateful, f"{name} keeps its last solution"
    with pytest.raises(tb.StrategyError, match="on_failure must be 'reuse' or 'raise'"):
        tb.create_strategy("mgda", TASKS, on_failure="ignore")


def jacobian(seed: int) -> torch.Tensor:
    return torch.randn(3, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Solver:
    """Stands in for what a strategy hands to :meth:`GradientAggregation.solved`: fails (raises
    :class:`SolverError`), returns fixed weights, or runs the real solve and remembers its
    answer (the weights of a Solution)."""

    def __init__(self) -> None:
        self.mode = "real"
        self.fixed: torch.Tensor | None = None
        self.last: torch.Tensor | None = None

    def wrap(self, solve: Callable[[], torch.Tensor | Solution]) -> Callable[[], torch.Tensor]:
        def stand_in() -> torch.Tensor:
            if self.mode == "fail":
                raise tb.SolverError("injected failure")
            if self.mode == "fixed":
                assert self.fixed is not None
                return self.fixed.clone()
            answer = solve()
            self.last = answer.weights if isinstance(answer, Solution) else answer
            return answer  # type: ignore[return-value]

        return stand_in


@pytest.fixture
def solver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Solver]:
    stand_in = Solver()
    solved = GradientAggregation.solved

    def solved_with_stand_in(self: GradientAggregation, solve: Any, index: Any, **kw: Any) -> Any:
        return solved(self, stand_in.wrap(solve), index, **kw)

    monkeypatch.setattr(GradientAggregation, "solved", solved_with_stand_in)
    yield stand_in


def direction_with(name: str, solver: Solver, solution: torch.Tensor, j: torch.Tensor):
    """The direction a fresh strategy gives on ``j`` when its solver returns ``solution``."""
    solver.mode, solver.fixed = "fixed", solution
    direction = tb.create_strategy(name, TASKS).aggregate(j)
    solver.mode = "real"
    return direction


@pytest.mark.parametrize("name", list(SOLVERS))
def test_reuse_takes_equal_weights_first_then_the_last_solution(name: str, solver: Solver):
    equal = 1 / 3 if SOLVERS[name] == "mean" else 1.0
    strategy = tb.create_strategy(name, TASKS)
    solver.mode = "fail"
    with pytest.warns(RuntimeWarning, match="previous step's weights.*injected failure"):
        first = strategy.aggregate(jacobian(0))
    torch.testing.assert_close(
        first, direction_with(name, solver, torch.full((3,), equal), jacobian(0))
    )
    solver.mode = "real"
    strategy.aggregate(jacobian(1))
    assert solver.last is not None
    solution = solver.last.clone()
    solver.mode = "fail"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is shown once per strategy
        reused = strategy.aggregate(jacobian(2))
    # The stored solution with this step's gradients (Nash-MTL re-clips it, CAGrad rebuilds d).
    torch.testing.assert_close(reused, direction_with(name, solver, solution, jacobian(2)))
    assert int(strategy.failures) == 2
    state = strategy.state_dict()
    assert int(state["failures"]) == 2 and bool(state["has_last_weights"].all())


@pytest.mark.parametrize("name", list(SOLVERS))
def test_raise_leaves_everything_as_it_was(name: str, solver: Solver) -> None:
    strategy = tb.create_strategy(name, TASKS, on_failure="raise")
    strategy.aggregate(jacobian(1))
    before = copy.deepcopy(strategy.state_dict())
    problem = ToyProblem.create(TASKS)
    losses, features = problem.losses(0)
    solver.mode = "fail"
    for call in (
        lambda: strategy.aggregate(jacobian(2)),
        lambda: strategy.backward(losses, features=features),
        lambda: strategy.backward(losses, shared_params=problem.trunk.parameters()),
    ):
        with pytest.raises(tb.SolverError, match="injected failure"):
            call()
    after = strategy.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
    assert all(g is None for g in problem.grads()), "a failed step wrote gradients"


@pytest.mark.parametrize("path", ["shared_params", "features"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_report_carries_the_flag_and_the_running_count(name: str, solver: Solver, path: str):
    strategy = tb.create_strategy(name, TASKS)
    problem = ToyProblem.create(TASKS)
    seen = []
    for step, mode in enumerate(["real", "fail", "real", "fail", "fail"]):
        solver.mode = mode
        problem.zero_grad()
        losses, features = problem.losses(step)
        kwargs = (
            {"features": features}
            if path == "features"
            else {"shared_params": problem.trunk.parameters()}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            report = strategy.backward(losses, **kwargs)
        logged = report.to_dict(prefix="mtl/")
        seen.append((logged["mtl/failed"], logged["mtl/failures"]))
        for parameter in problem.trunk.parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
        problem.sgd_step()
    assert seen == [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 2.0), (1.0, 3.0)]


@pytest.mark.parametrize("name", list(SOLVERS))
def test_partial_labels_reuse_only_complete_solutions(name: str, solver: Solver) -> None:
    kind = SOLVERS[name]
    equal = 0.5 if kind == "mean" else 1.0
    strategy = tb.create_strategy(name, TASKS)
    problem = ToyProblem.create(TASKS)
    losses, features = problem.losses(0, tasks=("a", "b"))
    strategy.backward(losses, features=features)  # solves for a and b only
    assert solver.last is not None
    solution = solver.last.clone()
    solver.mode = "fail"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        problem.zero_grad()
        losses, features = problem.losses(1, tasks=("a", "b"))
        strategy.backward(losses, features=features)
        reused = strategy.previous_weights(torch.tensor([0, 1]), equal=kind)
        torch.testing.assert_close(reused, solution.to(reused.dtype))
        fresh = strategy.previous_weights(torch.tensor([0, 2]), equal=kind)  # c: none
        torch.testing.assert_close(fresh, torch.full((2,), equal))


def test_problems_without_solution_fall_back_or_raise() -> None:
    """Nash-MTL and FairGrad have no solution for opposite gradients (as at a Pareto front):
    the default goes on with the previous weights, as the official Nash-MTL code does."""
    good = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    opposite = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    for name in ("nash_mtl", "fairgrad"):
        strategy = tb.create_strategy(name, TASKS)
        strategy.aggregate(good)
        weights = strategy.last_weights.clone()
        with pytest.warns(RuntimeWarning, match="previous step's weights"):
            direction = strategy.aggregate(opposite)
        if name == "fairgrad":
            torch.testing.assert_close(direction, weights @ opposite)
        assert int(strategy.failures) == 1 and torch.isfinite(direction).all()
        with pytest.raises(tb.SolverError):
            tb.create_strategy(name, TASKS, on_failure="raise").aggregate(opposite)


# --------------------------------------------------------------------------- Nash-MTL's clip
def official_update(alpha: torch.Tensor, jacobian: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The official trainer's shared update: backward of Σ α_i L_i, then clip_grad_norm_."""
    parameter = torch.nn.Parameter(torch.zeros(jacobian.shape[1]))
    parameter.grad = alpha.to(jacobian.dtype) @ jacobian
    torch.nn.utils.clip_grad_norm_([parameter], max_norm)
    return parameter.grad


def test_nash_reclips_reused_weights_with_each_steps_gradients() -> None:
    """The issue's case: J = diag(1, 2) then diag(3, 2) with update_weights_every = 2 gives
    update norms 1.0 and 1.0 (the reused α is clipped again with the second step's ‖d‖)."""
    first, second = torch.diag(torch.tensor([1.0, 2.0])), torch.diag(torch.tensor([3.0, 2.0]))
    alpha = torch.tensor([1.0, 0.5])  # orthogonal: α_i = 1/‖g_i‖, solved on the first step
    expected = [official_update(alpha, first, 1.0), official_update(alpha, second, 1.0)]
    assert [round(float(e.norm()), 5) for e in expected] == [1.0, 1.0]
    strategy = tb.create_strategy("nash_mtl", ["a", "b"], update_weights_every=2)
    for j, reference in zip((first, second), expected):
        torch.testing.assert_close(strategy.aggregate(j), reference)
    # The same through backward, on parameters and on features (the reuse step skips the
    # per-task gradients and takes ‖d‖ from one gradient of Σ α_i L_i).
    for path in ("shared_params", "features"):
        strategy = tb.create_strategy("nash_mtl", ["a", "b"], update_weights_every=2)
        theta = torch.nn.Parameter(torch.zeros(2))
        for j, reference in zip((first, second), expected):
            theta.grad = None
            z = theta * 1.0 if path == "features" else theta
            losses = {"a": 1 + j[0] @ z, "b": 1 + j[1] @ z}
            kwargs = {"features": z} if path == "features" else {"shared_params": [theta]}
            strategy.backward(losses, **kwargs)
            assert theta.grad is not None
            torch.testing.assert_close(theta.grad, reference)


def test_nash_clip_with_max_norm_zero_and_small_updates() -> None:
    j = torch.diag(torch.tensor([1.0, 2.0]))
    unclipped = tb.create_strategy("nash_mtl", ["a", "b"], max_norm=0).aggregate(j)
    assert math.isclose(float(unclipped.norm()), math.sqrt(2), rel_tol=1e-6)
    # A bound above ‖d‖ leaves d alone (clip_grad_norm_ only shrinks).
    loose = tb.create_strategy("nash_mtl", ["a", "b"], max_norm=10.0).aggregate(j)
    torch.testing.assert_close(loose, unclipped)
