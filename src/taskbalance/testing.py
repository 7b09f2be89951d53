"""Conformance checks that every strategy, built-in or plug-in, should pass.

    >>> import taskbalance as tb
    >>> from taskbalance.testing import check_strategy
    >>> check_strategy("static")  # a registered name, or a factory:
    >>> check_strategy(lambda tasks: tb.create_strategy("static", tasks, weights=2.0))

``check_strategy`` runs every check of :data:`CHECKS` on a small two-layer model with three tasks
and raises ``AssertionError`` naming the check that failed. The project's own suite runs each
check for every name in :func:`taskbalance.list_strategies`, so a newly registered strategy is
tested without anyone adding it by hand.

What the checks expect of a strategy:

* both backward paths (``shared_params=``, ``features=``) fill finite gradients everywhere;
* a loss-level strategy's ``s(losses).backward()`` equals ``s.backward(losses)``, and its
  weights are the gradient of its objective;
* evaluation (``s(losses)`` on losses without a graph) returns a finite scalar and changes no
  state;
* partial labels: a step without task ``b`` leaves ``b``'s head without gradient and every
  per-task state entry of ``b`` (dimension 0 of a parameter or buffer) unchanged, and moves
  the present tasks' heads and every per-task state entry that the same step with all tasks
  present moves;
* a NaN or infinite loss raises :class:`~taskbalance.NonFiniteLossError` naming the task, and
  leaves the strategy state and the model's gradients as they were; bad input raises
  :class:`~taskbalance.StrategyError` naming the culprit;
* ``state_dict()`` survives ``torch.save``/``torch.load(weights_only=True)`` and a resumed run
  continues bit for bit like one that never stopped (random strategies included);
* deterministic strategies are equivariant: permuting the tasks permutes the weights.
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from taskbalance.errors import NonFiniteLossError, StrategyError
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.loss_weighting import LossWeighting
from taskbalance.registry import create_strategy
from taskbalance.strategy import Strategy

__all__ = ["CHECKS", "ToyProblem", "check_strategy"]

Factory = Callable[[Sequence[str]], Strategy]
TASKS = ("a", "b", "c")
PATHS = ("shared_params", "features")


@dataclass
class ToyProblem:
    """A two-layer tanh trunk, one linear head per task, squared errors of different scales."""

    trunk: nn.Sequential
    heads: nn.ModuleDict
    scales: dict[str, float]

    @classmethod
    def create(cls, tasks: Sequence[str], seed: int = 0) -> ToyProblem:
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
            heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in sorted(tasks)})
        scales = {
            t: float(s)
            for t, s in zip(sorted(tasks), 0.5 + 2 * torch.rand(len(tasks), generator=generator))
        }
        return cls(trunk, heads, scales)

    def losses(
        self, step: int, tasks: Sequence[str] | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Losses of the tasks (default: all) on batch ``step``, and the trunk output."""
        generator = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(16, 4, generator=generator)
        targets = torch.randn(16, len(self.heads), generator=generator)
        features = self.trunk(x)
        losses = {}
        for column, task in enumerate(sorted(self.heads)):
            if tasks is None or task in tasks:
                error = self.heads[task](features).squeeze(1) - targets[:, column]
                losses[task] = self.scales[task] * (1.0 + error.pow(2).mean())
        return losses, features

    def parameters(self) -> list[nn.Parameter]:
        return [*self.trunk.parameters(), *self.heads.parameters()]

    def grads(self) -> list[Tensor | None]:
        return [None if p.grad is None else p.grad.clone() for p in self.parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    @torch.no_grad()
    def sgd_step(self, lr: float = 0.05) -> None:
        for p in self.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)


def _step(
    strategy: Strategy,
    problem: ToyProblem,
    step: int,
    path: str,
    tasks: Sequence[str] | None = None,
):
    problem.zero_grad()
    losses, features = problem.losses(step, tasks)
    kwargs = (
        {"features": features}
        if path == "features"
        else {"shared_params": problem.trunk.parameters()}
    )
    return strategy.backward(losses, **kwargs)


