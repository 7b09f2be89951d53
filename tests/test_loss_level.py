"""Loss-level strategies: DWA, RLW, geometric (GLS), FAMO, IMTL-L, STCH.

Every number pinned here is derived by hand from the papers' equations (written out next to
each test), not read back from the implementation.
"""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch

import taskbalance as tb
from taskbalance.registry import strategy_info
from taskbalance.testing import check_strategy

LOSS_LEVEL = ("dwa", "rlw", "geometric", "famo", "imtl_l", "stch")


def leaves(*values: float, names: str = "abc") -> dict[str, torch.Tensor]:
    """Losses that are leaves of the graph, so their .grad is the strategy's weight."""
    return {n: torch.tensor(float(v), requires_grad=True) for n, v in zip(names, values)}


def grads(losses: dict[str, torch.Tensor]) -> list[float]:
    return [losses[n].grad.item() for n in losses]  # type: ignore[union-attr]


def state(strategy: tb.Strategy) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in strategy.state_dict().items() if isinstance(v, torch.Tensor)}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_registered_with_papers() -> None:
    for name in LOSS_LEVEL:
        info = strategy_info(name)
        assert not info.needs_grads
        assert info.paper and ("arXiv:" in info.paper or "openreview" in info.paper)
    assert not strategy_info("geometric").stateful
    assert all(strategy_info(n).stateful for n in ("dwa", "rlw", "famo", "imtl_l", "stch"))
    assert not strategy_info("rlw").deterministic


# --------------------------------------------------------------------------- geometric
def test_geometric_value_and_gradient_by_hand() -> None:
    # G = (2·8·4)^(1/3) = 4; dG/dL_i = G/(3 L_i) = (4/6, 4/24, 4/12)
    s = tb.create_strategy("geometric", tasks=["a", "b", "c"])
    losses = leaves(2.0, 8.0, 4.0)
    total = s(losses)
    assert total.item() == pytest.approx(4.0)
    total.backward()
    assert grads(losses) == pytest.approx([2 / 3, 1 / 6, 1 / 3])
    report = s.backward(leaves(2.0, 8.0, 4.0))
    assert report.weight_values.tolist() == pytest.approx([2 / 3, 1 / 6, 1 / 3])
    # partial labels: G = (2·8)^(1/2) = 4 over the two present tasks, w = 4/(2·L)
    partial = s.backward(leaves(2.0, 8.0, names="ab"))
    assert partial.weight_values.tolist() == pytest.approx([1.0, 0.25])


def test_geometric_is_scale_invariant_and_needs_positive_losses() -> None:
    s = tb.create_strategy("geometric", tasks=["a", "b"])
    # w_i L_i = G/k for every task: G = √(3·500), each weighted loss contributes G/2
    w = s.backward(leaves(3.0, 500.0, names="ab")).weight_values
    assert (w * torch.tensor([3.0, 500.0])).tolist() == pytest.approx([math.sqrt(1500) / 2] * 2)
    for bad in (0.0, -1.0):  # the message names the method, the task and its value
        message = rf"the geometric mean needs positive losses; loss of task 'b' is {bad}$"
        with pytest.raises(tb.StrategyError, match=message):
            s.backward(leaves(1.0, bad, names="ab"))
    # many small losses: exp(mean log) does not underflow where the product would
    tiny = {f"t{i}": torch.tensor(1e-8, requires_grad=True) for i in range(10)}
    assert tb.create_strategy("geometric", tasks=list(tiny))(tiny).item() == pytest.approx(1e-8)


# --------------------------------------------------------------------------- IMTL-L
def test_imtl_l_one_sgd_step_by_hand() -> None:
    # objective Σ e^s L − s at s = 0: model weights e^0 = 1, ∂/∂s = e^s L − 1 = (1, −0.5)
    s = tb.create_strategy("imtl_l", tasks=["a", "b"], lr=0.1, optimizer="sgd")
    losses = leaves(2.0, 0.5, names="ab")
    total = s(losses)
    assert total.item() == pytest.approx(2.5)
    total.backward()
    assert grads(losses) == pytest.approx([1.0, 1.0])
    assert s.scale.tolist() == pytest.approx([-0.1, 0.05])
    report = s.backward(leaves(2.0, 0.5, names="ab"))
    assert report.weight_values.tolist() == pytest.approx([math.exp(-0.1), math.exp(0.05)])
    assert report.to_dict()["scale/a"] == pytest.approx(-0.1 - 0.1 * (math.exp(-0.1) * 2 - 1))


