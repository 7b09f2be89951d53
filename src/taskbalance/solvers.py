"""Small per-step problems of the gradient-level strategies, solved in torch.

Every function takes a Gramian ``G = J Jᵀ`` (``[k, k]``, the inner products of the task
gradients) and returns weights ``[k]``, on ``G``'s device. None of them uses a CPU solver, none
loops over parameters, and each has a tolerance and an iteration cap in its signature; a
problem that does not converge within the cap raises :class:`~taskbalance.StrategyError`, it
never falls back to some other weighting in silence. All are deterministic.

The iterative solvers run in float64 (float32 on devices without float64, such as Apple MPS)
whatever the Gramian's dtype: the problems are ``k × k`` with ``k`` the number of tasks, so the
extra precision costs nothing next to the backward passes, and it keeps the Newton systems of
nearly dependent gradients well resolved. The weights come back in ``G``'s dtype.

* :func:`min_norm_weights` — the min-norm point of the convex hull of the task gradients
  (MGDA): exact closed form for two tasks, a barrier Newton method over the simplex beyond.
* :func:`cagrad_weights` — the dual of CAGrad's inner problem over the simplex.
* :func:`nash_weights` — Nash-MTL's bargaining system ``G α = 1/α``, ``α > 0``.

Host synchronisation: the iterative solvers read one convergence flag every ``check_every``
iterations (a single boolean), and no other value.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from taskbalance.strategy import StrategyError

__all__ = [
    "cagrad_weights",
    "min_norm_two",
    "min_norm_weights",
    "nash_weights",
    "solver_dtype",
]


def solver_dtype(device: torch.device) -> torch.dtype:
    """The working dtype of the solvers on ``device``: float64 where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _default_tol(dtype: torch.dtype, double: float, single: float) -> float:
    return double if dtype == torch.float64 else single


def _check_gramian(gramian: Tensor) -> None:
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise StrategyError(f"gramian must be a square [k, k] matrix, got {tuple(gramian.shape)}")


def _normalised(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """``G / s`` in the solver dtype with ``s`` the largest diagonal entry (1 where all are 0).

    Every problem here is invariant (or covariant) under this rescaling, and it puts the
    Newton systems on a scale where the fixed tolerances mean something whether the gradients
    are of size 1e-30 or 1e15.
    """
    work = gramian.to(solver_dtype(gramian.device))
    work = 0.5 * (work + work.mT)  # exact symmetry for the Newton systems
    scale = work.diagonal().max()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return work / scale, scale


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
    check_every: int = 10,
) -> Tensor:
    """Weights ``w`` on the simplex minimising ``‖Σ w_i g_i‖² = wᵀ G w`` (the MGDA problem).

    One task: ``[1]``. Two tasks: :func:`min_norm_two`, exact. More: a primal barrier method
    (Newton steps on ``½wᵀĜw − μ Σ log w_i`` on the simplex, ``μ`` shrinking as the iterates
    centre, a backtracking line search evaluated for all step sizes at once, so an iteration
    has no data-dependent control flow), with ``Ĝ = G / max diag G``. It stops when the
    Frank–Wolfe duality gap ``wᵀĜw − min_i (Ĝw)_i`` — an upper bound on the distance to the
    optimal value — is at most ``tol`` (default 1e-10 in float64, 1e-5 in float32), and raises
    :class:`~taskbalance.StrategyError` if that has not happened after ``max_iter`` iterations.

    Where the minimiser is not unique (duplicate gradients), the barrier picks the analytic
    centre of the optimal face, so tasks with equal gradients get equal weights.
    """
    _check_gramian(gramian)
    count = gramian.shape[0]
    if count == 1:
        return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
    if count == 2:
        return min_norm_two(gramian)
    work, _ = _normalised(gramian)
    tol = _default_tol(work.dtype, 1e-10, 1e-5) if tol is None else tol

    def value(w: Tensor) -> Tensor:  # [n, k] -> [n]
        return 0.5 * ((w @ work) * w).sum(-1)

    def derivatives(w: Tensor) -> tuple[Tensor, Tensor]:
        return work @ w, work

    weights = _simplex_barrier_newton(
        value, derivatives, count, work, tol=tol, max_iter=max_iter, check_every=check_every
    )
    if weights is None:
        raise StrategyError(
            f"MGDA min-norm solver did not reach tolerance {tol:g} in {max_iter} iterations; "
            "raise max_iter or tol"
        )
    return weights.to(gramian.dtype)


