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
visits the texts ``chunk`` at a time, so its memory grows with N x chunk rather than N^2. With
logits l_ij = t x_i . y_j + b, each term is softplus(-z_ij l_ij), whose derivative is

    g_ij = dL_ij / dl_ij = -z_ij sigma(-z_ij l_ij) = sigma(l_ij) - [i == j],

so one pass over a block yields its loss and, by the chain rule through l_ij (x, y being the
normalised features; autograd carries the gradients back through the normalisation),

    dL/dx_i = t sum_j g_ij y_j,   dL/dy_j = t sum_i g_ij x_i,
    dL/dt' = t sum_ij g_ij x_i . y_j,   dL/db = sum_ij g_ij.

The chunked loss accumulates these (N, D) gradients in its forward pass and only scales them by
the incoming gradient in the backward pass: no block is kept or recomputed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


def siglip_block_loss(image_features: torch.Tensor, text_features: torch.Tensor,
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
    return siglip_block_loss(x, y, t_prime, bias, 0) / len(x)


class _SigLIPChunked(torch.autograd.Function):
    """Sum over blocks of texts of the SigLIP loss of normalised x, y, and its gradients.

    Normalisation stays outside, under autograd, so this Function only sees x . y logits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, t_prime: torch.Tensor,
                bias: torch.Tensor, chunk: int) -> torch.Tensor:
        need_x, need_y, need_t, need_b = ctx.needs_input_grad[:4]
        t = t_prime.exp()
        alpha = t.item()  # addmm wants a number; fusing t and b into the matmul saves two passes
        # Sums of N^2 terms accumulate in at least float32 even for half-precision features.
        accumulate = torch.promote_types(x.dtype, torch.float32)
        loss = x.new_zeros((), dtype=accumulate)
        # sum_j g_ij y_j without the factor t; also gives dL/dt' = t sum_i x_i . (g y)_i.
        g_y = x.new_zeros(x.shape) if (need_x or need_t) else None
        g_x = y.new_empty(y.shape) if need_y else None
        g_sum = x.new_zeros((), dtype=accumulate)
        for start in range(0, len(y), chunk):
            y_block = y[start:start + chunk]
            logits = torch.addmm(bias, x, y_block.T, alpha=alpha)
            # Every pair as a negative (z = -1) costs softplus(l); a positive costs
            # softplus(-l) = softplus(l) - l, so the diagonal's logits are subtracted once.
            # The positives of this block are the pairs (start + k, k): diagonal -start.
            # (softplus returns l itself past l = 20, off by log1p(e^-l) < 2.1e-9 a term.)
            loss += F.softplus(logits).sum() - logits.diagonal(-start).sum()
            if g_y is None and g_x is None and not need_b:
                continue
            g = logits.sigmoid_()  # reuses the block's buffer: g = sigma(l) - [i == j]
            g.diagonal(-start).sub_(1.0)
            if need_b:
                g_sum += g.sum()
            if g_y is not None:
                g_y.addmm_(g, y_block)
            if g_x is not None:
                torch.mm(g.T, x, out=g_x[start:start + chunk])
        grad_t = t * (x * g_y).sum() if need_t else None
        ctx.save_for_backward(
            *(a if a is not None else x.new_empty(0)
              for a in (t * g_y if need_x else None, t * g_x if need_y else None,
                        grad_t, g_sum.to(x.dtype) if need_b else None)))
        return loss.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        grads = [g * grad_output if needed else None
                 for g, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[:4], strict=True)]
        return (*grads, None)


def siglip_loss_chunked(image_features: torch.Tensor, text_features: torch.Tensor,
                        t_prime: torch.Tensor, bias: torch.Tensor, chunk: int) -> torch.Tensor:
    """``siglip_loss`` summed over blocks of ``chunk`` texts. Each block's N x chunk logits give
    its loss and its gradients in one pass and are then dropped, so peak memory is O(N chunk)
    beyond the (N, D) features and gradients, and no block is recomputed in the backward pass."""
    _check_pairs("siglip", image_features, text_features)
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    x, y = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    t_prime = torch.as_tensor(t_prime, dtype=x.dtype, device=x.device)
    bias = torch.as_tensor(bias, dtype=x.dtype, device=x.device)
    return _SigLIPChunked.apply(x, y, t_prime, bias, chunk) / len(x)
