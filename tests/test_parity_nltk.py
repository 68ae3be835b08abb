"""Parity with nltk.lm: our add-one and fixed-discount interpolated Kneser-Ney give nltk's
``Laplace`` and ``KneserNeyInterpolated`` probabilities to 1e-9 on a slice of the pydoc corpus.

The comparison is of the same maths, so three of nltk's conventions are met explicitly:

- Counts. nltk's ``padded_everygram_pipeline`` pads both ends of a sentence with n-1 symbols and
  counts every k-gram of the padded sequence, so its lower orders also count ``<s> <s>`` and
  ``</s> </s>``, k-grams that predict a padding symbol. Our model counts, at every order, the
  k-grams that end at a predicted token (one ``</s>``, no ``<s>`` predicted). nltk is therefore
  fitted on exactly those k-grams, written here from the text independently of our counting.
  On them nltk's lower-order gamma, D |{w : c(h w) > 0}| / N1+(. h .), equals the textbook
  D |{w : N1+(. h w) > 0}| / N1+(. h .), since every k-gram below the top order has a token
  before it.
- The unigram level. nltk ends the Kneser-Ney recursion in the undiscounted continuation
  unigram N1+(. w) / N1+(. .); ours (Chen & Goodman) discounts it and interpolates 1/V. The
  test uses our documented option ``Smoothing(uniform_base=False)``.
- Laplace. nltk's |V| counts ``<s>`` (and ``<UNK>``), and an unseen history gets 1/|V|; ours
  never predicts ``<s>`` and backs off from an unseen history. The test passes nltk's |V| as
  ``vocab_size`` and compares histories seen in training and words other than ``<s>``.

Rare tokens (fewer than 2 in training) are ``<UNK>`` in nltk (``unk_cutoff=2``) and ``<unk>``
in ours (``min_count=2``), so the unknown-token path is compared too.
"""

import numpy as np
import pytest

from mlatlas.data.text import load_pydoc
from mlatlas.generative.autoregressive import ngram as ng

nltk_lm = pytest.importorskip("nltk.lm")


def padded(tokens, n):
    return [ng.BOS] * (n - 1) + list(tokens) + [ng.EOS]


def predicted_kgrams(sentences, n):
    """For every sentence, the k-grams (k = 1..n) ending at each predicted token."""
    for tokens in sentences:
        seq = padded(tokens, n)
        yield [tuple(seq[t - k + 1:t + 1]) for t in range(n - 1, len(seq))
               for k in range(1, n + 1)]


def fitted(cls, sentences, n, **kwargs):
    vocab = nltk_lm.Vocabulary([t for s in sentences for t in padded(s, n)], unk_cutoff=2)
    model = cls(n, vocabulary=vocab, **kwargs)
    model.fit(predicted_kgrams(sentences, n))
    return model


def ours(lines, level, n):
    vocab = ng.build_vocabulary(lines, level, min_count=2)
    encoded = ng.encode(lines, vocab, level)
    return ng.count_ngrams(*ng.ngram_windows(encoded, n), len(vocab)), vocab


def queries(corpus, level, n, vocab, how_many):
    """Histories of held-out and training positions (some unseen in training), as id rows and
    as nltk's tuples of strings."""
    rng = np.random.default_rng(0)
    lines = corpus.test_lines[:20] + corpus.train_lines[:20]
    history, _ = ng.ngram_windows(ng.encode(lines, vocab, level), n)
    history = np.unique(history, axis=0)
    history = history[rng.permutation(len(history))[:how_many]]
    names = [ng.UNK if i == ng.UNK_ID else t for i, t in enumerate(vocab)]
    return history, [tuple("<UNK>" if i == ng.UNK_ID else names[i] for i in row)
                     for row in history]


@pytest.mark.parametrize(("level", "n", "lines", "how_many"),
                         [("char", 3, 60, 40), ("char", 4, 40, 25), ("word", 3, 120, 25)])
def test_kneser_ney_with_one_fixed_discount_equals_nltk(level, n, lines, how_many):
    corpus = load_pydoc()
    train = corpus.train_lines[:lines]
    counts, vocab = ours(train, level, n)
    reference = fitted(nltk_lm.KneserNeyInterpolated,
                       [ng.tokenize(line, level) for line in train], n, discount=0.1)
    assert len(reference.vocab) == len(vocab)
    history, contexts = queries(corpus, level, n, vocab, how_many)
    assert (ng.context_ids(counts, history)[n - 1] < 0).any()  # unseen histories included
    smoothing = ng.Smoothing("kneser_ney", discount="fixed", fixed_discount=0.1,
                             uniform_base=False)
    dense = ng.next_token_distribution(counts, history, smoothing)
    words = ["<UNK>" if i == ng.UNK_ID else t for i, t in enumerate(vocab)]
    theirs = np.array([[reference.score(w, c) for w in words] for c in contexts])
    np.testing.assert_allclose(dense, theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("level", "n", "lines"), [("char", 3, 200), ("word", 3, 200)])
def test_laplace_equals_nltk(level, n, lines):
    corpus = load_pydoc()
    train = corpus.train_lines[:lines]
    counts, vocab = ours(train, level, n)
    reference = fitted(nltk_lm.Laplace, [ng.tokenize(line, level) for line in train], n)
    history, contexts = queries(corpus, level, n, vocab, 60)
    seen = ng.context_ids(counts, history)[n - 1] >= 0
    assert seen.sum() >= 20
    smoothing = ng.Smoothing("add_k", k=1.0, vocab_size=len(reference.vocab))
    dense = ng.next_token_distribution(counts, history[seen], smoothing)
    words = ["<UNK>" if i == ng.UNK_ID else t for i, t in enumerate(vocab)]
    theirs = np.array([[reference.score(w, c) for w in words]
                       for c, s in zip(contexts, seen, strict=True) if s])
    np.testing.assert_allclose(dense[:, 1:], theirs[:, 1:], rtol=0, atol=1e-9)
