"""Feature columns: TensorFlow's own expected ids, FarmHash's self-test vectors, hand-worked
column outputs, the errors, and a tabular classifier trained through the columns.

Every expected hash below is quoted from the test named beside it; random inputs are compared
with TensorFlow itself in tests/test_parity_tensorflow_features.py (heavy-peers venv).
"""

import math

import numpy as np
import pytest
import torch

from mlatlas.data.formats import feature_columns as fc
from mlatlas.data.formats.farmhash import fingerprint64, fingerprint_cat64


def test_fingerprint64_tensorflow_vectors():
    # tensorflow/python/kernel_tests/strings_ops/string_to_hash_bucket_op_test.py,
    # testStringToHashBucketsFast: "Fingerprint64('a') -> 12917804110809363939 -> mod 10 -> 9".
    expected = [12917804110809363939, 11795596070477164822, 11430444447143000872,
                4470636696479570465]
    assert fingerprint64(["a", "b", "c", "d"]).tolist() == expected
    assert fc.to_hash_bucket_fast(["a", "b", "c", "d"], 10).tolist() == [9, 2, 2, 5]
    assert fc.to_hash_bucket_fast(["a", "b", "c"], 1).tolist() == [0, 0, 0]


def test_hash_bucket_column_tensorflow_vectors():
    # feature_column_test.py, test_strings_should_be_hashed: ('omar', 'stringer', 'marlo') in
    # 10 buckets -> [6, 4, 1]; feature_column_v2_test.py, test_sparse_bias: in 4 -> [2, 0, 3].
    rows = {"wire": [["omar"], ["stringer", "marlo"]]}
    assert fc.categorical_with_hash_bucket("wire", 10).sparse_ids(rows).ids.tolist() == [6, 4, 1]
    ids = fc.categorical_with_hash_bucket("wire", 4).sparse_ids(rows)
    assert ids.ids.tolist() == [2, 0, 3] and ids.splits.tolist() == [0, 1, 3]
    # test_ints_should_be_hashed: ints hash as their decimal strings, (101, 201, 301) -> [3, 7, 5].
    ints = fc.categorical_with_hash_bucket("wire", 10, dtype="int64")
    assert ints.sparse_ids({"wire": [[101], [201, 301]]}).ids.tolist() == [3, 7, 5]


def farmhash_self_test_data(n: int) -> bytes:
    """The pseudo-random bytes of farmhash's self-test (src/farmhash.cc, Setup)."""
    k0, mask = 0xC3A5C85C97CB3127, 2**64 - 1
    a, b, out = 9, 777, bytearray(n)
    for i in range(n):
        a = (a + b) & mask
        b = (b + a) & mask
        a = ((a ^ (a >> 41)) * k0) & mask
        b = (((b ^ (b >> 41)) * k0) + i) & mask
        out[i] = (b >> 37) & 0xFF
    return bytes(out)


def test_fingerprint64_farmhash_self_test_vectors():
    # google/farmhash src/farmhash.cc, farmhashnaTest: test i hashes data[i*i : i*i + i] for
    # i < 299, then data[0 : 299], data[0 : 341]; Hash64 is the 5th and 6th words (high, low)
    # of each group of 6 in `expected`. Lengths chosen to hit every branch and its edges.
    expected = {0: 11160318154034397263, 1: 6057711933287653014, 3: 17262924617777385131,
                4: 1287846036432493960, 7: 1970894657613724145, 8: 11597051931199355094,
                16: 282273162512842838, 17: 7691019942193281883, 32: 541269899254986215,
                33: 711203541633906104, 64: 16066393710399699995, 65: 4381627749513796415,
                128: 17629800649466220701, 129: 15345954539186508726,
                200: 4680135810112858625, 298: 2319855510833732255}
    data = farmhash_self_test_data(298 * 298 + 298)
    strings = [data[i * i:i * i + i] for i in expected] + [data[:299], data[:341]]
    assert fingerprint64(strings).tolist() == [*expected.values(), 14734041553762417017,
                                               10389017116275415821]


