import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mlatlas.data import (
    DATASETS,
    DatasetError,
    EpochBatches,
    load_dataset,
    load_fashion_mnist,
    read_idx,
)
from mlatlas.data.toy2d import GENERATORS, sample_toy


@pytest.mark.parametrize("name,train,test,shape", [
    ("digits", 1437, 360, (1, 8, 8)),
    ("mnist", 4000, 1000, (1, 28, 28)),
])
def test_shipped_images(name, train, test, shape):
    ds = load_dataset(name)
    assert ds.kind == "image" and ds.sample_shape == shape
    assert (len(ds.x_train), len(ds.x_test)) == (train, test)
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1
    assert torch.bincount(ds.y_test).tolist() == [test // 10] * 10 or name == "digits"
    assert ds.num_classes == 10


def test_splits_are_fixed():
    from mlatlas.data import _load_named

    a = load_dataset("digits")
    _load_named.cache_clear()
    b = load_dataset("digits")
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)


def test_binarized_variant():
    ds = load_dataset("digits-binary")
    assert set(ds.x_train.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(ds.x_train, (load_dataset("digits").x_train > 0.5).float())


@pytest.mark.parametrize("name", list(GENERATORS))
def test_toys_are_deterministic_and_bounded(name):
    a, b = sample_toy(name, 500, seed=3), sample_toy(name, 500, seed=3)
    assert torch.equal(a, b) and a.shape == (500, 2)
    assert not torch.equal(a, sample_toy(name, 500, seed=4))
    assert a.abs().max() < 6
    ds = load_dataset(name)
    assert ds.kind == "points" and not torch.equal(ds.x_train[:2000], ds.x_test)


def test_eight_gaussians_has_eight_modes():
    x = sample_toy("8gaussians", 4000) * 2**0.5
    angles = torch.atan2(x[:, 1], x[:, 0])
    mode = torch.round(angles / (np.pi / 4)).long() % 8
    assert (torch.bincount(mode, minlength=8) > 400).all()  # 500 expected per mode


def test_unknown_name_suggests():
    with pytest.raises(DatasetError, match="did you mean mnist"):
        load_dataset("mnsit")
    assert "fashion-mnist-binary" in DATASETS


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                       *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 28, 28)), np.arange(6) % 10
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    ds = load_fashion_mnist(tmp_path)
    assert ds.x_train.shape == (6, 1, 28, 28)
    assert torch.allclose(ds.x_train[:, 0] * 255, torch.tensor(images, dtype=torch.float32))
    assert ds.y_test.tolist() == labels.tolist() and ds.classes[9] == "Ankle boot"


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_idx_corruption_is_caught(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros((4, 3, 3)))
    with gzip.open(tmp_path / "a.gz") as f:
        data = f.read()
    with gzip.open(tmp_path / "b.gz", "wb") as f:
        f.write(data[:-5])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "b.gz")
    (tmp_path / "c.gz").write_bytes(b"not gzip")
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "c.gz")


def test_npy_points_and_images(tmp_path):
    np.save(tmp_path / "pts.npy", np.random.default_rng(0).normal(size=(50, 3)))
    ds = load_dataset(str(tmp_path / "pts.npy"))
    assert ds.kind == "points" and (len(ds.x_train), len(ds.x_test)) == (45, 5)
    np.save(tmp_path / "img.npy", np.zeros((20, 6, 6, 3), dtype=np.uint8))
    assert load_dataset(str(tmp_path / "img.npy")).sample_shape == (3, 6, 6)
    np.save(tmp_path / "bad.npy", np.full((20, 6, 6), 7.0))
    with pytest.raises(DatasetError, match=r"must lie in \[0, 1\]"):
        load_dataset(str(tmp_path / "bad.npy"))
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(str(tmp_path / "missing.npy"))


def test_image_folder_with_classes(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(np.full((5, 7), 20 * i, dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png")
    ds = load_dataset(str(tmp_path))
    assert ds.sample_shape == (1, 5, 7) and ds.classes == ("cat", "dog")
    assert len(ds.x_train) + len(ds.x_test) == 20
    (tmp_path / "dog" / "broken.png").write_bytes(b"nope")  # files are read again each call
    with pytest.raises(DatasetError, match="cannot read image"):
        load_dataset(str(tmp_path))


def test_epoch_batches_cover_each_epoch_once():
    batches = EpochBatches(10, 3, seed=0)
    epoch = torch.cat([batches(s) for s in (1, 2, 3)])
    assert len(epoch.unique()) == 9  # 10 // 3 full batches, the remainder dropped
    again = EpochBatches(10, 3, seed=0)
    assert torch.equal(again(5), batches(5))  # a pure function of (seed, step)
    assert not torch.equal(batches(4), batches(1))
    with pytest.raises(DatasetError, match="batch size 11"):
        EpochBatches(10, 11, seed=0)


def test_user_data_is_named_by_its_path(tmp_path):
    path = tmp_path / "digits.npy"  # a user file that happens to share a built-in name
    np.save(path, np.random.default_rng(0).random((20, 8, 8)).astype("float32"))
    assert load_dataset(str(path)).name == str(path)