def test_imtl_l_default_adam_moves_each_scale_by_lr_first() -> None:
    # Adam's first step is lr·g/(|g| + ε): with the documented lr = 1e-3 and ∂/∂s = (1, −0.5)
    s = tb.create_strategy("imtl_l", tasks=["a", "b"])
    s.backward(leaves(2.0, 0.5, names="ab"))
    assert s.scale.tolist() == pytest.approx([-1e-3, 1e-3], rel=1e-4)


def test_imtl_l_balances_scaled_losses_to_one() -> None:
    # optimum s = −log L: every scaled loss e^s L equals 1, whatever the loss scale
    s = tb.create_strategy("imtl_l", tasks=["a", "b"], lr=0.2, optimizer="sgd")
    for _ in range(300):
        s.backward(leaves(4.0, 0.01, names="ab"))
    assert s.scale.tolist() == pytest.approx([-math.log(4.0), -math.log(0.01)], abs=1e-3)
    with pytest.raises(tb.StrategyError, match="init must be a finite number"):
        tb.create_strategy("imtl_l", tasks=["a"], init=math.nan)
    with pytest.raises(tb.StrategyError, match="lr must be a positive"):
        tb.create_strategy("imtl_l", tasks=["a"], lr=0.0)


# --------------------------------------------------------------------------- DWA
def run_epoch(s: tb.Strategy, epoch: list[tuple[float, ...]]) -> list[list[float]]:
    weights = [s.backward(leaves(*step)).weight_values.tolist() for step in epoch]
    s.end_epoch()  # type: ignore[operator]
    return weights


def test_dwa_weights_after_a_known_two_epoch_history() -> None:
    # epoch means: L(0) = (3, 1, 4), L(1) = (1.5, 1, 4) -> w = (0.5, 1, 1)
    # λ = 3·exp(w/2)/Σexp(w/2) = 3·(e^.25, e^.5, e^.5)/(e^.25 + 2e^.5)
    s = tb.create_strategy("dwa", tasks=["a", "b", "c"])
    first = run_epoch(s, [(4.0, 1.0, 2.0), (2.0, 1.0, 6.0)])
    second = run_epoch(s, [(1.0, 1.0, 3.0), (2.0, 1.0, 5.0)])
    assert first == second == [[1.0, 1.0, 1.0]] * 2  # λ = 1 in the first two epochs
    denominator = math.exp(0.25) + 2 * math.exp(0.5)
    expected = [3 * math.exp(0.25) / denominator] + [3 * math.exp(0.5) / denominator] * 2
    report = s.backward(leaves(9.0, 9.0, 9.0))  # the current loss does not enter its weight
    assert report.weight_values.tolist() == pytest.approx(expected)
    assert report.to_dict()["ratio/a"] == pytest.approx(0.5)
    losses = leaves(1.0, 2.0, 3.0)
    s(losses).backward()  # forward path: same weights as gradient
    assert grads(losses) == pytest.approx(expected)


def test_dwa_temperature_evaluation_and_partial_labels() -> None:
    s = tb.create_strategy("dwa", tasks=["a", "b", "c"], temperature=1.0)
    run_epoch(s, [(2.0, 2.0, 2.0)])
    before = state(s)
    with torch.no_grad():  # evaluation: nothing is averaged
        s({"a": torch.tensor(100.0), "b": torch.tensor(1.0)})
    s.eval()
    s.backward(leaves(100.0, 100.0, 100.0))  # eval mode: weights, but no bookkeeping
    s.train()
    assert same_state(before, state(s))
    s.end_epoch()  # type: ignore[operator]  # an epoch without training steps changes nothing
    assert same_state(before, state(s))
    # an epoch without task c: c keeps its single epoch of history, so its ratio stays 1
    for _ in range(2):
        s.backward(leaves(1.0, 3.0, names="ab"))
    s.end_epoch()  # type: ignore[operator]
    w = s.backward(leaves(1.0, 1.0, 1.0)).weight_values
    # ratios (0.5, 1.5, 1) at T = 1
    expected = torch.softmax(torch.tensor([0.5, 1.5, 1.0]), 0) * 3
    torch.testing.assert_close(w, expected)
    # with two tasks present the weights are 2·softmax over those two
    w = s.backward(leaves(1.0, 1.0, names="ac")).weight_values
    torch.testing.assert_close(w, 2 * torch.softmax(torch.tensor([0.5, 1.0]), 0))


