"""Host syncs of a training step, counted on the CPU (:mod:`syncs`): at most one by default (the
step's verdict), none with ``strategy.check_finite = False``; and what the verdict decides.

* The counter itself: every construct that syncs on a GPU is seen once, device-only work never.
* Every registered strategy, on every path of a training step (``backward`` with
  ``shared_params=`` and ``features=``, ``s(losses).backward()``, ``combine``, partial labels, a
  ``GradScaler``, ``GradientAccumulator``): at most one sync per step, none without
  ``check_finite``; the methods built on ``torch.linalg.eigh`` sync once more (``SPECTRAL``).
* A NaN loss and a solver failure without ``check_finite``: no raise, the report says so, the
  state is as it was (and the next step equals that of a run that never met the failure); with
  ``check_finite`` the same cases raise as before, and nothing changes.
* The verdict keeps the order of the errors (a non-finite loss first) and ``defer_check`` joins
  it; the transaction copies nothing for a strategy without state.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from syncs import SyncCounter, count_syncs
from torch import Tensor

import taskbalance as tb
from taskbalance.accumulation import GradientAccumulator
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.solvers import Solution
from taskbalance.testing import ToyProblem

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ("a", "b", "c")
NAMES = tb.list_strategies()
PATHS = (
    "shared_params",
    "features",
    "forward",
    "combine",
    "combine_features",
    "partial",
    "partial_params",
    "scaler",
    "scaled_features",
    "accumulator",
)
RANDOM = {n for n in NAMES if not tb.registry.strategy_info(n).deterministic}

# torch.linalg.eigh reads its error code back (torch has no eigh_ex): one sync more per step for
# the methods built on the Gramian's eigendecomposition.
EIGH = str(torch.ops.aten._linalg_eigh.default)
SPECTRAL = {"aligned_mtl", "config", "imtl", "imtl_g"}


def _check_syncs(counter: SyncCounter, name: str, limit: int) -> None:
    """At most ``limit`` syncs besides the one eigh of a spectral method."""
    eigh = counter.names.count(EIGH)
    assert eigh <= (name in SPECTRAL), counter.report()
    assert len(counter) - eigh <= limit, counter.report()


def _make(name: str) -> tb.Strategy:
    torch.manual_seed(0)  # random strategies seed their generator from torch's
    return tb.create_strategy(name, TASKS)


def _scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**9)


def _kwargs(problem: ToyProblem, features: Tensor, path: str) -> dict[str, Any]:
    if path in ("features", "partial", "scaled_features", "combine_features"):
        return {"features": features}
    return {"shared_params": list(problem.trunk.parameters())}


def _step(
    strategy: tb.Strategy, problem: ToyProblem, step: int, path: str, scaler: Any = None
) -> Callable[[], Any]:
    """One training step on ``path`` as a call (its losses computed beforehand)."""
    if path == "accumulator":
        accumulator = GradientAccumulator(
            strategy, problem.parameters(), shared_params=problem.trunk.parameters()
        )
        micro = [problem.losses(2 * step)[0], problem.losses(2 * step + 1)[0]]

        def accumulate() -> tb.StepReport:
            for losses in micro:
                accumulator.backward(losses)
            return accumulator.step()

        return accumulate
    partial = path in ("partial", "partial_params")
    losses, features = problem.losses(step, ("a", "c") if partial else None)
    kwargs = _kwargs(problem, features, path)
    if path == "forward":
        return lambda: strategy(losses).backward()
    if path in ("combine", "combine_features"):
        return lambda: strategy.combine(losses, **(kwargs if strategy.needs_grads else {}))[
            0
        ].backward()
    return lambda: strategy.backward(losses, scaler=scaler, **kwargs)


def _syncs_per_step(name: str, path: str, check_finite: bool) -> list[SyncCounter]:
    strategy, problem = _make(name), ToyProblem.create(TASKS)
    strategy.check_finite = check_finite
    if path == "combine_features" and isinstance(strategy, GradientAggregation):
        strategy.max_norm = 0.0  # combine refuses features= under Nash-MTL's clip
    scaler = _scaler() if path in ("scaler", "scaled_features") else None
    optimizer = torch.optim.SGD(problem.parameters(), lr=0.05)
    counters = []
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        call = _step(strategy, problem, step, path, scaler)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a solver's fallback, say
            _, counter = count_syncs(call)
        counters.append(counter)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
    return counters[1:]  # after the first step (state sized on first use)


# --------------------------------------------------------------------------- the counter
_ONE_SYNC: dict[str, Callable[[Tensor, Tensor, Tensor], object]] = {
    "bool": lambda x, m, a: bool(x.sum() > 0),
    "if": lambda x, m, a: 1 if x.sum() > 0 else 0,
    "item": lambda x, m, a: x[0].item(),
    "int": lambda x, m, a: int(x[0]),
    "float": lambda x, m, a: float(x[0]),
    "list index": lambda x, m, a: [1, 2, 3][m.long().argmax()],
    "tolist": lambda x, m, a: x.tolist(),
    "cpu": lambda x, m, a: x.cpu(),
    "numpy": lambda x, m, a: x.numpy(),
    "to cpu": lambda x, m, a: x.to("cpu"),
    "nonzero": lambda x, m, a: m.nonzero(),
    "where(cond)": lambda x, m, a: torch.where(m),
    "mask index": lambda x, m, a: x[m],
    "mask assign": lambda x, m, a: x.clone().__setitem__(m, torch.zeros(())),
    "masked_select": lambda x, m, a: x.masked_select(m),
    "unique": lambda x, m, a: torch.unique(x),
    "equal": lambda x, m, a: torch.equal(x, x),
    "allclose": lambda x, m, a: torch.allclose(x, x),
    "repeat_interleave": lambda x, m, a: torch.repeat_interleave(m.long()),
    "cholesky": lambda x, m, a: torch.linalg.cholesky(a),
    "inv": lambda x, m, a: torch.linalg.inv(a),
    "solve": lambda x, m, a: torch.linalg.solve(a, x),
    "eigh": lambda x, m, a: torch.linalg.eigh(a),
    "eigvalsh": lambda x, m, a: torch.linalg.eigvalsh(a),
    "svd": lambda x, m, a: torch.linalg.svd(a),
    "svdvals": lambda x, m, a: torch.linalg.svdvals(a),
    "pinv": lambda x, m, a: torch.linalg.pinv(a),
    "lstsq": lambda x, m, a: torch.linalg.lstsq(a, x[:, None]),
    "lu_factor": lambda x, m, a: torch.linalg.lu_factor(a),
    "eig": lambda x, m, a: torch.linalg.eig(a),
}
_NO_SYNC: dict[str, Callable[[Tensor, Tensor, Tensor], object]] = {
    "arithmetic": lambda x, m, a: (x * 2 + 1).exp().sum(),
    "reductions": lambda x, m, a: (x.max(), x.argmax(), m.all(), m.any()),
    "where": lambda x, m, a: torch.where(m, x, 0.0),
    "long index": lambda x, m, a: x[m.long()],
    "masked_fill": lambda x, m, a: x.masked_fill(m, 0.0),
    "index_put long": lambda x, m, a: x.clone().index_put_((m.long(),), torch.zeros(())),
    "to own device": lambda x, m, a: x.to(x.device),
    "cholesky_ex": lambda x, m, a: torch.linalg.cholesky_ex(a),
    "inv_ex": lambda x, m, a: torch.linalg.inv_ex(a),
    "solve_ex": lambda x, m, a: torch.linalg.solve_ex(a, x),
    "solve_triangular": lambda x, m, a: torch.linalg.solve_triangular(a, a, upper=False),
    "new tensors": lambda x, m, a: (torch.zeros(3), torch.eye(3), torch.full_like(x, 2.0)),
}


def _inputs() -> tuple[Tensor, Tensor, Tensor]:
    x = torch.tensor([1.0, 2.0, 3.0])
    return x, x > 1.5, torch.eye(3) * 2


@pytest.mark.parametrize("what", list(_ONE_SYNC))
def test_the_counter_sees_each_sync_once(what: str) -> None:
    with SyncCounter() as counter:
        _ONE_SYNC[what](*_inputs())
    assert len(counter) == 1, counter.names


@pytest.mark.parametrize("what", list(_NO_SYNC))
def test_the_counter_ignores_device_work(what: str) -> None:
    with SyncCounter() as counter:
        _NO_SYNC[what](*_inputs())
    assert len(counter) == 0, counter.report()


def test_the_counter_leaves_draws_out_and_tensor_methods_as_they_were() -> None:
    methods = {name: torch.Tensor.__dict__.get(name) for name in ("tolist", "cpu", "numpy", "to")}
    strategy = _make("rlw")
    with SyncCounter() as counter:
        strategy.draw(lambda generator: int(torch.randint(10, (), generator=generator)))
        torch.ones(2).tolist()
    assert counter.names == ["Tensor.tolist"]
    assert {name: torch.Tensor.__dict__.get(name) for name in methods} == methods


# --------------------------------------------------------------------------- syncs per step
def _skip_if_not_a_path_of(name: str, path: str) -> None:
    needs_grads = tb.registry.strategy_info(name).needs_grads
    if path == "forward" and needs_grads:
        pytest.skip("trains with backward or combine only")
    if path == "combine_features" and not needs_grads:
        pytest.skip("combine takes no inputs: the combine case")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_at_most_one_sync_per_step(name: str, path: str) -> None:
    _skip_if_not_a_path_of(name, path)
    # A random strategy under a GradScaler reads the overflow flag to rewind its host-side
    # generator (documented in Strategy): GradScaler.step syncs anyway.
    limit = 2 if name in RANDOM and path in ("scaler", "scaled_features") else 1
    for counter in _syncs_per_step(name, path, check_finite=True):
        _check_syncs(counter, name, limit)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_no_sync_without_check_finite(name: str, path: str) -> None:
    _skip_if_not_a_path_of(name, path)
    for counter in _syncs_per_step(name, path, check_finite=False):
        _check_syncs(counter, name, 0)


def test_the_one_sync_is_the_verdict() -> None:
    _, counter = count_syncs(_step(_make("equal"), ToyProblem.create(TASKS), 0, "features"))
    assert len(counter) == 1 and "in settle" in counter.events[0][1]


# --------------------------------------------------------------------------- NaN losses
def _state(strategy: tb.Strategy, *, host: bool = True) -> dict[str, Tensor]:
    return {
        key: value.clone()
        for key, value in strategy.state_dict().items()
        if isinstance(value, Tensor) and (host or not key.endswith("generator_state"))
    }


def _same(before: dict[str, Tensor], after: dict[str, Tensor]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"state {key!r} changed"


def _nan_losses(problem: ToyProblem, step: int) -> tuple[dict[str, Tensor], Tensor]:
    losses, features = problem.losses(step)
    return {**losses, "b": losses["b"] * math.nan}, features


TRAIN_PATHS = ("shared_params", "features", "combine")


def _train(strategy: tb.Strategy, problem: ToyProblem, step: int, path: str) -> tb.StepReport:
    losses, features = problem.losses(step)
    return _call(strategy, problem, losses, features, path)


def _call(
    strategy: tb.Strategy,
    problem: ToyProblem,
    losses: dict[str, Tensor],
    features: Tensor,
    path: str,
) -> tb.StepReport:
    problem.zero_grad()
    if path == "combine":
        total, report = strategy.combine(
            losses, **(_kwargs(problem, features, path) if strategy.needs_grads else {})
        )
        total.backward()
        return report
    return strategy.backward(losses, **_kwargs(problem, features, path))


@pytest.mark.parametrize("path", TRAIN_PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_a_nan_loss_without_check_finite_is_skipped(name: str, path: str) -> None:
    strategy, problem = _make(name), ToyProblem.create(TASKS)
    strategy.check_finite = False
    for step in range(2):
        _train(strategy, problem, step, path)
        problem.sgd_step()
    twin, twin_problem = copy.deepcopy(strategy), copy.deepcopy(problem)

    losses, features = _nan_losses(problem, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report, counter = count_syncs(lambda: _call(strategy, problem, losses, features, path))
    _check_syncs(counter, name, 0)
    # The host-side generator of a random strategy moves on (documented); the rest is kept.
    host = name not in RANDOM
    _same(_state(twin, host=host), _state(strategy, host=host))
    if isinstance(strategy, GradientAggregation):
        assert report.to_dict()["skipped"] == 1.0
    if not host:
        return
    # The run goes on as if the step had never been taken.
    got, expected = _train(strategy, problem, 3, path), _train(twin, twin_problem, 3, path)
    assert torch.equal(got.weight_values, expected.weight_values)
    for a, b in zip(problem.grads(), twin_problem.grads()):
        assert (a is None and b is None) or torch.equal(a, b)
    if isinstance(strategy, GradientAggregation):
        assert got.to_dict()["skipped"] == 0.0


@pytest.mark.parametrize("name", ["uncertainty", "equal"])
def test_the_loss_level_report_says_skipped(name: str) -> None:
    strategy, problem = _make(name), ToyProblem.create(TASKS)
    strategy.check_finite = False
    losses, features = _nan_losses(problem, 0)
    assert _call(strategy, problem, losses, features, "features").to_dict()["skipped"] == 1.0
    assert _train(strategy, problem, 1, "features").to_dict()["skipped"] == 0.0


@pytest.mark.parametrize("path", TRAIN_PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_a_nan_loss_with_check_finite_raises_and_changes_nothing(name: str, path: str) -> None:
    strategy, problem = _make(name), ToyProblem.create(TASKS)
    _train(strategy, problem, 0, path)
    before = _state(strategy)
    losses, features = _nan_losses(problem, 1)
    with pytest.raises(tb.NonFiniteLossError, match="loss of task 'b' is not finite") as caught:
        _call(strategy, problem, losses, features, path)
    assert caught.value.task == "b"
    _same(before, _state(strategy))
    if path != "combine":
        assert all(g is None for g in problem.grads()), "a failed step wrote gradients"


def test_partial_labels_and_a_rejected_step_keep_every_row() -> None:
    strategy, problem = _make("uncertainty"), ToyProblem.create(TASKS)
    strategy.check_finite = False
    _train(strategy, problem, 0, "features")
    before = _state(strategy)
    losses, features = problem.losses(1, ("a", "b"))
    _call(strategy, problem, {**losses, "b": losses["b"] * math.nan}, features, "features")
    _same(before, _state(strategy))
    losses, features = problem.losses(2, ("a", "b"))
    _call(strategy, problem, losses, features, "features")
    after = _state(strategy)
    assert not torch.equal(after["log_var"][:2], before["log_var"][:2])
    assert torch.equal(after["log_var"][2], before["log_var"][2])  # c was absent


# --------------------------------------------------------------------------- solver failures
SOLVERS = [n for n in NAMES if getattr(_make(n), "on_failure", None) is not None]


def _failing_solver(strategy: GradientAggregation) -> None:
    """Make every solve of ``strategy`` return a Solution that did not converge (NaN weights, as
    a diverged solver's), through the engine's own ``solved``."""

    def solved(solve: Callable[[], Any], index: Tensor, **kwargs: Any) -> Tensor:
        def failing() -> Solution:
            nan = torch.full((index.numel(),), math.nan, dtype=torch.float64)
            return Solution(nan, torch.tensor(False), lambda: "injected failure")

        return GradientAggregation.solved(strategy, failing, index, **kwargs)

    strategy.solved = solved  # type: ignore[method-assign]


@pytest.mark.parametrize("on_failure", ["reuse", "raise"])
@pytest.mark.parametrize("path", ["shared_params", "features"])
@pytest.mark.parametrize("name", SOLVERS)
def test_a_solver_failure_without_check_finite_falls_back(
    name: str, path: str, on_failure: str
) -> None:
    strategy = tb.create_strategy(name, TASKS, on_failure=on_failure)
    strategy.check_finite = False
    problem = ToyProblem.create(TASKS)
    _train(strategy, problem, 0, path)
    assert isinstance(strategy, GradientAggregation)
    kept = {k: getattr(strategy, k).clone() for k in ("last_weights", "has_last_weights")}
    failures = int(strategy.failures)
    _failing_solver(strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the report says it
        report, counter = count_syncs(lambda: _train(strategy, problem, 1, path))
    _check_syncs(counter, name, 0)
    logged = report.to_dict()
    assert (logged["failed"], logged["failures"], logged["skipped"]) == (1.0, failures + 1, 0.0)
    for key, value in kept.items():
        assert torch.equal(value, getattr(strategy, key)), f"{key} changed"
    assert all(g is not None and torch.isfinite(g).all() for g in problem.grads())


@pytest.mark.parametrize("path", ["shared_params", "features"])
@pytest.mark.parametrize("name", SOLVERS)
def test_a_solver_failure_with_check_finite(name: str, path: str) -> None:
    # "raise": the verdict raises the solver's reason and nothing changes.
    strategy = tb.create_strategy(name, TASKS, on_failure="raise")
    problem = ToyProblem.create(TASKS)
    _train(strategy, problem, 0, path)
    before = _state(strategy)
    _failing_solver(strategy)  # type: ignore[arg-type]
    with pytest.raises(tb.SolverError, match="injected failure"):
        _train(strategy, problem, 1, path)
    _same(before, _state(strategy))
    assert all(g is None for g in problem.grads()), "a failed step wrote gradients"
    # "reuse": the previous weights, a warning the first time only (read with the verdict).
    strategy, problem = tb.create_strategy(name, TASKS), ToyProblem.create(TASKS)
    _train(strategy, problem, 0, path)
    kept = strategy.last_weights.clone()
    _failing_solver(strategy)  # type: ignore[arg-type]
    with pytest.warns(RuntimeWarning, match="previous step's weights.*injected failure"):
        report = _train(strategy, problem, 1, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = _train(strategy, problem, 2, path)
    assert (report.to_dict()["failed"], report.to_dict()["failures"]) == (1.0, 2.0)
    assert torch.equal(kept, strategy.last_weights)


# --------------------------------------------------------------------------- the verdict
def test_a_nan_loss_comes_before_a_hook_s_error() -> None:
    # geometric refuses a loss <= 0 in check_losses; the NaN of an earlier check wins.
    strategy = _make("geometric")
    leaf = torch.ones((), requires_grad=True)
    losses = {"a": leaf * math.nan, "b": leaf * -1.0, "c": leaf}
    with pytest.raises(tb.NonFiniteLossError, match="'a'"):
        strategy.backward(losses)
    with pytest.raises(tb.NonFiniteLossError, match="'a'"):
        strategy.backward(losses, features=[torch.ones(2)])  # argument errors come after


class Deferring(tb.LossWeighting):
    """A plug-in (unregistered): equal weights; refuses a loss above 10 through defer_check."""

    def check_losses(self, losses: Tensor, index: Tensor) -> None:
        self.defer_check(losses <= 10, lambda: tb.StrategyError("a loss is above 10"))

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.ones_like(losses)


def test_defer_check_joins_the_verdict() -> None:
    deferring = Deferring(["a", "b"])
    leaf = torch.ones((), requires_grad=True)
    _, counter = count_syncs(lambda: deferring.backward({"a": leaf * 2, "b": leaf * 3}))
    assert len(counter) == 1  # the losses' check and the hook's, read together
    with pytest.raises(tb.StrategyError, match="above 10"):
        deferring.backward({"a": leaf * 2, "b": leaf * 30})
    with pytest.raises(tb.NonFiniteLossError):  # the earlier check comes first
        deferring.backward({"a": leaf * math.nan, "b": leaf * 30})
    with pytest.raises(tb.StrategyError, match="above 10"):  # outside a step: at once
        deferring.defer_check(torch.tensor(False), lambda: tb.StrategyError("above 10"))
    deferring.check_finite = False
    _, counter = count_syncs(lambda: deferring.backward({"a": leaf * 2, "b": leaf * 30}))
    assert len(counter) == 0


def test_the_transaction_copies_declared_state_only_into_kept_buffers() -> None:
    assert _make("equal")._snapshot().copies == []  # no state: nothing to copy
    strategy = _make("uncertainty")
    first, second = strategy._snapshot(), strategy._snapshot()
    names = sorted(name for _, name, _, _ in first.layout)
    assert names == ["exp_avg", "exp_avg_sq", "log_var", "step_count"]
    assert all(a is b for a, b in zip(first.copies, second.copies))  # reused, not allocated
    assert all(torch.equal(c, t) for c, t in zip(second.copies, second.live))


def test_the_accumulator_raises_a_nan_loss_from_step() -> None:
    strategy, problem = _make("mgda"), ToyProblem.create(TASKS)
    accumulator = GradientAccumulator(
        strategy, problem.parameters(), shared_params=problem.trunk.parameters()
    )
    accumulator.backward(problem.losses(0)[0])
    accumulator.backward(_nan_losses(problem, 1)[0])
    with pytest.raises(tb.NonFiniteLossError, match="'b'"):
        accumulator.step()
    assert accumulator.micro_batches == 0  # dropped
    assert all(g is None for g in problem.grads())


@pytest.mark.parametrize("name", ["pcgrad", "uncertainty"])
def test_a_distributed_step_adds_the_ranks_agreement(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rows' collectives need the same tasks on every rank: that read stays, even without
    # check_finite; a non-finite global loss is then the step's flag like any other.
    from test_distributed import _fake_ranks

    _fake_ranks(monkeypatch, world=2)
    strategy, problem = _make(name), ToyProblem.create(TASKS)
    _, counter = count_syncs(lambda: _train(strategy, problem, 0, "shared_params"))
    # The agreement (with the losses' check), and the verdict if checks are left (the rows')
    assert len(counter) == (2 if strategy.needs_grads else 1), counter.report()
    assert "in gather" in counter.events[0][1]
    strategy.check_finite = False
    _, counter = count_syncs(lambda: _train(strategy, problem, 1, "shared_params"))
    assert len(counter) == 1 and "in gather" in counter.events[0][1], counter.report()
    before = _state(strategy, host=False)  # pcgrad's generator moves on (documented)
    losses, features = _nan_losses(problem, 2)
    report = _call(strategy, problem, losses, features, "shared_params")
    _same(before, _state(strategy, host=False))
    if isinstance(strategy, GradientAggregation):
        assert report.to_dict()["skipped"] == 1.0
    strategy.check_finite = True
    with pytest.raises(tb.NonFiniteLossError, match="'b'"):
        _call(strategy, problem, losses, features, "shared_params")
