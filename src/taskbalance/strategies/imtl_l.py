"""IMTL-L, the loss half of Impartial Multi-Task Learning (Liu et al., ICLR 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.loss_weighting import LossWeighting, present_rows
from taskbalance.registry import register_strategy

_PAPER = (
    "Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, 'Towards Impartial Multi-task Learning', "
    "ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr"
)


@register_strategy("imtl_l", paper=_PAPER)
class ImtlL(LossWeighting):
    """IMTL-L: learned loss scales that make every task's scaled loss constant.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021 (OpenReview IMPnRXEWpvr; no arXiv version), the loss-balancing part (IMTL-L).
    Each task has a learned
    ``s_i`` and the objective is

        ``Σ_i e^(s_i) · L_i − s_i``

    so the model's weights are ``e^(s_i)`` and ``s_i`` descends ``e^(s_i) L_i − 1``: its
    optimum ``s_i = −log L_i`` makes every scaled loss equal to 1, whatever the scale of the
    raw loss (the ``− s_i`` term keeps ``s`` from running to −∞). Unlike uncertainty weighting
    there is no ½ and the scaled loss, not its log-variance, is balanced.

    Choices:

    * ``s`` starts at ``init`` (0: every weight 1), as in the paper and LibMTL.
    * The paper (and LibMTL's ``IMTL`` with ``"hybrid"``/``"loss"``) trains ``s`` with the
      network's own optimizer and learning rate. Here ``s`` has its own Adam
      (``optimizer="sgd"`` is the other choice) with ``lr = 1e-3``, the same default as
      ``uncertainty``; pass the model's learning rate as ``lr`` to mirror the paper's setting.
    * The learned values are reported as ``scale`` (that is, ``s``).

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("imtl_l", tasks=["a", "b"])
        >>> s({"a": torch.tensor(2.0), "b": torch.tensor(0.5)})  # e^0·2 − 0 + e^0·0.5 − 0
        tensor(2.5000)
    """

    scale: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        init: float = 0.0,
    ) -> None:
        super().__init__(tasks)
        if not (isinstance(init, (int, float)) and abs(init) < float("inf")):
            raise StrategyError(f"init must be a finite number, got {init!r}")
        self.add_learned_parameter(
            "scale", torch.full((len(self.tasks),), float(init)), optimizer=optimizer, lr=lr
        )

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.exp(present_rows(self.scale, index))

    def objective(self, losses: Tensor, index: Tensor) -> Tensor:
        scale = present_rows(self.scale, index)
        return (torch.exp(scale) * losses - scale).sum()

    def objective_and_gradients(
        self, losses: Tensor, index: Tensor, weights: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        weighted = weights * losses
        value = (weighted - present_rows(self.scale, index)).sum()
        # ∂/∂s_i of e^(s_i)·L_i − s_i is w_i·L_i − 1
        return value, {"scale": weighted - 1.0}

    def extras(self, index: Tensor) -> dict[str, Tensor]:
        return {"scale": self.scale.detach()[index]}
