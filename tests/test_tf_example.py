"""tf.train.Example / SequenceExample: bytes worked by hand from the protobuf encoding spec
(https://protobuf.dev/programming-guides/encoding/), round trips under hypothesis, parsing by
TensorFlow's rules, and corrupt input (truncations, bit flips, garbage) that only ever raises
ExampleError. TensorFlow's own bytes and parser are compared in test_parity_tensorflow_example.py.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlatlas.data.formats.example import (
    ExampleError,
    FixedLenFeature,
    FixedLenSequenceFeature,
    VarLenFeature,
    decode_example,
    decode_sequence_example,
    encode_example,
    encode_sequence_example,
    pack_varints,
    parse_example,
    parse_sequence_example,
    unpack_varints,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def spec_varint(n: int) -> bytes:
    """The spec's varint, one 7-bit group at a time, of an int64 taken modulo 2^64."""
    n %= 2**64
    out = []
    while True:
        group, n = n & 0x7F, n >> 7
        out.append(group | (0x80 if n else 0))
        if not n:
            return bytes(out)


def length_delimited(tag: int, payload: bytes) -> bytes:
    assert len(payload) < 128  # one-byte lengths keep the hand-built messages readable
    return bytes([tag, len(payload)]) + payload


def example_of(entries: bytes) -> bytes:
    """Example{features = 1: Features{entries}} around already encoded map entries."""
    return length_delimited(0x0A, entries)


def entry(key: bytes, *feature_payloads: bytes) -> bytes:
    """One map entry field {key = 1; value = 2 (repeated here when given several payloads)}."""
    body = length_delimited(0x0A, key) + b"".join(length_delimited(0x12, f)
                                                 for f in feature_payloads)
    return length_delimited(0x0A, body)


def int64_feature(*values: int) -> bytes:
    """Feature{int64_list = 3: Int64List{value = 1, packed}}."""
    return length_delimited(0x1A, length_delimited(0x0A, b"".join(map(spec_varint, values))))


# ------------------------------------------------------------------------ hand-worked bytes


def test_int64_example_by_hand():
    # Int64List{1}: tag 1 << 3 | 2 = 0x0a, length 1, varint 1          -> 0a 01 01
    # Feature{int64_list}: tag 3 << 3 | 2 = 0x1a, length 3             -> 1a 03 0a 01 01
    # entry: key "a" (0a 01 61), value (tag 2 << 3 | 2 = 0x12, len 5)  -> 0a 01 61 12 05 ...
    # Features: entry field 1 of 10 bytes -> 0a 0a ...; Example: field 1 of 12 bytes -> 0a 0c ...
    want = bytes.fromhex("0a0c" "0a0a" "0a0161" "1205" "1a03" "0a01" "01")
    assert encode_example({"a": 1}) == want
    assert encode_example({"a": [1]}) == want
    assert encode_example({"a": np.array([1], np.int32)}) == want
    assert decode_example(want) == {"a": [1]}


def test_float_bytes_and_negative_by_hand():
    # 1.5 = 1.1b x 2^0: sign 0, exponent 127 = 0x7f, fraction 0x400000 -> 0x3fc00000, written
    # little-endian: 00 00 c0 3f. FloatList 0a 04 + 4 bytes; Feature{float_list = 2}: 12 06 ...
    float_feature = bytes.fromhex("1206" "0a04" "0000c03f")
    # -1 is 2^64 - 1 as a uint64: 64 one bits = nine groups of seven (ff with the continuation
    # bit) and a last group holding one bit (01): 10 bytes.
    minus_one = bytes.fromhex("ff" * 9 + "01")
    int_feature = bytes.fromhex("1a0c" "0a0a") + minus_one
    entries = entry(b"f", float_feature) + entry(b"i", int_feature)
    assert encode_example({"i": -1, "f": 1.5}) == example_of(entries)
    assert decode_example(example_of(entries)) == {"f": [1.5], "i": [-1]}


