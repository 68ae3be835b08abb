"""The generator and discriminator (critic) networks: MLPs for points, DCGAN-style convolutional
nets for images (Radford et al. 2016: strided convolutions, batch norm in the generator, leaky
ReLU in the discriminator, no pooling).

A generator maps z (B, latent_dim) [and labels y (B,)] to samples: points, or images in [0, 1]
through a sigmoid. A critic maps samples [and labels] to one logit (GAN) or score (WGAN) per
example, (B,). Class conditioning follows the projection discriminator (Miyato & Koyama 2018):
f(x, y) = psi(phi(x)) + <e_y, phi(x)>, and the generator adds a label embedding to z.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mlatlas.nn.layers import mlp

CriticNorm = Literal["none", "batch", "layer"]


class Generator(nn.Module):
    """z [+ e_y] -> a body that maps the latent to samples."""

    def __init__(self, body: nn.Module, latent_dim: int, num_classes: int = 0):
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.labels = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.body = body

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"the generator takes z of shape (B, {self.latent_dim}), got "
                             f"{tuple(z.shape)}")
        if self.labels is not None:
            if y is None:
                raise ValueError("a class-conditional generator needs labels y")
            z = z + self.labels(y)
        return self.body(z)


class Critic(nn.Module):
    """phi(x) -> psi(phi(x)) [+ <e_y, phi(x)>]: one logit or score per example."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int = 0):
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, 1)
        self.labels = nn.Embedding(num_classes, feature_dim) if num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        phi = self.features(x)
        out = self.head(phi).squeeze(1)
        if self.labels is not None:
            if y is None:
                raise ValueError("a class-conditional critic needs labels y")
            out = out + (self.labels(y) * phi).sum(1)
        return out


def mlp_pair(dim: int, latent_dim: int, hidden: int, depth: int,
             num_classes: int = 0) -> tuple[Generator, Critic]:
    """MLP generator and critic for points of ``dim`` dimensions (ReLU / leaky ReLU)."""
    generator = Generator(mlp(latent_dim, (hidden,) * depth, dim, nn.ReLU, orthogonal=False),
                          latent_dim, num_classes)
    features = nn.Sequential(mlp(dim, (hidden,) * (depth - 1), hidden, nn.LeakyReLU,
                                 orthogonal=False), nn.LeakyReLU(0.2))
    return generator, Critic(features, hidden, num_classes)


def _critic_norm(kind: CriticNorm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # layer norm over (C, H, W), as WGAN-GP recommends
    return nn.Identity()


class _ToUnit(nn.Module):
    """Generator logits -> images in [0, 1]."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(a)


class _FromUnit(nn.Module):
    """Images in [0, 1] -> [-1, 1], the range the critic's first layer sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 - 1


def dcgan_pair(shape: tuple[int, int, int], latent_dim: int, width: int,
               norm: CriticNorm = "none", num_classes: int = 0) -> tuple[Generator, Critic]:
    """DCGAN nets for images of ``shape`` (C, H, W), H and W multiples of 4: the generator
    projects z to (4w, H/4, W/4) and up-samples twice by transposed convolutions; the critic
    down-samples twice by stride-2 convolutions."""
    c, h, w = shape
    if h % 4 or w % 4:
        raise ValueError(f"the DCGAN nets need image sides divisible by 4, got {h}x{w}")
    body = nn.Sequential(
        nn.Linear(latent_dim, 4 * width * (h // 4) * (w // 4)),
        nn.Unflatten(1, (4 * width, h // 4, w // 4)), nn.BatchNorm2d(4 * width), nn.ReLU(),
        nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.ConvTranspose2d(2 * width, c, 4, 2, 1), _ToUnit())
    features = nn.Sequential(
        _FromUnit(),
        nn.Conv2d(c, width, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, 2, 1), _critic_norm(norm, 2 * width), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), 4 * width), nn.LeakyReLU(0.2))
    return Generator(body, latent_dim, num_classes), Critic(features, 4 * width, num_classes)


class GAN(nn.Module):
    """The pair trained together, checkpointed as one model."""

    def __init__(self, generator: Generator, critic: Critic):
        super().__init__()
        self.generator, self.critic = generator, critic
