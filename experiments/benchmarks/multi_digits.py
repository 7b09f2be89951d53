"""``multi_digits``: MultiMNIST built the way Sener & Koltun built it, from scikit-learn's 8×8
digits, with a LeNet-style model (no data directory needed).

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
arXiv:1810.04650, Appendix C build MultiMNIST like this: every image gets a random partner; on
a 36×36 canvas the first digit goes to the top-left corner ``[0:28, 0:28]`` and the second to
``[6:34, 6:34]`` (an offset of 6 towards the bottom-right), where they overlap the pixel is the
maximum of the two, and the canvas is resized to 28×28. The tasks are "classify the left
(top-left) digit" and "classify the right (bottom-right) digit".

Here the source is ``sklearn.datasets.load_digits`` (1797 images, 8×8, shipped with
scikit-learn, so nothing is downloaded). Scaling the recipe to 8×8 digits: a 10×10 canvas
(36/28·8 ≈ 10.3) and an offset of 2 (6/28·8 ≈ 1.7), left digit at ``[0:8, 0:8]``, right at
``[2:10, 2:10]``, pixel-wise maximum; resizing the canvas is optional (``resize=``, off by
default: the 10×10 canvas is small already). Choices and their reasons:

* The source images are split into train and test *before* pairing, and partners are drawn from
  the same split, so no test digit is ever seen in training (as a left or a right digit).
* A partner is a different image of the same split, drawn uniformly. ``pairs_per_image`` (default
  1, the paper's count) pairs each training image with that many partners, to grow the small
  training set; ``test_pairs_per_image`` does the same for the test split (more test pairs
  average out the luck of the partner draw in the test accuracy).
* Pixels are scaled to ``[0, 1]`` (``load_digits`` holds 0..16).

Everything is a function of ``seed`` (a ``torch.Generator``), so the data set is reproducible.

>>> data = make_multi_digits(seed=0)
>>> data.tasks, tuple(data.train_images.shape[1:]), data.num_classes
(('left', 'right'), (1, 10, 10), 10)
>>> len(data.train_images) + len(data.test_images)
1797
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.benchmarks.base import Metric, MultiTaskModel, Recipe
from experiments.benchmarks.classification import ClassificationBenchmark, TaskTensors

__all__ = [
    "TASKS",
    "LeNetTrunk",
    "MultiDigits",
    "MultiDigitsBenchmark",
    "MultiDigitsNet",
    "make_multi_digits",
    "overlay",
]

TASKS = ("left", "right")
DIGIT = 8  # load_digits images are 8×8
CANVAS = 10
OFFSET = 2


@dataclass(frozen=True)
class MultiDigits:
    """Images ``[N, 1, H, W]`` in ``[0, 1]``, one label vector ``[N]`` per task, and the
    ``load_digits`` indices ``[N, 2]`` (left, right) each image was made of."""

    train_images: Tensor
    train_labels: dict[str, Tensor]
    test_images: Tensor
    test_labels: dict[str, Tensor]
    train_sources: Tensor
    test_sources: Tensor
    tasks: tuple[str, ...] = TASKS
    num_classes: int = 10

    def to(self, device: torch.device | str) -> MultiDigits:
        return MultiDigits(
            self.train_images.to(device),
            {t: y.to(device) for t, y in self.train_labels.items()},
            self.test_images.to(device),
            {t: y.to(device) for t, y in self.test_labels.items()},
            self.train_sources,
            self.test_sources,
            self.tasks,
            self.num_classes,
        )


def overlay(left: Tensor, right: Tensor, *, canvas: int = CANVAS, offset: int = OFFSET) -> Tensor:
    """Put ``left`` ``[N, h, w]`` at the top-left and ``right`` at ``(offset, offset)`` of a
    ``canvas``×``canvas`` image, taking the maximum where they overlap -> ``[N, canvas, canvas]``.

    >>> one = torch.ones(1, 2, 2)
    >>> overlay(one, 2 * one, canvas=3, offset=1)[0]
    tensor([[1., 1., 0.],
            [1., 2., 2.],
            [0., 2., 2.]])
    """
    count, height, width = left.shape
    if right.shape != left.shape:
        raise ValueError(f"left {tuple(left.shape)} and right {tuple(right.shape)} differ")
    if offset + max(height, width) > canvas:
        raise ValueError(f"a {height}×{width} digit at offset {offset} overflows canvas {canvas}")
    first = left.new_zeros(count, canvas, canvas)
    second = left.new_zeros(count, canvas, canvas)
    first[:, :height, :width] = left
    second[:, offset : offset + height, offset : offset + width] = right
    return torch.maximum(first, second)


def _partners(count: int, repeats: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(image, partner) index pairs within one split: each image ``repeats`` times, each time
    with a uniformly drawn *different* image."""
    anchors = torch.arange(count).repeat(repeats)
    # Drawing from count - 1 and skipping the anchor gives a uniform partner != anchor.
    draws = torch.randint(0, count - 1, (anchors.numel(),), generator=generator)
    partners = draws + (draws >= anchors).long()
    return anchors, partners


