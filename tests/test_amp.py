"""Mixed precision: GradScaler equivalence, overflow steps skipped with the state kept, bf16.

Every registered strategy, both backward paths:

* with a fixed power-of-two scale, ``backward(..., scaler=)`` + ``scaler.step`` gives bit for bit
  the parameters and weights of the unscaled run (per-task gradients are unscaled before they
  are combined; multiplying and dividing by a power of two is exact);
* an overflow (an infinite gradient injected in the trunk's backward) is skipped: the optimizer
  does not step, the strategy's state (learned weights, EMA buffers, counters, random
  generators) is exactly as before, the scale backs off, and the next step equals the step of a
  run that never met the overflow;
* under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the weights and the update stay close to
  the float32 ones;
* ``TaskOptimizers(strategy=...)`` with a scaler: the same two guarantees.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.testing import ToyProblem

TASKS = ("a", "b", "c")
PATHS = ("shared_params", "features")


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad * float("inf")


class Overflow(nn.Module):
    """Identity; when ``active``, its backward overflows as a too-large scale would in fp16."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def forward(self, x: Tensor) -> Tensor:
        return _InfGrad.apply(x) if self.active else x


def _problem() -> tuple[ToyProblem, Overflow]:
    problem = ToyProblem.create(TASKS)
    overflow = Overflow()
    problem.trunk.append(overflow)  # between the trunk's parameters and its output
    return problem, overflow


def _step(
    strategy: tb.Strategy,
    problem: ToyProblem,
    optimizer: torch.optim.Optimizer,
    step: int,
    path: str,
    scaler: torch.amp.GradScaler | None = None,
) -> tb.StepReport:
    optimizer.zero_grad(set_to_none=True)
    losses, features = problem.losses(step)
    kwargs = (
        {"features": features}
        if path == "features"
        else {"shared_params": list(problem.trunk.parameters())}
    )
    report = strategy.backward(losses, scaler=scaler, **kwargs)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return report


def _make(name: str) -> tb.Strategy:
    torch.manual_seed(0)  # random strategies seed their generator from torch's
    return tb.create_strategy(name, TASKS)


def _state(strategy: tb.Strategy) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in strategy.state_dict().items() if isinstance(v, Tensor)}


def _sgd(problem: ToyProblem) -> torch.optim.Optimizer:
    return torch.optim.SGD(problem.parameters(), lr=0.05)


def _fixed_scaler(scale: float = 2.0**10) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**9)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", tb.list_strategies())
def test_fixed_scale_equals_unscaled(name: str, path: str) -> None:
    plain, scaled = ToyProblem.create(TASKS), ToyProblem.create(TASKS)
    s_plain, s_scaled = _make(name), _make(name)
    opt_plain, opt_scaled, scaler = _sgd(plain), _sgd(scaled), _fixed_scaler()
    for step in range(3):
        expected = _step(s_plain, plain, opt_plain, step, path)
        got = _step(s_scaled, scaled, opt_scaled, step, path, scaler)
        assert torch.equal(expected.weight_values, got.weight_values), f"weights, step {step}"
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b), "parameters differ from the unscaled run"
    for key, value in _state(s_plain).items():
        assert torch.equal(value, _state(s_scaled)[key]), f"state {key!r} differs"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", tb.list_strategies())
def test_overflow_step_is_skipped_and_keeps_the_state(name: str, path: str) -> None:
    problem, overflow = _problem()
    strategy = _make(name)
    optimizer, scaler = _sgd(problem), _fixed_scaler()
    for step in range(2):
        _step(strategy, problem, optimizer, step, path, scaler)
    twin, twin_strategy = copy.deepcopy(problem), copy.deepcopy(strategy)
    twin_optimizer, twin_scaler = _sgd(twin), _fixed_scaler()
    state, params = _state(strategy), [p.detach().clone() for p in problem.parameters()]

    overflow.active = True
    _step(strategy, problem, optimizer, 2, path, scaler)
    overflow.active = False
    assert scaler.get_scale() == 2.0**9, "GradScaler did not see the overflow"
    for a, b in zip(params, problem.parameters()):
        assert torch.equal(a, b), "the optimizer stepped on an overflow"
    after = _state(strategy)
    for key, value in state.items():
        assert torch.equal(value, after[key]), f"state {key!r} changed on an overflow step"

    # The run goes on as if the overflow step had never been taken.
    got = _step(strategy, problem, optimizer, 3, path, scaler)
    expected = _step(twin_strategy, twin, twin_optimizer, 3, path, twin_scaler)
    assert torch.equal(got.weight_values, expected.weight_values)
    for a, b in zip(problem.parameters(), twin.parameters()):
        assert torch.equal(a, b), "the step after the overflow differs from an unbroken run"


