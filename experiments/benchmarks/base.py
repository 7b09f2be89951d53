"""The benchmark protocol: what a multi-task benchmark bundles, and what every script relies on.

A benchmark is a subclass of :class:`Benchmark` that sets its tasks, metrics, published
reference and training recipe, and implements four methods::

    class MyBenchmark(Benchmark):
        name = "mine"
        tasks = ("a", "b")
        metrics = {"a/acc": Metric(higher_is_better=True), "b/rmse": Metric(False)}
        recipe = Recipe(optimizer="adam", lr=1e-3, epochs=10, batch_size=32)

        def dataset(self, split): ...            # an item is (input, {task: target})
        def model(self, tasks=None): ...         # a MultiTaskModel over `tasks` (all by default)
        def losses(self, outputs, targets): ...  # {task: scalar} for the tasks in `outputs`
        def evaluator(self, tasks=None): ...     # an Evaluator of the metrics of `tasks`

``model``, ``losses`` and ``evaluator`` take a subset of the tasks so that a script can train
single-task baselines (one network per task) with the same code.
"""

from __future__ import annotations

import abc
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import taskbalance as tb

__all__ = [
    "Benchmark",
    "DataError",
    "Evaluator",
    "Metric",
    "MultiTaskModel",
    "Recipe",
    "Reference",
    "delta_m",
    "require_file",
]


class DataError(FileNotFoundError):
    """Benchmark data missing or malformed: the message names the file and where the data
    comes from."""


def require_file(path: Path, source: str) -> Path:
    """``path`` if it exists, else a :class:`DataError` naming it and the data's ``source``."""
    if not path.exists():
        raise DataError(f"{path} not found: expected {path.name} there. {source}")
    return path


@dataclass(frozen=True)
class Metric:
    """How a metric compares: Δm% counts ``(−1)^{lower is better}`` of its relative change."""

    higher_is_better: bool
    unit: str = ""


@dataclass(frozen=True)
class Reference:
    """Published single-task values for Δm% (``{metric: value}``) and where they come from.

    An empty reference (the default) means "none published": ``compare`` then trains the
    single-task baselines itself."""

    values: Mapping[str, float] = field(default_factory=dict)
    source: str = ""

    def __bool__(self) -> bool:
        return bool(self.values)


@dataclass(frozen=True)
class Recipe:
    """The source paper's training recipe.

    The learning rate is multiplied by ``gamma`` after each epoch listed in ``milestones``
    (PyTorch's ``MultiStepLR``, stepped once per epoch). ``optimizer`` is a name for
    :func:`taskbalance.make_optimizer`; ``options`` its other keyword arguments.
    ``eval_batch_size`` is the test batch size (default: ``batch_size``): it matters where a
    metric is averaged over test batches.
    """

    optimizer: str
    lr: float
    epochs: int
    batch_size: int
    options: Mapping[str, Any] = field(default_factory=dict)
    eval_batch_size: int | None = None
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    augmentation: str = "none"
    source: str = ""

    def make_optimizer(
        self, params: Iterable[nn.Parameter], lr: float | None = None
    ) -> torch.optim.Optimizer:
        return tb.make_optimizer(self.optimizer, params, lr=lr or self.lr, **self.options)

    def make_scheduler(
        self, optimizer: torch.optim.Optimizer
    ) -> torch.optim.lr_scheduler.MultiStepLR:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(self.milestones), self.gamma)


class MultiTaskModel(nn.Module):
    """A shared ``trunk`` and one module per task in ``heads``.

    ``forward(x)`` returns ``(features, {task: output})``: ``features`` is the one tensor every
    task's output is computed from (a gradient-level strategy's ``features=``), and
    :meth:`shared_parameters` its ``shared_params=``.
    """

    trunk: nn.Module
    heads: nn.ModuleDict

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())


class Evaluator(Protocol):
    """Accumulates test metrics over batches: ``update`` per batch, ``compute`` at the end."""

    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None: ...

    def compute(self) -> dict[str, float]: ...


class Benchmark(abc.ABC):
    """A multi-task benchmark: tasks, data, model, losses, evaluator, reference and recipe."""

    name: str = ""
    tasks: tuple[str, ...] = ()
    metrics: Mapping[str, Metric] = {}
    reference: Reference = Reference()
    recipe: Recipe
    splits: tuple[str, ...] = ("train", "test")
    # Where the data comes from (named by every missing-data error) and what it needs on disk.
    source: str = ""

    @abc.abstractmethod
    def dataset(self, split: str) -> Dataset[Any]:
        """The ``split`` (one of :attr:`splits`); an item is ``(input, {task: target})``."""

    @abc.abstractmethod
    def model(self, tasks: Sequence[str] | None = None) -> MultiTaskModel:
        """A freshly initialised model with a head for each of ``tasks`` (all by default)."""

    @abc.abstractmethod
    def losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The training loss of every task in ``outputs``."""

    @abc.abstractmethod
    def evaluator(self, tasks: Sequence[str] | None = None) -> Evaluator:
        """A fresh evaluator of the metrics of ``tasks`` (all by default)."""

    def task_metrics(self, task: str) -> list[str]:
        """The metrics of ``task`` (named ``<task>/<metric>``)."""
        return [m for m in self.metrics if m.split("/", 1)[0] == task]

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"{self.name} has splits {self.splits}, not {split!r}")

    def delta_m(self, values: Mapping[str, float], single: Mapping[str, float]) -> float:
        """Δm% of ``values`` against the single-task ``single`` (see :func:`delta_m`)."""
        return delta_m(values, single, self.metrics)

    def describe(self) -> str:
        return f"{self.name}: tasks {', '.join(self.tasks)}; {len(self.metrics)} metrics"


def delta_m(
    values: Mapping[str, float], single: Mapping[str, float], metrics: Mapping[str, Metric]
) -> float:
    """Δm% of Maninis, Radosavovic & Kokkinos ("Attentive Single-Tasking of Multiple Tasks",
    CVPR 2019), over the metrics of ``single``:
    ``1/K Σ_k (−1)^{l_k} (M_k − S_k) / S_k · 100`` with ``l_k = 1`` where lower is better.

    The mean is over metrics, as in the CAGrad, Nash-MTL and FAMO code for NYUv2 and Cityscapes
    (not over tasks first). Positive is better than single-task; those papers print the
    negation (their Δm% is lower-is-better). NaN where a single-task value is 0.

    >>> m = {"a/acc": Metric(True), "b/err": Metric(False)}
    >>> round(delta_m({"a/acc": 0.9, "b/err": 0.5}, {"a/acc": 1.0, "b/err": 0.4}, m), 6)
    -17.5
    """
    terms = []
    for name, reference in single.items():
        if reference == 0:
            return math.nan  # a relative change from 0 is undefined
        sign = 1.0 if metrics[name].higher_is_better else -1.0
        terms.append(sign * (values[name] - reference) / reference * 100)
    return statistics.fmean(terms) if terms else math.nan
