"""What the contrastive methods share: the config fields, the learning-rate schedule, the
run's tokenizer and batched encoding without gradients.

The learning rate warms up linearly for ``warmup_steps`` and then follows a cosine to zero,
lr(k) = lr * min(1, k / warmup) * (1 + cos(pi * k / K)) / 2, as CLIP and SimCLR train; it is a
function of the step alone, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mlatlas.contrastive.data import check_captioned
from mlatlas.contrastive.text import CaptionTokenizer, MiniLMTokenizer, load_tokenizer
from mlatlas.core.config import BaseConfig, ConfigError, require_at_least
from mlatlas.core.run import Run

TOKENIZER = "tokenizer.json"


@dataclass
class ContrastiveConfig(BaseConfig):
    dataset: str = "shapes"
    """Captioned dataset: shapes, digits or mnist."""
    n_train: int = 10000
    """Training pairs generated for shapes (the digit sets have fixed sizes)."""
    batch_size: int = 128
    """Pairs per step: the number of negatives each positive is contrasted with, plus one."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    warmup_steps: int = 100
    """Linear warm-up steps before the cosine decay."""
    log_every: int = 25

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, 2, "batch_size", "n_train")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("--lr must be positive, --weight-decay and --warmup-steps "
                              "non-negative")

    def check_data(self) -> None:
        """The command line's check of the dataset name before it makes a run folder."""
        check_captioned(self.dataset)


@dataclass
class ImageTowerConfig(ContrastiveConfig):
    image_tower: str = "cnn"
    """Image tower: cnn (three conv stages) or vit (patch Transformer)."""
    width: int = 128
    """Width of the towers: the dimension of the image representation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_tower not in ("cnn", "vit"):
            raise ConfigError(f"--image-tower must be cnn or vit, got {self.image_tower!r}")
        require_at_least(self, 8, "width")
        if self.width % 8:
            raise ConfigError(f"--width must be a multiple of 8, got {self.width}")


@dataclass
class ImageTextConfig(ImageTowerConfig):
    text_depth: int = 2
    """Transformer blocks of the text tower."""
    embed_dim: int = 64
    """Dimension d of the joint (contrastive) embedding space."""
    vocab_size: int = 256
    """BPE vocabulary learnt from the training captions."""
    max_len: int = 24
    """Tokens per caption, [BOS] and [EOS] included (also the longest generated caption)."""
    steps: int = 1500

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, 8, "embed_dim", "vocab_size")
        require_at_least(self, 1, "text_depth")
        require_at_least(self, 4, "max_len")


def run_tokenizer(run: Run, captions: list[str], vocab_size: int, max_len: int,
                  minilm: bool = False) -> CaptionTokenizer | MiniLMTokenizer:
    """The run's tokenizer: trained on ``captions`` (or MiniLM's own) and saved on the first
    call, read back from the run folder afterwards (a resumed run and ``eval`` use the very same
    vocabulary)."""
    path = run.path(TOKENIZER)
    if path.is_file():
        return load_tokenizer(path, max_len)
    tokenizer = MiniLMTokenizer(max_len) if minilm else \
        CaptionTokenizer.train(captions, vocab_size, max_len)
    tokenizer.save(path)
    return tokenizer


@torch.no_grad()
def encode_batched(encode: Callable[..., torch.Tensor], *inputs: torch.Tensor,
                   batch_size: int = 500) -> torch.Tensor:
    """``encode(*inputs)`` over batches of rows, without gradients, concatenated."""
    return torch.cat([encode(*(x[i:i + batch_size] for x in inputs))
                      for i in range(0, len(inputs[0]), batch_size)])
