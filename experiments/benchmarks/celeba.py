"""``celeba``: the 40 binary face attributes of CelebA, as Sener & Koltun trained them.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
arXiv:1810.04650, and their code (github.com/isl-org/MultiObjectiveOptimization):

* data: the official CelebA files (Liu, Luo, Wang & Tang, ICCV 2015):
  :func:`~experiments.benchmarks.datasets.celeba_dataset` (aligned images at 64×64, their
  preprocessing; the official train / val / test partition);
* model: :class:`~experiments.benchmarks.networks.ResNet18` (their CIFAR-style ResNet-18 trunk,
  a linear 2-way classifier per attribute);
* metric: accuracy per attribute (``<attribute>/acc``); Sener & Koltun report the error per
  attribute, FAMO (Liu et al., NeurIPS 2023, arXiv:2306.03792) the mean error and mean rank
  over the 40;
* recipe: Adam, lr 5e-4, batch 256, 100 epochs, lr × 0.85 every 10 epochs (their
  ``sample.json``, ``configs.json`` and ``train_multi_task.py``).

Deviations: they report the validation partition (also used for model selection); the
scripts here evaluate on the test partition (``splits`` has all three). No single-task
reference is published for this network: ``compare`` trains one network per attribute (40;
``--baselines off`` skips them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments.benchmarks.base import DataError, Metric, Recipe
from experiments.benchmarks.classification import ClassificationBenchmark
from experiments.benchmarks.datasets import (
    CELEBA_ATTRIBUTES,
    CELEBA_SOURCE,
    CelebADataset,
    celeba_dataset,
)
from experiments.benchmarks.networks import ResNet18

__all__ = ["CelebA"]


class CelebA(ClassificationBenchmark):
    """CelebA, 40 tasks (see the module docstring). Options: ``size`` (64) of the images,
    ``width`` (1.0) of the ResNet."""

    name = "celeba"
    tasks = CELEBA_ATTRIBUTES
    metrics: Mapping[str, Metric] = {
        f"{t}/acc": Metric(True, "fraction") for t in CELEBA_ATTRIBUTES
    }
    recipe = Recipe(
        optimizer="adam",
        lr=5e-4,
        epochs=100,
        batch_size=256,
        milestones=tuple(range(10, 100, 10)),
        gamma=0.85,
        source="Sener & Koltun's sample.json, configs.json and train_multi_task.py",
    )
    splits = ("train", "val", "test")
    source = CELEBA_SOURCE

    def __init__(self, data_dir: str | None = None, *, size: int = 64, width: float = 1.0):
        if data_dir is None:
            raise DataError(f"the celeba benchmark needs --data-dir. {CELEBA_SOURCE}")
        self.root = Path(data_dir)
        self.size = size
        self.width = width

    def dataset(self, split: str) -> CelebADataset:
        self.check_split(split)
        return celeba_dataset(self.root, split, size=self.size)

    def model(self, tasks: Sequence[str] | None = None) -> ResNet18:
        return ResNet18(tasks or self.tasks, width=self.width, image_size=self.size)
