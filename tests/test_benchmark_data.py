"""The real-data readers of experiments.benchmarks.datasets on files written by
experiments.benchmarks.synthetic (or by hand) in the source formats: values round-trip, the
augmentation's properties, Sener & Koltun's MultiMNIST construction, CelebA's preprocessing,
and a DataError naming the file for every kind of missing or malformed data."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from experiments.benchmarks.base import DataError
from experiments.benchmarks.datasets import (
    CELEBA_ATTRIBUTES,
    CELEBA_MEAN_BGR,
    MNIST_MEAN,
    MNIST_STD,
    SCALES,
    DenseNpyDataset,
    augment_dense,
    celeba_dataset,
    celeba_transform,
    cityscapes_dataset,
    find_mnist_file,
    hflip,
    load_mnist,
    multimnist_dataset,
    multimnist_overlay,
    nyuv2_dataset,
    read_idx,
    scale_crop,
)
from experiments.benchmarks.synthetic import (
    main,
    write_celeba,
    write_cityscapes,
    write_mnist,
    write_nyuv2,
)

NYU_LAYOUT = {"segmentation": "label", "depth": "depth", "normal": "normal"}
SMALL = (12, 16)


@pytest.fixture(scope="module")
def nyu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nyuv2(tmp_path_factory.mktemp("nyu"), train=2, test=1)


@pytest.fixture(scope="module")
def small_nyu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nyuv2(tmp_path_factory.mktemp("small"), train=3, test=2, shape=SMALL, seed=1)


@pytest.fixture
def nyu_copy(small_nyu: Path, tmp_path: Path) -> Path:
    """A fresh copy of the small NYUv2, to break."""
    return Path(shutil.copytree(small_nyu, tmp_path / "copy"))


def small_dataset(root: Path, split: str = "train", **options: object) -> DenseNpyDataset:
    return DenseNpyDataset(root, split, layout=NYU_LAYOUT, shape=SMALL, classes=13, **options)  # type: ignore[arg-type]


def load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path))


def picked_from(values: torch.Tensor, pool: torch.Tensor) -> bool:
    """Every value is one of ``pool``'s, up to float32 rounding."""
    gaps = (values.reshape(-1, 1) - pool.reshape(1, -1)).abs().amin(dim=1)
    return bool((gaps <= 1e-6 * float(pool.abs().max())).all())


# --------------------------------------------------------------------------- NYUv2, Cityscapes
def test_nyuv2_items_are_the_files_channels_first(nyu: Path) -> None:
    data = nyuv2_dataset(nyu, "train")
    assert len(data) == 2 and len(nyuv2_dataset(nyu, "val")) == 1
    assert len(nyuv2_dataset(nyu, "test")) == 1  # "test" reads val/, the papers' test split
    for index in range(2):
        image, targets = data[index]
        files = {
            k: nyu / "train" / k / f"{index}.npy" for k in ("image", "label", "depth", "normal")
        }
        assert np.load(files["image"]).shape == (288, 384, 3)  # stored height × width × channels
        assert image.shape == (3, 288, 384) and image.dtype == torch.float32
        assert torch.equal(image, load(files["image"]).permute(2, 0, 1).float())
        labels = targets["segmentation"]
        assert labels.shape == (288, 384) and labels.dtype == torch.long
        assert torch.equal(labels, load(files["label"]).long())
        assert int(labels.min()) == -1 and int(labels.max()) <= 12  # −1 kept
        depth = targets["depth"]
        assert depth.shape == (1, 288, 384) and depth.dtype == torch.float32
        assert torch.equal(depth, load(files["depth"]).permute(2, 0, 1).float())
        assert (depth == 0).any() and (depth > 0).any()  # invalid pixels present
        normal = targets["normal"]
        assert normal.shape == (3, 288, 384)
        assert torch.equal(normal, load(files["normal"]).permute(2, 0, 1).float())
        norms = normal.norm(dim=0)
        assert (norms == 0).any() and torch.allclose(norms[norms > 0], torch.ones(1), atol=1e-5)


