"""The torch solvers of taskbalance.solvers: hand-derived values, optimality certificates,
exact references for gradient norms of very different sizes, degenerate inputs, dtypes, loud
failures, and no CPU solver library anywhere."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from decimal import Decimal, localcontext

import pytest
import torch

import taskbalance as tb
from taskbalance import SolverError, StrategyError
from taskbalance.cone import project_weights
from taskbalance.solvers import cagrad_weights, min_norm_two, min_norm_weights, nash_weights
from taskbalance.strategies.fairgrad import fair_weights
from taskbalance.strategies.imtl_g import imtl_g_weights


def gram(rows: list[list[float]] | torch.Tensor) -> torch.Tensor:
    jacobian = torch.as_tensor(rows, dtype=torch.float64)
    return jacobian @ jacobian.T


def random_jacobian(tasks: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(
        tasks, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    ordered, _ = torch.sort(v, descending=True)
    cumulative = ordered.cumsum(0) - 1
    ranks = torch.arange(1, len(v) + 1, dtype=v.dtype)
    last = (ordered - cumulative / ranks > 0).nonzero().max()
    return (v - cumulative[last] / ranks[last]).clamp(min=0)


def reference_min_norm(gramian: torch.Tensor, steps: int = 20000) -> torch.Tensor:
    """Plain projected gradient, many steps: slow but obviously right."""
    w = torch.full((len(gramian),), 1 / len(gramian), dtype=torch.float64)
    lipschitz = torch.linalg.eigvalsh(gramian).max()
    for _ in range(steps):
        w = project_simplex(w - gramian @ w / lipschitz)
    return w


# --------------------------------------------------------------------------- exact references
# Independent of the solvers: every support S of the weights is tried in 50-digit decimal
# arithmetic (its KKT conditions are solved in closed form), and the support whose solution
# satisfies all the KKT conditions is the answer (unique for a positive definite Gramian).
def _decimal(gramian: torch.Tensor) -> list[list[Decimal]]:
    return [[Decimal(value) for value in row] for row in gramian.double().tolist()]


def _solve_exactly(matrix: list[list[Decimal]], rhs: list[Decimal]) -> list[Decimal] | None:
    """Gaussian elimination with partial pivoting; None for a singular matrix."""
    size = len(rhs)
    rows = [[*row, value] for row, value in zip(matrix, rhs)]
    for column in range(size):
        pivot = max(range(column, size), key=lambda r: abs(rows[r][column]))
        if rows[pivot][column] == 0:
            return None
        rows[column], rows[pivot] = rows[pivot], rows[column]
        for r in range(column + 1, size):
            factor = rows[r][column] / rows[column][column]
            rows[r] = [a - factor * b for a, b in zip(rows[r], rows[column])]
    solution = [Decimal(0)] * size
    for r in reversed(range(size)):
        known = sum(rows[r][c] * solution[c] for c in range(r + 1, size))
        solution[r] = (rows[r][size] - known) / rows[r][r]
    return solution


def exact_min_norm(gramian: torch.Tensor) -> tuple[torch.Tensor, float]:
    """MGDA's weights and ‖d*‖². On a support S: G_SS w_S = ν1, 1ᵀw_S = 1 (then ν = ‖d‖²);
    optimal iff w_S ≥ 0 and (Gw)_i ≥ ν for every task."""
    g = _decimal(gramian)
    count = len(g)
    with localcontext() as context:
        context.prec = 50
        for size in range(1, count + 1):
            for support in itertools.combinations(range(count), size):
                matrix = [[*(g[i][j] for j in support), Decimal(-1)] for i in support]
                matrix.append([Decimal(1)] * size + [Decimal(0)])
                solution = _solve_exactly(matrix, [Decimal(0)] * size + [Decimal(1)])
                if solution is None or min(solution[:size]) < 0:
                    continue
                w = [Decimal(0)] * count
                for i, value in zip(support, solution):
                    w[i] = value
                nu = solution[size]
                slack = [sum(g[i][j] * w[j] for j in range(count)) - nu for i in range(count)]
                if min(slack) >= -abs(nu) * Decimal("1e-30"):
                    return torch.tensor([float(v) for v in w], dtype=torch.float64), float(nu)
    raise AssertionError("no support satisfies the KKT conditions")


def exact_cagrad(gramian: torch.Tensor, c: float) -> tuple[torch.Tensor, float]:
    """CAGrad's dual weights and optimal value h* = min_w bᵀw + r‖g_w‖ (b = G1/k, r = c‖g₀‖).

    On a support S with g_w ≠ 0, stationarity b + rGw/‖g_w‖ = ν1 reads, for u = r w/‖g_w‖,
    G_SS u = ν1 − b_S with uᵀGu = r²: u = νp − q (p = G_SS⁻¹1, q = G_SS⁻¹b_S) and
    ν²·1ᵀp − 2ν·1ᵀq + b_Sᵀq = r², of which only the larger root gives 1ᵀu > 0; w = u / 1ᵀu.
    Optimal iff w ≥ 0 and b_i + (Gu)_i ≥ ν for every task."""
    g = _decimal(gramian)
    count = len(g)
    with localcontext() as context:
        context.prec = 50
        b = [sum(row) / count for row in g]
        r2 = Decimal(c) ** 2 * sum(b) / count
        for size in range(1, count + 1):
            for support in itertools.combinations(range(count), size):
                block = [[g[i][j] for j in support] for i in support]
                p = _solve_exactly(block, [Decimal(1)] * size)
                q = _solve_exactly(block, [b[i] for i in support])
                if p is None or q is None:
                    continue
                a, half, const = sum(p), sum(q), sum(b[i] * v for i, v in zip(support, q))
                discriminant = half * half - a * (const - r2)
                if discriminant <= 0:
                    continue
                nu = (half + discriminant.sqrt()) / a
                u = [Decimal(0)] * count
                for i, pi, qi in zip(support, p, q):
                    u[i] = nu * pi - qi
                if min(u) < 0:
                    continue
                slack = [
                    b[i] + sum(g[i][j] * u[j] for j in range(count)) - nu for i in range(count)
                ]
                if min(slack) >= -abs(nu) * Decimal("1e-30"):
                    total = sum(u)
                    w = [v / total for v in u]
                    norm2 = sum(w[i] * g[i][j] * w[j] for i in range(count) for j in range(count))
                    value = sum(bi * wi for bi, wi in zip(b, w)) + r2.sqrt() * norm2.sqrt()
                    return torch.tensor([float(v) for v in w], dtype=torch.float64), float(value)
    raise AssertionError("no support satisfies the KKT conditions")


def spread_jacobian(tasks: int, seed: int, decades: float) -> torch.Tensor:
    """Random directions with norms log-uniform in [10^-decades, 10^decades], both ends present."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(tasks, tasks + 2, generator=generator, dtype=torch.float64)
    exponents = decades * (2 * torch.rand(tasks, generator=generator, dtype=torch.float64) - 1)
    exponents[:2] = torch.tensor([-decades, decades], dtype=torch.float64)
    return rows / rows.norm(dim=1, keepdim=True) * (10.0**exponents)[:, None]