@pytest.mark.parametrize("path", PATHS)
def test_nash_steps_between_solves_under_a_scaler(path: str) -> None:
    # update_weights_every=2: odd steps reuse α with no per-task gradients, a path of its own
    def make() -> tb.Strategy:
        return tb.create_strategy("nash_mtl", TASKS, update_weights_every=2)

    plain, scaled = ToyProblem.create(TASKS), ToyProblem.create(TASKS)
    s_plain, s_scaled = make(), make()
    opt_plain, opt_scaled, scaler = _sgd(plain), _sgd(scaled), _fixed_scaler()
    for step in range(3):  # a power-of-two scale changes nothing, bit for bit
        expected = _step(s_plain, plain, opt_plain, step, path)
        got = _step(s_scaled, scaled, opt_scaled, step, path, scaler)
        assert torch.equal(expected.weight_values, got.weight_values), f"weights, step {step}"
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), scaled.parameters()))

    problem, overflow = _problem()
    strategy, optimizer, scaler = make(), _sgd(problem), _fixed_scaler()
    _step(strategy, problem, optimizer, 0, path, scaler)  # solves
    state, params = _state(strategy), [p.detach().clone() for p in problem.parameters()]
    overflow.active = True
    report = _step(strategy, problem, optimizer, 1, path, scaler)  # reuses, and overflows
    assert scaler.get_scale() == 2.0**9
    # the overflow shows in the gradients of the one backward: NaN weights, as documented
    assert bool(report.weight_values.isnan().all())
    assert all(torch.equal(a, b) for a, b in zip(params, problem.parameters()))
    assert all(torch.equal(v, _state(strategy)[k]) for k, v in state.items())


def _kwargs(problem: ToyProblem, features: Tensor, path: str) -> dict[str, object]:
    if path == "features":
        return {"features": features}
    return {"shared_params": list(problem.trunk.parameters())}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", tb.list_strategies())
def test_bf16_autocast_on_cpu_is_close_to_float32(name: str, path: str) -> None:
    full, half = ToyProblem.create(TASKS), ToyProblem.create(TASKS)
    s_full, s_half = _make(name), _make(name)
    losses, features = full.losses(0)
    expected = s_full.backward(losses, **_kwargs(full, features, path))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, features = half.losses(0)
    assert features.dtype == torch.bfloat16
    got = s_half.backward(losses, **_kwargs(half, features, path))

    torch.testing.assert_close(
        got.weight_values.float(), expected.weight_values.float(), rtol=5e-2, atol=2e-2
    )
    flat_half = torch.cat([g.reshape(-1) for g in half.grads()])  # type: ignore[union-attr]
    flat_full = torch.cat([g.reshape(-1) for g in full.grads()])  # type: ignore[union-attr]
    assert flat_half.dtype == torch.float32 and torch.isfinite(flat_half).all()
    cosine = torch.nn.functional.cosine_similarity(flat_half, flat_full, dim=0)
    assert cosine > 0.99, f"bf16 update points elsewhere (cosine {cosine:.4f})"
    ratio = flat_half.norm() / flat_full.norm()
    assert 0.9 < ratio < 1.1, f"bf16 update norm ratio {ratio:.3f}"


def _task_optimizers(problem: ToyProblem, name: str) -> tb.TaskOptimizers:
    torch.manual_seed(0)
    return tb.TaskOptimizers(
        {t: torch.optim.SGD(problem.heads[t].parameters(), lr=0.05) for t in TASKS},
        shared=torch.optim.SGD(problem.trunk.parameters(), lr=0.05),
        strategy=name,
    )


def test_fixed_scale_keeps_float64_rows_in_float64() -> None:
    # the per-task rows are unscaled in their own dtype (only fp16/bf16 rows become float32),
    # so a float64 model under a power-of-two scale takes the unscaled step bit for bit
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        plain, scaled = ToyProblem.create(TASKS), ToyProblem.create(TASKS)
        s_plain, s_scaled = _make("mgda"), _make("mgda")
        opt_plain, opt_scaled, scaler = _sgd(plain), _sgd(scaled), _fixed_scaler()
        for step in range(2):
            expected = _step(s_plain, plain, opt_plain, step, "features")
            got = _step(s_scaled, scaled, opt_scaled, step, "features", scaler)
            assert torch.equal(expected.weight_values, got.weight_values), f"weights, step {step}"
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("name", tb.list_strategies())
def test_task_optimizers_with_a_scaler(name: str) -> None:
    """TaskOptimizers(strategy=...): a fixed scale changes nothing; an overflow skips every
    optimizer and leaves the strategy's state as it was."""
    (plain, _), (scaled, overflow) = _problem(), _problem()
    opt_plain, opt_scaled = _task_optimizers(plain, name), _task_optimizers(scaled, name)
    scaler = _fixed_scaler()
    for step in range(3):
        for problem, optimizers, amp in ((plain, opt_plain, None), (scaled, opt_scaled, scaler)):
            optimizers.zero_grad()
            losses, _ = problem.losses(step)
            optimizers.backward(losses, scaler=amp)
            optimizers.step()
            if amp is not None:
                amp.update()
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b), "a fixed scale changed the update"

    assert opt_scaled.strategy is not None
    state = _state(opt_scaled.strategy)
    params = [p.detach().clone() for p in scaled.parameters()]
    overflow.active = True
    opt_scaled.zero_grad()
    losses, _ = scaled.losses(3)
    opt_scaled.backward(losses, scaler=scaler)
    opt_scaled.step()
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    for a, b in zip(params, scaled.parameters()):
        assert torch.equal(a, b), "an optimizer stepped on an overflow"
    for key, value in state.items():
        assert torch.equal(value, _state(opt_scaled.strategy)[key]), f"state {key!r} changed"
