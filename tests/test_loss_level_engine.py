"""The loss-level engine's fast paths, each against the slower way it replaces.

* ``TaskParameterOptimizer``: bit for bit ``torch.optim.Adam``/``SGD`` on the fast path
  (``mask=None``) and the masked one, and per-task step counts under partial labels;
* ``objective_and_gradients`` (closed forms) against the objective and its autograd gradient,
  over training runs with partial labels;
* STCH's phases kept on the host against its general formulas, through warm-up, averaging and
  references fixed together or one task late;
* GradNorm's squared norms from ``⟨(x xᵀ) D_i, D_i⟩`` against the per-task Jacobian on random
  problems (shapes, biases, layers used twice, mixed with other parameters, partial tasks, a
  ``GradScaler``), whole GradNorm runs on both, which path is taken, and an overflow on it;
* one host sync in a training step of the loss-level strategies (the verdict), none with
  ``check_finite=False``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from typing import Literal

import pytest
import torch
from test_amp import _InfGrad  # the overflow the mixed-precision tests use
from torch import Tensor, nn

import taskbalance as tb
import taskbalance.loss_weighting as loss_weighting
from taskbalance.gradient_aggregation import per_task_jacobian
from taskbalance.loss_weighting import task_squared_norms
from taskbalance.strategy import TaskParameterOptimizer
from taskbalance.testing import ToyProblem

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ("a", "b", "c")


# --------------------------------------------------------------------------- own optimizer
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("shape", [(3,), (4, 2)])
def test_adam_and_sgd_are_torch_optim_to_the_last_bit(
    shape: tuple[int, ...], weight_decay: float
) -> None:
    generator = torch.Generator().manual_seed(0)
    kinds: tuple[tuple[Literal["adam", "sgd"], Callable[[Tensor], torch.optim.Optimizer]], ...]
    kinds = (
        ("adam", lambda p: torch.optim.Adam([p], lr=0.05, weight_decay=weight_decay)),
        ("sgd", lambda p: torch.optim.SGD([p], lr=0.1, weight_decay=weight_decay)),
    )
    for kind, make in kinds:
        lr = 0.05 if kind == "adam" else 0.1
        mine = torch.randn(shape, generator=generator)
        reference = nn.Parameter(mine.clone())
        optimizer = make(reference)
        updater = TaskParameterOptimizer(shape, kind=kind, lr=lr, weight_decay=weight_decay)
        everyone = torch.ones(shape[0], dtype=torch.bool)
        for step in range(60):
            grad = torch.randn(shape, generator=generator)
            reference.grad = grad.clone()
            optimizer.step()
            updater.step(mine, grad, None if step % 2 else everyone)  # both paths
            assert torch.equal(mine, reference.detach()), f"{kind} step {step}"
        if kind == "adam":
            state = optimizer.state[reference]
            assert torch.equal(updater.exp_avg, state["exp_avg"])
            assert torch.equal(updater.exp_avg_sq, state["exp_avg_sq"])
            assert updater.step_count.tolist() == [60.0] * shape[0]


def test_a_task_absent_from_some_steps_is_a_fresh_adam_over_its_own_steps() -> None:
    # Task 1 is absent from steps 0-2 and 5: its entry, moments and step count are those of a
    # torch.optim.Adam that saw only its 5 other steps, bit for bit; task 0 saw all 8.
    generator = torch.Generator().manual_seed(1)
    value = torch.randn(2, generator=generator)
    alone = [nn.Parameter(value[i].clone()) for i in range(2)]
    optimizers = [torch.optim.Adam([p], lr=0.1) for p in alone]
    updater = TaskParameterOptimizer((2,), lr=0.1)
    for step in range(8):
        grad = torch.randn(2, generator=generator)
        present = [True, step not in (0, 1, 2, 5)]
        updater.step(value, grad, None if all(present) else torch.tensor(present))
        for i in range(2):
            if present[i]:
                alone[i].grad = grad[i].clone()
                optimizers[i].step()
    assert updater.step_count.tolist() == [8.0, 4.0]
    for i in range(2):
        assert torch.equal(value[i], alone[i].detach())
        assert torch.equal(updater.exp_avg[i], optimizers[i].state[alone[i]]["exp_avg"])


# --------------------------------------------------------------------------- closed forms
class _Autograd:
    """Mixed in first: no closed form, so the engine differentiates the objective."""

    def objective_and_gradients(self, losses: Tensor, index: Tensor, weights: Tensor) -> None:
        return None


def _autograd_twin(strategy: tb.LossWeighting) -> tb.LossWeighting:
    twin = copy.deepcopy(strategy)
    twin.__class__ = type(f"Autograd{type(strategy).__name__}", (_Autograd, type(strategy)), {})
    return twin


@pytest.mark.parametrize(
    "factory",
    [
        lambda: tb.create_strategy("uncertainty", TASKS, task_types={"b": "classification"}),
        lambda: tb.create_strategy("uncertainty", TASKS, optimizer="sgd", lr=0.05, init=0.3),
        lambda: tb.create_strategy("imtl_l", TASKS, lr=0.05),
        lambda: tb.create_strategy("imtl_l", TASKS, optimizer="sgd", lr=0.05, init=-0.2),
        lambda: tb.create_strategy("famo", TASKS, min_losses=0.2),
    ],
    ids=["uncertainty", "uncertainty-sgd", "imtl_l", "imtl_l-sgd", "famo"],
)
def test_closed_form_runs_like_the_objective_and_autograd(
    factory: Callable[[], tb.Strategy],
) -> None:
    # The same run twice: the closed form, and the objective with its autograd gradient. Each
    # step goes through combine, whose total carries the objective's value.
    strategy = factory()
    assert isinstance(strategy, tb.LossWeighting)
    twin = _autograd_twin(strategy)
    problem, twin_problem = ToyProblem.create(TASKS), ToyProblem.create(TASKS)
    for step in range(12):
        present = TASKS if step % 3 else ("a", "c")  # partial labels every third step
        results = []
        for s, p in ((strategy, problem), (twin, twin_problem)):
            p.zero_grad()
            losses, _ = p.losses(step, present)
            total, report = s.combine(losses)
            total.backward()
            results.append((total.detach(), report.weight_values, p.grads()))
            p.sgd_step()
        (total, weights, grads), (twin_total, twin_weights, twin_grads) = results
        torch.testing.assert_close(total, twin_total)
        torch.testing.assert_close(weights, twin_weights)
        for mine, theirs in zip(grads, twin_grads):
            torch.testing.assert_close(mine, theirs)
        for (name, mine), theirs in zip(strategy.state_dict().items(), twin.state_dict().values()):
            if isinstance(mine, Tensor):
                torch.testing.assert_close(mine, theirs, msg=f"step {step}: {name}")
    for name in strategy._learned:  # the closed-form gradients moved the learned parameters
        assert not torch.equal(getattr(strategy, name), factory().state_dict()[name])


class _AlwaysMixed:
    """Mixed in first: STCH's general formulas in every phase (some tasks ready, some not)."""

    _any_ready = property(lambda self: True, lambda self, value: None)
    _all_ready = property(lambda self: False, lambda self, value: None)


