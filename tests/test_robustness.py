"""Bad input, degenerate Jacobians, random problems and checkpoints, for every strategy.

* Bad input raises :class:`~taskbalance.StrategyError` naming the culprit and changes nothing:
  unknown task, non-scalar loss, loss without graph, empty dict, integer or complex loss, losses
  on different devices, losses on another device than the state, ``shared_params`` on another
  device, ``shared_params`` that a task does not reach (an error, not a silent zero row: see
  ``test_unreached_shared_params_is_an_error``).
* Degenerate Jacobians (zero, tiny, huge, duplicate, opposite rows, one zero row, rank one)
  through ``aggregate``: a finite direction or a StrategyError, never a NaN.
* A hypothesis property test drives every strategy with random shapes, loss scales, task
  subsets and backward paths.
* A full training checkpoint (model, optimizer, GradScaler, strategy) saved mid-run and loaded
  with ``torch.load(..., weights_only=True)`` continues bit for bit like the run that never
  stopped, random strategies included; so does ``TaskOptimizers``' state_dict.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.testing import ToyProblem

TASKS = ("a", "b", "c")
PATHS = ("shared_params", "features")
NAMES = tb.list_strategies()
GRADIENT_NAMES = [
    n for n in NAMES if issubclass(tb.registry.strategy_info(n).cls, tb.GradientAggregation)
]


def _make(name: str, tasks: tuple[str, ...] = TASKS) -> tb.Strategy:
    torch.manual_seed(0)  # random strategies seed their generator from torch's
    return tb.create_strategy(name, tasks)


def _kwargs(problem: ToyProblem, features: Tensor, path: str) -> dict[str, Any]:
    if path == "features":
        return {"features": features}
    return {"shared_params": list(problem.trunk.parameters())}


def _state(strategy: tb.Strategy) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in strategy.state_dict().items() if isinstance(v, Tensor)}


def _assert_same_state(before: dict[str, Tensor], strategy: tb.Strategy) -> None:
    after = _state(strategy)
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"state {key!r} changed by a failed step"


# --------------------------------------------------------------------------- bad input
def _bad_inputs(problem: ToyProblem) -> list[tuple[str, dict[str, Any], str]]:
    losses, _ = problem.losses(0)
    meta = torch.empty((), device="meta", requires_grad=True)
    return [
        ("unknown task", {**losses, "zzz": losses["a"]}, "'zzz'"),
        ("non-scalar", {**losses, "b": losses["b"].expand(3)}, "'b'"),
        ("no graph", {t: v.detach() for t, v in losses.items()}, "require grad"),
        # One task detached while the others train: silently untrained before, now an error.
        ("one without graph", {**losses, "b": losses["b"].detach()}, "task 'b' has no graph"),
        ("empty", {}, "empty"),
        ("integer", {**losses, "c": torch.tensor(2)}, "'c' must be floating point"),
        ("complex", {**losses, "c": torch.tensor(1 + 2j)}, "'c' must be floating point"),
        ("two devices", {**losses, "b": meta}, "'b' is on meta"),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_bad_losses_name_the_culprit_and_change_nothing(name: str) -> None:
    for path in PATHS:
        strategy, problem = _make(name), ToyProblem.create(TASKS)
        losses, features = problem.losses(0)
        strategy.backward(losses, **_kwargs(problem, features, path))  # some state to keep
        before = _state(strategy)
        for what, bad, fragment in _bad_inputs(problem):
            _, features = problem.losses(0)
            with pytest.raises(tb.StrategyError, match=fragment):
                strategy.backward(bad, **_kwargs(problem, features, path))
            _assert_same_state(before, strategy)
            if what not in ("no graph",) and not strategy.needs_grads:
                with pytest.raises(tb.StrategyError, match=fragment):
                    strategy(bad)  # the plain combination checks the same way
                _assert_same_state(before, strategy)


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_without_graph_is_still_allowed(name: str) -> None:
    strategy, problem = _make(name), ToyProblem.create(TASKS)
    with torch.no_grad():
        losses, _ = problem.losses(0)
        value = strategy(losses)
    assert value.dim() == 0 and torch.isfinite(value)
    partly, _ = problem.losses(0)  # eval mode on a mix of losses is evaluation too, if no_grad
    with torch.no_grad():
        strategy.eval()({**partly, "b": partly["b"].detach()})


@pytest.fixture
def float64_default() -> Any:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_every_strategy_trains_under_a_float64_default(
    name: str, path: str, float64_default: Any
) -> None:
    """``torch.set_default_dtype(torch.float64)``: every floating state tensor (learned
    parameters and their optimizer's moments included) is float64, and training matches a
    strategy built under float32 and converted with ``.to(torch.float64)``."""
    strategy, problem = _make(name), ToyProblem.create(TASKS)
    torch.set_default_dtype(torch.float32)
    converted = _make(name).to(torch.float64)
    torch.set_default_dtype(torch.float64)
    twin = copy.deepcopy(problem)
    for step in range(3):
        reports = []
        for s, p in ((strategy, problem), (converted, twin)):
            p.zero_grad()
            losses, features = p.losses(step)
            reports.append(s.backward(losses, **_kwargs(p, features, path)))
            p.sgd_step()
        assert reports[0].weight_values.dtype == torch.float64
        torch.testing.assert_close(reports[0].weight_values, reports[1].weight_values)
    for key, value in _state(strategy).items():
        if value.is_floating_point():
            assert value.dtype == torch.float64, f"state {key!r} is {value.dtype}"
    for a, b in zip(problem.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_losses_on_another_device_than_the_state(name: str) -> None:
    strategy = _make(name)
    if not any(True for _ in strategy._state_tensors()):
        pytest.skip("no state tensors: nothing to be on another device")
    losses = {t: torch.ones((), device="meta", requires_grad=True) for t in TASKS}
    with pytest.raises(tb.StrategyError, match=r"strategy.to\('meta'\)"):
        strategy.backward(losses, features=torch.ones(2, 3, device="meta", requires_grad=True))


@pytest.mark.parametrize("name", [n for n in NAMES if tb.registry.strategy_info(n).needs_grads])
def test_gradient_inputs_are_checked(name: str) -> None:
    strategy, problem = _make(name), ToyProblem.create(TASKS)
    losses, features = problem.losses(0)
    meta = nn.Parameter(torch.ones(2, device="meta"))
    with pytest.raises(tb.StrategyError, match=r"shared_params\[1\] is on meta"):
        strategy.backward(losses, shared_params=[next(problem.trunk.parameters()), meta])
    with pytest.raises(tb.StrategyError, match="must require grad"):
        strategy.backward(losses, features=features.detach())
    with pytest.raises(tb.StrategyError, match="exactly one"):
        strategy.backward(losses)
    with pytest.raises(tb.StrategyError, match="exactly one"):
        strategy.backward(losses, features=features, shared_params=list(problem.trunk.parameters()))


@pytest.mark.parametrize("name", [n for n in NAMES if tb.registry.strategy_info(n).needs_grads])
def test_unreached_shared_params_is_an_error(name: str) -> None:
    """Chosen behaviour: a task whose loss reaches none of ``shared_params`` is a StrategyError
    naming it (a zero row would silently drop the task from MGDA-like methods). A row that is
    zero although the task reaches the tensors (a dead ReLU, an optimum) is legitimate."""
    strategy, problem = _make(name), ToyProblem.create(TASKS)
    losses, features = problem.losses(0)
    strategy.backward(losses, features=features)
    before = _state(strategy)
    problem.zero_grad()
    losses, _ = problem.losses(1)
    with (
        pytest.raises(tb.StrategyError, match="task 'b' does not depend on any tensor"),
        pytest.warns(tb.TaskSpecificInputWarning, match="reached by task\\(s\\) 'a' only"),
    ):
        strategy.backward(losses, shared_params=list(problem.heads["a"].parameters()))
    _assert_same_state(before, strategy)
    assert all(g is None for g in problem.grads()), "a failed step wrote gradients"

    # Reached but exactly zero: no error, finite update.
    losses, features = problem.losses(2)
    losses["b"] = losses["b"].detach() + 0.0 * features.sum()
    try:
        report = strategy.backward(losses, features=features)
    except tb.StrategyError as error:  # a solver may refuse a zero gradient, but loudly
        assert "does not depend" not in str(error)
    else:
        assert torch.isfinite(report.weight_values).all()


# --------------------------------------------------------------------------- degenerate J
def _degenerate() -> dict[str, Tensor]:
    base = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    return {
        "zero": torch.zeros(3, 7),
        "tiny": base * 1e-30,
        "huge": base * 1e30,
        "large": base * 1e15,
        "duplicate": base[[0, 0, 1]],
        "opposite": torch.stack([base[0], -base[0], base[1]]),
        "one zero row": torch.cat([base[:2], torch.zeros(1, 7)]),
        "rank one": torch.outer(torch.tensor([1.0, 2.0, -3.0]), base[0]),
        "float64": base.double(),
    }


@pytest.mark.parametrize("case", list(_degenerate()))
@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_degenerate_jacobian_gives_finite_output_or_a_clear_error(name: str, case: str) -> None:
    strategy = _make(name)
    jacobian = _degenerate()[case]
    before = _state(strategy)
    try:
        direction = strategy.aggregate(jacobian)
    except tb.StrategyError as error:
        assert str(error), "empty error message"
        _assert_same_state(before, strategy)
        return
    assert direction.shape == (7,) and direction.dtype == jacobian.dtype
    assert torch.isfinite(direction).all(), f"{case}: silent non-finite output {direction}"
    if case == "zero":
        assert torch.equal(direction, torch.zeros(7, dtype=direction.dtype))


def test_aggregate_argument_checks() -> None:
    name = GRADIENT_NAMES[0] if GRADIENT_NAMES else pytest.skip("no gradient strategy")
    strategy = _make(name)
    jacobian = torch.randn(3, 4)
    with pytest.raises(tb.StrategyError, match="2-D"):
        strategy.aggregate(jacobian[0])
    with pytest.raises(tb.StrategyError, match="2 rows"):
        strategy.aggregate(jacobian[:2])
    with pytest.raises(tb.StrategyError, match="floating point"):
        strategy.aggregate(jacobian.long())
    with pytest.raises(tb.StrategyError, match="NaN or infinite"):
        strategy.aggregate(torch.full((3, 4), float("nan")))
    with pytest.raises(tb.StrategyError, match=r"losses must be a tensor \[3\]"):
        strategy.aggregate(jacobian, torch.ones(2))
    with pytest.raises(tb.StrategyError, match="losses are on meta"):
        strategy.aggregate(jacobian, torch.ones(3, device="meta"))
    with pytest.raises(tb.StrategyError, match="task 'a' is not finite or too large"):
        strategy.aggregate(torch.full((3, 4), 1e25))


# --------------------------------------------------------------------------- property test
@st.composite
def _problems(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(2, 4))
    tasks = tuple(f"t{i}" for i in range(count))
    present = draw(st.lists(st.sampled_from(tasks), min_size=1, max_size=count, unique=True))
    return {
        "tasks": tasks,
        "present": tuple(present),
        "width": draw(st.integers(1, 6)),
        "batch": draw(st.integers(1, 5)),
        "scales": [10.0 ** draw(st.floats(-3, 3)) for _ in tasks],
        "path": draw(st.sampled_from(PATHS)),
        "seed": draw(st.integers(0, 2**16)),
    }


@pytest.mark.parametrize("name", NAMES)
def test_random_problems(name: str) -> None:
    @settings(
        max_examples=6,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(_problems())
    def check(spec: dict[str, Any]) -> None:
        tasks, present = spec["tasks"], spec["present"]
        torch.manual_seed(spec["seed"])
        trunk = nn.Sequential(nn.Linear(3, spec["width"]), nn.Tanh())
        heads = nn.ModuleDict({t: nn.Linear(spec["width"], 1) for t in tasks})
        strategy = tb.create_strategy(name, tasks)
        for _ in range(2):
            x = torch.randn(spec["batch"], 3)
            features = trunk(x)
            losses = {
                t: spec["scales"][i] * (1 + heads[t](features).pow(2).mean())
                for i, t in enumerate(tasks)
                if t in present
            }
            kwargs = (
                {"features": features}
                if spec["path"] == "features"
                else {"shared_params": list(trunk.parameters())}
            )
            for p in [*trunk.parameters(), *heads.parameters()]:
                p.grad = None
            try:
                report = strategy.backward(losses, **kwargs)
            except tb.StrategyError as error:  # allowed: a clear refusal, never a NaN
                assert "not finite" not in str(error) or "gradient" in str(error)
                return
            assert report.tasks == tuple(t for t in tasks if t in present)
            assert torch.isfinite(report.weight_values).all(), report
            for p in trunk.parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all()
            for t in tasks:
                grads = [p.grad for p in heads[t].parameters()]
                if t in present:
                    assert all(g is not None and torch.isfinite(g).all() for g in grads)
                else:
                    assert all(g is None for g in grads), f"absent task {t} got a gradient"
        if isinstance(strategy, tb.GradientAggregation):
            jacobian = (
                torch.randn(len(tasks), spec["width"]) * torch.tensor(spec["scales"])[:, None]
            )
            try:
                direction = strategy.aggregate(jacobian)
            except tb.StrategyError:
                return
            assert torch.isfinite(direction).all()

    check()


# --------------------------------------------------------------------------- checkpoints
def _training_step(
    strategy: tb.Strategy,
    problem: ToyProblem,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step: int,
    path: str,
) -> Tensor:
    optimizer.zero_grad(set_to_none=True)
    losses, features = problem.losses(step)
    report = strategy.backward(losses, scaler=scaler, **_kwargs(problem, features, path))
    scaler.step(optimizer)
    scaler.update()
    return report.weight_values.clone()


def _modules(problem: ToyProblem) -> nn.ModuleDict:
    return nn.ModuleDict({"trunk": problem.trunk, "heads": problem.heads})


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_training_checkpoint_loads_weights_only_and_resumes_exactly(name: str, path: str) -> None:
    problem, strategy = ToyProblem.create(TASKS), _make(name)
    optimizer = torch.optim.Adam(problem.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    for step in range(3):
        _training_step(strategy, problem, optimizer, scaler, step, path)

    buffer = io.BytesIO()
    torch.save(
        {
            "model": _modules(problem).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "strategy": strategy.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # no pickled objects

    resumed_problem = ToyProblem.create(TASKS, seed=5)  # different initial values
    resumed_problem.scales = dict(problem.scales)
    _modules(resumed_problem).load_state_dict(checkpoint["model"])
    resumed = tb.create_strategy(name, TASKS)  # another seed: the state must carry it
    resumed.load_state_dict(checkpoint["strategy"])
    resumed_optimizer = torch.optim.Adam(resumed_problem.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=2)
    resumed_scaler.load_state_dict(checkpoint["scaler"])

    for step in range(3, 7):
        expected = _training_step(strategy, problem, optimizer, scaler, step, path)
        got = _training_step(
            resumed, resumed_problem, resumed_optimizer, resumed_scaler, step, path
        )
        assert torch.equal(expected, got), f"weights differ at step {step}"
    for a, b in zip(problem.parameters(), resumed_problem.parameters()):
        assert torch.equal(a, b), "resumed model differs"
    for key, value in _state(strategy).items():
        assert torch.equal(value, _state(resumed)[key]), f"resumed state {key!r} differs"


@pytest.mark.parametrize("name", NAMES)
def test_task_optimizers_state_dict_loads_weights_only_and_resumes(name: str) -> None:
    def build(problem: ToyProblem) -> tb.TaskOptimizers:
        torch.manual_seed(0)
        return tb.TaskOptimizers(
            {t: tb.make_optimizer("adam", problem.heads[t].parameters(), lr=1e-2) for t in TASKS},
            shared=tb.make_optimizer("sgd", problem.trunk.parameters(), lr=1e-2, momentum=0.9),
            strategy=name,
        )

    def step(optimizers: tb.TaskOptimizers, problem: ToyProblem, index: int) -> Tensor:
        optimizers.zero_grad()
        losses, _ = problem.losses(index)
        report = optimizers.backward(losses)
        optimizers.step()
        return report.weight_values.clone()

    problem = ToyProblem.create(TASKS)
    optimizers = build(problem)
    for index in range(3):
        step(optimizers, problem, index)
    buffer = io.BytesIO()
    torch.save(optimizers.state_dict(), buffer)
    buffer.seek(0)
    twin = copy.deepcopy(problem)
    resumed = build(twin)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for index in range(3, 6):
        assert torch.equal(step(optimizers, problem, index), step(resumed, twin, index))
    for a, b in zip(problem.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- rough edges
def _two_task_model() -> tuple[nn.ModuleDict, Any]:
    """``model`` (``model["trunk"]``, ``model["heads"]``) and ``losses()`` on a fixed batch."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    heads = nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def losses() -> dict[str, Tensor]:
        z = trunk(x)
        return {t: (heads[t](z).squeeze(1) - y[:, i]).pow(2).mean() for i, t in enumerate("ab")}

    return model, losses


@pytest.mark.parametrize("name", [n for n in NAMES if tb.registry.strategy_info(n).needs_grads])
def test_heads_among_shared_params_warn_once_naming_them(name: str) -> None:
    """Chosen behaviour: a warning (TaskSpecificInputWarning), not an error, since the Jacobian
    over every parameter is a legitimate variant; it names the first such tensor and its tasks."""
    model, losses = _two_task_model()
    strategy = tb.create_strategy(name, ["a", "b"])
    params = list(model.parameters())  # trunk (2 tensors), then head a, then head b
    with pytest.warns(
        tb.TaskSpecificInputWarning,
        match=r"shared_params\[2\] \(shape \(1, 8\)\) "
        r"is reached by task\(s\) 'a' only, of \['a', 'b'\]",
    ):
        strategy.backward(losses(), shared_params=params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.backward(losses(), shared_params=params)  # checked once per set of tensors
        fresh = tb.create_strategy(name, ["a", "b"])  # moco, db_mtl: state sized by P
        fresh.backward(losses(), shared_params=model["trunk"].parameters())
        partial = {"a": losses()["a"]}  # one task present: nothing to compare
        strategy.backward(partial, shared_params=list(model.parameters()))


def test_task_specific_warning_as_error_changes_nothing() -> None:
    model, losses = _two_task_model()
    strategy = tb.create_strategy("uncertainty", ["a", "b"])  # ignores shared_params: no check
    strategy.backward(losses(), shared_params=model.parameters())
    gradnorm = tb.create_strategy("gradnorm", ["a", "b"])
    before = _state(gradnorm)
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error", tb.TaskSpecificInputWarning)
        for _ in range(2):  # an error at every step, not only the first
            with pytest.raises(tb.TaskSpecificInputWarning):
                gradnorm.backward(losses(), shared_params=list(model.parameters()))
    _assert_same_state(before, gradnorm)
    assert all(p.grad is None for p in model.parameters())


def test_features_tuple_with_per_task_tensors_warns() -> None:
    """MTAN-like per-task representations passed as a tuple of features (issue 16's trap): each
    tensor is reached by one task only."""
    model, _ = _two_task_model()
    trunk, heads = model["trunk"], model["heads"]
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    strategy = tb.create_strategy("pcgrad", ["a", "b"])
    for _ in range(2):  # features are new tensors every step: checked every step
        z = trunk(x)
        per_task = {t: z * (i + 1.0) for i, t in enumerate("ab")}
        losses = {
            t: (heads[t](per_task[t]).squeeze(1) - y[:, i]).pow(2).mean()
            for i, t in enumerate("ab")
        }
        with pytest.warns(tb.TaskSpecificInputWarning, match=r"features\[0\].*'a' only"):
            strategy.backward(losses, features=(per_task["a"], per_task["b"]))


def test_reused_parameter_generator_says_why_it_is_empty() -> None:
    model, losses = _two_task_model()
    strategy = tb.create_strategy("mgda", ["a", "b"])
    params = model["trunk"].parameters()
    strategy.backward(losses(), shared_params=params)
    with pytest.raises(
        tb.StrategyError,
        match=r"shared_params is empty: it is an iterator that "
        r"an earlier step used up \(model.parameters\(\) is a generator\)",
    ):
        strategy.backward(losses(), shared_params=params)
    with pytest.raises(tb.StrategyError, match=r"^shared_params is empty$"):
        strategy.backward(losses(), shared_params=[])


def test_tasks_given_as_a_mapping_are_refused() -> None:
    with pytest.raises(tb.StrategyError, match=r"got a mapping \{'a': 1.0, 'b': 2.0\}"):
        tb.create_strategy("static", tasks={"a": 1.0, "b": 2.0})


def test_task_optimizers_step_with_losses_instead_of_a_closure() -> None:
    model, losses = _two_task_model()
    opt = tb.TaskOptimizers(
        {t: torch.optim.SGD(model.parameters(), lr=0.1) for t in "ab"}, mode="sequential"
    )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(tb.StrategyError, match=r"step\(\) takes a closure.*got a dict"):
        opt.step(losses())  # type: ignore[arg-type]
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    opt.step(losses)  # the closure itself works


@pytest.mark.parametrize("other", ["famo", "gradnorm", "mgda"])
def test_loading_another_strategys_state_is_refused_and_changes_nothing(other: str) -> None:
    _, losses = _two_task_model()
    strategy = tb.create_strategy("uncertainty", ["a", "b"])
    strategy.backward(losses())
    before = _state(strategy)
    source = tb.create_strategy(other, ["a", "b"]).state_dict()
    with pytest.raises(
        tb.StrategyError,
        match=r"saved by strategy class \w+, this strategy is "
        r"Uncertainty",
    ):
        strategy.load_state_dict(source)
    # A checkpoint without the class name (before 0.2) still fails with a StrategyError, and
    # loads nothing of what did fit.
    source["_extra_state"] = {"tasks": ["a", "b"]}
    source["log_var"] = torch.tensor([5.0, 5.0])
    with pytest.raises(
        tb.StrategyError,
        match=r"(?s)does not fit Uncertainty\(\['a', 'b'\]\).*"
        "Unexpected key",
    ):
        strategy.load_state_dict(source)
    _assert_same_state(before, strategy)


def test_non_finite_loss_error_names_its_task() -> None:
    _, losses = _two_task_model()
    bad = {**losses(), "b": torch.tensor(float("nan"), requires_grad=True)}
    with pytest.raises(tb.NonFiniteLossError) as caught:
        tb.create_strategy("equal", ["a", "b"]).backward(bad)
    assert caught.value.task == "b"
    copied = pickle.loads(pickle.dumps(caught.value))  # e.g. raised in a worker process
    assert (copied.task, str(copied)) == ("b", str(caught.value))
