"""TFRecord files, read and written without TensorFlow, every CRC checked.

A TFRecord file is a sequence of records, each framed as (integers little-endian; TensorFlow's
``tensorflow/core/lib/io/record_writer.h``):

    +----------------+---------------------------+--------------+-------------------------+
    | length: uint64 | mask(crc32c(length)): u32 | data         | mask(crc32c(data)): u32 |
    +----------------+---------------------------+--------------+-------------------------+
      8 bytes          4 bytes                     length bytes   4 bytes

with ``mask`` of :mod:`mlatlas.data.formats.crc32c`. Compression ("GZIP" or "ZLIB", TensorFlow's
``compression_type``) wraps the whole stream of framed records in one gzip or zlib stream; the
writer uses TensorFlow's zlib settings (default level, 15-bit window, memory level 9), so its
files equal ``tf.io.TFRecordWriter``'s byte for byte. Offsets of compressed files count bytes of
the decompressed stream.

Reading checks both CRCs of every record. A record whose data fails its CRC is corrupt but its
(checked) length still says where the next record starts; a length that fails its CRC, a record
cut short, a broken compressed stream or bytes after its end leave no reliable next record.
Either raises :class:`TFRecordError` naming the file, record number and byte offset, or, with
``skip_corrupt=True``, is counted in a :class:`ReadStats`: a bad record is skipped, and after
the others the rest of the file is given up (its bytes counted as ``lost_bytes``).

An index file holds one line "offset length" per record, the byte offset of its frame and the
frame's size (16 + data length), the format of the ``tfrecord`` package's ``tfrecord2idx``.
It gives random access (:func:`read_record`) and lets each shard of :class:`TFRecordDataset`
read only its own records. Only uncompressed files have one.

Sharding: the files, in sorted order (or, shuffled, in an order drawn from (seed, epoch)), hold
the global records g = 0, 1, ...; of S = world_size x num_workers shards, shard
s = rank x num_workers + worker_id reads the records with g mod S = s. Every record is read by
exactly one shard, and shard sizes differ by at most one.
"""

from __future__ import annotations

import glob
import mmap
import os
import random
import struct
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlatlas.data import DatasetError
from mlatlas.data.formats.crc32c import crc32c, mask

COMPRESSIONS = ("", "GZIP", "ZLIB")
# zlib's window bits: 15 (a 32 KiB window) with the zlib header, +16 for the gzip header.
WINDOW_BITS = {"GZIP": 16 + zlib.MAX_WBITS, "ZLIB": zlib.MAX_WBITS}
MEM_LEVEL = 9  # TensorFlow's ZlibCompressionOptions.mem_level (zlib's own default is 8)
HEADER, FOOTER = 12, 4
CHUNK = 1 << 20  # bytes decompressed, and bytes of records handled, at a time
INDEX_SUFFIX = ".index"
RUN = 8  # equal lengths in a row after which the walk checks where that length would lead
_HEADER = struct.Struct("<QI")
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


class TFRecordError(DatasetError):
    """A file that is not valid TFRecord: a failed CRC, a truncated record, a broken stream."""


@dataclass
class ReadStats:
    """What a read found: records yielded, their data bytes, corrupt records or regions, and the
    bytes of the (decompressed) stream given up after a corruption that leaves no reliable next
    record (after a broken compressed stream, those decompressed before the break)."""

    records: int = 0
    data_bytes: int = 0
    corrupt: int = 0
    lost_bytes: int = 0


def frame(data: bytes) -> bytes:
    """One record's bytes in the file: length, its masked CRC, data, the data's masked CRC."""
    length = _LENGTH.pack(len(data))
    return b"".join((length, _CRC.pack(mask(crc32c(length))), data,
                     _CRC.pack(mask(crc32c(data)))))


def _check_compression(compression: str) -> str:
    if compression not in COMPRESSIONS:
        raise TFRecordError(f"unknown compression {compression!r} (use one of "
                            f"{', '.join(map(repr, COMPRESSIONS))})")
    return compression