def _train(strategy: Strategy, problem: ToyProblem, steps: range, path: str) -> list[Tensor]:
    weights = []
    for step in steps:
        report = _step(strategy, problem, step, path)
        weights.append(report.weight_values.clone())
        problem.sgd_step()
    return weights


def _state(strategy: Strategy) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in strategy.state_dict().items() if isinstance(v, Tensor)}


def _assert_same_state(before: dict[str, Tensor], after: dict[str, Tensor], what: str) -> None:
    assert before.keys() == after.keys(), f"{what}: state keys changed"
    for key in before:
        assert torch.equal(before[key], after[key]), f"{what}: state {key!r} changed"


def _assert_finite_grads(problem: ToyProblem, what: str) -> None:
    for name, p in [*problem.trunk.named_parameters(), *problem.heads.named_parameters()]:
        assert p.grad is not None, f"{what}: parameter {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{what}: gradient of {name} is not finite"


def _expect_error(
    error: type[Exception], fragment: str, call: Callable[[], object], what: str
) -> None:
    try:
        call()
    except error as raised:
        assert fragment in str(raised), (
            f"{what}: message {str(raised)!r} does not name {fragment!r}"
        )
    else:
        raise AssertionError(f"{what}: no {error.__name__} raised")


# --------------------------------------------------------------------------- checks
def check_repr(factory: Factory) -> None:
    strategy = factory(TASKS)
    text = repr(strategy)
    assert type(strategy).__name__ in text and "tasks=" in text, f"repr lacks arguments: {text}"
    assert strategy.tasks == TASKS, f"tasks is {strategy.tasks!r}, expected {TASKS!r}"


def check_backward_paths(factory: Factory) -> None:
    for path in PATHS:
        strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
        for step in range(3):
            report = _step(strategy, problem, step, path)
            _assert_finite_grads(problem, f"{path} step {step}")
            assert report.tasks == TASKS, f"report tasks {report.tasks}"
            assert report.weight_values.shape == (len(TASKS),), "one weight per present task"
            assert torch.isfinite(report.weight_values).all(), f"{path}: weights not finite"
            assert set(report.to_dict()) >= {f"loss/{t}" for t in TASKS} | {
                f"weight/{t}" for t in TASKS
            }
            problem.sgd_step()


def check_forward_matches_backward(factory: Factory) -> None:
    strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
    losses, _ = problem.losses(0)
    if strategy.needs_grads:
        _expect_error(
            StrategyError,
            "backward",
            lambda: strategy(losses),
            "training forward of a needs_grads strategy",
        )
        return
    twin, twin_problem = copy.deepcopy(strategy), copy.deepcopy(problem)
    strategy(losses).backward()
    twin_losses, _ = twin_problem.losses(0)
    twin.backward(twin_losses)
    for mine, theirs in zip(problem.grads(), twin_problem.grads()):
        assert mine is not None and theirs is not None
        torch.testing.assert_close(
            mine, theirs, msg="s(losses).backward() differs from s.backward(losses)"
        )
    _assert_same_state(_state(strategy), _state(twin), "forward path vs backward path")
    assert isinstance(twin, LossWeighting)
    detached, index = torch.stack(list(losses.values())).detach(), torch.arange(len(TASKS))
    probe = detached.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(twin.objective(probe, index), probe)
    with torch.no_grad():
        weights = twin.loss_weights(detached, index)
    torch.testing.assert_close(
        weights.float(), expected.float(), msg="weights are not d objective / d losses"
    )


def check_evaluation(factory: Factory) -> None:
    strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
    _train(strategy, problem, range(2), "features")
    before = _state(strategy)
    with torch.no_grad():
        losses, _ = problem.losses(5)
        value = strategy(losses)
    assert value.dim() == 0 and torch.isfinite(value), f"evaluation value {value}"
    _assert_same_state(before, _state(strategy), "evaluation")


