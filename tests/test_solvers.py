"""The torch solvers of taskbalance.solvers: hand-derived values, optimality certificates,
degenerate inputs, dtypes, loud failures, and no CPU solver library anywhere."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from taskbalance import StrategyError
from taskbalance.solvers import cagrad_weights, min_norm_two, min_norm_weights, nash_weights


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


def test_solvers_keep_dtype_and_fail_loudly() -> None:
    gramian32 = gram(random_jacobian(4, 6, seed=5)).float()
    assert min_norm_weights(gramian32).dtype == torch.float32
    assert cagrad_weights(gramian32, 0.4).dtype == torch.float32
    assert nash_weights(gramian32).dtype == torch.float32
    gramian = gram(random_jacobian(6, 8, seed=6))
    with pytest.raises(StrategyError, match="did not reach tolerance"):
        min_norm_weights(gramian, max_iter=2)
    with pytest.raises(StrategyError, match="did not reach tolerance"):
        cagrad_weights(gramian, 0.4, max_iter=2)
    with pytest.raises(StrategyError, match="not converged in 1 Newton steps"):
        nash_weights(gramian, max_iter=1)
    with pytest.raises(StrategyError, match="square"):
        min_norm_weights(torch.zeros(2, 3))


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


# --------------------------------------------------------------------------- no CPU solvers
def test_no_cpu_solver_library_is_loaded() -> None:
    script = """
import sys
import torch
import taskbalance as tb
from taskbalance.testing import ToyProblem
for name in tb.list_strategies():
    problem = ToyProblem.create(("a", "b", "c"))
    strategy = tb.create_strategy(name, ("a", "b", "c"))
    try:  # a failing strategy is the conformance suite's business; here: imported modules
        for path in ("shared_params", "features"):
            losses, features = problem.losses(0)
            kwargs = {"features": features} if path == "features" else {
                "shared_params": problem.trunk.parameters()}
            strategy.backward(losses, **kwargs)
        if isinstance(strategy, tb.GradientAggregation):
            strategy.aggregate(torch.randn(3, 10))
    except Exception as error:
        print(name, error, file=sys.stderr)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("scipy", "cvxpy", "quadprog")))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stdout
