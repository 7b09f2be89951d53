"""Small per-step problems of the gradient-level strategies, solved in torch.

Every function takes a Gramian ``G = J Jᵀ`` (``[k, k]``, the inner products of the task
gradients) and returns weights ``[k]``, on ``G``'s device. None of them uses a CPU solver, none
loops over parameters, and each has a tolerance and an iteration cap in its signature. A problem
without a solution, or a solver that does not converge within its cap, is a failure: ``ok``
false in the :class:`Solution`, :class:`~taskbalance.SolverError` from the ``*_weights`` form
(bad arguments raise :class:`~taskbalance.StrategyError`); no solver falls back to some other
weighting in silence. All are deterministic.

The iterative solvers run in float64 (float32 on devices without float64, such as Apple MPS)
whatever the Gramian's dtype: the problems are ``k × k`` with ``k`` the number of tasks, so the
extra precision costs nothing next to the backward passes, and it keeps the Newton systems of
nearly dependent gradients well resolved. The weights come back in ``G``'s dtype.

* :func:`min_norm_weights` (:func:`min_norm_solution`) — the min-norm point of the convex hull
  of the task gradients (MGDA): exact closed form for two tasks, a primal-dual interior-point
  method beyond.
* :func:`cagrad_weights` (:func:`cagrad_solution`) — the dual of CAGrad's inner problem over the
  simplex: closed form for two tasks, a primal-dual interior-point method on the dual and primal
  together beyond.
* :func:`nash_weights` (:func:`nash_solution`) — Nash-MTL's bargaining system ``G α = 1/α``,
  ``α > 0``.

Gradient norms of very different sizes (the two interior-point solvers): their optimality
conditions are tested per task, each in the units of that task's own gradient norm, so a task
whose gradient is 10⁶ times smaller than another's is resolved as accurately as the largest; the
Newton systems are rescaled by their diagonal for the same reason. Their iterates approach the
optimal face of the simplex, and each iteration solves the problem on the face they approach
exactly (one small linear system); the answer is usually that exact solution, with exact zeros
off its support. The first candidate, before any iteration, is the solution on the whole
simplex's face (every task present): the answer for gradients that conflict little, such as
nearly orthogonal ones, which then cost one linear system.

Host synchronisation: none. Each solver has a ``*_solution`` form that returns a
:class:`Solution` (the weights, a 0-dim bool tensor ``ok`` saying whether they meet the
tolerance, and a message builder for a failure); the ``*_weights`` form checks ``ok`` (one host
read) and raises :class:`~taskbalance.SolverError`. An iterate that meets the tolerance is kept
and never moved again, so the answer does not depend on when the loop ends, and
:class:`EarlyStop` ends it without waiting for the device: on the CPU at the first iteration
that meets the tolerance, on CUDA a few iterations later (the flag travels to the host without
blocking), elsewhere after ``max_iter`` iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from taskbalance.errors import SolverError, StrategyError

__all__ = [
    "EarlyStop",
    "Solution",
    "cagrad_solution",
    "cagrad_weights",
    "checked",
    "min_norm_solution",
    "min_norm_two",
    "min_norm_weights",
    "nash_solution",
    "nash_weights",
    "read_if_free",
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


def checked(solution: Solution) -> Tensor:
    """The weights of ``solution``; :class:`~taskbalance.SolverError` with its reason if it
    failed. One host read of ``ok``."""
    if not bool(solution.ok):
        raise SolverError(solution.reason())
    return solution.weights


def solver_dtype(device: torch.device) -> torch.dtype:
    """The working dtype of the small per-step problems on ``device``: float64 where the device
    has it (not on MPS). Every solver and strategy takes its working dtype from here."""
    return torch.float32 if device.type == "mps" else torch.float64


def read_if_free(flag: Tensor) -> bool | None:
    """``bool(flag)`` where reading it costs no host sync (a CPU tensor), ``None`` elsewhere: for
    a shortcut whose general path gives the same answer. The one place where the solvers read a
    tensor on the CPU."""
    return bool(flag) if flag.device.type == "cpu" else None


class EarlyStop:
    """When an iteration may end, without a host sync: ``stop(done)`` is true once the 0-dim bool
    tensor ``done`` is known to be true.

    For loops whose iterates stay put once ``done``, so that the answer is the same however late
    the loop ends. On the CPU ``done`` is read at once (:func:`read_if_free`). On CUDA it is
    copied to pinned host memory without blocking and read once a CUDA event recorded after the
    copy has completed (querying an event does not wait): ``stop`` turns true a few calls after
    ``done`` did, never before. On other devices it is never read: the loop runs to its cap.
    """

    def __init__(self, device: torch.device) -> None:
        self._kind = device.type
        self._host: Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def __call__(self, done: Tensor) -> bool:
        value = read_if_free(done)
        if value is not None or self._kind != "cuda":
            return bool(value)  # None: never read
        if self._copied is None or self._host is None:
            self._host = torch.zeros((), dtype=torch.bool, pin_memory=True)
            self._copied = torch.cuda.Event()
        elif self._copied.query() and bool(self._host):  # a host read of a finished copy
            return True
        self._host.copy_(done, non_blocking=True)
        self._copied.record()
        return False


def _default_tol(dtype: torch.dtype, double: float, single: float) -> float:
    return double if dtype == torch.float64 else single


def _check_gramian(gramian: Tensor) -> None:
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise StrategyError(f"gramian must be a square [k, k] matrix, got {tuple(gramian.shape)}")


def _check_iterations(max_iter: int) -> None:
    if max_iter < 1:
        raise StrategyError("max_iter must be >= 1")


def _exact(weights: Tensor) -> Solution:
    """A closed form's answer: ``ok`` unless non-finite (a non-finite Gramian)."""
    return Solution(weights, torch.isfinite(weights).all(), lambda: "non-finite weights")


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


