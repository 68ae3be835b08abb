"""BLIP (Li et al. 2022): one text Transformer in three modes, three losses, and CapFilt.

An image I gives tokens v = (v_1 .. v_T) (``image_tower.tokens``) and a pooled feature v_cls.
A caption T = (w_1 .. w_n) is read three ways by one set of weights:

- unimodal text encoder: <bos> w_1 .. w_n, bidirectional self-attention, no cross-attention;
  its <bos> output t_cls. Image-text contrastive loss on g_v(v_cls), g_w(t_cls), normalised:

      L_itc = (CE(s V W^T, diag) + CE(s W V^T, diag)) / 2          (CLIP's loss, s = exp t)

- image-grounded text encoder: <enc> w_1 .. w_n, bidirectional self-attention and
  cross-attention to v; a linear head on the <enc> output gives p_itm(I, T) = P(match). For each
  image a negative text is drawn from the batch with probability softmax_j(s v_i . w_j) (the
  positive excluded), and likewise a negative image for each text (ALBEF's hard negatives):

      L_itm = CE over the B positive pairs (label 1) and the 2B negative pairs (label 0)

- image-grounded text decoder: <bos> w_1 .. w_n <eos>, causal self-attention and
  cross-attention to v; a language-modelling head gives

      L_lm = -1/|w| sum_t log P(w_t | w_<t, I)        (padding ignored)

and L = L_itc + L_itm + L_lm. As in BLIP, encoder and decoder share every parameter (token and
position embeddings, cross-attention, MLPs, norms) but the self-attention layers (and the
LayerNorm in front of each), which the decoder has its own of: the three modes run the blocks of
one ``TextTower`` part by part, with the decoder's self-attention swapped in.

Data-parallel, each of W ranks holds n = B / W pairs of the global batch and each loss is a
rank's L_r whose mean over ranks is the one-process loss, so the run follows the one-process run:

- L_itc is CLIP's all-gather loss (``mlatlas.contrastive.distributed``);
- the hard negatives are drawn from the similarity of the whole global batch, B x B from every
  rank's (gathered, gradient-free) features and captions, with the generator's draws of a
  one-process run; a rank keeps its rows. A negative image may live on another rank: the
  image tokens v of every rank are gathered with their gradient (``all_gather_with_grad``,
  B x T x width floats each way per step), so the negative pair's gradient reaches the rank
  that encoded the image, as it reaches the image in one process;
- L_lm averages over the tokens of the whole batch: rank r's token mean times
  m_r / ((1/W) sum_s m_s), m_r its number of target tokens.

CapFilt's captioning and filtering run in full on every rank (the same deterministic result,
and no rank waits minutes in a collective for another); rank 0 writes ``capfilt.json``.

Left out of BLIP: momentum distillation and the momentum queues of ITC (the batch is the only
source of negatives), and label smoothing of L_lm. Negatives whose caption is identical to the
positive's (same token ids) are never drawn, since they are not mismatches; paraphrases of the
same content can still be drawn, a small share of false negatives.

CapFilt (``capfilt``): with ``capfilt`` on, the model trained on the noisy captions
(``corrupt`` of them describe another image) writes a caption per training image, its ITM head
removes the original and synthetic captions with p_itm < ``filter_threshold`` (default 1/3,
ITM's prior, not BLIP's 0.5: a small ITM stays near its prior), and a fresh model
trains on what is kept for the same number of steps, in the nested run folder ``<run>/stage2``.
The run's ``summary.json`` holds the final model's scores (``eval/``) and, for CapFilt, the noisy
model's (``baseline/``) and the filter's precision and recall against the known corrupted
captions (``train/``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.contrastive.capfilt import (
    CapFiltResult,
    bootstrap,
    capfilt,
    capfilt_figure,
    filter_scores,
)
from mlatlas.contrastive.common import (
    TOKENIZER,
    ContrastiveConfig,
    check_text_fields,
    encode_batched,
    held_out_data,
    optimizer_step,
    run_tokenizer,
    train_scores,
    write_scores,
)
from mlatlas.contrastive.data import NUMBER_WORDS, CaptionedData, load_captioned
from mlatlas.contrastive.distributed import all_gather_with_grad, clip_loss_distributed
from mlatlas.contrastive.evaluation import evaluate_joint_space, save_joint_space_figures
from mlatlas.contrastive.losses import CLIP_LOGIT_SCALE_INIT, CLIP_LOGIT_SCALE_MAX
from mlatlas.contrastive.text import ENC, CaptionTokenizer, TextTower, load_tokenizer
from mlatlas.contrastive.towers import ConvTower, ViTTower, image_tower
from mlatlas.core import distributed
from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.io import read_json, write_json
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.plots import metric_curves, plt, show_images
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit, nested_run
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import EpochBatches
from mlatlas.nn.attention import Attention
from mlatlas.nn.sampling import sample_token
from mlatlas.nn.tokenizers import BOS, EOS, PAD

STAGE2 = "stage2"
CAPFILT = "capfilt.json"
CAPTION_EVAL = 500


@dataclass
class Config(ContrastiveConfig):
    METHOD: ClassVar[str] = "blip"

    text_depth: int = 2
    """Transformer blocks of the text tower."""
    embed_dim: int = 64
    """Dimension d of the joint (contrastive) embedding space."""
    vocab_size: int = 256
    """BPE vocabulary learnt from the training captions."""
    max_len: int = 24
    """Tokens per caption, <bos> and <eos> included (also the longest generated caption)."""
    heads: int = 4
    """Attention heads of the text Transformer."""
    corrupt: float = 0.0
    """Share of training captions replaced by another image's caption (noisy web text)."""
    capfilt: bool = False
    """After training, caption and filter the training set and train a fresh model on it."""
    filter_threshold: float = 1 / 3
    """CapFilt keeps a caption when the ITM head's match probability is at least this. ITM
    trains on one positive per two negatives, so 1/3 is its prior: a kept pair has evidence of a
    match. BLIP's 0.5 suits an ITM trained long enough to be confident."""
    temperature: float = 0.0
    """Synthetic captions: 0 for greedy decoding, else sampling at this temperature."""
    top_p: float = 1.0
    """Synthetic captions sampled with --temperature > 0: nucleus mass (1 keeps every token)."""
    steps: int = 1500
    """Optimisation steps of each stage (the noisy model, then the CapFilt model)."""

    def check(self) -> None:
        super().check()
        check_text_fields(self)
        require_at_least(self, 1, "heads")
        if self.width % self.heads:
            raise ConfigError(f"--width must be a multiple of --heads, got {self.width}")
        if not 0.0 <= self.corrupt < 1.0:
            raise ConfigError(f"--corrupt must be in [0, 1), got {self.corrupt}")
        if not 0.0 < self.filter_threshold < 1.0:
            raise ConfigError(f"--filter-threshold must be in (0, 1), got {self.filter_threshold}")
        require_unit(self, "top_p", low_open=True)
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")


