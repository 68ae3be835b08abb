"""Pre-norm Transformer blocks: the ViT image tower, the text towers and BLIP are built of them.

A block maps a sequence h (B, L, W) to

    h <- h + SelfAttn(LN(h); mask, causal)
    h <- h + CrossAttn(LN(h), context)          (only for blocks built with ``cross=True``)
    h <- h + MLP(LN(h)),   MLP(u) = W_2 GELU(W_1 u),  hidden width 4W

(Vaswani et al. 2017 with the pre-norm placement of GPT-2 and ViT). Masks are boolean with True
meaning "may attend" (:mod:`mlatlas.nn.attention`). The language model's blocks, laid out as
Llama's (RMSNorm, SwiGLU, rotary, grouped-query attention), live with it in ``mlatlas.llm.model``
and are made of the same attention.
"""

from __future__ import annotations

import torch
from torch import nn

from mlatlas.nn.attention import Attention, padding_mask
from mlatlas.nn.layers import feed_forward


class Block(nn.Module):
    def __init__(self, width: int, heads: int, cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, fused_kv=True)
        self.cross = Attention(width, heads, fused_kv=True) if cross else None
        self.norm_cross = nn.LayerNorm(width) if cross else None
        self.norm2 = nn.LayerNorm(width)
        self.mlp = feed_forward(width, 4 * width)

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
        attn_mask = padding_mask(mask)
        for block in self.blocks:
            h = block(h, attn_mask, causal, context)
        return self.norm(h)
