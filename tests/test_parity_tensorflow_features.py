"""Peer parity: Fingerprint64, the hash buckets, the hashed crosses and DenseFeatures' output
equal TensorFlow's on random inputs.

TensorFlow and tf-keras live in the heavy-peers venv (``make test-tensorflow``), so this is
skipped elsewhere. Compared: ``fingerprint64`` with ``tf.fingerprint`` (its 8 little-endian
bytes are Fingerprint64 of each string) over strings of every length class up to 300 bytes;
``to_hash_bucket_fast`` with ``tf.strings.to_hash_bucket_fast``; ``cross_hashed`` with
``tf.sparse.cross_hashed`` on sparse and dense, string and int inputs; and ``DenseFeatures`` with
``tf_keras.layers.DenseFeatures`` over the same ``tf.feature_column`` columns and inputs, the
embedding tables copied from TensorFlow's variables into ours.
"""

import numpy as np
import pytest
import torch

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")

from mlatlas.data.formats import feature_columns as fc  # noqa: E402
from mlatlas.data.formats.farmhash import fingerprint64  # noqa: E402


def random_strings(rng: np.random.Generator, n: int, max_len: int = 300) -> list[bytes]:
    # Lengths cover every branch of Hash64: 0, 1-3, 4-7, 8-16, 17-32, 33-64 and > 64 bytes.
    lengths = np.concatenate([np.arange(max_len + 1), rng.integers(0, max_len, n)])
    return [rng.integers(0, 256, k, dtype=np.uint8).tobytes() for k in lengths]


def random_words(rng: np.random.Generator, n: int) -> list[str]:
    alphabet = list("abcdefghijklmnopqrstuvwxyzé中")
    return ["".join(rng.choice(alphabet, rng.integers(1, 12))) for _ in range(n)]


def ragged(rng: np.random.Generator, pool: list, batch: int, max_count: int = 3) -> list[list]:
    return [list(rng.choice(np.array(pool, dtype=object), rng.integers(0, max_count + 1)))
            for _ in range(batch)]


def to_sparse(rows: list[list], dtype) -> "tf.SparseTensor":
    return tf.ragged.constant(rows, dtype=dtype, ragged_rank=1).to_sparse()


def test_fingerprint64_equals_tf_fingerprint():
    strings = random_strings(np.random.default_rng(0), 2000)
    theirs = tf.fingerprint(tf.constant(strings)).numpy().view("<u8").ravel()
    np.testing.assert_array_equal(fingerprint64(strings), theirs)


@pytest.mark.parametrize("num_buckets", [1, 10, 1000003, 2**62 + 7])
def test_to_hash_bucket_fast(num_buckets):
    strings = random_strings(np.random.default_rng(1), 500)
    theirs = tf.strings.to_hash_bucket_fast(tf.constant(strings), num_buckets).numpy()
    np.testing.assert_array_equal(fc.to_hash_bucket_fast(strings, num_buckets), theirs)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_buckets", [0, 1000])
def test_cross_hashed_on_sparse_and_dense_inputs(seed, num_buckets):
    rng = np.random.default_rng(seed)
    batch = 40
    words = random_words(rng, 30)
    sparse_strings = ragged(rng, words, batch)
    sparse_ints = [[int(v) for v in row] for row in ragged(rng, [-5, 0, 3, 2**40, -2**62], batch)]
    dense_strings = np.array(rng.choice(words, (batch, 2)), dtype=object)
    dense_ints = rng.integers(-1000, 1000, (batch, 1))
    hash_key = int(rng.integers(0, 2**62))
    # TF's kernel takes sparse inputs first: listing a dense one first must not change that.
    ours = fc.cross_hashed([dense_strings, sparse_strings, dense_ints, sparse_ints],
                           num_buckets=num_buckets, hash_key=hash_key)
    theirs = tf.sparse.cross_hashed(
        [tf.constant(dense_strings.astype(str)), to_sparse(sparse_strings, tf.string),
         tf.constant(dense_ints, tf.int64), to_sparse(sparse_ints, tf.int64)],
        num_buckets=num_buckets, hash_key=hash_key)
    np.testing.assert_array_equal(ours.ids.numpy(), theirs.values.numpy())
    rows = theirs.indices.numpy()[:, 0]
    np.testing.assert_array_equal(torch.diff(ours.splits).numpy(),
                                  np.bincount(rows, minlength=batch))


