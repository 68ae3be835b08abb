"""Text corpora for language models, each with a fixed train / held-out split.

Nothing is downloaded. A corpus comes back as a :class:`Corpus`: its name and two texts, lines
separated by ``\\n`` (``\\r\\n`` is read as ``\\n``), for training and for held-out scoring.

=========  ====================================================================================
spec       source and split
=========  ====================================================================================
pydoc      the English help text of Python's standard library (``pydoc_data.topics.topics``,
           in every CPython): the topics joined in sorted key order, 464,970 characters and
           11,374 lines in CPython 3.11; lines are taken in blocks of 100 and the last 10 of
           every block (line index mod 100 >= 90) are held out, so both splits cover every topic
fortunes   Debian's fortune cookies (``/usr/share/games/fortunes``, package ``fortunes``, or
           ``MLATLAS_FORTUNES_DIR``): the fortunes of every file in sorted file order, every
           10th fortune (index mod 10 == 9) held out
a path     a UTF-8 text file: the last 10% of its lines (at least one) held out
=========  ====================================================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlatlas.core.config import closest
from mlatlas.data import DatasetError

NAMED = ("pydoc", "fortunes")
FORTUNES_DIR = "/usr/share/games/fortunes"


@dataclass(frozen=True)
class Corpus:
    """A corpus: ``train`` and ``test`` are texts of whole lines, each ending with ``\\n``."""

    name: str
    train: str
    test: str

    @property
    def train_lines(self) -> list[str]:
        return split_lines(self.train)

    @property
    def test_lines(self) -> list[str]:
        return split_lines(self.test)


def split_lines(text: str) -> list[str]:
    """The lines of ``text`` (split at ``\\n`` only, unlike ``str.splitlines``; a final newline
    ends the last line rather than starting an empty one)."""
    text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _join(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def load_pydoc() -> Corpus:
    from pydoc_data.topics import topics

    lines = split_lines("".join(topics[key] for key in sorted(topics)))
    train = [line for i, line in enumerate(lines) if i % 100 < 90]
    test = [line for i, line in enumerate(lines) if i % 100 >= 90]
    return Corpus("pydoc", _join(train), _join(test))


def load_fortunes(root: str | Path | None = None) -> Corpus:
    root = Path(root or os.environ.get("MLATLAS_FORTUNES_DIR", FORTUNES_DIR))
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8")
                   ) if root.is_dir() else []
    if not files:
        raise DatasetError(
            f"fortunes is not installed (no fortune files in {root}); install Debian's package "
            "with `sudo apt-get install fortunes`, or point MLATLAS_FORTUNES_DIR at a folder of "
            "fortune files")
    fortunes: list[list[str]] = []
    for path in files:
        current: list[str] = []
        for line in split_lines(read_text(path)):
            if line == "%":
                if current:
                    fortunes.append(current)
                current = []
            else:
                current.append(line)
        if current:
            fortunes.append(current)
    train = [line for i, f in enumerate(fortunes) if i % 10 != 9 for line in f]
    test = [line for i, f in enumerate(fortunes) if i % 10 == 9 for line in f]
    if not train or not test:
        raise DatasetError(f"{root} holds {len(fortunes)} fortunes; at least 10 are needed for "
                           "a held-out split")
    return Corpus("fortunes", _join(train), _join(test))


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file; a DatasetError naming the file if it cannot be read."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not UTF-8 text (byte {err.start} is "
                           f"0x{data[err.start]:02x})") from None


def load_text_file(path: str | Path) -> Corpus:
    """A user's text file: the last 10% of its lines (at least one) are held out."""
    path = Path(path)
    lines = split_lines(read_text(path))
    if not any(line.strip() for line in lines):
        raise DatasetError(f"{path} is empty (no text to count)")
    if len(lines) < 2:
        raise DatasetError(f"{path} has one line; at least 2 are needed (one to train on, one "
                           "to hold out)")
    n_test = max(1, len(lines) // 10)
    return Corpus(str(path), _join(lines[:-n_test]), _join(lines[-n_test:]))


def load_corpus(spec: str) -> Corpus:
    """The corpus named ``spec`` (``pydoc``, ``fortunes``) or the text file at that path."""
    if spec == "pydoc":
        return load_pydoc()
    if spec == "fortunes":
        return load_fortunes()
    path = Path(spec)
    try:
        exists, folder = path.exists(), path.is_dir()
    except OSError as err:  # a name too long for the file system, say
        raise DatasetError(f"corpus {spec[:80]!r}: {err.strerror or err}") from None
    if not exists:
        raise DatasetError(f"unknown corpus {spec!r}: neither {' nor '.join(NAMED)} nor a file"
                           f"{closest(spec, NAMED)}")
    if folder:
        raise DatasetError(f"corpus {spec!r} is a folder; give a UTF-8 text file")
    return load_text_file(path)
