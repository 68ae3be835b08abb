"""Reading TFRecord files: ours (both CRCs of every record checked) beside the ``tfrecord``
package's reader (checks no CRC) and TensorFlow's ``tf.data.TFRecordDataset`` (checks both).

    python benchmarks/tfrecord_read.py [--repeats 3] [--scale 1.0]
    .venv-openclip/bin/python benchmarks/tfrecord_read.py   # with TensorFlow

Each case writes one file of random records (our writer) to a temporary folder, then each
reader reads all of it in a process of its own (the ``tfrecord`` package and TensorFlow cannot
share one: both register the Example protos), the best of ``--repeats`` runs kept. Ours yields
each record's bytes; ``tfrecord.reader.tfrecord_iterator`` yields a memoryview into one reused
buffer (no copy, so it does less than ours); TensorFlow is iterated eagerly (``for x in ds``, one
tensor a record) and batched by 1024 inside its graph (``ds.batch(1024)``, one tensor a batch).
Cases: uniform records of 100 B, 1 KiB and 100 KiB (as fixed-shape arrays give), records of
uniformly random sizes 0-2 KiB, and the 1 KiB records under GZIP (the ``tfrecord`` package
reads no ZLIB). Printed: records/s and MB/s (10^6 bytes of record data a second) of each,
and our speed over each other's. Goals: >= 3x the tfrecord package, >= 0.5x TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mlatlas.data.formats.tfrecord import TFRecordWriter, read_records

# (name, number of records, size of each: an int, or (low, high) for uniform random sizes)
CASES = [("100 B", 200_000, 100), ("1 KiB", 50_000, 1024), ("0-2 KiB", 50_000, (0, 2048)),
         ("100 KiB", 500, 100 * 1024), ("1 KiB GZIP", 50_000, 1024)]


def write_case(path: Path, n: int, size, compression: str, rng: np.random.Generator) -> int:
    sizes = np.full(n, size) if isinstance(size, int) else rng.integers(*size, n, endpoint=True)
    # Half random, half zero bytes: GZIP then has something to compress.
    with TFRecordWriter(path, compression) as writer:
        for s in sizes:
            writer.write(rng.bytes(s // 2) + bytes(s - s // 2))
    return int(sizes.sum())


def ours(path: Path, compression: str) -> int:
    return sum(1 for _ in read_records(path, compression))


def tfrecord_package(path: Path, compression: str) -> int:
    from tfrecord.reader import tfrecord_iterator

    return sum(1 for _ in tfrecord_iterator(str(path), compression_type=compression.lower()
                                            or None))


def tensorflow_eager(path: Path, compression: str) -> int:
    import tensorflow as tf

    return sum(1 for _ in tf.data.TFRecordDataset(str(path), compression_type=compression))


def tensorflow_batched(path: Path, compression: str) -> int:
    import tensorflow as tf

    dataset = tf.data.TFRecordDataset(str(path), compression_type=compression).batch(1024)
    return sum(len(batch) for batch in dataset)


def best_time(read, path: Path, compression: str, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        count = read(path, compression)
        times.append(time.perf_counter() - t0)
        assert count == n, f"{read.__name__} read {count} of {n} records"
    return min(times)


READERS = {"ours": ours, "tfrecord": tfrecord_package, "tf eager": tensorflow_eager,
           "tf batched": tensorflow_batched}


def time_in_subprocess(label: str, path: Path, compression: str, n: int, repeats: int) -> float:
    job = json.dumps([label, str(path), compression, n, repeats])
    out = subprocess.run([sys.executable, __file__, "--time", job], capture_output=True,
                         text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every case's number of records")
    parser.add_argument("--time", help=argparse.SUPPRESS)  # one reader's timing, in a subprocess
    args = parser.parse_args()
    if args.time:
        label, path, compression, n, repeats = json.loads(args.time)
        print(best_time(READERS[label], Path(path), compression, n, repeats))
        return
    labels = ["ours", "tfrecord"]
    try:
        import tensorflow  # noqa: F401

        labels += ["tf eager", "tf batched"]
    except ImportError:
        print("TensorFlow is not importable: its rows are left out")
    rng = np.random.default_rng(0)
    print(f"{'case':11s} {'reader':11s} {'records/s':>11s} {'MB/s':>8s} {'ours / it':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, size in CASES:
            n = max(1, int(n * args.scale))
            compression = "GZIP" if "GZIP" in name else ""
            path = Path(tmp) / "case.tfrecord"
            data_bytes = write_case(path, n, size, compression, rng)
            seconds = {label: time_in_subprocess(label, path, compression, n, args.repeats)
                       for label in labels}
            for label, s in seconds.items():
                print(f"{name:11s} {label:11s} {n / s:11,.0f} {data_bytes / s / 1e6:8.1f} "
                      f"{s / seconds['ours']:9.2f}", flush=True)
            os.remove(path)


if __name__ == "__main__":
    main()