def test_varints_of_the_spec():
    # The spec's own example: 300 = 0b10_0101100 -> groups 0101100 (0x2c | 0x80) and 10 (0x02).
    assert pack_varints(np.array([300])) == bytes.fromhex("ac02")
    assert pack_varints(np.array([0, 127, 128])) == bytes.fromhex("00" "7f" "8001")
    # INT64_MIN = 2^63: 63 zero bits in nine groups (80 each) and a final group of 1.
    assert pack_varints(np.array([INT64_MIN])) == bytes.fromhex("80" * 9 + "01")
    assert pack_varints(np.array([INT64_MAX])) == bytes.fromhex("ff" * 8 + "7f")
    data = bytes.fromhex("ac02" + "00" + "ff" * 9 + "01")
    assert unpack_varints(data, 0, len(data)).tolist() == [300, 0, -1]
    # A non-minimal varint (protobuf parsers accept it): 81 80 00 is 1.
    assert unpack_varints(b"\x81\x80\x00", 0, 3).tolist() == [1]
    long = data * 3  # over SHORT bytes: the numpy pass
    assert unpack_varints(long, 0, len(long)).tolist() == [300, 0, -1] * 3


@pytest.mark.parametrize("tail,message", [
    (b"\x80", "truncated varint at byte 20"),
    (b"\x80" * 10 + b"\x01", "longer than 10 bytes at byte 20")])
@pytest.mark.parametrize("head", [b"", b"\x01" * 20])  # the Python loop and the numpy pass
def test_bad_varints(head, tail, message):
    data = b"\x05" * 20 + head + tail
    with pytest.raises(ExampleError, match=message.replace("20", str(20 + len(head)))):
        unpack_varints(data, 20, len(data))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(INT64_MIN, INT64_MAX), max_size=40))
def test_varints_equal_the_spec_loop(values):
    packed = b"".join(spec_varint(v) for v in values)
    assert pack_varints(np.array(values, np.int64)) == packed
    assert unpack_varints(packed, 0, len(packed)).tolist() == values


def test_bytes_list_and_sequence_example_by_hand():
    # BytesList{"hi", ""}: each value its own field 1: 0a 02 68 69, 0a 00.
    bytes_feature = length_delimited(0x0A, bytes.fromhex("0a026869" "0a00"))
    assert encode_example({"s": ["hi", b""]}) == example_of(entry(b"s", bytes_feature))
    # SequenceExample{context = 1: Features{}, feature_lists = 2: FeatureLists{"t": FeatureList{
    # feature = 1: [Feature{int64_list{7}}]}}}: context 0a 00, then 12 + length + the map entry.
    feature_list = length_delimited(0x0A, int64_feature(7))
    want = bytes.fromhex("0a00") + length_delimited(0x12, entry(b"t", feature_list))
    assert want == bytes.fromhex("0a00" "120e" "0a0c" "0a0174" "1207" "0a05" "1a03" "0a01" "07")
    assert encode_sequence_example({}, {"t": [7]}) == want
    assert encode_sequence_example({}, {"t": np.array([[7]])}) == want
    assert decode_sequence_example(want) == ({}, {"t": [[7]]})


def test_empty_lists():
    # An empty packed list is left out: Int64List{} has no bytes, Feature{int64_list{}} is 1a 00.
    assert encode_example({"a": np.array([], np.int64)}) == example_of(entry(b"a", b"\x1a\x00"))
    assert encode_example({"a": np.array([], np.float32)}) == example_of(entry(b"a", b"\x12\x00"))
    assert encode_example({"a": np.array([], "S1")}) == example_of(entry(b"a", b"\x0a\x00"))
    # An empty Python list says no type: a Feature with no kind set, an empty message.
    assert encode_example({"a": []}) == example_of(entry(b"a", b""))
    assert encode_example({}) == bytes.fromhex("0a00")
    assert decode_example(b"") == decode_example(bytes.fromhex("0a00")) == {}
    assert encode_sequence_example({}, {}) == bytes.fromhex("0a00" "1200")


def test_keys_sorted_by_utf8_bytes_and_decoded_in_any_order():
    features = {"b": 2, "é": 4, "a": 1, "B": 0}  # é is c3 a9, above every ASCII byte
    data = encode_example(features)
    order = [data.index(length_delimited(0x0A, k.encode())) for k in ("B", "a", "b", "é")]
    assert order == sorted(order)
    parts = [entry(k.encode(), int64_feature(v)) for k, v in features.items()]
    for permutation in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        shuffled = example_of(b"".join(parts[i] for i in permutation))
        assert decode_example(shuffled) == {k: [v] for k, v in features.items()}


