"""What one training step did: :class:`StepReport`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["StepReport"]


@dataclass(frozen=True)
class StepReport:
    """What one step did, kept as tensors so that building it never syncs with the device.

    ``loss_values`` and ``weight_values`` hold one entry per task in ``tasks`` (the tasks present
    in this step, in the strategy's order). ``extras`` holds further per-task vectors that a
    strategy wants to log (for example ``"log_var"``), ``scalars`` single values about the step
    (``"failed"`` and ``"failures"`` for strategies with an ``on_failure`` policy, see
    :class:`GradientAggregation`). Converting to Python floats happens only in :meth:`to_dict`.
    """

    tasks: tuple[str, ...]
    loss_values: Tensor
    weight_values: Tensor
    extras: Mapping[str, Tensor] = field(default_factory=dict)
    scalars: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def losses(self) -> dict[str, Tensor]:
        return dict(zip(self.tasks, self.loss_values.unbind()))

    @property
    def weights(self) -> dict[str, Tensor]:
        return dict(zip(self.tasks, self.weight_values.unbind()))

    def entries(self) -> list[tuple[str, str | None, float]]:
        """Every value as ``(name, task, value)``: ``name`` is ``"loss"``, ``"weight"``, an extra
        or a scalar; ``task`` is ``None`` for a scalar. The one place that copies to the host
        (a single transfer for all values); :meth:`to_dict` and loggers build their keys from it.

            >>> import torch
            >>> report = StepReport(("a",), torch.tensor([0.5]), torch.tensor([2.0]))
            >>> report.entries()
            [('loss', 'a', 0.5), ('weight', 'a', 2.0)]
        """
        groups = {"loss": self.loss_values, "weight": self.weight_values, **self.extras}
        parts = [v.detach().reshape(-1).float() for v in (*groups.values(), *self.scalars.values())]
        flat = iter(torch.cat(parts).tolist())
        out: list[tuple[str, str | None, float]] = [
            (name, task, next(flat)) for name in groups for task in self.tasks
        ]
        out.extend((name, None, next(flat)) for name in self.scalars)
        return out

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Floats keyed ``{prefix}loss/<task>``, ``{prefix}weight/<task>``,
        ``{prefix}<extra>/<task>`` and ``{prefix}<scalar>`` (see :meth:`entries`)."""
        return {
            prefix + (name if task is None else f"{name}/{task}"): value
            for name, task, value in self.entries()
        }