def test_cityscapes_items(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path, train=2, test=1)
    for classes in (7, 19):
        data = cityscapes_dataset(root, "val", classes=classes)
        image, targets = data[0]
        assert len(data) == 1 and image.shape == (3, 128, 256)
        assert sorted(targets) == ["depth", "segmentation"]
        stored = load(root / "val" / f"label_{classes}" / "0.npy")
        assert torch.equal(targets["segmentation"], stored.long())
        assert int(stored.min()) == -1 and int(stored.max()) == classes - 1
        assert targets["depth"].shape == (1, 128, 256) and (targets["depth"] == 0).any()
    with pytest.raises(ValueError, match="7 or 19"):
        cityscapes_dataset(root, "train", classes=13)


def test_val_split_is_never_augmented(small_nyu: Path) -> None:
    plain, asked = small_dataset(small_nyu, "val"), small_dataset(small_nyu, "val", augment=True)
    assert not asked.augment
    for index in range(len(plain)):
        (x, y), (x2, y2) = plain[index], asked[index]
        assert torch.equal(x, x2) and all(torch.equal(y[t], y2[t]) for t in y)
    with pytest.raises(IndexError):
        plain[len(plain)]


def test_scale_crop_resamples_and_divides_depth(small_nyu: Path) -> None:
    image, targets = small_dataset(small_nyu)[0]
    same_image, same = scale_crop(image, targets, scale=1.0, top=0, left=0)
    assert torch.equal(same_image, image) and all(torch.equal(same[t], targets[t]) for t in same)

    h, w = int(SMALL[0] / 1.5), int(SMALL[1] / 1.5)
    top, left = 3, 5
    out_image, out = scale_crop(image, targets, scale=1.5, top=top, left=left)
    crop = (slice(top, top + h), slice(left, left + w))
    assert out_image.shape == image.shape and out["depth"].shape == targets["depth"].shape
    # Nearest neighbour: every output value is a value of the crop (depth divided by 1.5).
    crop_labels = set(targets["segmentation"][crop].unique().tolist())
    assert set(out["segmentation"].unique().tolist()) <= crop_labels
    assert out["segmentation"].dtype == torch.long
    crop_depth = targets["depth"][0][crop].unique()
    assert picked_from(out["depth"] * 1.5, crop_depth)
    assert torch.allclose((out["depth"] * 1.5)[..., 0, 0], targets["depth"][0][top, left])
    # Bilinear with align_corners=True: the crop's corners land on the output's corners.
    assert torch.allclose(out_image[:, 0, 0], image[:, top, left])
    assert torch.allclose(out_image[:, -1, -1], image[:, top + h - 1, left + w - 1])
    assert torch.allclose(out["normal"][:, -1, 0], targets["normal"][:, top + h - 1, left])

    constant = {"depth": torch.full((1, *SMALL), 6.0)}
    for scale in SCALES:
        _, scaled = scale_crop(image, constant, scale=scale, top=0, left=0)
        assert torch.allclose(scaled["depth"], torch.full((1, *SMALL), 6.0 / scale))
    with pytest.raises(ValueError, match="leaves"):
        scale_crop(image, targets, scale=1.5, top=SMALL[0] - h + 1, left=0)


def test_hflip_mirrors_everything_and_negates_normal_x(small_nyu: Path) -> None:
    image, targets = small_dataset(small_nyu)[1]
    flipped_image, flipped = hflip(image, targets)
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.equal(flipped["segmentation"], targets["segmentation"].flip(-1))
    assert torch.equal(flipped["depth"], targets["depth"].flip(-1))
    assert torch.equal(flipped["normal"][0], -targets["normal"][0].flip(-1))
    assert torch.equal(flipped["normal"][1:], targets["normal"][1:].flip(-1))
    back_image, back = hflip(flipped_image, flipped)
    assert torch.equal(back_image, image) and torch.equal(back["normal"], targets["normal"])


