"""Gradient accumulation: micro-batches through GradientAccumulator equal one full-batch step.

For every registered strategy (random ones included: the strategy draws once per optimizer step
either way), three optimizer steps of 2 micro-batches × 4 samples give the weights, parameters
and strategy state of three steps on the 8-sample batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.accumulation import GradientAccumulator

TASKS = ("a", "b", "c")
SCALES = {"a": 1.0, "b": 3.0, "c": 0.5}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in TASKS})

    def losses(self, x: Tensor, y: Tensor, tasks: tuple[str, ...] = TASKS) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {
            t: SCALES[t] * (1.0 + (self.heads[t](z).squeeze(1) - y[:, i]).pow(2).mean())
            for i, t in enumerate(TASKS)
            if t in tasks
        }


def _batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(7 + step)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 3, generator=generator)


def _make(name: str) -> tb.Strategy:
    torch.manual_seed(1)
    return tb.create_strategy(name, TASKS)


@pytest.mark.parametrize("name", tb.list_strategies())
def test_micro_batches_equal_the_full_batch(name: str) -> None:
    full, micro = Net(), Net()
    s_full, s_micro = _make(name), _make(name)
    opt_full = torch.optim.SGD(full.parameters(), lr=0.1)
    opt_micro = torch.optim.SGD(micro.parameters(), lr=0.1)
    accumulator = GradientAccumulator(
        s_micro, micro.parameters(), shared_params=micro.trunk.parameters()
    )
    for step in range(3):
        x, y = _batch(step)
        opt_full.zero_grad()
        expected = s_full.backward(full.losses(x, y), shared_params=full.trunk.parameters())
        opt_full.step()

        opt_micro.zero_grad()
        for xb, yb in zip(x.split(4), y.split(4)):
            accumulator.backward(micro.losses(xb, yb))
        assert accumulator.micro_batches == 2
        got = accumulator.step()
        opt_micro.step()
        assert accumulator.micro_batches == 0
        torch.testing.assert_close(got.loss_values, expected.loss_values)
        torch.testing.assert_close(got.weight_values, expected.weight_values, rtol=1e-4, atol=1e-6)
    for a, b in zip(full.parameters(), micro.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    state = s_micro.state_dict()
    for key, value in s_full.state_dict().items():
        if isinstance(value, Tensor):
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_task_missing_from_a_micro_batch_is_averaged_over_the_others() -> None:
    net = Net()
    strategy = tb.create_strategy("equal", TASKS)
    accumulator = GradientAccumulator(
        strategy, net.parameters(), shared_params=net.trunk.parameters()
    )
    x, y = _batch(0)
    accumulator.backward(net.losses(x[:4], y[:4]))
    accumulator.backward(net.losses(x[4:], y[4:], tasks=("a", "c")))
    report = accumulator.step()
    expected_b = net.losses(x[:4], y[:4])["b"]
    torch.testing.assert_close(report.losses["b"], expected_b.detach())
    grad_b = torch.autograd.grad(expected_b, list(net.heads["b"].parameters()))
    for p, g in zip(net.heads["b"].parameters(), grad_b):
        torch.testing.assert_close(p.grad, g)

    disjoint = GradientAccumulator(strategy, net.parameters(), shared_params=net.trunk.parameters())
    disjoint.backward(net.losses(x[:4], y[:4], tasks=("b",)))
    disjoint.backward(net.losses(x[4:], y[4:], tasks=("a", "c")))
    assert disjoint.micro_batches == 2  # the calls, not the most that any one task has


def test_overflowed_micro_batch_skips_the_step_and_keeps_the_state() -> None:
    net = Net()
    strategy = tb.create_strategy("uncertainty", TASKS)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    accumulator = GradientAccumulator(
        strategy, net.parameters(), shared_params=net.trunk.parameters()
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = {k: v.clone() for k, v in strategy.state_dict().items() if isinstance(v, Tensor)}
    params = [p.detach().clone() for p in net.parameters()]
    x, y = _batch(0)
    accumulator.backward(net.losses(x[:4], y[:4]), scaler=scaler)
    huge = net.losses(x[4:], y[4:])
    huge["a"] = huge["a"] * 1e36  # finite loss; its scaled gradient overflows float32
    accumulator.backward(huge, scaler=scaler)
    report = accumulator.step(scaler=scaler)
    scaler.step(optimizer)
    scaler.update()
    assert torch.isnan(report.weight_values).all()
    assert scaler.get_scale() == 2.0**15
    for a, b in zip(params, net.parameters()):
        assert torch.equal(a, b)
    for key, value in before.items():
        assert torch.equal(value, strategy.state_dict()[key])


def test_accumulator_checks() -> None:
    net = Net()
    strategy = tb.create_strategy("equal", TASKS)
    with pytest.raises(tb.StrategyError, match="subset of params"):
        GradientAccumulator(strategy, net.heads.parameters(), shared_params=net.trunk.parameters())
    with pytest.raises(tb.StrategyError, match="shared_params is empty"):
        GradientAccumulator(strategy, net.parameters(), shared_params=[])
    accumulator = GradientAccumulator(
        strategy, net.parameters(), shared_params=net.trunk.parameters()
    )
    with pytest.raises(tb.StrategyError, match="before any backward"):
        accumulator.step()
    x, y = _batch(0)
    with pytest.raises(tb.StrategyError, match="'zzz'"):
        accumulator.backward({"zzz": net.losses(x, y)["a"]})
    with torch.no_grad():
        detached = net.losses(x, y)
    with pytest.raises(tb.StrategyError, match="require grad"):
        accumulator.backward(detached)