class TFRecordWriter:
    """Writes records to ``path``; ``index`` holds each record's (offset, frame size) in the
    (decompressed) stream. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | Path, compression: str = ""):
        self.path, self.compression = Path(path), _check_compression(compression)
        self.index: list[tuple[int, int]] = []
        self._offset = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close or __exit__)
        self._deflate = (zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED,
                                          WINDOW_BITS[compression], MEM_LEVEL)
                         if compression else None)

    def write(self, data: bytes) -> None:
        framed = frame(data)
        self._file.write(self._deflate.compress(framed) if self._deflate else framed)
        self.index.append((self._offset, len(framed)))
        self._offset += len(framed)

    def close(self) -> None:
        if self._file.closed:
            return
        if self._deflate:
            self._file.write(self._deflate.flush())
        self._file.close()

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def detect_compression(path: str | Path) -> str:
    """"" when the file starts with a record whose length passes its CRC (or is empty), else
    "GZIP" (magic bytes 1f 8b) or "ZLIB" (a valid zlib header: deflate, (CMF FLG) % 31 == 0)."""
    with _open(path) as f:
        head = f.read(HEADER)
    if not head:
        return ""
    if len(head) == HEADER:
        length, length_crc = _HEADER.unpack(head)
        if length_crc == mask(crc32c(head[:8])):
            return ""
    if head[:2] == b"\x1f\x8b":
        return "GZIP"
    if len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0:
        return "ZLIB"
    raise TFRecordError(f"{path}: record 0 at byte 0: not a TFRecord file (its first length "
                        "fails its CRC, and it is no GZIP or ZLIB stream)")


def _open(path: str | Path):
    try:
        return open(path, "rb")
    except OSError as err:
        raise TFRecordError(f"cannot read {path}: {err.strerror}") from None


class _StreamBroken(Exception):
    """The compressed stream cannot be decompressed further (the message says why)."""


def _mapped(f) -> Iterator[mmap.mmap]:
    """An uncompressed file as one chunk, mapped: records are sliced from the page cache, not
    read into a buffer first."""
    if os.fstat(f.fileno()).st_size:
        yield mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _inflated_chunks(f, compression: str) -> Iterator[bytes]:
    """The decompressed stream in pieces of at most CHUNK bytes, so that a small, highly
    compressed file cannot fill the memory."""
    inflate = zlib.decompressobj(WINDOW_BITS[compression])
    full = False  # the last piece filled CHUNK: zlib may hold more output without more input
    while not inflate.eof:
        raw = inflate.unconsumed_tail or f.read(CHUNK)
        if not raw and not full:
            raise _StreamBroken(f"{compression} stream cut short")
        try:
            out = inflate.decompress(raw, CHUNK)
        except zlib.error as err:
            raise _StreamBroken(f"{compression} stream broken ({err})") from None
        full = len(out) == CHUNK
        if out:
            yield out
    if inflate.unused_data or f.read(1):
        raise _StreamBroken(f"bytes after the end of the {compression} stream")


def _length_crc_tables() -> tuple[np.ndarray, int]:
    """CRC-32C restricted to 8-byte messages, as tables: it is affine over GF(2), so
    crc(b_0 .. b_7) = crc(0^8) ^ T[0, b_0] ^ ... ^ T[7, b_7] with T[j, v] = crc(v at byte j) ^
    crc(0^8). This checks the lengths of a whole chunk's records in a few numpy operations."""
    zero = crc32c(bytes(8))
    table = np.empty((8, 256), dtype=np.uint32)
    for j in range(8):
        for v in range(256):
            table[j, v] = crc32c(bytes(j) + bytes([v]) + bytes(7 - j)) ^ zero
    return table, zero


_LENGTH_TABLE, _ZERO_CRC = _length_crc_tables()