def _keep_first(
    candidates: Tensor, passed: Tensor, best: Tensor, converged: Tensor
) -> tuple[Tensor, Tensor]:
    """``best`` becomes the first of ``candidates`` ``[m, k]`` that ``passed`` ``[m]``, unless a
    candidate passed before (``converged``): a kept answer never changes. No host sync."""
    found = passed.any()
    first = candidates.index_select(0, passed.to(torch.int8).argmax().reshape(1))[0]
    return torch.where(found & ~converged, first, best), converged | found


# --------------------------------------------------------------------------- min-norm point
def min_norm_two(gramian: Tensor) -> Tensor:
    """Exact min-norm weights of two gradients (Sener & Koltun 2018, Algorithm 1).

    With ``G = [[a, b], [b, c]]``: ``w₁ = clip((c − b) / (a − 2b + c), 0, 1)``, ``w₂ = 1 − w₁``
    (the point of the segment ``[g₁, g₂]`` closest to the origin), ``w₂`` computed as
    ``clip((a − b) / (a − 2b + c), 0, 1)`` so that a tiny weight keeps its own precision
    (``1 − w₁`` would cancel). Equal gradients (``a − 2b + c = 0``) get ``(½, ½)``.

        >>> import torch
        >>> min_norm_two(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))  # g₁ ⟂ g₂, ‖g₂‖ = 2
        tensor([0.8000, 0.2000])
    """
    a, b, c = gramian[0, 0], gramian[0, 1], gramian[1, 1]
    denominator = a - 2 * b + c
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    weights = (torch.stack([c - b, a - b]) / safe).clamp(0, 1)
    return torch.where(denominator > 0, weights, torch.full_like(weights, 0.5))


