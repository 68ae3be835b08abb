r"""n-gram language models: maximum likelihood, add-k and interpolated Kneser-Ney smoothing,
counted and scored in array operations.

A sentence (a line of the corpus) w_1 .. w_T, padded with n-1 start symbols ``<s>`` and ended by
``</s>`` (w_{T+1}), has by the chain rule and an order-(n-1) Markov assumption

    p(w_1 .. w_{T+1}) = prod_{t=1}^{T+1} p(w_t | w_{t-n+1}^{t-1}),

where h = w_{t-n+1}^{t-1} is the history (context) and h' = w_{t-n+2}^{t-1} its back-off, h
without its oldest token. c(h w) counts the n-grams of the training text, c(h) = sum_w c(h w),
V is the number of tokens the model can predict (the vocabulary with ``</s>`` and ``<unk>``,
without ``<s>``). Tokens seen fewer than ``min_count`` times in training, and unseen held-out
tokens, are read as ``<unk>``.

- Maximum likelihood: p_ML(w | h) = c(h w) / c(h).
- Add-k (Lidstone; k = 1 is Laplace): p_k(w | h) = (c(h w) + k) / (c(h) + k V).
- Interpolated Kneser-Ney (Kneser & Ney 1995; Chen & Goodman 1998, section 3):

      p_KN(w | h) = max(c~(h w) - D(c~(h w)), 0) / c~(h) + gamma(h) p_KN(w | h'),
      gamma(h)   = (D1 N1(h .) + D2 N2(h .) + D3+ N3+(h .)) / c~(h),

  where c~ is the raw count c at the highest order and the continuation count
  c~(h w) = N1+(. h w) = |{v : c(v h w) > 0}| at every lower order (the number of distinct
  tokens seen before h w), c~(h) = sum_w c~(h w), and N_j(h .) = |{w : c~(h w) = j}|
  (N3+ counts j >= 3). The recursion ends in the uniform distribution p_0(w) = 1 / V, so every
  token of the vocabulary keeps some probability.
  Modified Kneser-Ney (the default) estimates three discounts per order from the
  count-of-counts n_j (the number of n-grams of that order whose count c~ is exactly j):

      Y = n1 / (n1 + 2 n2),   D_j = j - (j + 1) Y n_{j+1} / n_j   (j = 1, 2, 3; D3+ = D_3),

  where an estimate is undefined (n_j = 0) or not positive, as on tiny or repetitive corpora,
  D_j falls back to j / 2. ``--discount fixed`` uses one discount D for every count and order
  (D1 = D2 = D3+ = D, so gamma(h) = D N1+(h .) / c~(h)).
- Unseen contexts back off: a history h never seen in training (c(h) = 0) gets
  p(w | h) = p(w | h'), for every smoothing.
- Perplexity of N held-out tokens (every w_t above, ``</s>`` included, ``<s>`` never):
  PP = exp(-1/N sum_t log p(w_t | h_t)); bits per character divide the same total by the number
  of characters (a newline per line included) and by log 2.

Counting maps tokens to integer ids and every history of m tokens to an id by the recursion
id_m(h) = rank of (oldest token of h) * M_{m-1} + id_{m-1}(h') among the distinct histories of
length m (M_{m-1} of them), so each n-gram is one int64 key (history id * |vocab| + token),
counted by ``np.unique`` and looked up by ``np.searchsorted``: there is no Python loop over
tokens, only over the n orders.

References: R. Kneser and H. Ney, "Improved backing-off for M-gram language modeling", ICASSP
1995. S. F. Chen and J. Goodman, "An empirical study of smoothing techniques for language
modeling", Technical Report TR-10-98, Harvard University, 1998.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch

from mlatlas.core.config import BaseConfig, ConfigError, check_options, require_range
from mlatlas.core.io import CheckpointError
from mlatlas.core.run import CHECKPOINT, Run, fit
from mlatlas.data import DatasetError
from mlatlas.data.text import Corpus, load_corpus

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
BOS_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIALS = (BOS, EOS, UNK)
MAX_ORDER = 10
CURVE_ORDERS = 5
FALLBACK = (0.5, 1.0, 1.5)
SAMPLE_BATCH = 256
# A word is a run of letters, digits and underscores or a single other non-space character.
WORD = re.compile(r"\w+|[^\w\s]")


# Tokens and vocabulary -------------------------------------------------------------------------


def tokenize(line: str, level: str) -> list[str]:
    """The tokens of one line: its characters, or its words and punctuation marks."""
    return list(line) if level == "char" else WORD.findall(line)


def build_vocabulary(lines: list[str], level: str, min_count: int) -> list[str]:
    """``<s> </s> <unk>`` and then, sorted, every token seen at least ``min_count`` times."""
    return encode_training(lines, level, min_count)[0]


def encode_training(lines: list[str], level: str, min_count: int) -> tuple[list[str], Encoded]:
    """The vocabulary of :func:`build_vocabulary` and the training lines as its ids, from one
    tokenisation and one ``np.unique``."""
    tokens, lengths = _token_array(lines, level)
    kinds, inverse, counts = np.unique(tokens, return_inverse=True, return_counts=True)
    keep = counts >= min_count
    new_id = np.where(keep, np.cumsum(keep) - 1 + len(SPECIALS), UNK_ID).astype(np.int64)
    kept = kinds[keep].tolist()
    vocab = [*SPECIALS, *(map(chr, kept) if level == "char" else kept)]
    ids = new_id[inverse.reshape(-1)] if tokens.size else np.zeros(0, dtype=np.int64)
    n_chars = sum(map(len, lines)) + len(lines)
    return vocab, Encoded(ids, lengths, n_chars, int((ids == UNK_ID).sum()))


# Words as in tokenize, and the newlines that end the lines joined into one text.
_WORD_OR_NEWLINE = re.compile(r"\w+|[^\w\s]|\n")


def _token_array(lines: list[str], level: str) -> tuple[np.ndarray, np.ndarray]:
    """All tokens of ``lines`` (code points for characters, strings for words) and the number of
    tokens of each line, from one pass over the joined text."""
    if level == "char":
        lengths = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))
        text = "".join(lines).encode("utf-32-le")
        return np.frombuffer(text, dtype=np.uint32).astype(np.int64), lengths
    found = _WORD_OR_NEWLINE.findall("".join(line + "\n" for line in lines))
    tokens = np.array(found) if found else np.array([], dtype=str)
    newline = tokens == "\n"
    ends = np.flatnonzero(newline)
    lengths = np.diff(ends, prepend=-1).astype(np.int64) - 1
    return tokens[~newline], lengths


@dataclass(frozen=True)
class Encoded:
    """Lines as token ids: ``ids`` (all tokens, line after line), ``lengths`` (tokens per line),
    ``n_chars`` (characters, a newline per line included) and ``oov`` (tokens read as
    ``<unk>``)."""

    ids: np.ndarray
    lengths: np.ndarray
    n_chars: int
    oov: int


def encode(lines: list[str], vocab: list[str], level: str) -> Encoded:
    """Map every token of ``lines`` to its id in ``vocab`` (``<unk>`` if absent), vectorised."""
    tokens, lengths = _token_array(lines, level)
    kinds = vocab[len(SPECIALS):]
    table = (np.array([ord(c) for c in kinds], dtype=np.int64) if level == "char"
             else np.array(kinds if kinds else [""]))
    if level != "char" and not kinds:
        table = table[:0]
    if tokens.size and table.size:
        at = np.searchsorted(table, tokens).clip(0, table.size - 1)
        found = table[at] == tokens
        ids = np.where(found, at + len(SPECIALS), UNK_ID).astype(np.int64)
    else:
        ids = np.full(tokens.size, UNK_ID, dtype=np.int64)
    n_chars = sum(map(len, lines)) + len(lines)
    return Encoded(ids, lengths, n_chars, int((ids == UNK_ID).sum()))


def ngram_windows(encoded: Encoded, order: int) -> tuple[np.ndarray, np.ndarray]:
    """The histories (N, order-1) and predicted tokens (N,) of every position of the padded
    lines: each line is ``<s>`` x (order-1), its tokens, ``</s>``; a position is predicted
    unless it is padding. Histories are oldest token first."""
    lengths, n = encoded.lengths, order
    seg = lengths + n
    starts = np.cumsum(seg) - seg
    stream = np.full(int(seg.sum()), BOS_ID, dtype=np.int64)
    line = np.repeat(np.arange(lengths.size), lengths)
    within = np.arange(encoded.ids.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    stream[starts[line] + n - 1 + within] = encoded.ids
    stream[starts + n - 1 + lengths] = EOS_ID
    predicted = np.ones(stream.size, dtype=bool)
    predicted[(starts[:, None] + np.arange(n - 1)).ravel()] = False
    pos = np.flatnonzero(predicted)
    history = stream[pos[:, None] - (n - 1) + np.arange(n - 1)]
    return history.reshape(pos.size, n - 1), stream[pos]


# Counting --------------------------------------------------------------------------------------


@dataclass
class NgramCounts:
    """The count tables of an order-n model over a vocabulary of ``vocab_size`` ids.

    ``contexts[m]`` (m = 0..n-1): the sorted keys of the distinct histories of m tokens, key =
    oldest token * len(contexts[m-1]) + id of the rest (``contexts[0]`` is [0], the empty one).
    ``grams[k]`` (k = 1..n): the sorted keys of the distinct k-grams, key = history id *
    vocab_size + token; ``counts[k]`` their counts c; ``continuation[k]`` (k < n) their
    continuation counts N1+(. h w). Index 0 of the three gram lists is unused.
    """

    order: int
    vocab_size: int
    contexts: list[np.ndarray]
    grams: list[np.ndarray]
    counts: list[np.ndarray]
    continuation: list[np.ndarray]
    _levels: dict = field(default_factory=dict, repr=False, compare=False)


def count_ngrams(history: np.ndarray, y: np.ndarray, vocab_size: int) -> NgramCounts:
    """Count every k-gram (k = 1..n) ending at each position: histories (N, n-1), tokens (N,)."""
    n = history.shape[1] + 1
    contexts, ids = [np.zeros(1, dtype=np.int64)], [np.zeros(y.size, dtype=np.int64)]
    for m in range(1, n):
        bound = vocab_size * contexts[-1].size
        keys, inverse, _ = unique_counts(history[:, -m] * contexts[-1].size + ids[-1], bound)
        contexts.append(keys)
        ids.append(inverse)
    grams, counts = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for k in range(1, n + 1):
        bound = contexts[k - 1].size * vocab_size
        keys, _, c = unique_counts(ids[k - 1] * vocab_size + y, bound)
        grams.append(keys)
        counts.append(c)
    continuation = [np.zeros(0, dtype=np.int64)]
    for k in range(1, n):
        continuation.append(continuation_counts(contexts, grams, k, vocab_size))
    return NgramCounts(n, vocab_size, contexts, grams, counts, continuation)


def unique_counts(keys: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sorted distinct values of non-negative int64 ``keys`` (all below ``bound``), the
    index of each key among them and their counts: by one ``bincount`` over 0..bound-1 when
    that range is at most a few times the number of keys, else by ``np.unique`` (a sort)."""
    if bound <= 4 * keys.size + 1024:
        found = np.bincount(keys, minlength=bound)
        present = found > 0
        rank = np.cumsum(present) - 1
        return (np.flatnonzero(present).astype(np.int64), rank[keys].astype(np.int64),
                found[present].astype(np.int64))
    values, inverse, c = np.unique(keys, return_inverse=True, return_counts=True)
    return values, inverse.reshape(-1).astype(np.int64), c.astype(np.int64)