def column_pairs(vocab_file: str):
    """The same columns built twice: ours and TensorFlow's."""
    t = tf.feature_column

    def ours_and_theirs(builder):
        return builder(fc, "ours"), builder(t, "theirs")

    def build(lib, who):
        if who == "ours":
            num = lib.numeric("price", shape=2, normalizer_fn=lambda x: (x - 3.0) / 2.0)
            age = lib.numeric("age")
            buck = lib.bucketized(num, [0.0, 1.5, 40.0])
            age_b = lib.bucketized(age, [18, 30, 45, 60])
            vocab = lib.categorical_with_vocabulary("colour", ["red", "green", "blue"],
                                                    num_oov_buckets=3)
            vfile = lib.categorical_with_vocabulary("city", vocabulary_file=vocab_file,
                                                    vocabulary_size=4)
            ident = lib.categorical_with_identity("slot", 6, default_value=5)
            ints = lib.categorical_with_vocabulary("n", [12, 24, 36], num_oov_buckets=3)
            hashed = lib.categorical_with_hash_bucket("word", 50)
            hashed_int = lib.categorical_with_hash_bucket("zip", 30, dtype="int64")
            cross = lib.crossed([age_b, "word", vocab], 97, hash_key=12345)
            cross2 = lib.crossed(["word", "tag"], 40)
            weighted = lib.weighted_categorical(
                lib.categorical_with_vocabulary("item", ["x", "y", "z"]), "item_w")
            return [num, age, buck, lib.indicator(age_b), lib.indicator(vocab),
                    lib.indicator(vfile), lib.indicator(ident), lib.indicator(ints),
                    lib.embedding(hashed, 4, "mean"), lib.embedding(hashed_int, 3, "sum"),
                    lib.indicator(cross), lib.embedding(cross2, 5, "sqrtn"),
                    lib.indicator(weighted),
                    lib.embedding(lib.weighted_categorical(
                        lib.categorical_with_identity("slot2", 4), "slot2_w"), 2, "sqrtn")]
        num = lib.numeric_column("price", shape=2, normalizer_fn=lambda x: (x - 3.0) / 2.0)
        age = lib.numeric_column("age")
        buck = lib.bucketized_column(num, [0.0, 1.5, 40.0])
        age_b = lib.bucketized_column(age, [18, 30, 45, 60])
        vocab = lib.categorical_column_with_vocabulary_list("colour", ["red", "green", "blue"],
                                                            num_oov_buckets=3)
        vfile = lib.categorical_column_with_vocabulary_file("city", vocab_file,
                                                            vocabulary_size=4)
        ident = lib.categorical_column_with_identity("slot", 6, default_value=5)
        ints = lib.categorical_column_with_vocabulary_list("n", [12, 24, 36], dtype=tf.int64,
                                                           num_oov_buckets=3)
        hashed = lib.categorical_column_with_hash_bucket("word", 50)
        hashed_int = lib.categorical_column_with_hash_bucket("zip", 30, dtype=tf.int64)
        cross = lib.crossed_column([age_b, "word", vocab], 97, hash_key=12345)
        cross2 = lib.crossed_column(["word", "tag"], 40)
        weighted = lib.weighted_categorical_column(
            lib.categorical_column_with_vocabulary_list("item", ["x", "y", "z"]), "item_w")
        return [num, age, buck, lib.indicator_column(age_b), lib.indicator_column(vocab),
                lib.indicator_column(vfile), lib.indicator_column(ident),
                lib.indicator_column(ints),
                lib.embedding_column(hashed, 4, "mean"),
                lib.embedding_column(hashed_int, 3, "sum"),
                lib.indicator_column(cross), lib.embedding_column(cross2, 5, "sqrtn"),
                lib.indicator_column(weighted),
                lib.embedding_column(lib.weighted_categorical_column(
                    lib.categorical_column_with_identity("slot2", 4), "slot2_w"), 2, "sqrtn")]

    return ours_and_theirs(build)


