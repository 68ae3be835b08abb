"""tf.train.Example and tf.train.SequenceExample in the protobuf wire format, without protobuf.

The messages, as TensorFlow declares them (tensorflow/core/example/feature.proto, example.proto):

    BytesList       { repeated bytes value = 1; }
    FloatList       { repeated float value = 1 [packed = true]; }
    Int64List       { repeated int64 value = 1 [packed = true]; }
    Feature         { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                                   Int64List int64_list = 3; } }
    Features        { map<string, Feature> feature = 1; }
    FeatureList     { repeated Feature feature = 1; }
    FeatureLists    { map<string, FeatureList> feature_list = 1; }
    Example         { Features features = 1; }
    SequenceExample { Features context = 1; FeatureLists feature_lists = 2; }

The wire format (https://protobuf.dev/programming-guides/encoding/): a message is a run of
fields, each a tag varint (field_number << 3 | wire_type) and a value; wire type 0 is a varint,
1 eight bytes, 2 a varint length and that many bytes (bytes, strings, messages, packed lists),
5 four bytes. A varint holds 7 bits a byte, the lowest group first, the high bit set on every
byte but the last; an int64 is written as its two's complement read as a uint64, so a negative
one takes 10 bytes. A packed list is one length-delimited field holding the values back to back
(floats as little-endian IEEE 754 binary32). A map is a repeated message {key = 1; value = 2}.
docs/methods/tf_example.md draws a small Example byte by byte.

Encoding writes what protobuf writes, with map entries sorted by the key's UTF-8 bytes (Python's
sorted on bytes, a key before the keys it is a prefix of). protobuf orders a map only when asked:
its default is the order of its hash table, and ``SerializeToString(deterministic=True)`` of
protobuf 7.36's Python implementation (upb) sorts by bytes too but puts a key *after* the longer
keys it is a prefix of ("ab" before "a"); both orders decode to the same message. An empty list
with no numpy dtype to say its type becomes a Feature with no kind set.

Decoding follows the parsing rules of protobuf (its Python parser, upb, is the reference the
tests compare with): unknown fields are skipped, a repeated number is read packed or one value a
field, a message field that appears twice is merged (its lists concatenated), a map key that
appears twice keeps its last entry, a map entry holding a field other than its key and value is
no entry, and of the oneof the last kind wins. It is stricter than protobuf in one place: a
known field with another wire type is an error, not an unknown field. Packed lists are decoded
by numpy: floats by ``frombuffer``, varints by one pass over their bytes (each byte's 7 bits
shifted by its place in its varint, OR-reduced per varint), not a loop over values.

:func:`parse_example` and :func:`parse_sequence_example` read a message against a description,
with the semantics of TensorFlow's ``tf.io.parse_single_example`` and
``parse_single_sequence_example``: :class:`FixedLenFeature` (exactly prod(shape) values, or the
default when the key is absent), :class:`VarLenFeature` (any number of values) and
:class:`FixedLenSequenceFeature` (steps of prod(shape) values each). A Feature with no kind set
counts as an absent key in an Example or a context (as parse_single_example counts it), and as
zero values of any type in a step of a feature list. TensorFlow's sparse outputs are plain
values here: a VarLenFeature gives its 1-D values, and in a feature list one such array per
step.

Every failure, in encoding, decoding or parsing, is one :class:`ExampleError` naming the key or
the byte offset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import torch

Dtype = Literal["bytes", "float32", "int64"]
Output = Literal["numpy", "torch"]

VARINT, I64, LEN, I32 = 0, 1, 2, 5
# Feature's oneof: bytes_list = 1, float_list = 2, int64_list = 3.
KINDS = ("bytes_list", "float_list", "int64_list")
KIND_DTYPE = {"bytes_list": "bytes", "float_list": "float32", "int64_list": "int64"}
DTYPE_KIND = {dtype: kind for kind, dtype in KIND_DTYPE.items()}
NUMPY_DTYPE = {"bytes": np.dtype(object), "float32": np.dtype(np.float32),
               "int64": np.dtype(np.int64)}
# The one-byte tags of the length-delimited fields 1, 2 and 3: field_number << 3 | LEN.
TAG_1, TAG_2, TAG_3 = 0x0A, 0x12, 0x1A
KIND_TAG = {"bytes_list": TAG_1, "float_list": TAG_2, "int64_list": TAG_3}
INT64_MAX = 2**63 - 1
# Lists of up to SHORT values (or bytes, decoding) are cheaper in Python than numpy's overhead.
SHORT = 16
GROUP_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)
GROUP_THRESHOLDS = np.uint64(1) << GROUP_SHIFTS[1:]
UINT64_MASK = 2**64 - 1


class ExampleError(ValueError):
    """A tf.train.Example or SequenceExample that cannot be encoded, decoded or parsed as asked."""


class _Feature(NamedTuple):
    """A decoded tf.train.Feature: its kind (None when no kind is set) and its values (a list of
    bytes, or a float32 or int64 array)."""

    kind: str | None
    values: list[bytes] | np.ndarray


# ---------------------------------------------------------------------------------- encoding


def _varint(n: int) -> bytes:
    """The varint of 0 <= n < 2^64."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: its one-byte tag, the payload's length as a varint, the payload."""
    return bytes((tag,)) + _varint(len(payload)) + payload


