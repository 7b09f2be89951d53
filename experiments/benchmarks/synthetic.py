"""Small fake benchmark data sets in exactly the formats the readers of
:mod:`experiments.benchmarks.datasets` expect, deterministic from a seed: for tests, and to time
real-size training steps without the real data.

    python -m experiments.benchmarks.synthetic nyuv2 DIR --train 795 --test 654

The formats (file names, shapes, dtypes, invalid-pixel conventions) are those the reference
code reads; see :mod:`~experiments.benchmarks.datasets` for the sources. The content is random:
smooth blobs, not scenes, digits or faces.

* NYUv2 / Cityscapes (MTAN preprocessing): ``<root>/{train,val}/<subdir>/<i>.npy``, height ×
  width × channels, ``float64`` (the dtype the released image files show in MTAN issue #50;
  the readers accept ``float32`` too). Images in ``[0, 1]`` on a 1/255 grid; labels whole
  numbers with a −1 (ignored) patch; depth positive with a 0 (no measurement) patch; normals
  unit vectors with an all-zero (invalid) patch.
* MNIST: the four IDX files, optionally gzipped, 28×28 ``uint8`` images with a 255 pixel each,
  labels 0 … 9.
* CelebA: ``img_align_celeba/<6 digits>.jpg`` (178×218 RGB JPEG), ``list_attr_celeba.txt``
  and ``list_eval_partition.txt`` laid out as in the release, all three splits present.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     root = write_cityscapes(tmp, train=2, test=1, shape=(4, 6))
...     sorted(p.name for p in (root / "train").iterdir())
['depth', 'image', 'label_19', 'label_7']
"""

from __future__ import annotations

import argparse
import gzip as gzip_module
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.benchmarks.datasets import CELEBA_ATTRIBUTES, MNIST_FILES

__all__ = ["main", "write_celeba", "write_cityscapes", "write_mnist", "write_nyuv2"]