def make_multi_digits(
    seed: int = 0,
    *,
    test_fraction: float = 0.25,
    pairs_per_image: int = 1,
    test_pairs_per_image: int = 1,
    canvas: int = CANVAS,
    offset: int = OFFSET,
    resize: int | None = None,
) -> MultiDigits:
    """Build Multi-Digits from ``load_digits``: split the source images, then pair within splits."""
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if pairs_per_image < 1 or test_pairs_per_image < 1:
        raise ValueError(
            f"pairs_per_image and test_pairs_per_image must be >= 1, got {pairs_per_image} and "
            f"{test_pairs_per_image}"
        )
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    test_count = round(len(images) * test_fraction)
    splits = {"test": order[:test_count], "train": order[test_count:]}

    built: dict[str, tuple[Tensor, dict[str, Tensor], Tensor]] = {}
    for split in ("train", "test"):  # fixed order: the generator's draws stay reproducible
        source = splits[split]
        repeats = pairs_per_image if split == "train" else test_pairs_per_image
        anchors, partners = _partners(len(source), repeats, generator)
        left, right = source[anchors], source[partners]
        pictures = overlay(images[left], images[right], canvas=canvas, offset=offset)
        pictures = pictures.unsqueeze(1)
        if resize is not None:
            pictures = F.interpolate(
                pictures, size=(resize, resize), mode="bilinear", antialias=True
            ).clamp(0, 1)
        sources = torch.stack([left, right], dim=1)
        built[split] = (pictures, {"left": labels[left], "right": labels[right]}, sources)
    train, test = built["train"], built["test"]
    return MultiDigits(train[0], train[1], test[0], test[1], train[2], test[2])


# --------------------------------------------------------------------------- model
class LeNetTrunk(nn.Sequential):
    """Conv3×3(c1)–MaxPool2–ReLU–Conv3×3(c2)–MaxPool2–ReLU–Flatten–FC(→features)–ReLU."""

    def __init__(
        self, *, image_size: int = 10, channels: tuple[int, int] = (10, 20), features: int = 50
    ) -> None:
        side = image_size // 2 // 2
        if side < 1:
            raise ValueError(f"image_size must be at least 4, got {image_size}")
        super().__init__(
            nn.Conv2d(1, channels[0], 3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(channels[0], channels[1], 3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(channels[1] * side * side, features),
            nn.ReLU(),
        )
        self.out_features = features


class MultiDigitsNet(MultiTaskModel):
    """Shared :class:`LeNetTrunk` plus a ``Linear(features, classes)`` head per task.

    ``forward`` returns ``(features, {task: logits})``: the features are what a gradient-level
    strategy takes as ``features=``; ``shared_parameters()`` are the trunk's parameters (its
    ``shared_params=``).

    The trunk follows the LeNet of Sener & Koltun (NeurIPS 2018) for MultiMNIST —
    Conv5×5(10)–MaxPool2–ReLU–Conv5×5(20)–MaxPool2–ReLU–FC(320→50) — scaled to the 10×10
    canvas: 3×3 convolutions with padding 1 (10×10 → pool → 5×5 → pool → 2×2), so the FC layer
    maps 20·2·2 = 80 values to 50 features (followed by a ReLU). Each head is ``Linear(50, 10)``.

    >>> model = MultiDigitsNet(("left", "right"))
    >>> features, logits = model(torch.zeros(4, 1, 10, 10))
    >>> tuple(features.shape), {t: tuple(v.shape) for t, v in logits.items()}
    ((4, 50), {'left': (4, 10), 'right': (4, 10)})
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        num_classes: int = 10,
        image_size: int = 10,
        channels: tuple[int, int] = (10, 20),
        features: int = 50,
    ) -> None:
        super().__init__()
        self.trunk = LeNetTrunk(image_size=image_size, channels=channels, features=features)
        self.heads = nn.ModuleDict({t: nn.Linear(features, num_classes) for t in tasks})

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.trunk(images)
        return features, {t: head(features) for t, head in self.heads.items()}


# --------------------------------------------------------------------------- benchmark
class MultiDigitsBenchmark(ClassificationBenchmark):
    """Multi-Digits (:func:`make_multi_digits`) with :class:`MultiDigitsNet`, test accuracy per
    task. No published reference: ``compare`` trains the single-task baselines.

    The recipe is this project's (the paper's MultiMNIST recipe is in
    :mod:`experiments.benchmarks.multimnist`): Adam 2e-3, batch 64, 6 epochs, no schedule, no
    augmentation. The options build the data: ``pairs_per_image`` (default 4: the 1 348 training
    digits give 5 392 pairs), ``test_pairs_per_image`` (4) and ``data_seed`` (0).

    >>> bench = MultiDigitsBenchmark()
    >>> image, targets = bench.dataset("train")[0]
    >>> tuple(image.shape), sorted(targets), len(bench.dataset("test"))
    ((1, 10, 10), ['left', 'right'], 1796)
    """

    name = "multi_digits"
    tasks = TASKS
    metrics: Mapping[str, Metric] = {
        f"{t}/acc": Metric(higher_is_better=True, unit="fraction") for t in TASKS
    }
    recipe = Recipe(
        optimizer="adam",
        lr=2e-3,
        epochs=6,
        batch_size=64,
        eval_batch_size=2048,  # the whole test split in one forward
        options={"foreach": True},  # the same Adam, one kernel per step: 1.5× faster here
        source="taskbalance's Multi-Digits setting (Adam, batch 64, 6 epochs)",
    )
    source = "built from sklearn.datasets.load_digits (ships with scikit-learn)"

    def __init__(
        self, *, pairs_per_image: int = 4, test_pairs_per_image: int = 4, data_seed: int = 0
    ) -> None:
        self.data = make_multi_digits(
            data_seed, pairs_per_image=pairs_per_image, test_pairs_per_image=test_pairs_per_image
        )

    def dataset(self, split: str) -> TaskTensors:
        self.check_split(split)
        if split == "train":
            return TaskTensors(self.data.train_images, self.data.train_labels)
        return TaskTensors(self.data.test_images, self.data.test_labels)

    def model(self, tasks: Sequence[str] | None = None) -> MultiDigitsNet:
        return MultiDigitsNet(tasks or self.tasks)
