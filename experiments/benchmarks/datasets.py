"""Readers of the real benchmark data: NYUv2 and Cityscapes (the MTAN ``.npy`` preprocessing),
MNIST (IDX files) made into MultiMNIST, and CelebA (the official files).

An item is ``(input, {task: target})``, channels first, inputs ``float32``. Nothing is downloaded:
every missing or malformed file raises :class:`~experiments.benchmarks.base.DataError`, whose
message names the file expected and where the data comes from.
:mod:`experiments.benchmarks.synthetic` writes small fake copies in the same formats:

>>> import tempfile
>>> from experiments.benchmarks.synthetic import write_mnist
>>> with tempfile.TemporaryDirectory() as tmp:
...     data = multimnist_dataset(write_mnist(tmp, train=30, test=10), "test")
...     image, targets = data[0]
>>> len(data), tuple(image.shape), image.dtype, sorted(targets)
(10, (1, 28, 28), torch.float32, ['left', 'right'])
"""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from experiments.benchmarks.base import DataError, require_file

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "CELEBA_ATTRIBUTES",
    "CELEBA_MEAN_BGR",
    "CELEBA_SOURCE",
    "CITYSCAPES_SHAPE",
    "CITYSCAPES_SOURCE",
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_SOURCE",
    "MNIST_STD",
    "NYUV2_SHAPE",
    "NYUV2_SOURCE",
    "SCALES",
    "CelebADataset",
    "DenseNpyDataset",
    "MultiMNISTDataset",
    "augment_dense",
    "celeba_dataset",
    "celeba_transform",
    "cityscapes_dataset",
    "find_mnist_file",
    "hflip",
    "load_mnist",
    "multimnist_dataset",
    "multimnist_overlay",
    "nyuv2_dataset",
    "read_idx",
    "scale_crop",
]

Item = tuple[Tensor, dict[str, Tensor]]

NYUV2_SOURCE = (
    "NYUv2 is the preprocessed NYUv2 of the MTAN repository (github.com/lorenmt/mtan, README: "
    "nyuv2.zip), used unchanged by CAGrad, Nash-MTL and FAMO: unzip it and pass the folder "
    "that holds train/ and val/."
)
CITYSCAPES_SOURCE = (
    "Cityscapes is the preprocessed 128×256 Cityscapes of the MTAN repository "
    "(github.com/lorenmt/mtan, README: cityscapes2.zip), as CAGrad's cityscapes/create_dataset.py "
    "(github.com/Cranial-XIX/CAGrad) reads it: unzip it and pass the folder that holds train/ "
    "and val/."
)
MNIST_SOURCE = (
    "MNIST is the four IDX files of LeCun, Cortes & Burges (yann.lecun.com/exdb/mnist, "
    "mirrored by torchvision), train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, plain or .gz, in one folder."
)
CELEBA_SOURCE = (
    "CelebA is the official release of Liu, Luo, Wang & Tang (ICCV 2015, "
    "mmlab.ie.cuhk.edu.hk/projects/CelebA.html): img_align_celeba/ (unzipped "
    "img_align_celeba.zip), list_attr_celeba.txt and list_eval_partition.txt in one folder (or "
    "the release's Img/, Anno/ and Eval/ subfolders)."
)

# =========================================================================== NYUv2, Cityscapes
NYUV2_SHAPE = (288, 384)
CITYSCAPES_SHAPE = (128, 256)
SCALES = (1.0, 1.2, 1.5)
# How each target is stored (trailing channels of the HWC file; None: an [H, W] file).
_TARGET_CHANNELS: dict[str, int | None] = {"segmentation": None, "depth": 1, "normal": 3}
_FLOAT = "f"
_NUMBER = "fiu"


