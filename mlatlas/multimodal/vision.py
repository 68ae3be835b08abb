"""A MoonViT-style vision tower: native-resolution images packed into one sequence, 2D rotary
positions, a 2x2 pixel shuffle and an MLP projector into a decoder's width (Kimi-VL technical
report, 2025; packing as in NaViT, Dehghani et al. 2023).

Patchify. An image x of C x H x W pixels, H and W multiples of p (the patch side), is cut into
an h x w grid of patches, h = H / p and w = W / p, each flattened in (channel, row, column) order
into a vector of C p^2 values; patches are listed in raster order, so patch (r, c) is token
r w + c. The patch embedding is one linear map E (C p^2 -> D), the same map as a Conv2d of kernel
and stride p whose weight is reshaped to (D, C p^2).

Packing. Images 1..n of n_j = h_j w_j patches are concatenated into one sequence of
N = sum_j n_j tokens, with no resizing and no padding; cu_seqlens = (0, n_1, n_1 + n_2, ..., N)
marks where each image starts, and token a belongs to image img(a) = j when
cu_j <= a < cu_{j+1}. Attention is restricted to each image by the block-diagonal mask

    M_ab = [img(a) = img(b)]

so the packed encoder computes for each image exactly what it computes for the image alone
(softmax over the masked-out keys gives them weight zero). ``max_patches`` bounds N; the dense
mask costs O(N^2) although only sum_j n_j^2 entries are True, so :func:`budget_groups` splits a
long batch of images into several sequences of at most ``max_patches`` patches.

2D rotary embeddings (Su, "RoPE-2D", 2021; the spatial part of Qwen2-VL's M-RoPE, Wang et al.
2024). A head of width d (d % 4 = 0) has the d/2 pairs (x_i, x_{i + d/2}) that
:func:`mlatlas.nn.attention.rotate` turns. The first d/4 pairs turn by the patch's row, the
last d/4 by its column, with the d/4 frequencies theta_i = b^(-4i/d), i = 0 .. d/4 - 1:

    phi_i(r, c) = r theta_i          (pair i,         i < d/4)
    phi_i(r, c) = c theta_{i - d/4}  (pair i,  d/4 <= i < d/2)

Writing each pair as a complex number, q_{r,c} . k_{r',c'} = Re sum_i q_i conj(k_i)
e^{j (phi_i(r, c) - phi_i(r', c'))}, and phi_i(r, c) - phi_i(r', c') = phi_i(r - r', c - c'):
scores depend on the offsets (r - r', c - c') alone. With every column 0 this is 1D RoPE along
rows at head width d/2, the column pairs left as they are.

Encoder (pre-norm Transformer, MoonViT / ViT): with h^0 = E patches (1, N, D),

    u^l = h^{l-1} + Attn(LN(h^{l-1}); rotary 2D, mask M)
    h^l = u^l + W_2 GELU(W_1 LN(u^l))
    out = LN(h^L)

Pixel shuffle. Each image's h x w grid of encoder tokens (h, w even) becomes an h/2 x w/2 grid,
in raster order, whose token (R, C) concatenates the 2 x 2 block of neighbours in row-major
order:

    z_{R,C} = [t_{2R,2C}; t_{2R,2C+1}; t_{2R+1,2C}; t_{2R+1,2C+1}]    (4D wide)

a permutation of the token values (:func:`pixel_unshuffle` undoes it). Image sides must then be
multiples of 2p.

Projector (Kimi-VL's): a LayerNorm over each of the four D-wide parts, then an MLP,

    y = W_b GELU(W_a [LN(t_1); LN(t_2); LN(t_3); LN(t_4)])     (4D -> 4D -> decoder width)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from mlatlas.core.config import ConfigError
from mlatlas.nn.attention import Attention
from mlatlas.nn.layers import feed_forward

# Offsets (row, column) of the four neighbours a shuffled token concatenates, in their order.
SHUFFLE_ROWS = (0, 0, 1, 1)
SHUFFLE_COLS = (0, 1, 0, 1)


@dataclass
class EncoderConfig:
    in_channels: int = 3
    patch_size: int = 4
    """Side p of a square patch, in pixels; image sides must be multiples of 2p (the shuffle)."""
    width: int = 64
    depth: int = 2
    heads: int = 4
    hidden_dim: int = 256
    """Width of each block's feed-forward layer."""
    max_patches: int = 512
    """Budget of patches in one packed sequence (--max-patches)."""
    rope_theta: float = 100.0
    """Base b of the 2D rotary frequencies (small, for grids of a few dozen patches a side)."""
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("in_channels", "patch_size", "width", "depth", "heads", "hidden_dim",
                     "max_patches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} is not divisible by {self.heads} heads")
        if (self.width // self.heads) % 4:
            raise ConfigError(f"2D rotary embeddings need a head width divisible by 4, got "
                              f"{self.width // self.heads} (width {self.width} / {self.heads} "
                              f"heads)")
        if self.rope_theta <= 1:
            raise ConfigError(f"rope_theta must exceed 1, got {self.rope_theta}")


@dataclass
class Packed:
    """Images packed into one sequence of N patches.

    patches (N, C p^2); grid (n_images, 2) long, each image's (rows, columns) of patches;
    cu_seqlens (n_images + 1,) long, where each image's patches start (and N at the end);
    positions (N, 2) long, each patch's (row, column) in its image."""

    patches: torch.Tensor
    grid: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor

    @property
    def n_images(self) -> int:
        return self.grid.shape[0]

    def to(self, device: torch.device | str) -> Packed:
        return Packed(self.patches.to(device), self.grid.to(device), self.cu_seqlens.to(device),
                      self.positions.to(device))


def cu_seqlens_of(lengths: torch.Tensor) -> torch.Tensor:
    """(n,) lengths -> (n + 1,) long cumulative lengths starting at 0."""
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).long()


