"""Small layers the Transformer blocks are built of.

    RMSNorm(x)          = g * x / sqrt(mean(x^2) + eps)                 (Zhang and Sennrich 2019)
    SwiGLU(x)           = W_down (silu(W_gate x) * W_up x)               (Shazeer 2020; Llama)
    feed_forward(x)     = W_2 GELU(W_1 x)                                (GPT-2, ViT, BERT)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class SwiGLU(nn.Module):
    """The gated feed-forward layer of Llama, its projections named as transformers names them."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def feed_forward(dim: int, hidden_dim: int) -> nn.Sequential:
    """Linear, GELU, Linear: the feed-forward layer of a pre-norm Transformer block."""
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))