def test_augmentation_is_reproducible_and_keeps_invalid_markers(small_nyu: Path) -> None:
    image, targets = small_dataset(small_nyu)[2]
    first = augment_dense(image, targets, generator=torch.Generator().manual_seed(5))
    again = augment_dense(image, targets, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(first[1][t], again[1][t]) for t in targets)

    data = small_dataset(small_nyu, augment=True, generator=torch.Generator().manual_seed(0))
    depth_values = targets["depth"].unique()
    changed = 0
    for _ in range(12):
        augmented_image, augmented = data[2]
        changed += not torch.equal(augmented_image, image)
        labels = set(augmented["segmentation"].unique().tolist())
        assert labels <= set(targets["segmentation"].unique().tolist())
        # Depth is a nearest pick divided by one of the scales; zeros stay zero.
        assert any(picked_from(augmented["depth"] * s, depth_values) for s in SCALES)
    assert changed > 0


def test_dense_missing_and_malformed_data(nyu_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nyuv2\.zip") as error:
        nyuv2_dataset(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere" / "train") in str(error.value)

    shutil.rmtree(nyu_copy / "train" / "normal")
    with pytest.raises(DataError, match="normal not found") as error:
        small_dataset(nyu_copy)
    assert str(nyu_copy / "train" / "normal") in str(error.value)

    (nyu_copy / "val" / "depth" / "1.npy").unlink()
    with pytest.raises(DataError) as error:
        small_dataset(nyu_copy, "val")
    assert str(nyu_copy / "val" / "depth" / "1.npy") in str(error.value)


def test_dense_index_set_must_be_0_to_n_minus_1(nyu_copy: Path) -> None:
    images = nyu_copy / "train" / "image"
    (images / "1.npy").rename(images / "7.npy")
    with pytest.raises(DataError) as error:
        small_dataset(nyu_copy)
    assert str(images / "1.npy") in str(error.value)
    (images / "7.npy").rename(images / "01.npy")
    with pytest.raises(DataError, match=r"<i>\.npy") as error:
        small_dataset(nyu_copy)
    assert str(images / "01.npy") in str(error.value)
    (images / "01.npy").rename(images / "1.npy")
    shutil.copy(nyu_copy / "train" / "label" / "0.npy", nyu_copy / "train" / "label" / "3.npy")
    with pytest.raises(DataError, match="has no image") as error:
        small_dataset(nyu_copy)
    assert str(nyu_copy / "train" / "label" / "3.npy") in str(error.value)


@pytest.mark.parametrize(
    ("folder", "array", "message"),
    [
        (
            "depth",
            np.zeros((12, 16)),
            r"shape \(12, 16\) dtype float64; expected shape \(12, 16, 1\)",
        ),
        ("normal", np.zeros((3, 12, 16)), r"shape \(3, 12, 16\)"),
        ("image", np.zeros((12, 16, 3), dtype=np.uint8), "dtype uint8"),
        ("label", np.full((12, 16), 0.5), "non-integer labels"),
        ("label", np.full((12, 16), 13.0), r"labels 13 … 13"),
        ("label", np.full((12, 16), -2), r"labels -2 … -2"),
    ],
)
def test_dense_malformed_file_names_it(
    nyu_copy: Path, folder: str, array: np.ndarray, message: str
) -> None:
    path = nyu_copy / "train" / folder / "1.npy"
    np.save(path, array)
    data = small_dataset(nyu_copy)
    data[0]  # the other items read fine
    with pytest.raises(DataError, match=message) as error:
        data[1]
    assert str(path) in str(error.value)


def test_dense_unreadable_file_names_it(nyu_copy: Path) -> None:
    path = nyu_copy / "train" / "depth" / "0.npy"
    path.write_bytes(b"not a numpy file")
    with pytest.raises(DataError, match=r"not a readable \.npy") as error:
        small_dataset(nyu_copy)[0]
    assert str(path) in str(error.value)


# --------------------------------------------------------------------------- MNIST
def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    magic = magic or (2051 if array.ndim == 3 else 2049)
    data = (
        struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    )
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as file:
            file.write(data)
    else:
        path.write_bytes(data)
    return path


def test_idx_plain_and_gzip_round_trip(tmp_path: Path) -> None:
    plain = write_mnist(tmp_path / "plain", train=30, test=10, seed=3)
    packed = write_mnist(tmp_path / "packed", train=30, test=10, seed=3, gzip=True)
    assert find_mnist_file(plain, "train-images-idx3-ubyte").name == "train-images-idx3-ubyte"
    assert find_mnist_file(packed, "train-images-idx3-ubyte").name == "train-images-idx3-ubyte.gz"
    for split, count in (("train", 30), ("test", 10)):
        images, labels = load_mnist(plain, split)
        gz_images, gz_labels = load_mnist(packed, split)
        assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
        assert torch.equal(images, gz_images) and torch.equal(labels, gz_labels)
        assert labels.dtype == torch.long and sorted(set(labels.tolist())) == list(range(10))
        assert (images.amax(dim=(1, 2)) == 255).all()
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert torch.equal(
        read_idx(write_idx(tmp_path / "x.gz", array)), torch.from_numpy(array).byte()
    )


def test_idx_malformed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte\.gz"):
        find_mnist_file(tmp_path, "t10k-labels-idx1-ubyte")
    bad = write_idx(tmp_path / "magic", np.zeros((2, 28, 28)), magic=2052)
    with pytest.raises(DataError, match="magic number 2052") as error:
        read_idx(bad)
    assert str(bad) in str(error.value)
    good = write_idx(tmp_path / "good", np.zeros((2, 28, 28)))
    cut = tmp_path / "cut"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated") as error:
        read_idx(cut)
    assert str(cut) in str(error.value)
    long = tmp_path / "long"
    long.write_bytes(good.read_bytes() + b"\0")
    with pytest.raises(DataError, match="longer than its header"):
        read_idx(long)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="cannot be read") as error:
        read_idx(broken)
    assert str(broken) in str(error.value)


def test_mnist_files_must_agree(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(2))
    with pytest.raises(DataError, match="3 images but") as error:
        load_mnist(tmp_path, "train")
    assert "train-labels-idx1-ubyte.gz" in str(error.value)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 20, 20)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2))
    with pytest.raises(DataError, match=r"\[N, 28, 28\]") as error:
        load_mnist(tmp_path, "test")
    assert str(tmp_path / "t10k-images-idx3-ubyte") in str(error.value)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros(2))  # labels where images belong
    with pytest.raises(DataError, match="expected"):
        load_mnist(tmp_path, "test")


