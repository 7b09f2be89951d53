"""Small per-step problems of the gradient-level strategies, solved in torch.

Every function takes a Gramian ``G = J Jᵀ`` (``[k, k]``, the inner products of the task
gradients) and returns weights ``[k]``, on ``G``'s device. None of them uses a CPU solver, none
loops over parameters, and each has a tolerance and an iteration cap in its signature. A problem
without a solution, or a solver that does not converge within its cap, raises
:class:`~taskbalance.SolverError` (bad arguments raise :class:`~taskbalance.StrategyError`); no
solver falls back to some other weighting in silence. All are deterministic.

The iterative solvers run in float64 (float32 on devices without float64, such as Apple MPS)
whatever the Gramian's dtype: the problems are ``k × k`` with ``k`` the number of tasks, so the
extra precision costs nothing next to the backward passes, and it keeps the Newton systems of
nearly dependent gradients well resolved. The weights come back in ``G``'s dtype.

* :func:`min_norm_weights` — the min-norm point of the convex hull of the task gradients
  (MGDA): exact closed form for two tasks, a primal-dual interior-point method beyond.
* :func:`cagrad_weights` — the dual of CAGrad's inner problem over the simplex: closed form for
  two tasks, a primal-dual interior-point method on the dual and primal together beyond.
* :func:`nash_weights` — Nash-MTL's bargaining system ``G α = 1/α``, ``α > 0``.

Gradient norms of very different sizes (the two interior-point solvers): their optimality
conditions are tested per task, each in the units of that task's own gradient norm, so a task
whose gradient is 10⁶ times smaller than another's is resolved as accurately as the largest; the
Newton systems are rescaled by their diagonal for the same reason. Their iterates approach the
optimal face of the simplex, and each iteration solves the problem on the face they approach
exactly (one small linear system); the answer is usually that exact solution, with exact zeros
off its support.

Host synchronisation: the iterative solvers read one convergence flag every ``check_every``
iterations (a single boolean), and no other value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from taskbalance.errors import SolverError, StrategyError

__all__ = [
    "Solution",
    "cagrad_weights",
    "min_norm_two",
    "min_norm_weights",
    "nash_weights",
    "solver_dtype",
]

_ROUNDING = 64  # the rounding allowance of a tested quantity, in epsilons of the size of its terms
_KEEP = 0.5  # a weight is on the face when a Newton step towards w∘z = 0 keeps this share of it


class Solution(NamedTuple):
    """A solver's answer without a host sync: the weights, whether they meet the solver's
    tolerance (``ok``, a 0-dim bool tensor on the device), and ``reason()``, the description of a
    failure (it may read values from the device; called only when ``ok`` is false)."""

    weights: Tensor
    ok: Tensor
    reason: Callable[[], str]


def solver_dtype(device: torch.device) -> torch.dtype:
    """The working dtype of the small per-step problems on ``device``: float64 where the device
    has it (not on MPS). Every solver and strategy takes its working dtype from here."""
    return torch.float32 if device.type == "mps" else torch.float64


def _default_tol(dtype: torch.dtype, double: float, single: float) -> float:
    return double if dtype == torch.float64 else single


def _check_gramian(gramian: Tensor) -> None:
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise StrategyError(f"gramian must be a square [k, k] matrix, got {tuple(gramian.shape)}")


def _check_iterations(max_iter: int, check_every: int) -> None:
    if max_iter < 1 or check_every < 1:
        raise StrategyError("max_iter and check_every must be >= 1")


def _normalised(gramian: Tensor) -> Tensor:
    """``G / s`` in the solver dtype with ``s`` the largest diagonal entry; the identity if
    ``G = 0`` (every weighting is then optimal, and the identity's solution is ``1/k``).

    Every problem here is invariant (or covariant) under this rescaling, and it keeps the
    arithmetic away from overflow and underflow whether the gradients are of size 1e-30 or
    1e15.
    """
    work = gramian.to(solver_dtype(gramian.device))
    work = 0.5 * (work + work.mT)  # exact symmetry for the Newton systems
    scale = work.diagonal().max()
    eye = torch.eye(work.shape[0], dtype=work.dtype, device=work.device)
    return torch.where(scale > 0, work / torch.where(scale > 0, scale, 1.0), eye)


def _rounding(gramian: Tensor, work: Tensor) -> float:
    """The rounding allowance of a tested quantity, relative to the size of its terms: 64
    epsilons of the coarser of the Gramian's dtype (its entries are only that exact) and the
    working dtype."""
    return _ROUNDING * max(torch.finfo(gramian.dtype).eps, torch.finfo(work.dtype).eps)


def _start(norms: Tensor) -> Tensor:
    """``w ∝ 1/‖g_i‖``: every task's term ``w_i g_i`` of one size, whatever the norms' spread
    (exact for orthogonal gradients of equal norm)."""
    inverse = 1 / norms.clamp(min=1e-30 * norms.max())
    return inverse / inverse.sum()


# --------------------------------------------------------------------------- min-norm point
def min_norm_two(gramian: Tensor) -> Tensor:
    """Exact min-norm weights of two gradients (Sener & Koltun 2018, Algorithm 1).

    With ``G = [[a, b], [b, c]]``: ``w₁ = clip((c − b) / (a − 2b + c), 0, 1)``, ``w₂ = 1 − w₁``
    (the point of the segment ``[g₁, g₂]`` closest to the origin). Equal gradients
    (``a − 2b + c = 0``) get ``(½, ½)``.

        >>> import torch
        >>> min_norm_two(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))  # g₁ ⟂ g₂, ‖g₂‖ = 2
        tensor([0.8000, 0.2000])
    """
    a, b, c = gramian[0, 0], gramian[0, 1], gramian[1, 1]
    denominator = a - 2 * b + c
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    first = torch.where(denominator > 0, ((c - b) / safe).clamp(0, 1), torch.full_like(a, 0.5))
    return torch.stack([first, 1 - first])


def min_norm_weights(
    gramian: Tensor,
    *,
    tol: float | None = None,
    max_iter: int = 200,
    check_every: int = 4,
) -> Tensor:
    """Weights ``w`` on the simplex minimising ``‖Σ w_i g_i‖² = wᵀ G w`` (the MGDA problem).

    One task: ``[1]``. Two tasks: :func:`min_norm_two`, exact. More: a primal-dual
    interior-point method on ``min ½wᵀĜw`` over the simplex (``Ĝ = G / max diag G``; Nocedal &
    Wright, *Numerical Optimization*, 2nd ed., §16.6): Mehrotra's predictor-corrector, steps to
    99.5% of the way to the boundary, Newton systems ``[[Ĝ + Z/W, 1], [1ᵀ, 0]]`` scaled by their
    diagonal, started at ``w ∝ 1/‖g_i‖``. Each iteration also solves the problem exactly on the
    face of the simplex that the iterates approach (the tasks whose weight a Newton step towards
    ``w∘z = 0`` keeps at least half of, the Tapia indicator): one linear system. The first of
    these candidates, or of the iterates, that passes the test below is returned; it is usually
    the face solution, the minimiser itself with exact zeros off its support.

    Guarantee (scale-invariant per task): with ``d = Σ w_i g_i`` and a multiplier ``ν``, every
    task has ``g_iᵀd ≥ ν − τ_i``, and ``Σ_i w_i (g_iᵀd − ν) ≤ 2 Σ_i w_i τ_i`` (the optimality
    conditions, exact for ``τ = 0``), with ``τ_i = tol·‖g_i‖·‖d‖`` plus a rounding allowance of
    64 epsilons (of the Gramian's dtype) of the terms, ``ε (Σ_j w_j ‖g_j‖)(‖g_i‖ + Σ_j w_j
    ‖g_j‖)``. ``tol`` defaults to 1e-10 (1e-5 on float32-only devices). For the min-norm point
    ``d*`` (weights ``w*``) it follows that ``‖d − d*‖² ≤ ‖d‖² − ‖d*‖² ≤ 4·tol·‖d‖·Σ_i (w_i +
    w*_i)‖g_i‖`` (plus the rounding allowance): relative to ``‖d‖²``, ``tol`` times how much the
    weighted gradients cancel, whatever the spread of the gradient norms.
    :class:`~taskbalance.SolverError` if nothing passes within ``max_iter`` iterations.

    Where the minimiser is not unique (duplicate gradients), the face system is singular and an
    iterate is returned; the iteration treats tasks with equal gradients alike, so they get equal
    weights.
    """
    _check_gramian(gramian)
    _check_iterations(max_iter, check_every)
    count = gramian.shape[0]
    if count == 1:
        return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
    if count == 2:
        return min_norm_two(gramian)
    work = _normalised(gramian)
    tol = _default_tol(work.dtype, 1e-10, 1e-5) if tol is None else tol
    weights = _min_norm_interior_point(
        work, tol=tol, rounding=_rounding(gramian, work), max_iter=max_iter, check_every=check_every
    )
    if weights is None:
        raise SolverError(
            f"MGDA min-norm solver did not reach tolerance {tol:g} in {max_iter} iterations; "
            "raise max_iter or tol"
        )
    return weights.to(gramian.dtype)


def _min_norm_interior_point(
    work: Tensor, *, tol: float, rounding: float, max_iter: int, check_every: int
) -> Tensor | None:
    """The iteration of :func:`min_norm_weights` on ``Ĝ``; ``None`` if nothing passed.

    KKT conditions of ``min ½wᵀĜw``, ``1ᵀw = 1``, ``w ≥ 0``: ``Ĝw − ν1 − z = 0``, ``w∘z = 0``,
    ``w, z ≥ 0``. The start is dual feasible (``z = Ĝw − ν > 0``); an iterate passes when
    ``|Ĝw − ν − z| ≤ τ`` and ``wᵀz ≤ wᵀτ``, after which it stays put.
    """
    count, dtype, device = work.shape[0], work.dtype, work.device
    tiny = torch.finfo(dtype).tiny
    norms = work.diagonal().clamp(min=0).sqrt()
    face_rhs, face_sum = norms.new_zeros(count, 1), norms.new_ones(1)  # Ĝw − ν1 = 0, 1ᵀw = 1

    def tolerance(w: Tensor) -> Tensor:
        terms = w @ norms  # Σ_j w_j ‖g_j‖
        distance = (w @ work @ w).clamp(min=0).sqrt()  # ‖d‖
        return tol * norms * distance + rounding * terms * (norms + terms)

    def passes(y: Tensor) -> Tensor:
        # y on the simplex: ν = yᵀĜy makes Σ y_i (Ĝy − ν)_i = 0
        residual = work @ y - y @ work @ y
        return (residual >= -tolerance(y)).all() & torch.isfinite(residual).all()

    w = _start(norms)
    grad = work @ w
    nu = 2 * grad.min() - w @ grad - tiny  # z = Ĝw − ν > 0, wᵀz = twice the Frank–Wolfe gap
    z = grad - nu
    kkt = torch.zeros(count + 1, count + 1, dtype=dtype, device=device)
    rhs = torch.zeros(count + 1, 2, dtype=dtype, device=device)
    converged = torch.zeros((), dtype=torch.bool, device=device)
    best = w
    for iteration in range(1, max_iter + 1):
        grad = work @ w
        ratio = z / w
        matrix = work + torch.diag(ratio)
        scale = matrix.diagonal().clamp(min=tiny).rsqrt()
        size = scale.amax()
        kkt[:count, :count] = scale[:, None] * matrix * scale
        kkt[:count, count] = scale / size
        kkt[count, :count] = scale / size
        rhs[:count, 0] = scale * (nu - grad)
        rhs[count, 0] = (1 - w.sum()) / size
        rhs[:count, 1] = scale / w
        factors, pivots, _ = torch.linalg.lu_factor_ex(kkt)  # one factorisation, two solves
        solved = torch.linalg.lu_solve(factors, pivots, rhs)
        # the Newton step towards w∘z = 0, and its change per unit of centring target
        affine, centring = scale * solved[:count, 0], scale * solved[:count, 1]
        tau = tolerance(w)
        passed = ((grad - nu - z).abs() <= tau).all() & (w @ z <= w @ tau) & torch.isfinite(w).all()
        best = torch.where(passed & ~converged, w, best)
        converged = converged | passed
        # the exact minimiser on the face the iterates approach
        face = _clamped(_on_face(work, affine > -_KEEP * w, face_rhs, face_sum)[:, 0])
        exact = passes(face)
        best = torch.where(exact & ~converged, face, best)
        converged = converged | exact
        if iteration % check_every == 0 or iteration == max_iter:
            if bool(converged):  # the one host sync
                return best / best.sum()
        # Mehrotra's predictor-corrector
        mu = (w @ z) / count
        affine_z = -z - ratio * affine
        reach = _to_boundary(w, z, affine, affine_z).clamp(max=1)
        mu_affine = ((w + reach * affine) @ (z + reach * affine_z)) / count
        target = mu * (mu_affine / mu).clamp(max=1) ** 3
        # Centring no further than the test needs keeps the iterates off the rounding floor.
        target = torch.maximum(target, 0.01 * (w @ tau) / count)
        correction = affine * affine_z / w
        rhs[:count, 0] = scale * correction
        rhs[count, 0] = 0
        corrected = torch.linalg.lu_solve(factors, pivots, rhs[:, :1])
        step = affine + target * centring - scale * corrected[:count, 0]
        nu_step = (corrected[count, 0] - solved[count, 0] - target * solved[count, 1]) / size
        z_step = (target - affine * affine_z) / w - z - ratio * step
        length = (0.995 * _to_boundary(w, z, step, z_step)).clamp(max=1)
        length = torch.where(converged, 0.0, length)  # a passed iterate stays put
        w = (w + length * step).clamp(min=tiny)
        z = (z + length * z_step).clamp(min=tiny)
        nu = nu + length * nu_step
    return None


# --------------------------------------------------------------------------- CAGrad
def cagrad_weights(
    gramian: Tensor,
    c: float,
    *,
    tol: float | None = None,
    max_iter: int = 200,
    check_every: int = 4,
) -> Tensor:
    """CAGrad's dual weights: ``w`` on the simplex minimising ``g_wᵀ g₀ + √φ ‖g_w‖``.

    Liu et al. 2021, the inner problem's dual: ``g_w = Σ w_i g_i``, ``g₀`` the mean gradient and
    ``φ = c² ‖g₀‖²``; in terms of ``G``, ``h(w) = wᵀb + r √(wᵀGw)`` with ``b = G 1/k`` and
    ``r = c ‖g₀‖``. The exact ``h``, without smoothing (the official code adds 1e-8 under the
    square root). Two tasks have an exact closed form, used directly.

    More tasks: the dual and CAGrad's primal (``d = g₀ + r u``, ``‖u‖ ≤ 1``) are solved together
    by a primal-dual interior-point method (see :func:`_cagrad_interior_point`), which stays
    smooth where ``g_w = 0`` (a Pareto-stationary optimum, where ``h`` has a kink). Each
    iteration also solves the problem exactly on the face of the simplex that the iterates
    approach: there the minimiser is the ``w(t) = α + tβ`` minimising ``½wᵀGw + t wᵀb`` (one
    linear system) with ``‖g_w(t)‖ = r t``, a quadratic equation in ``t``; or, at a kink, the
    face's point with ``g_w = 0``.

    Guarantee (scale-invariant per task), with the primal vector ``u`` (``‖u‖ ≤ 1``) found along,
    ``p_i = g_iᵀ(g₀ + r u)`` and ``ν = Σ_i w_i p_i``: ``p_i − ν ≥ −τ_i`` for every task and
    ``r(‖g_w‖ − g_wᵀu) ≤ Σ_i w_i τ_i``, with ``τ_i = tol·‖g_i‖·(1 + c)‖g₀‖`` plus a rounding
    allowance of 64 epsilons (of the Gramian's dtype) of the terms. ``tol`` defaults to 1e-10
    (1e-5 on float32-only devices). Since ``h(w) = ν + r(‖g_w‖ − g_wᵀu)`` and
    ``h(w*) ≥ Σ_i w*_i p_i`` for the optimal weights ``w*``, ``h(w) − h(w*) ≤ Σ_i (w_i + w*_i)
    τ_i``, whatever the spread of the gradient norms. (Where ``g_w = 0``, ``‖g_w‖`` from the
    Gramian is only known to √ε of its terms, and the allowance says so.)
    :class:`~taskbalance.SolverError` if nothing passes within ``max_iter`` iterations.
    """
    _check_gramian(gramian)
    _check_iterations(max_iter, check_every)
    count = gramian.shape[0]
    if count == 1:
        return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
    work = _normalised(gramian)
    tol = _default_tol(work.dtype, 1e-10, 1e-5) if tol is None else tol
    linear = work.mean(dim=1)  # G 1/k: the inner products g_iᵀ g₀
    radius = c * linear.mean().clamp(min=0).sqrt()  # c ‖g₀‖
    if count == 2:
        return _cagrad_two(work, linear, radius).to(gramian.dtype)
    weights = _cagrad_interior_point(
        work,
        linear,
        radius,
        tol=tol,
        rounding=_rounding(gramian, work),
        max_iter=max_iter,
        check_every=check_every,
    )
    if weights is None:
        raise SolverError(
            f"CAGrad dual solver did not reach tolerance {tol:g} in {max_iter} iterations; "
            "raise max_iter or tol"
        )
    return weights.to(gramian.dtype)


def _cagrad_interior_point(
    work: Tensor,
    linear: Tensor,
    radius: Tensor,
    *,
    tol: float,
    rounding: float,
    max_iter: int,
    check_every: int,
) -> Tensor | None:
    """CAGrad's dual and primal at once; the weights, or ``None`` if nothing passed.

    The saddle point of ``L(w, β) = wᵀb + r wᵀGβ`` over ``w`` in the simplex and ``β`` in the
    ellipsoid ``βᵀRβ ≤ 1``, ``R = G + εD²`` (``D = diag ‖g_i‖``, ``ε = max(1e-12, k·64ε_mach)``):
    ``u = Σ β_i g_i`` is the primal unit-ball vector of CAGrad (``d = g₀ + r u``), and ``εD²``
    keeps ``β`` unique where the gradients are dependent (it only shrinks the ball). Primal-dual
    interior point as in :func:`_min_norm_interior_point`, on ``b + rGβ − ν1 − z = 0``,
    ``rGw = λRβ``, ``1ᵀw = 1``, ``q = (1 − βᵀRβ)/2`` with ``w∘z = 0``, ``λq = 0``: one
    symmetric ``(2k + 1)``-square Newton system, smooth even where ``g_w = 0`` (there ``λ = 0``).

    Certificate (exact, whatever ``ε``): with ``p = b + rGβ`` (``p_i = g_iᵀ(g₀ + r u)``; ``β``
    scaled back to ``‖u‖ = 1`` where an iterate has left the ball), ``h* ≥ Σ_i w*_i p_i`` for
    the optimal weights ``w*``, so weights ``y`` with ``p_i − ν ≥ −τ_i`` for every task
    (``ν = Σ_i y_i p_i``) and ``r(‖g_y‖ − g_yᵀu) ≤ Σ_i y_i τ_i`` have ``h(y) − h* ≤
    Σ_i (y_i + w*_i) τ_i``. Candidates, every iteration: the iterate; the exact minimiser on the
    face of the simplex the iterates approach (see :func:`cagrad_weights`), with its own
    ``u = g_y/‖g_y‖``; and that face's point with ``g_y = 0`` (a Pareto-stationary optimum),
    with the iterate's ``u``. A candidate that passes is kept and the iterate stays put.
    """
    count, dtype, device = work.shape[0], work.dtype, work.device
    tiny = torch.finfo(dtype).tiny
    norms = work.diagonal().clamp(min=0).sqrt()
    mean_norm = linear.mean().clamp(min=0).sqrt()
    # the tolerance of p_i − ν, whose terms are of size ‖g_i‖ (‖g₀‖ + r)
    tau = norms * (tol * (mean_norm + radius) + rounding * (norms.mean() + radius))
    # εD² with ε above the rounding of G's eigenvalues (k·rounding), so that the ellipsoid is
    # bounded; a zero gradient's β_i only meets this term: one of the largest gradient's size.
    ridge = work + max(1e-12, count * rounding) * torch.diag(
        torch.where(norms > 0, norms.square(), 1.0)
    )

    def certified(y: Tensor, p: Tensor) -> Tensor:
        inside = y.clamp(min=0)
        residual = p - inside @ p / inside.sum()
        # ‖g_y‖ from the Gramian is known to √(rounding) of its terms only (a square root of
        # a rounded square), which matters where g_y vanishes: a Pareto-stationary point
        norm = (inside @ work @ inside).clamp(min=0).sqrt()
        gap = radius * (norm - rounding**0.5 * (inside @ norms)) - inside @ (p - linear)
        return (
            (y >= 0).all()
            & (residual >= -tau).all()
            & (gap <= inside @ tau)
            & torch.isfinite(residual).all()
        )

    face_top = torch.stack([torch.zeros_like(linear), -linear], dim=1)

    def on_face(keep: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        # w(t) = α + tβ minimises ½wᵀGw + t wᵀb on the face; h's minimiser there is the w(t)
        # with ‖g_w(t)‖ = r t, t > 0: (βᵀGβ − r²) t² + 2 αᵀGβ t + αᵀGα = 0.
        solved = _on_face(work, keep, face_top, linear.new_tensor([1.0, 0.0]))
        alpha, direction = solved[:, 0], solved[:, 1]
        constant, half_slope = alpha @ work @ alpha, alpha @ work @ direction
        curvature = direction @ work @ direction - radius**2
        root = (half_slope**2 - curvature * constant).sqrt()  # NaN: no solution on the face
        # the root with t > 0, written without cancellation
        t = torch.where(
            half_slope > 0, -(half_slope + root) / curvature, constant / (root - half_slope)
        )
        smooth, kink = _clamped(alpha + t * direction), _clamped(alpha)
        norm = (smooth @ work @ smooth).clamp(min=0).sqrt()
        smooth_ok = certified(smooth, linear + radius * (work @ smooth) / norm)
        kink_ok = certified(kink, p)  # g_α = 0, with the iterate's u
        return torch.where(smooth_ok, smooth, kink), smooth_ok | kink_ok

    # half ∝ 1/‖g_i‖, half uniform: no vertex (such as a zero gradient) holds all the weight
    w = 0.5 * _start(norms) + 0.5 / count
    beta = torch.zeros_like(w)
    nu = 2 * linear.min() - w @ linear - tiny  # z = b − ν > 0 at β = 0
    z = linear - nu
    q = torch.full_like(nu, 0.5)  # the slack of the ball: q = (1 − βᵀRβ)/2 at the solution
    lam = (w @ z) / (count * q)  # λq = the mean w_i z_i
    size = 2 * count + 1
    kkt = torch.zeros(size, size, dtype=dtype, device=device)
    rhs = torch.zeros(size, 2, dtype=dtype, device=device)
    converged = torch.zeros((), dtype=torch.bool, device=device)
    best = w
    tasks, duals = slice(0, count), slice(count, 2 * count)
    for iteration in range(1, max_iter + 1):
        gb, m = work @ beta, ridge @ beta
        # the primal values at u = Σ β_i g_i, brought into the unit ball if need be
        p = linear + radius * gb / (beta @ gb).clamp(min=1).sqrt()
        passed = ~converged & certified(w, p)
        best = torch.where(passed, w, best)
        converged = converged | passed
        r1 = linear + radius * gb - nu - z
        r2 = radius * (work @ w) - lam * m
        r3 = w.sum() - 1
        r4 = q - 0.5 * (1 - beta @ m)
        ratio = z / w
        block = lam * (ridge + torch.outer(m, m) / q)
        scale = torch.cat([ratio, block.diagonal()]).clamp(min=tiny).rsqrt()
        border = scale[tasks].amax()
        kkt[tasks, tasks] = torch.diag(ratio * scale[tasks] ** 2)
        kkt[tasks, duals] = radius * scale[tasks, None] * work * scale[duals]
        kkt[duals, tasks] = kkt[tasks, duals].mT
        kkt[duals, duals] = -scale[duals, None] * block * scale[duals]
        kkt[tasks, size - 1] = scale[tasks] / border
        kkt[size - 1, tasks] = scale[tasks] / border
        # right-hand sides: the affine step (target 0), and per unit of centring target
        rhs[tasks, 0] = scale[tasks] * (-r1 - z)
        rhs[duals, 0] = scale[duals] * (-r2 + m * (lam * r4 / q - lam))
        rhs[size - 1, 0] = -r3 / border
        rhs[tasks, 1] = scale[tasks] / w
        rhs[duals, 1] = scale[duals] * m / q
        rhs[size - 1, 1] = 0
        factors, pivots, _ = torch.linalg.lu_factor_ex(kkt)  # one factorisation, two solves
        solved = torch.linalg.lu_solve(factors, pivots, rhs)
        steps = scale[:, None] * solved[: 2 * count]
        affine_w, affine_beta = steps[tasks, 0], steps[duals, 0]
        # the exact candidate of this face, kept if it passes (no host sync until the check)
        candidate, exact = on_face(affine_w > -_KEEP * w, p)
        best = torch.where(exact & ~converged, candidate, best)
        converged = converged | exact
        if iteration % check_every == 0 or iteration == max_iter:
            if bool(converged):  # the one host sync
                return best / best.sum()
        # Mehrotra's predictor-corrector, over the pairs (w_i, z_i) and (λ, q)
        mu = (w @ z + lam * q) / (count + 1)
        affine_z = -z - ratio * affine_w
        affine_q = -r4 - m @ affine_beta
        affine_lam = -lam - lam * affine_q / q
        reach = _to_boundary(
            torch.cat([w, lam[None]]),
            torch.cat([z, q[None]]),
            torch.cat([affine_w, affine_lam[None]]),
            torch.cat([affine_z, affine_q[None]]),
        ).clamp(max=1)
        mu_affine = (
            (w + reach * affine_w) @ (z + reach * affine_z)
            + (lam + reach * affine_lam) * (q + reach * affine_q)
        ) / (count + 1)
        target = mu * (mu_affine / mu).clamp(max=1) ** 3
        # Centring no further than the certificate needs keeps the iterates off the rounding
        # floor, where the Newton systems stop meaning anything.
        target = torch.maximum(target, 0.01 * (w @ tau) / (count + 1))
        # Mehrotra's corrector: the second-order terms of w∘z and λq
        pair_w, pair_lam = affine_w * affine_z, affine_lam * affine_q
        rhs[tasks, 0] = scale[tasks] * (-r1 - z + (target - pair_w) / w)
        rhs[duals, 0] = scale[duals] * (-r2 + m * (lam * r4 + target - pair_lam) / q - lam * m)
        corrected = torch.linalg.lu_solve(factors, pivots, rhs[:, :1])
        step = scale * corrected[: 2 * count, 0]
        step_w, step_beta = step[tasks], step[duals]
        step_nu = -corrected[size - 1, 0] / border
        step_z = (target - pair_w) / w - z - ratio * step_w
        step_q = -r4 - m @ step_beta
        step_lam = (target - pair_lam) / q - lam - lam * step_q / q
        length = 0.995 * _to_boundary(
            torch.cat([w, lam[None]]),
            torch.cat([z, q[None]]),
            torch.cat([step_w, step_lam[None]]),
            torch.cat([step_z, step_q[None]]),
        )
        length = torch.where(converged, 0.0, length.clamp(max=1))
        w = (w + length * step_w).clamp(min=tiny)
        z = (z + length * step_z).clamp(min=tiny)
        lam = (lam + length * step_lam).clamp(min=tiny)
        q = (q + length * step_q).clamp(min=tiny)
        beta = beta + length * step_beta
        nu = nu + length * step_nu
    return None


def _cagrad_two(work: Tensor, linear: Tensor, radius: Tensor) -> Tensor:
    """Two tasks, exactly: ``w = (t, 1 − t)`` minimising ``f(t) = bᵀw + r ‖g₂ + t δ‖``.

    With ``δ = g₁ − g₂``, ``a = ‖δ‖²``, ``p = g₂ᵀδ``, ``q = ‖g₂‖²``, ``f'(t) = 0`` reads
    ``(p + t a) / ‖g₂ + t δ‖ = κ := (b₂ − b₁) / r``. The left side increases from −√a to √a,
    so for ``|κ| < √a`` the root is ``t = (−p + κ √((a q − p²) / (a − κ²))) / a``, clipped to
    [0, 1] (``f`` is convex); otherwise ``f`` is monotone and ``t`` is 0 or 1. Equal
    gradients (``a = 0``) give ``t = ½``.
    """
    a = work[0, 0] - 2 * work[0, 1] + work[1, 1]
    p = work[0, 1] - work[1, 1]
    q = work[1, 1]
    slope = linear[0] - linear[1]  # b₁ − b₂
    safe_radius = torch.where(radius > 0, radius, torch.ones_like(radius))
    kappa = torch.where(radius > 0, -slope / safe_radius, torch.full_like(radius, torch.inf))
    kappa = torch.where(slope == 0, torch.zeros_like(kappa), kappa)
    interior = kappa.abs() < a.clamp(min=0).sqrt()
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    spread = (a * q - p * p).clamp(min=0) / torch.where(interior, a - kappa**2, torch.ones_like(a))
    root = ((-p + kappa * spread.sqrt()) / safe_a).clamp(0, 1)
    edge = torch.where(slope < 0, torch.ones_like(a), torch.zeros_like(a))
    t = torch.where(interior, root, edge)
    t = torch.where(a > 0, t, torch.full_like(a, 0.5))
    return torch.stack([t, 1 - t])


# --------------------------------------------------------------------------- shared pieces
def _on_face(matrix: Tensor, keep: Tensor, top: Tensor, bottom: Tensor) -> Tensor:
    """Solve ``A_SS x_S − λ 1 = top_S``, ``1ᵀx_S = bottom``, ``x = 0`` off ``S = keep``.

    ``top`` is ``[k, n]`` and ``bottom`` ``[n]`` (``n`` right-hand sides); returns ``x``
    ``[k, n]``. Rows and columns are scaled by ``1/√A_ii``, so norms of any spread are resolved.
    A singular system (two equal gradients in ``S``) leaves non-finite entries, which fail the
    optimality test.
    """
    count = matrix.shape[0]
    diagonal = matrix.diagonal()
    scale = torch.where(keep & (diagonal > 0), diagonal, torch.ones_like(diagonal)).rsqrt()
    both = keep[:, None] & keep[None, :]
    eye = torch.eye(count, dtype=matrix.dtype, device=matrix.device)
    border = torch.where(keep, scale, torch.zeros_like(scale))
    size = border.amax()
    block = torch.where(both, scale[:, None] * matrix * scale, eye)
    system = torch.cat(
        [
            torch.cat([block, border[:, None] / size], dim=1),
            torch.cat([border / size, border.new_zeros(1)])[None],
        ]
    )
    rhs = torch.cat([torch.where(keep[:, None], scale[:, None] * top, 0.0), bottom[None] / size])
    solved, _ = torch.linalg.solve_ex(system, rhs)
    return torch.where(keep[:, None], scale[:, None] * solved[:count], 0.0)


def _clamped(y: Tensor) -> Tensor:
    """``y`` with rounding-level negative weights set to 0, back on the simplex. The result is
    what gets tested, so a large negative weight (a wrong face) just fails the test."""
    inside = y.clamp(min=0)
    return inside / inside.sum()


def _to_boundary(x: Tensor, z: Tensor, x_step: Tensor, z_step: Tensor) -> Tensor:
    """The largest ``a`` with ``x + a·x_step ≥ 0`` and ``z + a·z_step ≥ 0`` (``inf`` if none)."""
    point, step = torch.cat([x, z]), torch.cat([x_step, z_step])
    return torch.where(step < 0, -point / step, torch.inf).amin()


# --------------------------------------------------------------------------- Nash-MTL
def nash_weights(
    gramian: Tensor,
    *,
    tol: float = 1e-6,
    max_iter: int = 50,
    check_every: int = 5,
) -> Tensor:
    """The Nash bargaining weights: ``α > 0`` with ``(G α)_i = 1 / α_i`` for every task.

    Navon et al. 2022. The solution is the minimiser of the strictly convex,
    self-concordant ``½ αᵀ G α − Σ log α_i`` (its gradient is ``G α − 1/α``), so damped Newton
    steps ``1/(1 + λ)`` (``λ`` the Newton decrement; full steps once ``λ < ¼``) converge from
    any positive start without a line search, quadratically near the solution. Solved for the
    cosine matrix ``C = G / (n nᵀ)``, ``n_i = ‖g_i‖`` (``β`` with ``C β = 1/β`` gives
    ``α = β / n``: exact, since the problem is covariant under per-task scaling), starting at
    ``β = 1``, the answer for orthogonal gradients.

    Converged when ``max_i |α_i (G α)_i − 1| ≤ tol``. The solution exists exactly when no
    non-negative, non-zero combination of the task gradients vanishes (no zero gradient, no
    pair of opposite gradients, ...); otherwise, or if ``max_iter`` Newton steps do not reach
    ``tol``, :class:`~taskbalance.SolverError` is raised.

    Two tasks have the closed form ``α_i = 1 / (‖g_i‖ √(1 + cos θ))``, used directly.

        >>> import torch
        >>> nash_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))  # orthogonal: α_i = 1/‖g_i‖
        tensor([0.5000, 1.0000])
    """
    _check_gramian(gramian)
    _check_iterations(max_iter, check_every)
    work = gramian.to(solver_dtype(gramian.device))
    norms = work.diagonal().clamp(min=0).sqrt()
    count = work.shape[0]
    if count <= 2:  # closed form; a zero gradient or opposite pair makes it non-finite
        alpha = _nash_closed_form(work, norms)
        if not bool(torch.isfinite(alpha).all()):
            raise SolverError(_nash_failure(work, tol, "no solution"))
        return alpha.to(gramian.dtype)
    if not bool((norms > 0).all()):
        raise SolverError(_nash_failure(work, tol, "no solution"))
    # Solve for the cosine matrix C = G / (n nᵀ): β solves C β = 1/β iff α = β / n solves
    # G α = 1/α. This is exact (Nash-MTL is covariant under per-task scaling) and leaves
    # Newton a matrix with unit diagonal however different the gradient norms are.
    cosines = work / torch.outer(norms, norms)
    cosines = 0.5 * (cosines + cosines.mT)
    beta = torch.ones_like(norms)  # exact for orthogonal gradients
    for iteration in range(1, max_iter + 1):
        grad = cosines @ beta - 1 / beta
        hessian = cosines + torch.diag(1 / beta**2)
        direction, _ = torch.linalg.solve_ex(hessian, -grad)
        decrement = (-(grad @ direction)).clamp(min=0).sqrt()
        size = torch.where(decrement < 0.25, torch.ones_like(decrement), 1 / (1 + decrement))
        beta = (beta + size * direction).clamp(min=torch.finfo(beta.dtype).tiny)
        if iteration % check_every == 0 or iteration == max_iter:
            residual = (beta * (cosines @ beta) - 1).abs().max()
            if bool(torch.isfinite(beta).all() & (residual <= tol)):
                return (beta / norms).to(gramian.dtype)
    raise SolverError(_nash_failure(work, tol, f"not converged in {max_iter} Newton steps"))


def _nash_closed_form(work: Tensor, norms: Tensor) -> Tensor:
    """One or two tasks: ``α_i = 1 / (‖g_i‖ √(1 + cos θ))`` (``1 / ‖g‖`` for one task)."""
    if work.shape[0] == 1:
        return 1 / norms
    # 1 + cos θ = (‖g₁‖‖g₂‖ + g₁ᵀg₂) / (‖g₁‖‖g₂‖); 0 (opposite) or 0/0 (a zero gradient) → inf/nan
    product = norms[0] * norms[1]
    return 1 / (norms * ((product + work[0, 1]) / product).sqrt())


def _nash_failure(work: Tensor, tol: float, reason: str) -> str:
    zero = (work.diagonal() <= 0).nonzero().flatten().tolist()
    detail = (
        f"task gradients {zero} are zero"
        if zero
        else "a non-negative combination of the task gradients is (close to) zero, e.g. two "
        "opposite gradients"
    )
    return (
        f"Nash-MTL: G α = 1/α has no solution to tolerance {tol:g} ({reason}); {detail}. "
        "The bargaining solution needs task gradients with no conflict so total that some "
        "weighted sum of them vanishes"
    )
