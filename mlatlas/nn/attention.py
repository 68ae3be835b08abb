"""Multi-head attention, the one implementation every family uses (Vaswani et al. 2017).

For queries from x (B, T, D) and keys and values from a context c (B, S, D), c = x for
self-attention, each head h of width d computes

    q_h = W_q^h x,   k_g = W_k^g c,   v_g = W_v^g c          (g = the group of head h)
    Attn_h = softmax(q_h k_g^T / sqrt(d) + M) v_g
    Attn(x, c) = W_o [Attn_1; ...; Attn_H]

With ``kv_heads`` < ``heads`` the heads share keys and values in groups of heads / kv_heads
(grouped-query attention, Ainslie et al. 2023; kv_heads = 1 is multi-query attention).
``mask`` M is boolean, True meaning "may attend", broadcast to (B, heads, T, S): a padding mask
(B, S) becomes (B, 1, 1, S) with :func:`padding_mask`; ``causal`` lets query t see keys <= t.
Rotary position embeddings (RoPE, Su et al. 2021) turn q and k before the product: each pair
(x_i, x_{i+d/2}) of a head rotates by the angle m * theta^(-2i/d) at position m, so q_m . k_n
depends on m - n alone. A :class:`KVCache` keeps the keys and values of earlier tokens for
decoding one token at a time.

Rotary scaling stretches a model trained on L0 positions to longer sequences by changing the
inverse frequencies theta_i = b^(-2i/d), i = 0 .. d/2 - 1, of base b (``rope_theta``):

    linear   (position interpolation, Chen et al. 2023): m -> m / s, i.e. theta_i -> theta_i / s
    dynamic  (NTK-aware scaling, bloc97 2023, made dynamic by emozilla): for a sequence of
             L > L0 tokens the base grows to b' = b * (s L / L0 - (s - 1))^(d / (d - 2)), so the
             fastest pair keeps its frequency and the slowest one's is divided by exactly
             s L / L0 - (s - 1); L <= L0 is plain RoPE
    llama3   (Meta, Llama 3.1 report 2024): with wavelengths lambda_i = 2 pi / theta_i, L0 the
             original context and alpha < beta the low- and high-frequency factors,
                 gamma_i  = clamp((L0 / lambda_i - alpha) / (beta - alpha), 0, 1)
                 theta_i' = (1 - gamma_i) theta_i / s + gamma_i theta_i
             so pairs turning more than beta times in L0 (lambda_i < L0 / beta) are kept, pairs
             turning fewer than alpha times (lambda_i > L0 / alpha) are interpolated by s, and the
             band between blends the two smoothly.

The projections are named as transformers' Llama names them (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``), so a language model's state_dict keys are Llama's; ``fused_kv`` computes keys and
values with one matrix ``kv_proj`` instead (the layout of the contrastive towers, one matmul over
the context).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) "is a real token" -> (B, 1, 1, S) "may be attended to" for every head and query."""
    return None if mask is None else mask.bool()[:, None, None, :]


def causal_mask(T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) lower-triangular mask of the last T of S positions: query t sees keys <= t."""
    rows = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= rows


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   scaling: dict | None = None, max_positions: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of m * theta_i for positions (B, T): each (B, 1, T, head_dim), the
    d/2 angles written twice (the first and second halves of a head form the pairs).

    ``scaling`` is None for plain RoPE, or a dict with ``rope_type`` ``linear`` or ``dynamic``
    and its ``factor`` s, or ``llama3`` with ``factor``, ``low_freq_factor`` alpha,
    ``high_freq_factor`` beta and ``original_max_position_embeddings`` L0 (transformers'
    names); see the module text. Dynamic scaling stretches beyond L0 = ``max_positions``, and L
    is each row's own length (its last position + 1), so a padded row turns as it would alone;
    transformers takes the longest row of the batch, the same for one row or rows of one length.
    """
    exponents = -torch.arange(0, head_dim, 2, dtype=torch.float32,
                              device=positions.device) / head_dim
    kind = None if scaling is None else scaling["rope_type"]
    if kind == "dynamic":
        if max_positions is None:
            raise ValueError("dynamic rotary scaling needs max_positions, the trained length L0")
        s = scaling["factor"]
        length = (positions.amax(-1, keepdim=True).float() + 1).clamp(min=max_positions)
        theta = theta * (s * length / max_positions - (s - 1)) ** (head_dim / (head_dim - 2))
        theta = theta[..., None]  # (B, 1, 1): one base per row
    inv_freq = theta ** exponents
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        alpha, beta = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        gamma = ((scaling["original_max_position_embeddings"] / wavelength - alpha)
                 / (beta - alpha)).clamp(0, 1)
        inv_freq = (1 - gamma) * inv_freq / scaling["factor"] + gamma * inv_freq
    elif kind not in (None, "dynamic"):
        raise ValueError(f"unknown rotary scaling {kind!r} (linear, dynamic or llama3)")
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotation of :func:`rotary_cos_sin` to (B, heads, T, d) queries or keys."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of ``layers`` attention layers for ``length`` tokens, in preallocated
    buffers of ``capacity`` tokens, each (batch, kv_heads, capacity, head_dim)."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 device=None, dtype=None):
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, kv_heads, T, d) keys and values after the cached ones and
        return all of them. The caller advances ``length`` once every layer has run."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k[layer].shape[2]:
            raise ValueError(f"KV cache of {self.k[layer].shape[2]} tokens cannot hold {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Attention of queries ``x`` over ``context`` (x itself when None); see the module text."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = True, fused_kv: bool = False):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"width {dim} is not divisible by {heads} heads")
            head_dim = dim // heads
        if heads % kv_heads:
            raise ValueError(f"{heads} heads do not split into groups of {kv_heads} kv heads")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        if fused_kv:
            self.kv_proj = nn.Linear(dim, 2 * kv_heads * head_dim, bias=bias)
        else:
            self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
            self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D) -> k, v each (B, kv_heads, S, head_dim)."""
        B, S, _ = context.shape
        if hasattr(self, "kv_proj"):
            kv = self.kv_proj(context).view(B, S, 2, self.kv_heads, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4)
            return k, v
        k = self.k_proj(context).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, causal: bool = False,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """(B, T, D) -> (B, T, D). ``mask`` broadcasts to (B, heads, T, S); ``rotary`` is the
        (cos, sin) of :func:`rotary_cos_sin` for the T new positions; with ``cache`` the keys
        and values of this call are appended to layer ``layer``'s and attention covers all."""
        if x.dim() != 3:
            raise ValueError(f"attention needs (batch, tokens, width) inputs, got "
                             f"{tuple(x.shape)}")
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.keys_values(x if context is None else context)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if causal:
            lower = causal_mask(T, k.shape[2], x.device)
            mask = lower if mask is None else mask & lower
        groups = self.heads // self.kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