# --------------------------------------------------------------------------- MultiMNIST
def reference_multimnist(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Sener & Koltun's steps, independently: the float canvas, scipy.misc.bytescale's formula,
    then PIL's nearest-neighbour resize (what scipy.misc.imresize called)."""
    canvas = np.zeros((36, 36))
    canvas[0:28, 0:28] = left
    canvas[6:34, 6:34] = right
    canvas[6:28, 6:28] = np.maximum(left[6:28, 6:28], right[0:22, 0:22])
    low, high = canvas.min(), canvas.max()
    scale = 255.0 / ((high - low) or 1)
    scaled = (((canvas - low) * scale).clip(0, 255) + 0.5).astype(np.uint8)
    return np.asarray(Image.fromarray(scaled, "L").resize((28, 28), Image.Resampling.NEAREST))


def test_overlay_geometry_by_hand() -> None:
    left = torch.full((1, 28, 28), 100, dtype=torch.uint8)
    right = torch.full((1, 28, 28), 200, dtype=torch.uint8)
    out = multimnist_overlay(left, right)[0]
    # Byte-scaling maps the canvas maximum 200 to 255, so 100 becomes round(127.5) = 128.
    assert out[0, 0] == 128 and out[2, 20] == 128 and out[20, 2] == 128  # left digit only
    assert out[10, 10] == 255 and out[25, 20] == 255  # right digit on top (max of 100, 200)
    assert out[0, 25] == 0 and out[25, 0] == 0  # corners neither digit covers
    assert (out[26:] == 0).all() and (out[:, 26:] == 0).all()  # canvas rows 34-35 are empty
    swapped = multimnist_overlay(right, left)[0]
    assert swapped[10, 10] == 255 and swapped[0, 0] == 255 and swapped[25, 20] == 128


def test_overlay_matches_the_reference_pixel_for_pixel() -> None:
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (6, 28, 28)).astype(np.uint8)
    digits[1] //= 3  # dim pair: byte-scaling stretches it
    digits[2] = 0  # blank pair: max = min
    digits[3] = 0
    for i, j in [(0, 1), (1, 0), (2, 3), (4, 5), (1, 1)]:
        ours = multimnist_overlay(
            torch.from_numpy(digits[i : i + 1]), torch.from_numpy(digits[j : j + 1])
        )
        assert np.array_equal(ours[0].numpy(), reference_multimnist(digits[i], digits[j]))


