"""Dense-prediction losses and metrics (experiments/benchmarks/dense.py): hand-computed
values, the batching conventions of the CAGrad / Nash-MTL code, invalid pixels, reset, the
combinator and half-precision outputs."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from experiments.benchmarks.dense import (
    DepthMetrics,
    Evaluators,
    NormalMetrics,
    SegmentationMetrics,
    depth_loss,
    normal_loss,
    segmentation_loss,
)


def one_hot_logits(pred: list[list[list[int]]], num_classes: int) -> Tensor:
    """Logits ``[B, C, H, W]`` whose argmax is ``pred`` ``[B, H, W]``."""
    return F.one_hot(torch.tensor(pred), num_classes).permute(0, 3, 1, 2).float()


def rotated(angles_deg: list[float]) -> tuple[Tensor, Tensor]:
    """Predictions and targets ``[3, W]`` for one row of pixels: the target is the z axis, the
    prediction is tilted from it by each angle towards x."""
    target, pred = [], []
    for angle in angles_deg:
        a = math.radians(angle)
        target.append([0.0, 0.0, 1.0])
        pred.append([math.sin(a), 0.0, math.cos(a)])
    return torch.tensor(pred).T, torch.tensor(target).T


def normal_image(rows: list[list[float | None]]) -> tuple[Tensor, Tensor]:
    """One image ``[1, 3, H, W]`` of predictions and targets from angle errors per pixel; None
    is an invalid pixel (zero target, an arbitrary prediction)."""
    preds, targets = [], []
    for row in rows:
        pred, target = rotated([0.0 if a is None else a for a in row])
        for w, angle in enumerate(row):
            if angle is None:
                target[:, w] = 0.0
                pred[:, w] = torch.tensor([0.6, 0.8, 0.0])
        preds.append(pred)
        targets.append(target)
    return torch.stack(preds, dim=1)[None], torch.stack(targets, dim=1)[None]


# -- segmentation ---------------------------------------------------------------------------


SEG_BY_HAND = {"segmentation/miou": 0.5, "segmentation/pixel_acc": 2 / 3}


def test_segmentation_metrics_by_hand() -> None:
    # 2×2 image, 3 classes; target [[0, 1], [1, -1]], prediction [[0, 1], [2, 2]].
    # Labelled pixels (target, pred): (0, 0), (1, 1), (1, 2); the −1 pixel is left out.
    # Class 0: tp 1, union 1 → 1. Class 1: tp 1, union 2 (two targets) → 1/2.
    # Class 2: tp 0, union 1 (one prediction) → 0. mIoU = 1.5 / 3 = 0.5; accuracy 2 / 3.
    seg = SegmentationMetrics(3)
    target = torch.tensor([[[0.0, 1.0], [1.0, -1.0]]])  # float, as the loaders give it
    seg.update({"segmentation": one_hot_logits([[[0, 1], [2, 2]]], 3)}, {"segmentation": target})
    assert seg.compute() == pytest.approx(SEG_BY_HAND)


def test_segmentation_absent_class_left_out_of_the_mean() -> None:
    # The same image with 4 classes: class 3 is in no target and no prediction. Its IoU is
    # 0/0; the reference's plain mean would be NaN, the nanmean keeps 0.5.
    seg = SegmentationMetrics(4)
    seg.update(
        {"segmentation": one_hot_logits([[[0, 1], [2, 2]]], 4)},
        {"segmentation": torch.tensor([[[0, 1], [1, -1]]])},
    )
    assert seg.compute() == pytest.approx(SEG_BY_HAND)


def test_segmentation_one_pixel_and_ignored_labels() -> None:
    # 1×1 image, right: IoU of class 0 is 1, class 1 absent → mIoU 1, accuracy 1.
    seg = SegmentationMetrics(2)
    seg.update({"segmentation": one_hot_logits([[[0]]], 2)}, {"segmentation": torch.zeros(1, 1, 1)})
    assert seg.compute() == {"segmentation/miou": 1.0, "segmentation/pixel_acc": 1.0}
    # A batch of only −1 labels adds nothing.
    seg.update({"segmentation": one_hot_logits([[[1]]], 2)}, {"segmentation": -torch.ones(1, 1, 1)})
    assert seg.compute() == {"segmentation/miou": 1.0, "segmentation/pixel_acc": 1.0}


def test_segmentation_independent_of_batching() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 4, 3, generator=gen)
    target = torch.randint(-1, 5, (6, 4, 3), generator=gen)
    whole, split = SegmentationMetrics(5), SegmentationMetrics(5)
    whole.update({"segmentation": logits}, {"segmentation": target})
    for part in ([0, 1], [2], [3, 4, 5]):
        split.update({"segmentation": logits[part]}, {"segmentation": target[part]})
    assert whole.compute() == pytest.approx(split.compute(), abs=1e-15)
    # and equal to a confusion matrix counted pixel by pixel
    pred = logits.argmax(1)
    counts = np.zeros((5, 5))
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t >= 0:
            counts[t, p] += 1
    iou = np.diag(counts) / (counts.sum(0) + counts.sum(1) - np.diag(counts))
    expected = {
        "segmentation/miou": np.nanmean(iou),
        "segmentation/pixel_acc": np.trace(counts) / counts.sum(),
    }
    assert whole.compute() == pytest.approx(expected)


def test_segmentation_rejects_wrong_class_count() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        SegmentationMetrics(3).update(
            {"segmentation": torch.zeros(1, 2, 1, 1)}, {"segmentation": torch.zeros(1, 1, 1)}
        )


# -- depth ----------------------------------------------------------------------------------

# Image A (2×2): target [[1, 2], [0, 4]], prediction [[1.5, 1], [7, 5]]; the 0 is invalid.
# |errors| 0.5, 1, 1 → sum 2.5 over 3 pixels; relative 0.5/1 + 1/2 + 1/4 = 1.25 over 3.
DEPTH_A = (torch.tensor([[[[1.5, 1.0], [7.0, 5.0]]]]), torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]]]))
# Image B (2×2): target all 2, prediction [[3, 2], [2, 2]]: |errors| sum 1, relative 0.5 over 4.
DEPTH_B = (torch.tensor([[[[3.0, 2.0], [2.0, 2.0]]]]), torch.full((1, 1, 2, 2), 2.0))


def depth_of(*batches: tuple[Tensor, Tensor]) -> dict[str, float]:
    depth = DepthMetrics()
    for pred, target in batches:
        depth.update({"depth": pred}, {"depth": target})
    return depth.compute()


def test_depth_metrics_by_hand() -> None:
    assert depth_of(DEPTH_A) == pytest.approx({"depth/abs_err": 2.5 / 3, "depth/rel_err": 1.25 / 3})
    # 1×1: prediction 3 for depth 2 → abs 1, rel 0.5
    one = (torch.full((1, 1, 1, 1), 3.0), torch.full((1, 1, 1, 1), 2.0))
    assert depth_of(one) == {"depth/abs_err": 1.0, "depth/rel_err": 0.5}


def test_depth_metrics_average_per_batch_values() -> None:
    both = tuple(torch.cat(pair) for pair in zip(DEPTH_A, DEPTH_B))
    # one batch of A and B: the mean over its 7 valid pixels:
    # abs (2.5 + 1) / 7 = 0.5, rel (1.25 + 0.5) / 7 = 0.25
    assert depth_of(both) == pytest.approx({"depth/abs_err": 0.5, "depth/rel_err": 0.25})
    # two batches: the mean of the two batch means (not of the 7 pixels):
    # abs (2.5/3 + 1/4) / 2 = 0.541666..., rel (1.25/3 + 0.5/4) / 2 = 0.270833...
    expected = {"depth/abs_err": (2.5 / 3 + 0.25) / 2, "depth/rel_err": (1.25 / 3 + 0.125) / 2}
    assert depth_of(DEPTH_A, DEPTH_B) == pytest.approx(expected)
    # a batch without a valid pixel is left out (the reference code would give NaN)
    empty = (torch.full((1, 1, 2, 2), 5.0), torch.zeros(1, 1, 2, 2))
    assert depth_of(DEPTH_A, empty, DEPTH_B) == pytest.approx(expected)


def test_depth_invalid_prediction_ignored_even_if_not_finite() -> None:
    pred, target = DEPTH_A
    pred = pred.clone()
    pred[0, 0, 1, 0] = float("nan")
    assert depth_of((pred, target)) == pytest.approx(depth_of(DEPTH_A))


def test_depth_metrics_match_the_reference_formula_on_random_batches() -> None:
    # The convention written out with boolean masks, batch by batch, as the reference does.
    gen = torch.Generator().manual_seed(1)
    target = torch.rand(7, 1, 5, 4, generator=gen) * (torch.rand(7, 1, 5, 4, generator=gen) > 0.3)
    pred = torch.rand(7, 1, 5, 4, generator=gen)
    depth, per_batch = DepthMetrics(), []
    for part in (slice(0, 3), slice(3, 6), slice(6, 7)):
        depth.update({"depth": pred[part]}, {"depth": target[part]})
        p, t = pred[part].double(), target[part].double()
        mask = t != 0
        err = (p[mask] - t[mask]).abs()
        per_batch.append([err.mean().item(), (err / t[mask]).mean().item()])
    mean = np.mean(per_batch, axis=0)
    assert depth.compute() == pytest.approx({"depth/abs_err": mean[0], "depth/rel_err": mean[1]})


# -- normals --------------------------------------------------------------------------------


def normals_of(*batches: tuple[Tensor, Tensor]) -> dict[str, float]:
    normal = NormalMetrics()
    for pred, target in batches:
        normal.update({"normal": pred}, {"normal": target})
    return normal.compute()


def expected_normals(
    mean: float, median: float, w11: float, w22: float, w30: float
) -> dict[str, float]:
    values = (mean, median, w11, w22, w30)
    names = ("mean", "median", "within_11.25", "within_22.5", "within_30")
    return {f"normal/{n}": v for n, v in zip(names, values)}


# A 2×3 image: row 1 errors 0°, 10°, 20°; row 2 errors 45°, 90° and an invalid pixel.
ROW_1, ROW_2 = [0.0, 10.0, 20.0], [45.0, 90.0, None]


def test_normal_metrics_by_hand() -> None:
    # valid errors 0, 10, 20, 45, 90: mean 165 / 5 = 33, median 20,
    # below 11.25°: {0, 10} 2/5; below 22.5°: {0, 10, 20} 3/5; below 30°: 3/5
    got = normals_of(normal_image([ROW_1, ROW_2]))
    assert got == pytest.approx(expected_normals(33.0, 20.0, 0.4, 0.6, 0.6))


def test_normal_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    # errors 0, 10, 20, 90: numpy's median (10 + 20) / 2 = 15 (torch.median would give 10);
    # mean 120 / 4 = 30; below 11.25°: 2/4, below 22.5°: 3/4, below 30°: 3/4
    got = normals_of(normal_image([[0.0, 10.0, 20.0, 90.0]]))
    assert got == pytest.approx(expected_normals(30.0, 15.0, 0.5, 0.75, 0.75))


def test_normal_metrics_one_pixel_and_opposite() -> None:
    # 1×1 at 90°: mean = median = 90, no share below any threshold
    assert normals_of(normal_image([[90.0]])) == pytest.approx(expected_normals(90, 90, 0, 0, 0))
    # opposite unit vectors: cos = −1 → 180°
    pred, target = normal_image([[0.0]])
    assert normals_of((-pred, target))["normal/mean"] == pytest.approx(180.0)


def test_normal_metrics_average_per_batch_values() -> None:
    first, second = normal_image([ROW_1]), normal_image([ROW_2])
    # batch 1 (0, 10, 20): mean 10, median 10, shares 2/3, 1, 1
    # batch 2 (45, 90):    mean 67.5, median 67.5, shares 0, 0, 0
    # averaged: mean 38.75, median 38.75, shares 1/3, 1/2, 1/2 (not 33, 20, .4, .6, .6)
    expected = expected_normals(38.75, 38.75, 1 / 3, 0.5, 0.5)
    assert normals_of(first, second) == pytest.approx(expected)
    # a batch without a valid pixel is left out
    empty = (first[0], torch.zeros_like(first[1]))
    assert normals_of(first, empty, second) == pytest.approx(expected)


def test_normal_metrics_match_the_reference_formula_on_random_batches() -> None:
    gen = torch.Generator().manual_seed(2)
    pred = F.normalize(torch.randn(5, 3, 4, 6, generator=gen), dim=1)
    target = F.normalize(pred + 0.6 * torch.randn(5, 3, 4, 6, generator=gen), dim=1)
    target = target * (torch.rand(5, 1, 4, 6, generator=gen) > 0.25)
    normal, per_batch = NormalMetrics(), []
    for part in (slice(0, 2), slice(2, 5)):
        normal.update({"normal": pred[part]}, {"normal": target[part]})
        p, t = pred[part].double(), target[part].double()
        mask = t.sum(1) != 0
        err = np.degrees(torch.acos((p * t).sum(1)[mask].clamp(-1, 1)).numpy())
        shares = [(err < x).mean() for x in (11.25, 22.5, 30)]
        per_batch.append([err.mean(), np.median(err), *shares])
    assert normal.compute() == pytest.approx(expected_normals(*np.mean(per_batch, axis=0)))


def test_normal_validity_follows_the_reference_mask() -> None:
    # The reference masks pixels whose target components sum to 0: the zero vector, and also
    # a unit normal like (1, −1, 0)/√2. Both are left out here as well.
    pred, target = normal_image([[0.0, 10.0]])
    target[0, :, 0, 1] = torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2)
    assert normals_of((pred, target)) == pytest.approx(expected_normals(0, 0, 1, 1, 1))


# -- losses ---------------------------------------------------------------------------------


def test_segmentation_loss_by_hand() -> None:
    # 1×3 image, 2 classes. Pixel 1: logits (0, 0), label 0 → −log 1/2 = ln 2.
    # Pixel 2: logits (ln 3, 0), label 0 → −log 3/4 = ln 4/3. Pixel 3: label −1, left out.
    # Loss (ln 2 + ln 4/3) / 2 = ln(8/3) / 2.
    logits = torch.tensor([[[[0.0, math.log(3), 5.0]], [[0.0, 0.0, -5.0]]]], requires_grad=True)
    target = torch.tensor([[[0.0, 0.0, -1.0]]])
    loss = segmentation_loss(logits, target)
    assert loss.item() == pytest.approx(math.log(8 / 3) / 2)
    # the reference form: log_softmax then nll_loss(ignore_index=-1)
    reference = F.nll_loss(F.log_softmax(logits, 1), target.long(), ignore_index=-1)
    assert loss.item() == pytest.approx(reference.item())
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0, :, 0, 2].tolist() == [0.0, 0.0]


def test_segmentation_loss_ignores_the_prediction_at_ignored_pixels() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, 3, generator=gen)
    target = torch.randint(0, 4, (2, 3, 3), generator=gen)
    target[0, 1, 1] = -1
    changed = logits.clone()
    changed[0, :, 1, 1] = torch.tensor([100.0, -7.0, 3.0, 0.0])
    grads = []
    for x in (logits, changed):
        x = x.clone().requires_grad_(True)
        loss = segmentation_loss(x, target)
        grads.append((loss.detach(), *torch.autograd.grad(loss, x)))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


def test_depth_loss_by_hand_and_invalid_pixels() -> None:
    pred, target = DEPTH_A
    pred = pred.clone().requires_grad_(True)
    loss = depth_loss(pred, target)
    # (0.5 + 1 + 1) / 3 valid pixels
    assert loss.item() == pytest.approx(2.5 / 3)
    (grad,) = torch.autograd.grad(loss, pred)
    # sign(pred − target) / 3 at the valid pixels, 0 at the invalid one
    assert grad[0, 0].flatten().tolist() == pytest.approx([1 / 3, -1 / 3, 0.0, 1 / 3])
    # another prediction at the invalid pixel, even a non-finite one: same loss and gradient
    for value in (-3.0, float("inf"), float("nan")):
        other = DEPTH_A[0].clone()
        other[0, 0, 1, 0] = value
        other.requires_grad_(True)
        other_loss = depth_loss(other, target)
        assert other_loss.item() == loss.item()
        assert torch.equal(torch.autograd.grad(other_loss, other)[0], grad)


def test_normal_loss_by_hand_and_invalid_pixels() -> None:
    # errors 0°, 90°, 60° and an invalid pixel: 1 − cos = 0, 1, 1/2 → mean 1/2
    pred, target = normal_image([[0.0, 90.0, 60.0, None]])
    pred.requires_grad_(True)
    loss = normal_loss(pred, target)
    assert loss.item() == pytest.approx(0.5)
    # the reference form: 1 − Σ(pred · target · mask) / (number of valid pixels)
    mask = (target.sum(1) != 0).float().unsqueeze(1)
    assert loss.item() == pytest.approx(1 - ((pred * target) * mask).sum().item() / 3)
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.allclose(grad[0, :, 0, :3], -target[0, :, 0, :3] / 3)
    assert grad[0, :, 0, 3].tolist() == [0.0, 0.0, 0.0]
    other = pred.detach().clone()
    other[0, :, 0, 3] = float("nan")
    other.requires_grad_(True)
    other_loss = normal_loss(other, target)
    assert other_loss.item() == loss.item()
    assert torch.equal(torch.autograd.grad(other_loss, other)[0], grad)


@pytest.mark.parametrize(
    ("loss_fn", "pred", "target"),
    [
        (segmentation_loss, torch.randn(2, 3, 2, 2), -torch.ones(2, 2, 2)),
        (depth_loss, torch.rand(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)),
        (normal_loss, F.normalize(torch.randn(2, 3, 2, 2), dim=1), torch.zeros(2, 3, 2, 2)),
    ],
)
def test_losses_without_a_valid_pixel_are_zero_with_zero_gradient(
    loss_fn: Callable[[Tensor, Tensor], Tensor], pred: Tensor, target: Tensor
) -> None:
    pred = pred.clone().requires_grad_(True)
    loss = loss_fn(pred, target)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.equal(grad, torch.zeros_like(pred))


def test_losses_accept_half_precision_and_return_float32() -> None:
    pred, target = DEPTH_A
    loss = depth_loss(pred.bfloat16(), target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2.5 / 3)
    logits = one_hot_logits([[[0, 1]]], 2).half()
    assert segmentation_loss(logits, torch.tensor([[[0, 1]]])).dtype == torch.float32
    pred, target = normal_image([[0.0, 90.0]])
    assert normal_loss(pred.bfloat16(), target).item() == pytest.approx(0.5, abs=1e-2)


# -- reset, combinator, half precision -----------------------------------------------------


def test_reset_forgets_earlier_batches() -> None:
    depth = DepthMetrics()
    depth.update({"depth": DEPTH_B[0]}, {"depth": DEPTH_B[1]})
    depth.reset()
    depth.update({"depth": DEPTH_A[0]}, {"depth": DEPTH_A[1]})
    assert depth.compute() == depth_of(DEPTH_A)
    normal = NormalMetrics()
    normal.update({"normal": normal_image([ROW_2])[0]}, {"normal": normal_image([ROW_2])[1]})
    normal.reset()
    assert math.isnan(normal.compute()["normal/mean"])  # nothing seen: NaN
    seg = SegmentationMetrics(2)
    seg.update({"segmentation": one_hot_logits([[[1]]], 2)}, {"segmentation": torch.zeros(1, 1, 1)})
    seg.reset()
    seg.update({"segmentation": one_hot_logits([[[0]]], 2)}, {"segmentation": torch.zeros(1, 1, 1)})
    assert seg.compute() == {"segmentation/miou": 1.0, "segmentation/pixel_acc": 1.0}


def test_combinator_over_a_subset_of_tasks() -> None:
    parts = Evaluators([SegmentationMetrics(3), NormalMetrics()])
    pred, target = normal_image([ROW_1, ROW_2])
    outputs = {
        "segmentation": one_hot_logits([[[0, 1], [2, 2]]], 3),
        "normal": pred,
        "depth": torch.rand(1, 1, 2, 2),  # a task without an evaluator: not looked at
    }
    targets = {"segmentation": torch.tensor([[[0, 1], [1, -1]]]), "normal": target}
    parts.update(outputs, targets)
    expected = dict(SEG_BY_HAND)
    expected.update(expected_normals(33.0, 20.0, 0.4, 0.6, 0.6))
    assert parts.compute() == pytest.approx(expected)
    assert list(parts.metrics) == list(expected)
    assert not parts.metrics["normal/mean"].higher_is_better
    assert parts.metrics["normal/within_30"].higher_is_better
    parts.reset()
    assert all(math.isnan(v) for v in parts.compute().values())


def test_combinator_rejects_a_metric_computed_twice() -> None:
    twice = Evaluators([DepthMetrics(), DepthMetrics()])
    twice.update({"depth": DEPTH_A[0]}, {"depth": DEPTH_A[1]})
    with pytest.raises(ValueError, match="two evaluators"):
        twice.compute()


def test_task_names_are_configurable() -> None:
    seg = SegmentationMetrics(2, task="semantic")
    seg.update({"semantic": one_hot_logits([[[0]]], 2)}, {"semantic": torch.zeros(1, 1, 1)})
    assert set(seg.compute()) == {"semantic/miou", "semantic/pixel_acc"}
    assert set(NormalMetrics(task="n").metrics) == {
        "n/mean",
        "n/median",
        "n/within_11.25",
        "n/within_22.5",
        "n/within_30",
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_evaluators_accept_half_precision_outputs_under_no_grad(dtype: torch.dtype) -> None:
    normal_pred, normal_target = normal_image([ROW_1, ROW_2])
    outputs = {
        "segmentation": one_hot_logits([[[0, 1], [2, 2]]], 3),
        "depth": DEPTH_A[0],
        "normal": normal_pred,
    }
    targets = {
        "segmentation": torch.tensor([[[0.0, 1.0], [1.0, -1.0]]]),
        "depth": DEPTH_A[1],
        "normal": normal_target,
    }
    results = []
    for cast in (False, True):
        evaluator = Evaluators([SegmentationMetrics(3), DepthMetrics(), NormalMetrics()])
        with torch.no_grad():
            evaluator.update({k: v.to(dtype) if cast else v for k, v in outputs.items()}, targets)
        results.append(evaluator.compute())
    # depth values and one-hot logits are exact in 16 bits; normals round (≲ 0.5°)
    assert results[1] == pytest.approx(results[0], abs=0.5)
    assert results[1]["depth/abs_err"] == results[0]["depth/abs_err"]
    assert results[1]["segmentation/miou"] == results[0]["segmentation/miou"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_does_not_wait_for_the_device() -> None:
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(4)
    outputs = {
        "segmentation": torch.randn(2, 13, 8, 8, generator=gen),
        "depth": torch.rand(2, 1, 8, 8, generator=gen),
        "normal": F.normalize(torch.randn(2, 3, 8, 8, generator=gen), dim=1),
    }
    targets = {
        "segmentation": torch.randint(-1, 13, (2, 8, 8), generator=gen).float(),
        "depth": torch.rand(2, 1, 8, 8, generator=gen),
        "normal": F.normalize(torch.randn(2, 3, 8, 8, generator=gen), dim=1),
    }
    on_device = Evaluators([SegmentationMetrics(13), DepthMetrics(), NormalMetrics()])
    on_host = Evaluators([SegmentationMetrics(13), DepthMetrics(), NormalMetrics()])
    outputs_gpu = {k: v.to(device) for k, v in outputs.items()}
    targets_gpu = {k: v.to(device) for k, v in targets.items()}
    on_device.update(outputs_gpu, targets_gpu)  # first call allocates the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_device.update(outputs_gpu, targets_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(2):
        on_host.update(outputs, targets)
    assert on_device.compute() == pytest.approx(on_host.compute())
