"""Every registered strategy on a device: the CPU's update, mixed precision, nothing left behind.

Parametrized by the ``device`` fixture (tests/conftest.py): the CPU always, CUDA where it is
available (``pytest tests/test_device.py -k cuda`` runs the CUDA half; so does
``python -m experiments.gpu_check`` on a GPU machine). Paths: ``loss`` for loss-level
strategies, ``shared_params`` and ``features`` for every strategy that needs gradients.

* Two training steps in float32 on the device give the parameters, gradients and weights of
  the same steps with the model in float64 on the CPU, within float32 rounding (in float32 for
  the strategies that draw random numbers: a float64 draw is another number); the gradients,
  the report and the strategy's state stay on the device (a random generator's state on the
  CPU, where ``Strategy.draw`` keeps it).
* Under autocast, float16 with a ``GradScaler`` (where the device's autocast supports float16:
  CUDA, and recent CPU builds) and bfloat16 without one: the steps are finite and the update
  and weights stay close to the float32 ones.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.registry import strategy_info

TASKS = ("a", "b", "c")
SCALES = (1.0, 2.5, 0.4)  # losses of different sizes, so that the weights differ
STEPS = 2  # the second step uses the state the first one left
LR = 0.05


def _paths(name: str) -> list[str]:
    return ["shared_params", "features"] if strategy_info(name).needs_grads else ["loss"]


CASES = [(name, path) for name in tb.list_strategies() for path in _paths(name)]


class DeviceProblem:
    """A two-layer tanh trunk and one linear head per task on fixed batches, on ``device`` in
    ``dtype``; the same values on every device (drawn on the CPU, then moved)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
            self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})
        self.trunk.to(device, dtype)
        self.heads.to(device, dtype)
        generator = torch.Generator().manual_seed(1)
        self.batches = [
            (
                torch.randn(32, 6, generator=generator).to(device, dtype),
                torch.randn(32, len(TASKS), generator=generator).to(device, dtype),
            )
            for _ in range(STEPS)
        ]

    def parameters(self) -> list[nn.Parameter]:
        return [*self.trunk.parameters(), *self.heads.parameters()]

    def losses(self, step: int) -> tuple[dict[str, Tensor], Tensor]:
        inputs, targets = self.batches[step]
        features = self.trunk(inputs)
        losses = {}
        for i, (task, scale) in enumerate(zip(TASKS, SCALES)):
            error = self.heads[task](features).squeeze(1) - targets[:, i]
            losses[task] = scale * (1.0 + error.pow(2).mean())
        return losses, features


def _run(
    name: str,
    path: str,
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[DeviceProblem, tb.Strategy, list[tb.StepReport]]:
    """``STEPS`` SGD steps of ``name`` on ``path``; the problem, the strategy and the reports."""
    problem = DeviceProblem(device, dtype)
    torch.manual_seed(0)  # random strategies seed their generator from torch's
    strategy = tb.create_strategy(name, TASKS).to(device)
    optimizer = torch.optim.SGD(problem.parameters(), lr=LR)
    reports = []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        context = (
            torch.autocast(device.type, dtype=autocast)
            if autocast is not None
            else contextlib.nullcontext()
        )
        with context:
            losses, features = problem.losses(step)
        if path == "features":
            report = strategy.backward(losses, features=features, scaler=scaler)
        elif path == "shared_params":
            shared = list(problem.trunk.parameters())
            report = strategy.backward(losses, shared_params=shared, scaler=scaler)
        else:
            report = strategy.backward(losses, scaler=scaler)
        reports.append(report)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
    return problem, strategy, reports


def _weights(reports: Sequence[tb.StepReport], dtype: torch.dtype) -> Tensor:
    """The weights of each step (rows) and task (columns) on the CPU."""
    return torch.stack([r.weight_values.to("cpu", dtype) for r in reports])


def _flat(tensors: Sequence[Tensor | None]) -> Tensor:
    """One float64 CPU vector (a missing gradient fails here, naming nothing else)."""
    assert all(t is not None for t in tensors), "a parameter has no gradient"
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors if t is not None])


def _check_state_device(strategy: tb.Strategy, device: torch.device) -> None:
    """Every tensor of the strategy on ``device``, but a random generator's state: that stays
    on the CPU whatever ``.to()`` does, so that a draw never waits for the device."""
    for key, tensor in [*strategy.named_parameters(), *strategy.named_buffers()]:
        expected = torch.device("cpu") if key.endswith("generator_state") else device
        assert tensor.device == expected, f"state {key!r} is on {tensor.device}"


@functools.cache
def _float32(
    name: str, path: str, device: torch.device
) -> tuple[DeviceProblem, tb.Strategy, list[tb.StepReport]]:
    """:func:`_run` in float32, once per case (both tests compare with it)."""
    return _run(name, path, device)


@pytest.mark.parametrize(("name", "path"), CASES)
def test_steps_on_device_match_the_float64_reference(
    device: torch.device, name: str, path: str
) -> None:
    problem, strategy, reports = _float32(name, path, device)
    dtype = torch.float64 if strategy_info(name).deterministic else torch.float32
    reference, _, expected = _run(name, path, torch.device("cpu"), dtype=dtype)

    grads = [p.grad for p in problem.parameters()]
    assert all(g is not None and g.device == device for g in grads), "a gradient left the device"
    _check_state_device(strategy, device)
    assert reports[-1].weight_values.device == device
    assert reports[-1].loss_values.device == device

    # rows: steps, columns: tasks
    torch.testing.assert_close(
        _weights(reports, torch.float64), _weights(expected, torch.float64), rtol=1e-3, atol=1e-4
    )
    torch.testing.assert_close(
        _flat(grads), _flat([p.grad for p in reference.parameters()]), rtol=1e-3, atol=1e-5
    )
    torch.testing.assert_close(
        _flat(problem.parameters()), _flat(reference.parameters()), rtol=1e-4, atol=1e-5
    )


def _supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether autocast on ``device`` computes in ``dtype`` (it warns and turns itself off, or
    raises, where it does not)."""
    ones = torch.ones(2, 2, device=device)
    try:
        with torch.autocast(device.type, dtype=dtype):
            out = nn.functional.linear(ones, ones)
    except RuntimeError:
        return False
    return out.dtype == dtype


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize(("name", "path"), CASES)
def test_autocast_is_finite_and_close_to_float32(
    device: torch.device, name: str, path: str, half: str
) -> None:
    dtype = getattr(torch, half)
    if not _supports(device, dtype):
        pytest.skip(f"autocast on {device.type} does not support {half}")
    scaler = None
    if dtype == torch.float16:
        # A fixed power-of-two scale: no step overflows on this problem, and none is skipped.
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=10**9)
    full, _, expected = _float32(name, path, device)
    start = _flat(DeviceProblem(device).parameters())
    mixed, strategy, got = _run(name, path, device, autocast=dtype, scaler=scaler)
    if scaler is not None:
        assert scaler.get_scale() == 2.0**10, "a step overflowed and was skipped"

    update, want = _flat(mixed.parameters()) - start, _flat(full.parameters()) - start
    assert torch.isfinite(update).all()
    cosine = nn.functional.cosine_similarity(update, want, dim=0)
    assert cosine > 0.99, f"the {half} update points elsewhere (cosine {cosine:.4f})"
    assert (update.norm() - want.norm()).abs() <= 0.05 * want.norm()
    torch.testing.assert_close(
        _weights(got, torch.float32), _weights(expected, torch.float32), rtol=5e-2, atol=2e-2
    )
    _check_state_device(strategy, device)