def check_partial_labels(factory: Factory) -> None:
    present = ("a", "c")
    for path in PATHS:
        strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
        _train(strategy, problem, range(2), path)
        # The same step with every task shows which per-task state a step moves.
        full, full_problem = copy.deepcopy(strategy), copy.deepcopy(problem)
        before = _state(strategy)
        _step(full, full_problem, 2, path)
        moved = _moved_rows(before, _state(full))
        report = _step(strategy, problem, 2, path, tasks=present)
        assert report.tasks == present, f"report tasks {report.tasks}"
        assert torch.isfinite(report.weight_values).all(), f"{path}: weights not finite"
        assert all(p.grad is None for p in problem.heads["b"].parameters()), (
            "absent task's head got a gradient"
        )
        for task in present:
            assert all(p.grad is not None for p in problem.heads[task].parameters()), (
                f"{path}: the head of the present task {task!r} got no gradient"
            )
        after = _state(strategy)
        position = TASKS.index("b")
        for key in _per_task(after):
            assert torch.equal(after[key][position], before[key][position]), (
                f"{path}: state {key!r} of the absent task 'b' changed"
            )
        for key, rows in moved.items():
            for task in present:
                if TASKS.index(task) in rows:
                    row = TASKS.index(task)
                    assert not torch.equal(after[key][row], before[key][row]), (
                        f"{path}: state {key!r} of the present task {task!r} did not move "
                        "(it moves in the same step with every task present)"
                    )


def _per_task(state: dict[str, Tensor]) -> list[str]:
    """The state entries with one row per task (dimension 0)."""
    return [k for k, v in state.items() if v.dim() > 0 and v.shape[0] == len(TASKS)]


def _moved_rows(before: dict[str, Tensor], after: dict[str, Tensor]) -> dict[str, set[int]]:
    """Per per-task state entry, the rows (tasks) that differ between two states."""
    moved: dict[str, set[int]] = {}
    for key in _per_task(after):
        if key in before and before[key].shape == after[key].shape:
            rows = {i for i in range(len(TASKS)) if not torch.equal(before[key][i], after[key][i])}
            if rows:
                moved[key] = rows
    return moved


def check_nonfinite(factory: Factory) -> None:
    for bad in (float("nan"), float("inf")):
        for path in PATHS:
            strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
            _train(strategy, problem, range(2), path)
            problem.zero_grad()
            before = _state(strategy)
            losses, features = problem.losses(3)
            losses["b"] = losses["b"] * bad
            kwargs: dict[str, Any] = (
                {"features": features}
                if path == "features"
                else {"shared_params": problem.trunk.parameters()}
            )
            _expect_error(
                NonFiniteLossError,
                "'b'",
                functools.partial(strategy.backward, losses, **kwargs),
                f"{bad} loss",
            )
            _assert_same_state(before, _state(strategy), f"{bad} loss")
            assert all(g is None for g in problem.grads()), f"{bad} loss: gradients were written"


def check_bad_input(factory: Factory) -> None:
    strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
    losses, features = problem.losses(0)
    kwargs: dict[str, Any] = {"features": features}
    _expect_error(
        StrategyError,
        "'zzz'",
        lambda: strategy.backward({**losses, "zzz": losses["a"]}, **kwargs),
        "unknown task",
    )
    _expect_error(
        StrategyError,
        "'a'",
        lambda: strategy.backward({**losses, "a": losses["a"].expand(2)}, **kwargs),
        "non-scalar loss",
    )
    _expect_error(StrategyError, "empty", lambda: strategy.backward({}, **kwargs), "empty losses")
    _expect_error(
        StrategyError,
        "mapping",
        lambda: strategy.backward(list(losses.values()), **kwargs),  # type: ignore[arg-type]
        "a list of losses",
    )
    detached = {t: v.detach() for t, v in losses.items()}
    _expect_error(
        StrategyError,
        "require grad",
        lambda: strategy.backward(detached, **kwargs),
        "losses without graph",
    )