def continuation_counts(contexts: list[np.ndarray], grams: list[np.ndarray], k: int,
                        vocab_size: int) -> np.ndarray:
    """N1+(. h w) for every k-gram (h w): how many distinct (k+1)-grams (v h w) extend it."""
    history, word = np.divmod(grams[k + 1], vocab_size)
    suffix = contexts[k][history] % contexts[k - 1].size  # the id of h from that of (v h)
    at = np.searchsorted(grams[k], suffix * vocab_size + word)
    return np.bincount(at, minlength=grams[k].size).astype(np.int64)


def context_ids(counts: NgramCounts, history: np.ndarray) -> list[np.ndarray]:
    """The id of each query's history at every length m = 0..n-1 (-1 where it was never seen
    in training): history (Q, n-1) oldest first -> n arrays of shape (Q,)."""
    q = history.shape[0]
    ids, seen = [np.zeros(q, dtype=np.int64)], np.ones(q, dtype=bool)
    for m in range(1, counts.order):
        table = counts.contexts[m]
        key = history[:, -m] * counts.contexts[m - 1].size + np.maximum(ids[-1], 0)
        at = np.searchsorted(table, key).clip(0, table.size - 1)
        seen = seen & (table[at] == key)
        ids.append(np.where(seen, at, -1))
    return ids