@pytest.mark.parametrize("options", [{}, {"mu": 0.5, "pref_vector": [1.0, 2.0, 0.5]}])
@pytest.mark.parametrize("late", [False, True], ids=["together", "b late"])
def test_stch_phases_compute_what_the_general_formulas_compute(
    options: dict[str, object], late: bool
) -> None:
    # Warm-up (epoch 0), averaging (epoch 1), every reference fixed (epochs 2, 3); partial
    # labels in some steps; with ``late``, task b misses the averaging epoch, so epoch 2 mixes
    # tasks with and without a reference. The phases on the host skip work, never change a
    # number.
    strategy = tb.create_strategy("stch", TASKS, warmup_epochs=1, **options)
    general = copy.deepcopy(strategy)
    general.__class__ = type("GeneralSTCH", (_AlwaysMixed, type(strategy)), {})
    problem, twin_problem = ToyProblem.create(TASKS), ToyProblem.create(TASKS)
    phases = []
    for epoch in range(4):
        for step in range(3):
            present = ("a", "c") if step == 1 or (late and epoch == 1) else TASKS
            results = []
            for s, p in ((strategy, problem), (general, twin_problem)):
                p.zero_grad()
                losses, _ = p.losses(3 * epoch + step, present)
                total, report = s.combine(losses)
                total.backward()
                results.append((total.detach(), report.weight_values, *p.grads()))
                p.sgd_step()
            for mine, theirs in zip(*results):
                torch.testing.assert_close(mine, theirs)
        phases.append((strategy._any_ready, strategy._all_ready))  # type: ignore[attr-defined]
        strategy.end_epoch()
        general.end_epoch()
        for (name, mine), theirs in zip(
            strategy.state_dict().items(), general.state_dict().values()
        ):
            if isinstance(mine, Tensor):
                torch.testing.assert_close(mine, theirs, msg=f"epoch {epoch}: {name}")
    mixed = (True, False) if late else (True, True)
    assert phases == [(False, False), (False, False), mixed, (True, True)]
    # A load reads the phase back.
    fresh = tb.create_strategy("stch", TASKS, warmup_epochs=1, **options)
    fresh.load_state_dict(strategy.state_dict())
    assert (fresh._epochs, fresh._any_ready, fresh._all_ready) == (4, True, True)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- GradNorm norms