def test_dwa_window_of_steps() -> None:
    # window N = 2: w = mean(last 2 steps)/mean(the 2 before); 1 until 4 steps are recorded
    s = tb.create_strategy("dwa", tasks=["a", "b"], window=2)
    seen = [s.backward(leaves(a, 1.0, names="ab")).weight_values.tolist() for a in (4, 4, 2, 2)]
    assert seen == [[1.0, 1.0]] * 4
    s.end_epoch()  # type: ignore[operator]  # no-op in window mode
    w = s.backward(leaves(7.0, 1.0, names="ab")).weight_values
    torch.testing.assert_close(w, 2 * torch.softmax(torch.tensor([0.5, 1.0]) / 2, 0))
    # the window slides: steps (4, 2 | 2, 7) -> ratio 4.5/3
    w = s.backward(leaves(1.0, 1.0, names="ab")).weight_values
    torch.testing.assert_close(w, 2 * torch.softmax(torch.tensor([1.5, 1.0]) / 2, 0))


def test_dwa_resumes_mid_epoch_and_checks_arguments() -> None:
    s = tb.create_strategy("dwa", tasks=["a", "b", "c"])
    run_epoch(s, [(4.0, 1.0, 2.0)])
    run_epoch(s, [(2.0, 1.0, 3.0)])
    s.backward(leaves(1.0, 1.0, 1.0))
    buffer = io.BytesIO()
    torch.save(s.state_dict(), buffer)
    buffer.seek(0)
    resumed = tb.create_strategy("dwa", tasks=["a", "b", "c"])
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for strategy in (s, resumed):
        strategy.backward(leaves(3.0, 1.0, 1.0))
        strategy.end_epoch()  # type: ignore[operator]
    assert torch.equal(
        s.backward(leaves(1.0, 1.0, 1.0)).weight_values,
        resumed.backward(leaves(1.0, 1.0, 1.0)).weight_values,
    )
    for kwargs, message in [
        ({"temperature": 0.0}, "temperature must be a positive number"),
        ({"temperature": math.inf}, "temperature must be a positive number"),
        ({"window": 0}, "window must be a positive int or None"),
        ({"window": 2.5}, "window must be a positive int or None"),
    ]:
        with pytest.raises(tb.StrategyError, match=message):
            tb.create_strategy("dwa", tasks=["a"], **kwargs)


# --------------------------------------------------------------------------- RLW
def test_rlw_draws_softmax_of_standard_normal_from_its_seed() -> None:
    # the definition: λ = softmax(z), z ~ N(0, I), one draw per training step
    reference = torch.Generator().manual_seed(7)
    s = tb.create_strategy("rlw", tasks=["a", "b", "c"], seed=7)
    for _ in range(3):
        expected = torch.softmax(torch.randn(3, generator=reference), 0)
        losses = leaves(1.0, 2.0, 3.0)
        s(losses).backward()  # forward path: one draw, and the gradient is the drawn weights
        assert grads(losses) == pytest.approx(expected.tolist())
        expected = torch.softmax(torch.randn(3, generator=reference), 0)
        report = s.backward(leaves(1.0, 2.0, 3.0))
        torch.testing.assert_close(report.weight_values, expected)
    # partial labels draw as many numbers as tasks are present
    expected = torch.softmax(torch.randn(2, generator=reference), 0)
    torch.testing.assert_close(s.backward(leaves(1.0, 2.0, names="ac")).weight_values, expected)