def pack_varints(values: np.ndarray) -> bytes:
    """The packed varints of int64 ``values`` (a negative one is its two's complement, 10 bytes).
    A long list is one numpy pass: the table of 7-bit groups (u >> 7k) & 0x7F, each value keeping
    its groups up to the highest non-zero one (its count of thresholds 2^7k <= u, plus one)."""
    u = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    if u.size <= SHORT:
        return b"".join(_varint(v) for v in u.tolist())
    nbytes = np.searchsorted(GROUP_THRESHOLDS, u, side="right")[:, None] + 1
    width = int(nbytes.max())
    out = ((u[:, None] >> GROUP_SHIFTS[:width]) & np.uint64(0x7F)).astype(np.uint8)
    column = np.arange(width)
    out[column < nbytes - 1] |= 0x80
    return out[column < nbytes].tobytes()


def _scalar_kind(key: str, item: object) -> str:
    if isinstance(item, (bytes, bytearray, memoryview, str)):
        return "bytes_list"
    if isinstance(item, (bool, int, np.integer, np.bool_)):
        return "int64_list"
    if isinstance(item, (float, np.floating)):
        return "float_list"
    raise ExampleError(f"feature {key!r} has a value of type {type(item).__name__}; a feature "
                       "holds bytes, str, int or float values, or a list or numpy array of them")


def _array_feature(key: str, array: np.ndarray) -> _Feature:
    """A numpy array (any shape, read in C order) as a Feature of the list type of its dtype."""
    kind = array.dtype.kind
    if kind in "biu":
        if kind == "u" and array.size and int(array.max()) > INT64_MAX:
            raise ExampleError(f"feature {key!r} holds an integer above int64's maximum 2^63-1")
        return _Feature("int64_list", array.astype(np.int64).ravel())
    if kind == "f":
        with np.errstate(over="ignore"):  # above float32's range is inf, as protobuf casts
            return _Feature("float_list", array.astype(np.float32).ravel())
    if kind in "SU":
        return _Feature("bytes_list", [v.encode() if kind == "U" else v
                                       for v in array.ravel().tolist()])
    if kind == "O":  # the elements say the type
        return _feature(key, array.ravel().tolist())
    raise ExampleError(f"feature {key!r} is a numpy array of dtype {array.dtype}; a feature holds "
                       "bools, integers, floats, bytes or str")


