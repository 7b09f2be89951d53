"""MGDA, PCGrad, CAGrad, Nash-MTL, IMTL-G, IMTL, Aligned-MTL: property tests over random and
adversarial Jacobians (TorchJD style), the scaling each paper states, and pinned values
derived by hand from the papers' formulas."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch

import taskbalance as tb
from taskbalance import StrategyError
from taskbalance.testing import ToyProblem

NAMES = ("mgda", "pcgrad", "cagrad", "nash_mtl", "imtl_g", "imtl", "aligned_mtl")
DETERMINISTIC = ("mgda", "cagrad", "nash_mtl", "imtl_g", "imtl", "aligned_mtl")


def tasks(count: int) -> tuple[str, ...]:
    return tuple(f"t{i}" for i in range(count))


def make(name: str, count: int, **kwargs: object) -> tb.GradientAggregation:
    strategy = tb.create_strategy(name, tasks(count), **kwargs)
    assert isinstance(strategy, tb.GradientAggregation)
    return strategy


def aggregate(name: str, jacobian: torch.Tensor, **kwargs: object) -> torch.Tensor:
    return make(name, jacobian.shape[0], **kwargs).aggregate(jacobian)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- Jacobians
def _random(count: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, dim, generator=generator, dtype=torch.float64)


def _with_zero_row(seed: int) -> torch.Tensor:
    jacobian = _random(4, 12, seed)
    jacobian[1] = 0
    return jacobian


def _with_duplicates(seed: int) -> torch.Tensor:
    jacobian = _random(4, 12, seed)
    jacobian[2] = jacobian[0]
    return jacobian


def _with_opposites(seed: int) -> torch.Tensor:
    jacobian = _random(3, 12, seed)
    jacobian[1] = -jacobian[0]
    return jacobian


def _row_scales(seed: int) -> torch.Tensor:
    return (
        _random(5, 12, seed)
        * torch.tensor([1e-30, 1e-8, 1.0, 1e8, 1e15], dtype=torch.float64)[:, None]
    )


def _small_between(seed: int) -> torch.Tensor:
    """Two unit gradients and a tenfold smaller one between them: 1ᵀG⁻¹n < 0, so IMTL-G's
    normalisation must divide by |1ᵀG⁻¹n| (dividing by the sum turns d against every task).
    A random rotation per seed leaves the Gramian as it is."""
    base = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.07, 0.07, 0.01]])
    rotation, _ = torch.linalg.qr(_random(3, 3, seed))
    return base @ rotation


JACOBIANS: dict[str, Callable[[int], torch.Tensor]] = {
    "random_2x5": lambda seed: _random(2, 5, seed),
    "random_3x20": lambda seed: _random(3, 20, seed),
    "random_10x64": lambda seed: _random(10, 64, seed),
    "wide_8x3": lambda seed: _random(8, 3, seed),  # more tasks than dimensions
    "zero_row": _with_zero_row,
    "all_zero": lambda seed: torch.zeros(3, 7, dtype=torch.float64),
    "duplicates": _with_duplicates,
    "opposites": _with_opposites,
    "tiny": lambda seed: _random(4, 9, seed) * 1e-30,
    "huge": lambda seed: _random(4, 9, seed) * 1e15,
    "row_scales": _row_scales,
    "small_between": _small_between,
}


@pytest.mark.parametrize("kind", sorted(JACOBIANS))
@pytest.mark.parametrize("name", NAMES)
def test_finite_or_clear_error(name: str, kind: str) -> None:
    for seed in range(3):
        jacobian = JACOBIANS[kind](seed)
        try:
            direction = aggregate(name, jacobian)
        except StrategyError as error:
            # Only Nash-MTL may refuse, and only where G α = 1/α has no solution.
            assert name == "nash_mtl", f"{name} raised on {kind}: {error}"
            assert kind in ("zero_row", "all_zero", "opposites", "wide_8x3")
            assert "Nash-MTL" in str(error)
            continue
        assert direction.shape == (jacobian.shape[1],)
        assert direction.dtype == jacobian.dtype
        assert torch.isfinite(direction).all(), f"{name} on {kind}: {direction}"


# Strategies whose paper promises that no task gets worse to first order (g_iᵀd ≥ 0), and the
# Jacobians outside that promise: IMTL-G and ConFIG need a direction with equal projections on
# the unit gradients, which more tasks than dimensions rarely allow.
NO_CONFLICT = {
    "mgda": (),
    "nash_mtl": (),
    "imtl_g": ("wide_8x3",),
    "config": ("wide_8x3",),
    "fairgrad": (),
}
NO_SOLUTION = ("zero_row", "all_zero", "opposites", "wide_8x3")


@pytest.mark.parametrize("kind", sorted(JACOBIANS))
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [(name, {}) for name in NO_CONFLICT] + [("nash_mtl", {"max_norm": 0.0})],
)
def test_no_conflict(name: str, kwargs: dict[str, float], kind: str) -> None:
    if kind in NO_CONFLICT[name]:
        pytest.skip(f"{name} promises no conflict only where equal projections exist")
    strategy = tb.create_strategy(name, tasks(3), **kwargs)
    if getattr(strategy, "on_failure", None) is not None:
        kwargs = {**kwargs, "on_failure": "raise"}  # a fallback makes no promise
    for seed in range(3):
        jacobian = JACOBIANS[kind](seed)
        try:
            direction = aggregate(name, jacobian, **kwargs)
        except tb.SolverError:
            assert kind in NO_SOLUTION, f"{name} failed on {kind}"
            continue
        products = jacobian @ direction
        # Up to the solver's tolerance: MGDA's gap is ≤ 1e-10·max‖g_i‖².
        norms = jacobian.norm(dim=1)
        bound = 1e-7 * norms * direction.norm() + 1e-9 * norms.max() ** 2
        assert torch.all(products >= -bound), f"{name} conflicts with a task on {kind}: {products}"


@pytest.mark.parametrize("kind", ["random_3x20", "random_10x64", "duplicates", "row_scales"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_permuting_tasks_permutes_nothing_else(name: str, kind: str) -> None:
    jacobian = JACOBIANS[kind](7)
    permutation = torch.randperm(jacobian.shape[0], generator=torch.Generator().manual_seed(1))
    original = aggregate(name, jacobian)
    permuted = aggregate(name, jacobian[permutation])
    scale = jacobian.norm(dim=1).max()
    torch.testing.assert_close(permuted / scale, original / scale, rtol=1e-6, atol=1e-9)


def test_pcgrad_two_tasks_is_order_free() -> None:
    jacobian = _random(2, 6, 3)
    jacobian[1] -= (
        2 * (jacobian[1] @ jacobian[0]).clamp(min=0) / jacobian[0].norm() ** 2 * jacobian[0]
    )
    expected = aggregate("pcgrad", jacobian)
    for seed in range(5):
        torch.testing.assert_close(aggregate("pcgrad", jacobian[[1, 0]], seed=seed), expected)


@pytest.mark.parametrize("factor", [1e-30, 1e-6, 3.0, 1e15])
@pytest.mark.parametrize("name", ["mgda", "pcgrad", "cagrad", "imtl_g", "aligned_mtl"])
def test_positively_homogeneous(name: str, factor: float) -> None:
    """d(kJ) = k d(J): each of these papers' updates is a fixed combination of the gradients
    whose weights depend only on the angles and relative norms."""
    jacobian = _random(5, 16, 21)
    torch.testing.assert_close(
        aggregate(name, jacobian * factor) / factor, aggregate(name, jacobian), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("factors", [[1e-30] * 4, [1e15] * 4, [1e-3, 1.0, 10.0, 1e4]])
def test_nash_direction_is_scale_invariant(factors: list[float]) -> None:
    """Navon et al.: scaling any task's loss leaves the Nash-MTL update unchanged."""
    jacobian = _random(4, 16, 5)
    scaled = torch.tensor(factors, dtype=torch.float64)[:, None] * jacobian
    for max_norm in (0.0, 1.0):
        torch.testing.assert_close(
            aggregate("nash_mtl", scaled, max_norm=max_norm),
            aggregate("nash_mtl", jacobian, max_norm=max_norm),
            rtol=1e-6,
            atol=0,
        )