def test_rlw_evaluation_and_failed_steps_draw_nothing() -> None:
    s = tb.create_strategy("rlw", tasks=["a", "b"], seed=3, total=2.0)
    twin = copy.deepcopy(s)
    before = state(s)
    with torch.no_grad():  # evaluation: mean weights total/k = 1 each
        assert s({"a": torch.tensor(1.0), "b": torch.tensor(3.0)}).item() == pytest.approx(4.0)
    s.eval()
    assert s.backward(leaves(1.0, 3.0, names="ab")).weight_values.tolist() == [1.0, 1.0]
    s.train()
    assert same_state(before, state(s))
    # a step whose backward fails (graph already freed) leaves the generator where it was
    x = torch.tensor(1.0, requires_grad=True)
    used = {"a": x * 2, "b": x * 3}
    (used["a"] + used["b"]).backward()
    with pytest.raises(RuntimeError):
        s.backward(used)
    assert same_state(before, state(s))
    w = s.backward(leaves(1.0, 3.0, names="ab")).weight_values
    assert torch.equal(w, twin.backward(leaves(1.0, 3.0, names="ab")).weight_values)
    assert w.sum().item() == pytest.approx(2.0)


def test_rlw_distributions() -> None:
    tasks = ["a", "b", "c", "d"]
    for distribution in ("uniform", "dirichlet", "bernoulli", "constrained_bernoulli"):
        s = tb.create_strategy("rlw", tasks=tasks, distribution=distribution, seed=0)
        draws = torch.stack(
            [s.backward(leaves(1, 1, 1, 1, names="abcd")).weight_values for _ in range(200)]
        )
        assert (draws >= 0).all()
        sums = draws.sum(1)
        if distribution == "uniform":  # softmax of U(0,1): each weight in [1/(1+3e), e/(e+3)]
            assert ((draws > 1 / (1 + 3 * math.e)) & (draws < math.e / (math.e + 3))).all()
        if distribution == "bernoulli":  # λ̃/Σλ̃: equal non-zero weights, or all zero
            nonzero = draws > 0
            counts = nonzero.sum(1, keepdim=True).clamp(min=1)
            assert torch.allclose(draws, nonzero / counts)
            assert ((sums - 1).abs() < 1e-6).sum() >= 180  # P(all zero) = 1/16
            # not one task at a time: P(two or more of four picked) = 11/16 per draw
            assert (nonzero.sum(1) >= 2).any() and (sums == 0).any()
        else:
            torch.testing.assert_close(sums, torch.ones(200))
        if distribution == "constrained_bernoulli":  # one task per step, each chosen ~1/4
            assert ((draws == 0) | (draws == 1)).all()
            assert (draws.mean(0) > 0.15).all()
        # the mean weight is 1/k for every distribution (symmetry)
        assert draws.mean(0).tolist() == pytest.approx([0.25] * 4, abs=0.08)


@pytest.mark.parametrize(
    "distribution", ["normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli"]
)
def test_rlw_draws_only_from_its_own_generator(distribution: str) -> None:
    # the same seed draws the same weights whatever torch's global generator does in between
    first, second = (
        tb.create_strategy("rlw", tasks=list("abcd"), distribution=distribution, seed=5)
        for _ in range(2)
    )
    for step in range(3):
        torch.manual_seed(step)
        expected = first.backward(leaves(1, 1, 1, 1, names="abcd")).weight_values
        torch.manual_seed(100 + step)
        torch.testing.assert_close(
            second.backward(leaves(1, 1, 1, 1, names="abcd")).weight_values, expected
        )


@pytest.mark.parametrize("name", ["rlw", "pcgrad", "gradvac", "graddrop"])
def test_random_strategies_share_one_seed_convention(name: str) -> None:
    # seed: int = 0 everywhere; the global generator does not change the draws, seed= does.
    torch.manual_seed(11)
    first = tb.create_strategy(name, tasks=["a", "b"])
    torch.manual_seed(12)
    second = tb.create_strategy(name, tasks=["a", "b"])
    assert torch.equal(first.generator_state, second.generator_state)
    assert tb.create_strategy(name, tasks=["a", "b"], seed=0).state_dict().keys() == (
        first.state_dict().keys()
    )
    other = tb.create_strategy(name, tasks=["a", "b"], seed=1)
    assert not torch.equal(first.generator_state, other.generator_state)
    assert not tb.registry.strategy_info(name).deterministic
    for seed in (1.5, None, True):
        with pytest.raises(tb.StrategyError, match="seed must be an integer"):
            tb.create_strategy(name, tasks=["a"], seed=seed)