def _frames(buf, pos: int) -> tuple[list[int], int]:
    """Offsets of the records that lie whole in ``buf`` from ``pos`` on, walking their
    (unchecked) lengths for about CHUNK bytes, and where the rest begins. After RUN equal
    lengths in a row (records of one shape), the offsets that length would give are checked all
    at once in numpy, and the walk goes on from the first record of another length."""
    unpack, offsets, view = _LENGTH.unpack_from, [], np.frombuffer(buf, np.uint8)
    size, window, run, last = len(buf), pos + CHUNK, 0, -1
    while pos + HEADER <= size and pos < window:
        length = unpack(buf, pos)[0]
        stride = length + HEADER + FOOTER
        if pos + stride > size:
            break
        offsets.append(pos)
        pos += stride
        run, last = (run + 1 if length == last else 0), length
        if run == RUN:
            guess = np.arange(pos, min(size - stride + 1, window), stride)
            lengths = view[guess[:, None] + np.arange(8)].copy().view("<u8")[:, 0]
            differ = np.flatnonzero(lengths != length)
            n = int(differ[0]) if len(differ) else len(guess)
            offsets.extend(guess[:n].tolist())
            pos, run = pos + n * stride, 0
    return offsets, pos


def _good_lengths(buf: bytes, offsets: np.ndarray) -> int:
    """How many of the records at ``offsets`` come before the first whose length fails its CRC."""
    header = np.frombuffer(buf, np.uint8)[offsets[:, None] + np.arange(HEADER)]
    crc = np.full(len(offsets), _ZERO_CRC, dtype=np.uint32)
    for j in range(8):
        crc ^= _LENGTH_TABLE[j][header[:, j]]
    bad = np.flatnonzero(mask(crc) != header[:, 8:].copy().view("<u4")[:, 0])
    return int(bad[0]) if len(bad) else len(offsets)


def _batches(path, source: Iterator, stats: ReadStats, skip_corrupt: bool, first: int,
             step: int, base: int = 0, k: int = 0) -> Generator[list[bytes], None, int]:
    """Lists of the data of the records k with k % step == first, both CRCs checked; the
    others' lengths are checked and their data skipped. Returns the number of records seen.
    A corruption raises TFRecordError or, with ``skip_corrupt``, is counted in ``stats``: a
    record whose data fails its CRC is skipped, a broken frame or stream ends the scan.

    The records of about CHUNK bytes are handled together: their lengths walked in one loop and
    checked in numpy, their data CRCs computed by one ``map`` and compared in numpy. ``base``
    and ``k`` are the stream offset and number of the source's first record."""
    buf, pos = b"", 0  # the stream's byte base + i is buf[i]; pos: the next frame's start
    try:
        while True:
            chunk = next(source, None)
            if chunk is None:
                if pos == len(buf):
                    return k
                raise _Bad("truncated: the file ends inside its header" if len(buf) - pos < HEADER
                           else f"truncated: {_LENGTH.unpack_from(buf, pos)[0]} data bytes "
                                "announced, the file ends before them")
            buf, base, pos = (buf[pos:] + chunk if pos < len(buf) else chunk), base + pos, 0
            while True:
                offsets, rest = _frames(buf, pos)
                if not offsets:
                    break
                starts = np.array(offsets, dtype=np.int64)
                good = _good_lengths(buf, starts)
                ends = np.append(starts[1:], rest) - FOOTER  # each frame ends with its data CRC
                yield from _checked(path, buf, base, starts[:good], ends[:good], k, stats,
                                    skip_corrupt, first, step)
                k += good
                if good < len(offsets):
                    pos = offsets[good]
                    raise _Bad("its length fails its CRC")
                pos = rest
            if len(buf) - pos >= HEADER:
                if _good_lengths(buf, np.array([pos])) == 0:
                    raise _Bad("its length fails its CRC")
                # A record longer than a chunk: read on to its end before joining the parts.
                buf, base, pos = _take(buf[pos:], source, _LENGTH.unpack_from(buf, pos)[0] +
                                       HEADER + FOOTER), base + pos, 0
    except _Bad as bad:
        if not skip_corrupt:
            raise TFRecordError(f"{path}: record {k} at byte {base + pos}: {bad}") from None
        stats.corrupt += 1
        stats.lost_bytes += _drain(len(buf) - pos, source)
    except _StreamBroken as broken:
        if not skip_corrupt:
            raise TFRecordError(f"{path}: record {k} (byte {base + pos} of the decompressed "
                                f"stream): {broken}") from None
        stats.corrupt += 1
        stats.lost_bytes += len(buf) - pos
    return k