def test_fingerprint64_of_a_batch_equals_each_string_alone():
    # The batch is split by length class and sorted by block count; the order must not leak.
    rng = np.random.default_rng(0)
    strings = [rng.integers(0, 256, k, dtype=np.uint8).tobytes()
               for k in rng.permutation(np.r_[0:200, rng.integers(0, 700, 100)])]
    alone = [int(fingerprint64([s])[0]) for s in strings]
    assert fingerprint64(strings).tolist() == alone
    assert fingerprint64(["é"]).tolist() == fingerprint64(["é".encode()]).tolist()
    mixed = fingerprint64(["a", b"a", np.str_("a"), np.bytes_(b"a")])
    assert len(set(mixed.tolist())) == 1
    with pytest.raises(TypeError, match="str or bytes, got int"):
        fingerprint64(["a", 3])


def test_cross_hashed_tensorflow_vectors():
    # sparse_cross_op_test.py: test_hashed_zero_bucket_no_hash_key (1971693436396284976),
    # test_hashed_zero_bucket (4847552627144134031), test_hashed_no_hash_key (83),
    # test_hashed_output (31); the key is _DEFAULT_HASH_KEY = 0xDECAFCAFFE, or it plus 1.
    inputs = [[["batch1-FC1-F1"]], [["batch1-FC2-F1"]], [["batch1-FC3-F1"]]]
    assert fc.cross_hashed(inputs).ids.tolist() == [1971693436396284976]
    key = fc.DEFAULT_HASH_KEY + 1
    assert fc.cross_hashed(inputs, hash_key=key).ids.tolist() == [4847552627144134031]
    assert fc.cross_hashed(inputs, num_buckets=100).ids.tolist() == [83]
    assert fc.cross_hashed(inputs, num_buckets=100, hash_key=key).ids.tolist() == [31]


def test_crossed_column_tensorflow_vectors():
    # feature_column_v2_test.py, CrossedColumnTest.test_get_sparse_tensors_simple and
    # test_get_sparse_tensors (a nested cross flattened into its leaves).
    a = fc.numeric("a", shape=2)
    b = fc.bucketized(a, (0, 1))
    features = {"a": [[-1.0, 0.5], [0.5, 1.0]], "c": [["cA"], ["cB", "cC"]],
                "d1": [["d1A"], ["d1B", "d1C"]], "d2": [["d2A"], ["d2B", "d2C"]]}
    simple = fc.crossed([b, "c"], 5, hash_key=5).sparse_ids(features)
    assert simple.ids.tolist() == [1, 0, 1, 3, 4, 2] and simple.splits.tolist() == [0, 2, 6]
    nested = fc.crossed([b, "c", fc.crossed(["d1", "d2"], 10)], 15, hash_key=5)
    assert nested.name == "a_bucketized_X_c_X_d1_X_d2"
    assert nested.sparse_ids(features).ids.tolist() == [6, 14, 0, 13, 8, 8, 10, 12, 2, 0, 1, 9,
                                                        8, 12, 2, 0, 10, 11]


def test_cross_is_the_fingerprint_chain_over_the_product():
    # Row 1 crosses {p, q} x {7}: two crosses, the last input varying fastest.
    out = fc.cross_hashed([[["x"], ["p", "q"]], [[3], [7]]])
    chain = [fingerprint_cat64(fingerprint_cat64(np.uint64(fc.DEFAULT_HASH_KEY),
                                                 fingerprint64([s])[0]), np.uint64(v))
             for s, v in [("x", 3), ("p", 7), ("q", 7)]]
    assert out.ids.tolist() == [int(h) % (2**63 - 1) for h in chain]
    assert out.splits.tolist() == [0, 1, 3]
    # A dense input is hashed after the sparse ones whatever the order it is listed in.
    dense, sparse = np.array([["u"], ["v"]], dtype=object), [["a", "b"], ["c"]]
    assert torch.equal(fc.cross_hashed([dense, sparse]).ids, fc.cross_hashed([sparse, dense]).ids)
    assert not torch.equal(fc.cross_hashed([[["u"], ["v"]], sparse]).ids,
                           fc.cross_hashed([sparse, [["u"], ["v"]]]).ids)
    # A row with no values in one input has no crosses.
    assert fc.cross_hashed([[["a"], []], [[1], [2]]], 10).splits.tolist() == [0, 1, 1]


