"""Dense-prediction losses and test metrics (semantic segmentation, depth, surface normals) as
the NYUv2 and Cityscapes multi-task benchmarks compute them.

The conventions are those of the code behind the published tables that Δm% is measured
against: the CAGrad code (Liu, Liu, Stone & Liu, "Conflict-Averse Gradient Descent for
Multi-task Learning", NeurIPS 2021, arXiv:2110.14048; github.com/Cranial-XIX/CAGrad,
``nyuv2/utils.py`` and ``cityscapes/utils.py``), whose single-task table the Nash-MTL code
reuses in its ``delta_fn`` (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML
2022, arXiv:2202.01017; github.com/AvivNavon/nash-mtl, ``experiments/nyuv2/utils.py`` and
``trainer.py``). Both inherit losses, metrics and data from MTAN (Liu, Johns & Davison,
"End-to-End Multi-Task Learning with Attention", CVPR 2019, arXiv:1803.10704;
github.com/lorenmt/mtan, ``im2im_pred/utils.py``); FAMO (github.com/Cranial-XIX/FAMO) uses
the same code again.

Losses (per training batch):

* :func:`segmentation_loss`: cross-entropy over the pixels whose label is not −1. The
  reference models output ``log_softmax`` and take ``nll_loss(ignore_index=-1)``; this takes
  logits, which is the same value (and log-probabilities give it too).
* :func:`depth_loss`: mean L1 error over the valid pixels, valid meaning that the target
  summed over its channel dimension is non-zero (for one-channel depth: depth ≠ 0).
* :func:`normal_loss`: mean over the valid pixels of ``1 − Σ_c pred_c · target_c``, valid
  meaning that the target's *components sum* to a non-zero value (the reference code's mask;
  it agrees with "the target is not the zero vector" except for a unit normal whose three
  components sum to exactly 0). The prediction is not normalised here: the reference models
  normalise their normal output, and this module expects unit predictions likewise.

Where a batch has no valid pixel, the reference code divides 0 by 0 (NaN); here each loss is
then 0 with a zero gradient. Predictions at invalid pixels never reach a loss or its gradient,
not even a NaN or an infinite one.

Test metrics, in the units of the published tables (fractions and degrees):

* :class:`SegmentationMetrics` (``miou``, ``pixel_acc``): one confusion matrix over the whole
  test set, labels outside ``[0, num_classes)`` (the −1 of unlabelled pixels) left out; IoU
  ``tp / (tp + fp + fn)`` per class, pixel accuracy ``Σ tp / Σ`` counts. Independent of the
  batching. The reference takes a plain mean of the IoUs, which is NaN when a class occurs
  neither in a target nor in a prediction of the whole test set; here such a class is left
  out of the mean (``nanmean``). The two agree whenever every class occurs in the test set's
  targets or predictions.
* :class:`DepthMetrics` (``abs_err``, ``rel_err``): per test batch, the mean over its valid
  pixels of ``|pred − gt|`` and of ``|pred − gt| / gt``; the result is the plain mean of these
  per-batch values over the test batches (each batch counts once, the last, smaller one too),
  as the reference trainers do (``avg_cost += cost / len(test_loader)``).
* :class:`NormalMetrics` (``mean``, ``median``, ``within_11.25``, ``within_22.5``,
  ``within_30``): per test batch, the angles ``acos(clamp(Σ_c pred_c · gt_c, −1, 1))`` in
  degrees over its valid pixels, then their mean, their median (NumPy's: the mean of the two
  middle values for an even count) and the shares strictly below 11.25°, 22.5° and 30°; again
  averaged over the test batches with equal weight.

Depth and normal metrics therefore depend on the test batch size and order: the published
NYUv2 numbers come from batches of 2 in file order (``shuffle=False``), the Cityscapes ones
from the trainer's batch size (8 in the FAMO code); a benchmark sets it as
:attr:`Recipe.eval_batch_size <experiments.benchmarks.base.Recipe>`. A test batch without a
valid pixel is left out of the average here (in the reference it makes the result NaN).

Other implementations differ:

* MTAN's first release computed mIoU and pixel accuracy per image (a class absent from both
  the image's target and prediction left out) and averaged them over images and batches;
  later MTAN code and CAGrad / Nash-MTL / FAMO switched to the confusion matrix used here.
* LibMTL (``examples/nyu/utils.py``) weights each batch's depth errors by its number of valid
  pixels (a mean over all valid pixels of the test set) and pools the normal angles of the
  whole test set before taking the mean, median and shares; its numbers do not depend on the
  batching and are not those of the table above. It also normalises normal predictions
  inside its loss and metric.

The reference counts its confusion matrix in int64 on the device but averages the per-batch
values on the host in float32; here every sum is float64 on the outputs' device, and
``update`` is written not to wait for the device (no ``.item()``, no boolean indexing): only
``compute`` reads values back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from experiments.benchmarks.base import Evaluator, Metric

__all__ = [
    "DepthMetrics",
    "Evaluators",
    "NormalMetrics",
    "SegmentationMetrics",
    "depth_loss",
    "normal_loss",
    "segmentation_loss",
]

IGNORE_LABEL = -1
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)


def _at_least_float32(tensor: Tensor) -> Tensor:
    # half-precision outputs (autocast) are summed in float32 at least
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _depth_valid(target: Tensor) -> Tensor:
    """Valid depth pixels ``[B, 1, H, W]``: the target summed over channels is non-zero."""
    return target.sum(dim=1, keepdim=True) != 0


def _normal_valid(target: Tensor) -> Tensor:
    """Valid normal pixels ``[B, H, W]``: the target's components sum to non-zero."""
    return target.sum(dim=1) != 0


