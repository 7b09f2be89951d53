"""Synthetic problems from the papers that the reproductions re-run.

* :func:`kendall_data`, :class:`KendallNet`: the regression example of Kendall, Gal & Cipolla
  (CVPR 2018, arXiv:1705.07115) from the authors' public example notebook.
* :func:`gradnorm_problem`, :class:`GradNormNet`: the synthetic regression tasks of GradNorm
  (Chen et al., ICML 2018, arXiv:1711.02257, Sec. 4).
* :func:`cagrad_losses`: the two-objective toy of CAGrad (Liu et al., NeurIPS 2021,
  arXiv:2110.14048, Sec. 5.1) as in the official ``toy.py``; ``scale`` gives the variant of the
  Nash-MTL and FAMO code (first loss times 0.1).

Everything here is deterministic given its seed and has no dependence on taskbalance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "CAGRAD_LOWER",
    "CAGRAD_STARTS",
    "FAMO_STARTS",
    "PARETO_X2",
    "GradNormNet",
    "GradNormProblem",
    "KendallNet",
    "cagrad_losses",
    "distance_to_pareto",
    "gradnorm_problem",
    "kendall_data",
    "min_norm_two",
    "pareto_set",
]

# ----------------------------------------------------------------------------- Kendall et al.


def kendall_data(n: int = 100, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``x ~ N(0,1)``, ``y1 = 2x + 8 + 10ε₁``, ``y2 = 3x + 3 + ε₂``, each ``[n, 1]`` float32.

    Drawn with numpy's legacy generator seeded with ``seed`` in the order of the authors'
    notebook (x, then the noise of y1, then the noise of y2), so ``seed=0`` gives their data.
    """
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 1)
    y1 = 2.0 * x + 8.0 + 10.0 * rng.randn(n, 1)
    y2 = 3.0 * x + 3.0 + 1.0 * rng.randn(n, 1)
    return tuple(torch.from_numpy(a.astype(np.float32)) for a in (x, y1, y2))  # type: ignore[return-value]


class KendallNet(nn.Module):
    """``Linear(1, hidden)``-ReLU shared, two ``Linear(hidden, 1)`` heads (the authors' model)."""

    def __init__(self, hidden: int = 1024) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(1, hidden), nn.ReLU())
        self.head1 = nn.Linear(hidden, 1)
        self.head2 = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.trunk(x)
        return self.head1(z), self.head2(z)


# ----------------------------------------------------------------------------- GradNorm


@dataclass(frozen=True)
class GradNormProblem:
    """Inputs and targets of the GradNorm toy; targets are ``[n, T, out]``."""

    sigmas: Tensor
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def gradnorm_targets(x: Tensor, b: Tensor, eps: Tensor, sigmas: Tensor) -> Tensor:
    """``f_i(x) = σ_i tanh((B + ε_i) x)`` for every task: ``[n, T, out]``."""
    matrices = b.unsqueeze(0) + eps  # [T, out, in]
    return sigmas[None, :, None] * torch.tanh(torch.einsum("toi,ni->nto", matrices, x))


def gradnorm_problem(
    sigmas: Sequence[float],
    *,
    n_train: int = 10_000,
    n_test: int = 2_000,
    d_in: int = 250,
    d_out: int = 100,
    b_std: float = 10.0**0.5,
    eps_std: float = 3.5**0.5,
    seed: int = 0,
) -> GradNormProblem:
    """The GradNorm toy's data. ``B`` and ``ε_i`` have i.i.d. ``N(0, 10)`` and ``N(0, 3.5)``
    elements (read as variances); inputs are uniform on the unit sphere of ``R^d_in`` (the
    paper does not say; unit-norm inputs keep ``(B + ε_i)x`` of order one, so ``tanh`` does not
    saturate everywhere)."""
    generator = torch.Generator().manual_seed(seed)
    count = len(sigmas)
    b = torch.randn(d_out, d_in, generator=generator) * b_std
    eps = torch.randn(count, d_out, d_in, generator=generator) * eps_std
    sig = torch.tensor([float(s) for s in sigmas])

    def inputs(n: int) -> Tensor:
        x = torch.randn(n, d_in, generator=generator)
        return x / x.norm(dim=1, keepdim=True)

    x_train, x_test = inputs(n_train), inputs(n_test)
    return GradNormProblem(
        sig,
        x_train,
        gradnorm_targets(x_train, b, eps, sig),
        x_test,
        gradnorm_targets(x_test, b, eps, sig),
    )