def test_bucketized_is_left_closed_and_compares_in_float32():
    col = fc.bucketized(fc.numeric("x"), [0.0, 0.1, 2.0])
    x = [-0.5, 0.0, 0.05, 0.1, 1.99, 2.0, 7.0]
    # 0.1 as a float64 rounds to the same float32 as the boundary, so it opens bucket 2.
    assert col.buckets({"x": x}).ravel().tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert col.dense({"x": [0.05]}).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    two = fc.bucketized(fc.numeric("p", shape=2), [10.0])
    assert two.sparse_ids({"p": [[5.0, 50.0]]}).ids.tolist() == [0, 3]  # bucket + j (1 + 1)
    assert two.dense({"p": [[5.0, 50.0]]}).tolist() == [[1.0, 0.0, 0.0, 1.0]]


def test_numeric_normalises_and_flattens():
    col = fc.numeric("p", shape=(2, 2), normalizer_fn=lambda x: 2 * x)
    out = col.dense({"p": torch.arange(8.0).reshape(2, 2, 2)})
    assert out.tolist() == [[0.0, 2.0, 4.0, 6.0], [8.0, 10.0, 12.0, 14.0]]


def test_vocabulary_default_oov_buckets_file_and_ints(tmp_path):
    # feature_column_v2_test.py, test_transform_feature (indicator of a vocabulary list):
    # ('marlo',), ('skywalker', 'omar') -> [[0, 0, 1], [1, 0, 0]] (skywalker is -1, dropped).
    col = fc.categorical_with_vocabulary("aaa", ["omar", "stringer", "marlo"])
    rows = {"aaa": [["marlo"], ["skywalker", "omar"]]}
    assert col.sparse_ids(rows).ids.tolist() == [2, -1, 0]
    assert fc.indicator(col).dense(rows).tolist() == [[0, 0, 1], [1, 0, 0]]
    oov = fc.categorical_with_vocabulary("aaa", ["omar", "stringer", "marlo"], num_oov_buckets=2)
    assert oov.num_buckets == 5
    assert oov.sparse_ids(rows).ids.tolist() == [
        2, 3 + int(fingerprint64(["skywalker"])[0] % 2), 0]
    default = fc.categorical_with_vocabulary("aaa", ["omar"], default_value=0)
    assert default.sparse_ids({"aaa": ["zz", "omar", ""]}).ids.tolist() == [0, 0]  # '' missing
    path = tmp_path / "v.txt"
    path.write_text("omar\nstringer\nmarlo\n")
    from_file = fc.categorical_with_vocabulary("aaa", vocabulary_file=path, vocabulary_size=2)
    assert from_file.sparse_ids(rows).ids.tolist() == [-1, -1, 0]
    ints = fc.categorical_with_vocabulary("n", [12, 24, 36], num_oov_buckets=3)
    got = ints.sparse_ids({"n": np.array([[36, 5], [-1, 12]])})
    assert got.ids.tolist() == [2, 3 + int(fingerprint64(["5"])[0] % 3), 0]
    assert got.splits.tolist() == [0, 2, 3]  # the -1 is TF's missing-value marker


def test_identity_default_and_missing():
    col = fc.categorical_with_identity("s", 4, default_value=3)
    got = col.sparse_ids({"s": torch.tensor([[0, -1], [7, 2]])})
    assert got.ids.tolist() == [0, 3, 2] and got.splits.tolist() == [0, 1, 3]
    with pytest.raises(fc.FeatureColumnError, match=r"'s': ids must be in \[0, 4\)"):
        fc.categorical_with_identity("s", 4).sparse_ids({"s": [[5]]})