def test_imtl_g_direction_ignores_per_task_scale() -> None:
    jacobian = _random(4, 16, 8)
    scaled = torch.tensor([1e-4, 1.0, 7.0, 1e3], dtype=torch.float64)[:, None] * jacobian
    a, b = aggregate("imtl_g", jacobian), aggregate("imtl_g", scaled)
    torch.testing.assert_close(a / a.norm(), b / b.norm(), rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- MGDA by hand
@pytest.mark.parametrize(
    ("normalization", "expected"),
    [
        ("none", [0.8, 0.4]),  # w₁ = (g₂−g₁)·g₂/‖g₁−g₂‖² = 4/5
        ("l2", [0.5, 1.0]),  # unit gradients: w = (½, ½) on the raw gradients
        ("loss", [0.2, 1.6]),  # g/L = (1, 0), (0, ½): w₁ = (¼)/(5/4) = 1/5
        ("loss+", [1 / 17, 32 / 17]),  # g/(L‖g‖) = (1, 0), (0, ¼): w₁ = (1/16)/(17/16)
    ],
)
def test_mgda_two_tasks_by_hand(normalization: str, expected: list[float]) -> None:
    strategy = make("mgda", 2, normalization=normalization)
    got = strategy.aggregate(t([[1.0, 0.0], [0.0, 2.0]]), losses=t([[1.0, 4.0]])[0])
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_mgda_three_tasks_by_hand_and_errors() -> None:
    got = aggregate("mgda", t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # w = (½, ½, 0)
    torch.testing.assert_close(got, t([[0.5, 0.5]])[0], atol=1e-7, rtol=0)
    with pytest.raises(StrategyError, match="needs positive losses"):
        make("mgda", 2, normalization="loss").aggregate(
            t([[1.0], [2.0]]), losses=t([[1.0, -1.0]])[0]
        )
    with pytest.raises(StrategyError, match="normalization must be one of"):
        make("mgda", 2, normalization="max")
    with pytest.raises(StrategyError, match="max_iter must be an integer >= 1"):
        make("mgda", 2, max_iter=0)
    with pytest.raises(StrategyError, match="tol must be a positive number"):
        make("mgda", 2, tol=-1.0)


# --------------------------------------------------------------------------- PCGrad
def test_pcgrad_two_tasks_by_hand() -> None:
    # g₁·g₂ = −1: g̃₁ = g₁ + ½ g₂ = (½, ½), g̃₂ = g₂ + g₁ = (0, 1).
    jacobian = t([[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(aggregate("pcgrad", jacobian), t([[0.5, 1.5]])[0])
    torch.testing.assert_close(
        aggregate("pcgrad", jacobian, reduction="mean"), t([[0.25, 0.75]])[0]
    )
    # No conflict: the plain sum.
    torch.testing.assert_close(aggregate("pcgrad", t([[1.0, 0.0], [1.0, 1.0]])), t([[2.0, 1.0]])[0])
    # Only the pair (1, 2) conflicts, so the order cannot matter: (½, 3/2) + g₃.
    three = t([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]])
    for seed in range(4):
        torch.testing.assert_close(aggregate("pcgrad", three, seed=seed), t([[0.5, 2.5]])[0])


def test_pcgrad_matches_algorithm_1_on_vectors() -> None:
    """The Gramian coefficients equal the paper's vector procedure with the same orders."""
    jacobian = _random(6, 10, 4)
    strategy = make("pcgrad", 6, seed=3)
    twin = copy.deepcopy(strategy)
    orders = twin._orders(6, jacobian.device)
    projected = jacobian.clone()
    for i in range(6):
        for j in orders[i].tolist():
            inner = projected[i] @ jacobian[j]
            if inner < 0:
                projected[i] = projected[i] - inner / (jacobian[j] @ jacobian[j]) * jacobian[j]
    torch.testing.assert_close(strategy.aggregate(jacobian), projected.sum(dim=0))
    assert torch.equal(strategy.generator_state, twin.generator_state)


def test_pcgrad_state_resumes_the_random_orders() -> None:
    jacobian = _random(5, 8, 1)
    strategy = make("pcgrad", 5, seed=11)
    strategy.aggregate(jacobian)
    resumed = make("pcgrad", 5)
    resumed.load_state_dict(strategy.state_dict())
    for _ in range(3):
        assert torch.equal(strategy.aggregate(jacobian), resumed.aggregate(jacobian))
    with pytest.raises(StrategyError, match="reduction must be 'sum' or 'mean'"):
        make("pcgrad", 2, reduction="max")


# --------------------------------------------------------------------------- CAGrad
def test_cagrad_by_hand() -> None:
    gramian = torch.eye(2, dtype=torch.float64)
    index, losses = torch.arange(2), torch.ones(2, dtype=torch.float64)
    # Orthogonal unit gradients: w = (½, ½), g_w = g₀, λ = c: d = T (1 + c) g₀ / rescale.
    for rescale, divisor in [(0, 1.0), (1, 1.25), (2, 1.5)]:
        weights = make("cagrad", 2, c=0.5, rescale=rescale).gramian_weights(gramian, losses, index)
        torch.testing.assert_close(weights, torch.full((2,), 1.5 / divisor, dtype=torch.float64))
    # g₁ = (1, 0), g₂ = (0, 2), c = 0.4: the dual is w = (1, 0) (see test_solvers), so
    # λ = c‖g₀‖/‖g₁‖ = 0.4·√1.25 and the weights are (1 + 2λ, 1)/(1 + c²).
    lam = 0.4 * math.sqrt(1.25)
    got = aggregate("cagrad", t([[1.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(got, t([[(1 + 2 * lam) / 1.16, 2 / 1.16]])[0], rtol=1e-7, atol=1e-9)
    # c = 0: the sum of the gradients.
    jacobian = _random(4, 6, 2)
    torch.testing.assert_close(aggregate("cagrad", jacobian, c=0.0, rescale=0), jacobian.sum(0))
    with pytest.raises(StrategyError, match="c must be a finite number >= 0"):
        make("cagrad", 2, c=-0.1)
    with pytest.raises(StrategyError, match="rescale must be 0, 1 or 2"):
        make("cagrad", 2, rescale=3)


def test_cagrad_where_the_dual_combination_vanishes() -> None:
    # g₁ = −g₂ and g₃ ⟂ both: the dual puts w = (½, ½, 0), so g_w = 0 and λ = √φ/‖g_w‖ is
    # undefined. Then d = T·g₀/(1 + c²) and every weight is 1/(1 + c²): not λ ~ 1e8 weights
    # that hand the heads enormous gradients for the same shared update.
    jacobian = t([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    strategy = make("cagrad", 3, c=0.4)
    weights = strategy.gramian_weights(jacobian @ jacobian.T, torch.ones(3), torch.arange(3))
    torch.testing.assert_close(weights, torch.full((3,), 1 / 1.16, dtype=torch.float64))
    torch.testing.assert_close(strategy.aggregate(jacobian), t([[0.0, 1 / 1.16]])[0])


def test_cagrad_improves_the_worst_task_most() -> None:
    jacobian = _random(3, 8, 9)
    c = 0.4
    d = aggregate("cagrad", jacobian, c=c, rescale=0) / 3  # back to the paper's scale of g₀
    g0 = jacobian.mean(0)
    assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9)
    worst = float((jacobian @ d).min())
    for seed in range(50):  # no point of the ball does better on the worst task
        u = _random(1, 8, 100 + seed)[0]
        other = g0 + c * g0.norm() * u / u.norm()
        assert float((jacobian @ other).min()) <= worst + 1e-9


# --------------------------------------------------------------------------- Nash-MTL
def test_nash_by_hand() -> None:
    # Orthogonal: α_i = 1/‖g_i‖, d = Σ u_i.
    jacobian = t([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 4.0]])
    strategy = make("nash_mtl", 3, max_norm=0.0)
    torch.testing.assert_close(strategy.aggregate(jacobian), t([[1.0, 1.0, 1.0]])[0])
    torch.testing.assert_close(strategy.last_weights, torch.tensor([0.5, 2.0, 0.25]))
    # Default max_norm = 1: ‖d‖ = √T before clipping, so d is scaled as clip_grad_norm_ does,
    # by max_norm / (‖d‖ + 1e-6).
    clipped = aggregate("nash_mtl", jacobian)
    torch.testing.assert_close(clipped, t([[1.0, 1.0, 1.0]])[0] / (math.sqrt(3) + 1e-6))
    # Two tasks at 60°: α_i = 1/(‖g_i‖√(1 + cos θ)), and G α = 1/α.
    rows = t([[1.0, 0.0], [2 * math.cos(math.pi / 3), 2 * math.sin(math.pi / 3)]])
    two = make("nash_mtl", 2, max_norm=0.0)
    two.aggregate(rows)
    alpha = two.last_weights.double()
    torch.testing.assert_close(alpha, t([[1.0, 0.5]])[0] / math.sqrt(1.5), rtol=1e-6, atol=0)
    torch.testing.assert_close(rows @ rows.T @ alpha, 1 / alpha, rtol=1e-6, atol=0)


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_nash_update_weights_every_reuses_the_solution(max_norm: float) -> None:
    problem = ToyProblem.create(("a", "b", "c"))
    strategy = tb.create_strategy(
        "nash_mtl", ("a", "b", "c"), update_weights_every=3, max_norm=max_norm
    )
    weights = []
    for step in range(4):
        problem.zero_grad()
        losses, features = problem.losses(step)
        weights.append(strategy.backward(losses, features=features).weight_values)
        problem.sgd_step()
    # the report shows α (max_norm clips the gradient after the backward)
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])
    ratio = weights[3] / weights[0]
    assert not torch.allclose(ratio, ratio[:1].expand(3))  # step 3 solves again
    assert int(strategy.step) == 4
    with pytest.raises(StrategyError, match="update_weights_every must be an integer >= 1"):
        make("nash_mtl", 2, update_weights_every=0)
    with pytest.raises(StrategyError, match="max_norm must be a finite number >= 0"):
        make("nash_mtl", 2, max_norm=-1.0)
    with pytest.raises(StrategyError, match="optim_niter must be an integer >= 1"):
        make("nash_mtl", 2, optim_niter=0)


def test_nash_default_tolerance_and_argument_bounds() -> None:
    # Three tasks, the third against the sum of the others: damped Newton needs several steps,
    # and the default tol = 1e-6 bounds the residual max_i |α_i (Gα)_i − 1| of the solution.
    jacobian = t([[1.0, 0.0, 0.1], [0.0, 1.0, 0.1], [-0.5, -0.5, 0.1]])
    strategy = make("nash_mtl", 3, max_norm=0.0)
    strategy.aggregate(jacobian)
    alpha = strategy.last_weights.double()
    residual = (alpha * (jacobian @ jacobian.T @ alpha) - 1).abs().max()
    assert float(residual) <= 1e-5  # last_weights is float32
    make("nash_mtl", 2, optim_niter=1)  # an integer >= 1
    with pytest.raises(StrategyError, match="tol must be a positive number"):
        make("nash_mtl", 2, tol=0.0)


def test_nash_reused_step_gives_alpha_one_to_a_task_without_a_solution() -> None:
    # solve with tasks a and b, then reuse with a, b, c: c has no stored α, so every present
    # task gets α = 1 (the official code's starting point), as documented
    problem = ToyProblem.create(("a", "b", "c"))
    strategy = tb.create_strategy("nash_mtl", ("a", "b", "c"), update_weights_every=2, max_norm=0)
    losses, features = problem.losses(0, tasks=("a", "b"))
    strategy.backward(losses, features=features)
    losses, features = problem.losses(1)
    assert strategy.backward(losses, features=features).weight_values.tolist() == [1.0] * 3


def test_nash_failure_leaves_state_unchanged() -> None:
    strategy = make("nash_mtl", 3, on_failure="raise")
    strategy.aggregate(_random(3, 5, 0))
    before = copy.deepcopy(strategy.state_dict())
    with pytest.raises(StrategyError, match="Nash-MTL"):
        strategy.aggregate(_with_opposites(0))
    for key, value in strategy.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------- IMTL
def paper_imtl_g(jacobian: torch.Tensor) -> torch.Tensor:
    """The paper's closed form: α_{2:T} = g₁Uᵀ(DUᵀ)⁻¹, α₁ = 1 − Σα_{2:T}."""
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    d = jacobian[:1] - jacobian[1:]
    u = units[:1] - units[1:]
    rest = jacobian[0] @ u.T @ torch.linalg.inv(d @ u.T)
    return torch.cat([1 - rest.sum(0, keepdim=True), rest])


def test_imtl_g_matches_the_paper_closed_form() -> None:
    for count in (2, 3, 6):
        jacobian = _random(count, 12, count)
        expected = paper_imtl_g(jacobian) @ jacobian
        torch.testing.assert_close(aggregate("imtl_g", jacobian), expected, rtol=1e-8, atol=1e-10)
        direction = aggregate("imtl_g", jacobian)
        projections = jacobian @ direction / jacobian.norm(dim=1)
        torch.testing.assert_close(projections, projections.mean().expand(count))
    # Hand case: g₁ = (1, 0), g₂ = (0, 3): α = (¾, ¼), d = (¾, ¾).
    torch.testing.assert_close(
        aggregate("imtl_g", t([[1.0, 0.0], [0.0, 3.0]])), t([[0.75, 0.75]])[0]
    )


def test_imtl_g_opposite_gradients_get_zero_weights() -> None:
    # g and −2g: the cosine matrix [[1, −1], [−1, 1]] has 1 in its null space, so C⁺1 = 0:
    # zero weights (d = 0 whatever the weights, but the heads get w_i ∇L_i)
    strategy = make("imtl_g", 2)
    weights = strategy.gramian_weights(
        t([[1.0, -2.0], [-2.0, 4.0]]), torch.ones(2), torch.arange(2)
    )
    assert weights.tolist() == [0.0, 0.0]


def test_mgda_passes_tol_and_max_iter_to_the_solver() -> None:
    # five tasks in three dimensions: one iteration does not reach the default tolerance, but
    # its start already satisfies a loose one
    jacobian = _random(5, 3, 0)
    make("mgda", 5, tol=1e3, max_iter=1, on_failure="raise").aggregate(jacobian)
    with pytest.raises(tb.SolverError):
        make("mgda", 5, max_iter=1, on_failure="raise").aggregate(jacobian)
    make("mgda", 2, tol=0.5)  # tol > 0 is all it takes
    with pytest.raises(StrategyError, match="tol must be a positive number"):
        make("mgda", 2, tol=0.0)


def test_mgda_l2_normalisation_keeps_a_zero_gradient_zero() -> None:
    # g2 = 0: the min-norm point of the hull is 0 itself, d = 0, all the weight on task 2
    strategy = make("mgda", 2, normalization="l2")
    torch.testing.assert_close(strategy.aggregate(t([[1.0, 2.0], [0.0, 0.0]])), t([[0.0, 0.0]])[0])
    assert strategy.last_weights.tolist() == [0.0, 1.0]


def test_imtl_is_imtl_g_on_scaled_losses_and_learns_the_scales() -> None:
    problem = ToyProblem.create(("a", "b", "c"))
    strategy = tb.create_strategy("imtl", ("a", "b", "c"), lr=0.1)
    plain = tb.create_strategy("imtl_g", ("a", "b", "c"))
    losses, features = problem.losses(0)
    jacobian = torch.stack(
        [
            torch.autograd.grad(v, features, retain_graph=True)[0].reshape(-1)
            for v in losses.values()
        ]
    )
    # s = 0: the same weights as IMTL-G.
    torch.testing.assert_close(strategy.aggregate(jacobian), plain.aggregate(jacobian))
    report = strategy.backward(losses, features=features)
    values = torch.stack(list(losses.values())).detach()
    # Adam's first step moves s by lr against the sign of e^s L − 1.
    torch.testing.assert_close(strategy.scale, -0.1 * torch.sign(values - 1))
    torch.testing.assert_close(report.extras["scale"], strategy.scale)
    # With s ≠ 0 the weights are α(e^s G e^s)·e^s.
    factors = torch.exp(strategy.scale.double())
    scaled = plain.aggregate(factors[:, None] * jacobian.double())
    torch.testing.assert_close(strategy.aggregate(jacobian.double()), scaled)
    with pytest.raises(StrategyError, match="init must be a finite number"):
        tb.create_strategy("imtl", ("a", "b"), init=float("nan"))


def test_imtl_scale_steps_by_hand() -> None:
    # losses 2 and 0.5 at s = 0: ∂(e^s L − s)/∂s = (2 − 1, 0.5 − 1) = (1, −0.5)
    def backward(strategy: tb.Strategy) -> None:
        w = torch.tensor([1.0, 2.0], requires_grad=True)
        strategy.backward({"a": 2.0 * w[0], "b": 0.25 * w[1]}, shared_params=[w])

    sgd = tb.create_strategy("imtl", ("a", "b"), lr=0.1, optimizer="sgd")
    backward(sgd)  # s − lr·(1, −0.5)
    assert sgd.scale.tolist() == pytest.approx([-0.1, 0.05])
    default = tb.create_strategy("imtl", ("a", "b"))
    backward(default)  # Adam, lr = 1e-3: the first step is lr·sign of the gradient
    assert default.scale.tolist() == pytest.approx([-1e-3, 1e-3], rel=1e-4)


# --------------------------------------------------------------------------- Aligned-MTL
def test_aligned_by_hand_and_modes() -> None:
    jacobian = t([[2.0, 0.0], [0.0, 1.0]])  # λ = (4, 1); B = √λ_s diag(1/2, 1)
    torch.testing.assert_close(aggregate("aligned_mtl", jacobian), t([[1.0, 1.0]])[0])
    torch.testing.assert_close(
        aggregate("aligned_mtl", jacobian, scale_mode="median"), t([[1.0, 1.0]])[0]
    )  # lower median of (1, 4) = 1
    torch.testing.assert_close(
        aggregate("aligned_mtl", jacobian, scale_mode="rmse"), t([[1.0, 1.0]])[0] * math.sqrt(2.5)
    )
    with pytest.raises(StrategyError, match="scale_mode must be 'min', 'median' or 'rmse'"):
        make("aligned_mtl", 2, scale_mode="max")


def test_aligned_median_of_three_and_rmse_over_the_kept_spectrum() -> None:
    # G = diag(1, 4, 9): B = √λ_s diag(1, ½, ⅓); the median of three is the middle one, λ_s = 4,
    # so w = (2, 1, ⅔) and every w_i g_i has length 2
    three = t([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    median = aggregate("aligned_mtl", three, scale_mode="median")
    torch.testing.assert_close(median, t([[2.0, 2.0, 2.0]])[0])
    # g1 = g2 = (1, 0), g3 = (0, 2): eigenvalues 0 ((1, −1, 0)/√2, dropped), 2 and 4. The mean
    # of the kept ones is 3; w = √3 (1/√2, 1/√2, ½), d = √3 (√2, 1)
    duplicates = t([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    rmse = aggregate("aligned_mtl", duplicates, scale_mode="rmse")
    torch.testing.assert_close(rmse, math.sqrt(3) * t([[math.sqrt(2), 1.0]])[0])


@pytest.mark.parametrize("kind", ["random_3x20", "duplicates", "zero_row", "wide_8x3"])
def test_aligned_rows_are_orthogonal_with_equal_norms(kind: str) -> None:
    from taskbalance.strategies.aligned_mtl import aligned_weights

    jacobian = JACOBIANS[kind](2)
    gramian = jacobian @ jacobian.T
    values, vectors = torch.linalg.eigh(gramian)
    keep = values > values.max() * len(values) * torch.finfo(torch.float64).eps
    basis = vectors[:, keep]
    smallest = values[keep].min()
    b = math.sqrt(smallest) * basis @ torch.diag(values[keep].rsqrt()) @ basis.T
    aligned = b @ jacobian
    # Ĵ Ĵᵀ = λ_min · (projector on the non-null eigenspace)
    torch.testing.assert_close(
        aligned @ aligned.T, smallest * basis @ basis.T, rtol=1e-7, atol=1e-9
    )
    torch.testing.assert_close(aligned_weights(gramian), b.sum(dim=1), rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- both paths
@pytest.mark.parametrize("name", NAMES)
def test_features_path_is_the_representation_update(name: str) -> None:
    """With features=, the trunk gets J_trunkᵀ (Σ w_i ∂L_i/∂z): MGDA-UB style."""
    problem = ToyProblem.create(("a", "b", "c"))
    twin = copy.deepcopy(problem)
    strategy = tb.create_strategy(name, ("a", "b", "c"))
    reference = copy.deepcopy(strategy)
    losses, features = problem.losses(0)
    strategy.backward(losses, features=features)
    twin_losses, twin_features = twin.losses(0)
    rows = torch.stack(
        [
            torch.autograd.grad(v, twin_features, retain_graph=True)[0].reshape(-1)
            for v in twin_losses.values()
        ]
    )
    # max_norm (Nash-MTL's) clips the trunk parameters' gradient after the backward, as the
    # official clip_grad_norm_(shared_parameters): not the feature-space direction
    max_norm, reference.max_norm = reference.max_norm, 0.0
    direction = reference.aggregate(rows, torch.stack(list(twin_losses.values())).detach())
    twin.zero_grad()
    twin_features.backward(direction.view_as(twin_features))
    if max_norm > 0:
        assert torch.nn.utils.clip_grad_norm_(twin.trunk.parameters(), max_norm) > max_norm
    for mine, theirs in zip(problem.trunk.parameters(), twin.trunk.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