def _take(head: bytes, source: Iterator[bytes], need: int) -> bytes:
    """``head`` extended by chunks of ``source`` to at least ``need`` bytes, or to the source's
    end, less one chunk: the loop of :func:`_batches` appends the next one."""
    parts, size = [head], len(head)
    while size + CHUNK < need:
        chunk = next(source, None)
        if chunk is None:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _checked(path, buf: bytes, base: int, starts: np.ndarray, ends: np.ndarray, k: int,
             stats: ReadStats, skip_corrupt: bool, first: int, step: int) -> Iterator[list]:
    """Lists of the data of the records framed at ``starts`` (lengths checked; data ends at
    ``ends``), numbered k, k + 1, ..., that belong to the shard, after their data CRCs; a failed
    one raises or, with ``skip_corrupt``, is counted and skipped."""
    skip = (first - k) % step
    starts, ends = starts[skip::step], ends[skip::step]
    if not len(starts):
        return
    datas = _slices(buf, starts, ends, step)
    crc = mask(np.fromiter(map(crc32c, datas), np.uint32, len(datas)))
    stored = np.frombuffer(buf, np.uint8)[ends[:, None] + np.arange(FOOTER)]
    bad = np.flatnonzero(crc != stored.copy().view("<u4")[:, 0]).tolist()
    done = 0
    for i in [*bad, len(datas)]:
        stats.records += i - done
        stats.data_bytes += int((ends[done:i] - starts[done:i]).sum()) - HEADER * (i - done)
        yield datas[done:i]
        if i == len(datas):
            return
        if not skip_corrupt:
            raise TFRecordError(f"{path}: record {k + skip + i * step} at byte "
                                f"{base + int(starts[i])}: its data fails its CRC")
        stats.corrupt += 1
        done = i + 1


def _slices(buf, starts: np.ndarray, ends: np.ndarray, step: int) -> list[bytes]:
    """The data of the frames at ``starts`` (data ending at ``ends``). Back-to-back frames of one
    length (step 1, records of one shape) come out of one struct.unpack_from call."""
    length = int(ends[0] - starts[0]) - HEADER
    if step == 1 and len(starts) > RUN and (ends - starts == length + HEADER).all():
        return list(struct.unpack_from(f"{HEADER}x{length}s{FOOTER}x" * len(starts), buf,
                                       int(starts[0])))
    return [buf[i:j] for i, j in zip((starts + HEADER).tolist(), ends.tolist(), strict=True)]


class _Bad(Exception):
    """A frame that leaves no reliable next record (the message says why)."""


def _drain(size: int, source: Iterator[bytes]) -> int:
    """``size`` plus the bytes left in ``source`` (up to where a compressed stream breaks)."""
    try:
        return size + sum(len(chunk) for chunk in source)
    except _StreamBroken:
        return size


def _records(path, compression: str | None, stats: ReadStats, skip_corrupt: bool,
             first: int = 0, step: int = 1) -> Generator[bytes, None, int]:
    """The records of :func:`_batches` one by one; returns the number of records seen."""
    if compression is None:
        try:
            compression = detect_compression(path)
        except TFRecordError:
            if not skip_corrupt:
                raise
            compression = ""  # a first frame that fails: the scan counts the file as lost
    else:
        _check_compression(compression)
    with _open(path) as f:
        source = _inflated_chunks(f, compression) if compression else _mapped(f)
        batches = _batches(path, source, stats, skip_corrupt, first, step)
        while True:
            try:
                batch = next(batches)
            except StopIteration as done:
                return done.value
            yield from batch