def discounts_from_count_of_counts(n1: int, n2: int, n3: int, n4: int) -> np.ndarray:
    """Chen & Goodman's modified Kneser-Ney discounts (D1, D2, D3+): Y = n1 / (n1 + 2 n2),
    D_j = j - (j + 1) Y n_{j+1} / n_j. Where the estimate is undefined (n_j = 0 or
    n1 + 2 n2 = 0) or not positive, as on small or repetitive corpora, D_j = FALLBACK[j-1]
    (0.5, 1, 1.5, the fallback KenLM offers), so that no seen history loses all its back-off
    mass."""
    n = [n1, n2, n3, n4]
    y = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else None
    out = []
    for j in (1, 2, 3):
        d = j - (j + 1) * y * n[j] / n[j - 1] if y is not None and n[j - 1] else 0.0
        out.append(d if d > 0 else FALLBACK[j - 1])
    return np.array(out)


def count_of_counts(c: np.ndarray) -> tuple[int, int, int, int]:
    """(n1, n2, n3, n4): how many n-grams have count exactly 1, 2, 3, 4."""
    found = np.bincount(np.minimum(c, 5), minlength=6)
    return int(found[1]), int(found[2]), int(found[3]), int(found[4])


# Smoothing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Smoothing:
    """How counts become probabilities.

    ``kind``: 'mle', 'add_k' (with ``k``) or 'kneser_ney' (``discount`` 'modified' or 'fixed'
    with ``fixed_discount``). ``uniform_base``: Kneser-Ney's unigram level is discounted and
    interpolated with 1/V (Chen & Goodman); False gives nltk's convention, the undiscounted
    continuation unigram N1+(. w) / N1+(. .). ``vocab_size``: the V of add-k (None: the
    predictable tokens, the vocabulary without ``<s>``; nltk's Laplace counts ``<s>`` too).
    """

    kind: str = "kneser_ney"
    k: float = 1.0
    discount: str = "modified"
    fixed_discount: float = 0.75
    uniform_base: bool = True
    vocab_size: int | None = None


