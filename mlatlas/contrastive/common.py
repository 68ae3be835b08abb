"""What the contrastive methods share: the family's config base, the optimisation step, the
run's tokenizer and nested run folders, batched encoding without gradients and the held-out
examples of ``evaluate``.

The learning rate warms up linearly for ``warmup_steps`` and then follows a cosine to zero,
lr(k) = lr * min(1, k / warmup) * (1 + cos(pi * k / K)) / 2, as CLIP and SimCLR train
(``mlatlas.core.optim.warmup_cosine_lr``); it is a function of the step alone, so a resumed run
needs no scheduler state. Each step may clip the global gradient norm, |g| <= ``grad_clip``.

Data-parallel (``mlatlas train METHOD --nproc N``, ``BatchConfig``): ``batch_size`` is the global
batch B; each of the W ranks trains on its B / W rows of it, draws the random numbers of the whole
batch (``mlatlas.core.distributed``) and returns a loss L_r whose mean over ranks is the
one-process loss, so the averaged gradients are the full batch's. Rank 0 alone writes the files
(the tokenizer, nested run folders, figures, the evaluation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from mlatlas.contrastive.data import CaptionedData, CaptionedSplit, check_captioned
from mlatlas.contrastive.text import CaptionTokenizer, MiniLMTokenizer, load_tokenizer
from mlatlas.core import distributed
from mlatlas.core.config import BatchConfig, ConfigError, require_at_least
from mlatlas.core.precision import Precision
from mlatlas.core.run import Run

TOKENIZER = "tokenizer.json"


@dataclass
class ContrastiveConfig(BatchConfig):
    """The family base of the image methods (CLIP, SigLIP, LiT, BLIP, SimCLR): captioned data,
    AdamW with warm-up + cosine, gradient clipping and the image tower. Each method's
    ``Config`` extends it directly and declares the rest itself (the text tower's fields in
    CLIP, SigLIP, LiT and BLIP, whose shared defaults and help texts a test keeps equal). CPC
    reads sequences with none of these fields and extends ``BatchConfig`` itself. The one
    global batch size is ``batch_size`` (``SHARDED``)."""

    SHARDED: ClassVar[tuple[str, ...]] = ("batch_size",)

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
    grad_clip: float = 0.0
    """Clip the global gradient norm to this before each optimizer step (0: no clipping)."""
    log_every: int = 25
    image_tower: Literal["cnn", "vit"] = "cnn"
    """Image tower: cnn (three conv stages) or vit (patch Transformer)."""
    width: int = 128
    """Width of the towers: the dimension of the image representation."""
    cnn_stages: int = 3
    """Conv stages of the cnn image tower (each after the first halves the resolution)."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 2, "batch_size", "n_train")
        if self.weight_decay < 0:  # --lr and the integers are checked by check_fields
            raise ConfigError(f"--weight-decay cannot be negative, got {self.weight_decay}")
        check_grad_clip(self)
        require_at_least(self, 8, "width")
        require_at_least(self, 1, "cnn_stages")
        if self.width % 8:
            raise ConfigError(f"--width must be a multiple of 8, got {self.width}")

    def check_data(self) -> None:
        """The command line's check of the dataset name before it makes a run folder."""
        check_captioned(self.dataset)


def check_text_fields(cfg) -> None:
    """The checks of the text-tower fields that CLIP, SigLIP, LiT and BLIP declare."""
    require_at_least(cfg, 8, "embed_dim", "vocab_size")
    require_at_least(cfg, 1, "text_depth")
    require_at_least(cfg, 4, "max_len")


def check_grad_clip(cfg) -> None:
    if cfg.grad_clip < 0:
        raise ConfigError(f"--grad-clip must be non-negative (0 disables), got {cfg.grad_clip}")


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float,
                   precision: Precision | None = None) -> None:
    """One update of the optimizer's parameters from ``loss``: gradients (of the loss scaled by
    ``precision``'s fp16 loss scale; None: fp32), averaged over the ranks of a data-parallel
    job, unscaled, the global norm clipped to ``grad_clip`` (0: not clipped), the step."""
    if precision is None:
        precision = Precision("fp32", loss.device)
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss)
    precision.step(optimizer, [p for group in optimizer.param_groups for p in group["params"]],
                   grad_clip)


def run_tokenizer(run: Run, captions: list[str], vocab_size: int, max_len: int,
                  minilm: bool = False) -> CaptionTokenizer | MiniLMTokenizer:
    """The run's tokenizer: trained on ``captions`` (or MiniLM's own) and saved by the first
    call, read back from the run folder (so a resumed run, ``eval`` and every rank of a
    data-parallel job use the very same vocabulary)."""
    path = run.path(TOKENIZER)
    if distributed.is_main() and not path.is_file():
        tokenizer = MiniLMTokenizer(max_len) if minilm else \
            CaptionTokenizer.train(captions, vocab_size, max_len)
        tokenizer.save(path)
    distributed.barrier()  # the other ranks read the file rank 0 has written
    return load_tokenizer(path, max_len)


@torch.no_grad()
def encode_batched(encode: Callable[..., torch.Tensor], *inputs: torch.Tensor,
                   batch_size: int = 500) -> torch.Tensor:
    """``encode(*inputs)`` over batches of rows, without gradients, concatenated."""
    return torch.cat([encode(*(x[i:i + batch_size] for x in inputs))
                      for i in range(0, len(inputs[0]), batch_size)])


# --- evaluate(run, n, seed): the held-out examples ------------------------------------------

def held_out(size: int, n: int | None, seed: int) -> torch.Tensor:
    """Indices of the ``n`` held-out examples ``evaluate`` scores among ``size``: all of them in
    order when ``n`` is None or at least ``size``, else ``n`` drawn without replacement by a
    generator seeded with ``seed`` (kept in their original order)."""
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1 held-out example, got {n}")
    if n is None or n >= size:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def subset(split: CaptionedSplit, index: torch.Tensor) -> CaptionedSplit:
    """The examples ``index`` of a captioned split."""
    return CaptionedSplit(split.images[index], [split.captions[i] for i in index.tolist()],
                          split.labels[index], split.keys[index], split.corrupted[index])


def held_out_data(data: CaptionedData, n: int | None, seed: int) -> CaptionedData:
    """``data`` with its test and zero-shot splits cut to the ``n`` held-out examples of
    :func:`held_out` (the same draw for both, so digits, whose two splits are one, stay one)."""
    test = subset(data.test, held_out(len(data.test), n, seed))
    zero_shot = test if data.zero_shot is data.test else \
        subset(data.zero_shot, held_out(len(data.zero_shot), n, seed))
    return dataclasses.replace(data, test=test, zero_shot=zero_shot)


def train_scores(run: Run, dataset: str, **extra: Any) -> dict[str, Any]:
    """What training did, for summary.json's ``train/`` keys: the dataset, the steps and the
    last logged row's loss, with ``extra``."""
    last = run.last_row()
    return {"dataset": dataset, "steps": last.get("step", 0),
            "loss": last.get("loss", float("nan")), **extra}


def write_scores(run: Run, train: dict[str, Any], evaluation: dict[str, Any],
                 baseline: dict[str, Any] | None = None) -> None:
    """summary.json's ``train/`` keys (merged), then ``baseline/`` and ``eval/`` ones, each
    replacing every key the last evaluation wrote under its prefix."""
    run.write_summary({f"train/{name}": value for name, value in train.items()})
    if baseline is not None:
        run.write_evaluation(baseline, "baseline")
    run.write_evaluation(evaluation)