def _tensor_array(key: str, tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        tensor = tensor.float()
    try:
        return tensor.numpy()
    except TypeError:
        raise ExampleError(f"feature {key!r} is a tensor of dtype {tensor.dtype}, which numpy "
                           "cannot hold") from None


def _feature(key: str, value: object) -> _Feature:
    """The Feature a value becomes: its list type chosen by the Python or numpy type."""
    if isinstance(value, torch.Tensor):
        value = _tensor_array(key, value)
    if isinstance(value, np.ndarray):
        return _array_feature(key, value)
    items = value if isinstance(value, (list, tuple)) else [value]
    kinds = {_scalar_kind(key, item) for item in items}
    if not kinds:
        return _Feature(None, [])
    if len(kinds) > 1:
        named = " and ".join(KIND_DTYPE[kind] for kind in KINDS if kind in kinds)
        raise ExampleError(f"feature {key!r} mixes {named} values; a feature holds one type "
                           "(np.asarray(values, np.float32) makes numbers floats)")
    kind = kinds.pop()
    if kind == "bytes_list":
        return _Feature(kind, [item.encode() if isinstance(item, str) else bytes(item)
                               for item in items])
    if kind == "float_list":
        with np.errstate(over="ignore"):  # above float32's range is inf, as protobuf casts
            return _Feature(kind, np.array(items, dtype=np.float32))
    try:
        return _Feature(kind, np.array([int(item) for item in items], dtype=np.int64))
    except OverflowError:
        raise ExampleError(f"feature {key!r} holds an integer outside int64's range "
                           "[-2^63, 2^63-1]") from None


def _feature_bytes(feature: _Feature) -> bytes:
    kind, values = feature
    if kind is None:
        return b""
    if kind == "bytes_list":
        payload = b"".join(_field(TAG_1, value) for value in values)
    elif values.size == 0:  # an empty packed list is left out, as protobuf does
        payload = b""
    elif kind == "float_list":
        payload = _field(TAG_1, values.astype("<f4").tobytes())
    else:
        payload = _field(TAG_1, pack_varints(values))
    return _field(KIND_TAG[kind], payload)


def _key_bytes(key: object) -> bytes:
    if not isinstance(key, str):
        raise ExampleError(f"feature key {key!r} is a {type(key).__name__}, not a str")
    try:
        return key.encode()
    except UnicodeEncodeError:
        raise ExampleError(f"feature key {key!r} is not valid Unicode (a lone surrogate)") from None


def _map_bytes(values: Mapping[str, bytes]) -> bytes:
    """A map<string, message> field 1 of entries {key = 1; value = 2}, sorted by the key's bytes."""
    entries = sorted((_key_bytes(key), value) for key, value in values.items())
    return b"".join(_field(TAG_1, _field(TAG_1, key) + _field(TAG_2, value))
                    for key, value in entries)


def _mapping(what: str, value: object) -> Mapping:
    if not isinstance(value, Mapping):
        raise ExampleError(f"{what} must be a dict of key -> values, not a {type(value).__name__}")
    return value


def _features_bytes(features: object, what: str) -> bytes:
    return _map_bytes({key: _feature_bytes(_feature(key, value))
                       for key, value in _mapping(what, features).items()})


def _steps(key: str, value: object) -> list | np.ndarray:
    """A feature list's values, one per step: a list, or an array's rows along its first axis."""
    if isinstance(value, torch.Tensor):
        value = _tensor_array(key, value)
    if isinstance(value, np.ndarray) and value.ndim > 0 or isinstance(value, (list, tuple)):
        return value
    raise ExampleError(f"feature list {key!r} is a {type(value).__name__}; a feature list is a "
                       "list of features, or an array whose first axis is the step")


def encode_example(features: Mapping[str, object]) -> bytes:
    """Serialise a tf.train.Example.

    ``features`` maps each key (str) to bytes, str, int or float, a list of one of them, or a
    numpy array or torch tensor (bool and integer dtypes become an Int64List, floating ones a
    FloatList of float32, bytes and str ones a BytesList; arrays of any shape are flattened in C
    order). str is written as UTF-8. Mixed or other types raise :class:`ExampleError`.
    """
    return _field(TAG_1, _features_bytes(features, "an Example's features"))


def encode_sequence_example(context: Mapping[str, object],
                            feature_lists: Mapping[str, object]) -> bytes:
    """Serialise a tf.train.SequenceExample.

    ``context`` is as :func:`encode_example`'s features; ``feature_lists`` maps each key to its
    steps, a list of feature values (one Feature each) or an array whose rows are the steps.
    """
    lists = {key: b"".join(_field(TAG_1, _feature_bytes(_feature(key, step)))
                           for step in _steps(key, steps))
             for key, steps in _mapping("a SequenceExample's feature_lists",
                                        feature_lists).items()}
    return (_field(TAG_1, _features_bytes(context, "a SequenceExample's context"))
            + _field(TAG_2, _map_bytes(lists)))


# ---------------------------------------------------------------------------------- decoding


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at buf[pos] (before ``end``) and the position after it."""
    if pos < end and buf[pos] < 0x80:  # one byte: most tags and lengths
        return buf[pos], pos + 1
    start, result, shift = pos, 0, 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift == 70:
            raise ExampleError(f"varint longer than 10 bytes at byte {start}")
    raise ExampleError(f"truncated varint at byte {start}")


def _fields(buf: bytes, pos: int, end: int):
    """Yield (field_number, wire_type, start, stop) for each field of the message in buf[pos:end],
    buf[start:stop] being its value (a varint still encoded)."""
    while pos < end:
        at = pos
        tag, pos = _read_varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0 or tag >> 32:
            raise ExampleError(f"invalid field number {number} at byte {at}")
        start = pos
        if wire == VARINT:
            _, pos = _read_varint(buf, pos, end)
        elif wire == LEN:
            length, start = _read_varint(buf, pos, end)
            pos = start + length
        elif wire in (I64, I32):
            pos += 8 if wire == I64 else 4
        else:
            raise ExampleError(f"field {number} at byte {at} has wire type {wire}, which these "
                               "messages never use")
        if pos > end:
            raise ExampleError(f"field {number} at byte {at} runs to byte {pos}, past the end "
                               f"of its message at byte {end}")
        yield number, wire, start, pos


def _expect(wire: int, expected: int, name: str, start: int) -> None:
    if wire != expected:
        raise ExampleError(f"{name} at byte {start} has wire type {wire}, expected {expected}")


def unpack_varints(buf: bytes, start: int, stop: int) -> np.ndarray:
    """The int64 values of the varints packed in buf[start:stop]. Over SHORT bytes, one numpy pass
    over the bytes: value = OR over a varint's bytes of (byte & 0x7F) << 7 * (its place in it)."""
    if stop - start <= SHORT:
        values, pos = [], start
        while pos < stop:
            value, pos = _read_varint(buf, pos, stop)
            values.append(value & UINT64_MASK)
        return np.array(values, dtype=np.uint64).view(np.int64)
    b = np.frombuffer(buf, np.uint8, count=stop - start, offset=start)
    last = np.flatnonzero(b < 0x80)  # the final byte of each varint
    if last.size == b.size:  # every value below 128: one byte each
        return b.astype(np.int64)
    if last.size == 0 or last[-1] != b.size - 1:
        first_open = last[-1] + 1 if last.size else 0
        raise ExampleError(f"truncated varint at byte {start + first_open}")
    first = np.concatenate(([0], last[:-1] + 1))
    length = last - first + 1
    if length.max() > 10:
        raise ExampleError(f"varint longer than 10 bytes at byte {start + first[length.argmax()]}")
    place = np.arange(b.size) - np.repeat(first, length)
    groups = (b & 0x7F).astype(np.uint64) << (7 * place).astype(np.uint64)
    return np.bitwise_or.reduceat(groups, first).view(np.int64)


def _read_bytes_list(buf: bytes, parts: list[tuple[int, int]]) -> list[bytes]:
    values = []
    for pos, end in parts:
        for number, wire, start, stop in _fields(buf, pos, end):
            if number == 1:
                _expect(wire, LEN, "BytesList.value", start)
                values.append(buf[start:stop])
    return values


def _joined(chunks: list[np.ndarray], dtype: type) -> np.ndarray:
    """The chunks of a list as one array of ``dtype`` (usually one chunk: packed, once)."""
    if len(chunks) == 1:
        return chunks[0].astype(dtype, copy=False)
    return np.concatenate([np.empty(0, dtype), *chunks]).astype(dtype, copy=False)


def _read_float_list(buf: bytes, parts: list[tuple[int, int]]) -> np.ndarray:
    chunks = []
    for pos, end in parts:
        for number, wire, start, stop in _fields(buf, pos, end):
            if number != 1:
                continue
            if wire not in (LEN, I32):
                _expect(wire, LEN, "FloatList.value", start)
            if (stop - start) % 4:
                raise ExampleError(f"packed FloatList.value at byte {start} has {stop - start} "
                                   "bytes, not a multiple of 4")
            chunks.append(np.frombuffer(buf, "<f4", count=(stop - start) // 4, offset=start))
    return _joined(chunks, np.float32)


def _read_int64_list(buf: bytes, parts: list[tuple[int, int]]) -> np.ndarray:
    chunks = []
    for pos, end in parts:
        for number, wire, start, stop in _fields(buf, pos, end):
            if number != 1:
                continue
            if wire not in (LEN, VARINT):
                _expect(wire, LEN, "Int64List.value", start)
            # An unpacked value is one varint: the same bytes as a packed list of one.
            chunks.append(unpack_varints(buf, start, stop))
    return _joined(chunks, np.int64)


READERS = {"bytes_list": _read_bytes_list, "float_list": _read_float_list,
           "int64_list": _read_int64_list}


def _read_feature(buf: bytes, ranges: list[tuple[int, int]]) -> _Feature:
    """A Feature from its serialisations in ``ranges``, merged: lists of one kind concatenate, a
    kind other than the last one read replaces it."""
    kind, parts = None, []
    for pos, end in ranges:
        for number, wire, start, stop in _fields(buf, pos, end):
            if 1 <= number <= 3:
                _expect(wire, LEN, f"Feature.{KINDS[number - 1]}", start)
                if KINDS[number - 1] != kind:
                    kind, parts = KINDS[number - 1], []
                parts.append((start, stop))
    if kind is None:
        return _Feature(None, [])
    return _Feature(kind, READERS[kind](buf, parts))


def _read_feature_list(buf: bytes, ranges: list[tuple[int, int]]) -> list[_Feature]:
    """A FeatureList's steps: each field 1 is one Feature."""
    steps = []
    for pos, end in ranges:
        for number, wire, start, stop in _fields(buf, pos, end):
            if number == 1:
                _expect(wire, LEN, "FeatureList.feature", start)
                steps.append(_read_feature(buf, [(start, stop)]))
    return steps


def _read_map(buf: bytes, ranges: list[tuple[int, int]], read_value, name: str) -> dict:
    """A map<string, message> field 1 from its message's serialisations in ``ranges``. An entry
    is {key = 1; value = 2}, either one missing meaning "" or an empty message; a key's last
    entry wins; an entry holding any other field is no entry (protobuf keeps it as an unknown
    field of the map's message, which here means it is skipped)."""
    entries = {}
    for pos, end in ranges:
        for number, wire, start, stop in _fields(buf, pos, end):
            if number != 1:
                continue
            _expect(wire, LEN, name, start)
            key, key_at, value, unknown = b"", start, [], False
            for entry_number, entry_wire, a, b in _fields(buf, start, stop):
                if entry_number == 1:
                    _expect(entry_wire, LEN, f"{name} key", a)
                    key, key_at = buf[a:b], a
                elif entry_number == 2:
                    _expect(entry_wire, LEN, f"{name} value", a)
                    value.append((a, b))
                else:
                    unknown = True
            try:
                text = key.decode()
            except UnicodeDecodeError:
                raise ExampleError(f"{name} key at byte {key_at} is not UTF-8: {key!r}") from None
            parsed = read_value(buf, value)  # checked even when the entry is then skipped
            if not unknown:
                entries[text] = parsed
    return entries


def _buffer(data: object, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise ExampleError(f"a serialised {what} is bytes, not a {type(data).__name__}")


def _top_fields(buf: bytes, numbers: tuple[int, ...], what: str) -> list[list[tuple[int, int]]]:
    """The value ranges of each of the length-delimited top-level fields ``numbers``."""
    ranges = [[] for _ in numbers]
    for number, wire, start, stop in _fields(buf, 0, len(buf)):
        if number in numbers:
            _expect(wire, LEN, f"{what} field {number}", start)
            ranges[numbers.index(number)].append((start, stop))
    return ranges


def _read_example(data: object) -> dict[str, _Feature]:
    buf = _buffer(data, "tf.train.Example")
    try:
        (features,) = _top_fields(buf, (1,), "Example")
        return _read_map(buf, features, _read_feature, "Features.feature")
    except ExampleError as error:
        raise ExampleError(f"corrupt tf.train.Example ({len(buf)} bytes): {error}") from None


def _read_sequence_example(data: object) -> tuple[dict[str, _Feature], dict[str, list[_Feature]]]:
    buf = _buffer(data, "tf.train.SequenceExample")
    try:
        context, lists = _top_fields(buf, (1, 2), "SequenceExample")
        return (_read_map(buf, context, _read_feature, "Features.feature"),
                _read_map(buf, lists, _read_feature_list, "FeatureLists.feature_list"))
    except ExampleError as error:
        raise ExampleError(f"corrupt tf.train.SequenceExample ({len(buf)} bytes): "
                           f"{error}") from None


def _as_list(feature: _Feature) -> list:
    return feature.values if feature.kind in (None, "bytes_list") else feature.values.tolist()


def decode_example(data: bytes) -> dict[str, list]:
    """A serialised tf.train.Example as {key: values}: a list of bytes, of floats (each a float32
    value; Python's float quiets a signalling NaN, parse_example's arrays keep every bit) or of
    ints. A feature with no kind set is an empty list."""
    return {key: _as_list(feature) for key, feature in _read_example(data).items()}


def decode_sequence_example(data: bytes) -> tuple[dict[str, list], dict[str, list[list]]]:
    """A serialised tf.train.SequenceExample as (context, feature_lists): the context as
    :func:`decode_example` gives features, each feature list as a list of its steps' values."""
    context, lists = _read_sequence_example(data)
    return ({key: _as_list(feature) for key, feature in context.items()},
            {key: [_as_list(step) for step in steps] for key, steps in lists.items()})


# ------------------------------------------------------------------------------------ parsing


def _check_dtype(spec: object) -> None:
    if not isinstance(spec.dtype, str) or spec.dtype not in NUMPY_DTYPE:
        raise ExampleError(f"{type(spec).__name__} dtype {spec.dtype!r} is not one of "
                           f"{', '.join(NUMPY_DTYPE)}")


def _check_shape(spec: object) -> None:
    shape = spec.shape
    if not (isinstance(shape, (tuple, list)) and all(isinstance(d, int) and not isinstance(
            d, bool) and d >= 0 for d in shape)):
        raise ExampleError(f"{type(spec).__name__} shape {shape!r} is not a tuple of "
                           "non-negative ints")
    object.__setattr__(spec, "shape", tuple(shape))


def _default_array(spec: FixedLenFeature) -> np.ndarray:
    """A FixedLenFeature's default_value as the array of its dtype and shape; its type is read as
    a feature's is (ints may be float32 defaults, as in TensorFlow)."""
    value = spec.default_value
    if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in value):
        try:  # a nested list, for a default of two or more dimensions
            value = np.asarray(value)
        except ValueError:
            raise ExampleError(f"FixedLenFeature default_value {value!r} is ragged") from None
    try:
        kind, values = _feature("default_value", value)
    except ExampleError as error:
        raise ExampleError(f"FixedLenFeature {error}") from None
    if kind == "int64_list" and spec.dtype == "float32":
        kind, values = "float_list", values.astype(np.float32)
    if kind is not None and KIND_DTYPE[kind] != spec.dtype:
        raise ExampleError(f"FixedLenFeature default_value holds {KIND_DTYPE[kind]} values, its "
                           f"dtype is {spec.dtype}")
    array = _values(spec.dtype, _Feature(kind, values))
    if array.size != math.prod(spec.shape):
        raise ExampleError(f"FixedLenFeature default_value has {array.size} values, shape "
                           f"{spec.shape} needs {math.prod(spec.shape)}")
    return array.reshape(spec.shape)


@dataclass(frozen=True)
class FixedLenFeature:
    """A dense feature of a fixed shape (tf.io.FixedLenFeature): the example holds exactly
    prod(shape) values of ``dtype``; an example without the key gives ``default_value`` (which
    must hold prod(shape) values, reshaped to ``shape``), or is an error when it is None."""

    shape: tuple[int, ...]
    """The output's shape; () for a scalar."""
    dtype: Dtype
    """bytes, float32 or int64: the list type the feature must have."""
    default_value: object = None
    """The output when the key is absent (None: the key is required)."""
    _default: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_dtype(self)
        _check_shape(self)
        if self.default_value is not None:
            object.__setattr__(self, "_default", _default_array(self))


@dataclass(frozen=True)
class VarLenFeature:
    """Any number of values of ``dtype`` (tf.io.VarLenFeature), given as a 1-D array; an absent
    key is an empty one."""

    dtype: Dtype
    """bytes, float32 or int64: the list type the feature must have."""

    def __post_init__(self) -> None:
        _check_dtype(self)


@dataclass(frozen=True)
class FixedLenSequenceFeature:
    """Steps of prod(shape) values each (tf.io.FixedLenSequenceFeature), given as an array of
    shape (steps, *shape). In a SequenceExample's feature list each Feature is one step; in an
    Example the one feature's values are split into steps (shape must then hold values)."""

    shape: tuple[int, ...]
    """The shape of one step."""
    dtype: Dtype
    """bytes, float32 or int64: the list type the feature must have."""
    allow_missing: bool = False
    """Whether an absent key gives zero steps rather than an error."""

    def __post_init__(self) -> None:
        _check_dtype(self)
        _check_shape(self)


FeatureSpec = FixedLenFeature | VarLenFeature | FixedLenSequenceFeature


def _values(dtype: str, feature: _Feature) -> np.ndarray:
    """A feature's values as an array of ``dtype`` (bytes as an object array of bytes); a feature
    with no kind set is empty."""
    if feature.kind is None:
        return np.empty(0, NUMPY_DTYPE[dtype])
    if dtype != "bytes":
        return feature.values
    out = np.empty(len(feature.values), dtype=object)
    out[:] = feature.values
    return out


def _typed_values(key: str, dtype: str, feature: _Feature) -> np.ndarray:
    """The values of an example's feature, whose kind must be the description's dtype."""
    if feature.kind is not None and KIND_DTYPE[feature.kind] != dtype:
        raise ExampleError(f"feature {key!r} holds a {feature.kind}, the description asks for "
                           f"{dtype} ({DTYPE_KIND[dtype]})")
    return _values(dtype, feature)


def _count_error(key: str, n: int, spec: object, per: str = "") -> ExampleError:
    return ExampleError(f"feature {key!r} has {n} {spec.dtype} values{per}, its "
                        f"{type(spec).__name__} of shape {spec.shape} needs "
                        f"{math.prod(spec.shape)}")


def _parse_feature(key: str, spec: FeatureSpec, feature: _Feature | None) -> np.ndarray:
    """One feature of an Example (or a SequenceExample's context) as its spec asks; a feature
    with no kind set counts as absent, as tf.io.parse_single_example counts it."""
    if feature is not None and feature.kind is None:
        feature = None
    if isinstance(spec, VarLenFeature):
        return np.empty(0, NUMPY_DTYPE[spec.dtype]) if feature is None else (
            _typed_values(key, spec.dtype, feature))
    size = math.prod(spec.shape)
    if isinstance(spec, FixedLenFeature):
        if feature is None:
            if spec._default is None:
                raise ExampleError(f"feature {key!r} is required (FixedLenFeature {spec.dtype}, "
                                   f"shape {spec.shape}, no default_value) but is absent")
            return spec._default.copy()
        values = _typed_values(key, spec.dtype, feature)
        if values.size != size:
            raise _count_error(key, values.size, spec)
        return values.reshape(spec.shape)
    if not spec.allow_missing:
        raise ExampleError(f"feature {key!r}: a FixedLenSequenceFeature in an Example needs "
                           "allow_missing=True (as TensorFlow requires)")
    if feature is None:
        return np.empty((0, *spec.shape), NUMPY_DTYPE[spec.dtype])
    values = _typed_values(key, spec.dtype, feature)
    if size == 0 or values.size % size:
        raise ExampleError(f"feature {key!r} has {values.size} {spec.dtype} values, not a whole "
                           f"number of FixedLenSequenceFeature steps of shape {spec.shape}")
    return values.reshape((-1, *spec.shape))


def _parse_feature_list(key: str, spec: FeatureSpec,
                        steps: list[_Feature] | None) -> np.ndarray | list[np.ndarray]:
    """One feature list of a SequenceExample as its spec asks."""
    if isinstance(spec, VarLenFeature):
        return [] if steps is None else [_typed_values(key, spec.dtype, step) for step in steps]
    if steps is None:
        if not spec.allow_missing:
            raise ExampleError(f"feature list {key!r} is absent and its FixedLenSequenceFeature "
                               "does not allow_missing")
        steps = []
    size = math.prod(spec.shape)
    values = [_typed_values(key, spec.dtype, step) for step in steps]
    for t, step in enumerate(values):
        if step.size != size:
            raise _count_error(key, step.size, spec, f" at step {t}")
    flat = np.concatenate([np.empty(0, NUMPY_DTYPE[spec.dtype]), *values])
    return flat.reshape((len(values), *spec.shape))


def _output(value: np.ndarray | list, output: str) -> object:
    if isinstance(value, list):
        return [_output(step, output) for step in value]
    if output == "torch" and value.dtype != object:
        return torch.from_numpy(np.array(value))  # a copy: frombuffer's arrays are read-only
    return value if value.flags.writeable else value.copy()


def _check_description(description: object, what: str, allowed: tuple[type, ...]) -> Mapping:
    for key, spec in _mapping(what, description).items():
        if not isinstance(spec, allowed):
            raise ExampleError(f"{what} entry {key!r} is a {type(spec).__name__}, not one of "
                               f"{', '.join(kind.__name__ for kind in allowed)}")
    return description


def _check_output(output: object) -> None:
    if output not in ("numpy", "torch"):
        raise ExampleError(f"output {output!r} is not 'numpy' or 'torch'")


def parse_example(data: bytes, description: Mapping[str, FeatureSpec],
                  output: Output = "numpy") -> dict[str, np.ndarray | torch.Tensor]:
    """The features ``description`` names, from a serialised Example, as
    tf.io.parse_single_example reads them: a FixedLenFeature as an array of its shape, a
    VarLenFeature as a 1-D array, a FixedLenSequenceFeature as (steps, *shape). Numbers come as
    numpy arrays or (``output="torch"``) tensors, bytes as numpy object arrays of bytes.
    Features the description does not name are ignored."""
    _check_output(output)
    description = _check_description(description, "parse_example's description",
                                     (FixedLenFeature, VarLenFeature, FixedLenSequenceFeature))
    features = _read_example(data)
    return {key: _output(_parse_feature(key, spec, features.get(key)), output)
            for key, spec in description.items()}


def parse_sequence_example(
        data: bytes, context_description: Mapping[str, FeatureSpec] | None = None,
        sequence_description: Mapping[str, FeatureSpec] | None = None,
        output: Output = "numpy") -> tuple[dict, dict]:
    """(context, feature_lists) from a serialised SequenceExample, as
    tf.io.parse_single_sequence_example reads them: the context by FixedLenFeature or
    VarLenFeature (as :func:`parse_example`), each feature list by FixedLenSequenceFeature (an
    array of shape (steps, *shape)) or VarLenFeature (a list of one 1-D array per step)."""
    _check_output(output)
    context_description = _check_description(context_description or {}, "context_description",
                                             (FixedLenFeature, VarLenFeature))
    sequence_description = _check_description(sequence_description or {},
                                              "sequence_description",
                                              (FixedLenSequenceFeature, VarLenFeature))
    context, lists = _read_sequence_example(data)
    return ({key: _output(_parse_feature(key, spec, context.get(key)), output)
             for key, spec in context_description.items()},
            {key: _output(_parse_feature_list(key, spec, lists.get(key)), output)
             for key, spec in sequence_description.items()})