def read_records(path: str | Path, compression: str | None = None, *, skip_corrupt: bool = False,
                 stats: ReadStats | None = None) -> Iterator[bytes]:
    """The data of each record of ``path``, both CRCs checked. ``compression`` is "", "GZIP" or
    "ZLIB"; None detects it from the first bytes. A corrupt record raises
    :class:`TFRecordError`, or with ``skip_corrupt`` is counted in ``stats`` and skipped
    (module docstring)."""
    return _records(path, compression, ReadStats() if stats is None else stats, skip_corrupt)


def build_index(path: str | Path) -> np.ndarray:
    """(N, 2) int64 rows (offset, frame size) of an uncompressed file's records, CRCs checked."""
    if detect_compression(path):
        raise TFRecordError(f"{path} is compressed; index files address uncompressed files "
                            "only")
    sizes = np.array([HEADER + len(data) + FOOTER for data in _records(path, "", ReadStats(),
                                                                         False)], dtype=np.int64)
    return np.stack([np.cumsum(sizes) - sizes, sizes], axis=1)


def index_path(path: str | Path) -> Path:
    return Path(f"{path}{INDEX_SUFFIX}")


def write_index(index: np.ndarray | list, path: str | Path) -> None:
    """Write rows (offset, frame size) as text lines "offset length"."""
    from mlatlas.core.io import write_text

    write_text(path, "".join(f"{int(o)} {int(n)}\n" for o, n in index))


def read_index(path: str | Path, data_path: str | Path | None = None) -> np.ndarray:
    """Rows (offset, frame size) of an index file. Given the data file, checks that the rows
    tile it from byte 0 to its end (a stale index is refused, not trusted)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise TFRecordError(f"cannot read index {path}: {err.strerror}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise TFRecordError(f"{path}: line {number} is not 'offset length': {line[:60]!r}")
        rows.append((int(fields[0]), int(fields[1])))
    index = np.array(rows, dtype=np.int64).reshape(-1, 2)
    if data_path is not None:
        ends = index[:, 0] + index[:, 1]
        starts = np.concatenate([[0], ends[:-1]])
        size = os.path.getsize(data_path)
        if (index[:, 0] != starts).any() or (len(index) and ends[-1] != size) or (
                not len(index) and size):
            raise TFRecordError(f"{path} does not match {data_path} (stale index? rebuild it "
                                "with build_index)")
    return index


def read_record(path: str | Path, offset: int, length: int, number: int = 0) -> bytes:
    """The data of the record whose frame of ``length`` bytes starts at ``offset`` of an
    uncompressed file (an index row), both CRCs checked; ``number`` names it in errors."""
    with _open(path) as f:
        return _record_at(f, path, offset, length, number)


def _record_at(f, path, offset: int, length: int, number: int) -> bytes:
    framed = os.pread(f.fileno(), length, offset)
    if len(framed) >= HEADER and _LENGTH.unpack_from(framed)[0] + HEADER + FOOTER != length:
        raise TFRecordError(f"{path}: record {number} at byte {offset}: its length does not "
                            f"match the index's {length} bytes (stale index?)")
    for batch in _batches(path, iter([framed]), ReadStats(), False, 0, 1, offset, number):
        return batch[0]
    raise TFRecordError(f"{path}: record {number} at byte {offset}: beyond the end of the file")


def shard_paths(spec: str | Path | Iterable[str | Path]) -> list[Path]:
    """The files of a TFRecord data set: a file, a folder (its files named *.tfrecord*, index
    files aside), a glob pattern, or a list of these; sorted, each once."""
    if isinstance(spec, (str, Path)):
        spec = [spec]
    paths: set[Path] = set()
    for item in spec:
        item = Path(item).expanduser()
        if item.is_dir():
            found = [p for p in item.iterdir() if ".tfrecord" in p.name and p.is_file()]
        elif item.is_file():
            found = [item]
        else:
            found = [Path(p) for p in glob.glob(str(item)) if Path(p).is_file()]
        found = [p for p in found if not p.name.endswith(INDEX_SUFFIX)]
        if not found:
            raise TFRecordError(f"no TFRecord files at {item}")
        paths.update(found)
    return sorted(paths)


def shuffled(records: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: hold ``buffer_size`` records, emit a random one and put the next
    record in its place; at the end, the rest in random order."""
    buffer = []
    for record in records:
        if len(buffer) < buffer_size:
            buffer.append(record)
            continue
        j = rng.randrange(buffer_size)
        yield buffer[j]
        buffer[j] = record
    rng.shuffle(buffer)
    yield from buffer


