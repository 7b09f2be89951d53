"""The networks of the standard multi-task benchmarks, written from their papers and public code.

* :class:`SegNet` and :class:`SegNetMTAN`: NYUv2 and Cityscapes (dense prediction), as in the
  MTAN code reused by the CAGrad and Nash-MTL code.
* :class:`MultiLeNet`: MultiMNIST, as in Sener & Koltun's code.
* :class:`ResNet18`: CelebA, as in Sener & Koltun's code.

Every model is a :class:`~experiments.benchmarks.base.MultiTaskModel`: ``.trunk`` holds every
parameter that more than one task uses (``shared_parameters()``, a gradient strategy's
``shared_params=``), ``.heads[task]`` only that task's parameters, and ``forward(x)`` returns
``(features, {task: output})`` where ``features`` is a tensor every output is computed from (a
gradient strategy's ``features=``). Outputs are raw: classification and segmentation give logits
(the reference code's ``log_softmax`` + NLL is cross-entropy on logits), so the losses belong to
the benchmark, not to the network.

No torchvision: its wheels do not work with the CPU build of torch used here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.benchmarks.base import MultiTaskModel

__all__ = [
    "TASK_KINDS",
    "BasicBlock",
    "DensePrediction",
    "MTANHead",
    "MTANSharedBlocks",
    "MTANTrunk",
    "MultiLeNet",
    "ResNet18",
    "ResNet18Trunk",
    "SegNet",
    "SegNetEncoderDecoder",
    "SegNetMTAN",
    "SegNetMaps",
]

# The dense-prediction task kinds and the channels each one predicts (segmentation: `classes`).
TASK_KINDS = ("segmentation", "depth", "normal")
SEGNET_CHANNELS = (64, 128, 256, 512, 512)  # VGG-16's widths per resolution level
LEVELS = len(SEGNET_CHANNELS)  # five 2× poolings: inputs must be divisible by 2**5
DIVISOR = 2**LEVELS


# --------------------------------------------------------------------------- helpers
def _scaled(channels: int, width: float) -> int:
    """``channels · width`` rounded, at least 1 (``width`` shrinks networks for fast tests)."""
    return max(1, round(channels * width))


def _check_width(width: float) -> None:
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")


def _check_names(tasks: Iterable[str]) -> tuple[str, ...]:
    names = tuple(tasks)
    if not names:
        raise ValueError("tasks is empty: give at least one task")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks has duplicate names: {list(names)}")
    for name in names:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"task names must be non-empty strings without '.', got {name!r}")
    return names


def _check_kinds(tasks: Mapping[str, str]) -> dict[str, str]:
    if isinstance(tasks, str) or not isinstance(tasks, Mapping):
        raise ValueError(
            f"tasks must map each task name to its kind (one of {', '.join(TASK_KINDS)}), "
            f"e.g. {{'segmentation': 'segmentation', 'depth': 'depth'}}; got {tasks!r}"
        )
    _check_names(tasks)
    for name, kind in tasks.items():
        if kind not in TASK_KINDS:
            raise ValueError(
                f"task {name!r}: unknown task kind {kind!r}; the kinds are {', '.join(TASK_KINDS)}"
            )
    return dict(tasks)


def _check_dense_input(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"SegNet takes RGB images [B, 3, H, W], got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height % DIVISOR or width % DIVISOR:
        raise ValueError(
            f"SegNet needs H and W divisible by {DIVISOR} (it pools 2× {LEVELS} times), got "
            f"{height}×{width}: crop or pad the input (NYUv2 288×384 and Cityscapes 128×256 are)"
        )


def _conv_bn_relu(inputs: int, outputs: int) -> nn.Sequential:
    """The MTAN code's SegNet unit: Conv3×3 (with bias) → BatchNorm → ReLU."""
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel_size=3, padding=1),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),  # acts on the fresh BatchNorm output only, never on a shared map
    )


def _init_like_mtan(module: nn.Module) -> None:
    """The MTAN code's initialisation: Xavier-normal convolutions with zero bias; BatchNorm at
    weight 1, bias 0 (PyTorch's default)."""
    for layer in module.modules():
        if any(p.is_meta for p in layer.parameters(recurse=False)):
            continue  # a shape-only build (e.g. to count parameters) has no values to set
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


