"""Networks of the deep RL agents: the MLP, the stochastic policy pi(a | s) in closed forms, the
state-value network and Polyak averaging of target networks.

:class:`Policy` is categorical over logits for discrete actions; for continuous actions a
diagonal Gaussian N(mu(s), diag(sigma^2)) with a learned state-independent log sigma. Its
distribution is one tensor (log-probabilities, or [mu, log sigma]) and its log-probability,
entropy, KL and sampling are written out on that tensor:

    categorical   log pi(a | s) = l_a - logsumexp(l),   H = -sum_a pi_a log pi_a,
                  KL(p || q) = sum_a p_a (log p_a - log q_a)
    Gaussian      log pi(a | s) = sum_i [-(a_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i]
                                  - d/2 log 2 pi,
                  H = sum_i (log sigma_i + (1 + log 2 pi) / 2),
                  KL(0 || 1) = sum_i [log sigma1_i - log sigma0_i
                                      + (sigma0_i^2 + (mu0_i - mu1_i)^2) / (2 sigma1_i^2) - 1/2]
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlatlas.nn.layers import mlp
from mlatlas.rl.deep.envs import Spaces

LOG_2PI = math.log(2 * math.pi)


class Policy(nn.Module):
    """pi(a | s): categorical over logits for discrete actions; for continuous actions a diagonal
    Gaussian N(mu(s), diag(sigma^2)) with a learned state-independent log sigma.

    ``distribution(obs)`` returns the distribution's parameters as one tensor: the normalised
    log-probabilities log pi(. | s) (N, n), or [mu, log sigma] (N, 2 d). The closed forms below
    act on it directly; torch.distributions objects cost more to build than a small network
    costs to run, once per environment step.
    """

    def __init__(self, spaces: Spaces, hidden: tuple[int, ...], log_std_init: float = 0.0,
                 activation: type[nn.Module] = nn.Tanh):
        super().__init__()
        self.discrete = spaces.discrete
        self.net = mlp(spaces.obs_dim, hidden, spaces.act_dim, activation, out_gain=0.01)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((spaces.act_dim,), log_std_init))

    def distribution(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.net(obs)
        if self.discrete:
            return out.log_softmax(-1)
        return torch.cat([out, self.log_std.expand_as(out)], -1)

    def log_prob(self, dist: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a | s), summed over the action's dimensions."""
        if self.discrete:
            return dist.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        mu, log_std = dist.chunk(2, -1)
        z = (actions - mu) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std).sum(-1) - 0.5 * LOG_2PI * mu.shape[-1]

    def entropy(self, dist: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return -(dist.exp() * dist).sum(-1)
        log_std = dist.chunk(2, -1)[1]
        return (log_std + 0.5 * (1.0 + LOG_2PI)).sum(-1)

    def kl(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """KL(old || new) per state."""
        if self.discrete:
            return (old.exp() * (old - new)).sum(-1)
        (mu0, log_std0), (mu1, log_std1) = old.chunk(2, -1), new.chunk(2, -1)
        ratio = (torch.exp(2 * log_std0) + (mu0 - mu1).square()) * torch.exp(-2 * log_std1)
        return (log_std1 - log_std0 + 0.5 * ratio - 0.5).sum(-1)

    def sample(self, dist: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.discrete:
            return torch.multinomial(dist.exp(), 1, generator=generator).squeeze(-1)
        mu, log_std = dist.chunk(2, -1)
        return mu + log_std.exp() * torch.randn(mu.shape, generator=generator)

    def explore(self, obs: torch.Tensor, generator: torch.Generator, t: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """pi(. | s) and an action drawn from it, at step t of a rollout (t matters only to the
        state-dependent exploration of :mod:`~mlatlas.rl.deep.gsde`, which redraws its noise by
        it)."""
        dist = self.distribution(obs)
        return dist, self.sample(dist, generator)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """An action drawn from pi, or the most likely one when ``generator`` is None."""
        dist = self.distribution(obs)
        if generator is not None:
            return self.sample(dist, generator)
        return dist.argmax(-1) if self.discrete else dist.chunk(2, -1)[0]


def value_net(spaces: Spaces, hidden: tuple[int, ...],
              activation: type[nn.Module] = nn.Tanh) -> nn.Module:
    """v_w(s): an MLP from (N, obs_dim) observations to (N,) values."""
    return _Squeeze(mlp(spaces.obs_dim, hidden, 1, activation, out_gain=1.0))


class _Squeeze(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)