# --- losses and hard negatives (pure functions) ------------------------------------------------

def itm_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (no-match, match) logits (M, 2): label 1 for the positive pairs, 0 for
    the negatives, averaged over all pairs."""
    for name, x in (("positive", positive_logits), ("negative", negative_logits)):
        if x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(f"ITM {name} logits must be (M, 2), got {tuple(x.shape)}")
    logits = torch.cat([positive_logits, negative_logits])
    labels = torch.cat([torch.ones(len(positive_logits), dtype=torch.long),
                        torch.zeros(len(negative_logits), dtype=torch.long)]).to(logits.device)
    return F.cross_entropy(logits, labels)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, L, V) at position t predict ids[:, t + 1]; targets
    that are padding (``mask`` False) are ignored."""
    if logits.dim() != 3 or logits.shape[:2] != ids.shape or mask.shape != ids.shape:
        raise ValueError(f"lm_loss needs logits (B, L, V) and ids, mask (B, L), got "
                         f"{tuple(logits.shape)}, {tuple(ids.shape)}, {tuple(mask.shape)}")
    targets = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100)


def sample_hard_negatives(similarity: torch.Tensor, exclude: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row i of a (B, B) similarity, a column j != i drawn with probability
    softmax_j(similarity_ij) over the columns not in ``exclude`` (B, B) bool. A row whose every
    other column is excluded draws among all j != i."""
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"hard negatives need a square (B, B) similarity, got "
                         f"{tuple(similarity.shape)}")
    if len(similarity) < 2:
        raise ValueError("hard negatives need a batch of at least 2 pairs")
    eye = torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    blocked = eye if exclude is None else eye | exclude.bool()
    blocked = torch.where(blocked.all(1, keepdim=True), eye, blocked)
    weights = similarity.detach().float().masked_fill(blocked, float("-inf")).softmax(dim=1)
    if generator is not None and generator.device != weights.device:
        return torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(
            similarity.device)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


# --- the model --------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """LN then self-attention: the decoder's own part of each block."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = Attention(width, heads, fused_kv=True)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        return self.attn(self.norm(h), mask=mask, causal=causal)


class BLIP(nn.Module):
    """Image tower, one text Transformer with cross-attention read in three modes, the
    decoder's own self-attention, and the ITC projections, ITM head and LM head."""

    def __init__(self, image_tower: nn.Module, vocab_size: int, max_len: int, width: int = 128,
                 depth: int = 2, heads: int = 4, embed_dim: int = 64, image_size: int = 32):
        super().__init__()
        if image_tower.width != width:
            raise ValueError(f"image tower width {image_tower.width} != text width {width}")
        self.max_len = max_len
        self.image_tower = image_tower
        self.text = TextTower(vocab_size, max_len, width, depth, heads, cross=True)
        self.decoder_attention = nn.ModuleList(SelfAttention(width, heads) for _ in range(depth))
        with torch.no_grad():
            n_tokens = image_tower.tokens(
                torch.zeros(1, image_tower.in_channels, image_size, image_size)).shape[1]
        # Conv feature maps carry no absolute position ("on the left"); ViT tokens already do.
        self.image_position = nn.Parameter(torch.randn(n_tokens, width) * 0.02)
        self.image_projection = nn.Linear(width, embed_dim, bias=False)
        self.text_projection = nn.Linear(width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(CLIP_LOGIT_SCALE_INIT))
        self.itm_head = nn.Linear(width, 2)
        self.lm_head = nn.Linear(width, vocab_size)

    # image side
    def image_context(self, images: torch.Tensor) -> torch.Tensor:
        """(N, T, width) image tokens that the grounded modes cross-attend to."""
        tokens = self.image_tower.tokens(images)
        return tokens if isinstance(self.image_tower, ViTTower) else tokens + self.image_position

    def image_feature(self, tokens: torch.Tensor) -> torch.Tensor:
        """v_cls from ``image_tower.tokens``, as ``image_tower.forward`` pools them."""
        return tokens[:, 0] if isinstance(self.image_tower, ViTTower) else tokens.mean(1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(self.image_tower(images)), dim=-1)

    # text side: the blocks of ``self.text`` run part by part so that a mode can skip the
    # cross-attention (unimodal) or swap in the decoder's self-attention.
    def text_states(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                    context: torch.Tensor | None = None, decoder: bool = False) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.max_len:
            raise ValueError(f"BLIP needs (N, L <= {self.max_len}) token ids, got "
                             f"{tuple(ids.shape)}")
        if context is not None and len(context) != len(ids):
            raise ValueError(f"{len(ids)} captions but {len(context)} images")
        h = self.text.token_embedding(ids) + self.text.position_embedding[:ids.shape[1]]
        attn_mask = None if mask is None else mask[:, None, None, :]
        transformer = self.text.transformer
        for i, block in enumerate(transformer.blocks):
            if decoder:
                h = h + self.decoder_attention[i](h, attn_mask, causal=True)
            else:
                h = h + block.attn(block.norm1(h), mask=attn_mask)
            if context is not None:
                h = h + block.cross(block.norm_cross(h), context)
            h = h + block.mlp(block.norm2(h))
        return transformer.norm(h)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unimodal encoder: the normalised projection of the <bos> output."""
        return F.normalize(self.text_projection(self.text_states(ids, mask)[:, 0]), dim=-1)

    def itm_logits(self, ids: torch.Tensor, mask: torch.Tensor | None,
                   context: torch.Tensor) -> torch.Tensor:
        """(N, 2) no-match / match logits of the grounded encoder, <enc> in place of <bos>."""
        ids = torch.cat([torch.full_like(ids[:, :1], ENC), ids[:, 1:]], dim=1)
        return self.itm_head(self.text_states(ids, mask, context)[:, 0])

    def lm_logits(self, ids: torch.Tensor, mask: torch.Tensor | None,
                  context: torch.Tensor) -> torch.Tensor:
        """(N, L, V) next-token logits of the grounded causal decoder."""
        return self.lm_head(self.text_states(ids, mask, context, decoder=True))

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The three losses of a batch of (image, caption) pairs and their sum ``loss``: in a
        data-parallel job this rank's losses L_r of its share of the global batch (see the
        module's docstring), ITC in float32 whatever autocast the rest ran under."""
        v = self.image_context(images)
        x = F.normalize(self.image_projection(self.image_feature(v)), dim=-1)
        y = self.encode_text(ids, mask)
        # The global batch's captions, and its image tokens with their gradient.
        all_ids, all_mask, all_v = (distributed.all_gather(ids), distributed.all_gather(mask),
                                    all_gather_with_grad(v))
        with torch.autocast(v.device.type, enabled=False):
            x, y = x.float(), y.float()
            itc = clip_loss_distributed(x, y, self.logit_scale)
            with torch.no_grad():
                similarity = self.logit_scale.exp().clamp(max=CLIP_LOGIT_SCALE_MAX) * \
                    distributed.all_gather(x) @ distributed.all_gather(y).T
                same_text = (all_ids[:, None, :] == all_ids[None, :, :]).all(-1)
                # Drawn for the global batch as in one process; this rank's rows of the draws.
                negative_text = distributed.shard(
                    sample_hard_negatives(similarity, same_text, generator))
                negative_image = distributed.shard(
                    sample_hard_negatives(similarity.T, same_text, generator))
        positive = self.itm_logits(ids, mask, v)
        negative = self.itm_logits(torch.cat([all_ids[negative_text], ids]),
                                   torch.cat([all_mask[negative_text], mask]),
                                   torch.cat([v, all_v[negative_image]]))
        itm = itm_loss(positive, negative)
        # The mean over this rank's target tokens, weighted by its share of the global batch's.
        tokens = mask[:, 1:].sum().float()
        lm = lm_loss(self.lm_logits(ids, mask, v), ids, mask) * \
            (tokens / distributed.all_reduce_mean(tokens))
        return {"loss": itc + itm + lm, "itc_loss": itc, "itm_loss": itm, "lm_loss": lm}

    @torch.no_grad()
    def match_probability(self, images: torch.Tensor, ids: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
        """p_itm(I, T) of each (image, caption) pair."""
        return self.itm_logits(ids, mask, self.image_context(images)).softmax(-1)[:, 1]


# --- generation (the captioner) ---------------------------------------------------------------

@torch.no_grad()
def generate(model: BLIP, images: torch.Tensor, max_len: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Captions as (N, L) ids: <bos> w_1 .. <eos> then <pad>, decoded greedily (``temperature``
    0) or sampled (:func:`mlatlas.nn.sampling.sample_token`). A caption that reaches
    ``max_len`` ends with a forced <eos>."""
    max_len = max_len or model.max_len
    if not 2 <= max_len <= model.max_len:
        raise ValueError(f"max_len must be in [2, {model.max_len}], got {max_len}")
    v = model.image_context(images)
    ids = torch.full((len(images), max_len), PAD, dtype=torch.long, device=v.device)
    ids[:, 0] = BOS
    done = torch.zeros(len(images), dtype=torch.bool, device=v.device)
    for t in range(1, max_len):
        logits = model.lm_logits(ids[:, :t], None, v)[:, -1].float()
        logits[:, [PAD, BOS, ENC]] = float("-inf")
        if t == max_len - 1:
            logits[:, torch.arange(logits.shape[1]) != EOS] = float("-inf")
        token = sample_token(logits, temperature, top_p, generator)
        ids[:, t] = torch.where(done, PAD, token)
        done |= token == EOS
        if done.all():
            break
    return ids


def generate_captions(model: BLIP, tokenizer: CaptionTokenizer, images: torch.Tensor,
                      temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None,
                      batch_size: int = 500) -> list[str]:
    ids = encode_batched(lambda x: generate(model, x, temperature=temperature, top_p=top_p,
                                            generator=generator), images,
                         batch_size=batch_size)
    return tokenizer.decode(ids)


def caption_accuracy(captions: list[str], labels: torch.Tensor,
                     class_names: tuple[str, ...]) -> float:
    """Share of captions naming their image's class: every word of the class name begins a
    word of the caption ("red circle" in "two big red circles"); a digit may also be written
    as its numeral."""
    numbers = tuple(class_names) == NUMBER_WORDS
    hits = 0
    for text, c in zip(captions, labels.tolist(), strict=True):
        words = re.findall(r"[a-z0-9]+", text.lower())
        named = all(any(w.startswith(x) for w in words) for x in class_names[c].split())
        hits += named or (numbers and str(c) in words)
    return hits / max(1, len(captions))


# --- training ---------------------------------------------------------------------------------

def build_model(cfg: Config, data: CaptionedData, tokenizer: CaptionTokenizer) -> BLIP:
    channels, size, _ = data.image_shape
    return BLIP(image_tower(cfg.image_tower, channels, size, cfg.width, cfg.cnn_stages),
                tokenizer.vocab_size, cfg.max_len, cfg.width, cfg.text_depth, cfg.heads,
                cfg.embed_dim, size)


def load_data(cfg: Config) -> CaptionedData:
    return load_captioned(cfg.dataset, n_train=cfg.n_train, seed=cfg.seed, corrupt=cfg.corrupt)


def compile_parts(model: BLIP, enabled: bool) -> None:
    """``--compile``: BLIP calls its towers part by part (the image tokens; each text block's
    self-attention, cross-attention and MLP, run in three modes; the decoder's self-attention),
    so the parts are what is compiled."""
    image = model.image_tower
    parts = [image.net] if isinstance(image, ConvTower) else [image.embed, image.transformer]
    for block in model.text.transformer.blocks:
        parts += [block.attn, block.cross, block.mlp]
    for part in [*parts, *model.decoder_attention]:
        compile_module(part, enabled)


def train_blip(run: Run, cfg: Config, model: BLIP, images: torch.Tensor, captions: list[str],
               tokenizer: CaptionTokenizer, progress: bool | None = None) -> None:
    """Minimise L_itc + L_itm + L_lm over batches of the (image, caption) pairs (each rank its
    rows of the global batch)."""
    device = resolve_device(cfg.device)
    generator = seed_everything(cfg.seed)
    model.to(device)
    compile_parts(model, cfg.compile)
    precision = Precision(cfg.precision, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    images = images.to(device)
    ids, mask = (t.to(device) for t in tokenizer.encode(captions))
    batches = EpochBatches(len(images), cfg.batch_size, cfg.seed)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup_steps))
        index = distributed.shard(batches(step)).to(device)
        with precision.autocast():
            losses = model(images[index], ids[index], mask[index], generator)
        optimizer_step(optimizer, losses["loss"], cfg.grad_clip, precision)
        return {**{k: v.detach() for k, v in losses.items()},
                "logit_scale": model.logit_scale.detach().exp()}

    fit(run, step_fn, total_steps=cfg.steps, objects={"model": model, "optimizer": optimizer,
                                                       "rng": generator, "precision": precision},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress,
        latest=("logit_scale",))
    run.save_figure(metric_curves(run.metrics, ["itc_loss", "itm_loss", "lm_loss"],
                                  title=f"{run.method} training losses", log=False),
                   "loss.png")


def stage2_run(run: Run) -> Run:
    """The nested run folder of the model trained on the CapFilt data."""
    return nested_run(run.path(STAGE2), run.method, run.config, run.config_class)


def run_capfilt(run: Run, cfg: Config, model: BLIP, tokenizer: CaptionTokenizer,
                data: CaptionedData) -> CapFiltResult:
    """Caption and filter the training set once; the result is kept in the run folder so a
    resumed run bootstraps the same data. Every rank computes it (rank 0 looks for the file
    before it writes it, so all agree whether to)."""
    if distributed.broadcast_object(run.path(CAPFILT).is_file()):
        return CapFiltResult.from_dict(read_json(run.path(CAPFILT)))
    model.cpu().eval()
    generator = torch.Generator().manual_seed(cfg.seed)

    def match(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return encode_batched(model.match_probability, images, *tokenizer.encode(captions))

    result = capfilt(data.train.images, data.train.captions,
                     lambda x: generate_captions(model, tokenizer, x, cfg.temperature, cfg.top_p,
                                                       generator),
                     match, cfg.filter_threshold)
    model.train()
    if distributed.is_main():
        write_json(run.path(CAPFILT), result.to_dict())
    return result


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    data = load_data(cfg)
    tokenizer = run_tokenizer(run, data.train.captions, cfg.vocab_size, cfg.max_len)
    seed_everything(cfg.seed)
    model = build_model(cfg, data, tokenizer)
    train_blip(run, cfg, model, data.train.images, data.train.captions, tokenizer, progress)
    if not cfg.capfilt:
        if distributed.is_main():  # the evaluation and its figures are rank 0's
            report(run, model, tokenizer, data)
        return run
    result = run_capfilt(run, cfg, model, tokenizer, data)
    images, captions = bootstrap(data.train.images, data.train.captions, result)
    if len(captions) < cfg.batch_size:
        raise ConfigError(f"CapFilt kept {len(captions)} pairs, fewer than a batch of "
                          f"{cfg.batch_size}; lower --filter-threshold")
    seed_everything(cfg.seed)
    fresh = build_model(cfg, data, tokenizer)
    train_blip(stage2_run(run), cfg, fresh, images, captions, tokenizer, progress)
    if distributed.is_main():
        report(run, fresh, tokenizer, data, noisy=model, result=result)
    return run


# --- evaluation -------------------------------------------------------------------------------

def captions_figure(images: torch.Tensor, references: list[str], generated: list[str],
                    n: int = 8, title: str = ""):
    fig, axes = plt.subplots(n, 2, figsize=(7, 1.0 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 6]})
    for i, ax in enumerate(axes):
        show_images(ax[0], images[i:i + 1], ncols=1)
        ax[1].axis("off")
        ax[1].text(0, 0.6, f"generated: {generated[i]}", fontsize=8, transform=ax[1].transAxes)
        ax[1].text(0, 0.15, f"reference: {references[i]}", fontsize=8, color="grey",
                   transform=ax[1].transAxes)
    fig.suptitle(title or "captions of test images (greedy)")
    return fig


def caption_scores(model: BLIP, tokenizer: CaptionTokenizer, data: CaptionedData, seed: int = 0,
                   ) -> tuple[dict[str, float], list[str]]:
    """Greedy captions of the first ``CAPTION_EVAL`` test images: the share naming the right
    class, and the chance level (the same captions scored against the classes of the images
    shuffled by a generator seeded with ``seed``)."""
    split = data.test
    n = min(CAPTION_EVAL, len(split))
    generated = generate_captions(model, tokenizer, split.images[:n])
    shuffled = split.labels[:n][torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return {"caption_accuracy": caption_accuracy(generated, split.labels[:n], data.class_names),
            "caption_chance": caption_accuracy(generated, shuffled, data.class_names)}, generated


def model_scores(model: BLIP, tokenizer: CaptionTokenizer, data: CaptionedData, seed: int
                 ) -> tuple[dict[str, float], dict[str, torch.Tensor], list[str]]:
    """The ITC joint space's scores (zero-shot, retrieval, probe) and the captioner's; also the
    tensors of the figures and the generated captions."""
    model.cpu().eval()
    scores, tensors = evaluate_joint_space(model, tokenizer, data)
    captioning, generated = caption_scores(model, tokenizer, data, seed)
    model.train()
    return {**scores, **captioning}, tensors, generated


def report(run: Run, model: BLIP, tokenizer: CaptionTokenizer, data: CaptionedData,
           noisy: BLIP | None = None, result: CapFiltResult | None = None,
           n: int | None = None, seed: int = 0) -> dict[str, float]:
    """Score the final model (ITC joint space, captions; ``eval/``) on ``n`` held-out examples
    drawn with ``seed`` (see :func:`evaluate`), and for CapFilt the noisy model
    (``baseline/``) and the filter (``train/``); write ``summary.json`` and the figures; return
    the final model's scores."""
    held = held_out_data(data, n, seed)
    scores, tensors, generated = model_scores(model, tokenizer, held, seed)
    final_run = Run.open(run.path(STAGE2)) if noisy is not None else run
    train = train_scores(final_run, data.name, corrupt=run.config.get("corrupt", 0.0))
    baseline = None
    if noisy is not None and result is not None:
        noisy_scores = model_scores(noisy, tokenizer, held, seed)[0]
        baseline = {k: v for k, v in noisy_scores.items() if k != "zero_shot_chance"}
        train.update(filter_scores(result, data.train.corrupted))
        run.save_figure(capfilt_figure(data.train.images, data.train.captions,
                                       data.train.corrupted, result), "capfilt.png")
    examples = [{"reference": r, "generated": g}
                for r, g in zip(held.test.captions[:8], generated[:8], strict=True)]
    write_scores(run, train, {**scores, "examples": len(held.test), "seed": seed,
                              "caption_examples": examples}, baseline)
    save_joint_space_figures(run, held, scores, tensors)
    run.save_figure(captions_figure(held.test.images, held.test.captions, generated,
                                    n=min(8, len(generated))), "captions.png")
    return scores


def load_model(run: Run) -> tuple[Config, BLIP, CaptionTokenizer, CaptionedData]:
    """The run's config, its (first-stage) model, tokenizer and data."""
    cfg = run.load_config(Config)
    data = load_data(cfg)
    tokenizer = load_tokenizer(run.path(TOKENIZER), cfg.max_len)
    model = build_model(cfg, data, tokenizer)
    run.load_weights(model)
    return cfg, model, tokenizer, data


def evaluate(run: Run, n: int | None = None, seed: int = 0,
             progress: bool | None = None) -> dict[str, float]:
    """The final model's ITC scores (zero-shot top-1, retrieval recall@K, linear probe) and
    caption accuracy against its chance level, from the run's checkpoints (for CapFilt the
    second stage's model, with the noisy first-stage model's scores as ``baseline/`` and the
    filter's as ``train/`` in ``summary.json``), on ``n`` held-out examples of the test and
    zero-shot splits (None: all of them); captions are written for the first 500 of them.
    ``seed`` draws which ``n`` (with all of them, nothing is drawn) and the shuffle of the
    caption chance level. Captions are greedy, the probe is L-BFGS from zero on a convex loss:
    the rest is deterministic. Returns the final model's scores (``eval/`` in the summary)."""
    cfg, model, tokenizer, data = load_model(run)
    if not cfg.capfilt:
        return report(run, model, tokenizer, data, n=n, seed=seed)
    fresh = build_model(cfg, data, tokenizer)
    Run.open(run.path(STAGE2)).load_weights(fresh)
    result = CapFiltResult.from_dict(read_json(run.path(CAPFILT)))
    return report(run, fresh, tokenizer, data, noisy=model, result=result, n=n, seed=seed)
