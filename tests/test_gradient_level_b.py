"""UPGrad, DualProj, ConFIG, FairGrad, GradVac, GradDrop, MoCo, DB-MTL and the dual-cone solver.

Pinned values are derived by hand in the comments; property tests run every method over random
and adversarial Jacobians (zero, duplicate and opposite rows, scales from 1e-30 to 1e15).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import taskbalance as tb
from taskbalance.cone import project_weights
from taskbalance.strategies.fairgrad import fair_weights
from taskbalance.strategies.moco import project_to_simplex

pytestmark = pytest.mark.usefixtures("one_thread")


NAMES = ("upgrad", "dualproj", "config", "fairgrad", "gradvac", "graddrop", "moco", "db_mtl")
DETERMINISTIC = ("upgrad", "dualproj", "config", "fairgrad")
SQRT2 = math.sqrt(2.0)


def tasks(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


def aggregate(name: str, jacobian: torch.Tensor, **kwargs: object) -> torch.Tensor:
    strategy = tb.create_strategy(name, tasks(jacobian.shape[0]), **kwargs)
    return strategy.aggregate(jacobian)


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(
        actual.double(), torch.tensor(expected, dtype=torch.float64), rtol=tol, atol=tol
    )


# --------------------------------------------------------------------------- pinned values
CONFLICT = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
ORTHOGONAL = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)


def test_upgrad_pinned() -> None:
    # Orthogonal gradients conflict with nothing: UPGrad is the mean.
    close(aggregate("upgrad", ORTHOGONAL), [1.0, 0.5])
    # g1 = (1, 0), g2 = (−1, 1); the cone is {v1 ≥ 0, v2 ≥ v1}. Π(g1) = (½, ½), Π(g2) = (0, 1),
    # mean (¼, ¾). Weights: Π(g1/2) = (¼, ¼) = ½g1 + ¼g2, Π(g2/2) = (0, ½) = ½g1 + ½g2.
    s = tb.create_strategy("upgrad", ["a", "b"])
    close(s.aggregate(CONFLICT), [0.25, 0.75])
    weights = s.gramian_weights(CONFLICT @ CONFLICT.T, torch.ones(2), torch.arange(2))
    close(weights, [1.0, 0.75])


def test_dualproj_pinned() -> None:
    close(aggregate("dualproj", ORTHOGONAL), [1.0, 0.5])  # the mean, already conflict-free
    # g1 = (1, 0), g2 = (−2, 1): mean (−½, ½) conflicts with g1; its projection on
    # {v1 ≥ 0, v2 ≥ 2v1} is (0, ½) = 1·g1 + ½·g2.
    j = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    s = tb.create_strategy("dualproj", ["a", "b"])
    close(s.aggregate(j), [0.0, 0.5])
    close(s.gramian_weights(j @ j.T, torch.ones(2), torch.arange(2)), [1.0, 0.5])


def test_config_pinned() -> None:
    # Unit rows e1, e2: U⁺1 = (1, 1); projections 2/√2 + 1/√2 → d = 3/2·(1, 1).
    close(aggregate("config", ORTHOGONAL), [1.5, 1.5])
    # g1 = (1, 0), u2 = (−1, 1)/√2: v with v1 = 1, (v2 − v1)/√2 = 1 → v = (1, 1 + √2);
    # Σ g_i·v̂ = (1 + √2)/‖v‖ and ‖v‖² = 4 + 2√2, so d = (1, 1 + √2)/(2√2).
    close(aggregate("config", CONFLICT), [1 / (2 * SQRT2), (1 + SQRT2) / (2 * SQRT2)])
    # Opposite gradients: 1 lies in the null space of the cosine matrix, so d = 0.
    close(aggregate("config", torch.tensor([[1.0, 2.0], [-1.0, -2.0]])), [0.0, 0.0])


def test_config_equal_cosines_and_preferences() -> None:
    torch.manual_seed(1)
    j = torch.randn(4, 30, dtype=torch.float64)
    d = aggregate("config", j)
    cosines = (j @ d) / (j.norm(dim=1) * d.norm())
    torch.testing.assert_close(cosines, cosines.mean().expand(4))
    assert bool((cosines > 0).all())
    # With a preference p the cosines are proportional to p.
    d = aggregate("config", j, pref_vector=[1.0, 2.0, 3.0, 4.0])
    cosines = (j @ d) / (j.norm(dim=1) * d.norm())
    torch.testing.assert_close(cosines / cosines[0], torch.arange(1.0, 5.0, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_fixed_point(alpha: float) -> None:
    torch.manual_seed(2)
    j = torch.randn(5, 40, dtype=torch.float64) * torch.tensor([0.1, 1, 3, 10, 100.0])[:, None]
    g = j @ j.T
    w = fair_weights(g, alpha)
    assert bool((w > 0).all())
    torch.testing.assert_close(g @ w, w ** (-1 / alpha), rtol=1e-7, atol=0)
    strategy = tb.create_strategy("fairgrad", tasks(5), alpha=alpha)
    torch.testing.assert_close(strategy.aggregate(j.float()), (w @ j).float(), rtol=1e-4, atol=1e-6)


def test_fairgrad_pinned_orthogonal() -> None:
    # Orthogonal rows: ‖g_i‖² w_i = w_i^(−1/α) → w_i = ‖g_i‖^(−2α/(α+1)). α = 2, norms (2, 1):
    # w = (2^(−4/3), 1), d = (2·2^(−4/3), 1) = (2^(−1/3), 1).
    close(aggregate("fairgrad", ORTHOGONAL), [2 ** (-1 / 3), 1.0])
    close(aggregate("fairgrad", ORTHOGONAL, alpha=1.0), [1.0, 1.0])  # Nash: w_i = 1/‖g_i‖


def test_fairgrad_zero_row_and_infeasible() -> None:
    j = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    close(aggregate("fairgrad", j, alpha=1.0), [1.0, 1.0])  # the zero row gets weight 0
    with pytest.raises(tb.SolverError, match="no direction that improves them all"):
        aggregate("fairgrad", torch.tensor([[1.0, 2.0], [-1.0, -2.0]]), on_failure="raise")


def gradvac_reference(j: torch.Tensor, targets: torch.Tensor, order: torch.Tensor, beta: float):
    """Algorithm 1 of the paper on explicit vectors (the order given, targets updated)."""
    targets = targets.clone()
    rows = j.clone()
    for i in range(j.shape[0]):
        for jj in order[i].tolist():
            g_j = j[jj]
            phi = float(rows[i] @ g_j / (rows[i].norm() * g_j.norm()))
            target = float(targets[i, jj])
            if phi < target:
                a = (
                    rows[i].norm()
                    * (target * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - target**2))
                    / (g_j.norm() * math.sqrt(1 - target**2))
                )
                rows[i] = rows[i] + a * g_j
            targets[i, jj] = (1 - beta) * target + beta * phi
    return rows.sum(0), targets


def test_gradvac_one_step_by_hand() -> None:
    # Targets start at 0: the first step is PCGrad's. g1' = g1 + ½g2 = (½, ½), g2' = g2 + g1
    # = (0, 1), d = (½, 3/2); each target becomes β·cos = 0.01·(−1/√2).
    s = tb.create_strategy("gradvac", ["a", "b"])
    close(s.aggregate(CONFLICT), [0.5, 1.5])
    close(s.targets, [[0.0, -0.01 / SQRT2], [-0.01 / SQRT2, 0.0]], tol=1e-7)
    # Second step: the corrected g_i' has exactly the target cosine with g_j.
    s.aggregate(CONFLICT)
    target = -0.01 / SQRT2
    phi = -1 / SQRT2
    a1 = (target * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - target**2)) / (
        SQRT2 * math.sqrt(1 - target**2)
    )
    g1 = CONFLICT[0] + a1 * CONFLICT[1]
    assert float(g1 @ CONFLICT[1] / (g1.norm() * CONFLICT[1].norm())) == pytest.approx(target)


def test_gradvac_matches_the_papers_algorithm_on_vectors() -> None:
    torch.manual_seed(3)
    k = 4
    s = tb.create_strategy("gradvac", tasks(k), beta=0.3, seed=7)
    generator = torch.Generator().manual_seed(7)
    targets = torch.zeros(k, k, dtype=torch.float64)
    for _ in range(3):
        j = torch.randn(k, 12, dtype=torch.float64)
        keys = torch.rand(k, k, generator=generator).masked_fill(torch.eye(k, dtype=torch.bool), 2)
        order = keys.argsort(1)[:, : k - 1]
        expected, targets = gradvac_reference(j, targets, order, beta=0.3)
        torch.testing.assert_close(s.aggregate(j), expected)
        torch.testing.assert_close(s.targets.double(), targets, rtol=1e-6, atol=1e-7)


def test_graddrop_rules() -> None:
    # Every column has one sign: purity 0 or 1, nothing is dropped.
    j = torch.tensor([[1.0, -2.0, 0.0], [3.0, -1.0, 5.0]])
    close(aggregate("graddrop", j), [4.0, -3.0, 5.0])
    # Opposite entries of equal size: purity ½, each entry keeps exactly one task's value.
    j = torch.tensor([[1.0, -1.0, 2.0, -3.0], [-1.0, 1.0, -2.0, 3.0]])
    d = aggregate("graddrop", j)
    assert all(float(v) in (float(a), float(b)) for v, a, b in zip(d, j[0], j[1]))
    # leak = 1 lets everything through.
    close(aggregate("graddrop", j, leak=1.0), [0.0, 0.0, 0.0, 0.0])


def test_graddrop_on_features_marginalises_the_batch() -> None:
    torch.manual_seed(4)
    trunk, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1) for _ in range(2)])
    x = torch.randn(6, 3)

    def losses() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z = torch.relu(trunk(x))
        return {f"t{i}": heads[i](z).pow(2).mean() for i in range(2)}, z

    s = tb.create_strategy("graddrop", tasks(2), seed=5)
    values, z = losses()
    grads = torch.stack([torch.autograd.grad(v, z, retain_graph=True)[0] for v in values.values()])
    signed = (grads * z.detach().sign()).sum(1)  # [2, 4]
    purity = 0.5 * (1 + signed.sum(0) / signed.abs().sum(0).clamp(min=1e-30))
    seed = torch.randint(2**62, (), generator=torch.Generator().manual_seed(5))
    uniform = torch.rand(4, generator=torch.Generator().manual_seed(int(seed)))
    mask = ((purity > uniform) & (signed > 0)) | ((purity < uniform) & (signed < 0))
    expected_z = (mask.unsqueeze(1).float() * grads).sum(0)  # one mask per unit, every row
    (expected,) = torch.autograd.grad(z, trunk.weight, expected_z, retain_graph=True)
    s.backward(values, features=z)
    torch.testing.assert_close(trunk.weight.grad, expected)
    trunk.zero_grad()
    # leak = 1: the plain sum of the losses.
    values, z = losses()
    tb.create_strategy("graddrop", tasks(2), leak=1.0).backward(values, features=z)
    (expected,) = torch.autograd.grad(sum(losses()[0].values()), trunk.weight)
    torch.testing.assert_close(trunk.weight.grad, expected)


def test_moco_one_step_by_hand() -> None:
    s = tb.create_strategy("moco", ["a", "b"], normalization="none")
    # Step 1: β₁ = 0.5 → y = ½J; λ = Π(½·1 − 0.1·(yyᵀ)·½·1). With J = [[1,0],[−1,1]]:
    # yyᵀ = ¼[[1,−1],[−1,2]], (yyᵀ)λ = ¼·½·(0, 1) = (0, 1/8); λ = Π((½, ½ − 1/80)) = (½ + 1/160,
    # ½ − 1/160) and d = yᵀλ = ½(λ1 − λ2, λ2).
    d = s.aggregate(CONFLICT)
    lam = [0.5 + 1 / 160, 0.5 - 1 / 160]
    close(s.lambdas, lam, tol=1e-7)
    close(d, [0.5 * (lam[0] - lam[1]), 0.5 * lam[1]])
    close(s.tracked, (0.5 * CONFLICT).tolist())
    # Step 2: β₂ = 0.5/√2 toward the new gradients.
    j2 = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    s.aggregate(j2)
    beta = 0.5 / SQRT2
    close(s.tracked, (0.5 * CONFLICT * (1 - beta) + beta * j2).tolist())


def test_moco_loss_normalisation_and_shape_check() -> None:
    s = tb.create_strategy("moco", ["a", "b"])
    s.aggregate(ORTHOGONAL, torch.tensor([3.0, 5.0], dtype=torch.float64))
    # h_i = g_i/‖g_i‖·L_i: (3, 0) and (0, 5); y = ½h.
    close(s.tracked, [[1.5, 0.0], [0.0, 2.5]], tol=1e-7)
    with pytest.raises(tb.StrategyError, match="fixed size"):
        s.aggregate(torch.ones(2, 3))
    fresh = tb.create_strategy("moco", ["a", "b"])
    fresh.load_state_dict(s.state_dict())  # the lazily sized buffer takes the saved shape
    assert torch.equal(fresh.tracked, s.tracked)
    # A first step that fails leaves the buffer unsized, as it was.
    failing = tb.create_strategy("db_mtl", ["a", "b"])
    with pytest.raises(tb.StrategyError, match="no logarithm"):
        failing.aggregate(ORTHOGONAL, torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert failing.tracked.shape == (0, 0)


def test_simplex_projection() -> None:
    close(project_to_simplex(torch.tensor([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5])
    close(project_to_simplex(torch.tensor([2.0, 0.0])), [1.0, 0.0])
    close(project_to_simplex(torch.tensor([1.0, 1.0, 1.0, 1.0])), [0.25] * 4)
    torch.manual_seed(5)
    for _ in range(20):
        p = project_to_simplex(torch.randn(7, dtype=torch.float64) * 3)
        assert float(p.sum()) == pytest.approx(1.0) and bool((p >= 0).all())


def test_db_mtl_by_hand_and_loss_scale_invariance() -> None:
    s = tb.create_strategy("db_mtl", ["a", "b"], eps=0.0)
    losses = torch.tensor([2.0, 0.5], dtype=torch.float64)
    # h = g/L = (½, 0) and (−2, 2); ĝ = (1 − 0.9)h; norms 0.05, 0.2√2; α = (4√2, 1).
    d = s.aggregate(CONFLICT, losses)
    h = CONFLICT / losses[:, None] * 0.1
    alpha = h.norm(dim=1).max() / (h.norm(dim=1) + 1e-8)
    torch.testing.assert_close(d, alpha @ h)
    close(s.alphas, [4 * SQRT2, 1.0], tol=1e-6)
    # Multiplying a loss by c multiplies its gradient by c: log-loss gradients do not change.
    twin = tb.create_strategy("db_mtl", ["a", "b"], eps=0.0)
    scaled = CONFLICT * torch.tensor([[1000.0], [1.0]], dtype=torch.float64)
    torch.testing.assert_close(twin.aggregate(scaled, losses * torch.tensor([1000.0, 1.0])), d)


def test_db_mtl_heads_get_log_loss_gradients_and_nonpositive_losses_fail() -> None:
    torch.manual_seed(6)
    trunk, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1) for _ in range(2)])
    x = torch.randn(5, 3)
    z = trunk(x)
    values = {f"t{i}": 1 + heads[i](z).pow(2).mean() for i in range(2)}
    expected = torch.autograd.grad(
        torch.log(values["t0"] + 1e-8), heads[0].weight, retain_graph=True
    )[0]
    tb.create_strategy("db_mtl", tasks(2)).backward(values, features=z)
    torch.testing.assert_close(heads[0].weight.grad, expected)
    z = trunk(x)
    values = {"t0": heads[0](z).mean() * 0 - 1, "t1": heads[1](z).pow(2).mean()}
    with pytest.raises(tb.StrategyError, match=r"'t0'.*no logarithm"):
        tb.create_strategy("db_mtl", tasks(2)).backward(values, features=z)


# --------------------------------------------------------------------------- dual-cone solver
def test_project_weights_kkt_on_random_problems() -> None:
    torch.manual_seed(7)
    for k, p in [(2, 5), (5, 3), (10, 50), (20, 8), (40, 100)]:
        j = torch.randn(k, p, dtype=torch.float64)
        g = j @ j.T
        u = torch.rand(3, k, dtype=torch.float64)
        w = project_weights(g, u, reg_eps=0.0)
        scale = g.trace()
        assert bool((w >= u - 1e-12).all())
        assert bool((g @ w.T >= -1e-6 * scale).all())  # no conflict
        slack = ((w - u) * (g @ w.T).T).abs().max()  # complementarity
        assert float(slack) <= 1e-6 * float(scale) * max(1.0, float(w.abs().max()))


def test_project_weights_reports_non_convergence() -> None:
    j = torch.randn(30, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with pytest.raises(tb.StrategyError, match="did not converge in 1 iterations"):
        project_weights(j @ j.T, torch.eye(30, dtype=torch.float64), max_iter=1)


# --------------------------------------------------------------------------- properties
def adversarial_jacobians() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(9)
    out = []
    for k, p in [(2, 3), (3, 10), (5, 5), (7, 40)]:
        base = torch.randn(k, p, generator=generator, dtype=torch.float64)
        zero = base.clone()
        zero[0] = 0
        duplicate = base.clone()
        duplicate[1] = duplicate[0]
        opposite = base.clone()
        opposite[1] = -opposite[0]
        mixed = base * torch.logspace(-6, 6, k, dtype=torch.float64)[:, None]
        out += [base, zero, duplicate, opposite, mixed]
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1.0, 1e8, 1e15])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_or_clear_error(name: str, scale: float, dtype: torch.dtype) -> None:
    for j in adversarial_jacobians():
        j = (j * scale).to(dtype)
        try:
            d = aggregate(name, j)
        except tb.StrategyError as error:
            assert str(error), "empty error message"
            continue
        assert d.shape == (j.shape[1],) and d.dtype == dtype
        assert bool(torch.isfinite(d).all()), f"{name}: non-finite output at scale {scale}"


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e15])
def test_no_conflict(name: str, scale: float) -> None:
    for j in adversarial_jacobians():
        j = j * scale
        d = aggregate(name, j)
        # Admitted conflict: reg_eps·tr(G)·w_i plus the solver tolerance, both relative to tr(G).
        tolerance = 1e-5 * float((j * j).sum())
        assert float((j @ d).min()) >= -tolerance, f"{name} conflicts at scale {scale}"


def test_no_conflict_random_many_tasks() -> None:
    generator = torch.Generator().manual_seed(10)
    for k in (10, 40):
        j = torch.randn(k, 200, generator=generator, dtype=torch.float64)
        for name in ("upgrad", "dualproj"):
            d = aggregate(name, j)
            assert float((j @ d).min()) >= -1e-6 * float((j * j).sum())


@pytest.mark.parametrize("name", [*DETERMINISTIC, "moco", "db_mtl"])
def test_permuting_tasks_permutes_nothing_in_the_direction(name: str) -> None:
    generator = torch.Generator().manual_seed(11)
    j = torch.randn(5, 20, generator=generator, dtype=torch.float64)
    losses = torch.rand(5, generator=generator, dtype=torch.float64) + 0.5
    permutation = torch.tensor([3, 0, 4, 1, 2])
    d = tb.create_strategy(name, tasks(5)).aggregate(j, losses)
    twin = tb.create_strategy(name, tasks(5)).aggregate(j[permutation], losses[permutation])
    torch.testing.assert_close(d, twin, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("name", "power"),
    [
        ("upgrad", 1.0),
        ("dualproj", 1.0),
        ("config", 1.0),
        ("fairgrad", -1 / 3),  # α = 2: s^((1−α)/(1+α))
        ("gradvac", 1.0),
        ("graddrop", 1.0),
    ],
)
def test_scaling(name: str, power: float) -> None:
    generator = torch.Generator().manual_seed(12)
    j = torch.randn(4, 30, generator=generator, dtype=torch.float64)
    for s in (1e-3, 7.0, 1e4):
        d = tb.create_strategy(name, tasks(4)).aggregate(j)
        scaled = tb.create_strategy(name, tasks(4)).aggregate(s * j)
        torch.testing.assert_close(scaled, s**power * d, rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("upgrad", {"reg_eps": -1.0}, "reg_eps must be a finite number >= 0"),
        ("upgrad", {"tol": 0.0}, "tol must be a positive finite number"),
        ("upgrad", {"max_iter": 0}, "max_iter must be an integer >= 1"),
        ("upgrad", {"pref_vector": [1.0, -1.0]}, "pref_vector must be non-negative"),
        ("dualproj", {"pref_vector": [1.0]}, "pref_vector has 1 values for 2 tasks"),
        ("config", {"rcond": 2.0}, "rcond must be a number in"),
        ("fairgrad", {"alpha": 0.0}, "alpha must be a positive finite number"),
        ("fairgrad", {"max_iter": 0}, "max_iter must be an integer >= 1"),
        ("gradvac", {"beta": 0.0}, r"beta must be a number in \(0, 1\]"),
        ("gradvac", {"eps": -1.0}, "eps must be a positive finite number"),
        ("graddrop", {"leak": 2.0}, r"leak must be in \[0, 1\]"),
        ("graddrop", {"seed": 1.5}, "seed must be an integer"),
        ("moco", {"gamma": 2.0}, r"gamma must be a number in \(0, 1\]"),
        ("moco", {"rho": -1.0}, "rho must be a finite number >= 0"),
        ("moco", {"normalization": "l2"}, "normalization must be 'loss' or 'none'"),
        ("db_mtl", {"beta": 1.0}, r"beta must be a number in \[0, 1\)"),
        ("db_mtl", {"eps": -1.0}, "eps must be a finite number >= 0"),
    ],
)
def test_argument_checks(name: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(tb.StrategyError, match=message):
        tb.create_strategy(name, ["a", "b"], **kwargs)


def test_defaults_in_repr() -> None:
    assert "alpha=2.0" in repr(tb.create_strategy("fairgrad", ["a", "b"]))
    assert "beta=0.01" in repr(tb.create_strategy("gradvac", ["a", "b"]))
    assert "reg_eps=1e-08" in repr(tb.create_strategy("upgrad", ["a", "b"]))


def test_partial_labels_use_present_tasks_only() -> None:
    # UPGrad on tasks a, c of (a, b, c) equals UPGrad built for (a, c).
    s = tb.create_strategy("upgrad", ["a", "b", "c"])
    weights = s.gramian_weights(CONFLICT @ CONFLICT.T, torch.ones(2), torch.tensor([0, 2]))
    close(weights, [1.0, 0.75])


def test_graddrop_needs_features_with_a_batch_dimension() -> None:
    s = tb.create_strategy("graddrop", ["a", "b"])
    z = torch.tensor([1.0, -2.0], requires_grad=True)  # no batch dimension
    before = {k: v.clone() for k, v in s.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(tb.StrategyError, match=r"batch dimension first, got shape \(2,\)"):
        s.backward({"a": z.sum(), "b": (z * z).sum()}, features=z)
    assert all(torch.equal(v, s.state_dict()[k]) for k, v in before.items())
    assert z.grad is None
