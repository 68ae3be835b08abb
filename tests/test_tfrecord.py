"""TFRecord files: CRC-32C against RFC 3720's vectors, round trips, a fuzzed reader, index files,
sharding over workers and ranks, the tfrecord package's files both ways, load_dataset and the
``mlatlas records`` command."""

import json
import os
import random
import struct
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlatlas.cli import main
from mlatlas.data import DatasetError, load_dataset
from mlatlas.data.formats import crc32c as crc
from mlatlas.data.formats import tfrecord as tfr
from mlatlas.data.formats.example import decode_example, encode_example


def write(path, records, compression=""):
    with tfr.TFRecordWriter(path, compression) as writer:
        for record in records:
            writer.write(record)
    return writer


@pytest.fixture(params=[None, 7, 64], ids=["chunk-1MiB", "chunk-7", "chunk-64"])
def chunk(request, monkeypatch):
    """Small chunks make records straddle chunk boundaries (and longer ones span several)."""
    if request.param:
        monkeypatch.setattr(tfr, "CHUNK", request.param)


# ------------------------------------------------------------------------------------ CRC-32C

# RFC 3720, appendix B.4 (iSCSI's CRC32C examples), and the check value of "123456789".
RFC_3720 = [(b"123456789", 0xE3069283), (bytes(32), 0x8A9136AA), (b"\xff" * 32, 0x62A8AB43),
            (bytes(range(32)), 0x46DD794E), (bytes(range(31, -1, -1)), 0x113FDB5C)]


@pytest.mark.parametrize("function", [crc.crc32c, crc.crc32c_python], ids=["c", "python"])
@pytest.mark.parametrize(("data", "expected"), RFC_3720)
def test_crc32c_matches_rfc_3720(function, data, expected):
    assert function(data) == expected


def test_the_c_extension_is_in_use_and_the_fallback_agrees_on_random_bytes():
    import google_crc32c

    assert crc.crc32c is google_crc32c.value
    rng = random.Random(0)
    for size in [0, 1, 7, 8, 9, 63, 64, 65, 1000, 4099]:
        data = rng.randbytes(size)
        assert crc.crc32c_python(data) == crc.crc32c(data)


def test_mask_round_trips_on_ints_and_arrays():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)
    masked = crc.mask(values)
    assert masked.dtype == np.uint32
    assert [crc.unmask(int(m)) for m in masked] == values.tolist()
    assert [crc.mask(int(v)) for v in values] == masked.tolist()
    # The definition: a 17-bit rotation to the left plus 0xa282ead8, modulo 2^32.
    assert crc.mask(1) == (1 << 17) + 0xA282EAD8
    assert crc.mask(1 << 15) == 1 + 0xA282EAD8
    assert crc.mask(0xFFFFFFFF) == (0xFFFFFFFF + 0xA282EAD8) % 2**32


def test_masked_crc_equals_the_tfrecord_packages():
    from tfrecord.writer import TFRecordWriter as PeerWriter

    for data in [b"", b"123456789", bytes(range(256)) * 3]:
        assert struct.pack("<I", crc.masked_crc32c(data)) == PeerWriter.masked_crc(data)


def test_the_python_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(crc, "_warned", False)
    with pytest.warns(RuntimeWarning, match="pure Python"):
        assert crc._crc32c_python_warned(b"123456789") == 0xE3069283
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crc._crc32c_python_warned(b"abc")


# --------------------------------------------------------------------------------- round trips

def test_frame_layout_by_hand():
    data = b"hello"
    framed = tfr.frame(data)
    assert len(framed) == 8 + 4 + 5 + 4
    assert framed[:8] == b"\x05" + bytes(7)  # uint64 little endian
    assert framed[8:12] == struct.pack("<I", crc.mask(crc.crc32c(framed[:8])))
    assert framed[12:17] == data
    assert framed[17:] == struct.pack("<I", crc.mask(crc.crc32c(data)))


records_strategy = st.lists(st.binary(max_size=200), max_size=25)


@settings(max_examples=60, deadline=None)
@given(records=records_strategy, compression=st.sampled_from(tfr.COMPRESSIONS),
       chunk_size=st.sampled_from([tfr.CHUNK, 5, 40]))
