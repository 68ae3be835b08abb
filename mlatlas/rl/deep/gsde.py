"""Generalised state-dependent exploration, gSDE (Raffin, Kober & Stulp 2022, "Smooth Exploration
for Robotic Reinforcement Learning"), after the state-dependent exploration of Rückstieß et al.
(2008).

A Gaussian policy perturbs each action with noise drawn afresh at every step. gSDE makes the
noise a function of the state, fixed between draws of its parameters: with z(s) the policy's
latent features (the last hidden layer, below the linear head mu(s) = theta_mu z(s)),

    a = mu(s) + epsilon(s; theta_eps),    epsilon(s; theta_eps) = z(s) theta_eps,
    theta_eps ~ N(0, sigma^2)  entrywise, a (F, d) matrix,   sigma = exp(log sigma),

with log sigma a learned (F, d) matrix (one scale per feature and action). theta_eps is drawn
once per parallel environment at the start of each rollout and again every n steps
(``sde_sample_freq``; -1 draws it only at the start), so the same state gives the same
perturbation until the next draw and the exploration is smooth in time. For a fixed state the
noise is Gaussian over theta_eps, its components independent, so the policy whose log-likelihood
the agents optimise is the diagonal Gaussian

    pi(a | s) = N(mu(s), diag(sigma_hat^2(s))),  sigma_hat_k^2(s) = sum_j z_j(s)^2 sigma_jk^2
                                                                   (+ epsilon = 1e-6),

i.e. sigma_hat^2 = (z^2) sigma^2 as a matrix product; its log-probability, entropy and KL are the
Gaussian closed forms of :mod:`~mlatlas.rl.deep.policies` with a state-dependent log sigma_hat.
z(s) enters sigma_hat detached, so the variance is learned through sigma alone and the features
only through mu (Stable-Baselines3's default ``learn_features=False``). The epsilon keeps
sigma_hat positive where the features vanish. Actions are clipped to the box by the environment
step, as for the plain Gaussian policy; log-probabilities are of the unclipped actions.
"""

from __future__ import annotations

import torch
from torch import nn

from mlatlas.rl.deep.envs import Spaces
from mlatlas.rl.deep.policies import Policy

EPSILON = 1e-6
"""Added to sigma_hat^2(s), so the variance stays positive where z(s) vanishes."""


def action_log_std(z: torch.Tensor, log_sigma: torch.Tensor,
                   epsilon: float = EPSILON) -> torch.Tensor:
    """log sigma_hat(s) = 1/2 log((z^2) sigma^2 + epsilon): (N, F) features and the (F, d) log
    sigma matrix to (N, d)."""
    return 0.5 * torch.log(z.square() @ torch.exp(2.0 * log_sigma) + epsilon)


def exploration_matrix(log_sigma: torch.Tensor, n: int,
                       generator: torch.Generator) -> torch.Tensor:
    """theta_eps ~ N(0, sigma^2) entrywise, one (F, d) matrix for each of ``n`` environments:
    (n, F, d)."""
    noise = torch.randn((n, *log_sigma.shape), generator=generator, dtype=log_sigma.dtype)
    return torch.exp(log_sigma) * noise


def exploration_noise(z: torch.Tensor, theta_eps: torch.Tensor) -> torch.Tensor:
    """epsilon(s; theta_eps) = z(s) theta_eps, row b with environment b's matrix: (B, F) and
    (B, F, d) to (B, d)."""
    return torch.bmm(z.unsqueeze(1), theta_eps).squeeze(1)


def resample_due(t: int, sample_freq: int) -> bool:
    """Whether theta_eps is drawn before step t of a rollout: at t = 0, and every
    ``sample_freq`` steps when it is positive (-1: only at t = 0)."""
    return t == 0 or (sample_freq > 0 and t % sample_freq == 0)


class StateDependentPolicy(Policy):
    """The Gaussian policy explored by gSDE: N(mu(s), diag(sigma_hat^2(s))) of the module
    docstring, acting with mu(s) + z(s) theta_eps during rollouts.

    ``log_std`` is the (F, d) matrix log sigma; ``distribution(obs)`` is [mu, log sigma_hat(s)],
    on which the inherited closed forms (log-probability, entropy, KL, the deterministic action
    mu) act unchanged. theta_eps (``theta_eps``, (B, F, d)) is no parameter and not checkpointed:
    it is drawn from the run's generator at the start of every rollout, so a resumed run draws
    the matrix an uninterrupted one would have.
    """

    def __init__(self, spaces: Spaces, hidden: tuple[int, ...], log_std_init: float = 0.0,
                 sample_freq: int = -1, activation: type[nn.Module] = nn.Tanh):
        if spaces.discrete:
            raise ValueError("gSDE needs continuous (Box) actions")
        super().__init__(spaces, hidden, log_std_init, activation)
        features = hidden[-1] if hidden else spaces.obs_dim
        # log sigma is a matrix here: one scale for each feature and action.
        self.log_std = nn.Parameter(torch.full((features, spaces.act_dim), log_std_init))
        self.sample_freq = sample_freq
        self.theta_eps: torch.Tensor | None = None

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """z(s): the last hidden layer's output, (N, F)."""
        z = obs
        for layer in tuple(self.net)[:-1]:
            z = layer(z)
        return z

    def gaussian(self, z: torch.Tensor) -> torch.Tensor:
        """[mu(s), log sigma_hat(s)] from the features z(s)."""
        return torch.cat([self.net[-1](z), action_log_std(z.detach(), self.log_std)], -1)

    def distribution(self, obs: torch.Tensor) -> torch.Tensor:
        return self.gaussian(self.features(obs))

    def explore(self, obs: torch.Tensor, generator: torch.Generator, t: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """pi(. | s) and the action mu(s) + z(s) theta_eps, environment b (row b of ``obs``)
        with its own theta_eps, drawn anew when step t of the rollout is due
        (:func:`resample_due`)."""
        if resample_due(t, self.sample_freq) or self.theta_eps is None:
            self.theta_eps = exploration_matrix(self.log_std.detach(), len(obs), generator)
        z = self.features(obs)
        dist = self.gaussian(z)
        return dist, dist.chunk(2, -1)[0] + exploration_noise(z, self.theta_eps)