@dataclass(frozen=True)
class Level:
    """One order of the recursion p_k(w|h) = alpha(h w) + beta(h) + gamma(h) p_{k-1}(w|h'):
    alpha per k-gram, beta and gamma per history; ``discounts`` (D1, D2, D3+) for Kneser-Ney."""

    alpha: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    discounts: np.ndarray


def level_terms(counts: NgramCounts, k: int, top: bool, smoothing: Smoothing) -> Level:
    """The terms of order k of a model whose highest order is k (``top``) or above k."""
    key = (k, top, smoothing)
    if key in counts._levels:
        return counts._levels[key]
    kn = smoothing.kind == "kneser_ney"
    c = (counts.counts[k] if top or not kn else counts.continuation[k]).astype(np.float64)
    history = counts.grams[k] // counts.vocab_size
    n_hist = counts.contexts[k - 1].size
    total = np.bincount(history, weights=c, minlength=n_hist)
    zeros = np.zeros(n_hist)
    discounts = np.zeros(3)
    if smoothing.kind == "mle":
        level = Level(c / total[history], zeros, zeros, discounts)
    elif smoothing.kind == "add_k":
        v = smoothing.vocab_size or counts.vocab_size - 1
        denominator = total + smoothing.k * v
        level = Level(c / denominator[history], smoothing.k / denominator, zeros, discounts)
    elif k == 1 and not smoothing.uniform_base:
        level = Level(c / total[history], zeros, zeros, discounts)
    else:
        if smoothing.discount == "fixed":
            discounts = np.full(3, smoothing.fixed_discount)
        else:
            discounts = discounts_from_count_of_counts(*count_of_counts(c.astype(np.int64)))
        d = discounts[np.minimum(c, 3).astype(np.int64) - 1]
        # gamma(h) total: sum over the grams of h of their discount = D1 N1 + D2 N2 + D3+ N3+.
        gamma = np.bincount(history, weights=d, minlength=n_hist) / total
        level = Level(np.maximum(c - d, 0.0) / total[history], zeros, gamma, discounts)
    counts._levels[key] = level
    return level


def probabilities(counts: NgramCounts, history: np.ndarray, words: np.ndarray,
                  smoothing: Smoothing, order: int | None = None) -> np.ndarray:
    """p(w_q | h_q) for Q queries: history (Q, >= order-1) oldest first, words (Q,) -> (Q,).

    ``order`` (default the model's) may be lower than the counted one: the result is that of a
    model counted at that order, since lower orders are counted from the same positions.
    """
    order = order or counts.order
    q = words.shape[0]
    hist = history[:, history.shape[1] - (order - 1):] if order > 1 else history[:, :0]
    ids = context_ids(_truncated(counts, order), hist)
    v = counts.vocab_size
    p = np.full(q, 1.0 / (v - 1))
    for k in range(1, order + 1):
        level = level_terms(counts, k, k == order, smoothing)
        h = ids[k - 1]
        seen = h >= 0
        h0 = np.maximum(h, 0)
        table = counts.grams[k]
        key = h0 * v + words
        at = np.searchsorted(table, key).clip(0, table.size - 1)
        found = seen & (table[at] == key)
        alpha = np.where(found, level.alpha[at], 0.0)
        p = np.where(seen, alpha + level.beta[h0] + level.gamma[h0] * p, p)
    return np.where(words == BOS_ID, 0.0, p)


def next_token_distribution(counts: NgramCounts, history: np.ndarray, smoothing: Smoothing,
                            order: int | None = None) -> np.ndarray:
    """The whole distribution p(. | h_b) for B histories: history (B, >= order-1) -> (B, V)
    over every id of the vocabulary (``<s>`` gets 0)."""
    order = order or counts.order
    b, v = history.shape[0], counts.vocab_size
    hist = history[:, history.shape[1] - (order - 1):] if order > 1 else history[:, :0]
    ids = context_ids(_truncated(counts, order), hist)
    p = np.full((b, v), 1.0 / (v - 1))
    for k in range(1, order + 1):
        level = level_terms(counts, k, k == order, smoothing)
        h = ids[k - 1]
        seen = h >= 0
        h0 = np.maximum(h, 0)
        table = counts.grams[k]
        lo = np.searchsorted(table, h0 * v)
        hi = np.where(seen, np.searchsorted(table, (h0 + 1) * v), lo)
        lengths = hi - lo
        row = np.repeat(np.arange(b), lengths)
        at = np.repeat(lo - (np.cumsum(lengths) - lengths), lengths) + np.arange(row.size)
        alpha = np.zeros((b, v))
        alpha[row, table[at] % v] = level.alpha[at]
        mixed = alpha + level.beta[h0][:, None] + level.gamma[h0][:, None] * p
        p = np.where(seen[:, None], mixed, p)
    p[:, BOS_ID] = 0.0
    return p


