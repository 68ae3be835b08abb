"""Our TFRecord files against TensorFlow's: byte-equal files from tf.io.TFRecordWriter for the
same records under every compression, each side's files read back exactly by the other, and
the same files refused as corrupt. Runs where TensorFlow is installed (.venv-openclip)."""

import os
import random

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from mlatlas.data.formats import tfrecord as tfr  # noqa: E402
from mlatlas.data.formats.example import encode_example  # noqa: E402


def sample_records(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    records = [rng.randbytes(rng.choice([0, 1, 7, 100, 1000])) for _ in range(60)]
    # Compressible ones too (zeros and repeats), and one longer than our 1 MiB chunk.
    return records + [bytes(5000), b"ab" * 4000, rng.randbytes(1_500_000) + bytes(600_000)]


def tf_write(path, records, compression):
    options = tf.io.TFRecordOptions(compression_type=compression)
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for record in records:
            writer.write(record)


def tf_read(path, compression):
    return [x.numpy() for x in tf.data.TFRecordDataset(str(path), compression_type=compression)]


@pytest.mark.parametrize("compression", tfr.COMPRESSIONS)
def test_our_files_equal_tensorflows_byte_for_byte(tmp_path, compression):
    for seed in range(3):
        records = sample_records(seed)
        with tfr.TFRecordWriter(tmp_path / "ours.tfrecord", compression) as writer:
            for record in records:
                writer.write(record)
        tf_write(tmp_path / "tf.tfrecord", records, compression)
        assert (tmp_path / "ours.tfrecord").read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()


@pytest.mark.parametrize("compression", tfr.COMPRESSIONS)
def test_each_sides_files_read_back_exactly_on_the_other(tmp_path, compression):
    records = sample_records(7)
    tf_write(tmp_path / "tf.tfrecord", records, compression)
    assert list(tfr.read_records(tmp_path / "tf.tfrecord")) == records  # compression detected
    with tfr.TFRecordWriter(tmp_path / "ours.tfrecord", compression) as writer:
        for record in records:
            writer.write(record)
    assert tf_read(tmp_path / "ours.tfrecord", compression) == records


def test_tensorflow_parses_the_examples_load_dataset_reads(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3, 3)).astype(np.uint8)
    with tfr.TFRecordWriter(tmp_path / "img.tfrecord") as writer:
        for i, image in enumerate(images):
            writer.write(encode_example({"x": image.tobytes(), "shape": list(image.shape),
                                         "y": i}))
    spec = {"x": tf.io.FixedLenFeature([], tf.string), "shape": tf.io.FixedLenFeature([3],
                                                                                      tf.int64),
            "y": tf.io.FixedLenFeature([], tf.int64)}
    for i, record in enumerate(tf.data.TFRecordDataset(str(tmp_path / "img.tfrecord"))):
        parsed = tf.io.parse_single_example(record, spec)
        image = tf.reshape(tf.io.decode_raw(parsed["x"], tf.uint8), parsed["shape"]).numpy()
        assert (image == images[i]).all() and int(parsed["y"]) == i


@pytest.mark.parametrize("where", ["length", "data"])
def test_both_refuse_the_same_corrupt_file(tmp_path, where):
    path = tmp_path / "f.tfrecord"
    records = [os.urandom(50) for _ in range(6)]
    with tfr.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    raw = bytearray(path.read_bytes())
    offset = writer.index[2][0]
    raw[offset + (3 if where == "length" else 20)] ^= 0x08
    path.write_bytes(bytes(raw))
    with pytest.raises(tf.errors.DataLossError):
        tf_read(path, "")
    with pytest.raises(tfr.TFRecordError, match=f"record 2 at byte {offset}"):
        list(tfr.read_records(path))
