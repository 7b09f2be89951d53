"""What the classification benchmarks share: in-memory data, cross-entropy, accuracy per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from experiments.benchmarks.base import Benchmark

__all__ = ["Accuracy", "ClassificationBenchmark", "TaskTensors", "cross_entropy_losses"]


class TaskTensors(Dataset[tuple[Tensor, dict[str, Tensor]]]):
    """Inputs ``[N, ...]`` and one target tensor ``[N, ...]`` per task, held in memory.

    ``__getitems__`` fetches a whole batch by one index operation per tensor (the DataLoader
    calls it instead of ``N`` ``__getitem__`` calls).

    >>> data = TaskTensors(torch.arange(6.0).view(3, 2), {"a": torch.tensor([0, 1, 2])})
    >>> x, y = data[1]
    >>> x.tolist(), int(y["a"]), len(data)
    ([2.0, 3.0], 1, 3)
    """

    def __init__(self, inputs: Tensor, targets: Mapping[str, Tensor]) -> None:
        for task, target in targets.items():
            if len(target) != len(inputs):
                raise ValueError(
                    f"task {task!r} has {len(target)} targets for {len(inputs)} inputs"
                )
        self.inputs = inputs
        self.targets = dict(targets)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.inputs[index], {t: y[index] for t, y in self.targets.items()}

    def __getitems__(self, indices: Sequence[int]) -> Any:
        index = torch.as_tensor(indices)
        return Collated((self.inputs[index], {t: y[index] for t, y in self.targets.items()}))


class Collated(tuple):  # type: ignore[type-arg]
    """A batch that is collated already (see :func:`experiments.training.collate`)."""


def cross_entropy_losses(
    outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Cross-entropy of every task's logits (``log_softmax`` + NLL, as in the papers' code)."""
    return {t: F.cross_entropy(logits.float(), targets[t]) for t, logits in outputs.items()}


class Accuracy:
    """Test accuracy per task (``<task>/acc``, a fraction): correct predictions over all
    examples of the test set (independent of the batching). Counts stay on the device; only
    :meth:`compute` reads them.

    >>> acc = Accuracy(["a"])
    >>> acc.update({"a": torch.tensor([[2.0, 1.0], [0.0, 3.0]])}, {"a": torch.tensor([0, 0])})
    >>> acc.compute()
    {'a/acc': 0.5}
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)
        self.reset()

    def reset(self) -> None:
        self.correct: dict[str, Tensor] = {}
        self.count = 0

    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
        for task in self.tasks:
            hits = (outputs[task].argmax(dim=1) == targets[task]).sum()
            self.correct[task] = self.correct.get(task, 0) + hits
        self.count += len(targets[self.tasks[0]])

    def compute(self) -> dict[str, float]:
        if not self.count:
            raise ValueError("Accuracy.compute() before any update()")
        values = torch.stack([self.correct[t] for t in self.tasks]).double() / self.count
        return {f"{t}/acc": v for t, v in zip(self.tasks, values.tolist())}


class ClassificationBenchmark(Benchmark):
    """A benchmark of classification tasks: cross-entropy per task, accuracy per task
    (``<task>/acc``). Subclasses give the data, the model and the rest of the protocol."""

    def losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        return cross_entropy_losses(outputs, targets)

    def evaluator(self, tasks: Sequence[str] | None = None) -> Accuracy:
        return Accuracy(tasks or self.tasks)