def test_multimnist_dataset_pairs_images_and_labels(tmp_path: Path) -> None:
    root = write_mnist(tmp_path, train=40, test=12, seed=2)
    images, labels = load_mnist(root, "train")
    data = multimnist_dataset(root, "train", seed=7)
    assert len(data) == 40 and len(multimnist_dataset(root, "test")) == 12
    partners = data.partners
    assert partners is not None and ((partners >= 0) & (partners < 40)).all()
    assert torch.equal(data.labels["left"], labels)
    assert torch.equal(data.labels["right"], labels[partners])
    assert torch.equal(data.images, multimnist_overlay(images, images[partners]))
    image, targets = data[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    expected = (data.images[3].float() / 255 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(image[0], expected, atol=1e-6)
    assert int(targets["left"]) == int(labels[3])
    assert int(targets["right"]) == int(labels[partners[3]])

    again = multimnist_dataset(root, "train", seed=7)
    other = multimnist_dataset(root, "train", seed=8)
    assert again.partners is not None and other.partners is not None
    assert torch.equal(again.partners, partners) and torch.equal(again.images, data.images)
    assert not torch.equal(other.partners, partners)

    batch = data.__getitems__([3, 0, 5])
    assert all(torch.equal(b[0], data[i][0]) for b, i in zip(batch, [3, 0, 5]))
    x, y = next(iter(DataLoader(data, batch_size=8)))
    assert x.shape == (8, 1, 28, 28) and y["left"].shape == (8,) and y["left"].dtype == torch.long


# --------------------------------------------------------------------------- CelebA
@pytest.fixture(scope="module")
def celeba(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_celeba(tmp_path_factory.mktemp("celeba"), images=12, seed=0)


@pytest.fixture
def celeba_copy(celeba: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(celeba, tmp_path / "copy"))


def test_celeba_items_and_labels(celeba: Path) -> None:
    lines = (celeba / "list_attr_celeba.txt").read_text().splitlines()
    assert tuple(lines[1].split()) == CELEBA_ATTRIBUTES and len(CELEBA_ATTRIBUTES) == 40
    values = {ln.split()[0]: [int(v) for v in ln.split()[1:]] for ln in lines[2:]}
    sizes = {s: len(celeba_dataset(celeba, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 8, "val": 2, "test": 2}
    data = celeba_dataset(celeba, "val", size=32)
    image, targets = data[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert list(targets) == list(CELEBA_ATTRIBUTES)
    name = data.files[1]
    assert [int(t) for t in targets.values()] == [int(v == 1) for v in values[name]]
    assert all(t.dtype == torch.long for t in targets.values())
    with Image.open(celeba / "img_align_celeba" / name) as file:
        assert file.size == (178, 218)
        assert torch.equal(image, celeba_transform(file, 32))


def test_celeba_transform_follows_sener_koltun(celeba: Path) -> None:
    with Image.open(celeba / "img_align_celeba" / "000003.jpg") as file:
        rgb = file.convert("RGB")
    ours = celeba_transform(rgb, 64)
    # Their transform_img, independently: BGR, minus the mean, imresize (bytescale, bilinear).
    pixels = np.asarray(rgb)[:, :, ::-1].astype(np.float64) - np.array(CELEBA_MEAN_BGR)
    low, high = pixels.min(), pixels.max()
    scaled = (((pixels - low) * (255.0 / (high - low))).clip(0, 255) + 0.5).astype(np.uint8)
    resized = Image.fromarray(scaled, "RGB").resize((64, 64), Image.Resampling.BILINEAR)
    expected = torch.from_numpy(np.asarray(resized) / 255.0).permute(2, 0, 1).float()
    assert torch.equal(ours, expected)


def test_celeba_release_layout(celeba_copy: Path) -> None:
    for name, folder in [
        ("list_attr_celeba.txt", "Anno"),
        ("list_eval_partition.txt", "Eval"),
        ("img_align_celeba", "Img"),
    ]:
        (celeba_copy / folder).mkdir()
        (celeba_copy / name).rename(celeba_copy / folder / name)
    assert len(celeba_dataset(celeba_copy, "train")) == 8


def test_celeba_malformed_text_files(celeba_copy: Path) -> None:
    attributes = celeba_copy / "list_attr_celeba.txt"
    original = attributes.read_text()
    attributes.write_text(original.replace("12\n", "13\n", 1))
    with pytest.raises(DataError, match="line 1 says 13 images, the file lists 12") as error:
        celeba_dataset(celeba_copy, "train")
    assert str(attributes) in str(error.value)
    lines = original.splitlines()
    lines[4] = lines[4].replace("-1", " 0", 1)
    attributes.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 5: expected a file name and 40 values") as error:
        celeba_dataset(celeba_copy, "train")
    assert str(attributes) in str(error.value)
    attributes.write_text(original.replace("Young", "Old"))
    with pytest.raises(DataError, match="line 2 should name the 40") as error:
        celeba_dataset(celeba_copy, "val")
    assert str(attributes) in str(error.value)
    attributes.write_text(original)
    partition = celeba_copy / "list_eval_partition.txt"
    partition.write_text(partition.read_text().replace("000002.jpg 0", "000002.jpg 3"))
    with pytest.raises(DataError, match="line 2: expected a file name and 0, 1 or 2") as error:
        celeba_dataset(celeba_copy, "test")
    assert str(partition) in str(error.value)
    partition.unlink()
    with pytest.raises(DataError, match=r"list_eval_partition\.txt not found") as error:
        celeba_dataset(celeba_copy, "test")
    assert str(partition) in str(error.value)


def test_celeba_bad_images_are_named_on_access(celeba_copy: Path) -> None:
    data = celeba_dataset(celeba_copy, "train")
    missing = celeba_copy / "img_align_celeba" / data.files[0]
    missing.unlink()
    with pytest.raises(DataError, match="img_align_celeba") as error:
        data[0]
    assert str(missing) in str(error.value)
    small = celeba_copy / "img_align_celeba" / data.files[1]
    Image.new("RGB", (64, 64)).save(small)
    with pytest.raises(DataError, match="64×64") as error:
        data[1]
    assert str(small) in str(error.value)
    broken = celeba_copy / "img_align_celeba" / data.files[2]
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot be read") as error:
        data[2]
    assert str(broken) in str(error.value)
    data[3]  # the others still read


# --------------------------------------------------------------------------- synthetic CLI
def test_synthetic_main_writes_the_source_format(tmp_path: Path) -> None:
    assert main(["nyuv2", str(tmp_path / "nyu"), "--train", "1", "--test", "1"]) == 0
    split = tmp_path / "nyu" / "val"
    expected = {
        "image": (288, 384, 3),
        "label": (288, 384),
        "depth": (288, 384, 1),
        "normal": (288, 384, 3),
    }
    for folder, shape in expected.items():
        names = sorted(p.name for p in (split / folder).iterdir())
        array = np.load(split / folder / "0.npy")
        assert names == ["0.npy"] and array.shape == shape and array.dtype == np.float64
    assert main(["mnist", str(tmp_path / "mnist"), "--train", "10", "--test", "5", "--gzip"]) == 0
    assert len(load_mnist(tmp_path / "mnist", "test")[0]) == 5
    assert main(["celeba", str(tmp_path / "celeba"), "--images", "3"]) == 0
    assert len(celeba_dataset(tmp_path / "celeba", "test")) == 1
    with pytest.raises(SystemExit):
        main(["celeba", str(tmp_path / "x"), "--train", "3"])