def test_round_trip(tmp_path_factory, records, compression, chunk_size):
    path = tmp_path_factory.mktemp("rt") / "f.tfrecord"
    writer = write(path, records, compression)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfr, "CHUNK", chunk_size)
        assert list(tfr.read_records(path)) == records  # compression detected
        stats = tfr.ReadStats()
        assert list(tfr.read_records(path, compression, stats=stats)) == records
    assert (stats.records, stats.data_bytes, stats.corrupt) == (len(records),
                                                                 sum(map(len, records)), 0)
    assert tfr.detect_compression(path) == compression
    if not compression:
        assert writer.index == [(o, n) for o, n in tfr.build_index(path).tolist()]


@settings(max_examples=40, deadline=None)
@given(records=st.lists(st.sampled_from([b"", b"abc", b"xyz", b"q" * 50]), max_size=150),
       chunk_size=st.sampled_from([tfr.CHUNK, 30, 200]), step=st.integers(1, 4),
       data=st.data())
def test_runs_of_equal_lengths_and_every_shard_of_a_scan(tmp_path_factory, records, chunk_size,
                                                          step, data):
    """Few distinct lengths make long runs, their ends and window ends fall anywhere."""
    first = data.draw(st.integers(0, step - 1))
    path = tmp_path_factory.mktemp("runs") / "f.tfrecord"
    write(path, records)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfr, "CHUNK", chunk_size)
        scan = tfr._records(path, "", tfr.ReadStats(), False, first, step)
        got = []
        while True:
            try:
                got.append(next(scan))
            except StopIteration as done:
                assert done.value == len(records)  # every record seen, its own or not
                break
    assert got == records[first::step]


def test_uniform_runs_and_long_records(tmp_path, chunk):
    # Equal lengths trigger the vectorised walk; a change of length must end it exactly there.
    records = ([b"a" * 10] * 50 + [b"b" * 11] + [b"c" * 10] * 30 + [os.urandom(3000)]
               + [b""] * 20 + [os.urandom(2_500_000)])
    for compression in tfr.COMPRESSIONS:
        path = tmp_path / f"u{compression}.tfrecord"
        write(path, records, compression)
        assert list(tfr.read_records(path, compression)) == records


def test_records_of_one_length_and_a_corrupt_one_among_them(tmp_path, chunk):
    # Windows of equal lengths are sliced by one struct call; a bad CRC must still be found.
    records = [bytes([i % 256]) * 33 for i in range(300)]
    path = tmp_path / "same.tfrecord"
    offsets = [o for o, _ in write(path, records).index]
    assert list(tfr.read_records(path)) == records
    raw = bytearray(path.read_bytes())
    raw[offsets[201] + 12 + 32] ^= 0x80
    path.write_bytes(bytes(raw))
    with pytest.raises(tfr.TFRecordError, match=f"record 201 at byte {offsets[201]}: its data"):
        list(tfr.read_records(path))
    stats = tfr.ReadStats()
    assert list(tfr.read_records(path, skip_corrupt=True, stats=stats)) == \
        records[:201] + records[202:]
    assert (stats.records, stats.data_bytes, stats.corrupt) == (299, 299 * 33, 1)


def test_empty_file_and_unknown_compression(tmp_path):
    path = tmp_path / "empty.tfrecord"
    path.write_bytes(b"")
    assert list(tfr.read_records(path)) == []
    with pytest.raises(tfr.TFRecordError, match="unknown compression 'gzip'"):
        tfr.TFRecordWriter(tmp_path / "x.tfrecord", "gzip")
    with pytest.raises(tfr.TFRecordError, match="cannot read .*missing"):
        list(tfr.read_records(tmp_path / "missing.tfrecord"))


# --------------------------------------------------------------------------------- corruption

