"""MMBench's CircularEval: every question asked once per cyclic shift of its options.

Follows Liu et al. (2023), "MMBench: Is Your Multi-modal Model an All-around Player?", section
3.2, and the rotation of OpenCompass's VLMEvalKit (``vlmutil circular``), which builds the
MMBench TSVs.

**The TSV.** One row per question, tab-separated, with a header: ``index`` (an integer),
``question``, ``hint``, the option columns ``A``, ``B``, ... , ``answer`` (a label),
``category``, ``l2-category`` and ``image`` (a base64 image, or the index of the row whose image
it shares). An option cell that is empty or ``nan`` is absent; the N options of a question are
its non-empty ones and must be the first N columns. Only ``index``, ``question`` and the
options are required; without ``answer`` the passes can be run but not scored.

**The rotation.** A question i with options (o_0, ..., o_{N-1}) and answer label a is asked N
times. Pass k = 0, ..., N - 1 has

    index  i + k * OFFSET           (OFFSET = 10^6, times 10 until it exceeds every index)
    option j = o_{(j + k) mod N}     (the options shifted cyclically: pass 1 shows o_1 as A)
    answer   (a - k) mod N           (so the right option's text is the same in every pass)

and ``g_index`` = i names the group, the question all N passes are copies of. A question is
asked once (its group is one pass) when it has fewer than two options, when its answer is not
one of its labels, or when an option's text looks like labels (an option "E", or "Both A and
B", whose meaning a shift would change). A file that already holds the passes (a ``g_index``
column, or indices of OFFSET and more as in the released MMBench TSVs, grouped by
i mod 10^6) is used as it is.

**Extraction.** A model's free-form reply r becomes a label or ``Z`` (no answer), by the first
rule that applies: r is a lone label ("B", "(b)", "**C**."); r names one after "answer"
("Answer: C", "the correct answer is (D)"), else after "option" or "choice" ("I pick option
B"), the last such mention winning; r starts with a label and a delimiter ("B. a dog",
"(B) a dog"); r holds label words: exactly one distinct label -> it ("I'd go with B"), several
-> Z ("A or C"), an "A" before a lower-case word being the English article; r is a refusal
("Sorry, I cannot tell") -> Z; r contains exactly one option's text as a phrase, the longest
when one contains another ("It is a dog"); otherwise Z.

**Scoring.** A group is right under CircularEval only when every pass is right:

    circular = (1/G) sum_g prod_{k} [pred_{g,k} = answer_{g,k}],
    vanilla  = (1/G) sum_g [pred_{g,0} = answer_{g,0}]   (the original order only),

over the G groups, overall and per ``category`` and ``l2-category``. A model that guesses
uniformly scores (1/N)^N under CircularEval (1/256 for N = 4) and 1/N vanilla; one that always
answers "A" scores 0 under CircularEval on rotated questions.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import os
import re
import string
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlatlas.core.io import write_text
from mlatlas.core.progress import progress_bar

LABELS = string.ascii_uppercase
NO_ANSWER = "Z"
OFFSET = 10**6
EMPTY_CELLS = ("", "nan", "NaN")
# A released TSV's image cell is base64 (thousands of characters) or, for a pass that shares the
# image of an earlier row, that row's index; VLMEvalKit tells them apart by length the same way.
IMAGE_REFERENCE_CHARS = 64
REQUIRED_COLUMNS = ("index", "question", "A")

Model = Callable[[Image.Image | None, str, dict[str, str]], str]


class MMBenchError(ValueError):
    """An MMBench TSV, image or model reply that cannot be used, named with its file and row."""


@dataclass(frozen=True)
class Question:
    """One pass of a question: a row of an MMBench TSV, or a rotated copy of one."""

    index: int
    """The row's index (i + k * OFFSET for pass k of question i)."""
    g_index: int
    """The index of the question this pass is a copy of (its own for the original)."""
    question: str
    hint: str
    options: tuple[str, ...]
    """The N non-empty option texts, in label order A, B, ..."""
    answer: str
    """The right option's label, "" when the file has no answers."""
    category: str = ""
    """The ability it tests (MMBench's ``category``), "" for none."""
    l2_category: str = ""
    """The group of abilities (``l2-category``), "" for none."""
    image: str = ""
    """The image as base64, "" for none."""

    @property
    def labels(self) -> str:
        return LABELS[:len(self.options)]