def segments(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n + 1,) cumulative lengths -> (ids, local) each (N,): each token's segment and its
    index inside the segment."""
    lengths = cu_seqlens.diff()
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    local = torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - cu_seqlens[ids]
    return ids, local


def split(tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """(N, ...) packed tokens -> one (n_j, ...) tensor per image."""
    if tokens.shape[0] != int(cu_seqlens[-1]):
        raise ValueError(f"{tokens.shape[0]} tokens but cu_seqlens ends at {int(cu_seqlens[-1])}")
    return list(tokens.split(cu_seqlens.diff().tolist()))


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, H, W) -> (H/p * W/p, C p^2): patches in raster order, each in (C, p, p) order."""
    C, H, W = image.shape
    p = patch_size
    h, w = H // p, W // p
    return image.reshape(C, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, C * p * p)


def pack(images: Sequence[torch.Tensor], patch_size: int, max_patches: int,
         in_channels: int | None = None) -> Packed:
    """Patchify (C, H, W) images and concatenate them into one :class:`Packed` sequence of at
    most ``max_patches`` patches. Sides must be multiples of 2 ``patch_size`` (the 2x2 pixel
    shuffle); ``in_channels`` None takes the first image's channels."""
    if patch_size <= 0 or max_patches <= 0:
        raise ValueError(f"patch_size and max_patches must be positive, got {patch_size} and "
                         f"{max_patches}")
    if len(images) == 0:
        raise ValueError("pack needs at least one image")
    side = 2 * patch_size
    sizes = []
    for j, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image)
            raise ValueError(f"image {j} must be a (channels, height, width) tensor, got {shape}")
        C, H, W = image.shape
        expected = images[0].shape[0] if in_channels is None else in_channels
        if expected != C:
            raise ValueError(f"image {j} has {C} channels, expected {expected}")
        if H % side or W % side:
            raise ValueError(f"image {j} of {H}x{W} pixels: height and width must be multiples "
                             f"of 2 x patch_size = {side} (patches of {patch_size} px, merged "
                             f"2x2 by the pixel shuffle)")
        n = (H // patch_size) * (W // patch_size)
        if n > max_patches:
            raise ValueError(f"image {j} of {H}x{W} pixels is {n} patches of {patch_size} px, "
                             f"more than the budget of {max_patches} patches (--max-patches)")
        sizes.append((H // patch_size, W // patch_size))
    grid = torch.tensor(sizes, dtype=torch.long, device=images[0].device)
    cu_seqlens = cu_seqlens_of(grid.prod(1))
    if int(cu_seqlens[-1]) > max_patches:
        j = int((cu_seqlens[1:] > max_patches).nonzero()[0])
        H, W = images[j].shape[1:]
        raise ValueError(f"{len(images)} images total {int(cu_seqlens[-1])} patches, more than "
                         f"the budget of {max_patches} patches (--max-patches); image {j} of "
                         f"{H}x{W} pixels ({int(grid[j].prod())} patches) is the first that "
                         f"does not fit after {int(cu_seqlens[j])}: pack fewer images per "
                         f"sequence")
    patches = torch.cat([patchify(image, patch_size) for image in images])
    ids, local = segments(cu_seqlens)
    cols = grid[ids, 1]
    positions = torch.stack([local // cols, local % cols], dim=1)
    return Packed(patches, grid, cu_seqlens, positions)


def budget_groups(images: Sequence[torch.Tensor], patch_size: int, max_patches: int
                  ) -> list[list[int]]:
    """Indices of (C, H, W) images grouped in order into sequences of at most ``max_patches``
    patches, a new group whenever the next image would overflow the current one: the sequences
    to :func:`pack` one by one (a dense block-diagonal mask costs O(N^2), so a long batch is
    cheaper as several budget-sized sequences than as one)."""
    groups: list[list[int]] = [[]]
    used = 0
    for j, image in enumerate(images):
        n = (image.shape[-2] // patch_size) * (image.shape[-1] // patch_size)
        if n > max_patches:
            raise ValueError(f"image {j} of {image.shape[-2]}x{image.shape[-1]} pixels is {n} "
                             f"patches of {patch_size} px, more than the budget of "
                             f"{max_patches} patches (--max-patches)")
        if groups[-1] and used + n > max_patches:
            groups.append([])
            used = 0
        groups[-1].append(j)
        used += n
    return groups


def block_diagonal_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(n + 1,) cumulative lengths -> (N, N) bool, True where both tokens are one image's."""
    ids, _ = segments(cu_seqlens)
    return ids[:, None] == ids[None, :]


def rotary_2d(positions: torch.Tensor, head_dim: int, theta: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 2D rotary angles for (row, column) positions (N, 2) or (B, T, 2):
    each (1, 1, N, head_dim) or (B, 1, T, head_dim), laid out for
    :func:`mlatlas.nn.attention.rotate` (pairs i < d/4 by row, the others by column)."""
    if head_dim % 4:
        raise ValueError(f"2D rotary embeddings need a head width divisible by 4, got {head_dim}")
    if positions.shape[-1] != 2 or positions.dim() not in (2, 3):
        raise ValueError(f"positions must be (N, 2) or (B, T, 2) rows and columns, got "
                         f"{tuple(positions.shape)}")
    if positions.dim() == 2:
        positions = positions[None]
    inv_freq = theta ** (-torch.arange(0, head_dim // 2, 2, dtype=torch.float32,
                                       device=positions.device) / (head_dim // 2))
    angles = (positions.float()[..., None] * inv_freq).flatten(-2)  # (B, T, d/2): rows, columns
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def _shuffle_sources(grid: torch.Tensor) -> torch.Tensor:
    """(n, 2) even grids -> (M, 4) long: the unshuffled token index of each neighbour of each
    shuffled token, M = sum h w / 4, in the order of SHUFFLE_ROWS / SHUFFLE_COLS."""
    if grid.dim() != 2 or grid.shape[1] != 2:
        raise ValueError(f"grid must be (n_images, 2) rows and columns, got {tuple(grid.shape)}")
    if (grid % 2).any():
        raise ValueError(f"pixel shuffle needs even grids of patches, got {grid.tolist()}")
    starts = cu_seqlens_of(grid.prod(1))
    ids, local = segments(cu_seqlens_of((grid // 2).prod(1)))
    w = grid[ids, 1]
    R, C = local // (w // 2), local % (w // 2)
    dr = torch.tensor(SHUFFLE_ROWS, device=grid.device)
    dc = torch.tensor(SHUFFLE_COLS, device=grid.device)
    return starts[ids, None] + (2 * R[:, None] + dr) * w[:, None] + 2 * C[:, None] + dc


def pixel_shuffle(tokens: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) packed tokens of images with (n, 2) grids -> ((N/4, 4D) tokens, (n, 2) grids / 2):
    each 2x2 block of neighbours becomes one token, see the module text."""
    if tokens.dim() != 2 or tokens.shape[0] != int(grid.prod(-1).sum()):
        raise ValueError(f"tokens must be (N, D) with N = {int(grid.prod(-1).sum())} (the grids' "
                         f"patches), got {tuple(tokens.shape)}")
    sources = _shuffle_sources(grid)
    return tokens[sources].flatten(1), grid // 2


def pixel_unshuffle(tokens: torch.Tensor, grid: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pixel_shuffle`: (M, 4D) tokens of (n, 2) grids -> ((4M, D), 2 grid)."""
    full = 2 * grid
    if tokens.dim() != 2 or tokens.shape[0] != int(grid.prod(-1).sum()) or tokens.shape[1] % 4:
        raise ValueError(f"tokens must be (M, 4D) with M = {int(grid.prod(-1).sum())} (the "
                         f"grids' tokens), got {tuple(tokens.shape)}")
    sources = _shuffle_sources(full).flatten()
    inverse = torch.empty_like(sources)
    inverse[sources] = torch.arange(len(sources), device=sources.device)
    return tokens.reshape(len(sources), -1)[inverse], full


class EncoderBlock(nn.Module):
    """Pre-norm block: x + Attn(LN x), then + FFN(LN x)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn = Attention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = feed_forward(config.width, config.hidden_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask, rotary=rotary)
        return x + self.mlp(self.norm2(x))


class MoonViT(nn.Module):
    """The packed native-resolution encoder: :class:`Packed` patches -> (N, width) tokens."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        patch_dim = config.in_channels * config.patch_size ** 2
        self.patch_embed = nn.Linear(patch_dim, config.width)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=config.norm_eps)

    def encode(self, patches: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, C p^2) patches at (B, T, 2) positions -> (B, T, width); ``mask`` (bool,
        True = may attend) broadcasts to (B, heads, T, T). :meth:`forward` calls it with one
        packed sequence and the block-diagonal mask; a padded batch passes a padding mask."""
        patch_dim = self.patch_embed.in_features
        if patches.dim() != 3 or patches.shape[-1] != patch_dim:
            raise ValueError(f"patches must be (batch, tokens, {patch_dim}), got "
                             f"{tuple(patches.shape)}")
        if positions.shape != (*patches.shape[:2], 2):
            raise ValueError(f"positions must be {(*patches.shape[:2], 2)}, got "
                             f"{tuple(positions.shape)}")
        rotary = rotary_2d(positions, self.config.width // self.config.heads,
                           self.config.rope_theta)
        x = self.patch_embed(patches)
        for block in self.blocks:
            x = block(x, mask, rotary)
        return self.norm(x)

    def forward(self, packed: Packed) -> torch.Tensor:
        """Packed N patches -> (N, width), each image attending to its own patches only."""
        N = packed.patches.shape[0]
        if int(packed.cu_seqlens[-1]) != N or packed.positions.shape != (N, 2):
            raise ValueError(f"inconsistent Packed: {N} patches, cu_seqlens ending at "
                             f"{int(packed.cu_seqlens[-1])}, positions "
                             f"{tuple(packed.positions.shape)}")
        mask = block_diagonal_mask(packed.cu_seqlens)
        return self.encode(packed.patches[None], packed.positions[None], mask)[0]


class Projector(nn.Module):
    """Kimi-VL's projector: (M, 4 width) shuffled tokens -> (M, out_dim), see the module text.
    Attribute names are Kimi-VL's (pre_norm, linear_1, linear_2)."""

    def __init__(self, width: int, out_dim: int, eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.pre_norm = nn.LayerNorm(width, eps=eps)
        self.linear_1 = nn.Linear(4 * width, 4 * width)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(4 * width, out_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != 4 * self.width:
            raise ValueError(f"projector input must be (M, {4 * self.width}), got "
                             f"{tuple(z.shape)}")
        z = self.pre_norm(z.view(len(z), 4, self.width)).flatten(1)
        return self.linear_2(self.act(self.linear_1(z)))


@dataclass
class Chunks:
    """Sequences of packed images padded into one batch: ``patches`` (B, S, C p^2),
    ``positions`` (B, S, 2), ``mask`` (B, 1, S, S) block-diagonal, padding a block of its own
    (so a padding query never has every key masked), ``real`` (B, S) the real patches."""

    patches: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    real: torch.Tensor


def batch_chunks(packs: Sequence[Packed]) -> Chunks:
    """Packed sequences -> one padded :class:`Chunks` batch; the real patches of the output,
    ``out[real]``, come in the order of the sequences and of their images."""
    patches = pad_sequence([p.patches for p in packs], batch_first=True)
    positions = pad_sequence([p.positions for p in packs], batch_first=True)
    ids = pad_sequence([segments(p.cu_seqlens)[0] for p in packs], batch_first=True,
                       padding_value=-1)
    return Chunks(patches, positions, (ids[:, :, None] == ids[:, None, :])[:, None], ids >= 0)


def concat_packed(packs: Sequence[Packed]) -> Packed:
    """Several packed sequences as one (the images in order)."""
    grid = torch.cat([p.grid for p in packs])
    return Packed(torch.cat([p.patches for p in packs]), grid, cu_seqlens_of(grid.prod(1)),
                  torch.cat([p.positions for p in packs]))


class VisionTower(nn.Module):
    """MoonViT, the 2x2 pixel shuffle and the projector into a decoder of width ``out_dim``."""

    def __init__(self, config: EncoderConfig, out_dim: int):
        super().__init__()
        self.config = config
        self.encoder = MoonViT(config)
        self.projector = Projector(config.width, out_dim)

    def pack(self, images: Sequence[torch.Tensor] | Packed) -> Packed:
        """Images -> :class:`Packed` with this tower's patch size, budget and channels."""
        if isinstance(images, Packed):
            return images
        return pack(images, self.config.patch_size, self.config.max_patches,
                    self.config.in_channels)

    def encode(self, images: Sequence[torch.Tensor] | Packed) -> tuple[torch.Tensor, Packed]:
        """(N, width) encoder tokens of the images and the images as one :class:`Packed`.

        A batch over the ``max_patches`` budget is encoded as several sequences of at most
        that many patches (:func:`budget_groups`), padded into one batch (:func:`batch_chunks`):
        the block-diagonal mask keeps every image to itself either way, so the tokens are the
        same, at a fraction of one long sequence's O(N^2) cost."""
        if isinstance(images, Packed):
            return self.encoder(images), images
        c = self.config
        groups = budget_groups(images, c.patch_size, c.max_patches)
        packs = [pack([images[j] for j in g], c.patch_size, c.max_patches, c.in_channels)
                 for g in groups]
        if len(packs) == 1:
            return self.encoder(packs[0]), packs[0]
        chunks = batch_chunks(packs)
        h = self.encoder.encode(chunks.patches, chunks.positions, chunks.mask)
        return h[chunks.real], concat_packed(packs)

    def project(self, h: torch.Tensor, packed: Packed) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder tokens -> ((M, out_dim) decoder tokens, (n + 1,) cu_seqlens of each image's
        M_j = n_j / 4), in raster order of each image's shuffled grid."""
        z, grid = pixel_shuffle(h, packed.grid)
        return self.projector(z), cu_seqlens_of(grid.prod(1))

    def forward(self, images: Sequence[torch.Tensor] | Packed
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> ((M, out_dim) tokens, (n + 1,) cu_seqlens of the shuffled tokens)."""
        return self.project(*self.encode(images))

    def pool(self, h: torch.Tensor, packed: Packed) -> torch.Tensor:
        """(n_images, width): the mean of each image's encoder tokens (an image embedding for a
        contrastive loss)."""
        ids, _ = segments(packed.cu_seqlens)
        sums = h.new_zeros(packed.n_images, h.shape[1]).index_add(0, ids, h)
        return sums / packed.cu_seqlens.diff()[:, None].to(h.dtype)

    def pooled(self, images: Sequence[torch.Tensor] | Packed) -> torch.Tensor:
        """:meth:`pool` of the images' encoder tokens."""
        return self.pool(*self.encode(images))