def test_a_corrupt_data_crc_names_file_record_and_offset_or_is_skipped(tmp_path, chunk):
    records = [bytes([i]) * (10 + i) for i in range(8)]
    path = tmp_path / "f.tfrecord"
    offsets = [o for o, _ in write(path, records).index]
    raw = bytearray(path.read_bytes())
    raw[offsets[3] + 12 + 2] ^= 0x10  # a data byte of record 3
    path.write_bytes(bytes(raw))
    with pytest.raises(tfr.TFRecordError, match=rf"f.tfrecord: record 3 at byte {offsets[3]}: "
                                                 "its data fails its CRC"):
        list(tfr.read_records(path))
    got = []
    with pytest.raises(tfr.TFRecordError):  # the records before it came out first
        for record in tfr.read_records(path):
            got.append(record)
    assert got == records[:3]
    stats = tfr.ReadStats()
    assert list(tfr.read_records(path, skip_corrupt=True, stats=stats)) == \
        records[:3] + records[4:]
    assert (stats.records, stats.corrupt, stats.lost_bytes) == (7, 1, 0)


def test_a_corrupt_length_stops_the_file_and_counts_the_rest_as_lost(tmp_path, chunk):
    records = [bytes([i]) * (10 + i) for i in range(8)]
    path = tmp_path / "f.tfrecord"
    offsets = [o for o, _ in write(path, records).index]
    raw = bytearray(path.read_bytes())
    raw[offsets[5] + 1] ^= 0x01  # the length of record 5
    path.write_bytes(bytes(raw))
    with pytest.raises(tfr.TFRecordError, match=rf"record 5 at byte {offsets[5]}: its length "
                                                 "fails its CRC"):
        list(tfr.read_records(path, ""))
    stats = tfr.ReadStats()
    assert list(tfr.read_records(path, "", skip_corrupt=True, stats=stats)) == records[:5]
    assert (stats.corrupt, stats.lost_bytes) == (1, len(raw) - offsets[5])


@pytest.mark.parametrize("cut", [3, 12, 20])
def test_truncation_is_an_error(tmp_path, cut):
    path = tmp_path / "f.tfrecord"
    write(path, [b"x" * 10, b"y" * 10])
    raw = path.read_bytes()
    path.write_bytes(raw[:26 + cut])  # the second record cut after `cut` bytes
    with pytest.raises(tfr.TFRecordError, match="record 1 at byte 26: truncated"):
        list(tfr.read_records(path, ""))


@pytest.mark.parametrize("compression", ["GZIP", "ZLIB"])
def test_a_broken_or_cut_compressed_stream_is_an_error(tmp_path, compression):
    path = tmp_path / "f.tfrecord"
    write(path, [os.urandom(100) for _ in range(20)], compression)
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(tfr.TFRecordError, match=f"{compression} stream cut short"):
        list(tfr.read_records(path, compression))
    path.write_bytes(raw + b"junk")
    with pytest.raises(tfr.TFRecordError, match="bytes after the end"):
        list(tfr.read_records(path, compression))


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """One damage of a file: bit flips, a truncation, garbage appended or prepended."""
    kind = rng.choice(["flip", "flip", "truncate", "append", "prepend"])
    if kind == "flip" and raw:
        out = bytearray(raw)
        for _ in range(rng.choice([1, 1, 2, 3])):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "truncate" and raw:
        return raw[:rng.randrange(len(raw))]
    garbage = rng.randbytes(rng.randint(1, 40))
    return raw + garbage if kind == "append" else garbage + raw