def min_norm_weights(gramian: Tensor, *, tol: float | None = None, max_iter: int = 200) -> Tensor:
    """Weights ``w`` on the simplex minimising ``‖Σ w_i g_i‖² = wᵀ G w`` (the MGDA problem).

    One task: ``[1]``. Two tasks: :func:`min_norm_two`, exact. More: a primal-dual
    interior-point method on ``min ½wᵀĜw`` over the simplex (``Ĝ = G / max diag G``; Nocedal &
    Wright, *Numerical Optimization*, 2nd ed., §16.6): Mehrotra's predictor-corrector, steps to
    99.5% of the way to the boundary, Newton systems ``[[Ĝ + Z/W, 1], [1ᵀ, 0]]`` scaled by their
    diagonal, started at ``w ∝ 1/‖g_i‖``. Candidates: first the exact minimiser on the face of
    all tasks (one linear system: the answer when every task keeps some weight, as for nearly
    orthogonal gradients); then, at every iteration, the iterate and the exact minimiser on the
    face of the simplex that the iterates approach (the tasks whose weight a Newton step towards
    ``w∘z = 0`` keeps at least half of, the Tapia indicator). The first candidate that passes the
    test below is returned; it is usually a face solution, the minimiser itself with exact zeros
    off its support.

    Guarantee (scale-invariant per task): with ``d = Σ w_i g_i`` and ``ν = ‖d‖²``, every task has
    ``g_iᵀd ≥ ν − τ_i`` (and ``Σ_i w_i (g_iᵀd − ν) = 0``: the optimality conditions, exact for
    ``τ = 0``), with ``τ_i = tol·‖g_i‖·‖d‖`` plus a rounding allowance of 64 epsilons (of the
    Gramian's dtype) of the terms, ``ε (Σ_j w_j ‖g_j‖)(‖g_i‖ + Σ_j w_j ‖g_j‖)``. ``tol``
    defaults to 1e-10 (1e-5 on float32-only devices). For the min-norm point ``d*`` (weights
    ``w*``) it follows that ``‖d − d*‖² ≤ ‖d‖² − ‖d*‖² ≤ 2·tol·‖d‖·Σ_i w*_i ‖g_i‖`` (plus the
    rounding allowance): relative to ``‖d‖²``, ``tol`` times how much the weighted gradients
    cancel, whatever the spread of the gradient norms. :class:`~taskbalance.SolverError` if
    nothing passes within ``max_iter`` iterations (:func:`min_norm_solution` returns the
    :class:`Solution` instead, without a host sync).

    Where the minimiser is not unique (duplicate gradients), the face system is singular and an
    iterate is returned; the iteration treats tasks with equal gradients alike, so they get equal
    weights.
    """
    return checked(min_norm_solution(gramian, tol=tol, max_iter=max_iter))


def min_norm_solution(
    gramian: Tensor, *, tol: float | None = None, max_iter: int = 200
) -> Solution:
    """:func:`min_norm_weights` as a :class:`Solution`, without a host sync."""
    _check_gramian(gramian)
    _check_iterations(max_iter)
    count = gramian.shape[0]
    if count == 1:
        return _exact(torch.ones(1, dtype=gramian.dtype, device=gramian.device))
    if count == 2:  # in the solver dtype: a float32 Gramian's weights as exact as it allows
        return _exact(min_norm_two(gramian.to(solver_dtype(gramian.device))).to(gramian.dtype))
    work = _normalised(gramian)
    tol = _default_tol(work.dtype, 1e-10, 1e-5) if tol is None else tol
    weights, ok = _min_norm_interior_point(
        work, tol=tol, rounding=_rounding(gramian, work), max_iter=max_iter
    )
    return Solution(
        weights.to(gramian.dtype),
        ok,
        lambda: (
            f"MGDA min-norm solver did not reach tolerance {tol:g} in {max_iter} "
            "iterations; raise max_iter or tol"
        ),
    )