def check_resume(factory: Factory) -> None:
    for path in PATHS:
        strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
        _train(strategy, problem, range(3), path)
        buffer = io.BytesIO()
        torch.save(strategy.state_dict(), buffer)
        buffer.seek(0)
        resumed = factory(TASKS)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        resumed_problem = copy.deepcopy(problem)
        expected = _train(strategy, problem, range(3, 7), path)
        got = _train(resumed, resumed_problem, range(3, 7), path)
        for step, (a, b) in enumerate(zip(expected, got)):
            assert torch.equal(a, b), (
                f"{path}: resumed weights differ at step {step + 3}: {a} vs {b}"
            )
        for a, b in zip(problem.parameters(), resumed_problem.parameters()):
            assert torch.equal(a, b), f"{path}: resumed model differs"


def check_permutation(factory: Factory) -> None:
    strategy = factory(TASKS)
    if not type(strategy).deterministic:
        return
    permuted_tasks = TASKS[::-1]
    for path in PATHS:
        strategy, permuted = factory(TASKS), factory(permuted_tasks)
        problem = ToyProblem.create(TASKS)
        twin = copy.deepcopy(problem)
        for step in range(3):
            report = _step(strategy, problem, step, path)
            other = _step(permuted, twin, step, path)
            for task in TASKS:
                torch.testing.assert_close(
                    report.weights[task],
                    other.weights[task],
                    rtol=1e-4,
                    atol=1e-6,
                    msg=f"{path}: permuting the tasks changed the weight of {task!r}",
                )
            for a, b in zip(problem.grads(), twin.grads()):
                assert a is not None and b is not None
                torch.testing.assert_close(
                    a,
                    b,
                    rtol=1e-4,
                    atol=1e-6,
                    msg=f"{path}: permuting the tasks changed the update",
                )
            problem.sgd_step()
            twin.sgd_step()


def check_aggregate_matches_backward(factory: Factory) -> None:
    strategy = factory(TASKS)
    if not isinstance(strategy, GradientAggregation):
        return
    problem = ToyProblem.create(TASKS)
    twin = copy.deepcopy(strategy)
    params = list(problem.trunk.parameters())
    losses, _ = problem.losses(0)
    rows = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
            for loss in losses.values()
        ]
    )
    direction = twin.aggregate(rows, torch.stack(list(losses.values())).detach())
    assert direction.shape == (rows.shape[1],) and torch.isfinite(direction).all()
    problem.zero_grad()
    strategy.backward(losses, shared_params=params)
    written = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
    torch.testing.assert_close(
        written, direction, rtol=1e-4, atol=1e-6, msg="aggregate(J) differs from backward's update"
    )


CHECKS: dict[str, Callable[[Factory], None]] = {
    "repr": check_repr,
    "backward_paths": check_backward_paths,
    "forward_matches_backward": check_forward_matches_backward,
    "evaluation": check_evaluation,
    "partial_labels": check_partial_labels,
    "nonfinite": check_nonfinite,
    "bad_input": check_bad_input,
    "resume": check_resume,
    "permutation": check_permutation,
    "aggregate_matches_backward": check_aggregate_matches_backward,
}


def _as_factory(strategy: str | Factory) -> Factory:
    if isinstance(strategy, str):
        name = strategy
        return lambda tasks: create_strategy(name, tasks)
    return strategy


def check_strategy(strategy: str | Factory, checks: Sequence[str] | None = None) -> None:
    """Run the conformance checks (all, or the named ones) on a registered name or a factory."""
    factory = _as_factory(strategy)
    for name in checks if checks is not None else CHECKS:
        try:
            CHECKS[name](factory)
        except AssertionError as failure:
            raise AssertionError(f"conformance check {name!r} failed: {failure}") from failure