def fuzz(tmp_path, cases: int, seed: int = 0) -> dict:
    """Damaged files read strictly and with skip_corrupt. Strictly, each yields exactly the
    original records or raises TFRecordError; skipping, what comes out is the originals in
    order, less some, and anything less is counted as corrupt. The one damage the format cannot
    show is a cut at a record boundary: a valid, shorter uncompressed file, or an empty file
    read with its compression detected (``cut``), which must read as exactly the records before
    the cut."""
    rng = random.Random(seed)
    counts = {"cases": 0, "raised": 0, "intact": 0, "cut": 0, "wrong": 0}
    path = tmp_path / "fuzz.tfrecord"
    for case in range(cases):
        compression = tfr.COMPRESSIONS[case % 3]
        records = [rng.randbytes(rng.randint(0, 60)) for _ in range(rng.randint(1, 12))]
        write(path, records, compression)
        damaged = mutate(path.read_bytes(), rng)
        path.write_bytes(damaged)
        frames = [b"".join(map(tfr.frame, records[:m])) for m in range(len(records))]
        expected = records[:frames.index(damaged)] if not compression and damaged in frames \
            else records
        asked = rng.choice([None, compression])
        if asked is None and not damaged:  # an empty file is an empty uncompressed one
            expected = []
        got = []
        try:
            for record in tfr.read_records(path, asked):
                got.append(record)
            counts["intact" if expected is records else "cut"] += 1
            counts["wrong"] += got != expected
        except tfr.TFRecordError:
            counts["raised"] += 1
            counts["wrong"] += got != records[:len(got)]
        stats = tfr.ReadStats()
        kept = list(tfr.read_records(path, compression, skip_corrupt=True, stats=stats))
        it = iter(records)
        in_order = all(any(r == k for r in it) for k in kept)
        counts["wrong"] += not in_order or (kept != records and not stats.corrupt
                                            and kept != expected)
        counts["cases"] += 1
    return counts


def test_fuzzed_files_never_yield_a_wrong_record(tmp_path):
    counts = fuzz(tmp_path, 1500)
    assert counts["wrong"] == 0, counts
    assert counts["raised"] + counts["intact"] + counts["cut"] == counts["cases"] == 1500
    assert counts["raised"] > 1400  # damage almost always shows; intact: e.g. a gzip mtime flip


@pytest.mark.slow
def test_fuzzed_files_never_yield_a_wrong_record_many(tmp_path):
    counts = fuzz(tmp_path, 20_000, seed=1)
    print(counts)
    assert counts["wrong"] == 0, counts


def test_a_cut_at_a_record_boundary_shows_against_the_index(tmp_path):
    path = tmp_path / "f.tfrecord"
    writer = write(path, [b"a" * 10, b"b" * 10, b"c" * 10])
    tfr.write_index(writer.index, tfr.index_path(path))
    path.write_bytes(path.read_bytes()[:52])
    assert list(tfr.read_records(path)) == [b"a" * 10, b"b" * 10]  # valid, as TensorFlow reads it
    with pytest.raises(tfr.TFRecordError, match="does not match"):
        list(tfr.TFRecordDataset(path, rank=0, world_size=1))


# ------------------------------------------------------------------------------------ indices

def test_index_files_match_the_tfrecord_packages_and_give_random_access(tmp_path):
    from tfrecord.tools.tfrecord2idx import create_index

    records = [os.urandom(n) for n in [0, 5, 300, 17, 2000]]
    path = tmp_path / "f.tfrecord"
    writer = write(path, records)
    index = tfr.build_index(path)
    assert index.tolist() == [list(row) for row in writer.index]
    tfr.write_index(index, tfr.index_path(path))
    create_index(str(path), str(tmp_path / "peer.index"))
    assert tfr.index_path(path).read_text() == (tmp_path / "peer.index").read_text()
    rows = tfr.read_index(tfr.index_path(path), path)
    for k in [3, 0, 4, 1, 2]:
        assert tfr.read_record(path, *rows[k].tolist(), number=k) == records[k]


def test_a_stale_or_bad_index_is_refused(tmp_path):
    path = tmp_path / "f.tfrecord"
    writer = write(path, [b"a" * 10, b"b" * 20])
    tfr.write_index(writer.index, tfr.index_path(path))
    with open(path, "ab") as f:
        f.write(tfr.frame(b"appended"))
    with pytest.raises(tfr.TFRecordError, match="does not match .*stale index"):
        tfr.read_index(tfr.index_path(path), path)
    with pytest.raises(tfr.TFRecordError, match="record 1 at byte 26: its length does not match"):
        tfr.read_record(path, 26, 99, number=1)
    (tmp_path / "bad.index").write_text("0 26\n26 x\n")
    with pytest.raises(tfr.TFRecordError, match="line 2 is not 'offset length'"):
        tfr.read_index(tmp_path / "bad.index")
    write(tmp_path / "g.tfrecord", [b"x"], "GZIP")
    with pytest.raises(tfr.TFRecordError, match="compressed"):
        tfr.build_index(tmp_path / "g.tfrecord")