def _check_same_shape(task: str, pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"{task}: prediction of shape {tuple(pred.shape)}, target {tuple(target.shape)}"
        )


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` ``[B, C, H, W]`` against labels ``[B, H, W]`` (float or
    long), averaged over the pixels whose label is not −1; 0 (zero gradient) if there is none.
    Other labels must lie in ``[0, C)``.

    >>> logits = torch.tensor([[[[0.0, 5.0]], [[0.0, 1.0]]]])  # [1, 2, 1, 2]
    >>> round(segmentation_loss(logits, torch.tensor([[[1.0, -1.0]]])).item(), 4)  # ln 2
    0.6931
    """
    target = target.long()
    total = F.cross_entropy(
        _at_least_float32(logits), target, ignore_index=IGNORE_LABEL, reduction="sum"
    )
    return total / (target != IGNORE_LABEL).sum().clamp(min=1)


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error of ``pred`` ``[B, 1, H, W]`` over the pixels whose target depth is
    non-zero; 0 (zero gradient) if there is none.

    >>> pred = torch.tensor([[[[1.5, 9.0]]]])
    >>> depth_loss(pred, torch.tensor([[[[1.0, 0.0]]]])).item()  # |1.5 − 1|, 0 = no depth
    0.5
    """
    pred = _at_least_float32(pred)
    target = target.to(pred.dtype)
    _check_same_shape("depth", pred, target)
    valid = _depth_valid(target)
    # select before subtracting: an invalid pixel's prediction gets an exact zero gradient
    error = (torch.where(valid, pred, target) - target).abs()
    return error.sum() / valid.sum().clamp(min=1)


def normal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of ``1 − Σ_c pred_c · target_c`` (1 − cosine for unit vectors) over the pixels of
    ``[B, 3, H, W]`` whose target's components sum to non-zero; 0 (zero gradient) if none.

    >>> pred = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 0.0]]]])  # (0,1,0), (1,0,0)
    >>> target = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])  # (1,0,0), zero
    >>> normal_loss(pred, target).item()  # one valid pixel at 90°: 1 − 0
    1.0
    """
    pred = _at_least_float32(pred)
    target = target.to(pred.dtype)
    _check_same_shape("normal", pred, target)
    valid = _normal_valid(target)
    dot = (torch.where(valid.unsqueeze(1), pred, target) * target).sum(dim=1)
    return torch.where(valid, 1 - dot, 0).sum() / valid.sum().clamp(min=1)


class SegmentationMetrics:
    """mIoU and pixel accuracy (``<task>/miou``, ``<task>/pixel_acc``, fractions) from one
    confusion matrix over all test pixels with a label in ``[0, num_classes)``; the argmax
    of the logits ``[B, C, H, W]`` is the prediction. A class absent from every target and
    prediction is left out of the mean IoU.

    >>> seg = SegmentationMetrics(3)
    >>> logits = torch.eye(3).reshape(1, 3, 1, 3)  # pixel w predicts class w
    >>> seg.update({"segmentation": logits}, {"segmentation": torch.tensor([[[0, 2, -1]]])})
    >>> seg.compute()  # IoU 1, 0, 0; 1 of 2 labelled pixels right
    {'segmentation/miou': 0.3333333333333333, 'segmentation/pixel_acc': 0.5}
    """

    def __init__(self, num_classes: int, task: str = "segmentation") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, not {num_classes}")
        self.num_classes = num_classes
        self.task = task
        self.reset()

    @property
    def metrics(self) -> dict[str, Metric]:
        return {f"{self.task}/miou": Metric(True), f"{self.task}/pixel_acc": Metric(True)}

    def reset(self) -> None:
        # flat [target * C + prediction] counts, made on the first batch's device
        self._confusion: Tensor | None = None

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
        logits = outputs[self.task]
        n = self.num_classes
        if logits.dim() != 4 or logits.shape[1] != n:
            raise ValueError(
                f"{self.task}: logits must be [B, {n}, H, W], not {tuple(logits.shape)}"
            )
        pred = logits.float().argmax(dim=1)
        target = targets[self.task].to(pred.device).long()
        _check_same_shape(self.task, pred, target)
        pred, target = pred.reshape(-1), target.reshape(-1)
        valid = (target >= 0) & (target < n)
        # invalid pixels add a weight of 0 to cell 0: no boolean indexing, no host sync
        index = torch.where(valid, target * n + pred, 0)
        if self._confusion is None:
            self._confusion = torch.zeros(n * n, dtype=torch.float64, device=pred.device)
        self._confusion.index_add_(0, index, valid.to(torch.float64))

    def compute(self) -> dict[str, float]:
        names = list(self.metrics)
        if self._confusion is None:
            return dict.fromkeys(names, float("nan"))
        counts = self._confusion.view(self.num_classes, self.num_classes)
        hits = counts.diagonal()
        iou = hits / (counts.sum(dim=0) + counts.sum(dim=1) - hits)
        accuracy = hits.sum() / counts.sum()
        return {names[0]: iou.nanmean().item(), names[1]: accuracy.item()}


class _PerBatchMean:
    """Per-batch statistics over each batch's valid pixels, averaged over the batches that
    have a valid pixel (every batch counts once)."""

    task: str
    names: tuple[str, ...]

    def reset(self) -> None:
        self._sums: Tensor | None = None  # per-batch values summed over batches
        self._batches: Tensor | None = None  # batches with a valid pixel

    def _add(self, values: Tensor, has_valid: Tensor) -> None:
        if self._sums is None or self._batches is None:
            self._sums = torch.zeros_like(values)
            self._batches = torch.zeros((), dtype=values.dtype, device=values.device)
        # where, not a product: a batch without valid pixels may hold inf (its median)
        self._sums += torch.where(has_valid, values, 0)
        self._batches += has_valid.to(values.dtype)

    def compute(self) -> dict[str, float]:
        keys = [f"{self.task}/{name}" for name in self.names]
        if self._sums is None or self._batches is None:
            return dict.fromkeys(keys, float("nan"))
        return dict(zip(keys, (self._sums / self._batches).tolist()))


class DepthMetrics(_PerBatchMean):
    """Absolute and relative depth error (``<task>/abs_err``, ``<task>/rel_err``): per batch
    the mean of ``|pred − gt|`` and ``|pred − gt| / gt`` over pixels with ``gt ≠ 0``, then the
    mean over batches.

    >>> depth = DepthMetrics()
    >>> target = torch.tensor([[[[1.0, 2.0, 0.0]]]])  # 0 = no depth
    >>> depth.update({"depth": torch.tensor([[[[1.5, 1.0, 5.0]]]])}, {"depth": target})
    >>> depth.compute()  # abs (0.5 + 1) / 2, rel (0.5 + 0.5) / 2
    {'depth/abs_err': 0.75, 'depth/rel_err': 0.5}
    """

    names = ("abs_err", "rel_err")

    def __init__(self, task: str = "depth") -> None:
        self.task = task
        self.reset()

    @property
    def metrics(self) -> dict[str, Metric]:
        return {f"{self.task}/{name}": Metric(False) for name in self.names}

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
        pred = outputs[self.task].to(torch.float64)
        target = targets[self.task].to(pred.device, torch.float64)
        _check_same_shape(self.task, pred, target)
        valid = _depth_valid(target)
        count = valid.sum()
        error = torch.where(valid, (pred - target).abs(), 0)
        relative = error / torch.where(valid, target, 1)
        values = torch.stack([error.sum(), relative.sum()]) / count.clamp(min=1)
        self._add(values, count > 0)


class NormalMetrics(_PerBatchMean):
    """Angle error of unit normals in degrees (``<task>/mean``, ``<task>/median``,
    ``<task>/within_11.25``, ``<task>/within_22.5``, ``<task>/within_30``): per batch over
    the pixels whose target components sum to non-zero, then the mean over batches. The
    median of an even count is the mean of the two middle angles (as ``numpy.median``).

    >>> normal = NormalMetrics()
    >>> target = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])  # (1,0,0) twice
    >>> pred = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]])  # 0° and 90° off
    >>> normal.update({"normal": pred}, {"normal": target})
    >>> for name, value in normal.compute().items():
    ...     print(name, value)
    normal/mean 45.0
    normal/median 45.0
    normal/within_11.25 0.5
    normal/within_22.5 0.5
    normal/within_30 0.5
    """

    names = ("mean", "median", *(f"within_{t:g}" for t in NORMAL_THRESHOLDS))

    def __init__(self, task: str = "normal") -> None:
        self.task = task
        self.reset()

    @property
    def metrics(self) -> dict[str, Metric]:
        angles = {f"{self.task}/{name}": Metric(False, "°") for name in self.names[:2]}
        shares = {f"{self.task}/{name}": Metric(True) for name in self.names[2:]}
        return {**angles, **shares}

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
        pred = outputs[self.task].to(torch.float64)
        target = targets[self.task].to(pred.device, torch.float64)
        _check_same_shape(self.task, pred, target)
        valid = _normal_valid(target).reshape(-1)
        cosine = (pred * target).sum(dim=1).clamp(-1, 1).reshape(-1)
        angle = torch.rad2deg(torch.acos(cosine))
        count = valid.sum()
        denominator = count.clamp(min=1)
        mean = torch.where(valid, angle, 0).sum() / denominator
        within = [(valid & (angle < t)).sum() / denominator for t in NORMAL_THRESHOLDS]
        # the median from a full sort with invalid pixels last: indices stay on the device
        ordered = torch.where(valid, angle, torch.inf).sort().values
        middle = torch.stack([(count - 1) // 2, count // 2]).clamp(min=0)
        median = ordered.gather(0, middle).mean()
        self._add(torch.stack([mean, median, *within]), count > 0)


class Evaluators:
    """Several evaluators as one: ``update`` goes to each, ``compute`` merges their results
    (a metric name given twice is an error), ``reset`` resets each that can be.

    >>> both = Evaluators([DepthMetrics(), DepthMetrics(task="disparity")])
    >>> one = torch.ones(1, 1, 1, 1)
    >>> both.update({"depth": one, "disparity": 2 * one}, {"depth": one, "disparity": one})
    >>> for name, value in both.compute().items():
    ...     print(name, value)
    depth/abs_err 0.0
    depth/rel_err 0.0
    disparity/abs_err 1.0
    disparity/rel_err 1.0
    """

    def __init__(self, parts: Iterable[Evaluator]) -> None:
        self.parts = list(parts)

    @property
    def metrics(self) -> dict[str, Metric]:
        merged: dict[str, Metric] = {}
        for part in self.parts:
            merged.update(getattr(part, "metrics", {}))
        return merged

    def reset(self) -> None:
        for part in self.parts:
            reset = getattr(part, "reset", None)
            if reset is not None:
                reset()

    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
        for part in self.parts:
            part.update(outputs, targets)

    def compute(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for part in self.parts:
            values = part.compute()
            twice = merged.keys() & values.keys()
            if twice:
                raise ValueError(f"metrics {sorted(twice)} computed by two evaluators")
            merged.update(values)
        return merged
