"""The ViT patch embedding (Dosovitskiy et al. 2021): an image as a sequence of tokens.

An image x (C, H, W) is cut into N = (H / P)(W / P) patches of P x P pixels; each is flattened
and projected to width D (one stride-P convolution computes all of them), a learned [CLS] token
is put in front, and a learned position embedding is added:

    z_0 = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos,    E in R^{(P^2 C) x D},  E_pos in R^{(N+1) x D}
"""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbedding(nn.Module):
    """(B, C, H, W) images of a fixed size -> (B, 1 + N, width) tokens, [CLS] first."""

    def __init__(self, in_channels: int, width: int, patch_size: int, image_size: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size "
                             f"{patch_size}")
        self.in_channels, self.image_size = in_channels, image_size
        self.proj = nn.Conv2d(in_channels, width, patch_size, patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(
            torch.randn(1, 1 + (image_size // patch_size) ** 2, width) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"patch embedding needs (batch, {self.in_channels}, H, W) images, "
                             f"got {tuple(images.shape)}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"ViT tower was built for {self.image_size}x{self.image_size} "
                             f"images, got {tuple(images.shape[-2:])}")
        patches = self.proj(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(images), -1, -1), patches], dim=1) + self.position