# --- reading ---------------------------------------------------------------------------------

def _cell(row: dict[str, str], column: str) -> str:
    value = row.get(column) or ""
    return "" if value in EMPTY_CELLS else value


def _integer(value: str, column: str, where: str) -> int:
    try:
        number = int(value)
    except ValueError:
        # pandas writes an integer column that has an empty cell as floats: "12.0"
        number = int(float(value)) if re.fullmatch(r"\d+\.0*", value) else -1
    if number < 0:
        raise MMBenchError(f"{where}: {column} must be a non-negative integer, got {value!r}")
    return number


def _options(row: dict[str, str], option_columns: Sequence[str], where: str) -> tuple[str, ...]:
    cells = [_cell(row, c) for c in option_columns]
    n = sum(1 for c in cells if c)
    if any(not c for c in cells[:n]):
        filled = "".join(c for c, v in zip(option_columns, cells, strict=True) if v)
        raise MMBenchError(f"{where}: options must fill the first columns (A, B, ...) without a "
                           f"gap, got {filled}")
    return tuple(cells[:n])


def _resolve_images(questions: list[Question], path: Path) -> list[Question]:
    by_index = {q.index: q.image for q in questions}
    resolved = []
    for q in questions:
        if 0 < len(q.image) <= IMAGE_REFERENCE_CHARS and q.image.isdigit():
            target = by_index.get(int(q.image), "")
            if len(target) <= IMAGE_REFERENCE_CHARS:
                raise MMBenchError(f"{path}: index {q.index}: its image names row {q.image}, "
                                   "which holds no image")
            q = replace(q, image=target)
        resolved.append(q)
    return resolved


