"""Pre-norm Transformer blocks shared by the ViT image tower, the text towers and BLIP.

A block maps a sequence h (B, L, W) to

    h <- h + SelfAttn(LN(h); key_padding_mask, causal)
    h <- h + CrossAttn(LN(h), context)          (only for blocks built with ``cross=True``)
    h <- h + MLP(LN(h)),   MLP(u) = W_2 GELU(W_1 u),  hidden width 4W

(Vaswani et al. 2017 with the pre-norm placement of GPT-2/ViT). Attention is
``F.scaled_dot_product_attention``; masks are boolean with True meaning "may attend".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention of queries ``x`` over ``context`` (itself when None)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        context = x if context is None else context
        b, n, w = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        if causal:
            lower = torch.ones(n, context.shape[1], dtype=torch.bool, device=x.device).tril()
            mask = lower if mask is None else mask & lower
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.cross = Attention(width, heads) if cross else None
        self.norm_cross = nn.LayerNorm(width) if cross else None
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), mask=mask, causal=causal)
        if self.cross is not None:
            if context is None:
                raise ValueError("a cross-attention block needs a context (image tokens)")
            h = h + self.cross(self.norm_cross(h), context)
        return h + self.mlp(self.norm2(h))


class Transformer(nn.Module):
    """``depth`` blocks and a final LayerNorm. ``mask`` (B, L) marks real (not padding) tokens;
    ``causal`` lets token t see tokens <= t only (a decoder)."""

    def __init__(self, width: int, depth: int, heads: int, cross: bool = False):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(Block(width, heads, cross) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None) -> torch.Tensor:
        # (B, L) "is a token" -> (B, 1, 1, L) "may be attended to", broadcast over heads/queries.
        attn_mask = None if mask is None else mask[:, None, None, :]
        for block in self.blocks:
            h = block(h, attn_mask, causal, context)
        return self.norm(h)