def test_protobuf_parsing_rules():
    # Unpacked values (one field each), packed and unpacked mixed: all concatenate.
    unpacked = length_delimited(0x1A, bytes.fromhex("0805" "087f") + length_delimited(
        0x0A, b"\x01\x02"))
    floats = length_delimited(0x12, b"\x0d" + np.float32(2.5).tobytes()
                              + length_delimited(0x0A, np.float32(-1).tobytes()))
    assert decode_example(example_of(entry(b"i", unpacked) + entry(b"f", floats))) == {
        "i": [5, 127, 1, 2], "f": [2.5, -1.0]}
    # A key seen twice keeps its last entry; a value field seen twice is merged.
    twice = entry(b"x", int64_feature(1)) + entry(b"x", int64_feature(2, 3))
    assert decode_example(example_of(twice)) == {"x": [2, 3]}
    assert decode_example(example_of(entry(b"x", int64_feature(1), int64_feature(2)))) == {
        "x": [1, 2]}
    # Two Features fields in one Example merge their maps.
    assert decode_example(example_of(entry(b"x", int64_feature(1)))
                          + example_of(entry(b"y", int64_feature(2)))) == {"x": [1], "y": [2]}
    # Of the oneof, the last kind wins: bytes_list then int64_list is an int64_list.
    both = length_delimited(0x0A, length_delimited(0x0A, b"z")) + int64_feature(9)
    assert decode_example(example_of(entry(b"x", both))) == {"x": [9]}
    # Unknown fields of every wire type are skipped: a varint (field 15) in the Example, 8
    # bytes (field 4) in the Feature, 4 bytes (field 2) in the Int64List.
    feature = b"\x21" + bytes(8) + length_delimited(0x1A, b"\x15" + bytes(4) + b"\x08\x06")
    entry_body = length_delimited(0x0A, b"k") + length_delimited(0x12, feature)
    assert decode_example(b"\x78\x01" + example_of(length_delimited(0x0A, entry_body))) == {
        "k": [6]}
    # A map entry holding another field (9 here) is no entry: protobuf keeps the entry as an
    # unknown field of Features. Its value is still checked.
    odd = length_delimited(0x4A, b"?") + entry_body
    assert decode_example(example_of(length_delimited(0x0A, odd) + entry(b"j", b""))) == {"j": []}
    with pytest.raises(ExampleError, match="truncated varint"):
        decode_example(example_of(length_delimited(0x0A, odd[:-1] + b"\x80")))
    # A map entry without its key is the key "", without its value an empty Feature.
    assert decode_example(example_of(length_delimited(0x0A, b""))) == {"": []}


@pytest.mark.parametrize("data,message", [
    (b"\x0a", "truncated varint at byte 1"),
    (b"\x0a\x05\x0a\x00", "runs to byte 7, past the end of its message at byte 4"),
    (b"\x0d\x00\x00\x00\x00", "Example field 1 at byte 1 has wire type 5, expected 2"),
    (b"\x0b", "wire type 3"),
    (b"\x0f", "wire type 7"),
    (b"\x02\x00", "invalid field number 0"),
    (b"\x0a" + b"\xff" * 10 + b"\x01", "varint longer than 10 bytes at byte 1"),
    (example_of(entry(b"\xff", b"")), "key at byte 6 is not UTF-8"),
    (example_of(entry(b"x", length_delimited(0x12, length_delimited(0x0A, b"abc")))),
     "packed FloatList.value at byte 13 has 3 bytes, not a multiple of 4"),
    (example_of(entry(b"x", length_delimited(0x1A, length_delimited(0x0A, b"\x80")))),
     "truncated varint at byte 13"),
    (example_of(entry(b"x", length_delimited(0x1A, length_delimited(
        0x0A, b"\x01" + b"\x80" * 10 + b"\x01")))), "varint longer than 10 bytes at byte 14"),
])
def test_corrupt_bytes_raise_one_error(data, message):
    with pytest.raises(ExampleError, match="corrupt tf.train.Example") as error:
        decode_example(data)
    assert message in str(error.value)


# ------------------------------------------------------------------------ encoding inputs


