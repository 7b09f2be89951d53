"""``multimnist``: the left and the right digit of MultiMNIST, built from the MNIST files as
Sener & Koltun built it, with their LeNet and recipe.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
arXiv:1810.04650, Appendix C and their code (github.com/isl-org/MultiObjectiveOptimization):

* data: :func:`~experiments.benchmarks.datasets.multimnist_dataset` (every MNIST image with a
  random partner of its split on a 36×36 canvas, resized to 28×28; train from MNIST's 60 000
  training images, test from the 10 000 of ``t10k``), normalised with MNIST's mean and std;
* model: :class:`~experiments.benchmarks.networks.MultiLeNet` (LeNet trunk, an MLP head per
  digit);
* metric: test accuracy per task (their Table 3);
* recipe: SGD with momentum 0.9, lr 0.05, batch 256, 100 epochs, lr × 0.85 every 10 epochs
  (their ``train_multi_task.py``; optimizer, lr and batch from the maintainers' answers in the
  repository's issues #9 and #14), test batches of 100.

Deviation: they keep the model of the epoch with the best validation accuracy; the scripts
here report the final epoch. Table 3 has no error bars; their single-task row is the published
reference of ``python -m experiments.reproduce multimnist``, while ``compare`` trains its own
single-task networks (the reference here is empty).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments.benchmarks.base import DataError, Metric, Recipe
from experiments.benchmarks.classification import ClassificationBenchmark
from experiments.benchmarks.datasets import MNIST_SOURCE, MultiMNISTDataset, multimnist_dataset
from experiments.benchmarks.networks import MultiLeNet

__all__ = ["MultiMNIST"]

TASKS = ("left", "right")


class MultiMNIST(ClassificationBenchmark):
    """MultiMNIST (see the module docstring). Options: ``seed`` (0) of the partner draw,
    ``dropout`` (0.5) of the LeNet."""

    name = "multimnist"
    tasks = TASKS
    metrics: Mapping[str, Metric] = {f"{t}/acc": Metric(True, "fraction") for t in TASKS}
    recipe = Recipe(
        optimizer="sgd",
        lr=0.05,
        epochs=100,
        batch_size=256,
        eval_batch_size=100,
        options={"momentum": 0.9},
        milestones=tuple(range(10, 100, 10)),
        gamma=0.85,
        source="Sener & Koltun's train_multi_task.py and issues #9, #14",
    )
    source = MNIST_SOURCE

    def __init__(self, data_dir: str | None = None, *, seed: int = 0, dropout: float = 0.5):
        if data_dir is None:
            raise DataError(f"the multimnist benchmark needs --data-dir. {MNIST_SOURCE}")
        self.root = Path(data_dir)
        self.seed = seed
        self.dropout = dropout
        self._splits: dict[str, MultiMNISTDataset] = {}

    def dataset(self, split: str) -> MultiMNISTDataset:
        self.check_split(split)
        if split not in self._splits:  # built once: the overlay of 60 000 images takes seconds
            self._splits[split] = multimnist_dataset(self.root, split, seed=self.seed)
        return self._splits[split]

    def model(self, tasks: Sequence[str] | None = None) -> MultiLeNet:
        return MultiLeNet(tasks or self.tasks, dropout=self.dropout)