def random_table(rng: np.random.Generator, batch: int):
    """One batch in our form and in TensorFlow's: dense and sparse, with missing values."""
    words = random_words(rng, 25)
    price = rng.normal(3, 20, (batch, 2)).astype(np.float32)
    age = rng.integers(0, 80, batch).astype(np.float32)
    colour = rng.choice(["red", "green", "blue", "pink", "grey", ""], batch)  # '' is missing
    city = [list(row) for row in ragged(rng, ["paris", "oslo", "lima", "rome", "kyiv", "x"],
                                        batch)]
    slot = rng.integers(-1, 9, (batch, 2))  # -1 is missing, 6-8 take the default
    n = rng.choice([12, 24, 36, -1, 7, -30, 10**12], (batch, 2))  # OOV ints hash as decimals
    word = ragged(rng, words, batch)
    zips = rng.integers(0, 100000, batch)
    tag = np.array(rng.choice(words, (batch, 1)), dtype=object)
    item = ragged(rng, ["x", "y", "z", "w"], batch, 4)
    item_w = [list(rng.uniform(-1, 3, len(r)).astype(np.float32)) for r in item]
    slot2 = [[int(v) for v in rng.integers(0, 4, rng.integers(0, 4))] for _ in range(batch)]
    slot2_w = [list(rng.uniform(-0.5, 2, len(r)).astype(np.float32)) for r in slot2]
    ours = {"price": price, "age": age, "colour": list(colour), "city": city, "slot": slot, "n": n,
            "word": word, "zip": torch.from_numpy(zips), "tag": tag, "item": item,
            "item_w": item_w, "slot2": slot2, "slot2_w": slot2_w}
    theirs = {"price": tf.constant(price), "age": tf.constant(age[:, None]),
              "colour": tf.constant(colour[:, None]), "city": to_sparse(city, tf.string),
              "slot": tf.constant(slot, tf.int64), "n": tf.constant(n, tf.int64),
              "word": to_sparse(word, tf.string),
              "zip": tf.constant(zips[:, None], tf.int64), "tag": tf.constant(tag.astype(str)),
              "item": to_sparse(item, tf.string), "item_w": to_sparse(item_w, tf.float32),
              "slot2": to_sparse(slot2, tf.int64), "slot2_w": to_sparse(slot2_w, tf.float32)}
    return ours, theirs


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_features_equal_tf_keras(tmp_path, seed):
    vocab_file = tmp_path / "cities.txt"
    vocab_file.write_text("paris\noslo\nlima\nrome\nkyiv\n")  # vocabulary_size=4 drops kyiv
    ours_cols, theirs_cols = column_pairs(str(vocab_file))
    rng = np.random.default_rng(seed)
    ours_in, theirs_in = random_table(rng, 64)
    layer = tf_keras.layers.DenseFeatures(theirs_cols)
    expected = layer(theirs_in).numpy()
    model = fc.DenseFeatures(ours_cols)
    assert [c.name for c in model.columns] == sorted(c.name for c in theirs_cols)
    with torch.no_grad():
        for var in layer.weights:
            name = var.name.split("/")[-2]  # dense_features/<column name>/embedding_weights:0
            model.embeddings[name].copy_(torch.from_numpy(var.numpy()))
    assert len(layer.weights) == len(model.embeddings) == 4
    got = model(ours_in).detach().numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
