"""FarmHash Fingerprint64 and FingerprintCat64: the string and cross hashes of TensorFlow.

TensorFlow's ``StringToHashBucketFast`` is ``Fingerprint64(s) % num_buckets``, and
``Fingerprint64`` is FarmHash's ``farmhashna::Hash64`` (google/farmhash, src/farmhash.cc: "uint64_t
Fingerprint64(const char* s, size_t len) { return farmhashna::Hash64(s, len); }"). All
arithmetic is on unsigned 64-bit words, mod 2^64; ``Fetch64(p)`` / ``Fetch32(p)`` read the 8 / 4
bytes at p little-endian; ``rot(v, r) = (v >> r) | (v << (64 - r))``; ``smix(v) = v ^ (v >> 47)``;
the odd constants k0 = 0xc3a5c85c97cb3127, k1 = 0xb492b66fbe98f273, k2 = 0x9ae16a3b2f90404f.

    H16(u, v, m)   a = smix((u ^ v) m);  b = smix((v ^ a) m);  return b m
    len 0          k2
    len 1-3        y = s[0] + 256 s[len/2],  z = len + 4 s[len-1];  smix(y k2 ^ z k0) k2
    len 4-7        m = k2 + 2 len;  H16(len + 8 Fetch32(s), Fetch32(s + len - 4), m)
    len 8-16       m = k2 + 2 len;  a = Fetch64(s) + k2,  b = Fetch64(s + len - 8)
                   H16(rot(b, 37) m + a, (rot(a, 25) + b) m, m)
    len 17-32      four words from both ends mixed by rotations and k1, k2, then H16
    len 33-64      the 17-32 mix, then a second one over the middle words, then H16
    len > 64       56 bytes of state (x, y, z, v, w) absorb each 64-byte block; the last
                   (overlapping) 64 bytes end it with a multiplier drawn from z (Hash64's loop)

``FingerprintCat64(a, b)`` (TensorFlow's core/lib/hash/hash.h, used by ``SparseCross``) combines
two fingerprints, m = 0xc6a4a7935bd1e995:  r = (a ^ m) ^ smix(b m) m;  r = smix(smix(r m) m).

Vectorised over a batch: the strings are joined into one byte buffer and each length class runs
as NumPy uint64 operations over all of its strings at once (the per-string offsets are gathers),
so Python touches each string only to encode and measure it. Strings over 64 bytes are sorted by
block count so the block loop runs over a shrinking prefix of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

K0 = np.uint64(0xC3A5C85C97CB3127)
K1 = np.uint64(0xB492B66FBE98F273)
K2 = np.uint64(0x9AE16A3B2F90404F)
K_MUL = np.uint64(0xC6A4A7935BD1E995)
_BLOCK = np.arange(0, 64, 8)  # the byte offsets of a 64-byte block's eight words


def _rot(v: np.ndarray, r: int) -> np.ndarray:
    return (v >> np.uint64(r)) | (v << np.uint64(64 - r))


def _smix(v: np.ndarray) -> np.ndarray:
    return v ^ (v >> np.uint64(47))


def _h16(u: np.ndarray, v: np.ndarray, mul: np.ndarray) -> np.ndarray:
    a = _smix((u ^ v) * mul)
    b = _smix((v ^ a) * mul)
    return b * mul


class _Bytes:
    """The joined bytes of a batch, read as little-endian words at per-string positions."""

    def __init__(self, data: list[bytes]):
        # 8 zero bytes of padding: a word read is never past a string's end, but a gather of an
        # empty group must still index inside the buffer.
        self.buf = np.frombuffer(b"".join(data) + bytes(8), dtype=np.uint8)
        # The word starting at every byte: overlapping views with a stride of one byte, so a
        # fetch is one gather and nothing is copied up front.
        self.words = {width: np.ndarray((len(self.buf) - 7,), dtype=f"<u{width}",
                                        buffer=self.buf, strides=(1,)) for width in (4, 8)}

    def fetch(self, pos: np.ndarray, width: int = 8) -> np.ndarray:
        return self.words[width][pos].astype(np.uint64)

    def byte(self, pos: np.ndarray) -> np.ndarray:
        return self.buf[pos].astype(np.uint64)


def _len_1_to_3(buf: _Bytes, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    y = buf.byte(s) + (buf.byte(s + (n >> np.uint64(1)).astype(np.int64)) << np.uint64(8))
    z = n + (buf.byte(s + n.astype(np.int64) - 1) << np.uint64(2))
    return _smix(y * K2 ^ z * K0) * K2


def _len_4_to_7(buf: _Bytes, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    mul = K2 + n * np.uint64(2)
    a = buf.fetch(s, 4)
    return _h16(n + (a << np.uint64(3)), buf.fetch(s + n.astype(np.int64) - 4, 4), mul)


def _len_8_to_16(buf: _Bytes, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    mul = K2 + n * np.uint64(2)
    a = buf.fetch(s) + K2
    b = buf.fetch(s + n.astype(np.int64) - 8)
    return _h16(_rot(b, 37) * mul + a, (_rot(a, 25) + b) * mul, mul)


def _len_17_to_32(buf: _Bytes, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    end = s + n.astype(np.int64)
    mul = K2 + n * np.uint64(2)
    a = buf.fetch(s) * K1
    b = buf.fetch(s + 8)
    c = buf.fetch(end - 8) * mul
    d = buf.fetch(end - 16) * K2
    return _h16(_rot(a + b, 43) + _rot(c, 30) + d, a + _rot(b + K2, 18) + c, mul)


def _len_33_to_64(buf: _Bytes, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    end = s + n.astype(np.int64)
    mul = K2 + n * np.uint64(2)
    a = buf.fetch(s) * K2
    b = buf.fetch(s + 8)
    c = buf.fetch(end - 8) * mul
    d = buf.fetch(end - 16) * K2
    y = _rot(a + b, 43) + _rot(c, 30) + d
    z = _h16(y, a + _rot(b + K2, 18) + c, mul)
    e = buf.fetch(s + 16) * mul
    f = buf.fetch(s + 24)
    g = (y + buf.fetch(end - 32)) * mul
    h = (z + buf.fetch(end - 24)) * mul
    return _h16(_rot(e + f, 43) + _rot(g, 30) + h, e + _rot(f + a, 18) + g, mul)


def _weak_32(words: np.ndarray, a: np.ndarray, b: np.ndarray):
    """WeakHashLen32WithSeeds of 32 bytes (their words in ``words[:, 0:4]``), seeds a, b."""
    w, x, y, z = words.T
    a = a + w
    b = _rot(b + a + z, 21)
    c = a
    a = a + x + y
    b = b + _rot(a, 44)
    return a + z, b + c


def _absorb(block, x, y, z, v0, v1, w0, w1, mul, c):
    """One 64-byte block (its eight words) into the state (x, y, z, v, w); c is 1 in Hash64's
    loop and 9 on the last block. Returns the state with x and z swapped, as Hash64 does."""
    x = _rot(x + y + v0 + block[:, 1], 37) * mul
    y = _rot(y + v1 + block[:, 6], 42) * mul
    x ^= w1 * c
    y += v0 * c + block[:, 5]
    z = _rot(z + w0, 33) * mul
    v0, v1 = _weak_32(block[:, 0:4], v1 * mul, x + w0)
    w0, w1 = _weak_32(block[:, 4:8], z + w1, y + block[:, 2])
    return z, y, x, v0, v1, w0, w1


def _len_over_64(buf: _Bytes, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    blocks = ((n - np.uint64(1)) // np.uint64(64)).astype(np.int64)
    order = np.argsort(-blocks, kind="stable")
    s, n, blocks = s[order], n[order], blocks[order]
    seed = np.uint64(81)
    x = np.full(len(s), seed, dtype=np.uint64)
    y = x * K1 + np.uint64(113)
    z = _smix(y * K2 + np.uint64(113)) * K2
    v0, v1, w0, w1 = (np.zeros(len(s), dtype=np.uint64) for _ in range(4))
    x = x * K2 + buf.fetch(s)
    state = [x, y, z, v0, v1, w0, w1]
    for t in range(int(blocks[0])):
        k = int(np.searchsorted(-blocks, -t, side="left"))  # rows with more than t blocks
        block = buf.fetch((s[:k] + 64 * t)[:, None] + _BLOCK)
        new = _absorb(block, *(part[:k] for part in state), K1, np.uint64(1))
        for part, value in zip(state, new, strict=True):
            part[:k] = value
    x, y, z, v0, v1, w0, w1 = state
    mul = K1 + ((z & np.uint64(0xFF)) << np.uint64(1))
    w0 = w0 + ((n - np.uint64(1)) & np.uint64(63))
    v0 = v0 + w0
    w0 = w0 + v0
    last = buf.fetch((s + n.astype(np.int64) - 64)[:, None] + _BLOCK)
    x, y, z, v0, v1, w0, w1 = _absorb(last, x, y, z, v0, v1, w0, w1, mul, np.uint64(9))
    out = _h16(_h16(v0, w0, mul) + _smix(y) * K0 + z, _h16(v1, w1, mul) + x, mul)
    unsorted = np.empty_like(out)
    unsorted[order] = out
    return unsorted


# (smallest length, largest length, hash); length 0 is the constant k2.
_CLASSES = ((1, 3, _len_1_to_3), (4, 7, _len_4_to_7), (8, 16, _len_8_to_16),
            (17, 32, _len_17_to_32), (33, 64, _len_33_to_64), (65, None, _len_over_64))


def to_bytes(values: Sequence[str | bytes]) -> list[bytes]:
    """Strings as TensorFlow hashes them: str as its UTF-8 bytes, bytes unchanged."""
    types = set(map(type, values))
    if all(issubclass(t, bytes) for t in types):
        return list(values)
    if all(issubclass(t, str) for t in types):
        return list(map(str.encode, values))
    other = [t.__name__ for t in types if not issubclass(t, str | bytes)]
    if other:
        raise TypeError(f"Fingerprint64 hashes str or bytes, got {', '.join(sorted(other))}")
    return [v.encode() if isinstance(v, str) else v for v in values]


def fingerprint64(values: Sequence[str | bytes]) -> np.ndarray:
    """FarmHash Fingerprint64 of each string (str as UTF-8): (n,) uint64."""
    data = to_bytes(values)
    lengths = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    buf = _Bytes(data)
    out = np.full(len(data), K2, dtype=np.uint64)
    for low, high, hash_class in _CLASSES:
        rows = np.flatnonzero((lengths >= low) & (lengths <= (high or lengths.max(initial=0))))
        if len(rows):
            out[rows] = hash_class(buf, starts[rows], lengths[rows].astype(np.uint64))
    return out


def fingerprint_cat64(fp1: np.ndarray, fp2: np.ndarray) -> np.ndarray:
    """FingerprintCat64(fp1, fp2) elementwise over uint64 arrays (not commutative)."""
    fp1 = np.asarray(fp1, dtype=np.uint64)
    fp2 = np.asarray(fp2, dtype=np.uint64)
    with np.errstate(over="ignore"):  # the arithmetic is mod 2^64; NumPy warns on scalars
        r = (fp1 ^ K_MUL) ^ (_smix(fp2 * K_MUL) * K_MUL)
        return _smix(_smix(r * K_MUL) * K_MUL)