def _blobs(rng: np.random.Generator, shape: tuple[int, int], count: int) -> np.ndarray:
    """A smooth ``[H, W]`` field in ``[0, 1]``: ``count`` Gaussian bumps."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    field = np.zeros(shape)
    for _ in range(count):
        r, c = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        width = rng.uniform(0.1, 0.3) * max(shape)
        field += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * width**2))
    return field / max(float(field.max()), 1e-12)


def _patch(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[slice, slice]:
    """A random rectangle covering about a tenth of each side (at least one pixel)."""
    h, w = max(1, shape[0] // 4), max(1, shape[1] // 4)
    top, left = int(rng.integers(0, shape[0] - h + 1)), int(rng.integers(0, shape[1] - w + 1))
    return slice(top, top + h), slice(left, left + w)


def _image(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    channels = [_blobs(rng, shape, 3) for _ in range(3)]
    return np.round(np.stack(channels, axis=-1) * 255) / 255  # [H, W, 3] on the 1/255 grid


def _labels(rng: np.random.Generator, shape: tuple[int, int], classes: int) -> np.ndarray:
    field = _blobs(rng, shape, 4)
    labels = np.minimum((field * classes).astype(np.int64), classes - 1).astype(np.float64)
    labels[_patch(rng, shape)] = -1.0
    labels[-1, -1] = classes - 1  # the top class is present, so range checks bite
    return labels


def _depth(rng: np.random.Generator, shape: tuple[int, int], far: float) -> np.ndarray:
    depth = (0.05 + _blobs(rng, shape, 3)) * far
    depth[_patch(rng, shape)] = 0.0
    return depth[..., None]


def _normals(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    vectors = np.stack([_blobs(rng, shape, 2) - 0.5 for _ in range(3)], axis=-1)
    vectors[..., 2] += 1.0  # mostly facing the camera, never the zero vector
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    vectors[_patch(rng, shape)] = 0.0
    return vectors


def _write_dense(
    root: Path,
    counts: dict[str, int],
    seed: int,
    shape: tuple[int, int],
    labels: dict[str, int],
    far: float,
    normals: bool,
) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        folders = ["image", "depth", *labels, *(["normal"] if normals else [])]
        for folder in folders:
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            np.save(root / split / "image" / f"{i}.npy", _image(rng, shape))
            for folder, classes in labels.items():
                np.save(root / split / folder / f"{i}.npy", _labels(rng, shape, classes))
            np.save(root / split / "depth" / f"{i}.npy", _depth(rng, shape, far))
            if normals:
                np.save(root / split / "normal" / f"{i}.npy", _normals(rng, shape))
    return root


def write_nyuv2(
    root: str | Path,
    *,
    train: int = 4,
    test: int = 2,
    seed: int = 0,
    shape: tuple[int, int] = (288, 384),
) -> Path:
    """A fake MTAN NYUv2 in ``root``: ``train/`` and ``val/`` (the test split), each with
    ``image`` ``[H, W, 3]``, ``label`` ``[H, W]`` (13 classes, −1), ``depth`` ``[H, W, 1]``
    (metres, 0 = none), ``normal`` ``[H, W, 3]`` (unit, 0 = invalid) ``.npy`` files. -> root"""
    return _write_dense(
        Path(root), {"train": train, "val": test}, seed, shape, {"label": 13}, 10.0, True
    )


def write_cityscapes(
    root: str | Path,
    *,
    train: int = 4,
    test: int = 2,
    seed: int = 0,
    shape: tuple[int, int] = (128, 256),
) -> Path:
    """A fake MTAN Cityscapes in ``root``: ``train/`` and ``val/`` with ``image`` ``[H, W,
    3]``, ``label_7`` and ``label_19`` ``[H, W]`` (−1), ``depth`` ``[H, W, 1]`` (inverse depth
    below 0.5, 0 = none) ``.npy`` files. -> root"""
    labels = {"label_7": 7, "label_19": 19}
    return _write_dense(Path(root), {"train": train, "val": test}, seed, shape, labels, 0.45, False)


def _digits(rng: np.random.Generator, count: int) -> np.ndarray:
    """``[count, 28, 28]`` ``uint8`` digit-like strokes: bumps in the central 20×20 box, the
    brightest pixel 255 (as in nearly every MNIST image)."""
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    for k in range(count):
        field = np.zeros((28, 28))
        field[4:24, 4:24] = _blobs(rng, (20, 20), int(rng.integers(2, 5))) ** 2
        images[k] = np.round(field / field.max() * 255).astype(np.uint8)
    return images


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    data = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes()
    if compress:
        with gzip_module.open(path.with_name(path.name + ".gz"), "wb") as file:
            file.write(data)
    else:
        path.write_bytes(data)


def write_mnist(
    root: str | Path, *, train: int = 60, test: int = 20, seed: int = 0, gzip: bool = False
) -> Path:
    """Fake MNIST IDX files in ``root`` (``train-images-idx3-ubyte`` etc., ``.gz`` when
    ``gzip``): ``train`` and ``test`` images with labels cycling through 0 … 9 in a random
    order. -> root"""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        image_name, label_name = MNIST_FILES[split]
        labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)
        _write_idx(root / image_name, _digits(rng, count), gzip)
        _write_idx(root / label_name, labels, gzip)
    return root


def write_celeba(root: str | Path, *, images: int = 12, seed: int = 0) -> Path:
    """A fake CelebA in ``root``: ``img_align_celeba/000001.jpg`` … (178×218 RGB JPEG),
    ``list_attr_celeba.txt`` (count, the 40 names, one line of ±1 values per image, the
    release's spacing) and ``list_eval_partition.txt`` (about 2/3 train, then val, then test,
    each at least one image, in file order as in the release). -> root"""
    from PIL import Image

    if images < 3:
        raise ValueError(f"need at least 3 images (one per split), got {images}")
    root = Path(root)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"{k + 1:06d}.jpg" for k in range(images)]
    for name in names:
        pixels = np.round(_image(rng, (218, 178)) * 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(root / "img_align_celeba" / name, quality=95)
    values = np.where(rng.random((images, len(CELEBA_ATTRIBUTES))) < 0.3, 1, -1)
    lines = [str(images), " ".join(CELEBA_ATTRIBUTES) + " "]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    val, test = max(1, images // 6), max(1, images // 6)
    parts = [0] * (images - val - test) + [1] * val + [2] * test
    partition = "".join(f"{name} {part}\n" for name, part in zip(names, parts))
    (root / "list_eval_partition.txt").write_text(partition)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m experiments.benchmarks.synthetic {nyuv2,cityscapes,mnist,celeba} DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=("nyuv2", "cityscapes", "mnist", "celeba"))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--train", type=int, help="training items (default: the writer's)")
    parser.add_argument("--test", type=int, help="test items (default: the writer's)")
    parser.add_argument("--images", type=int, help="CelebA images (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gzip", action="store_true", help="MNIST: write .gz files")
    args = parser.parse_args(argv)
    sizes = {k: v for k, v in (("train", args.train), ("test", args.test)) if v is not None}
    if args.dataset == "celeba":
        if sizes:
            parser.error("celeba takes --images, not --train/--test")
        count = {} if args.images is None else {"images": args.images}
        root = write_celeba(args.directory, seed=args.seed, **count)
    elif args.images is not None:
        parser.error(f"{args.dataset} takes --train/--test, not --images")
    elif args.dataset == "mnist":
        root = write_mnist(args.directory, seed=args.seed, gzip=args.gzip, **sizes)
    else:
        writer = write_nyuv2 if args.dataset == "nyuv2" else write_cityscapes
        root = writer(args.directory, seed=args.seed, **sizes)
    print(f"wrote a synthetic {args.dataset} to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
