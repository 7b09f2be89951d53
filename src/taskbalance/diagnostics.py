"""Gradient-conflict diagnostics: how the task gradients relate to each other.

Two measures of a pair of task gradients ``g_i, g_j``, both from the Gramian ``G = J Jᵀ`` of the
Jacobian ``J`` ``[T, P]`` (row ``i`` = the gradient of task ``i``), so they cost ``T²`` numbers
once the Jacobian or the Gramian exists:

* cosine similarity ``g_i·g_j / (‖g_i‖‖g_j‖)``: negative means the tasks conflict (Yu et al.,
  "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, arXiv:2001.06782, Definition 1);
* gradient-magnitude similarity ``2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²)`` (same paper, Definition 2):
  1 for equal norms, near 0 when one gradient dwarfs the other.

Conventions for zero gradients (the formulas divide by zero): the cosine with a zero gradient is
0 (no direction, no conflict); the magnitude similarity of two zero gradients is 1 (equal norms).

>>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
>>> cosine_similarity(J)
tensor([[ 1.0000, -0.7071],
        [-0.7071,  1.0000]])
>>> magnitude_similarity(J)
tensor([[1.0000, 0.9428],
        [0.9428, 1.0000]])
>>> logged = gradient_diagnostics(J, ["seg", "depth"])
>>> sorted(logged)
['grad/cos/seg-depth', 'grad/mag_sim/seg-depth', 'grad/norm/depth', 'grad/norm/seg']
>>> round(logged["grad/cos/seg-depth"], 4), round(logged["grad/norm/depth"], 4)
(-0.7071, 1.4142)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["cosine_similarity", "gradient_diagnostics", "magnitude_similarity"]


def _gramian(jacobian: Tensor | None, gramian: Tensor | None) -> Tensor:
    if (jacobian is None) == (gramian is None):
        raise ValueError("pass exactly one of jacobian= ([T, P]) or gramian= ([T, T])")
    if jacobian is not None:
        if jacobian.dim() != 2:
            raise ValueError(
                f"jacobian must be 2-D [tasks, parameters], got {tuple(jacobian.shape)}"
            )
        return jacobian @ jacobian.mT
    assert gramian is not None
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"gramian must be square [tasks, tasks], got {tuple(gramian.shape)}")
    return gramian


def cosine_similarity(
    jacobian: Tensor | None = None, *, gramian: Tensor | None = None, eps: float = 1e-12
) -> Tensor:
    """Pairwise cosine similarity ``[T, T]`` of the task gradients (rows of ``jacobian``), or from
    their Gramian. Norms below ``eps`` count as zero (cosine 0 off the diagonal)."""
    g = _gramian(jacobian, gramian)
    norms = g.diagonal().clamp(min=0).sqrt()
    outer = norms[:, None] * norms[None, :]
    cosine = torch.where(outer > eps * eps, g / outer.clamp(min=eps * eps), torch.zeros_like(g))
    cosine = cosine.clamp(-1.0, 1.0)
    # A gradient is parallel to itself, zero or not.
    return cosine.fill_diagonal_(1.0)


def magnitude_similarity(
    jacobian: Tensor | None = None, *, gramian: Tensor | None = None, eps: float = 1e-24
) -> Tensor:
    """Pairwise gradient-magnitude similarity ``2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²)``, ``[T, T]``."""
    g = _gramian(jacobian, gramian)
    squared = g.diagonal().clamp(min=0)
    norms = squared.sqrt()
    denominator = squared[:, None] + squared[None, :]
    similarity = 2 * norms[:, None] * norms[None, :] / denominator.clamp(min=eps)
    return torch.where(denominator > eps, similarity, torch.ones_like(similarity))


def gradient_diagnostics(
    jacobian: Tensor | None = None,
    tasks: Sequence[str] = (),
    *,
    gramian: Tensor | None = None,
    prefix: str = "grad/",
) -> dict[str, float]:
    """Flat floats for logging, one host transfer for all of them.

    Keys: ``{prefix}cos/<a>-<b>`` and ``{prefix}mag_sim/<a>-<b>`` for every pair ``a`` before
    ``b`` in ``tasks`` order, and ``{prefix}norm/<task>`` (the gradient norms).
    """
    g = _gramian(jacobian, gramian).detach()
    tasks = list(tasks)
    if len(tasks) != g.shape[0]:
        raise ValueError(f"{g.shape[0]} task gradients but {len(tasks)} task names {tasks}")
    rows, cols = torch.triu_indices(len(tasks), len(tasks), offset=1, device=g.device)
    values = torch.cat(
        [
            cosine_similarity(gramian=g)[rows, cols],
            magnitude_similarity(gramian=g)[rows, cols],
            g.diagonal().clamp(min=0).sqrt(),
        ]
    )
    flat = values.double().tolist()  # the single device-to-host copy
    pairs = [f"{a}-{b}" for i, a in enumerate(tasks) for b in tasks[i + 1 :]]  # triu order
    out: dict[str, float] = {}
    count = len(pairs)
    for k, pair in enumerate(pairs):
        out[f"{prefix}cos/{pair}"] = flat[k]
        out[f"{prefix}mag_sim/{pair}"] = flat[count + k]
    for k, task in enumerate(tasks):
        out[f"{prefix}norm/{task}"] = flat[2 * count + k]
    return out