def test_embedding_combiners_by_hand():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], requires_grad=True)
    # Row 0: ids (0, 2) weights (1, 3); row 1: id 1 with weight -1 (dropped) and id -1
    # (dropped): empty, so zero; row 2: id 1 twice with weights (1, 1).
    bags = fc.SparseIds(torch.tensor([0, 2, 1, -1, 1, 1]), torch.tensor([0, 2, 4, 6]),
                        torch.tensor([1.0, 3.0, -1.0, 1.0, 1.0, 1.0]))
    total = torch.tensor([7.0, 6.0])  # 1 * (1, 0) + 3 * (2, 2)
    assert fc.embedding_bag(table, bags, "sum").tolist() == [total.tolist(), [0, 0], [0, 2]]
    mean = fc.embedding_bag(table, bags, "mean")
    torch.testing.assert_close(mean, torch.stack([total / 4, torch.zeros(2),
                                                  torch.tensor([0.0, 1.0])]))
    sqrtn = fc.embedding_bag(table, bags, "sqrtn")
    torch.testing.assert_close(sqrtn, torch.stack([total / math.sqrt(10), torch.zeros(2),
                                                   torch.tensor([0.0, 2 / math.sqrt(2)])]))
    sqrtn.sum().backward()
    torch.testing.assert_close(table.grad[2], torch.full((2,), 3 / math.sqrt(10)))


def test_indicator_sums_weights_and_counts():
    bags = fc.SparseIds(torch.tensor([1, 1, 3, -1]), torch.tensor([0, 3, 4]))
    assert fc.multi_hot(bags, 4).tolist() == [[0, 2, 0, 1], [0, 0, 0, 0]]
    col = fc.weighted_categorical(fc.categorical_with_identity("i", 3), "w")
    out = fc.indicator(col).dense({"i": [[0, 2, 2], [1]], "w": [[0.5, 1.0, 2.0], [4.0]]})
    assert out.tolist() == [[0.5, 0.0, 3.0], [0.0, 4.0, 0.0]]
    assert col.name == "i_weighted_by_w"


def test_dense_features_sorts_by_name_and_trains_embeddings():
    b = fc.numeric("b")
    a = fc.embedding(fc.categorical_with_hash_bucket("a", 7), 3, "sum")
    layer = fc.DenseFeatures([b, a], generator=torch.Generator().manual_seed(0))
    assert [c.name for c in layer.columns] == ["a_embedding", "b"]
    out = layer({"a": [["x"], ["y", "x"]], "b": [5.0, 6.0]})
    table = layer.embeddings["a_embedding"]
    ids = fc.to_hash_bucket_fast(["x", "y"], 7)
    torch.testing.assert_close(out[:, :3], torch.stack([table[ids[0]], table[ids[1]]
                                                        + table[ids[0]]]))
    assert out[:, 3].tolist() == [5.0, 6.0] and layer.dimension == 4
    out.sum().backward()
    assert table.grad[ids[0]].tolist() == [2.0, 2.0, 2.0]
    # TF's initializer: a normal of std 1/sqrt(d) truncated at 2 std.
    assert table.abs().max() <= 2 / math.sqrt(3)


@pytest.mark.parametrize("make, message", [
    (lambda: fc.numeric("p").dense({}), r"feature 'p' is missing"),
    (lambda: fc.numeric("p", 2).dense({"p": [1.0, 2.0]}), r"'p': expected \(batch, \(2,\)"),
    (lambda: fc.categorical_with_hash_bucket("w", 3).sparse_ids({"w": [1, 2]}),
     r"'w': expected strings"),
    (lambda: fc.categorical_with_identity("i", 3).sparse_ids({"i": [0.5]}),
     r"'i': expected integers"),
    (lambda: fc.bucketized(fc.numeric("x"), [1, 1]), r"'x': boundaries must be"),
    (lambda: fc.crossed(["a"], 10), r"at least 2"),
    (lambda: fc.crossed([fc.categorical_with_hash_bucket("h", 3), "b"], 10),
     r"raw key 'h'"),
    (lambda: fc.categorical_with_vocabulary("v", ["a", "a"]), r"duplicate"),
    (lambda: fc.categorical_with_vocabulary("v", ["a", 3]), r"every entry must be a string"),
    (lambda: fc.categorical_with_vocabulary("v", ["a"], num_oov_buckets=1, default_value=0),
     r"not both"),
    (lambda: fc.categorical_with_vocabulary("v", vocabulary_file="/nonexistent/v.txt"),
     r"cannot read /nonexistent/v.txt"),
    (lambda: fc.DenseFeatures([fc.categorical_with_identity("i", 3)]),
     r"'i' is not a dense column"),
    (lambda: fc.DenseFeatures([fc.numeric("a"), fc.numeric("a")]), r"duplicate"),
    (lambda: fc.weighted_categorical(fc.categorical_with_identity("i", 3), "w").sparse_ids(
        {"i": [[0, 1]], "w": [[1.0]]}), r"'w': one weight per id"),
    (lambda: fc.cross_hashed([[["a"]], [["b"], ["c"]]]), r"different batch sizes"),
])
def test_bad_input_is_one_named_error(make, message):
    with pytest.raises(fc.FeatureColumnError, match=message):
        make()