# --------------------------------------------------------------------------- CAGrad
def cagrad_weights(
    gramian: Tensor,
    c: float,
    *,
    tol: float | None = None,
    max_iter: int = 200,
    check_every: int = 10,
) -> Tensor:
    """CAGrad's dual weights: ``w`` on the simplex minimising ``g_wᵀ g₀ + √φ ‖g_w‖``.

    Liu et al. 2021, the inner problem's dual: ``g_w = Σ w_i g_i``, ``g₀`` the mean gradient and
    ``φ = c² ‖g₀‖²``. In terms of ``G``: ``wᵀ G 1/k + c ‖g₀‖ √(wᵀ G w)``. The square root is
    smoothed as ``√(wᵀĜw + 1e-12)`` in the units of ``Ĝ = G / max diag G`` (the official code
    adds 1e-8 in raw units), which keeps the objective differentiable where ``g_w = 0``. Solved
    with the same barrier Newton method as :func:`min_norm_weights`; same ``tol`` meaning.
    Two tasks have an exact closed form (without the smoothing), used directly.
    """
    _check_gramian(gramian)
    count = gramian.shape[0]
    if count == 1:
        return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
    work, _ = _normalised(gramian)
    tol = _default_tol(work.dtype, 1e-10, 1e-5) if tol is None else tol
    linear = work.mean(dim=1)  # G 1/k: the inner products g_iᵀ g₀
    radius = c * linear.mean().clamp(min=0).sqrt()  # c ‖g₀‖
    if count == 2:
        return _cagrad_two(work, linear, radius).to(gramian.dtype)
    smoothing = 1e-12

    def value(w: Tensor) -> Tensor:
        quadratic = ((w @ work) * w).sum(-1)
        return w @ linear + radius * (quadratic + smoothing).sqrt()

    def derivatives(w: Tensor) -> tuple[Tensor, Tensor]:
        gw = work @ w
        norm = (w @ gw + smoothing).sqrt()
        grad = linear + radius * gw / norm
        hessian = radius * (work / norm - torch.outer(gw, gw) / norm**3)
        return grad, hessian

    weights = _simplex_barrier_newton(
        value, derivatives, count, work, tol=tol, max_iter=max_iter, check_every=check_every
    )
    if weights is None:
        raise StrategyError(
            f"CAGrad dual solver did not reach tolerance {tol:g} in {max_iter} iterations; "
            "raise max_iter or tol"
        )
    return weights.to(gramian.dtype)


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


def _simplex_barrier_newton(
    value: Callable[[Tensor], Tensor],
    derivatives: Callable[[Tensor], tuple[Tensor, Tensor]],
    count: int,
    like: Tensor,
    *,
    tol: float,
    max_iter: int,
    check_every: int,
) -> Tensor | None:
    """Minimise a convex ``F`` over the simplex; ``None`` if the gap did not reach ``tol``.

    ``value`` maps ``[n, k] -> [n]``; ``derivatives`` gives the gradient ``[k]`` and Hessian
    ``[k, k]`` at one point. The iterate stays strictly inside the simplex.
    """
    if max_iter < 1 or check_every < 1:
        raise StrategyError("max_iter and check_every must be >= 1")
    ones = torch.ones(count, dtype=like.dtype, device=like.device)
    w = ones / count
    mu = torch.ones((), dtype=like.dtype, device=like.device)
    mu_end = tol / (10 * count)
    steps = 0.5 ** torch.arange(30, dtype=like.dtype, device=like.device)  # candidate step sizes
    kkt = torch.zeros(count + 1, count + 1, dtype=like.dtype, device=like.device)
    kkt[count, :count] = 1
    kkt[:count, count] = 1
    rhs = torch.zeros(count + 1, dtype=like.dtype, device=like.device)
    for iteration in range(1, max_iter + 1):
        grad, hessian = derivatives(w)
        barrier_grad = grad - mu / w
        # Newton step on the plane 1ᵀΔ = 0: the KKT system [[H, 1], [1ᵀ, 0]]. (H alone can be
        # singular: CAGrad's √(wᵀGw) is flat along w.)
        kkt[:count, :count] = hessian + torch.diag(mu / w**2)
        rhs[:count] = -barrier_grad
        solved, _ = torch.linalg.solve_ex(kkt, rhs)
        direction = solved[:count]
        decrement = -(barrier_grad @ direction)  # Δᵀ H Δ ≥ 0
        shrinking = direction < 0
        to_boundary = torch.where(shrinking, -w / torch.where(shrinking, direction, -ones), 2.0)
        longest = (0.99 * to_boundary.min()).clamp(max=1.0)
        sizes = longest * steps
        candidates = w + sizes[:, None] * direction
        positive = (candidates > 0).all(-1)
        trial = value(candidates) - mu * torch.log(candidates.clamp(min=1e-300)).sum(-1)
        current = value(w[None])[0] - mu * torch.log(w).sum()
        accepted = positive & ((trial <= current - 0.25 * sizes * decrement) | (decrement <= 1e-14))
        first_ok = torch.where(accepted.any(), accepted.to(torch.uint8).argmax(), len(steps) - 1)
        size = torch.where(accepted.any(), sizes[first_ok], torch.zeros_like(longest))
        w = w + size * direction
        w = w.clamp(min=torch.finfo(w.dtype).tiny)
        w = w / w.sum()
        mu = torch.where(decrement < 0.5, (mu * 0.1).clamp(min=mu_end), mu)
        if iteration % check_every == 0 or iteration == max_iter:
            grad, _ = derivatives(w)
            gap = grad @ w - grad.min()
            if bool((mu <= mu_end) & (gap <= tol) & torch.isfinite(w).all()):
                return w
    return None


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
    ``tol``, :class:`~taskbalance.StrategyError` is raised.

    Two tasks have the closed form ``α_i = 1 / (‖g_i‖ √(1 + cos θ))``, used directly.

        >>> import torch
        >>> nash_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))  # orthogonal: α_i = 1/‖g_i‖
        tensor([0.5000, 1.0000])
    """
    _check_gramian(gramian)
    if max_iter < 1 or check_every < 1:
        raise StrategyError("max_iter and check_every must be >= 1")
    work = gramian.to(solver_dtype(gramian.device))
    norms = work.diagonal().clamp(min=0).sqrt()
    count = work.shape[0]
    if count <= 2:  # closed form; a zero gradient or opposite pair makes it non-finite
        alpha = _nash_closed_form(work, norms)
        if not bool(torch.isfinite(alpha).all()):
            raise StrategyError(_nash_failure(work, tol, "no solution"))
        return alpha.to(gramian.dtype)
    if not bool((norms > 0).all()):
        raise StrategyError(_nash_failure(work, tol, "no solution"))
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
    raise StrategyError(_nash_failure(work, tol, f"not converged in {max_iter} Newton steps"))


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
