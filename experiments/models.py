"""The Multi-Digits model: a LeNet-style shared trunk and one linear head per task.

The trunk follows the LeNet of Sener & Koltun (NeurIPS 2018) for MultiMNIST —
Conv5×5(10)–MaxPool2–ReLU–Conv5×5(20)–MaxPool2–ReLU–FC(320→50) — scaled to the 10×10 canvas:
3×3 convolutions with padding 1 (10×10 → pool → 5×5 → pool → 2×2), so the FC layer maps
20·2·2 = 80 values to 50 features (followed by a ReLU). Each head is ``Linear(50, 10)``.

>>> model = MultiDigitsNet(("left", "right"))
>>> features, logits = model(torch.zeros(4, 1, 10, 10))
>>> tuple(features.shape), {t: tuple(v.shape) for t, v in logits.items()}
((4, 50), {'left': (4, 10), 'right': (4, 10)})
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["LeNetTrunk", "MultiDigitsNet"]


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


class MultiDigitsNet(nn.Module):
    """Shared :class:`LeNetTrunk` plus a ``Linear(features, classes)`` head per task.

    ``forward`` returns ``(features, {task: logits})``: the features are what a gradient-level
    strategy takes as ``features=``; ``shared_parameters()`` are the trunk's parameters (its
    ``shared_params=``).
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
        self.tasks = tuple(tasks)
        self.trunk = LeNetTrunk(image_size=image_size, channels=channels, features=features)
        self.heads = nn.ModuleDict({t: nn.Linear(features, num_classes) for t in self.tasks})

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.heads[task].parameters())

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.trunk(images)
        return features, {t: head(features) for t, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Predicted class per task, ``{task: [N]}``."""
        _, logits = self(images)
        return {t: v.argmax(dim=1) for t, v in logits.items()}