def generated_table(n: int, seed: int):
    """Rows whose label is a fixed random function of (age bucket, city) and the device,
    flipped with probability 0.1: learnable from the cross, not from either column alone."""
    rng = np.random.default_rng(seed)
    cities = np.array(["paris", "oslo", "lima", "rome", "kyiv", "pune"])
    devices = np.array(["ios", "android", "web"])
    table = np.random.default_rng(1234).integers(0, 2, (5, len(cities)))  # shared by all splits
    age = rng.uniform(18, 80, n).astype(np.float32)
    city = rng.integers(0, len(cities), n)
    device = rng.integers(0, len(devices), n)
    bucket = np.searchsorted([30, 40, 50, 65], age, side="right")
    label = table[bucket, city] ^ (device == 0) ^ (rng.random(n) < 0.1)
    features = {"age": age, "city": list(cities[city]), "device": list(devices[device]),
                "tags": [list(rng.choice(["new", "vip", "promo"], rng.integers(0, 3)))
                         for _ in range(n)]}
    return features, torch.from_numpy(label.astype(np.int64))


def tabular_columns(cross: bool):
    age_b = fc.bucketized(fc.numeric("age"), [30, 40, 50, 65])
    city = fc.categorical_with_vocabulary("city", ["paris", "oslo", "lima", "rome", "kyiv"],
                                          num_oov_buckets=1)
    device = fc.categorical_with_hash_bucket("device", 8)
    cols = [fc.indicator(age_b), fc.indicator(city), fc.indicator(device),
            fc.embedding(fc.categorical_with_hash_bucket("tags", 5), 2, "sqrtn")]
    if cross:
        cols.append(fc.indicator(fc.crossed([age_b, "city", "device"], 300)))
    return cols


def train_tabular(cross: bool, seed: int = 0, steps: int = 150) -> tuple[float, float]:
    """A logistic regression on DenseFeatures; (test accuracy, majority-class accuracy)."""
    torch.manual_seed(seed)
    train_x, train_y = generated_table(2000, seed)
    test_x, test_y = generated_table(2000, seed + 100)
    layer = fc.DenseFeatures(tabular_columns(cross), generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(layer, torch.nn.Linear(layer.dimension, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(train_x), train_y).backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    majority = max(test_y.float().mean().item(), 1 - test_y.float().mean().item())
    return accuracy, majority


def test_tabular_classifier_beats_the_majority_baseline():
    accuracy, majority = train_tabular(cross=True)
    assert accuracy > majority + 0.2, (accuracy, majority)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_cross_is_what_the_classifier_learns_from(seed):
    # The label is a function of (age bucket, city, device): without their cross a linear model
    # stays near the majority class; with it, near the 0.9 ceiling that the flipped labels set.
    with_cross, majority = train_tabular(cross=True, seed=seed)
    without, _ = train_tabular(cross=False, seed=seed)
    print(f"seed {seed}: crossed {with_cross:.4f}  uncrossed {without:.4f}  "
          f"majority {majority:.4f}")
    assert with_cross > without + 0.15 and with_cross > 0.85