@pytest.mark.parametrize("features,message", [
    ({"x": [1, 2.5]}, "'x' mixes float32 and int64 values"),
    ({"x": ["a", 1]}, "'x' mixes bytes and int64 values"),
    ({"x": [[1, 2]]}, "'x' has a value of type list"),
    ({"x": None}, "'x' has a value of type NoneType"),
    ({"x": 2**63}, "outside int64's range"),
    ({"x": np.array([2**63], np.uint64)}, "above int64's maximum"),
    ({"x": np.array([1j])}, "dtype complex128"),
    ({"x": torch.zeros(2, dtype=torch.float8_e4m3fn)}, "tensor of dtype torch.float8_e4m3fn"),
    ({1: [1]}, "feature key 1 is a int"),
    ({"\ud800": [1]}, "lone surrogate"),
])
def test_unsupported_values_raise(features, message):
    with pytest.raises(ExampleError, match=message):
        encode_example(features)


any_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.complex_numbers(),
                      st.text(st.characters(codec=None, categories=None), max_size=4),
                      st.binary(max_size=4))
any_value = st.recursive(any_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner), st.dictionaries(st.text(max_size=2), inner,
                                                                   max_size=2)), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.text(st.characters(codec=None, categories=None),
                                         max_size=3), st.integers(), st.binary(max_size=2)),
                       any_value, max_size=4), st.sampled_from(["example", "sequence"]))
def test_any_input_encodes_or_raises_example_error(features, kind):
    # Whatever Python values come in, encoding either works (and decodes back) or is one
    # ExampleError: never a TypeError or OverflowError from inside.
    try:
        if kind == "example":
            decode_example(encode_example(features))
        else:
            decode_sequence_example(encode_sequence_example(features, features))
    except ExampleError:
        pass


def test_value_types():
    # numpy dtypes pick the list; any shape flattens in C order; bools are 0 and 1.
    got = decode_example(encode_example({
        "u8": np.array([[1, 2], [3, 255]], np.uint8), "f64": np.array([0.1]),
        "b": [True, False], "t": torch.tensor([1.0, 2.0]), "U": np.array(["é", "z"]),
        "bf16": torch.tensor([0.5], dtype=torch.bfloat16),
        "o": np.array([b"a", "b"], dtype=object), "np": np.float32(3.0), "big": [1e40]}))
    assert got == {"u8": [1, 2, 3, 255], "f64": [float(np.float32(0.1))], "b": [1, 0],
                   "t": [1.0, 2.0], "U": ["é".encode(), b"z"], "bf16": [0.5], "o": [b"a", b"b"],
                   "np": [3.0], "big": [float("inf")]}
    with pytest.raises(ExampleError, match="feature list 's' is a str"):
        encode_sequence_example({}, {"s": "abc"})
    with pytest.raises(ExampleError, match="feature_lists must be a dict"):
        encode_sequence_example({}, [1])


# ------------------------------------------------------------------------ round trips

keys = st.text(max_size=8)
int_lists = st.lists(st.integers(INT64_MIN, INT64_MAX), max_size=12)
# float32 values from their bit patterns: every NaN payload, infinities, -0.0, subnormals.
float_bits = st.lists(st.integers(0, 2**32 - 1), max_size=12).map(
    lambda bits: np.array(bits, np.uint32).view(np.float32))
bytes_lists = st.lists(st.binary(max_size=10), max_size=6)
values = st.one_of(int_lists.map(lambda v: np.array(v, np.int64)), float_bits,
                   bytes_lists.map(lambda v: np.array(v, dtype=object)))
feature_dicts = st.dictionaries(keys, values, max_size=6)


def spec_of(array: np.ndarray) -> VarLenFeature:
    return VarLenFeature({"f": "float32", "i": "int64", "O": "bytes"}[array.dtype.kind])


