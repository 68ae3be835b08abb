"""The n-gram model against a character-level tiny Llama of the LLM family, same split, per
character.

    python benchmarks/ngram_vs_char_llama.py [--corpus pydoc] [--n 5] [--seconds 300]
        [--threads 1]

The n-gram model (`mlatlas train ngram --level char`, modified Kneser-Ney) is counted on the
corpus's training split and scored on its held-out split. The language model is
`mlatlas.llm.model.TinyLM` (the LLM family's Llama layout, its default width: 4 layers of 128)
over the same characters (a newline is a character; held-out characters unseen in training
share one id), trained by Adam on random 256-character windows of the training text for
``--seconds`` of wall time. It is scored twice: once its training time has reached the n-gram
model's (the same budget) and at the end. Scoring runs over the held-out text in windows of 256
with a stride of 128, each character scored once with at least 128 characters of context (the
first window's all). Both report bits per character on the same count of characters (a newline
per line; the n-gram model scores `</s>` where the text has its newline).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mlatlas.core.run import Run
from mlatlas.core.runtime import set_threads
from mlatlas.data.text import load_corpus
from mlatlas.generative.autoregressive import ngram
from mlatlas.llm.model import LMConfig, TinyLM, count_parameters

WINDOW, STRIDE = 256, 128


def encode(text: str, vocab: dict[str, int]) -> torch.Tensor:
    unk = len(vocab)
    return torch.tensor([vocab.get(ch, unk) for ch in text], dtype=torch.long)


def lm_bits_per_char(model: TinyLM, ids: torch.Tensor) -> float:
    """Bits per character of the held-out ids, each scored once (see the module docstring)."""
    model.eval()
    nats, count = 0.0, 0
    with torch.no_grad():
        starts = list(range(0, max(1, len(ids) - WINDOW), STRIDE))
        for i in range(0, len(starts), 16):
            chunk = [ids[s:s + WINDOW + 1] for s in starts[i:i + 16]]
            full = [c for c in chunk if len(c) == WINDOW + 1]
            if not full:
                break
            batch = torch.stack(full)
            logp = F.log_softmax(model(batch[:, :-1]).float(), -1)
            token_logp = logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
            for row, start in zip(token_logp, starts[i:i + len(full)], strict=True):
                scored = row if start == 0 else row[WINDOW - STRIDE:]
                nats -= float(scored.sum())
                count += len(scored)
    model.train()
    return nats / count / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="pydoc")
    parser.add_argument("--n", type=int, default=5, help="the n-gram order")
    parser.add_argument("--seconds", type=float, default=300.0, help="the LM's training time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("runs/ngram-vs-llama"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)

    cfg = ngram.Config(corpus=args.corpus, level="char", n=args.n)
    start = time.perf_counter()
    run = ngram.train(cfg, Run.create("ngram", cfg, root=args.out), progress=False)
    ngram_seconds = time.perf_counter() - start
    ngram_bpc = ngram.evaluate(run)["bits_per_char"]

    corpus = load_corpus(args.corpus)
    vocab = {ch: i for i, ch in enumerate(sorted(set(corpus.train)))}
    train_ids, test_ids = encode(corpus.train, vocab), encode(corpus.test, vocab)
    torch.manual_seed(0)
    model = TinyLM(LMConfig(vocab_size=len(vocab) + 1, max_seq_len=WINDOW))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    at_budget, steps, trained = None, 0, 0.0
    while trained < args.seconds:
        tick = time.perf_counter()
        starts = torch.randint(len(train_ids) - WINDOW - 1, (args.batch_size,),
                               generator=generator)
        batch = torch.stack([train_ids[s:s + WINDOW + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        trained += time.perf_counter() - tick
        if at_budget is None and trained >= ngram_seconds:
            at_budget = (steps, trained, lm_bits_per_char(model, test_ids))
    final = (steps, trained, lm_bits_per_char(model, test_ids))

    print(f"{args.corpus}: {len(corpus.train):,} training and {len(corpus.test):,} held-out "
          f"characters; {args.threads} thread(s)")
    print("| model | training | held-out bits/char | perplexity per char |")
    print("|---|---|---:|---:|")
    print(f"| {args.n}-gram, modified Kneser-Ney | counted in {ngram_seconds:.1f} s | "
          f"{ngram_bpc:.3f} | {2 ** ngram_bpc:.2f} |")
    params = count_parameters(model)
    for label, (s, secs, bpc) in (("same budget", at_budget), ("full budget", final)):
        if s is None:
            continue
        print(f"| TinyLM {params / 1e6:.2f}M parameters, {label} | {s} steps, {secs:.0f} s | "
              f"{bpc:.3f} | {2 ** bpc:.2f} |")


if __name__ == "__main__":
    main()
