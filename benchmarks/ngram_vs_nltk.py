"""Our n-gram counting and scoring beside nltk.lm's, on the pydoc corpus, same maths.

    python benchmarks/ngram_vs_nltk.py [--level char] [--n 3] [--train-lines 0]
        [--test-tokens 0]

Both count the same k-grams of the training split (those ending at a predicted token: nltk is
fitted on them, as in tests/test_parity_nltk.py), with rare tokens (fewer than 2) unknown, and
score the first ``--test-tokens`` held-out tokens (0: all) with interpolated Kneser-Ney at one
fixed discount 0.1 (nltk's ``KneserNeyInterpolated``; ours with ``uniform_base=False``, nltk's
unigram convention) and add-one (nltk's ``Laplace``; ours with nltk's |V|, histories seen in
training). nltk's counting time is its ``Vocabulary`` and ``fit`` on k-gram tuples made
beforehand (their making is timed apart); ours is vocabulary, ids and counts from the lines.
``--train-lines`` limits the training split (0: all of it). Printed: the seconds each
library spends counting and scoring, the speed ratio, the held-out perplexity of each and the
largest absolute difference of the probabilities of the scored tokens. nltk's Kneser-Ney
scores each token by walking every history of the order above (its continuation counts are
not precomputed), so its time grows with the number of n-gram types; keep n small or limit the
tokens. Goal: ours at least 20x faster.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from mlatlas.data.text import load_pydoc
from mlatlas.generative.autoregressive import ngram as ng


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--level", choices=("char", "word"), default="char")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--train-lines", type=int, default=0)
    parser.add_argument("--test-tokens", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from nltk.lm import KneserNeyInterpolated, Laplace, Vocabulary

    corpus = load_pydoc()
    lines = corpus.train_lines[:args.train_lines or None]
    n, level = args.n, args.level

    # Ours: vocabulary, ids, counts; then the log-probability of every held-out token.
    t0 = time.perf_counter()
    vocab, train = ng.encode_training(lines, level, 2)
    counts = ng.count_ngrams(*ng.ngram_windows(train, n), len(vocab))
    ours_count = time.perf_counter() - t0
    test = ng.encode(corpus.test_lines, vocab, level)
    history, y = ng.ngram_windows(test, n)
    if args.test_tokens:
        history, y = history[:args.test_tokens], y[:args.test_tokens]

    # nltk: the same k-grams, as tuples of strings (made outside its timed counting).
    t0 = time.perf_counter()
    padded = [[ng.BOS] * (n - 1) + ng.tokenize(line, level) + [ng.EOS] for line in lines]
    kgrams = [[tuple(s[t - k + 1:t + 1]) for t in range(n - 1, len(s)) for k in range(1, n + 1)]
              for s in padded]
    tuples_s = time.perf_counter() - t0
    names = ["<UNK>" if i == ng.UNK_ID else t for i, t in enumerate(vocab)]
    contexts = [tuple(names[i] for i in row) for row in history]
    words = [names[i] for i in y]

    rows = []
    for name, smoothing, cls in (
            ("Kneser-Ney D=0.1", ng.Smoothing("kneser_ney", discount="fixed", fixed_discount=0.1,
                                              uniform_base=False),
             lambda v: KneserNeyInterpolated(n, discount=0.1, vocabulary=v)),
            ("Laplace", ng.Smoothing("add_k", k=1.0, vocab_size=None),
             lambda v: Laplace(n, vocabulary=v))):
        t0 = time.perf_counter()
        nltk_vocab = Vocabulary([t for s in padded for t in s], unk_cutoff=2)
        model = cls(nltk_vocab)
        model.fit(kgrams)
        nltk_count = time.perf_counter() - t0
        if name == "Laplace":
            smoothing = ng.Smoothing("add_k", k=1.0, vocab_size=len(nltk_vocab))
        t0 = time.perf_counter()
        p_ours = ng.probabilities(counts, history, y, smoothing)
        ours_score = time.perf_counter() - t0
        t0 = time.perf_counter()
        p_nltk = np.array([model.score(w, c) for w, c in zip(words, contexts, strict=True)])
        nltk_score = time.perf_counter() - t0
        compared = np.ones(len(y), dtype=bool)
        if name == "Laplace":  # nltk gives an unseen history 1/|V|; ours backs off
            compared = ng.context_ids(counts, history)[n - 1] >= 0
        diff = float(np.abs(p_ours - p_nltk)[compared].max())
        rows.append((name, ours_count, ours_score, nltk_count, nltk_score, diff,
                     math.exp(-np.log(p_ours).mean()), math.exp(-np.log(p_nltk).mean()),
                     int(compared.sum())))

    print(f"pydoc, {level} level, n = {n}: {train.ids.size + len(lines)} training tokens, "
          f"{len(y)} held-out tokens scored, |V| = {len(vocab)}")
    print(f"{'model':18s} {'ours count+score s':>19s} {'nltk count+score s':>19s} "
          f"{'speed-up':>9s} {'PP ours':>9s} {'PP nltk':>9s} {'max |dp|':>9s}")
    for name, oc, os_, nc, ns, diff, pp_ours, pp_nltk, compared in rows:
        print(f"{name:18s} {oc:8.3f} + {os_:8.3f} {nc:8.3f} + {ns:8.3f} "
              f"{(nc + ns) / (oc + os_):8.0f}x {pp_ours:9.3f} {pp_nltk:9.3f} {diff:9.1e}"
              f"  ({compared} tokens compared)")
    print(f"(making nltk's k-gram tuples took {tuples_s:.3f} s more, not counted above; the "
          "perplexities are over the tokens scored, Laplace's over every one)")


if __name__ == "__main__":
    main()
