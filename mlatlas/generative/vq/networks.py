"""The convolutional encoder and decoder every autoencoder of the family shares (the KL
autoencoder, VQ-VAE, VQGAN), and VQGAN's patch discriminator.

Encoder (an image (B, C, H, W) in [0, 1], seen as 2x - 1, to a latent map (B, C_out, H/f, W/f)
for a downsampling factor f = 2^L): a 3x3 convolution to ``width`` channels, then L levels of
a residual block and a stride-2 convolution (doubling the channels), a last residual block,
GroupNorm-SiLU and a 3x3 convolution to C_out. The decoder mirrors it (nearest-neighbour
upsampling and a 3x3 convolution per level) and ends in one 3x3 convolution, ``conv_out``, to the
image's channels, whose weight is the "last layer" of VQGAN's adaptive weight; its output is in
the [0, 1] scale of the data (not squashed, so the reconstruction loss is never saturated).

Discriminator (Isola et al. 2017's PatchGAN, as VQGAN uses it): 4x4 stride-2 convolutions with
LeakyReLU(0.2) (GroupNorm after all but the first), then a 3x3 convolution to one channel: a map
of logits, one per overlapping patch, instead of one per image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlatlas.nn.unet import norm_groups


def level_widths(width: int, downsample: int) -> list[int]:
    """Channels at each resolution: width, 2 width, 4 width, ... for log2(downsample) + 1
    resolutions."""
    levels = int(math.log2(downsample))
    return [width * 2**level for level in range(levels + 1)]


class ResidualBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), a 1x1 convolution on the skip when widths
    differ."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(norm_groups(c_in), c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(norm_groups(c_out), c_out), nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _head(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(norm_groups(c_in), c_in), nn.SiLU(),
                         nn.Conv2d(c_in, c_out, 3, padding=1))


class Encoder(nn.Module):
    """(B, C, H, W) images in [0, 1] -> (B, out_channels, H / f, W / f)."""

    def __init__(self, channels: int, width: int, downsample: int, out_channels: int):
        super().__init__()
        widths = level_widths(width, downsample)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1)]
        for c_in, c_out in zip(widths, widths[1:], strict=False):
            layers += [ResidualBlock(c_in, c_in), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)]
        layers += [ResidualBlock(widths[-1], widths[-1]), _head(widths[-1], out_channels)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


class Decoder(nn.Module):
    """(B, in_channels, h, w) latents -> (B, C, h f, w f) images in the [0, 1] scale."""

    def __init__(self, channels: int, width: int, downsample: int, in_channels: int):
        super().__init__()
        widths = level_widths(width, downsample)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1),
                                   ResidualBlock(widths[0], widths[0])]
        for c_in, c_out in zip(widths, widths[1:], strict=False):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(c_in, c_out, 3, padding=1), ResidualBlock(c_out, c_out)]
        layers += [nn.GroupNorm(norm_groups(widths[-1]), widths[-1]), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(widths[-1], channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight of the last convolution (VQGAN's adaptive weight is computed at it)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.conv_out(self.net(z)) + 1) / 2


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) images in [0, 1] -> (B, 1, H / 2^layers, W / 2^layers) logits."""

    def __init__(self, channels: int, width: int, layers: int):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(channels, width, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2)]
        c = width
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1),
                       nn.GroupNorm(norm_groups(2 * c), 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        blocks.append(nn.Conv2d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)