def _truncated(counts: NgramCounts, order: int) -> NgramCounts:
    """The same tables seen as an order-``order`` model (histories up to order-1 tokens)."""
    if order == counts.order:
        return counts
    return NgramCounts(order, counts.vocab_size, counts.contexts[:order], counts.grams,
                       counts.counts, counts.continuation, counts._levels)


def perplexity(log_probs: np.ndarray) -> float:
    """exp(-1/N sum log p): infinite if any token has probability 0."""
    return float(math.exp(-log_probs.mean())) if np.isfinite(log_probs).all() else math.inf


def log_probabilities(counts: NgramCounts, encoded: Encoded, smoothing: Smoothing,
                      order: int | None = None) -> np.ndarray:
    """log p(w_t | h_t) of every predicted position of ``encoded`` (natural log)."""
    history, y = ngram_windows(encoded, counts.order)
    with np.errstate(divide="ignore"):
        return np.log(probabilities(counts, history, y, smoothing, order))


# Checkpoint tables -----------------------------------------------------------------------------


def to_tables(counts: NgramCounts, vocab: list[str]) -> dict[str, torch.Tensor]:
    """The counts and the vocabulary as the tensors of the checkpoint group ``model``."""
    encoded = [t.encode("utf-8") for t in vocab]
    tables = {"vocab_bytes": torch.from_numpy(np.frombuffer(b"".join(encoded),
                                                            dtype=np.uint8).copy()),
              "vocab_offsets": torch.from_numpy(np.cumsum([0, *map(len, encoded)]))}
    for m in range(1, counts.order):
        tables[f"context{m}"] = torch.from_numpy(counts.contexts[m].copy())
    for k in range(1, counts.order + 1):
        tables[f"gram{k}"] = torch.from_numpy(counts.grams[k].copy())
        tables[f"count{k}"] = torch.from_numpy(counts.counts[k].copy())
        if k < counts.order:
            tables[f"continuation{k}"] = torch.from_numpy(counts.continuation[k].copy())
    return tables


def empty_tables(order: int) -> dict[str, torch.Tensor]:
    """The tensors of an uncounted order-``order`` model (the step-0 checkpoint)."""
    names = ["vocab_bytes", "vocab_offsets", *(f"context{m}" for m in range(1, order)),
             *(f"{t}{k}" for k in range(1, order + 1) for t in ("gram", "count")),
             *(f"continuation{k}" for k in range(1, order))]
    return {name: torch.zeros(0, dtype=torch.uint8 if name == "vocab_bytes" else torch.int64)
            for name in names}


