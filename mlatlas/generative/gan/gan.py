r"""GAN (Goodfellow et al. 2014): a discriminator D = sigmoid(l) trained by binary
cross-entropy, L_D = E[softplus(-l(x))] + E[softplus(l(G(z)))], and a generator trained on the
minimax loss E[log(1 - D(G(z)))] or the non-saturating -E[log D(G(z))] (``--g-loss``); one
discriminator step per generator step, Adam at 2e-4 with betas (0, 0.9) (DCGAN's (0.5, 0.999)
collapses to one or two of the 8 Gaussians in our runs; see docs/methods/gan.md). The maths
is in :mod:`mlatlas.generative.gan.losses`, the loop in :mod:`mlatlas.generative.gan.common`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from mlatlas.generative.gan.common import AdversarialConfig, evaluate, sample, train
from mlatlas.generative.gan.losses import discriminator_loss, generator_loss

__all__ = ["Config", "evaluate", "sample", "train"]


@dataclass
class Config(AdversarialConfig):
    METHOD: ClassVar[str] = "gan"

    beta1: float = 0.0
    """Adam's beta1 (DCGAN uses 0.5)."""
    beta2: float = 0.9
    """Adam's beta2 (DCGAN uses 0.999)."""
    g_loss: Literal["non-saturating", "minimax"] = "non-saturating"
    """Generator loss: -E log D(G(z)) (non-saturating) or E log(1 - D(G(z))) (minimax)."""

    def critic_loss(self, model, real, fake, y, generator):
        logits_real, logits_fake = model.critic(real, y), model.critic(fake, y)
        return discriminator_loss(logits_real, logits_fake), {
            "d_real": torch.sigmoid(logits_real).mean().detach(),
            "d_fake": torch.sigmoid(logits_fake).mean().detach()}

    def generator_loss(self, f_fake):
        return generator_loss(f_fake, self.g_loss)