def assert_same_values(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == (want.dtype if want.dtype != object else object)
    if want.dtype == np.float32:  # bit for bit: NaN payloads and -0.0 included
        assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()
    else:
        assert got.tolist() == want.tolist()


@settings(max_examples=150, deadline=None)
@given(feature_dicts)
def test_example_round_trip(features):
    data = encode_example(features)
    parsed = parse_example(data, {k: spec_of(v) for k, v in features.items()})
    for key, array in features.items():
        assert_same_values(parsed[key], array)
    decoded = decode_example(data)
    assert set(decoded) == set(features)
    for key, array in features.items():
        if array.dtype == np.float32:  # Python floats hold float32 values; NaNs stay NaN
            got = np.array(decoded[key], np.float32)
            assert np.array_equal(np.isnan(got), np.isnan(array))
            assert np.array_equal(got[~np.isnan(got)].view(np.uint32),
                                  array[~np.isnan(array)].view(np.uint32))
        else:
            assert decoded[key] == array.tolist()
    # The Python lists encode to the same bytes, where they still say their type (not empty)
    # and no signalling NaN was quieted on the way.
    if all(v.size and not (v.dtype == np.float32 and np.isnan(v).any())
           for v in features.values()):
        assert encode_example(decoded) == data


python_values = st.one_of(
    st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=1, max_size=8),
    st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=8),
    st.lists(st.one_of(st.text(max_size=6), st.binary(max_size=6)), min_size=1, max_size=8),
    st.integers(INT64_MIN, INT64_MAX), st.floats(width=32, allow_nan=False), st.text(max_size=6))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(keys, python_values, max_size=6))
def test_python_values_round_trip(features):
    # Python lists and scalars: ints stay ints, float32-representable floats stay equal, str
    # comes back as its UTF-8 bytes; the lists encode again to the same bytes.
    data = encode_example(features)
    want = {}
    for key, value in features.items():
        items = value if isinstance(value, list) else [value]
        want[key] = [v.encode() if isinstance(v, str) else v for v in items]
    decoded = decode_example(data)
    assert decoded == want
    assert encode_example(decoded) == data


steps_of_one_type = st.one_of(
    st.lists(int_lists.map(lambda v: np.array(v, np.int64)), max_size=4),
    st.lists(float_bits, max_size=4),
    st.lists(bytes_lists.map(lambda v: np.array(v, dtype=object)), max_size=4))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(keys, values, max_size=3),
       st.dictionaries(keys, steps_of_one_type, max_size=4))
def test_sequence_example_round_trip(context, feature_lists):
    data = encode_sequence_example(context, feature_lists)
    got_context, got_lists = parse_sequence_example(
        data, {k: spec_of(v) for k, v in context.items()},
        {k: spec_of(steps[0]) for k, steps in feature_lists.items() if steps})
    for key, array in context.items():
        assert_same_values(got_context[key], array)
    for key, steps in got_lists.items():
        assert len(steps) == len(feature_lists[key])
        for got, want in zip(steps, feature_lists[key], strict=True):
            assert_same_values(got, want)
    decoded_context, decoded_lists = decode_sequence_example(data)
    assert set(decoded_context) == set(context) and set(decoded_lists) == set(feature_lists)
    assert [len(v) for v in decoded_lists.values()] == [len(feature_lists[k])
                                                        for k in decoded_lists]


# ------------------------------------------------------------------------ parsing


