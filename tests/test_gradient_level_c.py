"""GradDrop, GradVac, PCGrad, ConFIG, UPGrad, DualProj, CAGrad, DB-MTL and MoCo: tests that kill
the mutants the rest of the suite let live (issue 11, mutation testing; see .ci/mutation.py).

Each test pins behaviour the papers or the docstrings state; the expected values are derived
by hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch

import taskbalance as tb


def state(strategy: tb.Strategy) -> dict[str, torch.Tensor]:
    return {k: v for k, v in strategy.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", ["graddrop", "gradvac", "pcgrad"])
def test_default_seed_is_zero(name: str) -> None:
    # the documented default: a run without a seed draws what seed=0 draws
    default = state(tb.create_strategy(name, ["a", "b"]))
    zero = state(tb.create_strategy(name, ["a", "b"], seed=0))
    assert default.keys() == zero.keys()
    assert all(torch.equal(v, zero[k]) for k, v in default.items())


# --------------------------------------------------------------------------- ConFIG
def test_config_rcond_is_below_one() -> None:
    with pytest.raises(tb.StrategyError, match=r"rcond must be a number in \[0, 1\)"):
        tb.create_strategy("config", ["a", "b"], rcond=1.0)


def test_config_weights_use_the_pseudo_inverse() -> None:
    # g = (e1, e2, −e1): the cosine matrix C has eigenvalues 2 ((1, 0, −1)/√2), 1 (e2) and
    # 0 ((1, 0, 1)/√2). C⁺1 keeps the first two: (1ᵀv)v = 0 and e2, so c = (0, 1, 0) and
    # d = e2 with 1ᵀGc / cᵀGc = 1. The null direction adds nothing to d, only to the weights.
    s = tb.create_strategy("config", ["a", "b", "c"])
    gramian = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]])
    weights = s.gramian_weights(gramian, torch.ones(3), torch.arange(3))
    torch.testing.assert_close(weights, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- UPGrad, DualProj
# g1 = (1, 0), g2 = (−2, 1): G = [[1, −2], [−2, 5]], tr G = 6; the weights solve
# w = argmin_{w ≥ u} ½ wᵀ(G/6 + r I)w. Where w_i > u_i, (G w)_i / 6 + r w_i = 0.
CONE = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)


def test_dual_cone_methods_pass_reg_eps_to_the_projection() -> None:
    # r = 0.1. DualProj, u = (½, ½): w2 = ½, (w1 − 1)/6 + 0.1 w1 = 0 → w1 = 0.625, so
    # d = 0.625 g1 + ½ g2 = (−0.375, 0.5). UPGrad, u = e_i/2: for e2/2, w1 = 1/(1 + 0.6) = 0.625;
    # for e1/2, w2 = 1/(5 + 0.6); w = (½ + 0.625, 1/5.6 + ½), d = w1 g1 + w2 g2.
    dualproj = tb.create_strategy("dualproj", ["a", "b"], reg_eps=0.1)
    torch.testing.assert_close(dualproj.aggregate(CONE), torch.tensor([-0.375, 0.5]).double())
    w1, w2 = 0.5 + 0.625, 1 / 5.6 + 0.5
    upgrad = tb.create_strategy("upgrad", ["a", "b"], reg_eps=0.1)
    torch.testing.assert_close(upgrad.aggregate(CONE), torch.tensor([w1 - 2 * w2, w2]).double())


def test_dual_cone_methods_accept_reg_eps_zero() -> None:
    # r = 0: DualProj's w1 = 1 (see above), d = g1 + ½ g2 = (0, ½), as in its docstring
    dualproj = tb.create_strategy("dualproj", ["a", "b"], reg_eps=0.0)
    torch.testing.assert_close(dualproj.aggregate(CONE), torch.tensor([0.0, 0.5]).double())
    tb.create_strategy("upgrad", ["a", "b"], reg_eps=0.0)


@pytest.mark.parametrize("name", ["dualproj", "upgrad"])
def test_dual_cone_methods_pass_tol_and_max_iter_to_the_projection(name: str) -> None:
    # tol = 0.5 accepts the start w = u, whose KKT residual is at most 1/6: the mean gradient
    loose = tb.create_strategy(name, ["a", "b"], tol=0.5)
    torch.testing.assert_close(loose.aggregate(CONE), torch.tensor([-0.5, 0.5]).double())
    # five conflicting tasks in three dimensions: one Newton step does not solve it
    jacobian = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tb.create_strategy(name, list("abcde"), on_failure="raise").aggregate(jacobian)
    capped = tb.create_strategy(name, list("abcde"), max_iter=1, on_failure="raise")
    with pytest.raises(tb.StrategyError):  # the iteration cap, not the problem
        capped.aggregate(jacobian)


# --------------------------------------------------------------------------- CAGrad
def test_cagrad_passes_tol_to_its_solver() -> None:
    # five tasks in three dimensions: one iteration does not reach the default tolerance, but
    # its start already satisfies a loose one
    jacobian = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tb.create_strategy("cagrad", list("abcde"), tol=1e3, max_iter=1, on_failure="raise").aggregate(
        jacobian
    )
    with pytest.raises(tb.SolverError):
        tb.create_strategy("cagrad", list("abcde"), max_iter=1, on_failure="raise").aggregate(
            jacobian
        )
    for kwargs, message in [
        ({"tol": 0.0}, "tol must be a positive number"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
    ]:
        with pytest.raises(tb.StrategyError, match=message):
            tb.create_strategy("cagrad", ["a", "b"], **kwargs)


# --------------------------------------------------------------------------- GradVac
def test_gradvac_beta_one_sets_the_target_to_the_last_cosine() -> None:
    # beta is in (0, 1]: φ̂ ← (1 − β) φ̂ + β cos = cos for β = 1; cos(g1, g2) = −2/√5
    s = tb.create_strategy("gradvac", ["a", "b"], beta=1.0)
    s.aggregate(CONE)
    cosine = -2 / math.sqrt(5)
    torch.testing.assert_close(s.targets, torch.tensor([[0.0, cosine], [cosine, 0.0]]))


# --------------------------------------------------------------------------- DB-MTL
def test_db_mtl_decaying_rate_by_hand() -> None:
    # β_t = beta / t^beta_sigma = 0.5/t; losses 1 (eps 0): h = g. With g = (1, 0), (0, 2):
    # t = 1: ĝ = 0.5 h = (0.5, 0), (0, 1); α = max‖ĝ‖/‖ĝ_i‖ = (2, 1): d = (1, 1)
    # t = 2: ĝ = 0.25 ĝ + 0.75 h = (0.875, 0), (0, 1.75); α = (2, 1): d = (1.75, 1.75)
    s = tb.create_strategy("db_mtl", ["a", "b"], beta=0.5, beta_sigma=1.0, eps=0.0)
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    losses = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(s.aggregate(jacobian, losses), torch.tensor([1.0, 1.0]).double())
    torch.testing.assert_close(s.aggregate(jacobian, losses), torch.tensor([1.75, 1.75]).double())
    # the defaults (LibMTL's): a constant β = 0.9, so ĝ = 0.1 h, then 0.9·0.1 h + 0.1 h = 0.19 h
    default = tb.create_strategy("db_mtl", ["a", "b"])
    close = {"rtol": 1e-6, "atol": 0.0}
    torch.testing.assert_close(
        default.aggregate(jacobian, losses), 0.2 * torch.ones(2).double(), **close
    )
    torch.testing.assert_close(
        default.aggregate(jacobian, losses), 0.38 * torch.ones(2).double(), **close
    )


def test_db_mtl_beta_zero_takes_this_steps_gradients() -> None:
    # beta is in [0, 1): β = 0 keeps no average, ĝ = h; α = (2, 1) for g = (1, 0), (0, 2)
    s = tb.create_strategy("db_mtl", ["a", "b"], beta=0.0, eps=0.0)
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(
        s.aggregate(jacobian, torch.ones(2).double()), 2 * torch.ones(2).double()
    )


def test_db_mtl_epsilon_in_the_heads_and_the_domain() -> None:
    # eps = 0.5: the heads get ∇log(L + 0.5) = ∇L / (L + 0.5); L = −0.5 has no logarithm
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    head = torch.tensor(3.0, requires_grad=True)
    s = tb.create_strategy("db_mtl", ["a", "b"], eps=0.5)
    s.backward({"a": head * w[0], "b": w[1] ** 2}, shared_params=[w])  # L_a = 3, ∂L_a/∂h = 1
    assert head.grad is not None and head.grad.item() == pytest.approx(1 / 3.5)
    with pytest.raises(tb.StrategyError, match=r"loss of task 'b' is -0\.5, which has no"):
        s.backward({"a": head * w[0], "b": w[1] - 2.5}, shared_params=[w])


# --------------------------------------------------------------------------- MoCo
@pytest.mark.parametrize("rho", [None, 0.3])
def test_moco_two_steps_of_algorithm_1(rho: float | None) -> None:
    # Algorithm 1 with h = g: y ← y − β_t (y − h), λ ← Π_Δ(λ − γ_t (Y Yᵀ + ρ I) λ), d = Yᵀλ,
    # β_t = 0.5/√t, γ_t = 0.1/√t, λ₀ = ½, y₀ = 0; rho=None is the default, ρ = 0. For two
    # tasks Π_Δ(v) = v + (1 − Σv)/2 while both entries stay positive (they do here). The first
    # step keeps λ ∝ 1 up to the projection, so ρ only shows in the second.
    kwargs = {} if rho is None else {"rho": rho}
    s = tb.create_strategy("moco", ["a", "b"], normalization="none", **kwargs)
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    ridge = (rho or 0.0) * torch.eye(2, dtype=torch.float64)
    y, lam = torch.zeros(2, 2, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    for t in (1, 2):
        y = y - 0.5 / math.sqrt(t) * (y - jacobian)
        lam = lam - 0.1 / math.sqrt(t) * (y @ y.T + ridge) @ lam
        lam = lam + (1 - lam.sum()) / 2
        assert bool((lam > 0).all())
        torch.testing.assert_close(s.aggregate(jacobian), y.T @ lam)
        torch.testing.assert_close(s.lambdas.double(), lam)


# --------------------------------------------------------------------------- issue 15: no syncs
def test_nash_reuse_schedule_reads_the_step_counter_only_after_an_outside_write() -> None:
    # update_weights_every = 3: solve at steps 0, 3, 6, reuse between. The host keeps a copy of
    # the counter; the buffer is read once at the start, then only after something else wrote
    # it (a loaded state, a restored transaction).
    from syncs import SyncCounter  # tests/syncs.py

    s = tb.create_strategy("nash_mtl", ["a", "b", "c"], update_weights_every=3, max_norm=0)
    assert isinstance(s, tb.GradientAggregation)
    losses, index = torch.ones(3), torch.arange(3)
    gramian = torch.diag(torch.tensor([1.0, 4.0, 9.0]))

    reads = []

    def step() -> bool:  # True: a solve
        with SyncCounter() as syncs:  # the schedule's decision
            reused = s.reused_weights(losses, index)
        reads.append(len(syncs))
        if reused is None:
            s.gramian_weights(gramian, losses, index)
        return reused is None

    assert [step() for _ in range(6)] == [True, False, False, True, False, False]
    assert reads == [1, 0, 0, 0, 0, 0]  # the first read, then none
    assert int(s.step) == 6
    state = s.state_dict()
    state["step"] = torch.tensor(4)
    s.load_state_dict(state)
    assert [step(), step(), step()] == [False, False, True]  # steps 4, 5, 6 of the schedule
    assert reads[6:] == [1, 0, 0] and int(s.step) == 7
    with pytest.raises(RuntimeError, match="rolled back"), s.transaction():
        step()  # step 7: reuse; then the step fails and the counter is restored
        raise RuntimeError("rolled back")
    assert int(s.step) == 7
    assert [step(), step(), step()] == [False, False, True]  # 7 again, 8, 9
    assert reads[10:] == [1, 0, 0]


def test_graddrop_features_chunks_give_the_one_piece_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The per-task products on features are taken a few tasks at a time (temporaries that stay
    # in cache); chunks of one task give what one piece gives, to rounding.
    from taskbalance.strategies import graddrop

    generator = torch.Generator().manual_seed(3)
    jacobian = torch.randn(5, 6 * 4, generator=generator, dtype=torch.float64)
    features = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    losses, index = torch.ones(5, dtype=torch.float64), torch.arange(5)
    whole = tb.create_strategy("graddrop", [f"t{i}" for i in range(5)], seed=2)
    assert isinstance(whole, tb.GradientAggregation)
    expected = whole.aggregate_rows(jacobian, losses, index, [features])
    assert graddrop._task_chunks(5, 24) == [slice(0, graddrop._CHUNK // 24)]  # one piece
    monkeypatch.setattr(graddrop, "_CHUNK", 24)
    assert graddrop._task_chunks(5, 24) == [slice(i, i + 1) for i in range(5)]
    chunked = tb.create_strategy("graddrop", [f"t{i}" for i in range(5)], seed=2)
    assert isinstance(chunked, tb.GradientAggregation)
    torch.testing.assert_close(
        chunked.aggregate_rows(jacobian, losses, index, [features]), expected
    )
