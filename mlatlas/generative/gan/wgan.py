r"""WGAN (Arjovsky et al. 2017) and WGAN-GP (Gulrajani et al. 2017): a critic f trained to
maximise the Kantorovich-Rubinstein dual E f(x) - E f(G(z)) of W1, the generator on -E f(G(z)).

- ``wgan`` keeps f K-Lipschitz by clipping every weight to [-c, c] (c = 0.01) after each critic
  step, RMSprop at 5e-5, and n_critic = 5 critic steps per generator step, 100 for the first 25
  generator steps and every 500th (the paper's Algorithm 1 and code).
- ``wgan_gp`` adds lambda E[(||grad f(x_hat)|| - 1)^2] on random interpolates
  x_hat = eps x + (1 - eps) G(z) (lambda = 10), Adam 1e-4 with betas (0.5, 0.9) (``--beta1 0``
  for the paper's ResNet setting), n_critic = 5, and no batch norm in the critic (the penalty is
  per example; layer norm is allowed).

The maths is in :mod:`mlatlas.generative.gan.losses`, the loop in
:mod:`mlatlas.generative.gan.common`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError, require_at_least
from mlatlas.generative.gan.common import AdversarialConfig, evaluate, sample, train
from mlatlas.generative.gan.losses import (
    clip_weights,
    critic_iterations,
    critic_loss,
    gradient_penalty,
    interpolates,
    wasserstein_estimate,
    wasserstein_generator_loss,
)

__all__ = ["Config", "GPConfig", "evaluate", "sample", "train"]


def _critic_metrics(f_real: torch.Tensor, f_fake: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"w_estimate": wasserstein_estimate(f_real, f_fake).detach()}


@dataclass
class Config(AdversarialConfig):
    METHOD: ClassVar[str] = "wgan"
    WASSERSTEIN: ClassVar[bool] = True

    lr: float = 5e-5
    """RMSprop learning rate of the generator and the critic."""
    n_critic: int = 5
    """Critic steps per generator step (outside the bursts)."""
    clip: float = 0.01
    """Clip every critic weight to [-clip, clip] after each critic step."""
    burst: int = 100
    """Critic steps for the first --burst-warmup generator steps and every --burst-every-th
    (0 turns the bursts off)."""
    burst_warmup: int = 25
    """Generator steps at the start that get --burst critic steps."""
    burst_every: int = 500
    """Every this-many-th generator step gets --burst critic steps."""
    collapse_window: int = 0
    """Stop after this many generator steps in a row with the critic's loss below 1e-3 (0: off;
    a Wasserstein critic's loss sits near 0 at equilibrium)."""

    def check(self) -> None:
        super().check()
        if not self.clip > 0:
            raise ConfigError(f"--clip must be positive, got {self.clip}")
        require_at_least(self, 1, "burst_every")

    def optimizers(self, model):
        return (torch.optim.RMSprop(model.generator.parameters(), lr=self.lr),
                torch.optim.RMSprop(model.critic.parameters(), lr=self.lr))

    def critic_steps(self, step: int) -> int:
        return critic_iterations(step, self.n_critic, self.burst, self.burst_warmup,
                                 self.burst_every)

    def critic_loss(self, model, real, fake, y, generator):
        f_real, f_fake = model.critic(real, y), model.critic(fake, y)
        return critic_loss(f_real, f_fake), _critic_metrics(f_real, f_fake)

    def generator_loss(self, f_fake):
        return wasserstein_generator_loss(f_fake)

    def constrain(self, critic) -> None:
        clip_weights(critic, self.clip)


@dataclass
class GPConfig(AdversarialConfig):
    METHOD: ClassVar[str] = "wgan_gp"
    WASSERSTEIN: ClassVar[bool] = True

    lr: float = 1e-4
    """Adam learning rate of the generator and the critic."""
    beta1: float = 0.5
    """Adam's beta1 (0.5 as in the paper's toy and DCGAN runs; 0 for its ResNets)."""
    beta2: float = 0.9
    """Adam's beta2."""
    n_critic: int = 5
    """Critic steps per generator step."""
    gp_lambda: float = 10.0
    """lambda, the weight of the gradient penalty."""
    collapse_window: int = 0
    """Stop after this many generator steps in a row with the critic's loss below 1e-3 (0: off;
    a Wasserstein critic's loss sits near 0 at equilibrium)."""

    def check(self) -> None:
        super().check()
        if self.critic_norm == "batch":
            raise ConfigError("wgan_gp penalises each example's gradient, which batch norm "
                              "couples across the batch: use --critic-norm none or layer")
        if self.gp_lambda < 0:
            raise ConfigError(f"--gp-lambda must be non-negative, got {self.gp_lambda}")

    def critic_loss(self, model, real, fake, y, generator):
        f_real, f_fake = model.critic(real, y), model.critic(fake, y)
        eps = distributed.rand((len(real),), generator=generator).to(real.device)
        penalty = gradient_penalty(lambda x: model.critic(x, y), interpolates(real, fake, eps),
                                   self.gp_lambda)
        return critic_loss(f_real, f_fake) + penalty, {**_critic_metrics(f_real, f_fake),
                                                       "gradient_penalty": penalty.detach()}

    def generator_loss(self, f_fake):
        return wasserstein_generator_loss(f_fake)
