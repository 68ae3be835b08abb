"""Peer parity: tf.train.Example / SequenceExample bytes and parsing equal TensorFlow's.

Runs in the heavy-peers venv (.venv-openclip, TensorFlow 2.21) and is skipped elsewhere. For
random features (seeded): our bytes equal protobuf's SerializeToString(deterministic=True), which
sorts map keys as we do (its default writes them in insertion order, so those bytes are compared
by decoding both); TensorFlow's bytes decode here exactly; tf.io.parse_single_example and
parse_single_sequence_example read our bytes as our parse_example / parse_sequence_example do;
where TensorFlow refuses an example we raise; and under every single-bit flip of a message,
protobuf's parser and ours agree on the values wherever both accept it, and we refuse every
message protobuf refuses.

protobuf's Python API takes floats as Python floats, so a signalling NaN is quieted before it is
stored; the random floats here are every float32 bit pattern except signalling NaNs.
"""

import functools
import os

import numpy as np
import pytest

from mlatlas.data.formats.example import (
    ExampleError,
    FixedLenFeature,
    FixedLenSequenceFeature,
    VarLenFeature,
    decode_example,
    decode_sequence_example,
    encode_example,
    encode_sequence_example,
    parse_example,
    parse_sequence_example,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the refused inputs log one line each
tf = pytest.importorskip("tensorflow")
from google.protobuf.message import DecodeError  # noqa: E402  (protobuf comes with tensorflow)

tr = tf.train
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TF_DTYPE = {"bytes": tf.string, "float32": tf.float32, "int64": tf.int64}
KEY_CHARS = list("abcxyz_09") + ["é", "中", "😀", "B", "Z"]


def random_floats(rng, n: int) -> np.ndarray:
    """float32 values from random bit patterns, specials mixed in, signalling NaNs quieted."""
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    specials = np.array([0x7FC00000, 0xFFC00001, 0x7F800000, 0xFF800000, 0x80000000, 1,
                         0x7F7FFFFF], np.uint32)
    bits[: min(n, 7)] = rng.permutation(specials)[: min(n, 7)]
    signalling = (bits & 0x7F800000 == 0x7F800000) & (bits & 0x7FFFFF != 0) & (
        bits & 0x400000 == 0)
    bits[signalling] |= 0x400000
    return rng.permutation(bits).view(np.float32)


def random_ints(rng, n: int) -> np.ndarray:
    values = rng.integers(INT64_MIN, INT64_MAX, n, dtype=np.int64, endpoint=True)
    small = rng.integers(-300, 300, n)
    values = np.where(rng.random(n) < 0.5, small, values)
    values[: min(n, 4)] = [INT64_MIN, INT64_MAX, -1, 0][: min(n, 4)]
    return rng.permutation(values)


def random_values(rng, dtype: str, n: int) -> np.ndarray:
    if dtype == "float32":
        return random_floats(rng, n)
    if dtype == "int64":
        return random_ints(rng, n)
    out = np.empty(n, dtype=object)
    out[:] = [rng.bytes(int(rng.integers(0, 12))) for _ in range(n)]
    return out


def random_key(rng) -> str:
    return "".join(rng.choice(KEY_CHARS, int(rng.integers(0, 6))))


def random_features(rng, n_keys: int) -> dict[str, tuple[str, np.ndarray]]:
    features = {}
    while len(features) < n_keys:
        dtype = ["bytes", "float32", "int64"][rng.integers(3)]
        features[random_key(rng)] = (dtype, random_values(rng, dtype, int(rng.integers(0, 9))))
    return features


def tf_feature(dtype: str, values: np.ndarray):
    if dtype == "bytes":
        return tr.Feature(bytes_list=tr.BytesList(value=list(values)))
    if dtype == "float32":
        return tr.Feature(float_list=tr.FloatList(value=values.tolist()))
    return tr.Feature(int64_list=tr.Int64List(value=values.tolist()))


def tf_features(features) -> "tr.Features":
    return tr.Features(feature={k: tf_feature(*v) for k, v in features.items()})


def ours(features) -> dict:
    """Our encoder's input: the arrays, an empty bytes list as an "S" array to say its type."""
    return {k: values if len(values) or dtype != "bytes" else np.empty(0, "S1")
            for k, (dtype, values) in features.items()}


def upb_order(keys) -> list[str]:
    """Keys in the order upb's deterministic serialisation writes them: ascending bytes, except
    that a key comes after the longer keys it is a prefix of."""
    def compare(a: bytes, b: bytes) -> int:
        n = min(len(a), len(b))
        if a[:n] != b[:n]:
            return -1 if a[:n] < b[:n] else 1
        return len(b) - len(a)
    return [k.decode() for k in sorted((k.encode() for k in keys),
                                       key=functools.cmp_to_key(compare))]


def spec_varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def in_upb_order(features) -> bytes:
    """Our Example's bytes with the map entries in upb's deterministic order: each entry as our
    encoder writes it for a one-feature Example (its header of tag and length cut off)."""
    def entry_of(key):
        one = encode_example(ours({key: features[key]}))
        end = 1
        while one[end] & 0x80:  # the length varint's last byte has its high bit clear
            end += 1
        return one[end + 1:]
    entries = b"".join(entry_of(k) for k in upb_order(features))
    return b"\x0a" + spec_varint(len(entries)) + entries


def prefix_free(keys) -> bool:
    return not any(a != b and b.startswith(a) for a in keys for b in keys)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    if want.dtype == np.float32:
        assert got.dtype == np.float32
        assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()
    else:
        assert got.tolist() == want.tolist()


def proto_values(feature) -> tuple[str | None, list]:
    kind = feature.WhichOneof("kind")
    return kind, [] if kind is None else list(getattr(feature, kind).value)


def assert_decoded_equals_proto(decoded: dict[str, list], features) -> None:
    assert set(decoded) == set(features.feature)
    for key, feature in features.feature.items():
        kind, values = proto_values(feature)
        if kind == "float_list":
            assert_same(np.array(decoded[key], np.float32), np.array(values, np.float32))
        else:
            assert decoded[key] == values


@pytest.mark.parametrize("seed", range(20))
def test_example_bytes_equal_protobufs(seed):
    rng = np.random.default_rng(seed)
    features = random_features(rng, int(rng.integers(0, 7)))
    proto = tr.Example(features=tf_features(features))
    data = encode_example(ours(features))
    deterministic = proto.SerializeToString(deterministic=True)
    # upb sorts as we do but for keys that are prefixes of others; put in its order, our
    # entries are its bytes.
    assert in_upb_order(features) == deterministic
    if prefix_free(features):
        assert data == deterministic
    # protobuf's default (hash table) order and ours decode to the same message.
    assert tr.Example.FromString(data) == proto
    assert_decoded_equals_proto(decode_example(proto.SerializeToString()), proto.features)
    assert_decoded_equals_proto(decode_example(data), proto.features)


@pytest.mark.parametrize("seed", range(10))
def test_sequence_example_bytes_equal_protobufs(seed):
    rng = np.random.default_rng(100 + seed)
    context = random_features(rng, int(rng.integers(0, 4)))
    lists = {}
    for _ in range(int(rng.integers(0, 4))):
        dtype = ["bytes", "float32", "int64"][rng.integers(3)]
        lists[random_key(rng)] = (dtype, [random_values(rng, dtype, int(rng.integers(0, 4)))
                                          for _ in range(int(rng.integers(0, 4)))])
    proto = tr.SequenceExample(context=tf_features(context), feature_lists=tr.FeatureLists(
        feature_list={k: tr.FeatureList(feature=[tf_feature(dtype, step) for step in steps])
                      for k, (dtype, steps) in lists.items()}))
    data = encode_sequence_example(ours(context), {
        k: [step if len(step) or dtype != "bytes" else np.empty(0, "S1") for step in steps]
        for k, (dtype, steps) in lists.items()})
    assert tr.SequenceExample.FromString(data) == proto
    if prefix_free(context) and prefix_free(lists):
        assert data == proto.SerializeToString(deterministic=True)
    got_context, got_lists = decode_sequence_example(proto.SerializeToString())
    assert_decoded_equals_proto(got_context, proto.context)
    assert set(got_lists) == set(proto.feature_lists.feature_list)
    for key, feature_list in proto.feature_lists.feature_list.items():
        assert len(got_lists[key]) == len(feature_list.feature)
        for got, feature in zip(got_lists[key], feature_list.feature, strict=True):
            kind, values = proto_values(feature)
            if kind == "float_list":
                assert_same(np.array(got, np.float32), np.array(values, np.float32))
            else:
                assert got == values


def test_floats_outside_float32_and_empty_messages():
    # Doubles beyond float32's range round to infinities and tiny ones to zero, in both.
    big = [1e40, -1e40, 1e-50, 3.4028235677973366e38]
    proto = tr.Example(features=tr.Features(feature={"f": tr.Feature(
        float_list=tr.FloatList(value=big))}))
    assert encode_example({"f": big}) == proto.SerializeToString(deterministic=True)
    assert encode_example({}) == tr.Example(features=tr.Features()).SerializeToString()
    assert encode_example({"": []}) == tr.Example(features=tr.Features(
        feature={"": tr.Feature()})).SerializeToString()
    assert encode_sequence_example({}, {}) == tr.SequenceExample(
        context=tr.Features(), feature_lists=tr.FeatureLists()).SerializeToString()


def tf_spec(spec):
    dtype = TF_DTYPE[spec.dtype]
    if isinstance(spec, VarLenFeature):
        return tf.io.VarLenFeature(dtype)
    if isinstance(spec, FixedLenFeature):
        default = None if spec.default_value is None else spec._default.tolist()
        return tf.io.FixedLenFeature(list(spec.shape), dtype, default_value=default)
    return tf.io.FixedLenSequenceFeature(list(spec.shape), dtype,
                                         allow_missing=spec.allow_missing)


def tf_values(value) -> np.ndarray:
    """A TensorFlow output as a numpy array: a sparse one's values, its indices checked."""
    if isinstance(value, tf.SparseTensor):
        n = int(value.values.shape[0])
        assert value.indices.numpy().tolist() == [[i] for i in range(n)]
        assert value.dense_shape.numpy().tolist() == [n]
        return value.values.numpy()
    return value.numpy()


def random_description(rng, features) -> dict:
    """A spec for every key that TensorFlow reads, of each kind that fits, plus absent keys."""
    description = {}
    for key, (dtype, values) in features.items():
        n = len(values)
        choice = rng.integers(3)
        if choice == 0 or n == 0:
            description[key] = VarLenFeature(dtype)
        elif choice == 1:
            description[key] = FixedLenFeature((2, n // 2) if n % 2 == 0 else (n,), dtype)
        else:
            description[key] = FixedLenSequenceFeature((1,), dtype, allow_missing=True)
    for i, dtype in enumerate(["bytes", "float32", "int64"]):
        default = random_values(rng, dtype, 2)
        description[f"absent{i}"] = FixedLenFeature((2,), dtype, default_value=list(default))
        description[f"absent_var{i}"] = VarLenFeature(dtype)
        description[f"absent_seq{i}"] = FixedLenSequenceFeature((3,), dtype, allow_missing=True)
    return description


@pytest.mark.parametrize("seed", range(20))
def test_parse_example_equals_tensorflows(seed):
    rng = np.random.default_rng(200 + seed)
    features = random_features(rng, int(rng.integers(1, 6)))
    features = {k: v for k, v in features.items() if not k.startswith("absent")}
    description = random_description(rng, features)
    data = encode_example(ours(features))
    theirs = tf.io.parse_single_example(data, {k: tf_spec(s) for k, s in description.items()})
    got = parse_example(data, description)
    assert set(got) == set(theirs)
    for key in description:
        assert_same(got[key], tf_values(theirs[key]))


@pytest.mark.parametrize("seed", range(10))
def test_parse_sequence_example_equals_tensorflows(seed):
    rng = np.random.default_rng(300 + seed)
    context = random_features(rng, int(rng.integers(0, 4)))
    context_description = {k: v for k, v in random_description(rng, context).items()
                           if not isinstance(v, FixedLenSequenceFeature)}
    lists, sequence_description = {}, {}
    for i in range(int(rng.integers(1, 4))):
        dtype = ["bytes", "float32", "int64"][rng.integers(3)]
        steps, fixed = int(rng.integers(0, 4)), rng.random() < 0.5
        sizes = [2] * steps if fixed else list(rng.integers(0, 4, steps))
        lists[f"list{i}"] = [random_values(rng, dtype, int(n)) for n in sizes]
        sequence_description[f"list{i}"] = (FixedLenSequenceFeature((2,), dtype) if fixed
                                            else VarLenFeature(dtype))
    sequence_description["missing"] = FixedLenSequenceFeature((2,), "int64", allow_missing=True)
    sequence_description["missing_var"] = VarLenFeature("float32")
    data = encode_sequence_example(ours(context), lists)
    their_context, their_lists = tf.io.parse_single_sequence_example(
        data, {k: tf_spec(s) for k, s in context_description.items()},
        {k: tf_spec(s) for k, s in sequence_description.items()})
    got_context, got_lists = parse_sequence_example(data, context_description,
                                                    sequence_description)
    for key in context_description:
        assert_same(got_context[key], tf_values(their_context[key]))
    for key, spec in sequence_description.items():
        theirs = their_lists[key]
        if isinstance(spec, FixedLenSequenceFeature):
            assert_same(got_lists[key], theirs.numpy())
            continue
        # TensorFlow's sparse (step, j) layout, row by row, against one array per step.
        steps = len(got_lists[key])
        assert theirs.dense_shape.numpy().tolist() == [
            steps, max((len(v) for v in got_lists[key]), default=0)]
        rows = theirs.indices.numpy()[:, 0]
        values = theirs.values.numpy()
        for t in range(steps):
            assert_same(got_lists[key][t], values[rows == t])


def feature_of(kind: str, values) -> "tr.Feature":
    return tr.Feature(**{kind: getattr(tr, {"bytes_list": "BytesList", "float_list": "FloatList",
                                             "int64_list": "Int64List"}[kind])(value=values)})


@pytest.mark.parametrize("feature,spec", [
    (feature_of("float_list", [1.0, 2.0, 3.0]), FixedLenFeature((2,), "float32")),
    (feature_of("float_list", [1.0, 2.0, 3.0]), FixedLenFeature((3,), "int64")),
    (feature_of("int64_list", [1]), VarLenFeature("bytes")),
    (feature_of("float_list", []), FixedLenFeature((), "float32", default_value=7.0)),
    (feature_of("float_list", [1.0, 2.0, 3.0]), FixedLenSequenceFeature((2,), "float32", True)),
    (None, FixedLenFeature((1,), "int64")),
])
def test_where_tensorflow_refuses_we_refuse(feature, spec):
    data = tr.Example(features=tr.Features(
        feature={} if feature is None else {"x": feature})).SerializeToString()
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.parse_single_example(data, {"x": tf_spec(spec)})
    with pytest.raises(ExampleError, match="'x'"):
        parse_example(data, {"x": spec})


def test_feature_with_no_kind_is_absent_as_in_tensorflow():
    data = tr.Example(features=tr.Features(feature={"x": tr.Feature()})).SerializeToString()
    spec = {"x": FixedLenFeature((), "float32", default_value=7.0)}
    assert_same(parse_example(data, spec)["x"],
                tf.io.parse_single_example(data, {"x": tf_spec(spec["x"])})["x"].numpy())
    assert parse_example(data, spec)["x"] == np.float32(7.0)


def test_truncations_refused_by_protobuf_and_us():
    rng = np.random.default_rng(7)
    features = random_features(rng, 4)
    data = tr.Example(features=tf_features(features)).SerializeToString(deterministic=True)
    description = {k: tf.io.VarLenFeature(TF_DTYPE[dtype]) for k, (dtype, _) in features.items()}
    tf_accepted = []
    for n in range(1, len(data)):
        with pytest.raises(DecodeError):
            tr.Example.FromString(data[:n])
        with pytest.raises(ExampleError):
            decode_example(data[:n])
        try:
            tf.io.parse_single_example(data[:n], description)
            tf_accepted.append(n)
        except (tf.errors.InvalidArgumentError, UnicodeDecodeError):
            pass  # its message quotes the bytes, and some fail to decode as UTF-8
    # TensorFlow's parser reads the entries that fit and does not check the Features length.
    print(f"{len(data) - 1} truncations of a {len(data)}-byte Example: protobuf and we refuse "
          f"all, tf.io.parse_single_example accepts {len(tf_accepted)} (lengths {tf_accepted})")


def test_bit_flips_agree_with_protobuf():
    rng = np.random.default_rng(8)
    features = {"img": ("float32", random_floats(rng, 3)), "label": ("int64", random_ints(rng, 2)),
                "name": ("bytes", random_values(rng, "bytes", 2))}
    data = encode_example(ours(features))
    both_accept = both_refuse = only_we_refuse = 0
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            flipped = bytes(flipped)
            try:
                proto = tr.Example.FromString(flipped)
            except DecodeError:
                proto = None
            try:
                decoded = decode_example(flipped)
            except ExampleError as error:
                if proto is None:
                    both_refuse += 1
                else:  # protobuf keeps a known field of another wire type as an unknown field
                    assert "wire type" in str(error), (i, bit, str(error))
                    only_we_refuse += 1
                continue
            assert proto is not None, (i, bit)  # we never accept what protobuf refuses
            assert_decoded_equals_proto(decoded, proto.features)
            both_accept += 1
    print(f"{len(data) * 8} flips: {both_accept} both accept (same values), {both_refuse} both "
          f"refuse, {only_we_refuse} only we refuse (a known field of another wire type)")
    assert both_accept + both_refuse + only_we_refuse == len(data) * 8 and both_refuse > 0