def _batch(strategy: tb.Strategy, losses: dict[str, Tensor]):  # type: ignore[no-untyped-def]
    return strategy.gather(losses)


def _mlp(widths: list[int], *, bias: bool, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for width_in, width_out in itertools.pairwise(widths):
        layers += [nn.Linear(width_in, width_out, bias=bias), nn.Tanh()]
    return nn.Sequential(*layers)


def _losses(
    trunk: Callable[[Tensor], Tensor],
    heads: Mapping[str, Callable[[Tensor], Tensor]],
    x: Tensor,
    targets: Tensor,
    tasks: tuple[str, ...] = TASKS,
) -> dict[str, Tensor]:
    features = trunk(x)
    return {
        t: (heads[t](features).squeeze(1) - targets[:, i]).pow(2).mean() * (i + 1)
        for i, t in enumerate(TASKS)
        if t in tasks
    }


CASES = {
    # name: (widths, batch, bias, which shared tensors)
    "last layer": ([16, 24, 32], 5, True, "last"),
    "last layer, no bias": ([16, 24, 32], 5, False, "last"),
    "whole trunk": ([16, 24, 32], 7, True, "all"),
    "batch wider than the layer": ([4, 6, 8], 16, True, "last"),
    "narrow output": ([40, 64, 3], 9, True, "last"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("present", [TASKS, ("a", "c")], ids=["all", "partial"])
def test_squared_norms_equal_the_jacobians(case: str, present: tuple[str, ...]) -> None:
    widths, batch, bias, which = CASES[case]
    for seed in range(3):
        trunk = _mlp(widths, bias=bias, seed=seed)
        heads = {t: nn.Linear(widths[-1], 1) for t in TASKS}
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, widths[0], generator=generator)
        targets = torch.randn(batch, len(TASKS), generator=generator)
        shared = list(trunk[-2].parameters()) if which == "last" else list(trunk.parameters())
        strategy = tb.create_strategy("gradnorm", TASKS)
        batch_losses = _batch(strategy, _losses(trunk, heads, x, targets, present))
        expected = per_task_jacobian(batch_losses, shared, None).square().sum(dim=1)
        got = task_squared_norms(batch_losses, shared, None)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_a_layer_used_twice_and_other_parameters_mix_both_ways() -> None:
    # The first layer is applied twice (its block is not D_iᵀ x: materialised), a LayerNorm is
    # not linear (materialised), the last layer takes the kernel identity.
    torch.manual_seed(3)
    first, norm, last = nn.Linear(12, 12), nn.LayerNorm(12), nn.Linear(12, 20)
    heads = {t: nn.Linear(20, 1) for t in TASKS}
    x = torch.randn(4, 12)

    def trunk(inputs: Tensor) -> Tensor:
        return torch.tanh(last(norm(torch.tanh(first(torch.tanh(first(inputs)))))))

    shared = [*first.parameters(), *norm.parameters(), *last.parameters()]
    strategy = tb.create_strategy("gradnorm", TASKS)
    batch = _batch(strategy, _losses(trunk, heads, x, torch.randn(4, 3)))
    layers = [layer.weight for layer in loss_weighting._linear_layers(batch.values, shared)]
    assert [id(w) for w in layers] == [id(last.weight)]
    expected = per_task_jacobian(batch, shared, None).square().sum(dim=1)
    torch.testing.assert_close(task_squared_norms(batch, shared, None), expected, rtol=1e-5, atol=0)


def test_the_kernel_path_forms_no_per_task_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return per_task_jacobian(*args, **kwargs)

    monkeypatch.setattr(loss_weighting, "per_task_jacobian", spy)
    trunk, heads = _mlp([16, 24, 32], bias=True, seed=0), {t: nn.Linear(32, 1) for t in TASKS}
    x, targets = torch.randn(5, 16), torch.randn(5, 3)
    strategy = tb.create_strategy("gradnorm", TASKS)
    strategy.backward(_losses(trunk, heads, x, targets), shared_params=trunk[-2].parameters())
    assert calls == []  # B = 5 < in = 24: the kernel identity
    features = trunk(x)
    losses = {t: heads[t](features).pow(2).mean() for t in TASKS}
    strategy.backward(losses, features=features)
    assert calls == [1]  # features: the per-task rows


def _gradnorm_run(
    scaler: torch.amp.GradScaler | None, steps: int = 6
) -> tuple[list[Tensor], list[Tensor]]:
    trunk = _mlp([16, 24, 32], bias=True, seed=5)
    heads = nn.ModuleDict({t: nn.Linear(32, 1) for t in TASKS})
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    strategy = tb.create_strategy("gradnorm", TASKS)
    generator = torch.Generator().manual_seed(7)
    weights, grads = [], []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        present = TASKS if step % 3 else ("a", "b")
        x, targets = torch.randn(6, 16, generator=generator), torch.randn(6, 3, generator=generator)
        losses = _losses(trunk, heads, x, targets, present)  # type: ignore[arg-type]
        report = strategy.backward(losses, shared_params=trunk[-2].parameters(), scaler=scaler)
        grads.append(torch.cat([p.grad.reshape(-1) for p in trunk.parameters()]))  # type: ignore[union-attr]
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        weights.append(report.weight_values)
    weights.append(strategy.state_dict()["task_weights"])
    return weights, grads


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "GradScaler"])
def test_gradnorm_runs_as_it_did_from_the_jacobian(
    scaled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def scaler() -> torch.amp.GradScaler | None:
        if not scaled:
            return None
        return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**9)

    new, new_grads = _gradnorm_run(scaler())
    # The previous path: the norms of the per-task Jacobian's rows.
    monkeypatch.setattr(
        loss_weighting,
        "task_squared_norms",
        lambda batch, inputs, scaler: per_task_jacobian(batch, inputs, scaler).square().sum(1),
    )
    old, old_grads = _gradnorm_run(scaler())
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(new_grads, old_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(new[-1], torch.ones(3))  # the weights moved


def test_an_overflow_on_the_kernel_path_is_skipped_with_the_state_kept() -> None:
    trunk = _mlp([16, 24, 32], bias=True, seed=2)
    heads = {t: nn.Linear(32, 1) for t in TASKS}
    strategy = tb.create_strategy("gradnorm", TASKS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**9)
    x, targets = torch.randn(5, 16), torch.randn(5, 3)
    shared = list(trunk[-2].parameters())
    strategy.backward(_losses(trunk, heads, x, targets), shared_params=shared, scaler=scaler)
    before = {k: v.clone() for k, v in strategy.state_dict().items() if isinstance(v, Tensor)}

    def overflowing(inputs: Tensor) -> Tensor:  # the overflow between the layer and the heads
        return _InfGrad.apply(trunk(inputs))

    optimizer = torch.optim.SGD(trunk.parameters(), lr=0.1)
    optimizer.zero_grad()
    strategy.backward(_losses(overflowing, heads, x, targets), shared_params=shared, scaler=scaler)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # GradScaler saw it and skipped
    for key, value in strategy.state_dict().items():
        if isinstance(value, Tensor):
            assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------- no host sync
LOSS_LEVEL = ["equal", "static", "uncertainty", "imtl_l", "famo", "stch", "geometric", "dwa", "rlw"]


@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("name", [*LOSS_LEVEL, "gradnorm"])
def test_a_training_step_syncs_once_for_its_verdict_or_never(name: str, check_finite: bool) -> None:
    from syncs import count_syncs  # tests/syncs.py

    strategy = tb.create_strategy(name, TASKS)
    strategy.check_finite = check_finite
    problem = ToyProblem.create(TASKS)
    x = torch.randn(4, 4)  # a batch narrower than the layers: GradNorm's kernel path
    for step in range(3):
        present = TASKS if step != 1 else ("a", "c")
        problem.zero_grad()
        features = problem.trunk(x)
        losses = {t: problem.heads[t](features).pow(2).mean() + 1.0 for t in TASKS if t in present}
        shared = list(problem.trunk[-2].parameters())
        _, syncs = count_syncs(lambda: strategy.backward(losses, shared_params=shared))  # noqa: B023
        assert len(syncs) == int(check_finite), f"step {step}:\n{syncs.report()}"
