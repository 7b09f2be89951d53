"""The strategy protocol: hooks instead of overrides, declared state, one step once, combine."""

from __future__ import annotations

import ast
import copy
import inspect
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.loss_weighting import LossWeighting
from taskbalance.strategy import Strategy
from taskbalance.testing import ToyProblem

SOURCE = Path(tb.__file__).parent
ENGINE = {"strategy.py", "loss_weighting.py", "gradient_aggregation.py"}
TASKS = ("a", "b", "c")


def leaves(*values: float) -> dict[str, Tensor]:
    return {t: torch.tensor(v, requires_grad=True) for t, v in zip("abc", values)}


def computed(*values: float) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Losses with a graph (as a model computes them) and the leaves they come from."""
    roots = [torch.tensor(v, requires_grad=True) for v in values]
    return {t: r * 1.0 for t, r in zip("abc", roots)}, roots


# --------------------------------------------------------------------------- no overrides
def _base_methods() -> set[str]:
    names: set[str] = set()
    for base in (Strategy, LossWeighting, GradientAggregation):
        names |= {n for n, v in vars(base).items() if callable(v) or isinstance(v, property)}
    return names


@pytest.mark.parametrize("name", tb.list_strategies())
def test_built_in_strategies_fill_in_hooks_and_override_no_engine_method(name: str) -> None:
    cls = tb.registry.strategy_info(name).cls
    engine = _base_methods()
    for klass in cls.__mro__:
        if klass in (Strategy, LossWeighting, GradientAggregation) or not issubclass(
            klass, Strategy
        ):
            continue
        for method in vars(klass):
            assert method not in ("backward", "forward", "combine", "aggregate"), (
                f"{klass.__name__} overrides {method}"
            )
            assert not (method.startswith("_") and not method.startswith("__")) or (
                method not in engine
            ), f"{klass.__name__} overrides the engine's {method}"


def test_no_context_variable_outside_the_engine() -> None:
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name in ENGINE and path.parent == SOURCE:
            continue
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert "ContextVar" not in names, f"{path.relative_to(SOURCE)} uses a ContextVar"


def test_pure_solvers_do_not_import_the_base_class_module() -> None:
    for module in ("solvers.py", "cone.py"):
        tree = ast.parse((SOURCE / module).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {
            "taskbalance.strategy",
            "taskbalance.loss_weighting",
            "taskbalance.gradient_aggregation",
        }, module


@pytest.mark.parametrize("name", tb.list_strategies())
def test_every_strategy_has_end_epoch(name: str) -> None:
    s = tb.create_strategy(name, TASKS)
    before = copy.deepcopy(s.state_dict())
    s.end_epoch()
    if name not in ("dwa", "stch"):  # the methods with epochs
        assert all(
            torch.equal(before[k], v) for k, v in s.state_dict().items() if isinstance(v, Tensor)
        )


# --------------------------------------------------------------------------- declared state
class Counting(tb.LossWeighting):
    """Weights 1; counts its training steps per task and writes every row (even absent ones)."""

    def __init__(self, tasks):
        super().__init__(tasks)
        self.add_state("steps", torch.zeros(len(self.tasks)))
        self.add_state("calls", torch.zeros(()), per_task=False)
        self.seen_before: list[Tensor] = []

    def loss_weights(self, losses, index):
        return torch.ones_like(losses)

    def before_train_step(self, losses, index):
        self.seen_before.append(self.steps.clone())

    def on_train_step(self, losses, index):
        self.steps += 1  # every row: the engine keeps the absent tasks' rows
        self.calls += 1


def test_stateful_follows_declared_state() -> None:
    assert tb.registry.strategy_info("uncertainty").stateful
    assert tb.registry.strategy_info("pcgrad").stateful  # its random generator
    assert not tb.registry.strategy_info("static").stateful  # weights are a constant
    assert not tb.registry.strategy_info("imtl_g").stateful
    for name in tb.list_strategies():
        info = tb.registry.strategy_info(name)
        s = info.cls(TASKS)
        declared = any(m._states for m in s.modules() if isinstance(m, Strategy))
        assert info.stateful == declared, name


def test_add_state_checks_the_task_dimension() -> None:
    s = Counting(TASKS)
    with pytest.raises(tb.StrategyError, match="per-task state 'history' needs 3 rows"):
        s.add_state("history", torch.zeros(2, 4))
    with pytest.raises(tb.StrategyError, match="state 'x' must be a tensor"):
        s.add_state("x", [1.0, 2.0])  # type: ignore[arg-type]
    s.add_state("total", torch.zeros(2, 4), per_task=False)
    assert "total" in s.state_dict()
    s.add_state("cache", torch.zeros(3), persistent=False)
    assert "cache" not in s.state_dict()


def test_partial_labels_keep_the_absent_tasks_rows_whatever_a_hook_writes() -> None:
    s = Counting(TASKS)
    s.backward(leaves(1.0, 2.0, 3.0))
    s.backward(
        {"a": torch.tensor(1.0, requires_grad=True), "c": torch.tensor(3.0, requires_grad=True)}
    )
    assert s.steps.tolist() == [2.0, 1.0, 2.0]
    assert s.calls.item() == 2  # not per task: the hook's write stands


def test_on_train_step_is_not_called_in_evaluation_or_on_a_failed_step() -> None:
    s = Counting(TASKS)
    with torch.no_grad():
        s(leaves(1.0, 2.0, 3.0))
    s.eval()
    s(leaves(1.0, 2.0, 3.0))
    s.train()
    assert s.calls.item() == 0 and s.seen_before == []
    with pytest.raises(tb.NonFiniteLossError):
        s.backward(leaves(1.0, math.nan, 3.0))
    assert s.calls.item() == 0
    s.backward(leaves(1.0, 2.0, 3.0))
    assert s.calls.item() == 1 and len(s.seen_before) == 1
    assert s.seen_before[0].tolist() == [0.0, 0.0, 0.0]  # before the step's own update


def test_a_state_sized_at_first_use_is_resized_on_load() -> None:
    s = tb.create_strategy("moco", TASKS)
    problem = ToyProblem.create(TASKS)
    losses, _ = problem.losses(0)
    s.backward(losses, shared_params=problem.trunk.parameters())
    fresh = tb.create_strategy("moco", TASKS)
    assert fresh.tracked.shape == (0, 0)
    fresh.load_state_dict(s.state_dict())
    assert torch.equal(fresh.tracked, s.tracked)


def test_a_failing_check_losses_leaves_everything_as_it_was() -> None:
    s = tb.create_strategy("famo", ["a", "b"], min_losses=1.0)
    s.backward(
        {"a": torch.tensor(2.0, requires_grad=True), "b": torch.tensor(3.0, requires_grad=True)}
    )
    before = copy.deepcopy(s.state_dict())
    with pytest.raises(tb.StrategyError, match=r"loss of task 'b' is 0\.5, its minimum 1\.0"):
        s.backward(
            {"a": torch.tensor(2.0, requires_grad=True), "b": torch.tensor(0.5, requires_grad=True)}
        )
    assert all(
        torch.equal(before[k], v) for k, v in s.state_dict().items() if isinstance(v, Tensor)
    )


# --------------------------------------------------------------------------- one step, once
def test_calling_a_strategy_twice_in_one_step_updates_it_once() -> None:
    s = tb.create_strategy("uncertainty", ["a", "b"], lr=0.1)
    twin = copy.deepcopy(s)
    losses, roots = computed(2.0, 0.5)
    logged = s(losses)  # e.g. for logging
    report = s.backward(losses)  # the same loss tensors: the same step
    twin_report = twin.backward(computed(2.0, 0.5)[0])
    assert torch.equal(s.log_var, twin.log_var)
    assert torch.equal(report.weight_values, twin_report.weight_values)
    assert torch.equal(logged.detach(), s.combine(losses)[0].detach())
    assert torch.equal(s.log_var, twin.log_var)  # combine on the same losses: still once
    assert roots[0].grad is not None


def test_leaf_losses_start_a_new_step_at_every_call() -> None:
    s = tb.create_strategy("uncertainty", ["a", "b"], lr=0.1)
    losses = {
        "a": torch.tensor(2.0, requires_grad=True),
        "b": torch.tensor(0.5, requires_grad=True),
    }
    s.backward(losses)
    first = s.log_var.clone()
    s.backward(losses)
    assert not torch.equal(first, s.log_var)


@pytest.mark.parametrize("name", ["mgda", "nash_mtl", "graddrop", "moco", "db_mtl", "gradnorm"])
@pytest.mark.parametrize("path", ["shared_params", "features"])
def test_combine_then_backward_equals_backward(name: str, path: str) -> None:
    strategy, problem = tb.create_strategy(name, TASKS), ToyProblem.create(TASKS)
    if path == "features" and isinstance(strategy, tb.GradientAggregation):
        strategy.max_norm = 0.0  # combine refuses features= under Nash-MTL's clip
    twin, twin_problem = copy.deepcopy(strategy), copy.deepcopy(problem)
    for step in range(3):
        problem.zero_grad()
        twin_problem.zero_grad()
        losses, features = problem.losses(step)
        twin_losses, twin_features = twin_problem.losses(step)
        kwargs = (
            {"features": features}
            if path == "features"
            else {"shared_params": list(problem.trunk.parameters())}
        )
        twin_kwargs = (
            {"features": twin_features}
            if path == "features"
            else {"shared_params": list(twin_problem.trunk.parameters())}
        )
        total, report = strategy.combine(losses, **kwargs)
        total.backward()
        expected = twin.backward(twin_losses, **twin_kwargs)
        torch.testing.assert_close(report.weight_values, expected.weight_values)
        for mine, theirs in zip(problem.grads(), twin_problem.grads()):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
        problem.sgd_step()
        twin_problem.sgd_step()
    for key, value in twin.state_dict().items():
        if isinstance(value, Tensor):
            torch.testing.assert_close(strategy.state_dict()[key], value)


def test_combine_in_evaluation_is_the_plain_sum_for_gradient_methods() -> None:
    s = tb.create_strategy("mgda", ["a", "b"])
    with torch.no_grad():
        total, report = s.combine({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    assert total.item() == 3.0 and report.weight_values.tolist() == [1.0, 1.0]


def test_combine_of_gradnorm_needs_the_shared_tensors() -> None:
    s = tb.create_strategy("gradnorm", ["a", "b"])
    with pytest.raises(tb.StrategyError, match="needs exactly one of shared_params="):
        s.combine(computed(1.0, 2.0)[0])


# --------------------------------------------------------------------------- hooks of GA
class LogGradients(tb.GradientAggregation):
    """The plain sum of the gradients of log(L_i): exercises transform_losses."""

    def transform_losses(self, losses):
        return torch.log(losses)

    def gramian_weights(self, gramian, losses, index):
        return torch.ones_like(losses)


def test_transform_losses_gives_the_gradients_of_the_transformed_losses() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = {"a": (w**2).sum(), "b": 3 * w[0] + 1}
    s = LogGradients(["a", "b"])
    report = s.backward(losses, shared_params=[w])
    expected = torch.tensor([2.0, 4.0]) / 5.0 + torch.tensor([3.0, 0.0]) / 4.0
    torch.testing.assert_close(w.grad, expected)
    assert report.loss_values.tolist() == [5.0, 4.0]  # the report keeps the plain losses
    rows = torch.tensor([[2.0, 4.0], [3.0, 0.0]])
    torch.testing.assert_close(s.aggregate(rows, torch.tensor([5.0, 4.0])), expected)


class Frozen(tb.GradientAggregation):
    """Weights (2, 1) after a first solve, reused without gradients; clipped at norm 1."""

    def __init__(self, tasks):
        super().__init__(tasks)
        self.max_norm = 1.0
        self.add_state("ready", torch.zeros((), dtype=torch.bool), per_task=False)

    def reused_weights(self, losses, index):
        return torch.tensor([2.0, 1.0]) if bool(self.ready) else None

    def gramian_weights(self, gramian, losses, index):
        self.ready.fill_(True)
        return torch.tensor([2.0, 1.0], dtype=gramian.dtype)


def test_reused_weights_skip_the_per_task_gradients_and_max_norm_clips() -> None:
    s = Frozen(["a", "b"])
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    for _ in range(2):
        w.grad = None
        report = s.backward({"a": w[0] * 1.0, "b": w[1] * 1.0}, shared_params=[w])
        d = torch.tensor([2.0, 1.0])
        factor = min(1.0, 1.0 / (d.norm().item() + 1e-6))
        torch.testing.assert_close(w.grad, d * factor)
        torch.testing.assert_close(report.weight_values, d)  # the weights; the clip is the grad's
        assert bool(s.ready)


def test_report_weights_and_hooks_are_documented_on_the_base_classes() -> None:
    for hook in ("check_losses", "before_train_step", "on_train_step", "end_epoch", "extras"):
        assert inspect.getdoc(getattr(Strategy, hook))
    for hook in ("loss_weights", "objective", "eval_weights", "on_gradients"):
        assert inspect.getdoc(getattr(LossWeighting, hook))
    for hook in (
        "gramian_weights",
        "aggregate_rows",
        "reused_weights",
        "transform_losses",
        "report_weights",
    ):
        assert inspect.getdoc(getattr(GradientAggregation, hook))


def test_rlw_draws_in_training_and_uses_mean_weights_in_evaluation() -> None:
    s = tb.create_strategy("rlw", ["a", "b"], seed=0)
    state = s.generator_state.clone()
    with torch.no_grad():
        assert s({"a": torch.tensor(1.0), "b": torch.tensor(3.0)}).item() == 2.0
    assert torch.equal(state, s.generator_state)
    first = s.backward(leaves(1.0, 3.0)).weight_values
    second = s.backward(leaves(1.0, 3.0)).weight_values
    assert not torch.equal(first, second)
    assert not torch.equal(state, s.generator_state)


def test_a_model_parameter_is_not_state() -> None:
    # A strategy's nn.Module children that are not its optimizers carry no per-task rows.
    s = Counting(TASKS)
    s.extra = nn.Linear(2, 2)
    s.backward({"a": torch.tensor(1.0, requires_grad=True)})
    assert s.steps.tolist() == [1.0, 0.0, 0.0]