def test_rlw_argument_checks() -> None:
    for kwargs, message in [
        ({"distribution": "gamma"}, "distribution must be one of"),
        ({"total": 0.0}, "total must be a positive number"),
    ]:
        with pytest.raises(tb.StrategyError, match=message):
            tb.create_strategy("rlw", tasks=["a"], **kwargs)


def test_a_0_1_checkpoint_of_a_random_strategy_loads() -> None:
    # 0.1 saved gradvac's and graddrop's generator as "rng_state".
    s = tb.create_strategy("gradvac", tasks=["a", "b"], seed=3)
    state = s.state_dict()
    state["rng_state"] = state.pop("generator_state")
    fresh = tb.create_strategy("gradvac", tasks=["a", "b"])
    fresh.load_state_dict(state)
    assert torch.equal(fresh.generator_state, s.generator_state)


# --------------------------------------------------------------------------- FAMO
def test_famo_weights_and_logit_update_by_hand() -> None:
    # ξ = 0, ℓ* = 0: weights ∝ z_i/ℓ_i = (1/2)/1, (1/2)/4 -> (0.8, 0.2)
    s = tb.create_strategy("famo", tasks=["a", "b"], lr=0.1, gamma=0.01, optimizer="sgd")
    losses = leaves(1.0, 4.0, names="ab")
    total = s(losses)
    # objective Σ z log ℓ / Σ(z/ℓ) = (½·0 + ½·log 4) / (½ + ⅛)
    assert total.item() == pytest.approx(0.5 * math.log(4) / 0.625)
    total.backward()
    assert grads(losses) == pytest.approx([0.8, 0.2])
    # after the step ℓ = (0.5, 3): Δ = log ℓ_t − log ℓ_{t+1} = (log 2, log 4/3)
    # δ = z ⊙ (Δ − zᵀΔ) = ½·(Δ_a − Δ_b)/2 · (1, −1); SGD: ξ = 0 − β(δ + γ·0)
    s.update({"a": torch.tensor(0.5), "b": torch.tensor(3.0)})
    half_gap = 0.25 * (math.log(2) - math.log(4 / 3))
    xi = [-0.1 * half_gap, 0.1 * half_gap]
    assert s.logits.tolist() == pytest.approx(xi)
    # next weights: z = softmax(ξ), w ∝ z_i/ℓ_i at ℓ = (2, 1)
    za = 1 / (1 + math.exp(xi[1] - xi[0]))
    wa = (za / 2) / (za / 2 + (1 - za) / 1)
    report = s.backward(leaves(2.0, 1.0, names="ab"))
    assert report.weight_values.tolist() == pytest.approx([wa, 1 - wa])
    assert report.to_dict()["logit/a"] == pytest.approx(xi[0])
    # second update, now with weight decay: ξ ← ξ − β(δ + γ ξ); ℓ: (2, 1) -> (1, 1)
    s.update({"a": torch.tensor(1.0), "b": torch.tensor(1.0)})
    drop = [math.log(2), 0.0]
    mean = za * drop[0] + (1 - za) * drop[1]
    delta = [za * (drop[0] - mean), (1 - za) * (drop[1] - mean)]
    expected = [x - 0.1 * (d + 0.01 * x) for x, d in zip(xi, delta)]
    assert s.logits.tolist() == pytest.approx(expected)


def test_famo_logit_step_is_stable_for_large_logits() -> None:
    # the step's softmax is shifted by its max: ξ = (400, 399) (exp(400) overflows) still
    # gives z = (σ(1), σ(−1)) and δ = z_a z_b (Δ_a − Δ_b)·(1, −1) with Δ = (log 2, log 4/3)
    s = tb.create_strategy("famo", tasks=["a", "b"], lr=0.1, gamma=0.0, optimizer="sgd")
    with torch.no_grad():
        s.logits.copy_(torch.tensor([400.0, 399.0]))
    s.backward(leaves(1.0, 4.0, names="ab"))
    s.update({"a": torch.tensor(0.5), "b": torch.tensor(3.0)})
    za = 1 / (1 + math.exp(-1))
    delta = za * (1 - za) * (math.log(2) - math.log(4 / 3))
    assert s.logits.tolist() == pytest.approx([400 - 0.1 * delta, 399 + 0.1 * delta])