# ----------------------------------------------------------------------------------- sharding

@pytest.fixture
def shard_files(tmp_path):
    """Five files of 0-23 records, the uncompressed ones with index files, one GZIP, one
    ZLIB; every record unique."""
    sizes = {"a": 23, "b": 0, "c": 7, "d": 11, "e": 1}
    compression = {"c": "GZIP", "e": "ZLIB"}
    for name, n in sizes.items():
        path = tmp_path / f"{name}.tfrecord"
        writer = write(path, [f"{name}{j}".encode() for j in range(n)], compression.get(name, ""))
        if name in ("a", "b"):
            tfr.write_index(writer.index, tfr.index_path(path))
    return tmp_path, sorted(f"{name}{j}".encode() for name, n in sizes.items() for j in range(n))


@pytest.mark.parametrize("workers", [2, 3, 4])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [0, 5])
def test_shards_cover_every_record_exactly_once(shard_files, workers, world, shuffle):
    folder, everything = shard_files
    seen = []
    for rank in range(world):
        dataset = tfr.TFRecordDataset(folder, rank=rank, world_size=world,
                                      shuffle_buffer=shuffle, seed=3, epoch=1)
        shards = [list(dataset.records(*dataset.shard(w, workers))) for w in range(workers)]
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        seen += [r for shard in shards for r in shard]
    assert sorted(seen) == everything


def test_indexed_and_scanned_files_give_the_same_shards(shard_files, tmp_path):
    folder, _ = shard_files
    plain = folder / "plain"
    plain.mkdir()
    records = [f"r{j}".encode() for j in range(30)]
    write(plain / "x.tfrecord", records)
    scanned = tfr.TFRecordDataset(plain, rank=1, world_size=2)
    got = list(scanned.records(*scanned.shard(1, 3)))
    tfr.write_index(tfr.build_index(plain / "x.tfrecord"), tfr.index_path(plain / "x.tfrecord"))
    indexed = tfr.TFRecordDataset(plain, rank=1, world_size=2)
    assert list(indexed.records(*indexed.shard(1, 3))) == got == records[4::6]


def test_shuffle_is_seeded_and_differs_by_epoch(shard_files):
    folder, everything = shard_files

    def order(seed, epoch):
        return list(tfr.TFRecordDataset(folder, shuffle_buffer=8, seed=seed, epoch=epoch,
                                        rank=0, world_size=1))

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) != order(1, 1)
    assert sorted(order(0, 1)) == everything
    dataset = tfr.TFRecordDataset(folder, shuffle_buffer=8, rank=0, world_size=1)
    dataset.set_epoch(1)
    assert list(dataset) == order(0, 1)


def test_the_shuffle_buffer_is_a_permutation():
    rng = random.Random(0)
    for n, size in [(0, 4), (3, 10), (100, 7), (50, 50)]:
        assert sorted(tfr.shuffled(range(n), size, rng)) == list(range(n))


def test_dataloader_workers_split_the_records(shard_files):
    folder, everything = shard_files
    dataset = tfr.TFRecordDataset(folder, rank=0, world_size=1, transform=bytes.upper)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    assert sorted(loader) == [r.upper() for r in everything]


def test_the_rank_defaults_to_the_distributed_job_and_is_checked(shard_files):
    folder, _ = shard_files
    dataset = tfr.TFRecordDataset(folder)
    assert (dataset.rank, dataset.world_size) == (0, 1)
    with pytest.raises(tfr.TFRecordError, match="rank 2 is outside 0..1"):
        tfr.TFRecordDataset(folder, rank=2, world_size=2)


def test_a_corrupt_record_is_counted_by_the_shard_that_owns_it(tmp_path):
    path = tmp_path / "f.tfrecord"
    offsets = [o for o, _ in write(path, [bytes([i]) * 9 for i in range(10)]).index]
    raw = bytearray(path.read_bytes())
    raw[offsets[4] + 13] ^= 1
    path.write_bytes(bytes(raw))
    kept, corrupt = [], 0
    for w in range(3):
        dataset = tfr.TFRecordDataset(path, skip_corrupt=True, rank=0, world_size=1)
        kept += dataset.records(*dataset.shard(w, 3))
        corrupt += dataset.stats.corrupt
    assert sorted(kept) == [bytes([i]) * 9 for i in range(10) if i != 4] and corrupt == 1