def read_tsv(path: str | os.PathLike) -> list[Question]:
    """The rows of an MMBench TSV as :class:`Question` s, in file order, images resolved."""
    path = Path(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed the 128 kB default
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise MMBenchError(f"{path}: no column {', '.join(missing)} in the header "
                                   f"({', '.join(header) or 'empty file'})")
            option_columns = [c for c in LABELS if c in header]
            questions, seen = [], set()
            for line, row in enumerate(reader, start=2):
                where = f"{path}: line {line}"
                if None in row:
                    raise MMBenchError(f"{where}: more cells than the header's {len(header)}")
                index = _integer(_cell(row, "index"), "index", where)
                if index in seen:
                    raise MMBenchError(f"{where}: index {index} appears twice")
                seen.add(index)
                has_group = "g_index" in header and _cell(row, "g_index")
                g_index = (_integer(row["g_index"], "g_index", where) if has_group
                           else index % OFFSET)
                options = _options(row, option_columns, f"{where} (index {index})")
                answer = _cell(row, "answer").strip()
                if answer and answer not in LABELS[:len(options)]:
                    raise MMBenchError(f"{where} (index {index}): answer {answer!r} is not one of "
                                       f"its options' labels {LABELS[:len(options)] or '(none)'}")
                questions.append(Question(
                    index=index, g_index=g_index, question=_cell(row, "question"),
                    hint=_cell(row, "hint"), options=options, answer=answer,
                    category=_cell(row, "category"), l2_category=_cell(row, "l2-category"),
                    image=_cell(row, "image")))
    except UnicodeDecodeError as err:
        raise MMBenchError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise MMBenchError(f"{path}: not a readable TSV ({err})") from None
    except OSError as err:
        raise MMBenchError(f"{path}: cannot read ({err.strerror})") from None
    return _resolve_images(questions, path)


def decode_image(data: str, where: str = "image") -> Image.Image | None:
    """A base64 image cell as a loaded PIL image; None for an empty cell."""
    if not data:
        return None
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as err:
        raise MMBenchError(f"{where}: not a base64 image ({err})") from None
    return image


# --- the rotation ----------------------------------------------------------------------------

def circular_offset(indices: Iterable[int]) -> int:
    """10^6, times 10 until it exceeds every index (VLMEvalKit's OFFSET)."""
    offset, largest = OFFSET, max(indices, default=0)
    while largest >= offset:
        offset *= 10
    return offset


def names_labels(q: Question) -> bool:
    """True when an option's text is a run of capital letters of the alphabet ("E", "BC") or
    names two of the question's labels as words ("Both A and B", "A&C")."""
    for text in q.options:
        words = set(re.sub(r"[^A-Za-z ]", " ", text).split())
        if text in LABELS or len(words & set(q.labels)) > 1:
            return True
    return False


def rotatable(q: Question) -> bool:
    """Whether the question is asked once per shift: >= 2 options, a valid or absent answer, and
    no option that refers to the labels."""
    return len(q.options) >= 2 and (not q.answer or q.answer in q.labels) and not names_labels(q)


def rotate(q: Question, k: int, offset: int = OFFSET) -> Question:
    """Pass k of question q: option j = o_{(j + k) mod N}, answer (a - k) mod N, index
    i + k * offset, g_index i."""
    n = len(q.options)
    if not 0 <= k < n:
        raise ValueError(f"shift k must be in 0..{n - 1} for {n} options, got {k}")
    answer = LABELS[(LABELS.index(q.answer) - k) % n] if q.answer else ""
    return replace(q, index=q.index + k * offset, g_index=q.index,
                   options=q.options[k:] + q.options[:k], answer=answer)


def circular_passes(questions: Sequence[Question],
                    build: bool | None = None) -> list[Question]:
    """Every pass to ask, group after group (pass 0, 1, ... of each question in file order).

    ``build`` True makes the rotated copies of every rotatable question (each row its own
    group); False takes the rows as the passes, grouped by their ``g_index``; None (default)
    builds them unless the rows already hold copies (some index differs from its g_index)."""
    if build is None:
        build = all(q.index == q.g_index for q in questions)
    if not build:
        first_row: dict[int, int] = {}
        for row, q in enumerate(questions):
            first_row.setdefault(q.g_index, row)
        passes = sorted(questions, key=lambda q: (first_row[q.g_index], q.index))
        missing = sorted({q.g_index for q in passes} - {q.index for q in passes})
        if missing:
            raise MMBenchError(f"passes of question {missing[0]} are present but not the "
                               "question itself (no row with that index); for a file without "
                               "copies whose indices reach 10^6, pass build=True")
        return passes
    offset = circular_offset(q.index for q in questions)
    passes = []
    for q in questions:
        q = replace(q, g_index=q.index)
        shifts = range(len(q.options)) if rotatable(q) else range(1)
        passes.extend(rotate(q, k, offset) for k in shifts)
    return passes


# --- extraction ------------------------------------------------------------------------------

_LONE_LABEL = re.compile(r"^[\s(\[*\"']*([A-Za-z])[\s)\].:,*\"']*$")
# A keyword, then the letter; the scoped (?i:...) leaves the letter itself case-sensitive.
_NAMED_TAIL = (r"(?:\s+(?i:is|would be|should be))?\s*[:：]?\s*(?i:option\s+)?[(\[*]*"
               r"([A-Z])(?![A-Za-z0-9])")
_ANSWER_LABEL = re.compile(r"(?i:answer)" + _NAMED_TAIL)
_OPTION_LABEL = re.compile(r"(?i:option|choice)" + _NAMED_TAIL)
_LEADING_LABEL = re.compile(r"^[\s(\[*]*([A-Z])\s*[.):\]]")
_WORD_LABEL = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
# "A" before a lower-case word is the article ("A dog sits"), unless the word says A is chosen.
_ARTICLE_A = re.compile(r"A\s+(?!(?:is|was|seems|appears|fits|matches|looks|would|should|"
                        r"must|best|because|and|or)\b)[a-z]")
_REFUSAL = re.compile(r"(?i)\b(?:sorry|I cannot|I can't|I can not|I am unable|I'm unable|"
                      r"unable to (?:determine|tell|see|answer)|cannot be determined|"
                      r"(?:not possible|impossible) to (?:determine|tell)|I don't know|"
                      r"I do not know|no image|not provided)\b")


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def _word_labels(reply: str, labels: str) -> set[str]:
    found = set()
    for match in _WORD_LABEL.finditer(reply):
        letter = match.group(1)
        if letter in labels and not (letter == "A" and _ARTICLE_A.match(reply, match.start())):
            found.add(letter)
    return found


def _text_match(reply: str, options: Sequence[str]) -> str | None:
    said = _normalised(reply)
    texts = [_normalised(o).rstrip(".") for o in options]
    hits = [j for j, t in enumerate(texts)
            if t and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", said)]
    # "dark red" also contains "red": keep the longest phrases only.
    hits = [j for j in hits if not any(texts[j] in texts[m] and j != m for m in hits)]
    return LABELS[hits[0]] if len(hits) == 1 else None


def extract_answer(reply: str, options: Sequence[str]) -> str:
    """The label a free-form reply chooses among ``options`` (texts in label order), or "Z"."""
    labels = LABELS[:len(options)]
    lone = _LONE_LABEL.match(reply)
    if lone and lone.group(1).upper() in labels:
        return lone.group(1).upper()
    for keyword in (_ANSWER_LABEL, _OPTION_LABEL):  # "the answer is B, not option A": B
        named = [m.group(1) for m in keyword.finditer(reply) if m.group(1) in labels]
        if named:
            return named[-1]
    leading = _LEADING_LABEL.match(reply)
    if leading and leading.group(1) in labels:
        return leading.group(1)
    words = _word_labels(reply, labels)
    if words:
        return words.pop() if len(words) == 1 else NO_ANSWER
    if _REFUSAL.search(reply):  # before the texts: "Sorry, I see no dog" does not choose "dog"
        return NO_ANSWER
    return _text_match(reply, options) or NO_ANSWER


# --- scoring ---------------------------------------------------------------------------------

def score_passes(correct: np.ndarray, groups: np.ndarray,
                 first: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group CircularEval and vanilla hits.

    correct (M,) bool: pass m was answered right; groups (M,) int: its group; first (M,) bool:
    it is its group's original order (exactly one per group). Returns the sorted group ids
    (G,), circular (G,) bool (every pass right) and vanilla (G,) bool (the first pass right)."""
    correct, groups, first = (np.asarray(a) for a in (correct, groups, first))
    if not (correct.shape == groups.shape == first.shape) or correct.ndim != 1:
        raise ValueError("correct, groups and first must be 1-D of one length, got shapes "
                         f"{correct.shape}, {groups.shape} and {first.shape}")
    ids, inverse = np.unique(groups, return_inverse=True)
    firsts = np.bincount(inverse[first], minlength=len(ids))
    if (firsts != 1).any():
        bad = int(np.flatnonzero(firsts != 1)[0])
        raise ValueError(f"group {ids[bad]} has {firsts[bad]} first passes; need exactly one")
    wrong = np.bincount(inverse, weights=~correct.astype(bool), minlength=len(ids))
    vanilla = np.zeros(len(ids), dtype=bool)
    vanilla[inverse[first]] = correct[first]
    return ids, wrong == 0, vanilla


@dataclass(frozen=True)
class Accuracy:
    circular: float
    """Share of groups with every pass right."""
    vanilla: float
    """Share of groups whose original order was answered right."""
    questions: int
    """The number of groups G."""


@dataclass(frozen=True)
class Report:
    overall: Accuracy
    category: dict[str, Accuracy]
    l2_category: dict[str, Accuracy]

    def rows(self) -> list[tuple[str, str, Accuracy]]:
        """(split, name, accuracy): overall, then l2-categories, then categories, by name."""
        return ([("overall", "Overall", self.overall)]
                + [("l2-category", k, v) for k, v in sorted(self.l2_category.items())]
                + [("category", k, v) for k, v in sorted(self.category.items())])

    def format(self) -> str:
        lines = [f"{'split':<12} {'name':<44} {'circular':>8} {'vanilla':>8} {'n':>6}"]
        for split, name, acc in self.rows():
            lines.append(f"{split:<12} {name:<44} {acc.circular:8.4f} {acc.vanilla:8.4f} "
                         f"{acc.questions:6d}")
        return "\n".join(lines)


def _accuracy(circular: np.ndarray, vanilla: np.ndarray) -> Accuracy:
    return Accuracy(float(circular.mean()), float(vanilla.mean()), len(circular))


def report(passes: Sequence[Question], extracted: Sequence[str]) -> Report:
    """Score the extracted labels (one per pass) overall and per category and l2-category."""
    if len(passes) != len(extracted):
        raise ValueError(f"{len(passes)} passes but {len(extracted)} extracted answers")
    if not passes:
        raise MMBenchError("no questions to score")
    unanswered = [q.index for q in passes if not q.answer]
    if unanswered:
        raise MMBenchError(f"index {unanswered[0]} has no answer: this split cannot be scored")
    ids, circular, vanilla = score_passes(
        np.array([p == q.answer for q, p in zip(passes, extracted, strict=True)]),
        np.array([q.g_index for q in passes]),
        np.array([q.index == q.g_index for q in passes]))
    main = {q.g_index: q for q in passes if q.index == q.g_index}
    mains = [main[g] for g in ids.tolist()]

    def per(key: Callable[[Question], str]) -> dict[str, Accuracy]:
        names = np.array([key(q) for q in mains])
        return {name: _accuracy(circular[names == name], vanilla[names == name])
                for name in sorted(set(names.tolist()) - {""})}

    return Report(_accuracy(circular, vanilla), per(lambda q: q.category),
                  per(lambda q: q.l2_category))


# --- the harness -----------------------------------------------------------------------------

def question_text(q: Question) -> str:
    """The question as MMBench prompts it: "Hint: ...\\nQuestion: ..." when there is a hint."""
    return f"Hint: {q.hint}\nQuestion: {q.question}" if q.hint else q.question


def _tsv_text(passes: Sequence[Question], extra: dict[str, Sequence[object]]) -> str:
    labels = LABELS[:max((len(q.options) for q in passes), default=0)]
    images = {q.index: q.image for q in passes}
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    writer.writerow(["index", "g_index", "question", "hint", *labels, "answer", "category",
                     "l2-category", "image", *extra])
    for m, q in enumerate(passes):
        options = list(q.options) + [""] * (len(labels) - len(q.options))
        # A copy sharing its question's image names that row, as the released TSVs do.
        shared = q.index != q.g_index and q.image and images.get(q.g_index) == q.image
        writer.writerow([q.index, q.g_index, q.question, q.hint, *options, q.answer, q.category,
                         q.l2_category, str(q.g_index) if shared else q.image,
                         *(column[m] for column in extra.values())])
    return out.getvalue()


def write_tsv(path: str | os.PathLike, passes: Sequence[Question]) -> None:
    """Write questions (or their passes, with g_index) as an MMBench TSV, atomically."""
    write_text(path, _tsv_text(passes, {}))


def evaluate(model: Model, tsv: str | os.PathLike, results: str | os.PathLike | None = None,
             *, build: bool | None = None, progress: bool | None = None) -> Report | None:
    """Ask ``model(image, question, options) -> reply`` every pass of an MMBench TSV.

    ``image`` is the decoded PIL image (None without one), ``question`` is
    :func:`question_text`, ``options`` maps each label to its text in order. Each reply goes
    through :func:`extract_answer`; ``results`` (if given) receives the passes as an MMBench TSV
    (:func:`write_tsv`) with the columns prediction (the reply), extracted and hit (1 or 0)
    added, written atomically. Returns the :class:`Report`, or None for a file without answers."""
    passes = circular_passes(read_tsv(tsv), build)
    if not passes:
        raise MMBenchError(f"{tsv}: no questions")
    if results is not None and not Path(results).parent.is_dir():  # before hours of inference
        raise MMBenchError(f"{results}: its folder does not exist")
    replies, extracted = [], []
    image_of, image = None, None
    for q in progress_bar(passes, progress=progress, desc="CircularEval", unit="pass"):
        if q.g_index != image_of:  # the passes of a group are consecutive and share one image
            image_of, image = q.g_index, decode_image(q.image, f"{tsv}: index {q.index}")
        reply = model(image, question_text(q), dict(zip(q.labels, q.options, strict=True)))
        if not isinstance(reply, str):
            raise MMBenchError(f"the model returned {type(reply).__name__} for index {q.index}; "
                               "it must return the reply as a str")
        replies.append(reply)
        extracted.append(extract_answer(reply, q.options))
    if results is not None:
        hits = [int(p == q.answer) if q.answer else "" for q, p in zip(passes, extracted,
                                                                       strict=True)]
        write_text(results, _tsv_text(passes, {"prediction": replies, "extracted": extracted,
                                               "hit": hits}))
    if any(not q.answer for q in passes):
        return None
    return report(passes, extracted)