class DenseNpyDataset(Dataset[Item]):
    """The MTAN ``.npy`` layout: ``<root>/<split>/<subdir>/<i>.npy``, ``i = 0 … N−1``.

    Source: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019,
    arXiv:1803.10704, and their loader ``im2im_pred/create_dataset.py``
    (github.com/lorenmt/mtan), copied by CAGrad (``cityscapes/create_dataset.py``,
    github.com/Cranial-XIX/CAGrad) and Nash-MTL (``experiments/nyuv2/data.py``,
    github.com/AvivNavon/nash-mtl). That code counts the ``*.npy`` files of ``image/`` and reads
    ``<subdir>/{i:d}.npy`` (no zero padding) for ``i < N``; files are height × width ×
    channels and the loader moves channels first.

    ``split`` is ``"train"`` or ``"val"``; ``"val"`` is the test split of those papers
    (``"test"`` is accepted for it too). ``layout`` maps each target to its subdirectory; a
    target is ``"segmentation"`` (file ``[H, W]``, item ``[H, W]`` ``long``, −1 = ignore),
    ``"depth"`` (file ``[H, W, 1]``, item ``[1, H, W]``, 0 = no measurement) or ``"normal"``
    (file ``[H, W, 3]``, item ``[3, H, W]``, all-zero = invalid). The image is ``image/``
    (``[H, W, 3]``, item ``[3, H, W]``).

    The invalid markers are the references' loss masks: ``nll_loss(ignore_index=-1)``, and
    depth / normal pixels whose channels sum to 0 are left out (``utils.py`` of MTAN and CAGrad).
    The references call ``.float()`` on every array, so they do not pin the stored dtype: the
    released image files are ``float64`` on a 1/255 grid (an array printed in MTAN issue #50),
    and the labels must be floating point for the references' augmentation (it resizes them
    with ``F.interpolate``); integer labels are accepted here anyway.

    Deviations: segmentation comes back as ``long`` (the references return ``float`` and call
    ``.long()`` in the training loop: same values); files are converted to ``float32`` before
    the augmentation (the references augment in the stored precision and convert afterwards).

    Construction checks the directories and that every subdirectory holds the same indices
    ``0 … N−1``; reading a file checks its shape and dtype (floating point; the labels may be
    integers too) and that labels are whole numbers in ``[−1, classes)``.

    ``augment=True`` applies :func:`augment_dense` to the train split (never to val/test),
    drawing from ``generator`` or, when it is ``None``, torch's global RNG. A DataLoader seeds
    the global RNG of each worker differently; a generator passed here is copied into every
    worker with the same state, so pass one only for single-process loading.

    >>> import tempfile
    >>> from experiments.benchmarks.synthetic import write_nyuv2
    >>> layout = {"segmentation": "label", "depth": "depth", "normal": "normal"}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     root = write_nyuv2(tmp, train=2, test=1, shape=(6, 8))
    ...     data = DenseNpyDataset(root, "train", layout=layout, shape=(6, 8), classes=13)
    ...     image, targets = data[1]
    >>> len(data), tuple(image.shape), {t: tuple(y.shape) for t, y in targets.items()}
    (2, (3, 6, 8), {'segmentation': (6, 8), 'depth': (1, 6, 8), 'normal': (3, 6, 8)})
    >>> targets["segmentation"].dtype, int(targets["segmentation"].min())
    (torch.int64, -1)
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        layout: Mapping[str, str],
        shape: tuple[int, int],
        classes: int | None = None,
        augment: bool = False,
        generator: torch.Generator | None = None,
        source: str = "",
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train' or 'val' ('test' = 'val'), not {split!r}")
        unknown = set(layout) - set(_TARGET_CHANNELS)
        if unknown:
            raise ValueError(f"unknown targets {sorted(unknown)}: known {sorted(_TARGET_CHANNELS)}")
        self.source = source
        self.shape = (int(shape[0]), int(shape[1]))
        self.classes = classes
        self.augment = augment and split == "train"
        self.generator = generator
        self.directory = require_file(
            Path(root).expanduser() / ("train" if split == "train" else "val"), source
        )
        self.subdirs = {"image": "image", **layout}
        folders = {
            key: require_file(self.directory / sub, source) for key, sub in self.subdirs.items()
        }
        image_indices = _npy_indices(folders["image"], source)
        if not image_indices:
            raise DataError(f"{folders['image']} holds no .npy files. {source}")
        missing = sorted(set(range(len(image_indices))) - image_indices)
        if missing:
            raise DataError(
                f"{folders['image'] / f'{missing[0]}.npy'} not found: {folders['image']} holds "
                f"{len(image_indices)} .npy files, and the loaders read 0.npy … "
                f"{len(image_indices) - 1}.npy. {source}"
            )
        for folder in folders.values():
            indices = _npy_indices(folder, source)
            if indices != image_indices:
                lacking = sorted(image_indices - indices)
                if lacking:
                    raise DataError(
                        f"{folder / f'{lacking[0]}.npy'} not found: every folder of "
                        f"{self.directory} needs one file per image. {source}"
                    )
                extra = f"{min(indices - image_indices)}.npy"
                raise DataError(
                    f"{folder / extra} has no image {folders['image'] / extra}: every folder of "
                    f"{self.directory} needs the same indices. {source}"
                )
        self.length = len(image_indices)

    def __len__(self) -> int:
        return self.length

    def path(self, key: str, index: int) -> Path:
        """The file of ``key`` (``"image"`` or a target) for item ``index``."""
        return self.directory / self.subdirs[key] / f"{index}.npy"

    def __getitem__(self, index: int) -> Item:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        index %= self.length
        height, width = self.shape
        image = self._read("image", index, (height, width, 3), _FLOAT)
        targets: dict[str, Tensor] = {}
        for task, channels in _TARGET_CHANNELS.items():
            if task not in self.subdirs:
                continue
            if channels is None:
                targets[task] = self._labels(index)
            else:
                array = self._read(task, index, (height, width, channels), _FLOAT)
                targets[task] = array.permute(2, 0, 1).float().contiguous()
        image = image.permute(2, 0, 1).float().contiguous()
        if self.augment:
            image, targets = augment_dense(image, targets, generator=self.generator)
        return image, targets

    def _read(self, key: str, index: int, shape: tuple[int, ...], kinds: str) -> Tensor:
        path = self.path(key, index)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise DataError(
                f"{path} not found: expected {path.name} there. {self.source}"
            ) from None
        except (ValueError, OSError) as error:
            raise DataError(
                f"{path} is not a readable .npy file ({error}). {self.source}"
            ) from None
        if array.shape != shape or array.dtype.kind not in kinds:
            wanted = "floating-point" if kinds == _FLOAT else "numeric"
            raise DataError(
                f"{path} holds shape {array.shape} dtype {array.dtype}; expected shape {shape}, "
                f"{wanted} (height × width × channels as stored by MTAN). {self.source}"
            )
        return torch.from_numpy(np.array(array))  # a copy out of the memory map

    def _labels(self, index: int) -> Tensor:
        labels = self._read("segmentation", index, self.shape, _NUMBER)
        path = self.path("segmentation", index)
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise DataError(f"{path} holds non-integer labels. {self.source}")
        labels = labels.long()
        top = self.classes if self.classes is not None else math.inf
        low, high = int(labels.min()), int(labels.max())
        if low < -1 or high >= top:
            raise DataError(
                f"{path} holds labels {low} … {high}; expected −1 (ignored) or 0 … {top - 1}. "
                f"{self.source}"
            )
        return labels


def _npy_indices(folder: Path, source: str) -> set[int]:
    """The ``i`` of the ``<i>.npy`` files in ``folder`` (other files are ignored, as by the
    references, which count ``*.npy`` only)."""
    indices = set()
    for path in folder.glob("*.npy"):
        # The references open f"{i:d}.npy": "01.npy" or "a.npy" would never be read.
        if not re.fullmatch(r"0|[1-9][0-9]*", path.stem):
            raise DataError(f"{path}: expected files named <i>.npy (0.npy, 1.npy, …). {source}")
        indices.add(int(path.stem))
    return indices


def nyuv2_dataset(
    root: str | Path, split: str, augment: bool = False, *, generator: torch.Generator | None = None
) -> DenseNpyDataset:
    """NYUv2 with 3 tasks as MTAN preprocessed it (795 train / 654 val = test images in the
    MTAN paper): ``<root>/{train,val}/{image,label,depth,normal}/<i>.npy``, 288×384, 13 classes
    (labels −1 … 12, MTAN issue #11).

    Items ``(image [3, 288, 384], {"segmentation": [288, 384] long (−1 ignored), "depth":
    [1, 288, 384] (0 = no measurement), "normal": [3, 288, 384] (0 = invalid)})``. The image is
    in ``[0, 1]`` and depth in metres (MTAN issue #15) in the released files; neither is
    rescaled here. ``augment`` as in Nash-MTL's and CAGrad's NYUv2 runs (see
    :class:`DenseNpyDataset`; Nash-MTL turns it on by default, MTAN's paper had none).
    """
    layout = {"segmentation": "label", "depth": "depth", "normal": "normal"}
    return DenseNpyDataset(
        root,
        split,
        layout=layout,
        shape=NYUV2_SHAPE,
        classes=13,
        augment=augment,
        generator=generator,
        source=NYUV2_SOURCE,
    )


def cityscapes_dataset(
    root: str | Path,
    split: str,
    augment: bool = False,
    classes: int = 7,
    *,
    generator: torch.Generator | None = None,
) -> DenseNpyDataset:
    """Cityscapes with 2 tasks as MTAN preprocessed it (128×256):
    ``<root>/{train,val}/{image,label_<classes>,depth}/<i>.npy``.

    CAGrad reads ``label_7`` (7 classes, −1 ignored: MTAN issue #41). MTAN's README says the
    release has 2-, 7- and 19-class labels; ``classes=19`` reads ``label_19``, a name taken by
    analogy (no reference code reads it). Items ``(image [3, 128, 256], {"segmentation": [128,
    256] long, "depth": [1, 128, 256]})``; the depth is the release's inverse depth (scaled
    disparity, MTAN issues #15 and #25), 0 = no measurement (the loss mask of CAGrad's
    ``cityscapes/utils.py``). ``augment`` as in CAGrad's Cityscapes runs (``run.sh`` passes
    ``--apply_augmentation``): scale crop and flip, no normals.
    """
    if classes not in (7, 19):
        raise ValueError(f"classes must be 7 or 19, not {classes}")
    return DenseNpyDataset(
        root,
        split,
        layout={"segmentation": f"label_{classes}", "depth": "depth"},
        shape=CITYSCAPES_SHAPE,
        classes=classes,
        augment=augment,
        generator=generator,
        source=CITYSCAPES_SOURCE,
    )


def scale_crop(
    image: Tensor, targets: Mapping[str, Tensor], *, scale: float, top: int, left: int
) -> Item:
    """Crop ``int(H / scale)`` × ``int(W / scale)`` pixels at ``(top, left)`` and resize them
    back to ``H × W``: the image and normals bilinearly (``align_corners=True``), segmentation
    and depth by nearest neighbour (torch's ``"nearest"``), and depth divided by ``scale`` (a
    zoom by ``scale`` brings the scene that much closer). Normals are not renormalised.

    This is the ``RandomScaleCrop`` of CAGrad and Nash-MTL (credited there to Jialong Wu, MTAN
    issue #34) with the random draws taken out (see :func:`augment_dense`).

    >>> depth = torch.full((1, 6, 6), 3.0)
    >>> _, out = scale_crop(torch.zeros(3, 6, 6), {"depth": depth}, scale=1.5, top=1, left=2)
    >>> out["depth"].unique().tolist()
    [2.0]
    """
    height, width = image.shape[-2:]
    h, w = int(height / scale), int(width / scale)
    if not (0 <= top <= height - h and 0 <= left <= width - w):
        raise ValueError(f"a {h}×{w} crop at ({top}, {left}) leaves the {height}×{width} image")
    rows, cols = slice(top, top + h), slice(left, left + w)
    size = (height, width)

    def smooth(x: Tensor) -> Tensor:
        return F.interpolate(
            x[None, :, rows, cols], size=size, mode="bilinear", align_corners=True
        )[0]

    def nearest(x: Tensor) -> Tensor:
        return F.interpolate(x[None, :, rows, cols], size=size, mode="nearest")[0]

    out: dict[str, Tensor] = {}
    for task, target in targets.items():
        if task == "segmentation":
            out[task] = nearest(target[None].float())[0].to(target.dtype)
        elif task == "depth":
            out[task] = nearest(target) / scale
        elif task == "normal":
            out[task] = smooth(target)
        else:
            raise ValueError(f"unknown target {task!r}")
    return smooth(image), out


def hflip(image: Tensor, targets: Mapping[str, Tensor]) -> Item:
    """Mirror left–right; the normal's x component changes sign (CAGrad / Nash-MTL).

    >>> normal = torch.tensor([[[0.6, 0.0]], [[0.0, 0.0]], [[0.8, 0.0]]])
    >>> hflip(torch.zeros(3, 1, 2), {"normal": normal})[1]["normal"][:, 0, 1].tolist()
    [-0.6000000238418579, 0.0, 0.800000011920929]
    """
    out = {task: target.flip(-1) for task, target in targets.items()}
    if "normal" in out:
        out["normal"][0] = -out["normal"][0]
    return image.flip(-1), out


def augment_dense(
    image: Tensor,
    targets: Mapping[str, Tensor],
    *,
    scales: Sequence[float] = SCALES,
    generator: torch.Generator | None = None,
) -> Item:
    """The NYUv2 / Cityscapes training augmentation of CAGrad (Liu et al., NeurIPS 2021,
    arXiv:2110.14048, ``cityscapes/create_dataset.py``) and Nash-MTL (Navon et al., ICML 2022,
    arXiv:2202.01017, ``experiments/nyuv2/data.py``): :func:`scale_crop` with a scale drawn
    uniformly from ``scales`` (1.0, 1.2, 1.5) and a uniform crop position (every position the
    crop fits at, ends included), then :func:`hflip` with probability 1/2.

    Deviation: the references draw the scale and position from Python's ``random`` and the flip
    from torch's global RNG; here all four draws come from ``generator`` (torch's global RNG
    when ``None``), in that order.
    """
    height, width = image.shape[-2:]
    choice = int(torch.randint(len(scales), (1,), generator=generator))
    scale = float(scales[choice])
    h, w = int(height / scale), int(width / scale)
    top = int(torch.randint(height - h + 1, (1,), generator=generator))
    left = int(torch.randint(width - w + 1, (1,), generator=generator))
    image, out = scale_crop(image, targets, scale=scale, top=top, left=left)
    if bool(torch.rand(1, generator=generator) < 0.5):
        image, out = hflip(image, out)
    return image, out


# =========================================================================== MNIST, MultiMNIST
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DIMS = {2049: 1, 2051: 3}  # magic number -> dimensions (both unsigned bytes)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def read_idx(path: str | Path) -> Tensor:
    """An MNIST IDX file (gzipped when its name ends in ``.gz``) as a ``uint8`` tensor.

    The format (yann.lecun.com/exdb/mnist): a big-endian 32-bit magic number, 2051 for images
    (then count, rows, cols) or 2049 for labels (then count), each a big-endian 32-bit integer,
    then the ``uint8`` values, row-major. The file must hold exactly that many bytes.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = Path(tmp) / "labels"
    ...     _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 9]))
    ...     read_idx(path).tolist()
    [7, 2, 9]
    """
    path = require_file(Path(path), MNIST_SOURCE)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as file:
                data = file.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as error:  # a bad or truncated gzip stream
        raise DataError(f"{path} cannot be read ({error}). {MNIST_SOURCE}") from None
    if len(data) < 4:
        raise DataError(f"{path} is {len(data)} bytes, too short for an IDX file. {MNIST_SOURCE}")
    magic = int.from_bytes(data[:4], "big")
    if magic not in _IDX_DIMS:
        raise DataError(
            f"{path}: IDX magic number {magic}, expected 2051 (images) or 2049 (labels). "
            f"{MNIST_SOURCE}"
        )
    header = 4 + 4 * _IDX_DIMS[magic]
    if len(data) < header:
        raise DataError(
            f"{path} is {len(data)} bytes, shorter than its {header}-byte header. {MNIST_SOURCE}"
        )
    dims = tuple(int.from_bytes(data[k : k + 4], "big") for k in range(4, header, 4))
    expected = header + math.prod(dims)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(
            f"{path} is {state}: its header gives shape {dims}, {expected} bytes, and it has "
            f"{len(data)}. {MNIST_SOURCE}"
        )
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=header).copy()).reshape(dims)


def find_mnist_file(root: str | Path, stem: str) -> Path:
    """``<root>/<stem>`` or ``<root>/<stem>.gz`` (the plain one first); torchvision's
    ``<root>/MNIST/raw/`` is searched too."""
    root = Path(root).expanduser()
    for folder in (root, root / "MNIST" / "raw"):
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"{root / stem} not found: expected {stem} or {stem}.gz there. {MNIST_SOURCE}")


def load_mnist(root: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """MNIST's ``split`` (``"train"``: 60 000 images, ``"test"``: the 10 000 of ``t10k``):
    images ``[N, 28, 28]`` ``uint8`` and labels ``[N]`` ``long``, checked against each other."""
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    image_path, label_path = (find_mnist_file(root, stem) for stem in MNIST_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise DataError(
            f"{image_path} holds shape {tuple(images.shape)}; expected [N, 28, 28] images "
            f"(magic 2051). {MNIST_SOURCE}"
        )
    if labels.dim() != 1:
        raise DataError(
            f"{label_path} holds shape {tuple(labels.shape)}; expected [N] labels "
            f"(magic 2049). {MNIST_SOURCE}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels. "
            f"{MNIST_SOURCE}"
        )
    if len(labels) and int(labels.max()) > 9:
        raise DataError(f"{label_path} holds label {int(labels.max())}; expected 0 … 9.")
    return images, labels.long()


def _bytescale(values: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``scipy.misc.bytescale`` (SciPy < 1.2) over ``dims``: ``values − min`` times ``255 /
    (max − min)`` (1 when max = min), clipped to [0, 255], rounded half up, ``uint8``.
    ``scipy.misc.imresize`` applies it to any non-``uint8`` array before resizing."""
    values = values.double()
    low = values.amin(dim=dims, keepdim=True)
    spread = values.amax(dim=dims, keepdim=True) - low
    scale = 255.0 / torch.where(spread == 0, torch.ones_like(spread), spread)
    return ((values - low) * scale).clamp(0, 255).add(0.5).floor().to(torch.uint8)