# --------------------------------------------------------------------- the tfrecord package

def test_the_tfrecord_packages_files_read_back_here_byte_for_byte(tmp_path):
    from tfrecord.writer import TFRecordWriter as PeerWriter

    path = tmp_path / "peer.tfrecord"
    peer = PeerWriter(str(path))
    features = [{"x": (os.urandom(30), "byte"), "y": ([i, -i], "int"), "f": (0.5 * i, "float")}
                for i in range(20)]
    for datum in features:
        peer.write(datum)
    peer.close()
    records = list(tfr.read_records(path))
    assert [decode_example(r)["y"] for r in records] == [[i, -i] for i in range(20)]
    assert [decode_example(r)["x"] for r in records] == [[d["x"][0]] for d in features]
    write(tmp_path / "ours.tfrecord", records)
    assert (tmp_path / "ours.tfrecord").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("compression", ["", "GZIP"])  # the tfrecord package reads no ZLIB
def test_files_written_here_read_back_in_the_tfrecord_package(tmp_path, compression):
    from tfrecord.reader import tfrecord_iterator, tfrecord_loader

    path = tmp_path / "ours.tfrecord"
    examples = [{"x": os.urandom(16), "y": [i], "name": f"n{i}"} for i in range(15)]
    write(path, [encode_example(e) for e in examples], compression)
    kind = compression.lower() or None
    raw = [bytes(r) for r in tfrecord_iterator(str(path), compression_type=kind)]
    assert raw == [encode_example(e) for e in examples]
    parsed = list(tfrecord_loader(str(path), None, compression_type=kind))
    assert [bytes(p["x"]) for p in parsed] == [e["x"] for e in examples]
    assert [p["y"].tolist() for p in parsed] == [e["y"] for e in examples]
    if not compression:  # and it shards by our index file
        tfr.write_index(tfr.build_index(path), tfr.index_path(path))
        halves = [[bytes(r) for r in tfrecord_iterator(str(path), str(tfr.index_path(path)),
                                                         shard=(i, 2))] for i in range(2)]
        assert halves[0] + halves[1] == raw


# ------------------------------------------------------------------------------- load_dataset

def image_examples(n, rng, labels=True, dtype=np.uint8):
    images = rng.integers(0, 256, (n, 6, 5, 3)).astype(dtype)
    if dtype != np.uint8:
        images = images / 255.0
    out = [{"x": img.astype(dtype if dtype == np.uint8 else "<f4").tobytes(),
            "shape": list(img.shape)} | ({"y": i % 4} if labels else {})
           for i, img in enumerate(images)]
    return images, out


def test_load_dataset_reads_images_and_labels_from_shards(tmp_path):
    rng = np.random.default_rng(0)
    images, examples = image_examples(40, rng)
    for s in range(2):
        write(tmp_path / f"part-{s}.tfrecord", [encode_example(e) for e in examples[s::2]],
              "GZIP" if s else "")
    ds = load_dataset(str(tmp_path))
    assert ds.kind == "image" and ds.sample_shape == (3, 6, 5) and ds.classes == tuple("0123")
    order = np.concatenate([np.arange(0, 40, 2), np.arange(1, 40, 2)])  # file by file
    x = torch.cat([ds.x_train, ds.x_test])
    y = torch.cat([ds.y_train, ds.y_test])
    expected = torch.as_tensor(images[order].transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32)
    # The held-out split permutes the samples; each (image, label) pair must survive it.
    pairs = {(tuple(e.flatten().tolist()), i % 4) for e, i in zip(expected, order, strict=True)}
    assert {(tuple(a.flatten().tolist()), int(b)) for a, b in zip(x, y, strict=True)} == pairs
    assert load_dataset(str(tmp_path / "part-*.tfrecord")).x_train.shape == ds.x_train.shape


