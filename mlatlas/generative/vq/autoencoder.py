r"""The KL autoencoder: the first stage of latent diffusion (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models"), a VAE (Kingma & Welling 2014) with a small KL
weight.

The encoder gives the mean and log-variance of a diagonal Gaussian posterior over a latent map
z (C_z, h, w), q(z | x) = N(mu(x), diag sigma^2(x)) (log sigma^2 clamped to [-30, 20]); training
draws z = mu + sigma * eps, eps ~ N(0, I) (the reparameterisation trick) and minimises, per image
of D pixels,

    L = 1/D [ ||x - x_hat(z)||^2 + kl_weight KL(q(z | x) || N(0, I)) ],
    KL(N(mu, sigma^2) || N(0, 1)) = 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2)   (summed over z),

so the reconstruction term is the mean squared error per pixel, and ``kl_weight`` weighs the KL
against the squared error summed over the image as Stable Diffusion's ``kl_weight`` (1e-6) weighs
it against its summed reconstruction loss. A weight far below 1 makes the model an autoencoder
whose latents are only kept from drifting to large values, not a generative VAE: the posterior
stays sharp, the reconstructions sharp, and the prior N(0, I) is left to a second stage (latent
diffusion). The default 1e-3 is the top of the usual 1e-6..1e-3 range: these images have 64 or
784 pixels, not Stable Diffusion's 196,608, so a weight of 1e-6 leaves the KL, summed over the
latents, nothing beside the reconstruction term. On digits (1,000 steps, docs/methods/vq.md)
1e-6 trains as no KL at all does (KL about 390 nats per image, held-out MSE 0.0003), 1e-3 holds
the KL at about 110 nats for an MSE of 0.0006 (the mean image: 0.074), and 1e-1 squeezes it to
10 nats at an MSE of 0.011. ``latent_std`` and ``scaling_factor`` = 1 / std (diffusers'
convention) in the evaluation say how to scale the latents for the second stage.

``encode`` returns the posterior mean mu(x), ``decode`` maps a latent to an image, and
:func:`sample` decodes z ~ N(0, I): digit-like images on digits at ``--kl-weight 1e-1``, noise-like
ones at the default, whose posterior the prior does not cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError, require_at_least
from mlatlas.core.run import Run
from mlatlas.generative.vq.common import (
    Autoencoder,
    AutoencoderConfig,
    Reconstruction,
    evaluate,
    load_model,
    train,
)
from mlatlas.generative.vq.networks import Decoder, Encoder

__all__ = ["Config", "KLAutoencoder", "evaluate", "gaussian_kl", "sample", "train"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) of (B, ...) diagonal Gaussians, summed per example:
    1/2 sum (mean^2 + exp(logvar) - 1 - logvar), shape (B,)."""
    if mean.shape != logvar.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ")
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


class KLAutoencoder(Autoencoder):
    """Encoder -> (mu, log sigma^2) of q(z | x), latents (C_z, h, w) -> decoder."""

    def __init__(self, image_shape: tuple[int, int, int], latent_shape: tuple[int, int, int],
                 encoder: Encoder, decoder: Decoder, kl_weight: float):
        super().__init__(image_shape, latent_shape, encoder, decoder)
        self.kl_weight = kl_weight

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) images -> mean and clamped log-variance, each (B, C_z, h, w)."""
        self.check_images(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean mu(x), (B, C_z, h, w)."""
        return self.posterior(x)[0]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> Reconstruction:
        mean, logvar = self.posterior(x)
        eps = distributed.randn(mean.shape, generator=generator).to(mean.device)
        z = mean + torch.exp(0.5 * logvar) * eps
        kl = gaussian_kl(mean.float(), logvar.float()).mean()
        pixels = x[0].numel()
        return Reconstruction(self.decoder(z), self.kl_weight * kl / pixels, {"kl": kl.detach()})


@dataclass
class Config(AutoencoderConfig):
    """The KL autoencoder: the family's fields and the latent's."""

    METHOD: ClassVar[str] = "autoencoder"

    latent_channels: int = 4
    """C_z, the channels of the latent map (Stable Diffusion's autoencoder has 4)."""
    kl_weight: float = 1e-3
    """Weight of KL(q(z|x) || N(0, I)) against the squared error summed over an image."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "latent_channels")
        if self.kl_weight < 0:
            raise ConfigError(f"--kl-weight must be non-negative, got {self.kl_weight}")

    def build_model(self, shape: tuple[int, int, int]) -> KLAutoencoder:
        h, w = self.latent_size(shape)
        return KLAutoencoder(shape, (self.latent_channels, h, w),
                             Encoder(shape[0], self.width, self.downsample,
                                     2 * self.latent_channels),
                             Decoder(shape[0], self.width, self.downsample, self.latent_channels),
                             self.kl_weight)


def sample(run: Run, n: int = 64, seed: int = 0, progress: bool | None = None) -> torch.Tensor:
    """n images decoded from z ~ N(0, I) (drawn with ``seed``), clipped to [0, 1]."""
    _, _, model = load_model(run)
    device = next(model.parameters()).device
    z = torch.randn((n, *model.latent_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.decode(z.to(device)).cpu().clamp(0, 1)