def _min_norm_interior_point(
    work: Tensor, *, tol: float, rounding: float, max_iter: int
) -> tuple[Tensor, Tensor]:
    """The iteration of :func:`min_norm_weights` on ``Ĝ``: the first candidate that passed and
    whether one did.

    KKT conditions of ``min ½wᵀĜw``, ``1ᵀw = 1``, ``w ≥ 0``: ``Ĝw − ν1 − z = 0``, ``w∘z = 0``,
    ``w, z ≥ 0``. The start is dual feasible (``z = Ĝw − ν > 0``). A candidate ``y`` on the
    simplex passes when ``(Ĝy)_i − yᵀĜy ≥ −τ_i`` for every task; the iterates stop moving once
    one has.
    """
    count, dtype, device = work.shape[0], work.dtype, work.device
    tiny = torch.finfo(dtype).tiny
    norms = work.diagonal().clamp(min=0).sqrt()
    face_rhs, face_sum = norms.new_zeros(count, 1), norms.new_ones(1)  # Ĝw − ν1 = 0, 1ᵀw = 1
    zero = norms.new_zeros(1)

    def allowance(value: Tensor, terms: Tensor) -> Tensor:
        # τ from ‖d‖² and Σ_j w_j ‖g_j‖
        return tol * norms * value.clamp(min=0).sqrt() + rounding * terms * (norms + terms)

    def passes(y: Tensor) -> Tensor:  # rows of y [m, k] on the simplex -> [m]
        product = y @ work
        value = (product * y).sum(1, keepdim=True)
        residual = product - value
        tau = allowance(value, (y @ norms)[:, None])
        return ((residual >= -tau) & torch.isfinite(residual)).all(1)

    def on_faces(keep: Tensor) -> Tensor:
        # the minimiser on each face (rows of keep [m, k]), then on the face that one step of a
        # primal-dual active-set method makes of it: [2m, k]
        raw = _on_faces(work, keep, face_rhs, face_sum)[..., 0]
        product = raw @ work
        slack = product - (product * raw).sum(1, keepdim=True)
        more = _on_faces(work, _active_set_step(keep, raw, slack), face_rhs, face_sum)[..., 0]
        return _clamped(torch.cat([raw, more]))

    w = _start(norms)
    every = torch.ones(1, count, dtype=torch.bool, device=device)
    candidates = torch.cat([on_faces(every), w[None]])
    never = torch.zeros((), dtype=torch.bool, device=device)
    best, converged = _keep_first(candidates, passes(candidates), w, never)
    grad = work @ w
    nu = 2 * grad.min() - w @ grad - tiny  # z = Ĝw − ν > 0, wᵀz = twice the Frank–Wolfe gap
    z = grad - nu
    stop = EarlyStop(device)
    for _ in range(max_iter):
        if stop(converged):
            break
        grad = work @ w
        ratio = z / w
        matrix = work + torch.diag(ratio)
        scale = matrix.diagonal().clamp(min=tiny).rsqrt()
        size = scale.amax()
        kkt = _bordered(scale[:, None] * matrix * scale, scale / size)
        rhs = torch.stack(
            [
                torch.cat([scale * (nu - grad), ((1 - w.sum()) / size)[None]]),
                torch.cat([scale / w, zero]),
            ],
            dim=1,
        )
        factors, pivots, _ = torch.linalg.lu_factor_ex(kkt)  # one factorisation, two solves
        solved = torch.linalg.lu_solve(factors, pivots, rhs)
        # the Newton step towards w∘z = 0, and its change per unit of centring target
        affine, centring = scale * solved[:count, 0], scale * solved[:count, 1]
        candidates = torch.cat([(w / w.sum())[None], on_faces((affine > -_KEEP * w)[None])])
        best, converged = _keep_first(candidates, passes(candidates), best, converged)
        # Mehrotra's predictor-corrector
        mu = (w @ z) / count
        affine_z = -z - ratio * affine
        reach = _to_boundary(w, z, affine, affine_z).clamp(max=1)
        mu_affine = ((w + reach * affine) @ (z + reach * affine_z)) / count
        target = mu * (mu_affine / mu).clamp(max=1) ** 3
        # Centring no further than the test needs keeps the iterates off the rounding floor.
        tau = allowance(w @ grad, w @ norms)
        target = torch.maximum(target, 0.01 * (w @ tau) / count)
        correction = torch.cat([scale * (affine * affine_z / w), zero])
        corrected = torch.linalg.lu_solve(factors, pivots, correction[:, None])
        step = affine + target * centring - scale * corrected[:count, 0]
        nu_step = (corrected[count, 0] - solved[count, 0] - target * solved[count, 1]) / size
        z_step = (target - affine * affine_z) / w - z - ratio * step
        length = (0.995 * _to_boundary(w, z, step, z_step)).clamp(max=1)
        # a passed candidate ends the iteration: the iterates stay put
        w = torch.where(converged, w, (w + length * step).clamp(min=tiny))
        z = torch.where(converged, z, (z + length * z_step).clamp(min=tiny))
        nu = torch.where(converged, nu, nu + length * nu_step)
    return best, converged