def test_load_dataset_reads_float32_bytes_and_float_lists(tmp_path):
    rng = np.random.default_rng(1)
    images, examples = image_examples(12, rng, labels=False, dtype=np.float32)
    write(tmp_path / "img.tfrecord", [encode_example(e) for e in examples])
    ds = load_dataset(str(tmp_path / "img.tfrecord"))
    assert ds.y_train is None and ds.sample_shape == (3, 6, 5)
    got = sorted(tuple(v.flatten().tolist()) for v in torch.cat([ds.x_train, ds.x_test]))
    want = sorted(tuple(torch.tensor(i.transpose(2, 0, 1), dtype=torch.float32).flatten()
                        .tolist()) for i in images)
    assert got == want
    points = rng.normal(size=(20, 3)).astype(np.float32)
    write(tmp_path / "pts.tfrecord", [encode_example({"x": p}) for p in points])
    ds = load_dataset(str(tmp_path / "pts.tfrecord"))
    assert ds.kind == "points" and ds.sample_shape == (3,)
    assert sorted(map(tuple, torch.cat([ds.x_train, ds.x_test]).tolist())) == \
        sorted(map(tuple, points.tolist()))


@pytest.mark.parametrize(("example", "message"), [
    ({"y": 1}, "record 0: no feature 'x'"),
    ({"x": b"abc"}, "a bytes 'x' is one value with an int64 'shape'"),
    ({"x": b"abcde", "shape": [2, 2]}, "holds 5 bytes, neither uint8 \\(4\\) nor float32"),
    ({"x": [1, 2], "shape": [2]}, "'x' is an int64 list"),
    ({"x": b"abcd", "shape": [2, 2], "y": [1, 2]}, "'y' must be one int64 label"),
    ({"x": b"abcd", "shape": [2, 0]}, "'shape' must be an int64 list of positive sizes"),
])
def test_load_dataset_names_the_record_of_a_bad_example(tmp_path, example, message):
    good = {"x": b"abcd", "shape": [2, 2]}
    write(tmp_path / "bad.tfrecord", [encode_example(example), encode_example(good)])
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(tmp_path / "bad.tfrecord"))


def test_load_dataset_refuses_mixed_shapes_and_corrupt_files(tmp_path):
    path = tmp_path / "mixed.tfrecord"
    write(path, [encode_example({"x": b"abcd", "shape": [4]}),
                 encode_example({"x": b"abcdef", "shape": [6]})])
    with pytest.raises(DatasetError, match="record 1: its x has shape \\(6,\\)"):
        load_dataset(str(path))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DatasetError, match="record 1 at byte .*truncated"):
        load_dataset(str(path))


# -------------------------------------------------------------------------------------- CLI