def from_tables(tables: dict[str, torch.Tensor], order: int,
                where: str = "checkpoint") -> tuple[NgramCounts, list[str]]:
    """The counts and vocabulary of :func:`to_tables`; a CheckpointError naming what does not
    hold together (a checkpoint of a run stopped before it counted anything included)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: {why}")

    if tables["vocab_offsets"].numel() == 0:
        raise bad("it holds no counts (the run stopped before counting); finish it with "
                  "mlatlas train --resume RUN")
    raw = bytes(tables["vocab_bytes"].numpy())
    offsets = tables["vocab_offsets"].numpy()
    if offsets[0] != 0 or offsets[-1] != len(raw) or (np.diff(offsets) < 0).any():
        raise bad("its vocabulary offsets do not fit its vocabulary bytes")
    try:
        vocab = [raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:],
                                                          strict=True)]
    except UnicodeDecodeError:
        raise bad("its vocabulary is not UTF-8") from None
    if tuple(vocab[:3]) != SPECIALS:
        raise bad(f"its vocabulary does not start with {' '.join(SPECIALS)}")
    v = len(vocab)
    contexts = [np.zeros(1, dtype=np.int64)]
    grams, counts, continuation = ([np.zeros(0, dtype=np.int64)] for _ in range(3))
    for m in range(1, order):
        contexts.append(tables[f"context{m}"].numpy().astype(np.int64))
    for k in range(1, order + 1):
        grams.append(tables[f"gram{k}"].numpy().astype(np.int64))
        counts.append(tables[f"count{k}"].numpy().astype(np.int64))
        if k < order:
            continuation.append(tables[f"continuation{k}"].numpy().astype(np.int64))
    for m in range(1, order):
        keys = contexts[m]
        if keys.size == 0 or (np.diff(keys) <= 0).any() or keys[0] < 0 or \
                keys[-1] >= v * contexts[m - 1].size:
            raise bad(f"its table context{m} is not a sorted set of valid history keys")
    for k in range(1, order + 1):
        keys = grams[k]
        if keys.size == 0 or (np.diff(keys) <= 0).any() or keys[0] < 0 or \
                keys[-1] >= v * contexts[k - 1].size:
            raise bad(f"its table gram{k} is not a sorted set of valid n-gram keys")
        if counts[k].shape != keys.shape or (counts[k] < 1).any():
            raise bad(f"its table count{k} does not hold a positive count per {k}-gram")
        if k < order and (continuation[k].shape != keys.shape or (continuation[k] < 1).any()):
            raise bad(f"its table continuation{k} does not hold a count per {k}-gram")
    return NgramCounts(order, v, contexts, grams, counts, continuation), vocab


# The command-line method -----------------------------------------------------------------------


@dataclass
class Config(BaseConfig):
    METHOD: ClassVar[str] = "ngram"

    seed: int = 0
    """Unused: counting and scoring draw no random numbers (``sample`` takes its own seed)."""
    device: str = "cpu"
    """Unused: the tables are counted and scored on the CPU with numpy."""
    corpus: str = "pydoc"
    """'pydoc' (Python's help text, always available), 'fortunes' (Debian's package) or the
    path of a UTF-8 text file (its last tenth of lines held out)."""
    level: Literal["char", "word"] = "char"
    """Tokens: characters, or words and punctuation marks (a line is a sentence either way)."""
    n: int = 5
    """Order of the model: the history is the n-1 previous tokens (1..10)."""
    smoothing: Literal["mle", "add_k", "kneser_ney"] = "kneser_ney"
    """Maximum likelihood, add-k (Lidstone) or interpolated Kneser-Ney."""
    k: float = 1.0
    """The pseudo-count of --smoothing add_k (1 is Laplace); positive."""
    discount: Literal["modified", "fixed"] = "modified"
    """Kneser-Ney discounts: three per order estimated from the counts (Chen & Goodman's
    modified KN), or the single --fixed-discount for every count and order."""
    fixed_discount: float = 0.75
    """The discount D of --discount fixed, in (0, 1] (nltk's KneserNeyInterpolated uses 0.1)."""
    min_count: int = 2
    """Tokens seen fewer times than this in training are read as <unk> (1 keeps every token)."""
    steps: int = 1
    """Counting is one pass over the corpus, one step; it must be 1."""
    log_every: int = 1
    """Write a row of metrics.csv every this many steps (there is one)."""
    ckpt_every: int = 1
    """Write checkpoint.safetensors every this many steps (and always at the end)."""

    def check(self) -> None:
        super().check()
        require_range(self, 1, MAX_ORDER, "n")
        if self.steps != 1:
            raise ConfigError(f"--steps must be 1 (counting is one pass), got {self.steps}")
        require_range(self, 1, 2**31, "min_count")
        if self.k <= 0:
            raise ConfigError(f"--k must be positive, got {self.k} (--smoothing mle is k = 0)")
        if not 0 < self.fixed_discount <= 1:
            raise ConfigError(f"--fixed-discount must be in (0, 1], got {self.fixed_discount}")

    def check_data(self) -> None:
        super().check_data()
        corpus = load_corpus(self.corpus)
        vocab = build_vocabulary(corpus.train_lines, self.level, self.min_count)
        if len(vocab) == len(SPECIALS):
            raise DatasetError(f"corpus {self.corpus!r} has no {self.level} token seen "
                               f"--min-count {self.min_count} times in its training split")

    def smoother(self) -> Smoothing:
        return Smoothing(self.smoothing, self.k, self.discount, self.fixed_discount)


@dataclass
class SampleOptions:
    """Options of ``mlatlas sample`` (and ``eval``, which ignores them) for n-gram runs."""

    prompt: str = ""
    """Text the samples start from (its characters or words must have been seen in
    training); each sample is the prompt followed by the generated text."""
    temperature: float = 1.0
    """Sample from p^(1/T), renormalised: below 1 sharper, above 1 flatter; positive."""
    length: int = 200
    """Tokens to generate after the prompt (characters or words; a newline is one)."""

    def __post_init__(self) -> None:
        check_options(self)
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        require_range(self, 1, 100_000, "length")


def _corpus(cfg: Config) -> Corpus:
    return load_corpus(cfg.corpus)


def _curve(counts: NgramCounts, test: Encoded, smoothing: Smoothing) -> dict[int, float]:
    history, y = ngram_windows(test, counts.order)
    out = {}
    with np.errstate(divide="ignore"):
        for order in range(1, counts.order + 1):
            out[order] = perplexity(np.log(probabilities(counts, history, y, smoothing, order)))
    return out


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    """Count the model in one step (checkpoint group ``model``: the count tables and the
    vocabulary), log train and held-out perplexity, and write summary.json and
    ``perplexity.png`` (held-out perplexity against n = 1..max(5, n) for each smoothing)."""
    corpus = _corpus(cfg)
    run = run or Run.create(cfg.METHOD, cfg)
    vocab, train_ids = encode_training(corpus.train_lines, cfg.level, cfg.min_count)
    test_ids = encode(corpus.test_lines, vocab, cfg.level)
    smoothing = cfg.smoother()
    tables = empty_tables(cfg.n)
    timing = {}

    def step(_: int) -> dict[str, float]:
        t0 = time.perf_counter()
        counts = count_ngrams(*ngram_windows(train_ids, cfg.n), len(vocab))
        timing["count_s"] = time.perf_counter() - t0
        tables.update(to_tables(counts, vocab))
        train_lp = log_probabilities(counts, train_ids, smoothing)
        test_lp = log_probabilities(counts, test_ids, smoothing)
        metrics = {"train_perplexity": perplexity(train_lp), "vocab_size": len(vocab),
                   "ngram_types": sum(g.size for g in counts.grams),
                   "test_zero_probability": float(np.mean(~np.isfinite(test_lp)))}
        if np.isfinite(test_lp).all():
            metrics["test_perplexity"] = perplexity(test_lp)
        return metrics

    fit(run, step, total_steps=cfg.steps, objects={"model": tables}, log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every, progress=progress)
    counts, _ = from_tables(tables, cfg.n, str(run.path(CHECKPOINT)))
    train_lp = log_probabilities(counts, train_ids, smoothing)
    summary = {"train/perplexity": perplexity(train_lp), "train/tokens": int(train_lp.size),
               "train/vocab_size": len(vocab), "train/ngram_types": sum(g.size for g in
                                                                         counts.grams)}
    if "count_s" in timing:
        summary["train/count_seconds"] = round(timing["count_s"], 4)
    if smoothing.kind == "kneser_ney":
        for k in range(1, cfg.n + 1):
            d = level_terms(counts, k, k == cfg.n, smoothing).discounts
            summary.update({f"train/discount{k}_{j}": float(d[j - 1]) for j in (1, 2, 3)})
    run.write_summary({k: _finite(v) for k, v in summary.items()})
    curve_orders = max(CURVE_ORDERS, cfg.n)
    wide = counts if cfg.n == curve_orders else count_ngrams(
        *ngram_windows(train_ids, curve_orders), len(vocab))
    curves = {name: _curve(wide, test_ids, s) for name, s in (
        (f"add-k (k={cfg.k:g})", Smoothing("add_k", cfg.k)),
        ("Kneser-Ney, " + cfg.discount, smoothing if smoothing.kind == "kneser_ney" else
         Smoothing("kneser_ney", discount=cfg.discount, fixed_discount=cfg.fixed_discount)),
        ("MLE", Smoothing("mle")))}
    run.save_figure(_curve_figure(curves, cfg), "perplexity.png")
    evaluate(run, None, 0, progress)
    return run


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _curve_figure(curves: dict[str, dict[int, float]], cfg: Config):
    from mlatlas.core.plots import plt  # pyplot on the Agg backend

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        finite = {n: p for n, p in curve.items() if math.isfinite(p)}
        if finite:
            ax.plot(list(finite), list(finite.values()), marker="o", label=name)
    ax.set_xlabel("order n")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{cfg.corpus}, {cfg.level} level")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def load_model(run: Run) -> tuple[Config, NgramCounts, list[str]]:
    """A run's config, counts and vocabulary (a CheckpointError for a checkpoint that holds
    none or whose tables do not hold together)."""
    from mlatlas.core.io import load_tensors

    cfg = run.load_config(Config)
    path = run.path(CHECKPOINT)
    if not run.has_checkpoint():
        raise CheckpointError(f"{run.dir} has no checkpoint yet")
    tensors = load_tensors(path)
    tables = {}
    for name in empty_tables(cfg.n):
        if f"model.{name}" not in tensors:
            raise CheckpointError(f"{path}: checkpoint has no tensor model.{name}")
        tables[name] = tensors[f"model.{name}"]
    counts, vocab = from_tables(tables, cfg.n, str(path))
    return cfg, counts, vocab


def _prompt_ids(prompt: str, vocab: list[str], level: str) -> list[list[int]]:
    """The prompt's lines as token ids (the last line is the one the samples continue)."""
    index = {t: i for i, t in enumerate(vocab) if i >= len(SPECIALS)}
    lines = prompt.replace("\r\n", "\n").split("\n")
    tokens = [tokenize(line, level) for line in lines]
    unseen = sorted({t for line in tokens for t in line if t not in index})
    if unseen:
        kind = "characters" if level == "char" else "words"
        shown = ", ".join(repr(t) for t in unseen[:10])
        more = f" and {len(unseen) - 10} more" if len(unseen) > 10 else ""
        raise ConfigError(f"--prompt has {kind} never seen in training: {shown}{more}")
    return [[index[t] for t in line] for line in tokens]


def sample(run: Run, n: int, seed: int, progress: bool | None = None,
           options: SampleOptions | None = None) -> list[str]:
    """``n`` texts, each the prompt and ``length`` tokens drawn from p(w | h)^(1/T), 256 texts
    at a time (a loop over positions; ``</s>`` ends a line and the next starts from ``<s>``).
    A drawn ``<unk>`` is written as U+FFFD (characters) or ``<unk>`` (words)."""
    options = options or SampleOptions()
    cfg, counts, vocab = load_model(run)
    smoothing = cfg.smoother()
    prompt_lines = _prompt_ids(options.prompt, vocab, cfg.level)
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    width = max(cfg.n - 1, 1)
    start = np.concatenate([np.full(width, BOS_ID, dtype=np.int64),
                            np.array(prompt_lines[-1], dtype=np.int64)])[-width:]
    generator = torch.Generator().manual_seed(seed)
    drawn = np.zeros((n, options.length), dtype=np.int64)
    from mlatlas.core.progress import progress_bar

    bar = progress_bar(total=n * options.length, progress=progress, desc="ngram sample")
    for first in range(0, n, SAMPLE_BATCH):  # batches bound the memory of the distributions
        rows = slice(first, min(first + SAMPLE_BATCH, n))
        history = np.tile(start, (rows.stop - rows.start, 1))
        for t in range(options.length):
            p = torch.from_numpy(next_token_distribution(counts, history, smoothing))
            log_p = torch.log(p)
            # Shifted so the likeliest token is 0 before dividing: a tiny T cannot make every
            # logit -inf.
            logits = (log_p - log_p.max(dim=1, keepdim=True).values) / options.temperature
            w = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator)[:, 0]
            w = w.numpy()
            drawn[rows, t] = w
            shifted = np.concatenate([history[:, 1:], w[:, None]], axis=1)
            history = np.where((w == EOS_ID)[:, None], BOS_ID, shifted)
            bar.update(rows.stop - rows.start)
    bar.close()
    unk = "\ufffd" if cfg.level == "char" else UNK
    return [options.prompt + render(row, vocab, cfg.level, unk, after=options.prompt)
            for row in drawn.tolist()]