# --------------------------------------------------------------------------- CAGrad
def cagrad_weights(
    gramian: Tensor, c: float, *, tol: float | None = None, max_iter: int = 200
) -> Tensor:
    """CAGrad's dual weights: ``w`` on the simplex minimising ``g_wᵀ g₀ + √φ ‖g_w‖``.

    Liu et al. 2021, the inner problem's dual: ``g_w = Σ w_i g_i``, ``g₀`` the mean gradient and
    ``φ = c² ‖g₀‖²``; in terms of ``G``, ``h(w) = wᵀb + r √(wᵀGw)`` with ``b = G 1/k`` and
    ``r = c ‖g₀‖``. The exact ``h``, without smoothing (the official code adds 1e-8 under the
    square root). Two tasks have an exact closed form, used directly.

    More tasks: the dual and CAGrad's primal (``d = g₀ + r u``, ``‖u‖ ≤ 1``) are solved together
    by a primal-dual interior-point method (see :func:`_cagrad_interior_point`), which stays
    smooth where ``g_w = 0`` (a Pareto-stationary optimum, where ``h`` has a kink). Before the
    first iteration, and at every iteration, the problem is also solved exactly on a face of the
    simplex (first the face of all tasks, then the face the iterates approach): there the
    minimiser is the ``w(t) = α + tβ`` minimising ``½wᵀGw + t wᵀb`` (one linear system) with
    ``‖g_w(t)‖ = r t``, a quadratic equation in ``t``; or, at a kink, the face's point with
    ``g_w = 0``.

    Guarantee (scale-invariant per task), with the primal vector ``u`` (``‖u‖ ≤ 1``) found along,
    ``p_i = g_iᵀ(g₀ + r u)`` and ``ν = Σ_i w_i p_i``: ``p_i − ν ≥ −τ_i`` for every task and
    ``r(‖g_w‖ − g_wᵀu) ≤ Σ_i w_i τ_i``, with ``τ_i = tol·‖g_i‖·(1 + c)‖g₀‖`` plus a rounding
    allowance of 64 epsilons (of the Gramian's dtype) of the terms. ``tol`` defaults to 1e-10
    (1e-5 on float32-only devices). Since ``h(w) = ν + r(‖g_w‖ − g_wᵀu)`` and
    ``h(w*) ≥ Σ_i w*_i p_i`` for the optimal weights ``w*``, ``h(w) − h(w*) ≤ Σ_i (w_i + w*_i)
    τ_i``, whatever the spread of the gradient norms. (Where ``g_w = 0``, ``‖g_w‖`` from the
    Gramian is only known to √ε of its terms, and the allowance says so.)
    :class:`~taskbalance.SolverError` if nothing passes within ``max_iter`` iterations
    (:func:`cagrad_solution` returns the :class:`Solution` instead, without a host sync).
    """
    return checked(cagrad_solution(gramian, c, tol=tol, max_iter=max_iter))


def cagrad_solution(
    gramian: Tensor, c: float, *, tol: float | None = None, max_iter: int = 200
) -> Solution:
    """:func:`cagrad_weights` as a :class:`Solution`, without a host sync."""
    _check_gramian(gramian)
    _check_iterations(max_iter)
    count = gramian.shape[0]
    if count == 1:
        return _exact(torch.ones(1, dtype=gramian.dtype, device=gramian.device))
    work = _normalised(gramian)
    tol = _default_tol(work.dtype, 1e-10, 1e-5) if tol is None else tol
    linear = work.mean(dim=1)  # G 1/k: the inner products g_iᵀ g₀
    radius = c * linear.mean().clamp(min=0).sqrt()  # c ‖g₀‖
    if count == 2:
        return _exact(_cagrad_two(work, linear, radius).to(gramian.dtype))
    weights, ok = _cagrad_interior_point(
        work, linear, radius, tol=tol, rounding=_rounding(gramian, work), max_iter=max_iter
    )
    return Solution(
        weights.to(gramian.dtype),
        ok,
        lambda: (
            f"CAGrad dual solver did not reach tolerance {tol:g} in {max_iter} iterations; "
            "raise max_iter or tol"
        ),
    )


