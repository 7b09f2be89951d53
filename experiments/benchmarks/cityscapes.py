"""``cityscapes``: 7-class segmentation and depth on Cityscapes at 128×256 (MTAN's
preprocessing), as CAGrad's ``cityscapes/`` code runs it.

* data: the preprocessed ``.npy`` files of the MTAN repository (2 975 train / 500 test images;
  :func:`~experiments.benchmarks.datasets.cityscapes_dataset`), ``label_7`` (``classes=19``
  reads ``label_19``); the depth files hold inverse depth (disparity), 0 = no measurement;
* model: SegNet-MTAN (default) or the split SegNet, two heads;
* metrics: mIoU and pixel accuracy, depth absolute and relative error, the conventions of
  :mod:`~experiments.benchmarks.dense` (test batches of 8);
* recipe: Adam, lr 1e-4 halved after epoch 100, 200 epochs, batch 8 (CAGrad's
  ``cityscapes/model_segnet_mtan.py``).

The single-task reference is CAGrad's STL row for Cityscapes (Liu et al., NeurIPS 2021,
arXiv:2110.14048): mIoU 0.7401, pixel accuracy 0.9316, abs 0.0125, rel 27.77 (the relative
error of disparities is large where the true disparity is small).
"""

from __future__ import annotations

from collections.abc import Mapping

from experiments.benchmarks.base import Metric, Reference
from experiments.benchmarks.datasets import (
    CITYSCAPES_SOURCE,
    DenseNpyDataset,
    cityscapes_dataset,
)
from experiments.benchmarks.nyuv2 import DENSE_METRICS, DenseBenchmark, cagrad_recipe

__all__ = ["Cityscapes"]


class Cityscapes(DenseBenchmark):
    """Cityscapes, 2 tasks (see the module docstring). Options: ``model`` ("mtan" or
    "segnet"), ``width`` (1.0), ``augment`` (True), ``classes`` (7 or 19; the reference is for
    7)."""

    name = "cityscapes"
    tasks = ("segmentation", "depth")
    classes = 7
    metrics: Mapping[str, Metric] = {
        k: v for k, v in DENSE_METRICS.items() if not k.startswith("normal/")
    }
    reference = Reference(
        {
            "segmentation/miou": 0.7401,
            "segmentation/pixel_acc": 0.9316,
            "depth/abs_err": 0.0125,
            "depth/rel_err": 27.77,
        },
        source="single-task learning, CAGrad (arXiv:2110.14048), Cityscapes table",
    )
    recipe = cagrad_recipe(
        batch_size=8, flip="horizontal flip", source="CAGrad cityscapes/model_segnet_mtan.py"
    )
    source = CITYSCAPES_SOURCE

    def __init__(
        self,
        data_dir: str | None = None,
        *,
        model: str = "mtan",
        width: float = 1.0,
        augment: bool = True,
        classes: int = 7,
    ) -> None:
        super().__init__(data_dir, model=model, width=width, augment=augment)
        if classes not in (7, 19):
            raise ValueError(f"classes must be 7 or 19, not {classes}")
        self.classes = classes
        if classes != 7:
            self.reference = Reference()  # the published reference is for 7 classes

    def _read(self, split: str, augment: bool) -> DenseNpyDataset:
        return cityscapes_dataset(self.root, split, augment=augment, classes=self.classes)