# --------------------------------------------------------------------------- SegNet parts
@dataclass(frozen=True)
class SegNetMaps:
    """The shared maps of one :class:`SegNetEncoderDecoder` pass.

    ``encoder_entry[l]`` / ``encoder_out[l]``: the output of level ``l``'s first convolution and
    of its last one (before pooling), fine to coarse (``l = 0`` at full resolution).
    ``unpooled[s]`` / ``decoder_out[s]``: at decoder step ``s`` (coarse to fine), the unpooled
    map and the output of that step's convolutions. ``features`` is ``decoder_out[-1]``.
    """

    encoder_entry: list[Tensor]
    encoder_out: list[Tensor]
    unpooled: list[Tensor]
    decoder_out: list[Tensor]

    @property
    def features(self) -> Tensor:
        """The last shared decoder map ``[B, c0, H, W]``: what every head reads."""
        return self.decoder_out[-1]


class SegNetEncoderDecoder(nn.Module):
    """The shared SegNet of the MTAN code: a VGG-16-style encoder (2, 2, 3, 3, 3 conv units at
    widths ``channels``), each level max-pooled 2× with its indices kept, and a mirrored decoder
    that unpools with those indices (3, 3, 3, 2, 2 units). ``forward`` returns every shared map
    (:class:`SegNetMaps`), because MTAN's attention modules read the intermediate ones.
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        c = list(channels)
        if len(c) != LEVELS:
            raise ValueError(f"channels must give {LEVELS} widths, got {c}")
        self.channels = tuple(c)
        inputs = [3, *c[:-1]]
        self.encoder_entry = nn.ModuleList(_conv_bn_relu(inputs[i], c[i]) for i in range(LEVELS))
        # Levels 0 and 1 have one more unit after the entry, levels 2-4 two more (VGG-16).
        self.encoder_body = nn.ModuleList(
            nn.Sequential(*(_conv_bn_relu(c[i], c[i]) for _ in range(1 if i < 2 else 2)))
            for i in range(LEVELS)
        )
        # Decoder, in step order (coarse to fine): level l maps c[l] to c[l - 1] (c[0] at l = 0).
        self.decoder_entry = nn.ModuleList()
        self.decoder_body = nn.ModuleList()
        for level in reversed(range(LEVELS)):
            out = c[max(level - 1, 0)]
            self.decoder_entry.append(_conv_bn_relu(c[level], out))
            units = 1 if level < 2 else 2
            self.decoder_body.append(
                nn.Sequential(*(_conv_bn_relu(out, out) for _ in range(units)))
            )

    def forward(self, images: Tensor) -> SegNetMaps:
        _check_dense_input(images)
        entries, outs, indices = [], [], []
        x = images
        for entry, body in zip(self.encoder_entry, self.encoder_body):
            first = entry(x)
            last = body(first)
            x, where = F.max_pool2d(last, kernel_size=2, stride=2, return_indices=True)
            entries.append(first)
            outs.append(last)
            indices.append(where)
        unpooled, decoded = [], []
        for step, (entry, body) in enumerate(zip(self.decoder_entry, self.decoder_body)):
            level = LEVELS - 1 - step
            # The output size is given so that unpooling inverts the pooling exactly.
            up = F.max_unpool2d(
                x, indices[level], (2, 2), (2, 2), output_size=outs[level].shape[-2:]
            )
            x = body(entry(up))
            unpooled.append(up)
            decoded.append(x)
        return SegNetMaps(entries, outs, unpooled, decoded)


class DensePrediction(nn.Module):
    """A task's prediction layer in the MTAN code: Conv3×3 ``c→c`` then Conv1×1 ``c→out``, no
    normalisation or nonlinearity between them. ``kind`` sets ``out`` (``classes`` logits,
    1 depth, 3 normal) and, for ``"normal"``, L2-normalises the output over channels."""

    def __init__(self, channels: int, kind: str, classes: int) -> None:
        super().__init__()
        if kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {kind!r}; the kinds are {', '.join(TASK_KINDS)}")
        if kind == "segmentation" and classes < 1:
            raise ValueError(f"classes must be at least 1, got {classes}")
        self.kind = kind
        out = {"segmentation": classes, "depth": 1, "normal": 3}[kind]
        self.hidden = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.output = nn.Conv2d(channels, out, kernel_size=1)

    def forward(self, features: Tensor) -> Tensor:
        y = self.output(self.hidden(features))
        if self.kind == "normal":
            # The reference divides by the norm; the eps only guards an all-zero pixel.
            y = F.normalize(y, p=2.0, dim=1, eps=1e-12)
        return y


# --------------------------------------------------------------------------- SegNet
class SegNet(MultiTaskModel):
    """The "split" SegNet multi-task baseline: a shared SegNet encoder-decoder and one
    prediction layer per task, all reading the last shared decoder map.

    Architecture: SegNet (Badrinarayanan, Kendall & Cipolla, "SegNet: A Deep Convolutional
    Encoder-Decoder Architecture for Image Segmentation", IEEE TPAMI 2017, arXiv:1511.00561) in
    the form of the MTAN code (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019, arXiv:1803.10704; github.com/lorenmt/mtan,
    ``im2im_pred/model_segnet_split.py``, ``--type standard``), which the CAGrad
    (github.com/Cranial-XIX/CAGrad, ``nyuv2/model_segnet_split.py``) and Nash-MTL
    (github.com/AvivNavon/nash-mtl, ``experiments/nyuv2/models.py``, ``SegNetSplit``) NYUv2 and
    Cityscapes code reuse: Conv3×3–BatchNorm–ReLU units at widths 64, 128, 256, 512, 512
    (VGG-16's 13 convolutions in the encoder, 13 mirrored ones in the decoder), 2×2 max pooling
    whose indices drive max-unpooling in the decoder, Xavier-normal initialisation. Each head
    is :class:`DensePrediction` (Conv3×3 64→64, Conv1×1 64→out).

    ``tasks`` maps each task name to its kind: ``"segmentation"`` (``[B, classes, H, W]``),
    ``"depth"`` (``[B, 1, H, W]``) or ``"normal"`` (``[B, 3, H, W]``, unit length over the
    channels, normalised inside that head). ``features`` is the last shared decoder map
    ``[B, 64·width, H, W]``; it is the only path from the trunk to the outputs, so a gradient
    strategy's ``features=`` sees the trunk's whole gradient. H and W must be divisible by 32.

    Where this deviates from that code, and why:

    * segmentation outputs raw logits, not ``log_softmax`` (its NLL on log-probabilities is
      cross-entropy on logits: the benchmark's loss does it);
    * the normal head divides by ``max(‖y‖, 1e-12)`` rather than ``‖y‖`` (no NaN at zero);
    * no ``logsigma`` parameter (the code's uncertainty weights; here a strategy owns them), so
      the count is 3 below what ``model_segnet_split.py`` prints and equal to Nash-MTL's;
    * any set of tasks (the code hard-codes three) and ``width`` scaling every channel count
      (``round(c · width)``, at least 1; ``width=1`` is the paper's network).

    >>> model = SegNet({"segmentation": "segmentation", "depth": "depth"}, classes=7, width=0.125)
    >>> features, outputs = model(torch.randn(2, 3, 32, 64))
    >>> tuple(features.shape), {t: tuple(y.shape) for t, y in outputs.items()}
    ((2, 8, 32, 64), {'segmentation': (2, 7, 32, 64), 'depth': (2, 1, 32, 64)})
    """

    def __init__(self, tasks: Mapping[str, str], *, classes: int = 13, width: float = 1.0) -> None:
        super().__init__()
        kinds = _check_kinds(tasks)
        _check_width(width)
        channels = [_scaled(c, width) for c in SEGNET_CHANNELS]
        self.kinds = kinds
        self.trunk = SegNetEncoderDecoder(channels)
        self.heads = nn.ModuleDict(
            {t: DensePrediction(channels[0], kind, classes) for t, kind in kinds.items()}
        )
        _init_like_mtan(self)

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.trunk(images).features
        return features, {t: head(features) for t, head in self.heads.items()}


# --------------------------------------------------------------------------- SegNet-MTAN
def _attention(inputs: int, channels: int) -> nn.Sequential:
    """An MTAN attention module: Conv1×1–BN–ReLU–Conv1×1–BN–Sigmoid, a soft mask in (0, 1)."""
    return nn.Sequential(
        nn.Conv2d(inputs, channels, kernel_size=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, kernel_size=1),
        nn.BatchNorm2d(channels),
        nn.Sigmoid(),
    )


class MTANSharedBlocks(nn.Module):
    """The Conv3×3–BN–ReLU units *inside* the attention branches that all tasks share in the
    MTAN code (``encoder_block_att``, ``decoder_block_att``): ``encoder[l]`` maps a masked level-
    ``l`` map to the next level's width (the last keeps ``c[4]``); ``decoder[s]`` (step order,
    coarse to fine) maps the upsampled branch to the width of that step's shared decoder map
    (the coarsest keeps ``c[4]``, as in that code; SegNet's ``c[3] == c[4]`` makes it fit)."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        c = list(channels)
        self.encoder = nn.ModuleList(
            _conv_bn_relu(c[i], c[min(i + 1, LEVELS - 1)]) for i in range(LEVELS)
        )
        self.decoder = nn.ModuleList(
            _conv_bn_relu(c[level], c[level] if level == LEVELS - 1 else c[max(level - 1, 0)])
            for level in reversed(range(LEVELS))
        )


class MTANTrunk(nn.Module):
    """SegNet-MTAN's shared part: the SegNet encoder-decoder (``backbone``) and the attention
    branches' shared units (``attention``). ``forward`` returns the backbone's maps."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.backbone = SegNetEncoderDecoder(channels)
        self.attention = MTANSharedBlocks(channels)

    def forward(self, images: Tensor) -> SegNetMaps:
        return self.backbone(images)


class MTANHead(nn.Module):
    """One task's part of SegNet-MTAN: its attention modules and its prediction layer.

    ``forward(maps, shared)`` takes the trunk's :class:`SegNetMaps` and the trunk's
    :class:`MTANSharedBlocks` (passed in, never owned, so a head holds only its task's
    parameters). Encoder level ``l``: a mask from that level's entry map (concatenated with the
    branch so far, from level 1 on) gates the level's output; a shared unit and 2× max pooling
    carry it on. Decoder step ``s``: the branch is upsampled 2× (bilinear, corners aligned), a
    shared unit adapts its width, a mask from it and the unpooled shared map gates the step's
    shared decoder map. The last gated map goes to :class:`DensePrediction`.
    """

    def __init__(self, channels: Sequence[int], kind: str, classes: int) -> None:
        super().__init__()
        c = list(channels)
        self.encoder_attention = nn.ModuleList(
            _attention(c[i] if i == 0 else 2 * c[i], c[i]) for i in range(LEVELS)
        )
        # Decoder step at level l: the unpooled map (c[l]) beside the adapted branch; the mask
        # has the width of that step's decoder output (c[l - 1], c[0] at level 0).
        self.decoder_attention = nn.ModuleList(
            _attention(c[level] + c[max(level - 1, 0)], c[max(level - 1, 0)])
            for level in reversed(range(LEVELS))
        )
        self.prediction = DensePrediction(c[0], kind, classes)

    def forward(self, maps: SegNetMaps, shared: MTANSharedBlocks) -> Tensor:
        branch: Tensor | None = None
        for level, gate in enumerate(self.encoder_attention):
            entry = maps.encoder_entry[level]
            mask = gate(entry if branch is None else torch.cat([entry, branch], dim=1))
            branch = F.max_pool2d(shared.encoder[level](mask * maps.encoder_out[level]), 2, 2)
        assert branch is not None
        for step, gate in enumerate(self.decoder_attention):
            up = F.interpolate(branch, scale_factor=2, mode="bilinear", align_corners=True)
            up = shared.decoder[step](up)
            mask = gate(torch.cat([maps.unpooled[step], up], dim=1))
            branch = mask * maps.decoder_out[step]
        return self.prediction(branch)


class SegNetMTAN(MultiTaskModel):
    """SegNet with MTAN's task-specific attention: the Multi-Task Attention Network of Liu,
    Johns & Davison ("End-to-End Multi-Task Learning with Attention", CVPR 2019,
    arXiv:1803.10704) on the :class:`SegNet` backbone, as in their code
    (github.com/lorenmt/mtan, ``im2im_pred/model_segnet_mtan.py``) and its copies in the CAGrad
    (``nyuv2/model_segnet_mtan.py``) and Nash-MTL (``experiments/nyuv2/models.py``,
    ``SegNetMtan``) code, the network behind their NYUv2 and Cityscapes tables.

    Each task has one attention module per encoder level and per decoder step
    (:class:`MTANHead`); the 3×3 units inside the attention branches are shared by all tasks
    in that code, so they live in the trunk (:class:`MTANTrunk`), not in the heads: ``.trunk``
    is the SegNet encoder-decoder plus those units (35 163 456 parameters at ``width=1``, the
    modules CAGrad's ``shared_modules()`` lists), ``.heads[task]`` that task's attention
    modules and prediction layer. (Nash-MTL's ``shared_parameters()`` is every parameter but
    the prediction layers, the task attention modules included: 44 117 184 for 3 tasks.)

    ``features`` is the last shared decoder map, which every task's last attention mask gates.
    The attention branches also read the earlier shared maps (every encoder level, every
    unpooled and decoded map), so the trunk's gradient does not all pass through ``features``:
    a gradient strategy given ``features=`` computes its weights (or its direction) from the
    gradient through that map only; a method that combines the task gradients then backpropagates
    its weighted sum everywhere, and one that rewrites the gradient (GradDrop, MoCo) rewrites it at
    ``features`` only, the rest getting the plain sum's gradient. ``shared_params=`` is exact.

    Outputs and deviations are those of :class:`SegNet` (raw segmentation logits, normals
    normalised with an eps, no ``logsigma``, any tasks, ``width``); H and W must be divisible by
    32.

    >>> model = SegNetMTAN({"depth": "depth", "normal": "normal"}, width=0.125)
    >>> features, outputs = model(torch.randn(2, 3, 32, 32))
    >>> tuple(features.shape), tuple(outputs["normal"].shape)
    ((2, 8, 32, 32), (2, 3, 32, 32))
    >>> bool(torch.allclose(outputs["normal"].norm(dim=1), torch.ones(2, 32, 32)))
    True
    """

    trunk: MTANTrunk

    def __init__(self, tasks: Mapping[str, str], *, classes: int = 13, width: float = 1.0) -> None:
        super().__init__()
        kinds = _check_kinds(tasks)
        _check_width(width)
        channels = [_scaled(c, width) for c in SEGNET_CHANNELS]
        self.kinds = kinds
        self.trunk = MTANTrunk(channels)
        self.heads = nn.ModuleDict(
            {t: MTANHead(channels, kind, classes) for t, kind in kinds.items()}
        )
        _init_like_mtan(self)

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        maps = self.trunk(images)
        shared = self.trunk.attention
        return maps.features, {t: head(maps, shared) for t, head in self.heads.items()}


# --------------------------------------------------------------------------- MultiMNIST
class MultiLeNet(MultiTaskModel):
    """Sener & Koltun's MultiMNIST LeNet: a shared LeNet trunk and an MLP head per digit.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    arXiv:1810.04650; their code github.com/isl-org/MultiObjectiveOptimization,
    ``multi_task/models/multi_lenet.py`` (``MultiLeNetR`` trunk, ``MultiLeNetO`` heads).

    Trunk on ``[B, 1, 28, 28]``: Conv5×5(1→10) – MaxPool2 – ReLU – Conv5×5(10→20) –
    Dropout2d – MaxPool2 – ReLU – flatten (20·4·4 = 320) – Linear(320→50) – ReLU; ``features``
    is this 50-d output. Each head: Linear(50→50) – ReLU – Dropout – Linear(50→classes),
    returning raw logits (their head returns ``log_softmax`` for an NLL loss, which together are
    cross-entropy on these logits).

    Deviation: their dropout draws Bernoulli(0.5) masks and does not rescale (the trunk's
    channel mask is one ``[1, 20, 1, 1]`` mask for the whole batch, the heads' is per element;
    evaluation applies none, so test activations are about twice the training ones); here it is
    PyTorch's inverted dropout (``nn.Dropout2d`` per example and channel, ``nn.Dropout``; scaled
    by ``1/(1 − p)`` in training), with ``p = dropout``. Their MGDA-UB loop reuses the masks of
    its gradient pass in the update pass; one forward here gives the same.

    >>> model = MultiLeNet(["left", "right"]).eval()
    >>> features, logits = model(torch.zeros(3, 1, 28, 28))
    >>> tuple(features.shape), {t: tuple(y.shape) for t, y in logits.items()}
    ((3, 50), {'left': (3, 10), 'right': (3, 10)})
    """

    IMAGE = (1, 28, 28)

    def __init__(self, tasks: Sequence[str], *, classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        names = _check_names([tasks] if isinstance(tasks, str) else tasks)
        if classes < 1:
            raise ValueError(f"classes must be at least 1, got {classes}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 10, kernel_size=5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(10, 20, kernel_size=5),
            nn.Dropout2d(dropout),  # before pooling, as in their code
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(320, 50),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.Linear(50, 50), nn.ReLU(), nn.Dropout(dropout), nn.Linear(50, classes)
                )
                for t in names
            }
        )

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.IMAGE:
            raise ValueError(f"MultiLeNet takes [B, 1, 28, 28] images, got {tuple(images.shape)}")
        features = self.trunk(images)
        return features, {t: head(features) for t, head in self.heads.items()}


# --------------------------------------------------------------------------- CelebA
class BasicBlock(nn.Module):
    """ResNet's basic block (He et al., CVPR 2016): two Conv3×3–BN with a ReLU between, the
    input added back (through Conv1×1–BN when the stride or width changes), then a ReLU."""

    def __init__(self, inputs: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet18Trunk(nn.Module):
    """Sener & Koltun's CelebA ResNet-18 without its classifier: a Conv3×3 stride-1 stem (no
    max pooling), four stages of two :class:`BasicBlock` (widths 64, 128, 256, 512; strides
    1, 2, 2, 2), 4×4 average pooling with stride 4, flattened. A 64×64 input leaves an 8×8 map,
    pooled to 2×2: ``512 · 2 · 2 = 2048`` features."""

    def __init__(self, *, width: float = 1.0, image_size: int = 64) -> None:
        super().__init__()
        _check_width(width)
        if image_size < 32 or image_size % 32:
            raise ValueError(
                f"image_size must be a positive multiple of 32 (three stride-2 stages, then 4×4 "
                f"average pooling), got {image_size}"
            )
        widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
        self.image_size = image_size
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, inputs = [], widths[0]
        for index, channels in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(inputs, channels, stride), BasicBlock(channels, channels))
            )
            inputs = channels
        self.stages = nn.Sequential(*stages)
        side = image_size // 8 // 4
        self.out_features = widths[-1] * side * side

    def forward(self, images: Tensor) -> Tensor:
        size = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"this ResNet18 takes [B, 3, {size}, {size}] images (image_size={size}), got "
                f"{tuple(images.shape)}"
            )
        y = self.stages(self.stem(images))
        return F.avg_pool2d(y, 4).flatten(1)


class ResNet18(MultiTaskModel):
    """Sener & Koltun's CelebA network: a ResNet-18 trunk and one linear classifier per
    attribute.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    arXiv:1810.04650; their code github.com/isl-org/MultiObjectiveOptimization,
    ``multi_task/models/multi_faces_resnet.py`` (``ResNet(BasicBlock, [2, 2, 2, 2])`` as the
    trunk, ``FaceAttributeDecoder`` heads, wired in ``model_selector.py``), on 64×64 images.

    It is the CIFAR-style ResNet-18 that code adapts, not torchvision's ImageNet one: the stem
    is Conv3×3 stride 1 (torchvision: Conv7×7 stride 2, then 3×3 max pooling), and the end is
    ``avg_pool2d(·, 4)`` rather than global pooling, so a 64×64 image leaves a 2×2×512 map and
    ``features`` has 2048 values, not 512 (:class:`ResNet18Trunk`). Each head is their
    ``Linear(2048, 2)``, giving raw logits (their ``log_softmax`` + NLL is cross-entropy on
    them). Default PyTorch initialisation, as in their code.

    Deviations: ``classes`` (2 in their code) and, for fast tests, ``width`` (scales the stage
    widths) and ``image_size`` (a multiple of 32; the head's input is sized from it).

    >>> model = ResNet18(["Smiling", "Male"], width=0.125, image_size=32)
    >>> features, logits = model(torch.randn(2, 3, 32, 32))
    >>> tuple(features.shape), tuple(logits["Male"].shape)
    ((2, 64), (2, 2))
    """

    trunk: ResNet18Trunk

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        classes: int = 2,
        width: float = 1.0,
        image_size: int = 64,
    ) -> None:
        super().__init__()
        names = _check_names([tasks] if isinstance(tasks, str) else tasks)
        if classes < 1:
            raise ValueError(f"classes must be at least 1, got {classes}")
        self.trunk = ResNet18Trunk(width=width, image_size=image_size)
        self.heads = nn.ModuleDict({t: nn.Linear(self.trunk.out_features, classes) for t in names})

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.trunk(images)
        return features, {t: head(features) for t, head in self.heads.items()}