def test_famo_adam_first_step_and_softmax_jacobian() -> None:
    # Adam's first step is −lr·sign(grad) (bias-corrected m/√v = ±1, up to eps)
    s = tb.create_strategy("famo", tasks=["a", "b", "c"])
    s.backward(leaves(1.0, 1.0, 1.0))
    s.update({"a": torch.tensor(0.5), "b": torch.tensor(0.9), "c": torch.tensor(1.0)})
    # Δ = (log 2, log 1/0.9, 0), mean 0.2665: δ signs (+, −, −)
    assert s.logits.tolist() == pytest.approx([-0.025, 0.025, 0.025], rel=1e-5)
    # δ = J_softmax(ξ)ᵀ Δ, which the official code takes with autograd: compare at random ξ
    t = tb.create_strategy("famo", tasks=["a", "b", "c"], lr=1.0, gamma=0.0, optimizer="sgd")
    start = torch.tensor([0.3, -1.2, 0.7])
    with torch.no_grad():
        t.logits.copy_(start)
    before, after = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.7, 1.9, 3.3])
    t.backward(leaves(*before.tolist()))
    t.update(dict(zip("abc", after)))
    probe = start.clone().requires_grad_(True)
    (delta,) = torch.autograd.grad(torch.softmax(probe, 0), probe, before.log() - after.log())
    torch.testing.assert_close(t.logits.detach(), start - delta)


def test_famo_next_step_update_equals_explicit_update() -> None:
    steps = [(1.0, 2.0, 3.0), (0.8, 1.9, 3.1), (0.7, 1.5, 2.0), (0.6, 1.4, 2.2)]
    auto = tb.create_strategy("famo", tasks=["a", "b", "c"])
    manual = tb.create_strategy("famo", tasks=["a", "b", "c"], update_on_next_step=False)
    for now, following in itertools.pairwise(steps):
        auto.backward(leaves(*now))
        manual.backward(leaves(*now))
        manual.update(dict(zip("abc", map(torch.tensor, following))))
    # auto updates at the start of its next step, with that step's losses
    report = auto.backward(leaves(*steps[-1]))
    torch.testing.assert_close(auto.logits, manual.logits)
    expected = manual.loss_weights(torch.tensor(steps[-1]), torch.arange(3))
    torch.testing.assert_close(report.weight_values, expected)
    # an explicit update consumes the pending step: no second update at the next step
    auto.update(dict(zip("abc", map(torch.tensor, steps[0]))))
    logits = auto.logits.clone()
    auto.backward(leaves(*steps[0]))
    assert torch.equal(auto.logits, logits)


def test_famo_errors_partial_labels_and_min_losses() -> None:
    s = tb.create_strategy("famo", tasks=["a", "b", "c"], min_losses={"a": 0.5, "b": 0, "c": 0})
    with pytest.raises(tb.StrategyError, match="needs a training step first"):
        s.update({"a": torch.tensor(1.0)})
    with pytest.raises(tb.StrategyError, match=r"loss of task 'a' is 0\.5, its minimum 0\.5"):
        s.backward(leaves(0.5, 1.0, 1.0))
    # ℓ − ℓ* = (0.5, 1): w ∝ (1/0.5, 1/1) over the present tasks a, b
    w = s.backward(leaves(1.0, 1.0, names="ab")).weight_values
    assert w.tolist() == pytest.approx([2 / 3, 1 / 3])
    before = state(s)
    s.update({"a": torch.tensor(0.9), "c": torch.tensor(0.5)})  # c had no step: only a moves
    after = state(s)
    assert after["logits"][1:].tolist() == before["logits"][1:].tolist()
    # a alone: z = 1 and δ = 0, but its Adam step count advances; b's and c's do not
    assert after["logit_optimizer.step_count"].tolist() == [1, 0, 0]
    assert after["pending"].tolist() == [False, True, False]
    for kwargs, message in [
        ({"gamma": -1.0}, "gamma must be a finite number >= 0"),
        ({"eps": math.nan}, "eps must be a finite number >= 0"),
        ({"update_on_next_step": 1}, "update_on_next_step must be True or False"),
        ({"min_losses": [0.0]}, "min_losses has 1 values for 2 tasks"),
    ]:
        with pytest.raises(tb.StrategyError, match=message):
            tb.create_strategy("famo", tasks=["a", "b"], **kwargs)