def test_records_write_show_verify_from_npy(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (30, 4, 4)).astype(np.uint8)
    np.save(tmp_path / "img.npy", images)
    out = tmp_path / "shards"
    assert main(["records", "write", str(tmp_path / "img.npy"), str(out), "--shards", "3",
                 "--no-progress"]) == 0
    files = sorted(out.glob("*.tfrecord"))
    assert [f.name for f in files] == [f"part-0000{i}-of-00003.tfrecord" for i in range(3)]
    # Record i went to shard i mod 3, with an index file beside each shard.
    for s, f in enumerate(files):
        decoded = [decode_example(r) for r in tfr.read_records(f)]
        assert [d["x"][0] for d in decoded] == [img.tobytes() for img in images[s::3]]
        assert tfr.read_index(tfr.index_path(f), f).tolist() == tfr.build_index(f).tolist()
    capsys.readouterr()
    assert main(["records", "show", str(files[1]), "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["shape"] == [4, 4]
    assert main(["records", "verify", *map(str, files)]) == 0
    size = sum(len(encode_example({"x": img.tobytes(), "shape": [4, 4]})) for img in images[::3])
    assert capsys.readouterr().out.splitlines()[0] == f"{files[0]}: 10 records, {size} bytes, " \
        "0 corrupt"
    assert load_dataset(str(out)).sample_shape == (1, 4, 4)


def test_records_verify_counts_corruption_and_fails(tmp_path, capsys):
    path = tmp_path / "f.tfrecord"
    offsets = [o for o, _ in write(path, [b"a" * 10, b"b" * 10, b"c" * 10]).index]
    raw = bytearray(path.read_bytes())
    raw[offsets[1] + 14] ^= 4
    path.write_bytes(bytes(raw))
    assert main(["records", "verify", str(path)]) == 1
    assert capsys.readouterr().out.strip() == f"{path}: 2 records, 20 bytes, 1 corrupt"
    assert main(["records", "show", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mlatlas records: error: {path}: record 1 at byte {offsets[1]}: its data "
                   "fails its CRC"]
    assert main(["records", "show", str(path), "--skip-corrupt"]) == 0
    shown = capsys.readouterr()
    assert [json.loads(line)["bytes"] for line in shown.out.splitlines()] == [10, 10]
    assert shown.err.strip() == "mlatlas records: skipped 1 corrupt records"


def test_records_verify_counts_a_file_whose_first_frame_fails(tmp_path, capsys):
    path = tmp_path / "junk.tfrecord"
    path.write_bytes(bytes(range(40)))
    assert main(["records", "verify", str(path)]) == 1
    assert capsys.readouterr().out.strip() == \
        f"{path}: 0 records, 0 bytes, 1 corrupt, 40 bytes unreadable after it"
    with pytest.raises(tfr.TFRecordError, match="record 0 at byte 0: not a TFRecord file"):
        list(tfr.read_records(path))


def test_records_write_from_jsonl_and_image_folder(tmp_path, capsys):
    from PIL import Image

    lines = [{"text": "héllo", "n": [1, 2], "p": 0.5}, {"text": "b", "n": [], "p": 1.5}]
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    assert main(["records", "write", str(tmp_path / "d.jsonl"), str(tmp_path / "js"),
                 "--compression", "gzip"]) == 0
    [path] = (tmp_path / "js").glob("*.tfrecord")
    assert tfr.detect_compression(path) == "GZIP"
    assert not tfr.index_path(path).exists()  # index files address uncompressed files only
    capsys.readouterr()
    assert main(["records", "show", str(path)]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert shown == [{"n": [1, 2], "p": [0.5], "text": ["héllo"]},
                     {"n": [], "p": [1.5], "text": ["b"]}]
    for cls in ("cat", "dog"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((5, 7, 3), 40 * i, np.uint8)).save(
                tmp_path / "img" / cls / f"{i}.png")
    assert main(["records", "write", str(tmp_path / "img"), str(tmp_path / "im"),
                 "--shards", "2"]) == 0
    ds = load_dataset(str(tmp_path / "im"))
    assert ds.sample_shape == (3, 5, 7) and ds.classes == ("0", "1")
    assert sorted(torch.cat([ds.y_train, ds.y_test]).tolist()) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(("argv", "message"), [
    (["records", "write", "SRC.txt", "OUT"], "reads a .npy file, an image folder or a .jsonl"),
    (["records", "write", "SRC.npy", "OUT", "--shards", "0"], "--shards must be in 1..100000"),
    (["records", "write", "SRC.npy", "OUT", "--compression", "lz4"], "invalid choice: 'lz4'"),
    (["records", "show", "missing.tfrecord"], "cannot read missing.tfrecord"),
    (["records", "verify"], "the following arguments are required: files"),
    (["records", "shwo", "x"], "invalid choice: 'shwo'"),
])
def test_records_bad_input_is_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "SRC.npy", np.zeros((3, 2), np.float32))
    assert main(argv) in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_records_write_refuses_a_folder_with_other_shards(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((4, 2), np.float32))
    assert main(["records", "write", str(tmp_path / "a.npy"), str(tmp_path / "o"),
                 "--shards", "2"]) == 0
    assert main(["records", "write", str(tmp_path / "a.npy"), str(tmp_path / "o")]) == 2
    assert "already holds other TFRecord files" in capsys.readouterr().err
    (tmp_path / "j.jsonl").write_text('{"a": {"nested": 1}}\n')
    assert main(["records", "write", str(tmp_path / "j.jsonl"), str(tmp_path / "j")]) == 2
    assert "j.jsonl: example 0: feature 'a'" in capsys.readouterr().err
    assert not list((tmp_path / "j").iterdir())  # nothing half-written is left
