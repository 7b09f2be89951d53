"""Projection onto the dual cone of the task gradients, solved in the T-dimensional dual.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, arXiv:2406.16232.
For a Jacobian ``J`` (rows = task gradients) the dual cone is ``C = {v : J v ≥ 0}``: the
directions that conflict with no task. The Euclidean projection of ``Jᵀu`` onto ``C``,

    min_v ½‖v − Jᵀu‖²   s.t.  J v ≥ 0,

has the Lagrangian dual (multipliers ``μ ≥ 0`` for ``J v ≥ 0``, stationarity ``v = Jᵀ(u + μ)``)

    min_{μ ≥ 0} ½ μᵀGμ + μᵀG u,        G = J Jᵀ,

so the projection is ``Jᵀw`` with ``w = u + μ*``, equivalently ``w = argmin_{w ≥ u} ½ wᵀGw``
(the paper's Proposition on the dual of the projection). The KKT conditions say
``G w ≥ 0`` (no task conflicts with ``Jᵀw``), ``w ≥ u`` and ``(w − u)ᵢ (G w)ᵢ = 0``.

:func:`project_weights` solves that box-constrained QP for a batch of ``u`` at once with a
projected Newton method (Bertsekas, "Projected Newton methods for optimization problems with
simple constraints", SIAM J. Control Optim. 1982): Newton steps on the variables that are not held
at their bound, scaled gradient steps on the others, and an Armijo search along the projection
arc. For a quadratic the method ends with an exact Newton step once the active set is identified,
so a handful of iterations suffice. It runs on the Gramian's device, in float64 where the device
has it, with a tolerance and an iteration cap, deterministically, without a host sync
(:func:`project_solution`; see :mod:`taskbalance.solvers` for how the loop ends); an unconverged
answer is a failure (``ok`` false, or :class:`~taskbalance.SolverError` from
:func:`project_weights`), never returned as if it were the projection.

Two preprocessing steps follow TorchJD's ``UPGrad``/``DualProj``: ``G`` is divided by its trace
(the result depends only on the directions and relative sizes of the gradients, and the solver's
tolerance is relative), and ``reg_eps·I`` is added, which makes the problem strictly convex so the
weights are unique even when gradients are duplicated or linearly dependent. The price of
``reg_eps > 0`` is a tiny admitted conflict: ``gᵢ·d ≥ −reg_eps·tr(G)·wᵢ`` instead of ``≥ 0``.
TorchJD's absolute threshold ``norm_eps`` (a Gramian with trace below it is treated as zero) is not
adopted: it makes the result depend on the scale of the losses; a zero Gramian is handled exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.solvers import EarlyStop, Solution, checked, read_if_free, solver_dtype

__all__ = ["project_solution", "project_weights"]

_ARMIJO = 1e-4  # sufficient-decrease constant of the line search
_HALVINGS = 30  # when the full step fails, 1, 1/2, ..., 2^-29 are tried at once
_ACTIVE_EPS = 1e-3  # Bertsekas' epsilon for the active-set estimate (normalised units)


def normalized_gramian(gramian: Tensor, reg_eps: float) -> tuple[Tensor, Tensor]:
    """``G / tr(G) + reg_eps·I`` in the solver dtype, and ``tr(G)``."""
    g = gramian.to(solver_dtype(gramian.device))
    g = 0.5 * (g + g.mT)  # exact symmetry, whatever the matmul did
    trace = g.diagonal().sum()
    safe = torch.where(trace > 0, trace, torch.ones_like(trace))
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return g / safe + reg_eps * eye, trace


def project_weights(
    gramian: Tensor,
    u: Tensor,
    *,
    reg_eps: float = 1e-8,
    tol: float = 1e-7,
    max_iter: int = 100,
) -> Tensor:
    """Weights ``w`` such that ``Jᵀw`` is the projection of ``Jᵀu`` onto ``{v : J v ≥ 0}``.

    ``gramian`` is ``G = J Jᵀ`` ``[k, k]``; ``u`` is ``[k]`` or a batch ``[m, k]`` of weight
    vectors. Returns ``w`` with the shape of ``u``, in ``u``'s dtype, on ``u``'s device:
    ``w = argmin_{w ≥ u} ½ wᵀ(G/tr(G) + reg_eps·I) w``.

    ``tol`` bounds the natural KKT residual ``max_i |min(w_i − u_i, (A w)_i)|`` of the normalised
    problem (relative to ``max(1, max_i |w_i − u_i|)``); ``max_iter`` caps the projected Newton
    iterations; once every row meets ``tol`` the answer is kept. Not converged:
    :class:`~taskbalance.SolverError`; :func:`project_solution` returns the
    :class:`~taskbalance.solvers.Solution` instead, without a host sync.

        >>> import torch
        >>> from taskbalance.cone import project_weights
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> w = project_weights(J @ J.T, torch.tensor([1.0, 0.0]), reg_eps=0.0)
        >>> (w @ J).tolist()  # g1 = (1, 0) projected onto {v1 ≥ 0, v2 ≥ v1}
        [0.5, 0.5]
    """
    return checked(project_solution(gramian, u, reg_eps=reg_eps, tol=tol, max_iter=max_iter))


def project_solution(
    gramian: Tensor,
    u: Tensor,
    *,
    reg_eps: float = 1e-8,
    tol: float = 1e-7,
    max_iter: int = 100,
) -> Solution:
    """:func:`project_weights` as a :class:`~taskbalance.solvers.Solution`, without a host
    sync."""
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise StrategyError(f"gramian must be a square matrix, got shape {tuple(gramian.shape)}")
    if u.shape[-1] != gramian.shape[0]:
        raise StrategyError(f"u has {u.shape[-1]} entries for a {gramian.shape[0]}-task gramian")
    if not (reg_eps >= 0 and tol > 0 and max_iter >= 1):
        raise StrategyError("project_weights needs reg_eps >= 0, tol > 0 and max_iter >= 1")
    a, _ = normalized_gramian(gramian, reg_eps)
    batch = u.to(a.dtype).reshape(-1, a.shape[0])
    x, residual = _solve_box_qp(a, batch @ a, tol=tol, max_iter=max_iter)
    return Solution(
        (batch + x).reshape(u.shape).to(u.dtype),
        (residual <= tol).all(),
        lambda: (
            f"dual-cone projection did not converge in {max_iter} iterations (KKT residual "
            f"{residual.max().item():.3g} > tol={tol}); raise max_iter, or reg_eps for nearly "
            "dependent gradients"
        ),
    )


def _objective(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    return 0.5 * ((x @ a) * x).sum(-1) + (x * b).sum(-1)


def _armijo(a: Tensor, b: Tensor, x: Tensor, value: Tensor, grad: Tensor, trial: Tensor) -> Tensor:
    # Sufficient decrease along the projection arc (Bertsekas 1982, eq. 31 simplified).
    return value - _objective(a, b, trial) >= _ARMIJO * ((x - trial) * grad).sum(-1)


def _residual(x: Tensor, grad: Tensor) -> Tensor:
    # Natural KKT residual |min(x, ∇f)|, relative to the size of the multipliers: with dependent
    # gradients and reg_eps = 0 they are not unique and can be large.
    return torch.minimum(x, grad).abs().amax(-1) / x.abs().amax(-1).clamp(min=1.0)


def _solve_box_qp(a: Tensor, b: Tensor, *, tol: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """``argmin_{x ≥ 0} ½ xᵀAx + bᵀx`` for each row of ``b`` ``[m, k]`` (A PSD, shared), and
    each row's KKT residual. Once every row is within ``tol``, the rows stay put."""
    m, k = b.shape
    x = torch.zeros_like(b)
    eye = torch.eye(k, dtype=a.dtype, device=a.device)
    diagonal = a.diagonal().clamp(min=torch.finfo(a.dtype).tiny)
    # A tiny ridge on the Newton matrix only: keeps the reduced system solvable when
    # reg_eps = 0 and the gradients are dependent; the line search keeps the method convergent.
    damping = 1e-12 * eye
    steps = 0.5 ** torch.arange(_HALVINGS, dtype=a.dtype, device=a.device)
    rows = torch.arange(m, device=a.device)
    stop = EarlyStop(a.device)
    grad = b  # at x = 0
    residual = _residual(x, grad)
    for _ in range(max_iter):
        done = (residual <= tol).all()
        if stop(done):
            break
        threshold = residual.clamp(max=_ACTIVE_EPS).unsqueeze(-1)
        free = ~((x <= threshold) & (grad > 0))
        both = free.unsqueeze(-1) & free.unsqueeze(-2)
        reduced = torch.where(both, a + damping, eye)
        newton, _ = torch.linalg.solve_ex(reduced, torch.where(free, grad, 0.0))
        direction = torch.where(free, -newton, -grad / diagonal)
        value = _objective(a, b, x)
        full = (x + direction).clamp(min=0)
        if read_if_free(_armijo(a, b, x, value, grad, full).all()):
            step = full  # the usual case, and the first trial below anyway
        else:
            trial = (x + steps[:, None, None] * direction).clamp(min=0)  # [J, m, k]
            accepted = _armijo(a, b, x, value, grad, trial)
            # The largest accepted step; if none is accepted, the smallest one.
            first = torch.where(accepted.any(0), accepted.to(torch.int8).argmax(0), _HALVINGS - 1)
            step = trial[first, rows]
        x = torch.where(done, x, step)
        grad = x @ a + b
        residual = _residual(x, grad)
    return x, residual
