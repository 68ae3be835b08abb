r"""Network blocks shared by the methods: time embeddings, an MLP for points, a small UNet.

The networks take ``(x, t, y=None)`` with ``t`` a float tensor of shape (B,) (a timestep index,
a noise level or a time in [0, 1]; the method decides, and ``time_scale`` stretches it to the
range of timestep indices that the sinusoidal embedding was made for) and, when built with
``num_classes > 0``, class labels ``y`` of shape (B,); label ``num_classes`` (or ``y=None``)
is the null label that classifier-free guidance trains with. They return a tensor shaped like
``x``.

Built with ``context_dim > 0`` the UNet also takes a condition sequence ``context`` (B, S,
context_dim), as Stable Diffusion's denoiser does: after every ResBlock the feature map's
positions attend to it (Rombach et al. 2022, eq. 3),

    h <- h + W_o softmax(Q K^T / sqrt(d)) V,   Q = W_q GN(h),  K = W_k c,  V = W_v c,

with c the context projected to the block's width. ``encode`` and ``decode`` split the forward
pass at the bottleneck and take ``residuals`` added to the skip connections and the middle
block, which is how ControlNet steers a frozen UNet.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlatlas.nn.attention import Attention
from mlatlas.nn.layers import mlp


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (B,) tensor, as in "Attention Is All You Need" and DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class LabelEmbedding(nn.Module):
    """One learned vector per class plus one for the null label (index ``num_classes``)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.table(y)


class TimeMLP(nn.Module):
    """MLP on (x, embedding(t) [+ embedding(y)]) for low-dimensional data such as 2D points."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 64,
                 num_classes: int = 0, time_scale: float = 1.0):
        super().__init__()
        self.time_dim = time_dim
        self.time_scale = time_scale
        self.labels = LabelEmbedding(num_classes, time_dim) if num_classes else None
        self.net = mlp(dim + time_dim, (hidden,) * depth, dim, nn.SiLU, orthogonal=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        emb = timestep_embedding(t * self.time_scale, self.time_dim)
        if self.labels is not None:
            emb = emb + self.labels(y, len(x), x.device)
        return self.net(torch.cat([x, emb], dim=1))


def norm_groups(channels: int) -> int:
    """GroupNorm groups for ``channels``: 8, or fewer when 8 does not divide them."""
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (DDPM's block)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(norm_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(nn.functional.silu(self.norm2(h))))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class CrossAttention(nn.Module):
    """Every position of a feature map attends to a condition sequence (the module text's
    equation); a residual block, so an output projection of zeros leaves h unchanged."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.context_proj = nn.Linear(context_dim, channels)
        self.attn = Attention(channels, math.gcd(heads, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        queries = self.norm(x).flatten(2).transpose(1, 2)
        out = self.attn(queries, self.context_proj(context))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Residuals:
    """What ControlNet adds to a UNet: one tensor per skip connection and one for the middle."""

    def __init__(self, skips: list[torch.Tensor], middle: torch.Tensor):
        self.skips, self.middle = skips, middle

    def scaled(self, scale: float | torch.Tensor) -> Residuals:
        return Residuals([r * scale for r in self.skips], self.middle * scale)


class UNet(nn.Module):
    """A small UNet: one ResBlock per level, stride-2 down, nearest-neighbour up, attention at
    the lowest resolution. ``channel_mults`` sets the levels; each halves the side, so the image
    side must be divisible by 2 ** (levels - 1) (8 -> 4 -> 2, 28 -> 14 -> 7). With
    ``context_dim`` a cross-attention block follows every ResBlock (the module text).
    """

    def __init__(self, in_channels: int, base: int = 32, channel_mults: tuple[int, ...] = (1, 2, 2),
                 dropout: float = 0.0, attention: bool = True, num_classes: int = 0,
                 time_scale: float = 1.0, context_dim: int = 0):
        super().__init__()
        self.base = base
        self.time_scale = time_scale
        self.context_dim = context_dim
        emb_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.labels = LabelEmbedding(num_classes, emb_dim) if num_classes else None
        self.stem = nn.Conv2d(in_channels, base, 3, padding=1)
        widths = [base * m for m in channel_mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = base
        for i, w in enumerate(widths):
            self.down.append(ResBlock(c, w, emb_dim, dropout))
            c = w
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, 2, 1))
        self.mid1 = ResBlock(c, c, emb_dim, dropout)
        self.mid_attn = SelfAttention(c) if attention else nn.Identity()
        self.mid2 = ResBlock(c, c, emb_dim, dropout)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.up.append(ResBlock(c + w, w, emb_dim, dropout))
            c = w
            first = i == 0
            self.upsample.append(nn.Identity() if first else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, widths[i - 1], 3, 1, 1)))
            if not first:
                c = widths[i - 1]
        self.out = nn.Sequential(nn.GroupNorm(norm_groups(c), c), nn.SiLU(),
                                 nn.Conv2d(c, in_channels, 3, padding=1))
        self.levels = len(widths)
        self.widths = widths
        if context_dim:
            self.down_cross = nn.ModuleList(CrossAttention(w, context_dim) for w in widths)
            self.mid_cross = CrossAttention(widths[-1], context_dim)
            self.up_cross = nn.ModuleList(CrossAttention(w, context_dim)
                                          for w in reversed(widths))

    def embed(self, t: torch.Tensor, y: torch.Tensor | None, batch: int,
              device: torch.device) -> torch.Tensor:
        """The time (and label) embedding every ResBlock adds."""
        emb = self.time_mlp(timestep_embedding(t * self.time_scale, self.base))
        if self.labels is not None:
            emb = emb + self.labels(y, batch, device)
        return emb

    def _check_context(self, context: torch.Tensor | None, batch: int) -> None:
        if not self.context_dim:
            if context is not None:
                raise ValueError("this UNet was built without cross-attention (context_dim=0)")
            return
        if context is None or context.dim() != 3 or context.shape[0] != batch \
                or context.shape[2] != self.context_dim:
            shape = None if context is None else tuple(context.shape)
            raise ValueError(f"the UNet needs a ({batch}, S, {self.context_dim}) context, "
                             f"got {shape}")

    def encode(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
               hint: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down path and the middle block: (bottleneck h, one skip per level). ``hint`` is
        added after the stem (ControlNet's encoded control image)."""
        self._check_context(context, len(x))
        h = self.stem(x)
        if hint is not None:
            h = h + hint
        skips = []
        for i, (block, down) in enumerate(zip(self.down, self.downsample, strict=True)):
            h = block(h, emb)
            if self.context_dim:
                h = self.down_cross[i](h, context)
            skips.append(h)
            h = down(h)
        h = self.mid1(h, emb)
        if self.context_dim:
            h = self.mid_cross(h, context)
        return self.mid2(self.mid_attn(h), emb), skips

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
               context: torch.Tensor | None = None,
               residuals: Residuals | None = None) -> torch.Tensor:
        """The up path from the bottleneck, with ``residuals`` added to the middle block's output
        and to every skip connection."""
        if residuals is not None:
            h = h + residuals.middle
            skips = [s + r for s, r in zip(skips, residuals.skips, strict=True)]
        skips = list(skips)
        for i, (block, up) in enumerate(zip(self.up, self.upsample, strict=True)):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if self.context_dim:
                h = self.up_cross[i](h, context)
            h = up(h)
        return self.out(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None,
                residuals: Residuals | None = None) -> torch.Tensor:
        emb = self.embed(t, y, len(x), x.device)
        h, skips = self.encode(x, emb, context)
        return self.decode(h, skips, emb, context, residuals)
