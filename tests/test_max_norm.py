"""``max_norm`` (Nash-MTL's clip) is the official code's ``clip_grad_norm_(shared_parameters)``
after the backward, on every path: the shared parameters' gradient of the step is clipped, the
heads' is not, and the report shows the unclipped weights.

Issue 16, trap 3: on ``features=`` the clip used to be taken in feature space, folded into the
weights; the parameters' update was then 10³ times the official clipped one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

import taskbalance as tb
from taskbalance.testing import ToyProblem

TASKS = ("a", "b", "c")


def _official_step(problem: ToyProblem, step: int, alpha: Tensor, max_norm: float) -> float:
    """The Nash-MTL repository's step with the weights ``alpha``: one backward of ``Σ α_i L_i``,
    then ``clip_grad_norm_`` of the shared parameters; returns the norm before the clip."""
    losses, _ = problem.losses(step)
    (alpha @ torch.stack([losses[t] for t in TASKS])).backward()
    return float(torch.nn.utils.clip_grad_norm_(problem.trunk.parameters(), max_norm))


def _assert_grads(problem: ToyProblem, reference: ToyProblem) -> None:
    for (name, mine), theirs in zip(problem.named_parameters(), reference.grads()):
        assert mine.grad is not None and theirs is not None, name
        torch.testing.assert_close(mine.grad, theirs, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("max_norm", [1.0, 0.05])
def test_shared_params_update_is_the_official_clipped_one(max_norm: float) -> None:
    problem = ToyProblem.create(TASKS)
    reference = copy.deepcopy(problem)
    strategy = tb.create_strategy("nash_mtl", TASKS, max_norm=max_norm)
    losses, _ = problem.losses(0)
    report = strategy.backward(losses, shared_params=list(problem.trunk.parameters()))
    alpha = report.weight_values  # α itself: α_i (G α)_i = 1 on the parameters' Gramian
    rows = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(
                        loss, problem.trunk.parameters(), retain_graph=True
                    )
                ]
            )
            for loss in problem.losses(0)[0].values()
        ]
    ).double()
    torch.testing.assert_close(
        alpha.double() * (rows @ rows.T @ alpha.double()), torch.ones(3).double(), rtol=1e-4, atol=0
    )
    norm = _official_step(reference, 0, alpha, max_norm)
    assert norm > max_norm  # the clip acts: ‖d‖ = √3 at the bargaining solution
    _assert_grads(problem, reference)


def test_features_path_clips_the_trunk_parameters_not_the_features() -> None:
    problem = ToyProblem.create(TASKS)
    reference = copy.deepcopy(problem)
    strategy = tb.create_strategy("nash_mtl", TASKS, max_norm=1.0)
    losses, features = problem.losses(0)
    alpha = strategy.backward(losses, features=features).weight_values
    # The feature-space ‖d_z‖ is √3 at the bargaining solution, whatever the trunk's ‖d_θ‖:
    # folded into α, the old clip gave a trunk update of ‖d_θ‖/√3 (here 1.8, on SegNet-MTAN
    # 10³ times the official 1). Now it is the official clip of d_θ.
    norm = _official_step(reference, 0, alpha, max_norm=1.0)
    assert norm > 3**0.5
    _assert_grads(problem, reference)
    trunk = torch.cat([p.grad.reshape(-1) for p in problem.trunk.parameters()])
    torch.testing.assert_close(trunk.norm(), torch.tensor(1.0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("path", ["shared_params", "features"])
def test_reused_weights_are_clipped_with_each_steps_own_gradient(path: str) -> None:
    problem = ToyProblem.create(TASKS)
    reference = copy.deepcopy(problem)
    strategy = tb.create_strategy("nash_mtl", TASKS, update_weights_every=2)
    for step in range(2):  # step 1 reuses the α of step 0
        problem.zero_grad()
        reference.zero_grad()
        losses, features = problem.losses(step)
        kwargs = {"features": features} if path == "features" else {}
        if not kwargs:
            kwargs = {"shared_params": list(problem.trunk.parameters())}
        alpha = strategy.backward(losses, **kwargs).weight_values
        _official_step(reference, step, alpha, max_norm=1.0)
        _assert_grads(problem, reference)
        problem.sgd_step()
        reference.sgd_step()


@pytest.mark.parametrize("path", ["shared_params", "features"])
def test_gradients_accumulated_before_the_step_keep_their_size(path: str) -> None:
    problem = ToyProblem.create(TASKS)
    reference = copy.deepcopy(problem)
    strategy = tb.create_strategy("nash_mtl", TASKS)
    earlier = [torch.full_like(p, 3.0) for p in problem.parameters()]
    for p, e in zip(problem.parameters(), earlier):
        p.grad = e.clone()
    losses, features = problem.losses(0)
    kwargs = (
        {"features": features}
        if path == "features"
        else {"shared_params": list(problem.trunk.parameters())}
    )
    alpha = strategy.backward(losses, **kwargs).weight_values
    _official_step(reference, 0, alpha, max_norm=1.0)
    for p, e, theirs in zip(problem.parameters(), earlier, reference.grads()):
        assert theirs is not None and p.grad is not None
        torch.testing.assert_close(p.grad, e + theirs, rtol=1e-5, atol=1e-6)


def test_combine_on_shared_params_gives_backward_and_refuses_features() -> None:
    problem = ToyProblem.create(TASKS)
    reference = copy.deepcopy(problem)
    strategy = tb.create_strategy("nash_mtl", TASKS)
    losses, features = problem.losses(0)
    total, report = strategy.combine(losses, shared_params=list(problem.trunk.parameters()))
    total.backward()
    _official_step(reference, 0, report.weight_values, max_norm=1.0)
    _assert_grads(problem, reference)
    losses, features = problem.losses(1)
    before = copy.deepcopy(strategy.state_dict())
    with pytest.raises(tb.StrategyError, match=r"max_norm=1\.0 clips the trunk"):
        strategy.combine(losses, features=features)
    for key, value in strategy.state_dict().items():
        assert not isinstance(value, Tensor) or torch.equal(value, before[key]), key