class GradNormNet(nn.Module):
    """Four 100-unit ReLU layers shared, one affine head per task (Sec. 4 of the paper)."""

    def __init__(self, tasks: int, d_in: int = 250, d_out: int = 100, width: int = 100) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, d_out) for _ in range(tasks))

    @property
    def last_shared(self) -> list[nn.Parameter]:
        """The last shared layer's parameters: GradNorm's ``W``."""
        return list(self.trunk[-2].parameters())

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z) for head in self.heads]


# ----------------------------------------------------------------------------- CAGrad toy

CAGRAD_LOWER = 5e-6
PARETO_X2 = -8.3552  # the Pareto set is x2 ≈ -8.3552, x1 in [-7, 7]; mean-loss optimum x1 = 0
CAGRAD_STARTS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
FAMO_STARTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (0.0, 0.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)


def cagrad_losses(theta: Tensor, scale: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """The two losses ``[..., 2]`` of the CAGrad toy at ``theta`` ``[..., 2]``.

    As in the official ``toy.py`` (its f₂ has ``+ tanh(−θ₂) + 2``; the paper's text prints a
    minus): for ``θ₂ > 0`` the losses are logs of absolute values clamped at ``LOWER = 5e-6``,
    for ``θ₂ < 0`` quadratics; ``c₁ = max(tanh(θ₂/2), 0)``, ``c₂ = max(tanh(−θ₂/2), 0)`` blend
    them. ``scale`` multiplies each loss (Nash-MTL/FAMO: ``(0.1, 1)``).

        >>> import torch
        >>> cagrad_losses(torch.tensor([0.0, -8.3552])).round(decimals=3)
        tensor([-15.0920, -15.0920])
    """
    x1, x2 = theta[..., 0], theta[..., 1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), CAGRAD_LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), CAGRAD_LOWER).log() + 6
    c1 = torch.clamp(torch.tanh(x2 * 0.5), 0)
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    g1 = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    g2 = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    l1 = (f1 * c1 + g1 * c2) * scale[0]
    l2 = (f2 * c1 + g2 * c2) * scale[1]
    return torch.stack([l1, l2], dim=-1)


def min_norm_two(g1: Tensor, g2: Tensor) -> Tensor:
    """``min_{a in [0,1]} ‖a g1 + (1−a) g2‖`` over the last dimension: 0 at Pareto-stationary
    points, so it measures how far a point is from the Pareto set."""
    diff = g1 - g2
    denom = (diff * diff).sum(-1).clamp_min(1e-20)
    a = ((g2 - g1) * g2).sum(-1).div(denom).clamp(0, 1).unsqueeze(-1)
    return (a * g1 + (1 - a) * g2).norm(dim=-1)


def pareto_set(points: int = 1401, iterations: int = 40) -> Tensor:
    """Points ``[points, 2]`` (float64) of the toy's Pareto set, ``x1`` evenly in ``[−7, 7]``.

    For ``θ₂ < 0`` the losses are ``c₂(θ₂)·g_i(θ)``; a Pareto-stationary point has
    ``a∇L₁ + (1−a)∇L₂ = 0`` for some ``a`` in [0, 1]. The ``θ₁`` component fixes
    ``a = (θ₁ + 7)/14``; the ``θ₂`` component is then solved by bisection on ``[−9.5, −8]``,
    where it changes sign. Scaling a loss (the FAMO variant) changes ``a``, not the set.
    """
    x1 = torch.linspace(-7.0, 7.0, points, dtype=torch.float64)
    a = (x1 + 7) / 14
    low = torch.full_like(x1, -9.5)
    high = torch.full_like(x1, -8.0)

    def slope(x2: Tensor) -> Tensor:
        x2 = x2.clone().requires_grad_(True)
        losses = cagrad_losses(torch.stack([x1, x2], dim=-1))
        combined = (a * losses[:, 0] + (1 - a) * losses[:, 1]).sum()
        (grad,) = torch.autograd.grad(combined, x2)
        return grad

    low_sign = slope(low).sign()
    for _ in range(iterations):
        middle = (low + high) / 2
        same = slope(middle).sign() == low_sign
        low = torch.where(same, middle, low)
        high = torch.where(same, high, middle)
    return torch.stack([x1, (low + high) / 2], dim=-1)


def distance_to_pareto(theta: Tensor, front: Tensor | None = None) -> Tensor:
    """Euclidean distance of each point ``[..., 2]`` to the Pareto set (a dense polyline)."""
    front = pareto_set() if front is None else front
    flat = theta.detach().reshape(-1, 2).to(front.dtype)
    distances = torch.cdist(flat, front).min(dim=1).values
    return distances.reshape(theta.shape[:-1]).to(theta.dtype)