# PIL's nearest-neighbour resize, which scipy.misc.imresize(interp="nearest") calls, reads
# source pixel floor((i + 1/2) · 36/28) for output pixel i; computed here in integers.
_MULTI_ROWS = torch.tensor([(2 * i + 1) * 36 // 56 for i in range(28)])


def multimnist_overlay(left: Tensor, right: Tensor) -> Tensor:
    """Sener & Koltun's MultiMNIST image of each pair: ``[N, 28, 28]`` ``uint8`` ×2 → ``[N, 28,
    28]`` ``uint8``.

    As in their ``multi_task/loaders/multi_mnist_loader.py`` (``read_image_file``;
    github.com/isl-org/MultiObjectiveOptimization): on a 36×36 zero canvas the left digit goes
    to ``[0:28, 0:28]`` and the right one to ``[6:34, 6:34]``, their maximum where they overlap;
    the canvas is a ``float64`` array, so ``scipy.misc.imresize(canvas, (28, 28),
    interp="nearest")`` first byte-scales it (its minimum, always 0 there, to 0 and its maximum
    to 255: a no-op when the brightest pixel is 255) and then resizes it with PIL's nearest
    neighbour, which keeps canvas rows (and columns) 0, 1, 3, 4, 5, 7, … , 34, 35 and drops
    the other eight. Both steps are reimplemented in torch (``scipy.misc`` is gone from SciPy),
    equal to PIL's resize pixel for pixel. Canvas rows and columns 34–35 stay empty, so the
    last two rows and columns of every image are 0.

    >>> one = torch.zeros(1, 28, 28, dtype=torch.uint8)
    >>> one[0, 1, 1] = 255  # at canvas (1, 1) on the left, (7, 7) on the right
    >>> multimnist_overlay(one, one)[0].nonzero().tolist()
    [[1, 1], [5, 5]]
    """
    if left.shape != right.shape or left.dim() != 3 or tuple(left.shape[1:]) != (28, 28):
        raise ValueError(
            f"expected two [N, 28, 28] stacks, got {tuple(left.shape)} and {tuple(right.shape)}"
        )
    canvas = left.new_zeros(len(left), 36, 36)
    canvas[:, :28, :28] = left
    canvas[:, 6:34, 6:34] = torch.maximum(canvas[:, 6:34, 6:34], right)
    return _bytescale(canvas, (1, 2))[:, _MULTI_ROWS][:, :, _MULTI_ROWS]


class MultiMNISTDataset(Dataset[Item]):
    """MultiMNIST images (``uint8`` ``[N, 28, 28]``) and the two labels of each.

    An item is ``(image [1, 28, 28] float32, {"left": long, "right": long})``; the image is
    normalised as Sener & Koltun's ``global_transformer`` does (``ToTensor`` then
    ``Normalize((0.1307,), (0.3081,))``, MNIST's mean and standard deviation):
    ``(pixel / 255 − 0.1307) / 0.3081``. ``partners[i]`` is the index of the right digit of
    image ``i`` in its MNIST split. ``__getitems__`` fetches a list of items with one
    indexing operation.
    """

    def __init__(
        self, images: Tensor, left: Tensor, right: Tensor, partners: Tensor | None = None
    ) -> None:
        if not len(images) == len(left) == len(right):
            raise ValueError(
                f"{len(images)} images, {len(left)} left and {len(right)} right labels"
            )
        self.images = images
        self.labels = {"left": left.long(), "right": right.long()}
        self.partners = partners

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def normalise(images: Tensor) -> Tensor:
        """``uint8`` pixels → ``(x / 255 − mean) / std`` in ``float32`` (torchvision's order)."""
        mean = torch.tensor(MNIST_MEAN, dtype=torch.float32)
        std = torch.tensor(MNIST_STD, dtype=torch.float32)
        return images.float().div(255).sub(mean).div(std)

    def __getitem__(self, index: int) -> Item:
        image = self.normalise(self.images[index]).unsqueeze(0)
        return image, {t: y[index] for t, y in self.labels.items()}

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.normalise(self.images[index]).unsqueeze(1)
        labels = {t: y[index] for t, y in self.labels.items()}
        return [(images[k], {t: y[k] for t, y in labels.items()}) for k in range(len(index))]


def multimnist_dataset(root: str | Path, split: str, *, seed: int = 0) -> MultiMNISTDataset:
    """MultiMNIST as Sener & Koltun built it ("Multi-Task Learning as Multi-Objective
    Optimization", NeurIPS 2018, arXiv:1810.04650, Appendix C; ``multi_mnist_loader.py``) from
    the MNIST IDX files in ``root``: ``"train"`` from MNIST's 60 000 training images, ``"test"``
    (their validation set) from the 10 000 of ``t10k``, built the same way.

    Every image of the split is the left digit of one MultiMNIST image; its right digit is
    drawn uniformly from the whole same split, itself included, as their
    ``np.random.permutation(length)[:1]`` does. Labels are the two digits' labels. Images:
    :func:`multimnist_overlay`; normalisation: :class:`MultiMNISTDataset`.

    Deviation: their partners come from NumPy's unseeded global RNG (so their MultiMNIST cannot
    be rebuilt exactly); here from a ``torch.Generator`` seeded from ``(seed, split)``, so the
    same ``seed`` always gives the same data and the two splits draw independently.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    images, labels = load_mnist(root, split)
    state = np.random.SeedSequence([seed, ("train", "test").index(split)]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    partners = torch.randint(len(images), (len(images),), generator=generator)
    built = images.new_zeros(len(images), 28, 28)
    for start in range(0, len(images), 4096):  # chunks: 60 000 float64 canvases take 622 MB
        chunk = slice(start, start + 4096)
        built[chunk] = multimnist_overlay(images[chunk], images[partners[chunk]])
    return MultiMNISTDataset(built, labels, labels[partners], partners)


# =========================================================================== CelebA
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
# The per-channel mean (blue, green, red) Sener & Koltun subtract ("TODO(compute this mean)").
CELEBA_MEAN_BGR = (73.15835921, 82.90891754, 72.39239876)
CELEBA_SIZE = (178, 218)  # width × height of img_align_celeba
_CELEBA_SPLITS = {"train": 0, "val": 1, "test": 2}
_PLUS_MINUS_ONE = frozenset(("1", "-1"))


def celeba_transform(image: PILImage, size: int = 64) -> Tensor:
    """Sener & Koltun's CelebA preprocessing (``CELEBA.transform_img`` in
    ``multi_task/loaders/celeba_loader.py``, with ``img_rows = img_cols = 64`` in
    ``configs.json``) of an RGB PIL image → ``[3, size, size]`` ``float32`` in ``[0, 1]``.

    Their steps: reverse the channels (RGB → BGR: channel 0 of the result is blue), subtract
    :data:`CELEBA_MEAN_BGR`, then ``scipy.misc.imresize(img, (64, 64))``, which byte-scales the
    whole float array (its min to 0, its max to 255, over all channels together: this undoes
    most of the mean subtraction) and resizes with PIL's bilinear filter; divide by 255. No
    crop, no flip, no further normalisation. Reimplemented with torch and PIL (``scipy.misc``
    is gone from SciPy); whole-image pixel identity with their 2018 PIL is not checked.

    >>> from PIL import Image
    >>> out = celeba_transform(Image.new("RGB", (178, 218), (200, 100, 50)), 64)
    >>> tuple(out.shape), out.dtype, [round(float(c.mean()), 3) for c in out]
    ((3, 64, 64), torch.float32, [0.0, 0.267, 1.0])
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64))
    pixels = pixels.flip(-1) - torch.tensor(CELEBA_MEAN_BGR, dtype=torch.float64)
    scaled = _bytescale(pixels, (0, 1, 2)).numpy()
    resized = Image.fromarray(scaled, "RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.float64) / 255.0).permute(2, 0, 1).float()


def _celeba_file(root: Path, name: str, nested: str) -> Path:
    """``<root>/<name>``, else the release's ``<root>/<nested>/<name>``."""
    for path in (root / name, root / nested / name):
        if path.exists():
            return path
    raise DataError(
        f"{root / name} not found: expected {name} there (or in {root / nested}). {CELEBA_SOURCE}"
    )


class CelebADataset(Dataset[Item]):
    """CelebA from the official files, one split; see :func:`celeba_dataset`."""

    def __init__(self, root: str | Path, split: str, *, size: int = 64) -> None:
        if split not in _CELEBA_SPLITS:
            raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        root = Path(root).expanduser()
        self.size = size
        self.images_dir = _celeba_file(root, "img_align_celeba", "Img")
        names, labels = _read_attributes(_celeba_file(root, "list_attr_celeba.txt", "Anno"))
        partition = _read_partition(_celeba_file(root, "list_eval_partition.txt", "Eval"), names)
        wanted = _CELEBA_SPLITS[split]
        self.files = [name for name, part in partition if part == wanted]
        rows = torch.tensor([names[name] for name in self.files], dtype=torch.long)
        self.labels = labels[rows]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Item:
        from PIL import Image, UnidentifiedImageError

        path = require_file(self.images_dir / self.files[index], CELEBA_SOURCE)
        try:
            with Image.open(path) as file:
                image = file.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(
                f"{path} cannot be read as an image ({error}). {CELEBA_SOURCE}"
            ) from None
        if image.size != CELEBA_SIZE:
            raise DataError(
                f"{path} is {image.size[0]}×{image.size[1]}; the aligned CelebA images are "
                f"178×218 (width × height). {CELEBA_SOURCE}"
            )
        row = self.labels[index]
        return celeba_transform(image, self.size), {
            name: row[k] for k, name in enumerate(CELEBA_ATTRIBUTES)
        }


def _read_attributes(path: Path) -> tuple[dict[str, int], Tensor]:
    """``list_attr_celeba.txt``: the image count, the 40 attribute names, then one line per
    image, its file name and 40 values of ±1 -> ({file name: row}, ``[N, 40]`` long of 0/1)."""
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        found = repr(lines[0][:40]) if lines else "an empty file"
        raise DataError(f"{path}: line 1 should be the image count, found {found}. {CELEBA_SOURCE}")
    count = int(lines[0])
    header = tuple(lines[1].split())
    if header != CELEBA_ATTRIBUTES:
        raise DataError(
            f"{path}: line 2 should name the 40 CelebA attributes (5_o_Clock_Shadow … Young), "
            f"found {len(header)} names: {' '.join(header)[:120]}. {CELEBA_SOURCE}"
        )
    rows = lines[2:]
    if len(rows) != count:
        raise DataError(f"{path}: line 1 says {count} images, the file lists {len(rows)}.")
    names: dict[str, int] = {}
    values = np.empty((count, 40), dtype=np.int64)
    for k, line in enumerate(rows):
        fields = line.split()
        if len(fields) != 41 or not _PLUS_MINUS_ONE.issuperset(fields[1:]):
            raise DataError(
                f"{path}, line {k + 3}: expected a file name and 40 values of 1 or -1, found "
                f"{line[:80]!r}. {CELEBA_SOURCE}"
            )
        if fields[0] in names:
            raise DataError(f"{path}, line {k + 3}: {fields[0]} is listed twice.")
        names[fields[0]] = k
        values[k] = [v == "1" for v in fields[1:]]
    return names, torch.from_numpy(values)


def _read_partition(path: Path, names: Mapping[str, int]) -> list[tuple[str, int]]:
    """``list_eval_partition.txt``: file name and 0 (train), 1 (val) or 2 (test) per line."""
    out = []
    for k, line in enumerate(path.read_text().splitlines()):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(
                f"{path}, line {k + 1}: expected a file name and 0, 1 or 2, found {line[:80]!r}. "
                f"{CELEBA_SOURCE}"
            )
        if fields[0] not in names:
            raise DataError(
                f"{path}, line {k + 1}: {fields[0]} has no line in list_attr_celeba.txt."
            )
        out.append((fields[0], int(fields[1])))
    return out


def celeba_dataset(root: str | Path, split: str, *, size: int = 64) -> CelebADataset:
    """CelebA (Liu, Luo, Wang & Tang, ICCV 2015) as Sener & Koltun (NeurIPS 2018,
    arXiv:1810.04650, ``celeba_loader.py``) fed it to their 40-task network.

    ``split``: ``"train"``, ``"val"`` or ``"test"`` (0, 1, 2 in ``list_eval_partition.txt``;
    Sener & Koltun's training script evaluates on val). Items ``(image [3, size, size]
    float32, {attribute: long 0/1})`` with the 40 :data:`CELEBA_ATTRIBUTES` (−1 in the file is
    0, as their loader maps it); images from ``img_align_celeba/<name>`` decoded with PIL when
    the item is read, preprocessed by :func:`celeba_transform`.

    Deviations: they read the lossless PNG version (``img_align_celeba_png``); this reads the
    JPEGs of ``img_align_celeba.zip`` (the files named in the lists). Their item order is a
    Python set's (unreproducible); here it is the order of ``list_eval_partition.txt``. Their
    flat files sit in ``Anno/`` and ``Eval/``; both layouts are accepted here.

    The text files are checked when the dataset is built (count line, the 40 names in order,
    40 values of ±1 per line, every partition entry listed in the attributes); an image when
    its item is read (present, decodable, 178×218).
    """
    return CelebADataset(root, split, size=size)
