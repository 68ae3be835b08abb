"""Text side: a byte-pair tokenizer trained on the run's own captions, and a text tower.

The tokenizer is a BPE model (Sennrich et al. 2016) learnt with the ``tokenizers`` library from
the training captions alone (lower-cased, split on whitespace and punctuation), so nothing is
downloaded; it is saved beside the run as ``tokenizer.json``. A caption becomes

    [BOS] w_1 ... w_n [EOS] [PAD] ...

The text tower embeds tokens and positions, runs a Transformer (bidirectional with a padding
mask, as BERT and BLIP's text encoder; causal for a decoder) and pools the [BOS] position: its
output is the sentence feature that CLIP, SigLIP and LiT project into the joint space.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mlatlas.contrastive.transformer import Transformer
from mlatlas.core.io import write_text

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[ENC]")
PAD, UNK, BOS, EOS, ENC = range(len(SPECIAL_TOKENS))


class Tokenizer:
    """Captions <-> padded id tensors with a trained BPE vocabulary."""

    def __init__(self, backend, max_len: int):
        self.backend = backend
        self.max_len = max_len

    @classmethod
    def train(cls, texts: list[str], vocab_size: int = 256, max_len: int = 24) -> Tokenizer:
        from tokenizers import Tokenizer as Backend
        from tokenizers import models, normalizers, pre_tokenizers, trainers

        backend = Backend(models.BPE(unk_token="[UNK]"))
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      show_progress=False)
        backend.train_from_iterator(texts, trainer)
        return cls(backend, max_len)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def to_json(self) -> str:
        return json.dumps({"max_len": self.max_len, "backend": self.backend.to_str()})

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        data = json.loads(text)
        return cls(Backend.from_str(data["backend"]), data["max_len"])

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls.from_json(Path(path).read_text())

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both (N, max_len): [BOS] tokens [EOS] then padding; ``mask`` is True on
        real tokens. Captions longer than ``max_len`` - 2 tokens are cut."""
        body = self.max_len - 2
        rows = [[BOS, *e.ids[:body], EOS] for e in self.backend.encode_batch(list(texts))]
        ids = torch.full((len(rows), self.max_len), PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        return ids, ids != PAD

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Texts of (N, L) ids, stopping at [EOS] and skipping special tokens."""
        texts = []
        for row in ids.tolist():
            row = row[:row.index(EOS)] if EOS in row else row
            texts.append(self.backend.decode([i for i in row if i >= len(SPECIAL_TOKENS)]))
        return texts


class TextTower(nn.Module):
    """Token + position embeddings and a Transformer; ``forward`` gives the pooled (N, width)
    feature at [BOS], ``tokens`` the whole (N, L, width) sequence."""

    def __init__(self, vocab_size: int, max_len: int, width: int = 128, depth: int = 2,
                 heads: int = 4, cross: bool = False):
        super().__init__()
        self.width = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.transformer = Transformer(width, depth, heads, cross)

    def tokens(self, ids: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
               context: torch.Tensor | None = None) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > len(self.position_embedding):
            raise ValueError(f"text tower needs (N, L <= {len(self.position_embedding)}) token "
                             f"ids, got {tuple(ids.shape)}")
        h = self.token_embedding(ids) + self.position_embedding[:ids.shape[1]]
        return self.transformer(h, mask, causal, context)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.tokens(ids, mask)[:, 0]