def test_parse_fixed_var_and_defaults():
    data = encode_example({"img": np.arange(6, dtype=np.float32), "label": 3, "name": "cat",
                           "none": []})
    got = parse_example(data, {
        "img": FixedLenFeature((2, 3), "float32"), "label": FixedLenFeature((), "int64"),
        "name": VarLenFeature("bytes"), "weight": FixedLenFeature((2,), "float32", [1, 2]),
        "tags": VarLenFeature("int64"), "none": FixedLenFeature((), "bytes", default_value="d"),
        "pieces": FixedLenSequenceFeature((3,), "float32", allow_missing=True)})
    assert got["img"].shape == (2, 3) and got["img"].dtype == np.float32
    assert got["img"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert got["label"].shape == () and got["label"] == 3 and got["label"].dtype == np.int64
    assert got["name"].dtype == object and got["name"].tolist() == [b"cat"]
    assert got["weight"].tolist() == [1.0, 2.0] and got["weight"].dtype == np.float32
    assert got["tags"].shape == (0,) and got["tags"].dtype == np.int64
    # A Feature with no kind set counts as absent (tf.io.parse_single_example does the same).
    assert got["none"].tolist() == b"d"
    assert got["pieces"].shape == (0, 3)
    split = parse_example(data, {"img": FixedLenSequenceFeature((3,), "float32", True)})["img"]
    assert split.tolist() == [[0, 1, 2], [3, 4, 5]]
    tensors = parse_example(data, {"img": FixedLenFeature((6,), "float32"),
                                   "label": VarLenFeature("int64")}, output="torch")
    assert tensors["img"].dtype == torch.float32 and tensors["label"].tolist() == [3]


def test_defaults_are_not_shared():
    spec = {"x": FixedLenFeature((2,), "int64", default_value=[4, 5])}
    first = parse_example(encode_example({}), spec)["x"]
    first[0] = 99
    assert parse_example(encode_example({}), spec)["x"].tolist() == [4, 5]


@pytest.mark.parametrize("spec,message", [
    (FixedLenFeature((2,), "float32"), "feature 'x' has 3 float32 values, its FixedLenFeature "
     r"of shape \(2,\) needs 2"),
    (FixedLenFeature((3,), "int64"), "feature 'x' holds a float_list, the description asks for "
     "int64"),
    (VarLenFeature("bytes"), "holds a float_list"),
    (FixedLenSequenceFeature((2,), "float32", True), "3 float32 values, not a whole number"),
    (FixedLenSequenceFeature((3,), "float32"), "needs allow_missing=True"),
])
def test_parse_errors_name_the_key(spec, message):
    with pytest.raises(ExampleError, match=message):
        parse_example(encode_example({"x": [1.0, 2.0, 3.0]}), {"x": spec})


def test_missing_required_and_bad_specs():
    with pytest.raises(ExampleError, match="feature 'y' is required"):
        parse_example(encode_example({"x": 1}), {"y": FixedLenFeature((), "int64")})
    # An empty list of a type is present, with zero values: not the default.
    with pytest.raises(ExampleError, match="has 0 float32 values"):
        parse_example(encode_example({"x": np.array([], np.float32)}),
                      {"x": FixedLenFeature((), "float32", default_value=7.0)})
    for make, message in [
            (lambda: FixedLenFeature((3,), "int64", default_value=5), "has 1 values"),
            (lambda: FixedLenFeature((), "int64", default_value=3.5), "holds float32 values"),
            (lambda: FixedLenFeature((2,), "bytes", default_value=[[b"a"], [b"b", b"c"]]),
             "ragged"),
            (lambda: FixedLenFeature((-1,), "int64"), "non-negative ints"),
            (lambda: VarLenFeature("string"), "not one of bytes, float32, int64"),
            (lambda: VarLenFeature(np.float32), "not one of bytes, float32, int64")]:
        with pytest.raises(ExampleError, match=message):
            make()
    assert FixedLenFeature((2, 1), "float32", [[1], [2]])._default.tolist() == [[1.0], [2.0]]
    with pytest.raises(ExampleError, match="output 'jax'"):
        parse_example(b"", {}, output="jax")
    with pytest.raises(ExampleError, match="entry 'x' is a str"):
        parse_example(b"", {"x": "int64"})
    with pytest.raises(ExampleError, match="is bytes, not a str"):
        parse_example("0a00", {})


def test_parse_sequence_example():
    data = encode_sequence_example(
        {"length": 2, "empty": []},
        {"frames": np.arange(4, dtype=np.float32).reshape(2, 2), "words": [["a"], ["b", "c"]],
         "ids": [[], [1]], "untyped": [[], []]})
    context, lists = parse_sequence_example(
        data, {"length": FixedLenFeature((), "int64"), "empty": VarLenFeature("float32")},
        {"frames": FixedLenSequenceFeature((2,), "float32"), "words": VarLenFeature("bytes"),
         "ids": VarLenFeature("int64"), "untyped": FixedLenSequenceFeature((0,), "int64"),
         "absent": FixedLenSequenceFeature((3,), "int64", allow_missing=True),
         "absent_var": VarLenFeature("int64")}, output="torch")
    assert context["length"].item() == 2 and context["empty"].shape == (0,)
    assert lists["frames"].tolist() == [[0, 1], [2, 3]] and lists["frames"].dtype == torch.float32
    assert [w.tolist() for w in lists["words"]] == [[b"a"], [b"b", b"c"]]
    assert [i.tolist() for i in lists["ids"]] == [[], [1]]
    assert lists["untyped"].shape == (2, 0) and lists["absent"].shape == (0, 3)
    assert lists["absent_var"] == []
    for sequence, message in [
            ({"frames": FixedLenSequenceFeature((3,), "float32")},
             "feature 'frames' has 2 float32 values at step 0"),
            ({"ids": FixedLenSequenceFeature((1,), "int64")}, "0 int64 values at step 0"),
            ({"words": FixedLenSequenceFeature((1,), "int64")}, "holds a bytes_list"),
            ({"absent": FixedLenSequenceFeature((1,), "int64")}, "'absent' is absent"),
            ({"frames": FixedLenFeature((2,), "float32")}, "not one of FixedLenSequenceFeature")]:
        with pytest.raises(ExampleError, match=message):
            parse_sequence_example(data, None, sequence)
    with pytest.raises(ExampleError, match="not one of FixedLenFeature, VarLenFeature"):
        parse_sequence_example(data, {"length": FixedLenSequenceFeature((), "int64", True)})


# ------------------------------------------------------------------------ corrupt input


def sample_messages() -> list[tuple[bytes, object]]:
    """Three messages, each with its decoder."""
    rng = np.random.default_rng(0)
    return [(encode_example({"a": 1}), decode_example),
            (encode_example({"img": rng.random(20, dtype=np.float32), "label": [7, -3, 300],
                             "name": ["cat", b"\x00\xff"], "e": []}), decode_example),
            (encode_sequence_example({"c": rng.integers(-2**40, 2**40, 5)},
                                     {"f": [[1.5], [2.5, 3.5]], "w": [["x"], []]}),
             decode_sequence_example)]


def raises(decode, data: bytes) -> bool:
    """Whether ``decode(data)`` raised ExampleError (any other exception fails the test)."""
    try:
        decode(data)
    except ExampleError:
        return True
    return False


def test_every_truncation_of_an_example_raises():
    # An Example is one top-level field, so any cut short of the whole but not empty breaks it.
    for data, _ in sample_messages()[:2]:
        for n in range(1, len(data)):
            with pytest.raises(ExampleError):
                decode_example(data[:n])


def test_structural_bit_flips_raise_and_no_flip_escapes():
    data, _ = sample_messages()[0]  # 0a 0c 0a 0a 0a 01 61 12 05 1a 03 0a 01 01
    tags, lengths = [0, 2, 4, 7, 9, 11], [1, 3, 5, 8, 10, 12]  # every message ends at byte 14
    raised = 0
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            detected = raises(decode_example, bytes(flipped))
            raised += detected
            # A length past the end of its message, or a tag's wire type turned into 3, 4, 6
            # or 7 (never valid), is structural damage that must raise.
            if i in lengths and flipped[i] > len(data) - (i + 1) or i in tags and bit < 3 and (
                    flipped[i] & 7) in (3, 4, 6, 7):
                assert detected, (i, bit)
    assert raised >= 60  # of 112 flips; others are other valid values or other unknown fields


def fuzz(per_message: int, seed: int) -> tuple[int, int]:
    """Damage each sample message ``per_message`` times (bit flips, truncation, garbage appended
    or prepended); return (cases, how many its decoder refused). Every reader meets every case,
    and any exception but ExampleError fails the test."""
    rng = np.random.default_rng(seed)
    description = {"img": VarLenFeature("float32"), "label": FixedLenFeature((3,), "int64")}
    cases = raised = 0
    for data, decode in sample_messages():
        for _ in range(per_message):
            damaged = bytearray(data)
            how = rng.integers(4)
            if how == 0:  # one to three bit flips
                for i in rng.integers(len(damaged), size=rng.integers(1, 4)):
                    damaged[i] ^= 1 << int(rng.integers(8))
            elif how == 1:
                del damaged[rng.integers(1, len(damaged)):]
            elif how == 2:
                damaged += rng.bytes(int(rng.integers(1, 6)))
            else:
                damaged[:0] = rng.bytes(int(rng.integers(1, 6)))
            cases += 1
            raised += raises(decode, bytes(damaged))
            for other in (decode_example, decode_sequence_example,
                          lambda d: parse_example(d, description)):
                raises(other, bytes(damaged))
    return cases, raised


def test_fuzzed_input_only_raises_example_error():
    cases, raised = fuzz(400, seed=1)
    assert cases == 1200 and raised >= 1000  # 1040: flips 191 of 315, truncations 289 of 291


@pytest.mark.slow
def test_fuzzed_input_only_raises_example_error_long():
    cases, raised = fuzz(100_000, seed=2)
    assert cases == 300_000 and raised >= 250_000  # 259,755


def test_not_bytes():
    with pytest.raises(ExampleError, match="is bytes, not a list"):
        decode_example([1, 2])
    assert decode_example(bytearray(encode_example({"a": 1}))) == {"a": [1]}
