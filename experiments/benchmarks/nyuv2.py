"""``nyuv2``: 13-class segmentation, depth and surface normals on NYUv2 (MTAN's preprocessing).

The benchmark of the MTAN, CAGrad, Nash-MTL and FAMO papers, as their code runs it:

* data: the preprocessed ``.npy`` files of the MTAN repository (795 train / 654 test images,
  288×384; :func:`~experiments.benchmarks.datasets.nyuv2_dataset`), random scale crop and
  horizontal flip on the training split;
* model: SegNet-MTAN (``model="mtan"``, the default) or the split SegNet (``model="segnet"``)
  of :mod:`~experiments.benchmarks.networks`; ``width`` scales every channel count (1.0 is the
  papers' network; smaller for quick checks);
* losses (:mod:`~experiments.benchmarks.dense`): cross-entropy ignoring −1, L1 on valid depth,
  1 − cosine on valid normals;
* metrics: mIoU and pixel accuracy over the test set, depth absolute and relative error, normal
  angle error (mean, median, share within 11.25°, 22.5°, 30°), with the code's conventions
  (:mod:`~experiments.benchmarks.dense` says which are averaged over test batches of 2);
* recipe: Adam, lr 1e-4 halved after epoch 100, 200 epochs, batch 2 (CAGrad's
  ``nyuv2/model_segnet_mtan.py``, kept by Nash-MTL's ``experiments/nyuv2/trainer.py``).

The single-task reference is the STL row of CAGrad (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021,
arXiv:2110.14048, Table 2), reused as ``BASE`` by Nash-MTL's ``delta_fn`` (Navon et al., ICML
2022, arXiv:2202.01017) and by FAMO. Those papers report each metric averaged over the last 10
epochs (Nash-MTL's README); the scripts here report the final epoch.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from experiments.benchmarks.base import (
    Benchmark,
    DataError,
    Evaluator,
    Metric,
    MultiTaskModel,
    Recipe,
    Reference,
)
from experiments.benchmarks.datasets import NYUV2_SOURCE, DenseNpyDataset, nyuv2_dataset
from experiments.benchmarks.dense import (
    DepthMetrics,
    Evaluators,
    NormalMetrics,
    SegmentationMetrics,
    depth_loss,
    normal_loss,
    segmentation_loss,
)
from experiments.benchmarks.networks import SegNet, SegNetMTAN

__all__ = ["DenseBenchmark", "NYUv2", "cagrad_recipe"]

LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "segmentation": segmentation_loss,
    "depth": depth_loss,
    "normal": normal_loss,
}
MODELS = {"mtan": SegNetMTAN, "segnet": SegNet}
FRACTION, DEGREES = "fraction", "degrees"
DENSE_METRICS = {
    "segmentation/miou": Metric(True, FRACTION),
    "segmentation/pixel_acc": Metric(True, FRACTION),
    "depth/abs_err": Metric(False),
    "depth/rel_err": Metric(False),
    "normal/mean": Metric(False, DEGREES),
    "normal/median": Metric(False, DEGREES),
    "normal/within_11.25": Metric(True, FRACTION),
    "normal/within_22.5": Metric(True, FRACTION),
    "normal/within_30": Metric(True, FRACTION),
}


def cagrad_recipe(*, batch_size: int, flip: str, source: str) -> Recipe:
    """The recipe of CAGrad's (and Nash-MTL's) dense benchmarks: Adam 1e-4 halved after epoch
    100, 200 epochs, test batches of the training batch size, random scale crop and flip."""
    return Recipe(
        optimizer="adam",
        lr=1e-4,
        epochs=200,
        batch_size=batch_size,
        milestones=(100,),
        gamma=0.5,
        augmentation=f"random scale crop (1.0, 1.2, 1.5; depth divided by the scale) and {flip}",
        source=source,
    )


class DenseBenchmark(Benchmark):
    """What NYUv2 and Cityscapes share: dense tasks named by their kind, the MTAN ``.npy``
    layout, SegNet(-MTAN), the dense losses and evaluators. Subclasses set the class attributes
    and :meth:`_read`."""

    classes: int
    splits = ("train", "test")

    def __init__(
        self,
        data_dir: str | None = None,
        *,
        model: str = "mtan",
        width: float = 1.0,
        augment: bool = True,
    ) -> None:
        if data_dir is None:
            raise DataError(f"the {self.name} benchmark needs --data-dir. {self.source}")
        if model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, not {model!r}")
        self.root = Path(data_dir)
        self.architecture = model
        self.width = width
        self.augment = augment

    @abc.abstractmethod
    def _read(self, split: str, augment: bool) -> DenseNpyDataset:
        """The MTAN folder ``split`` ("train" or "val") of this benchmark."""

    def dataset(self, split: str) -> DenseNpyDataset:
        """``train`` (augmented unless ``augment=False``) or ``test`` (the files' ``val``)."""
        self.check_split(split)
        folder = "train" if split == "train" else "val"
        return self._read(folder, self.augment and split == "train")

    def model(self, tasks: Sequence[str] | None = None) -> MultiTaskModel:
        kinds = {t: t for t in tasks or self.tasks}
        return MODELS[self.architecture](kinds, classes=self.classes, width=self.width)

    def losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        return {t: LOSSES[t](output, targets[t]) for t, output in outputs.items()}

    def evaluator(self, tasks: Sequence[str] | None = None) -> Evaluator:
        parts: dict[str, Any] = {
            "segmentation": lambda: SegmentationMetrics(self.classes),
            "depth": DepthMetrics,
            "normal": NormalMetrics,
        }
        return Evaluators(parts[t]() for t in tasks or self.tasks)

    def describe(self) -> str:
        model = f"{type(self).__name__} {self.architecture} (width {self.width})"
        return f"{super().describe()}; {model}; data {self.root}"


class NYUv2(DenseBenchmark):
    """NYUv2, 3 tasks (see the module docstring). Options: ``model`` ("mtan" or "segnet"),
    ``width`` (1.0), ``augment`` (True)."""

    name = "nyuv2"
    tasks = ("segmentation", "depth", "normal")
    classes = 13
    metrics: Mapping[str, Metric] = DENSE_METRICS
    reference = Reference(
        {
            "segmentation/miou": 0.3830,
            "segmentation/pixel_acc": 0.6376,
            "depth/abs_err": 0.6754,
            "depth/rel_err": 0.2780,
            "normal/mean": 25.01,
            "normal/median": 19.21,
            "normal/within_11.25": 0.3014,
            "normal/within_22.5": 0.5720,
            "normal/within_30": 0.6915,
        },
        source="single-task learning, CAGrad (arXiv:2110.14048) Table 2; Nash-MTL's delta_fn",
    )
    recipe = cagrad_recipe(
        batch_size=2,
        flip="horizontal flip (normal x negated)",
        source="CAGrad nyuv2/model_segnet_mtan.py; Nash-MTL experiments/nyuv2/trainer.py",
    )
    source = NYUV2_SOURCE

    def _read(self, split: str, augment: bool) -> DenseNpyDataset:
        return nyuv2_dataset(self.root, split, augment=augment)