LOWER = 5e-6


def cagrad_toy(x: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """The CAGrad paper's two-objective toy (its code's sign in f2), first loss scaled."""
    x1, x2 = x[0], x[1]
    f1 = ((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs().clamp(min=LOWER)).log() + 6
    f2 = ((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs().clamp(min=LOWER)).log() + 6
    c1, c2 = torch.tanh(0.5 * x2).clamp(min=0), torch.tanh(-0.5 * x2).clamp(min=0)
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return {"l1": scale * (c1 * f1 + c2 * g1), "l2": c1 * f2 + c2 * g2}


def toy_run(name: str, scale: float, start: tuple[float, float], steps: int) -> torch.Tensor:
    # FAMO's toy setting: γ = 0, ℓ* = (−21·scale, −21), Adam(1e-3) on x, next-step update
    kwargs = {"gamma": 0.0, "min_losses": [-21 * scale, -21.0]} if name == "famo" else {}
    s = tb.create_strategy(name, tasks=["l1", "l2"], **kwargs)
    x = torch.tensor(start, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        s.backward(cagrad_toy(x, scale))
        optimizer.step()
    return x.detach()


def test_famo_undoes_the_loss_scale_on_the_cagrad_toy() -> None:
    # Scaling L1 by 0.1 pulls equal weighting towards task 2; FAMO balances the decrease of the
    # log-losses, so its path barely depends on the scale. 60 steps only: the full
    # reproduction (all five starting points to the Pareto front) is in the experiments.
    start = (9.0, -1.0)
    famo = [toy_run("famo", scale, start, 60) for scale in (0.1, 1.0)]
    equal = [toy_run("equal", scale, start, 60) for scale in (0.1, 1.0)]
    assert (famo[0] - famo[1]).norm() < 0.02
    assert (equal[0] - equal[1]).norm() > 0.08
    # from the symmetric start (0, 0) FAMO stays on the symmetry axis x1 = 0, equal does not
    assert abs(toy_run("famo", 0.1, (0.0, 0.0), 60)[0]) < 0.01
    assert abs(toy_run("equal", 0.1, (0.0, 0.0), 60)[0]) > 0.05


# --------------------------------------------------------------------------- STCH
def test_stch_fixed_ideal_point_by_hand() -> None:
    # f = log L, z* = log ideal, λ = (1, 2, 1), μ = 0.5, k = 3:
    # λ(f − z*) = (log 2, 0, log 2); /μ -> (log 4, 0, log 4); softmax = (4, 1, 4)/9
    # value k·μ·log Σ exp = 1.5·log 9; weights k·λ_i·softmax_i / L_i = 3·(4/18, 2/9, 1/9)
    s = tb.create_strategy(
        "stch", tasks=["a", "b", "c"], mu=0.5, pref_vector=[1.0, 2.0, 1.0], ideal=[1.0, 1.0, 2.0]
    )
    losses = leaves(2.0, 1.0, 4.0)
    total = s(losses)
    assert total.item() == pytest.approx(1.5 * math.log(9))
    total.backward()
    assert grads(losses) == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    # linear losses, ideal 0, μ → small: the weight goes to the worst task (Tchebycheff)
    sharp = tb.create_strategy("stch", tasks=["a", "b"], mu=0.01, ideal=0.0, log_losses=False)
    w = sharp.backward(leaves(1.0, 1.1, names="ab")).weight_values
    assert w.tolist() == pytest.approx([0.0, 2.0], abs=1e-3)


def test_stch_warmup_then_reference_from_the_averaged_epoch() -> None:
    # warmup_epochs = 1: epoch 0 trains on Σ log L (w = 1/L); epoch 1 too, and averages L;
    # then z* = log L̄ = log (2, 4), and at L = (1, 4): gaps (log ½, 0), softmax (1/3, 2/3),
    # weights 2·softmax/L = (2/3, 1/3)
    s = tb.create_strategy("stch", tasks=["a", "b"], warmup_epochs=1)
    assert s.backward(leaves(4.0, 8.0, names="ab")).weight_values.tolist() == [0.25, 0.125]
    s.end_epoch()  # type: ignore[operator]
    for step in ((1.0, 4.0), (3.0, 4.0)):
        assert s.backward(leaves(*step, names="ab")).weight_values.tolist() == pytest.approx(
            [1 / step[0], 1 / step[1]]
        )
    with torch.no_grad():  # evaluation does not enter the average
        s({"a": torch.tensor(100.0), "b": torch.tensor(100.0)})
    s.end_epoch()  # type: ignore[operator]
    assert s.ideal_point.tolist() == pytest.approx([math.log(2), math.log(4)])
    w = s.backward(leaves(1.0, 4.0, names="ab")).weight_values
    assert w.tolist() == pytest.approx([2 / 3, 1 / 3])
    # the reference is fixed once: later epochs do not move it
    s.end_epoch()  # type: ignore[operator]
    assert s.ideal_point.tolist() == pytest.approx([math.log(2), math.log(4)])


def test_stch_task_without_reference_keeps_the_warmup_objective() -> None:
    # task c was absent from the averaged epoch: it trains on log L_c (w = 1/L_c) while a, b
    # use the smooth maximum (k = 2 tasks with a reference)
    s = tb.create_strategy("stch", tasks=["a", "b", "c"], warmup_epochs=0)
    s.backward(leaves(2.0, 4.0, names="ab"))
    s.end_epoch()  # type: ignore[operator]
    assert s.ideal_ready.tolist() == [True, True, False]
    losses = leaves(1.0, 4.0, 5.0)
    total = s(losses)
    assert total.item() == pytest.approx(math.log(5) + 2 * math.log(0.5 + 1))
    total.backward()
    assert grads(losses) == pytest.approx([2 / 3, 1 / 3, 1 / 5])


def test_stch_argument_checks_and_positive_losses() -> None:
    for kwargs, message in [
        ({"mu": 0.0}, "mu must be a positive number"),
        ({"pref_vector": [1.0, 0.0]}, "pref_vector must be positive"),
        ({"ideal": 0.0}, "ideal must be positive with log_losses=True"),
        ({"log_losses": 1}, "log_losses must be True or False"),
        ({"warmup_epochs": -1}, "warmup_epochs must be an int >= 0"),
        ({"warmup_epochs": True}, "warmup_epochs must be an int >= 0"),
    ]:
        with pytest.raises(tb.StrategyError, match=message):
            tb.create_strategy("stch", tasks=["a", "b"], **kwargs)
    s = tb.create_strategy("stch", tasks=["a", "b"])
    with pytest.raises(tb.StrategyError, match=r"loss of task 'b' is 0\.0"):
        s.backward(leaves(1.0, 0.0, names="ab"))


# --------------------------------------------------------------------------- conformance
def _stch_with_reference(tasks):  # type: ignore[no-untyped-def]
    s = tb.create_strategy("stch", tasks=tasks, warmup_epochs=0, mu=0.3)
    # references by task name, so that permuting the tasks permutes them
    s.backward({t: torch.tensor(1.0 + ord(t[0]) % 5, requires_grad=True) for t in tasks})
    s.end_epoch()
    return s


@pytest.mark.parametrize(
    "factory",
    [
        lambda tasks: tb.create_strategy("dwa", tasks, window=1),
        lambda tasks: tb.create_strategy("rlw", tasks, distribution="dirichlet", seed=1),
        lambda tasks: tb.create_strategy("rlw", tasks, distribution="constrained_bernoulli"),
        lambda tasks: tb.create_strategy("famo", tasks, update_on_next_step=False),
        lambda tasks: tb.create_strategy("famo", tasks, optimizer="sgd", min_losses=0.2),
        lambda tasks: tb.create_strategy("stch", tasks, ideal=0.0, log_losses=False),
        _stch_with_reference,
    ],
    ids=[
        "dwa-window",
        "rlw-dirichlet",
        "rlw-constrained",
        "famo-manual",
        "famo-sgd",
        "stch-linear",
        "stch-reference",
    ],
)
def test_conformance_of_non_default_settings(factory) -> None:  # type: ignore[no-untyped-def]
    check_strategy(factory)