class TFRecordDataset(torch.utils.data.IterableDataset):
    """The records of TFRecord files, split over DataLoader workers and distributed ranks.

    Shard s = rank x num_workers + worker_id of S = world_size x num_workers reads the global
    records g with g mod S = s (module docstring). Files with an index file beside them
    (``<file>.index``) are read record by record at their offsets; the others are scanned,
    each shard checking the data CRCs of its own records only. ``shuffle_buffer`` > 1 shuffles
    the file order (the same for every shard) and each shard's records through a buffer, both
    drawn from (seed, epoch); call :meth:`set_epoch` before each epoch, as with
    DistributedSampler. ``rank`` and ``world_size`` default to the torch.distributed job's.
    """

    def __init__(self, paths, *, compression: str | None = None, shuffle_buffer: int = 0,
                 seed: int = 0, epoch: int = 0, transform: Callable[[bytes], object] | None = None,
                 skip_corrupt: bool = False, rank: int | None = None,
                 world_size: int | None = None):
        from mlatlas.core import distributed

        self.paths = shard_paths(paths)
        self.compression = None if compression is None else _check_compression(compression)
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, epoch
        self.transform, self.skip_corrupt = transform, skip_corrupt
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise TFRecordError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        self.stats = ReadStats()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, worker_id: int | None = None, num_workers: int | None = None) -> tuple:
        """(s, S) of this process: DataLoader's worker, unless given."""
        if worker_id is None:
            info = torch.utils.data.get_worker_info()
            worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * num_workers + worker_id, self.world_size * num_workers

    def records(self, s: int, S: int) -> Iterator[bytes]:
        """Shard s of S's records, before the shuffle buffer."""
        files = list(self.paths)
        if self.shuffle_buffer > 1:
            random.Random(f"files-{self.seed}-{self.epoch}").shuffle(files)
        g0 = 0  # the global number of each file's first record
        for path in files:
            first = (s - g0) % S
            index = index_path(path)
            if index.is_file() and self.compression in (None, ""):
                rows = read_index(index, path)
                yield from self._indexed(path, rows[first::S], range(first, len(rows), S))
                g0 += len(rows)
            else:
                g0 += yield from _records(path, self.compression, self.stats, self.skip_corrupt,
                                          first, S)

    def _indexed(self, path: Path, rows: np.ndarray, numbers: range) -> Iterator[bytes]:
        with _open(path) as f:
            for (offset, length), k in zip(rows.tolist(), numbers, strict=True):
                try:
                    data = _record_at(f, path, offset, length, k)
                except TFRecordError:
                    if not self.skip_corrupt:
                        raise
                    self.stats.corrupt += 1
                    continue
                self.stats.records += 1
                self.stats.data_bytes += len(data)
                yield data

    def __iter__(self):
        s, S = self.shard()
        records = self.records(s, S)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"buffer-{self.seed}-{self.epoch}-{s}")
            records = shuffled(records, self.shuffle_buffer, rng)
        return map(self.transform, records) if self.transform else records