def task_relative(w: torch.Tensor, exact: torch.Tensor, norms: torch.Tensor) -> float:
    """Σ |w_i − w*_i| ‖g_i‖ / Σ w*_i ‖g_i‖: each weight in the units of its term w_i g_i."""
    return float(((w - exact).abs() * norms).sum() / (exact * norms).sum())


def test_exact_references_by_hand() -> None:
    # g₁ = (1, 0), g₂ = (0, 2): w = (4/5, 1/5), ‖d‖² = 4/5 (min_norm_two's example).
    w, value = exact_min_norm(gram([[1.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(w, torch.tensor([0.8, 0.2], dtype=torch.float64))
    assert math.isclose(value, 0.8, rel_tol=1e-15)
    # Orthogonal unit gradients, c = 0.5: w = 1/3 by symmetry, b_i = g_iᵀg₀ = 1/3 and
    # g_w = g₀ with ‖g₀‖ = 1/√3, so h = 1/3 + c‖g₀‖‖g_w‖ = 1/3 + 1/6 = 1/2.
    w, value = exact_cagrad(torch.eye(3, dtype=torch.float64), 0.5)
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert math.isclose(value, 0.5, rel_tol=1e-15)


# --------------------------------------------------------------------------- min-norm
@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]),  # orthogonal, equal norms
        ([[1.0, 0.0], [0.0, 2.0]], [0.8, 0.2]),  # w₁ = (g₂−g₁)·g₂/‖g₁−g₂‖² = 4/5
        ([[1.0, 0.0], [2.0, 0.0]], [1.0, 0.0]),  # clipped: g₁ is the closest point
        ([[1.0, 1.0], [1.0, 1.0]], [0.5, 0.5]),  # equal gradients
        ([[1.0, 0.0], [-3.0, 0.0]], [0.75, 0.25]),  # opposite: the hull holds 0
    ],
)
def test_min_norm_two_closed_form(rows: list[list[float]], expected: list[float]) -> None:
    got = min_norm_two(gram(rows))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    assert min_norm_weights(gram(rows)).equal(got)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], [1 / 3, 1 / 3, 1 / 3]),
        ([[1.0, 0], [0, 1.0], [1.0, 1.0]], [0.5, 0.5, 0.0]),  # g₃ lies beyond the g₁g₂ edge
        ([[2.0, 0], [0, 2.0], [0.5, 0.5]], [0.0, 0.0, 1.0]),  # g₃ is the min-norm point
        ([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]], [2 / 3, 1 / 6, 1 / 6]),  # w ∝ 1/‖g‖²
    ],
)
def test_min_norm_three_tasks_by_hand(rows: list[list[float]], expected: list[float]) -> None:
    torch.testing.assert_close(
        min_norm_weights(gram(rows)), torch.tensor(expected, dtype=torch.float64), atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("tasks", [3, 5, 10, 40])
@pytest.mark.parametrize("dim", [3, 64])
def test_min_norm_is_optimal(tasks: int, dim: int) -> None:
    gramian = gram(random_jacobian(tasks, dim, seed=tasks * 100 + dim))
    w = min_norm_weights(gramian)
    assert torch.all(w >= 0) and math.isclose(float(w.sum()), 1.0, abs_tol=1e-12)
    value = w @ gramian @ w
    scale = gramian.diagonal().max()
    # Optimality of the min-norm point d: g_iᵀd ≥ ‖d‖² for every task (Frank–Wolfe gap ≤ tol).
    assert float((gramian @ w).min() - value) >= -1e-9 * float(scale)
    if tasks <= 5 and dim == 3:  # the certificate above suffices; one slow cross-check
        reference = reference_min_norm(gramian, steps=2000)
        assert float(value) <= float(reference @ gramian @ reference) + 1e-9 * float(scale)


def test_min_norm_degenerate_inputs() -> None:
    duplicate = gram([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    w = min_norm_weights(duplicate)
    torch.testing.assert_close(w[0], w[1])  # the analytic centre splits duplicates evenly
    torch.testing.assert_close(w[0] + w[1], torch.tensor(0.5, dtype=torch.float64))
    zero_row = gram([[0.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    w = min_norm_weights(zero_row)  # a zero gradient is the min-norm point: ‖d‖² ≈ 0
    assert float(w @ zero_row @ w) <= 1e-9 and float(w[0]) > 0.999
    all_zero = torch.zeros(4, 4, dtype=torch.float64)
    torch.testing.assert_close(
        min_norm_weights(all_zero), torch.full((4,), 0.25, dtype=torch.float64)
    )
    low_rank = gram(random_jacobian(10, 2, seed=3))  # 10 tasks in a 2-D space
    assert torch.isfinite(min_norm_weights(low_rank)).all()


@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1.0, 1e8, 1e15])
def test_min_norm_scale_free(scale: float) -> None:
    jacobian = random_jacobian(5, 7, seed=11)
    torch.testing.assert_close(
        min_norm_weights(gram(jacobian * scale)),
        min_norm_weights(gram(jacobian)),
        atol=1e-7,
        rtol=0,
    )


def test_solvers_keep_dtype() -> None:
    gramian32 = gram(random_jacobian(4, 6, seed=5)).float()
    assert min_norm_weights(gramian32).dtype == torch.float32
    assert cagrad_weights(gramian32, 0.4).dtype == torch.float32
    assert nash_weights(gramian32).dtype == torch.float32


def test_min_norm_issue_case_is_exact() -> None:
    # Norms 1.4e-3, 1.1 and 1e3. The old solver stopped at w ≈ (0.99845, 0.00155, 2e-6),
    # ‖d‖² ≈ 9.3e-6: its gap tolerance was relative to the largest gradient.
    gramian = gram([[1e-3, 0, 0, 1e-3], [0, 1, 0, 0.5], [0, 0, 1e3, -200]])
    w = min_norm_weights(gramian)
    # The minimiser uses g₁ and g₃ only: on that edge, w₃ = (G₁₁ − G₁₃) / (G₁₁ − 2G₁₃ + G₃₃)
    # and ‖d*‖² = (G₁₁G₃₃ − G₁₃²) / (G₁₁ − 2G₁₃ + G₃₃); g₂ then has g₂ᵀd* ≥ ‖d*‖².
    g11, g13, g33 = 2e-6, -0.2, 1.04e6
    w3 = (g11 - g13) / (g11 - 2 * g13 + g33)  # 1.923095e-7
    expected = torch.tensor([1 - w3, 0.0, w3], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=1e-9, atol=0)
    value = float(w @ gramian @ w)
    assert math.isclose(value, (g11 * g33 - g13**2) / (g11 - 2 * g13 + g33), rel_tol=1e-9)
    assert float((gramian @ w)[1]) >= value
    reference, reference_value = exact_min_norm(gramian)
    torch.testing.assert_close(w, reference, rtol=1e-9, atol=0)
    assert math.isclose(value, reference_value, rel_tol=1e-9)


def assert_min_norm_kkt(gramian: torch.Tensor, w: torch.Tensor, tol: float) -> None:
    """g_iᵀd − ‖d‖² ≥ −tol·‖g_i‖‖d‖ for every task, and |·| ≤ tol·‖g_i‖‖d‖ where w_i > 0:
    each task's optimality condition in the units of its own gradient norm."""
    norms = gramian.diagonal().sqrt()
    value = w @ gramian @ w
    slack = gramian @ w - value
    bound = tol * norms * value.sqrt()
    assert torch.all(slack >= -bound), (slack / bound).min()
    assert torch.all(slack[w > 0].abs() <= bound[w > 0]), (slack / bound)[w > 0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decades", [3, 6])
@pytest.mark.parametrize("tasks", [3, 5])
def test_min_norm_exact_for_norms_of_any_spread(
    tasks: int, decades: int, dtype: torch.dtype
) -> None:
    """Gradient norms from 10^-decades to 10^decades: the exact minimiser (of the Gramian as
    given, float32 included), not a point within a tolerance of the largest gradient."""
    tol = 1e-9 if dtype == torch.float64 else 1e-5  # float32: the weights come back rounded
    for seed in range(4):
        jacobian = spread_jacobian(tasks, seed, decades)
        gramian = (jacobian @ jacobian.T).to(dtype)
        w = min_norm_weights(gramian)
        assert w.dtype == dtype
        problem, w = gramian.double(), w.double()
        reference, value = exact_min_norm(problem)
        assert task_relative(w, reference, problem.diagonal().sqrt()) <= tol
        assert abs(float(w @ problem @ w) / value - 1) <= tol
        assert_min_norm_kkt(problem, w, tol)
        if dtype == torch.float64:  # the direction itself (float32 changed the Gramian)
            d, exact = w @ jacobian, reference @ jacobian
            assert float((d - exact).norm() / exact.norm()) <= 1e-9


@pytest.mark.parametrize("normalization", ["none", "loss"])
def test_mgda_strategy_exact_for_norms_of_any_spread(normalization: str) -> None:
    """normalization='loss' divides G by L Lᵀ: with losses 1e-3…1e3 the spread grows further."""
    for tasks, seed in [(3, 0), (3, 1), (5, 2), (5, 3)]:
        jacobian = spread_jacobian(tasks, seed, 3)
        gramian = jacobian @ jacobian.T
        losses = torch.logspace(-3, 3, tasks, dtype=torch.float64)
        strategy = tb.create_strategy(
            "mgda", [f"t{i}" for i in range(tasks)], normalization=normalization, on_failure="raise"
        )
        assert isinstance(strategy, tb.GradientAggregation)
        w = strategy.gramian_weights(gramian, losses, torch.arange(tasks))
        problem = gramian if normalization == "none" else gramian / torch.outer(losses, losses)
        reference, _ = exact_min_norm(problem)
        assert task_relative(w, reference, problem.diagonal().sqrt()) <= 1e-9
        assert_min_norm_kkt(problem, w, 1e-9)


# --------------------------------------------------------------------------- CAGrad
def cagrad_objective(w: torch.Tensor, gramian: torch.Tensor, c: float) -> torch.Tensor:
    mean_norm = gramian.mean().sqrt()
    return w @ gramian.mean(dim=1) + c * mean_norm * (w @ gramian @ w).sqrt()


@pytest.mark.parametrize("tasks", [2, 3, 10, 40])
@pytest.mark.parametrize("c", [0.1, 0.4, 0.5, 2.0])
def test_cagrad_dual_has_zero_duality_gap(tasks: int, c: float) -> None:
    jacobian = random_jacobian(tasks, 32, seed=tasks + int(10 * c))
    gramian = gram(jacobian)
    w = cagrad_weights(gramian, c)
    # Strong duality: the dual value equals min_i g_iᵀd for d = g₀ + c‖g₀‖ g_w/‖g_w‖.
    g0 = jacobian.mean(dim=0)
    gw = w @ jacobian
    d = g0 + c * g0.norm() * gw / gw.norm()
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-12)
    dual = cagrad_objective(w, gramian, c)
    torch.testing.assert_close(dual, (jacobian @ d).min(), rtol=1e-6, atol=0)
    others = torch.distributions.Dirichlet(torch.ones(tasks, dtype=torch.float64)).sample((200,))
    values = torch.stack([cagrad_objective(o, gramian, c) for o in others])
    assert float(values.min()) >= float(dual) - 1e-9 * float(gramian.diagonal().max())


def test_cagrad_dual_by_hand() -> None:
    # Orthogonal unit gradients: by symmetry w = (½, ½).
    torch.testing.assert_close(
        cagrad_weights(gram([[1.0, 0], [0, 1.0]]), 0.5),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
    )
    # g₁ = (1, 0), g₂ = (0, 2), c = 0.4: f(t) = t/2 + 2(1−t) + c‖g₀‖‖(t, 2−2t)‖ decreases on
    # [0, 1] (|f'| of the norm term ≤ c‖g₀‖√5 < 3/2), so w = (1, 0).
    w = cagrad_weights(gram([[1.0, 0], [0, 2.0]]), 0.4)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-8, rtol=0)


@pytest.mark.parametrize(
    ("rows", "c"),
    [
        ([[1.0, 0.0], [1.0, 0.0]], 0.4),  # equal gradients: w = (½, ½)
        ([[1.0, 0.0], [-2.0, 0.0]], 0.4),  # opposite: the kink at g_w = 0
        ([[1.0, 0.0], [0.3, 2.0]], 0.0),  # c = 0: linear, the smaller g_iᵀg₀ wins
        ([[1.0, 0.0], [0.3, 2.0]], 5.0),  # large c: close to the min-norm point
        ([[1e-9, 0.0], [0.0, 1e9]], 0.4),  # norms 18 orders apart
    ],
)
def test_cagrad_two_task_closed_form_against_a_grid(rows: list[list[float]], c: float) -> None:
    gramian = gram(rows)
    w = cagrad_weights(gramian, c)
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    candidates = torch.stack([grid, 1 - grid], dim=1)
    values = torch.stack([cagrad_objective(v, gramian, c) for v in candidates])
    best = cagrad_objective(w, gramian, c)
    assert float(best) <= float(values.min()) + 1e-12 * float(gramian.diagonal().max())
    if rows[0] == rows[1]:
        torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64))


def cagrad_direction(w: torch.Tensor, jacobian: torch.Tensor, c: float) -> torch.Tensor:
    g0, gw = jacobian.mean(dim=0), w @ jacobian
    return g0 + c * g0.norm() * gw / gw.norm()


@pytest.mark.parametrize("c", [0.4, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decades", [3, 6])
@pytest.mark.parametrize("tasks", [3, 5])
def test_cagrad_exact_for_norms_of_any_spread(
    tasks: int, decades: int, dtype: torch.dtype, c: float
) -> None:
    """The old solver's smoothing (1e-12·max‖g_i‖²) dominated ‖g_w‖² at the optimum here: its
    dual value ended up to 40% off, its direction up to 13%."""
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for seed in range(3):
        jacobian = spread_jacobian(tasks, seed, decades)
        gramian = (jacobian @ jacobian.T).to(dtype)
        w = cagrad_weights(gramian, c)
        assert w.dtype == dtype
        problem, w = gramian.double(), w.double()
        reference, value = exact_cagrad(problem, c)
        assert abs(float(cagrad_objective(w, problem, c)) - value) <= tol * abs(value)
        assert task_relative(w, reference, problem.diagonal().sqrt()) <= 100 * tol
        if dtype == torch.float64:
            exact = cagrad_direction(reference, jacobian, c)
            error = (cagrad_direction(w, jacobian, c) - exact).norm() / exact.norm()
            assert float(error) <= 1e-7


def test_cagrad_strategy_direction_is_exact() -> None:
    """The strategy's update T·(g₀ + c‖g₀‖ g_w/‖g_w‖) (rescale=0) from the exact dual."""
    for tasks, seed in [(3, 4), (5, 5)]:
        jacobian = spread_jacobian(tasks, seed, 3)
        strategy = tb.create_strategy(
            "cagrad", [f"t{i}" for i in range(tasks)], c=0.4, rescale=0, on_failure="raise"
        )
        assert isinstance(strategy, tb.GradientAggregation)
        reference, _ = exact_cagrad(jacobian @ jacobian.T, 0.4)
        expected = tasks * cagrad_direction(reference, jacobian, 0.4)
        error = (strategy.aggregate(jacobian) - expected).norm() / expected.norm()
        assert float(error) <= 1e-7


# --------------------------------------------------------------------------- Nash
def test_nash_two_task_closed_form_and_orthogonal_case() -> None:
    torch.testing.assert_close(
        nash_weights(gram([[3.0, 0, 0], [0, 0.5, 0], [0, 0, 2.0]])),
        torch.tensor([1 / 3, 2.0, 0.5], dtype=torch.float64),
    )  # orthogonal: α_i = 1/‖g_i‖ (solved by Newton: three tasks)
    angle = math.pi / 3
    rows = [[1.0, 0.0], [2 * math.cos(angle), 2 * math.sin(angle)]]
    root = math.sqrt(1 + math.cos(angle))
    torch.testing.assert_close(
        nash_weights(gram(rows)), torch.tensor([1 / root, 1 / (2 * root)], dtype=torch.float64)
    )


@pytest.mark.parametrize("tasks", [2, 3, 10, 40])
def test_nash_solves_the_bargaining_system(tasks: int) -> None:
    jacobian = random_jacobian(tasks, 64, seed=tasks)
    gramian = gram(jacobian)
    alpha = nash_weights(gramian)
    assert torch.all(alpha > 0)
    torch.testing.assert_close(gramian @ alpha, 1 / alpha, rtol=1e-6, atol=0)
    # Per-task rescaling: α_i → α_i / k_i, so the direction Σ α_i g_i is unchanged.
    factors = torch.logspace(-3, 3, tasks, dtype=torch.float64)
    scaled = nash_weights(gram(factors[:, None] * jacobian))
    torch.testing.assert_close(scaled * factors, alpha, rtol=1e-6, atol=0)


def test_nash_duplicates_and_impossible_problems() -> None:
    torch.testing.assert_close(
        nash_weights(gram([[2.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]])),
        torch.tensor([1 / (2 * math.sqrt(2)), 1 / (2 * math.sqrt(2)), 1.0], dtype=torch.float64),
    )  # equal gradients g: (Gα)_1 = ‖g‖²(α₁ + α₂) = 1/α₁ gives α₁ = α₂ = 1/(‖g‖√2)
    with pytest.raises(StrategyError, match=r"task gradients \[0\] are zero"):
        nash_weights(gram([[0.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]]))
    with pytest.raises(StrategyError, match="no solution"):
        nash_weights(gram([[1.0, 0], [-1.0, 0]]))
    with pytest.raises(StrategyError, match="no solution"):
        nash_weights(gram([[1.0, 0, 0], [-1.0, 0, 0], [0, 0, 1.0]]))


# --------------------------------------------------------------------------- failures
@pytest.mark.parametrize(
    "solve",
    [
        lambda g: min_norm_weights(g, max_iter=1),
        lambda g: cagrad_weights(g, 0.4, max_iter=1),
        lambda g: nash_weights(g, max_iter=1),
        lambda g: fair_weights(g, 2.0, max_iter=1),
        lambda g: project_weights(g, torch.eye(len(g), dtype=g.dtype), max_iter=1),
    ],
    ids=["min_norm", "cagrad", "nash", "fairgrad", "dual_cone"],
)
def test_unconverged_solvers_raise_solver_error(solve: object) -> None:
    # Ten tasks in three dimensions with norms 1e-6…1e6: none of them is done in one iteration.
    jacobian = spread_jacobian(10, 0, 6)[:, :3]
    with pytest.raises(SolverError):
        solve(jacobian @ jacobian.T)  # type: ignore[operator]


def test_problems_without_solution_raise_solver_error() -> None:
    for rows in ([[1.0, 0], [-1.0, 0]], [[1.0, 0, 0], [-1.0, 0, 0], [0, 0, 1.0]]):
        with pytest.raises(SolverError, match="no solution"):
            nash_weights(gram(rows))
        with pytest.raises(SolverError, match="no direction that improves them all"):
            fair_weights(gram(rows), 2.0)


def test_bad_arguments_are_not_solver_errors() -> None:
    gramian = gram(random_jacobian(4, 6, seed=1))
    for solve in (
        lambda: min_norm_weights(torch.zeros(2, 3)),
        lambda: min_norm_weights(gramian, max_iter=0),
        lambda: cagrad_weights(gramian, 0.4, max_iter=0),
        lambda: nash_weights(gramian, max_iter=0),
    ):
        with pytest.raises(StrategyError) as raised:
            solve()
        assert not isinstance(raised.value, SolverError)


# --------------------------------------------------------------------------- no CPU solvers
def test_no_cpu_solver_library_is_loaded() -> None:
    """Every strategy, on both backward paths and through aggregate(), imports no scipy, cvxpy
    or quadprog. Any exception fails the subprocess, and so this test."""
    script = """
import sys
import torch
import taskbalance as tb
from taskbalance.testing import ToyProblem
tasks = ("a", "b", "c")
for name in tb.list_strategies():
    for path in ("shared_params", "features"):
        problem = ToyProblem.create(tasks)
        losses, features = problem.losses(0)
        strategy = tb.create_strategy(name, tasks)
        if path == "features":
            strategy.backward(losses, features=features)
        else:
            strategy.backward(losses, shared_params=problem.trunk.parameters())
    strategy = tb.create_strategy(name, tasks)
    if isinstance(strategy, tb.GradientAggregation):
        strategy.aggregate(torch.randn(3, 10, generator=torch.Generator().manual_seed(0)))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("scipy", "cvxpy", "quadprog"))
assert not loaded, loaded
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr



def test_imtl_g_weights_of_a_nan_gramian_are_nan_not_zero() -> None:
    # eigh returns NaN for this one (no LAPACK error); the weights must say so, not be zeros
    gramian = torch.tensor([[1.0, math.nan], [math.nan, 1.0]], dtype=torch.float64)
    assert imtl_g_weights(gramian).isnan().all()
