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
    :class:`GradientAggregation`; ``"skipped"`` with ``check_finite = False``: 1 in a step that
    failed a check or overflowed, whose state updates were undone, see :class:`Strategy`).
    Converting to Python floats happens only in :meth:`to_dict`.
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
        return [
            (name, task, value) for (name, task), value in zip(self._names(), self._flat().tolist())
        ]

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Floats keyed ``{prefix}loss/<task>``, ``{prefix}weight/<task>``,
        ``{prefix}<extra>/<task>`` and ``{prefix}<scalar>`` (see :meth:`entries`)."""
        return {_key(prefix, name, task): value for name, task, value in self.entries()}

    def to_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """:meth:`to_dict` with 0-d float32 tensors on the report's device: for loggers that
        convert what they write themselves (Lightning's ``log_dict``), no host sync per step."""
        values = self._flat().unbind()
        return {_key(prefix, name, task): v for (name, task), v in zip(self._names(), values)}

    def _names(self) -> list[tuple[str, str | None]]:
        groups = ("loss", "weight", *self.extras)
        names: list[tuple[str, str | None]] = [(g, task) for g in groups for task in self.tasks]
        return names + [(name, None) for name in self.scalars]

    def _flat(self) -> Tensor:
        groups = (self.loss_values, self.weight_values, *self.extras.values())
        parts = [v.detach().reshape(-1).float() for v in (*groups, *self.scalars.values())]
        return torch.cat(parts)


def _key(prefix: str, name: str, task: str | None) -> str:
    return prefix + (name if task is None else f"{name}/{task}")