def render(ids: list[int], vocab: list[str], level: str, unk: str = UNK, after: str = "") -> str:
    """Token ids as text: ``</s>`` a newline; words separated by one space (none after a
    newline, nor before the first word when ``after``, the text before, ends in a space)."""
    out, gap = [], bool(after) and not after[-1].isspace()
    for i in ids:
        if i == EOS_ID:
            out.append("\n")
            gap = False
            continue
        token = unk if i == UNK_ID else vocab[i]
        out.append((" " if gap and level == "word" else "") + token)
        gap = True
    return "".join(out)


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None,
             options: SampleOptions | None = None) -> dict:
    """Score the first ``n`` held-out lines (None: all of them) exactly; ``seed`` and the
    sampling ``options`` change nothing (no random draw is made). Returns and writes to
    summary.json ``perplexity``, ``nats_per_token``, ``bits_per_char``, ``tokens``,
    ``oov_rate`` (held-out tokens read as ``<unk>``) and ``perplexity_n1`` .. ``_n<order>``
    (the model counted at each lower order). An infinite perplexity (a maximum-likelihood
    model meeting an unseen n-gram) is written as null, with ``zero_probability``, the share
    of tokens given probability 0."""
    if n is not None and n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    cfg, counts, vocab = load_model(run)
    lines = _corpus(cfg).test_lines
    if n is not None:
        lines = lines[:n]
    test = encode(lines, vocab, cfg.level)
    smoothing = cfg.smoother()
    lp = log_probabilities(counts, test, smoothing)
    real = int(test.ids.size)
    nats = -float(lp.sum())
    metrics = {"perplexity": _finite(perplexity(lp)),
               "nats_per_token": _finite(nats / lp.size),
               "bits_per_char": _finite(nats / test.n_chars / math.log(2)),
               "tokens": int(lp.size), "characters": test.n_chars,
               "oov_rate": test.oov / real if real else 0.0,
               "zero_probability": float(np.mean(~np.isfinite(lp)))}
    for order, value in _curve(counts, test, smoothing).items():
        metrics[f"perplexity_n{order}"] = _finite(value)
    run.write_evaluation(metrics)
    return metrics
