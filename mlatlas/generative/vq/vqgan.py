r"""VQGAN (Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis"): the VQ
autoencoder of VQ-VAE trained with a perceptual loss and against a patch discriminator.

The autoencoder's loss adds to VQ-VAE's codebook and commitment terms (:mod:`.quantizer`)

    L_rec = ||x - x_hat||^2 + w_p P(x, x_hat),
    L = L_rec + L_VQ + [step > disc_start] w_d lambda L_G,

where P is a perceptual distance on the features of the library's own frozen classifier
(:func:`mlatlas.eval.classifier.load_feature_net`, no downloaded VGG): with phi_l(x) the
activations of layer l, unit-normalised over channels at each position,

    P(x, x_hat) = sum_l mean_positions ||phi_l(x) - phi_l(x_hat)||^2.

The discriminator D (a PatchGAN, :class:`~.networks.PatchDiscriminator`, a map of logits) and the
generator (the decoder) play the hinge game

    L_D = E[relu(1 - D(x))] + E[relu(1 + D(x_hat))],      L_G = -E[D(x_hat)],

each expectation a mean over images and patches. The adaptive weight balances the two gradients
at the decoder's last layer G_L,

    lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_G|| + 1e-4),   clamped to [0, 1e4], detached,

and the discriminator trains (Adam, betas (0.5, 0.9)) only after ``--disc-start`` steps, once
the reconstructions are good enough to be worth judging.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.core.config import ConfigError, require_at_least
from mlatlas.eval.classifier import FeatureNet, load_feature_net
from mlatlas.generative.vq.common import (
    Autoencoder,
    AutoencoderConfig,
    CodebookConfig,
    Reconstruction,
    evaluate,
    load_data,
    sample,
    train,
)
from mlatlas.generative.vq.networks import PatchDiscriminator

__all__ = ["Config", "adaptive_weight", "evaluate", "hinge_discriminator_loss",
           "hinge_generator_loss", "perceptual_loss", "sample", "train"]

MAX_ADAPTIVE_WEIGHT = 1e4
ADAPTIVE_DELTA = 1e-4


def hinge_discriminator_loss(logits_real: torch.Tensor,
                             logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = E[relu(1 - D(x))] + E[relu(1 + D(x_hat))] over logits of any shape."""
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_G = -E[D(x_hat)]."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor,
                    last_layer_weight: torch.Tensor) -> torch.Tensor:
    """lambda = ||grad_w rec_loss|| / (||grad_w g_loss|| + 1e-4) at the decoder's last weight w,
    clamped to [0, 1e4] and detached (a 0-d tensor); the graphs are kept for the backward pass."""
    g_rec, = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    g_gan, = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    weight = g_rec.norm() / (g_gan.norm() + ADAPTIVE_DELTA)
    return weight.clamp(0, MAX_ADAPTIVE_WEIGHT).detach()


def feature_maps(net: FeatureNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The activations after each ReLU of the classifier's feature body, (B, C_l, ...)."""
    maps, h = [], x * 2 - 1  # FeatureNet.features' input scaling
    for layer in net.body:
        h = layer(h)
        if isinstance(layer, nn.ReLU):
            maps.append(h)
    return maps


def perceptual_loss(net: FeatureNet, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """P(x, x_hat) = sum_l mean_positions ||phi_l(x) - phi_l(x_hat)||^2 with features
    unit-normalised over channels (dim 1); the gradient reaches x_hat only."""
    with torch.no_grad():
        real = feature_maps(net, x)
    total = x_hat.new_zeros(())
    for f_real, f_fake in zip(real, feature_maps(net, x_hat), strict=True):
        diff = F.normalize(f_real, dim=1, eps=1e-10) - F.normalize(f_fake, dim=1, eps=1e-10)
        total = total + diff.pow(2).sum(1).mean()
    return total


@functools.cache
def frozen_feature_net(dataset: str, device: str) -> FeatureNet:
    """The shipped classifier of ``dataset`` on ``device``, its parameters frozen."""
    net = load_feature_net(dataset).to(device)
    return net.requires_grad_(False)


@dataclass
class Config(CodebookConfig, AutoencoderConfig):
    """VQGAN: the family's fields, the codebook's, the discriminator's and the perceptual
    loss's."""

    METHOD: ClassVar[str] = "vqgan"

    disc_start: int = 500
    """Steps before the discriminator trains and the adversarial term enters the loss."""
    disc_weight: float = 0.1
    """w_d, the weight of the adaptively weighted generator loss lambda L_G."""
    disc_lr: float = 1e-3
    """Adam learning rate of the discriminator."""
    disc_width: int = 32
    """Channels of the discriminator's first convolution (doubled per layer)."""
    disc_layers: int = 2
    """Stride-2 convolutions of the discriminator: its logits are a (H / 2^L, W / 2^L) map."""
    perceptual_weight: float = 1.0
    """w_p, the weight of the perceptual distance on the shipped classifier's features (0 turns
    it off; needed for data without a shipped classifier)."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "disc_width", "disc_layers")
        if self.disc_weight < 0 or self.perceptual_weight < 0:
            name = "disc-weight" if self.disc_weight < 0 else "perceptual-weight"
            raise ConfigError(f"--{name} must be non-negative, got "
                              f"{getattr(self, name.replace('-', '_'))}")

    def check_data(self) -> None:
        super().check_data()
        data = load_data(self)
        side = min(data.sample_shape[1:])
        if side < 2**self.disc_layers:
            raise ConfigError(f"--disc-layers {self.disc_layers} halves the {side}-pixel side of "
                              f"{self.dataset} below one patch; use at most "
                              f"{side.bit_length() - 1}")
        if self.perceptual_weight:
            try:
                load_feature_net(data.name)
            except FileNotFoundError as err:
                raise ConfigError(f"--perceptual-weight needs a shipped classifier: {err}; "
                                  "use --perceptual-weight 0") from None

    def build_critic(self, shape: tuple[int, int, int]) -> PatchDiscriminator:
        return PatchDiscriminator(shape[0], self.disc_width, self.disc_layers)

    def critic_step(self, step: int) -> bool:
        return step > self.disc_start

    def critic_optimizer(self, critic: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(critic.parameters(), lr=self.disc_lr, betas=(0.5, 0.9))

    def critic_loss(self, critic: nn.Module, x: torch.Tensor, x_hat: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real, logits_fake = critic(x), critic(x_hat)
        loss = hinge_discriminator_loss(logits_real, logits_fake)
        return loss, {"d_loss": loss.detach(), "d_real": logits_real.detach().mean(),
                      "d_fake": logits_fake.detach().mean()}

    def loss(self, model: Autoencoder, x: torch.Tensor, out: Reconstruction, step: int,
             critic: nn.Module | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mse = F.mse_loss(out.x_hat, x)
        rec, metrics = mse, {"rec_mse": mse.detach(), **out.metrics}
        if self.perceptual_weight:
            net = frozen_feature_net(self.dataset, str(x.device))
            perceptual = perceptual_loss(net, x, out.x_hat)
            rec = rec + self.perceptual_weight * perceptual
            metrics["perceptual"] = perceptual.detach()
        loss = rec + out.loss
        if critic is not None and self.critic_step(step) and self.disc_weight:
            g_loss = hinge_generator_loss(critic(out.x_hat))
            lam = adaptive_weight(rec, g_loss, model.last_layer)
            loss = loss + self.disc_weight * lam * g_loss
            metrics |= {"g_loss": g_loss.detach(), "adaptive_weight": lam}
        return loss, {"loss": loss.detach(), **metrics}
