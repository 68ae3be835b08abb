"""Small layers the Transformer blocks are built of.

    RMSNorm(x)          = g * x / sqrt(mean(x^2) + eps)                 (Zhang and Sennrich 2019)
    SwiGLU(x)           = W_down (silu(W_gate x) * W_up x)               (Shazeer 2020; Llama)
    feed_forward(x)     = W_2 GELU(W_1 x)                                (GPT-2, ViT, BERT)
    mlp(x)              = W_L act(... act(W_1 x))                        (policies, critics,
                                                                          TimeMLP, Q-networks)
"""

from __future__ import annotations

import math

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


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: type[nn.Module] = nn.Tanh,
        out_gain: float = 1.0, orthogonal: bool = True) -> nn.Sequential:
    """A multilayer perceptron, Linear and ``activation`` in turn, no activation at the end.
    With ``orthogonal``, orthogonal init with gain sqrt(2) inside and ``out_gain`` on the last
    layer (a small policy head starts near uniform, Andrychowicz et al. 2021); otherwise torch's
    default init."""
    sizes = (in_dim, *hidden, out_dim)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        linear = nn.Linear(a, b)
        if orthogonal:
            nn.init.orthogonal_(linear.weight, out_gain if i == len(sizes) - 2 else math.sqrt(2))
            nn.init.zeros_(linear.bias)
        layers += [linear, activation()]
    return nn.Sequential(*layers[:-1])