def _cagrad_interior_point(
    work: Tensor,
    linear: Tensor,
    radius: Tensor,
    *,
    tol: float,
    rounding: float,
    max_iter: int,
) -> tuple[Tensor, Tensor]:
    """CAGrad's dual and primal at once: the first candidate weights that passed and whether
    one did.

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
    Σ_i (y_i + w*_i) τ_i``. Candidates, before the first iteration: the start and the exact
    minimiser on the face of all tasks (see :func:`cagrad_weights`); then every iteration: the
    iterate; the exact minimiser on the face of the simplex the iterates approach, with its own
    ``u = g_y/‖g_y‖``; and that face's point with ``g_y = 0`` (a Pareto-stationary optimum),
    with the iterate's ``u``. Once a candidate passes, the iterates stay put.
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

    def certified(y: Tensor, p: Tensor) -> Tensor:  # rows of y and p [m, k] -> [m]
        inside = y.clamp(min=0)
        residual = p - (inside * p).sum(1, keepdim=True) / inside.sum(1, keepdim=True)
        # ‖g_y‖ from the Gramian is known to √(rounding) of its terms only (a square root of
        # a rounded square), which matters where g_y vanishes: a Pareto-stationary point
        norm = ((inside @ work) * inside).sum(1).clamp(min=0).sqrt()
        gap = radius * (norm - rounding**0.5 * (inside @ norms)) - (inside * (p - linear)).sum(1)
        return (
            (y >= 0).all(1)
            & (residual >= -tau).all(1)
            & (gap <= inside @ tau)
            & torch.isfinite(residual).all(1)
        )

    face_top = torch.stack([torch.zeros_like(linear), -linear], dim=1)
    face_bottom = linear.new_tensor([1.0, 0.0])

    def on_faces(keep: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        # The candidates of each face (rows of keep [m, k]), then those of the face that one
        # step of a primal-dual active-set method makes of it: [4m, k].
        candidates, passed, smooth = on_face(keep, p)
        smooth_g = smooth @ work
        primal = linear + radius * smooth_g / (smooth_g * smooth).sum(1, keepdim=True).sqrt()
        slack = primal - (smooth * primal).sum(1, keepdim=True) / smooth.sum(1, keepdim=True)
        more, more_passed, _ = on_face(_active_set_step(keep, smooth, slack), p)
        return torch.cat([candidates, more]), torch.cat([passed, more_passed])

    def on_face(keep: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # w(t) = α + tβ minimises ½wᵀGw + t wᵀb on each face (rows of keep [m, k]); h's minimiser
        # there is the w(t) with ‖g_w(t)‖ = r t, t > 0: (βᵀGβ − r²) t² + 2 αᵀGβ t + αᵀGα = 0.
        # Candidates [2m, k]: the smooth minimisers, then the kinks (g_α = 0, the iterate's u);
        # and the smooth minimisers before clamping.
        solved = _on_faces(work, keep, face_top, face_bottom)
        alpha, direction = solved[..., 0], solved[..., 1]
        alpha_g, direction_g = alpha @ work, direction @ work
        constant, half_slope = (alpha_g * alpha).sum(1), (alpha_g * direction).sum(1)
        curvature = (direction_g * direction).sum(1) - radius**2
        root = (half_slope**2 - curvature * constant).sqrt()  # NaN: no solution on the face
        # the root with t > 0, written without cancellation
        t = torch.where(
            half_slope > 0, -(half_slope + root) / curvature, constant / (root - half_slope)
        )
        raw = alpha + t[:, None] * direction
        smooth, kink = _clamped(raw), _clamped(alpha)
        smooth_g = smooth @ work
        norm = (smooth_g * smooth).sum(1, keepdim=True).clamp(min=0).sqrt()
        candidates = torch.cat([smooth, kink])
        primal = torch.cat([linear + radius * smooth_g / norm, p.expand_as(kink)])
        return candidates, certified(candidates, primal), raw

    # half ∝ 1/‖g_i‖, half uniform: no vertex (such as a zero gradient) holds all the weight
    w = 0.5 * _start(norms) + 0.5 / count
    every = torch.ones(1, count, dtype=torch.bool, device=device)
    candidates, passed = on_faces(every, linear)
    candidates = torch.cat([candidates, w[None]])
    passed = torch.cat([passed, certified(w[None], linear[None])])  # β = 0: u = 0
    never = torch.zeros((), dtype=torch.bool, device=device)
    best, converged = _keep_first(candidates, passed, w, never)
    beta = torch.zeros_like(w)
    nu = 2 * linear.min() - w @ linear - tiny  # z = b − ν > 0 at β = 0
    z = linear - nu
    q = torch.full_like(nu, 0.5)  # the slack of the ball: q = (1 − βᵀRβ)/2 at the solution
    lam = (w @ z) / (count * q)  # λq = the mean w_i z_i
    size = 2 * count + 1
    kkt = torch.zeros(size, size, dtype=dtype, device=device)
    rhs = torch.zeros(size, 2, dtype=dtype, device=device)
    tasks, duals = slice(0, count), slice(count, 2 * count)
    stop = EarlyStop(device)
    for _ in range(max_iter):
        if stop(converged):
            break
        gb, m = work @ beta, ridge @ beta
        # the primal values at u = Σ β_i g_i, brought into the unit ball if need be
        p = linear + radius * gb / (beta @ gb).clamp(min=1).sqrt()
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
        # the iterate, then the exact candidates of the face the iterates approach
        face, face_passed = on_faces((affine_w > -_KEEP * w)[None], p)
        candidates = torch.cat([(w / w.sum())[None], face])
        passed = torch.cat([certified(w[None], p[None]), face_passed])
        best, converged = _keep_first(candidates, passed, best, converged)
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
        boundary = _to_boundary(
            torch.cat([w, lam[None]]),
            torch.cat([z, q[None]]),
            torch.cat([step_w, step_lam[None]]),
            torch.cat([step_z, step_q[None]]),
        )
        length = (0.995 * boundary).clamp(max=1)
        # a passed candidate ends the iteration: the iterates stay put
        w = torch.where(converged, w, (w + length * step_w).clamp(min=tiny))
        z = torch.where(converged, z, (z + length * step_z).clamp(min=tiny))
        lam = torch.where(converged, lam, (lam + length * step_lam).clamp(min=tiny))
        q = torch.where(converged, q, (q + length * step_q).clamp(min=tiny))
        beta = torch.where(converged, beta, beta + length * step_beta)
        nu = torch.where(converged, nu, nu + length * step_nu)
    return best, converged


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
def _on_faces(matrix: Tensor, keep: Tensor, top: Tensor, bottom: Tensor) -> Tensor:
    """Solve ``A_SS x_S − λ 1 = top_S``, ``1ᵀx_S = bottom``, ``x = 0`` off ``S``, for each face
    ``S`` (a row of ``keep`` ``[m, k]``) at once.

    ``top`` is ``[k, n]`` and ``bottom`` ``[n]`` (``n`` right-hand sides); returns ``x``
    ``[m, k, n]``. Rows and columns are scaled by ``1/√A_ii``, so norms of any spread are
    resolved. A singular system (two equal gradients in ``S``) leaves non-finite entries, which
    fail the optimality tests.
    """
    count = matrix.shape[0]
    diagonal = matrix.diagonal()
    scale = torch.where(keep & (diagonal > 0), diagonal, 1.0).rsqrt()
    both = keep[:, :, None] & keep[:, None, :]
    eye = torch.eye(count, dtype=matrix.dtype, device=matrix.device)
    border = torch.where(keep, scale, 0.0)
    size = border.amax(1, keepdim=True)
    block = torch.where(both, scale[:, :, None] * matrix * scale[:, None, :], eye)
    rhs = torch.cat(
        [torch.where(keep[:, :, None], scale[:, :, None] * top, 0.0), (bottom / size)[:, None]],
        dim=1,
    )
    solved, _ = torch.linalg.solve_ex(_bordered(block, border / size), rhs)
    return torch.where(keep[:, :, None], scale[:, :, None] * solved[:, :count], 0.0)


def _active_set_step(keep: Tensor, weights: Tensor, slack: Tensor) -> Tensor:
    """The next face of a primal-dual active-set method (Hintermüller, Ito & Kunisch, SIAM J.
    Optim. 2002): from the solution on the face ``keep`` (its ``weights`` and the ``slack`` of
    the optimality condition of every task, ``≥ 0`` off the face at the optimum), drop the tasks
    with a weight ``≤ 0`` and add those with a negative slack."""
    return torch.where(keep, weights > 0, slack < 0)


def _bordered(block: Tensor, border: Tensor) -> Tensor:
    """``[[block, b], [bᵀ, 0]]`` for ``block`` ``[..., k, k]`` and ``b`` ``[..., k]``."""
    top = torch.cat([block, border[..., None]], dim=-1)
    bottom = torch.cat([border, border.new_zeros(*border.shape[:-1], 1)], dim=-1)
    return torch.cat([top, bottom[..., None, :]], dim=-2)


def _clamped(y: Tensor) -> Tensor:
    """``y`` (rows ``[..., k]``) with rounding-level negative weights set to 0, back on the
    simplex. The result is what gets tested, so a large negative weight (a wrong face) just fails
    the test."""
    inside = y.clamp(min=0)
    return inside / inside.sum(-1, keepdim=True)


def _to_boundary(x: Tensor, z: Tensor, x_step: Tensor, z_step: Tensor) -> Tensor:
    """The largest ``a`` with ``x + a·x_step ≥ 0`` and ``z + a·z_step ≥ 0`` (``inf`` if none)."""
    point, step = torch.cat([x, z]), torch.cat([x_step, z_step])
    return torch.where(step < 0, -point / step, torch.inf).amin()


# --------------------------------------------------------------------------- Nash-MTL
def nash_weights(gramian: Tensor, *, tol: float = 1e-6, max_iter: int = 50) -> Tensor:
    """The Nash bargaining weights: ``α > 0`` with ``(G α)_i = 1 / α_i`` for every task.

    Navon et al. 2022. The solution is the minimiser of the strictly convex,
    self-concordant ``½ αᵀ G α − Σ log α_i`` (its gradient is ``G α − 1/α``), so damped Newton
    steps ``1/(1 + λ)`` (``λ`` the Newton decrement; full steps once ``λ < ¼``) converge from
    any positive start without a line search, quadratically near the solution. Solved for the
    cosine matrix ``C = G / (n nᵀ)``, ``n_i = ‖g_i‖`` (``β`` with ``C β = 1/β`` gives
    ``α = β / n``: exact, since the problem is covariant under per-task scaling), starting at
    ``β_i = 1/√max(1, (C 1)_i)``: the answer both for orthogonal gradients (``β = 1``) and for
    equal ones (``β = 1/√k``), and never larger than 1 where tasks conflict.

    Converged when ``max_i |α_i (G α)_i − 1| ≤ tol``; a converged iterate is kept. The solution
    exists exactly when no non-negative, non-zero combination of the task gradients vanishes (no
    zero gradient, no pair of opposite gradients, ...); otherwise, or if ``max_iter`` Newton
    steps do not reach ``tol``, :class:`~taskbalance.SolverError` is raised
    (:func:`nash_solution` returns the :class:`Solution` instead, without a host sync).

    Two tasks have the closed form ``α_i = 1 / (‖g_i‖ √(1 + cos θ))``, used directly.

        >>> import torch
        >>> nash_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))  # orthogonal: α_i = 1/‖g_i‖
        tensor([0.5000, 1.0000])
    """
    return checked(nash_solution(gramian, tol=tol, max_iter=max_iter))


def nash_solution(gramian: Tensor, *, tol: float = 1e-6, max_iter: int = 50) -> Solution:
    """:func:`nash_weights` as a :class:`Solution`, without a host sync."""
    _check_gramian(gramian)
    _check_iterations(max_iter)
    work = gramian.to(solver_dtype(gramian.device))
    norms = work.diagonal().clamp(min=0).sqrt()
    count = work.shape[0]
    if count <= 2:
        # the closed form: non-finite for a zero gradient or an opposite pair, and tested like
        # the iterates (nearly opposite gradients leave 1 + cos θ to rounding)
        alpha = _nash_closed_form(work, norms)
        residual = (alpha * (work @ alpha) - 1).abs().max()
        return Solution(
            alpha.to(gramian.dtype),
            torch.isfinite(alpha).all() & (residual <= tol),
            lambda: _nash_failure(work, tol, "no solution"),
        )
    present = norms > 0
    safe = torch.where(present, norms, 1.0)
    # Solve for the cosine matrix C = G / (n nᵀ): β solves C β = 1/β iff α = β / n solves
    # G α = 1/α. This is exact (Nash-MTL is covariant under per-task scaling) and leaves
    # Newton a matrix with unit diagonal however different the gradient norms are.
    cosines = work / torch.outer(safe, safe)
    cosines = 0.5 * (cosines + cosines.mT)
    beta = cosines.sum(1).clamp(min=1).rsqrt()

    def solves(b: Tensor) -> Tensor:
        residual = (b * (cosines @ b) - 1).abs().max()
        return torch.isfinite(b).all() & (residual <= tol)

    converged = solves(beta)
    stop = EarlyStop(work.device)
    for _ in range(max_iter):
        if stop(converged):
            break
        grad = cosines @ beta - 1 / beta
        hessian = cosines + torch.diag(1 / beta**2)
        direction, _ = torch.linalg.solve_ex(hessian, -grad)
        decrement = (-(grad @ direction)).clamp(min=0).sqrt()
        size = torch.where(decrement < 0.25, 1.0, 1 / (1 + decrement))
        beta = torch.where(
            converged, beta, (beta + size * direction).clamp(min=torch.finfo(beta.dtype).tiny)
        )
        converged = converged | solves(beta)
    return Solution(
        (beta / safe).to(gramian.dtype),
        converged & present.all(),
        lambda: _nash_failure(work, tol, f"not solved in {max_iter} Newton steps"),
    )


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
