"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from taskbalance.errors import StrategyError
from taskbalance.loss_weighting import LossWeighting, present_rows
from taskbalance.registry import register_strategy

_FACTORS = {"regression": 0.5, "classification": 1.0}


@register_strategy(
    "uncertainty",
    paper="Kendall, Gal & Cipolla, 'Multi-Task Learning Using Uncertainty to Weigh Losses for "
    "Scene Geometry and Semantics', CVPR 2018, arXiv:1705.07115",
)
class Uncertainty(LossWeighting):
    """Learned task uncertainty: each task has ``s_i = log σ_i²``, learned with the model.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018, arXiv:1705.07115. From the paper's eq. 7 (Gaussian
    likelihood) and eq. 10 (softmax likelihood with its approximation), with ``s = log σ²``:

    * regression:      ``½·e^(−s)·L + ½·s``
    * classification:  ``e^(−s)·L + ½·s``

    so the weights are ``½·e^(−s)`` and ``e^(−s)``. ``task_types`` maps a task to
    ``"regression"`` (the default) or ``"classification"``.

    Constants in other code: the authors' public example uses ``e^(−s)·L + s`` for every task,
    LibMTL ``L/(2e^s) + s/2`` for every task with ``s₀ = −0.5``, the Nash-MTL code
    ``½(e^(−s)·L + s)``. All of these and the regression form here have the same optimum
    ``s* = log L`` (the classification form: ``log 2L``) but a different gradient scale; with
    Adam (the default here) the step barely depends on that scale.

    ``s`` is trained by the strategy itself with Adam (``optimizer="sgd"`` is the other choice),
    learning rate ``lr`` (default 1e-3, the authors' example), starting at ``init`` (0, σ = 1).
    The learned values are reported as ``log_var``.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("uncertainty", tasks=["depth", "seg"],
        ...                        task_types={"seg": "classification"})
        >>> losses = {"depth": torch.tensor(2.0, requires_grad=True),
        ...           "seg": torch.tensor(1.0, requires_grad=True)}
        >>> s(losses)  # ½·2 + 0 + 1·1 + 0 at s = 0
        tensor(2., grad_fn=<AddBackward0>)
    """

    factors: Tensor
    log_var: nn.Parameter

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        task_types: Mapping[str, str] | None = None,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        init: float = 0.0,
    ) -> None:
        super().__init__(tasks)
        task_types = dict(task_types or {})
        unknown = sorted(set(task_types) - set(self.tasks))
        if unknown:
            raise StrategyError(
                f"task_types names unknown tasks {unknown}; tasks are {list(self.tasks)}"
            )
        for task, kind in task_types.items():
            if kind not in _FACTORS:
                raise StrategyError(
                    f"task_types[{task!r}] must be 'regression' or 'classification', got {kind!r}"
                )
        factors = [_FACTORS[task_types.get(t, "regression")] for t in self.tasks]
        self.register_buffer("factors", torch.tensor(factors), persistent=False)
        self.add_learned_parameter(
            "log_var", torch.full((len(self.tasks),), float(init)), optimizer=optimizer, lr=lr
        )

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        factors, log_var = present_rows(self.factors, index), present_rows(self.log_var, index)
        return factors * torch.exp(-log_var)

    def objective(self, losses: Tensor, index: Tensor) -> Tensor:
        log_var = present_rows(self.log_var, index)
        return (self.loss_weights(losses, index) * losses + 0.5 * log_var).sum()

    def objective_and_gradients(
        self, losses: Tensor, index: Tensor, weights: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        weighted = weights * losses
        value = torch.add(weighted, present_rows(self.log_var, index), alpha=0.5).sum()
        # ∂/∂s_i of f_i·e^(−s_i)·L_i + ½·s_i is −w_i·L_i + ½
        return value, {"log_var": 0.5 - weighted}

    def extras(self, index: Tensor) -> dict[str, Tensor]:
        return {"log_var": self.log_var.detach()[index]}
