"""Contrastive losses as pure functions: InfoNCE, NT-Xent, CLIP and SigLIP (dense and chunked).

InfoNCE (van den Oord et al. 2018, CPC). For N queries q_i whose positive key is k_i and whose
negatives are the other keys,

    L = -1/N sum_i log( exp(s(q_i, k_i) / tau) / sum_j exp(s(q_i, k_j) / tau) ),

a cross-entropy with the positive's index as the label. Because L >= log N - I(q; k), the
mutual information is bounded below by log N - L, and log N - L <= log N: the bound can never
certify more than log N nats.

NT-Xent (Chen et al. 2020, SimCLR). Two views z_1, z_2 of N images give 2N points; each point's
positive is its other view and its negatives are the other 2N - 2 points (itself excluded), with
cosine similarity over a temperature tau.

CLIP (Radford et al. 2021). With L2-normalised image and text features and a learnable scale
s = exp(t) (initialised to 1/0.07 and clamped at 100),

    logits_per_image = s I T^T,   logits_per_text = logits_per_image^T,
    L = (CE(logits_per_image, diag) + CE(logits_per_text, diag)) / 2.

SigLIP (Zhai et al. 2023). Every pair is a binary problem: with z_ij = 1 on the diagonal and -1
elsewhere, t = exp(t'), and bias b (t' = log 10, b = -10 at the start),

    L = -1/N sum_i sum_j log sigma(z_ij (t x_i . y_j + b)).

It needs no softmax over the batch, so it can be summed block by block: ``siglip_loss_chunked``
visits the texts ``chunk`` at a time and recomputes each block in the backward pass, so its
memory grows with N x chunk rather than N^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
CLIP_LOGIT_SCALE_MAX = 100.0
SIGLIP_T_PRIME_INIT = math.log(10.0)
SIGLIP_BIAS_INIT = -10.0


def _check_pairs(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{name} needs two (N, D) tensors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def info_nce(query: torch.Tensor, keys: torch.Tensor, temperature: float = 0.1,
             normalize: bool = True) -> torch.Tensor:
    """InfoNCE of (N, D) queries against (N, D) keys, key i being query i's positive."""
    _check_pairs("info_nce", query, keys)
    if normalize:
        query, keys = F.normalize(query, dim=-1), F.normalize(keys, dim=-1)
    logits = query @ keys.T / temperature
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N views of (N, D) pairs (z1[i], z2[i])."""
    _check_pairs("nt_xent", z1, z2)
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = z @ z.T / temperature
    # A point is not its own negative: its self-similarity leaves the softmax.
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device),
                                float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, positives)


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits_per_image, logits_per_text) of L2-normalised features; ``logit_scale`` is the
    log of s, clamped so that s <= 100."""
    _check_pairs("clip", image_features, text_features)
    scale = logit_scale.exp().clamp(max=CLIP_LOGIT_SCALE_MAX)
    logits_per_image = scale * F.normalize(image_features, dim=-1) @ \
        F.normalize(text_features, dim=-1).T
    return logits_per_image, logits_per_image.T


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy; pair i is (image i, text i)."""
    logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale)
    labels = torch.arange(len(image_features), device=image_features.device)
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2


def _siglip_block(image_features: torch.Tensor, text_features: torch.Tensor,
                  t_prime: torch.Tensor, bias: torch.Tensor, offset: int) -> torch.Tensor:
    """-sum log sigma(z_ij (t x_i . y_j + b)) over images i and the texts j of one block, whose
    first text has index ``offset`` (the positives are the pairs i == offset + j)."""
    logits = t_prime.exp() * image_features @ text_features.T + bias
    signs = -torch.ones_like(logits)
    rows = torch.arange(offset, offset + len(text_features), device=logits.device)
    rows = rows[rows < len(image_features)]
    signs[rows, rows - offset] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                t_prime: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's sigmoid loss over all N^2 pairs of L2-normalised features, divided by N."""
    _check_pairs("siglip", image_features, text_features)
    x, y = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    return _siglip_block(x, y, t_prime, bias, 0) / len(x)


def siglip_loss_chunked(image_features: torch.Tensor, text_features: torch.Tensor,
                        t_prime: torch.Tensor, bias: torch.Tensor, chunk: int) -> torch.Tensor:
    """``siglip_loss`` summed over blocks of ``chunk`` texts; each block's N x chunk logits are
    recomputed in the backward pass instead of kept, so peak memory is O(N chunk)."""
    _check_pairs("siglip", image_features, text_features)
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    x, y = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    total = x.new_zeros(())
    for start in range(0, len(y), chunk):
        total = total + checkpoint(_siglip_block, x, y[start:start + chunk], t_prime, bias,
                                   start, use_reentrant=False)
    return total / len(x)
