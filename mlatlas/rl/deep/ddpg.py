"""Deep deterministic policy gradient (Lillicrap et al. 2016), built on the deterministic policy
gradient theorem (Silver et al. 2014).

A deterministic actor mu_phi(s) and a critic Q_theta(s, a) learn off-policy from a replay buffer
D (:mod:`~mlatlas.rl.deep.replay`), each with a slowly moving target copy phi', theta'.

Critic: regress on the one-step target

    y = r + gamma (1 - terminated) Q_theta'(s', mu_phi'(s')),
    L(theta) = E_D[(Q_theta(s, a) - y)^2]

where ``terminated`` marks a true terminal s'; a time-limit cut is not terminal, so y keeps the
bootstrap there (s' is the episode's final observation, kept by the environment loop).

Actor: ascend the deterministic policy gradient

    grad_phi J = E_D[ grad_a Q_theta(s, a)|_{a = mu_phi(s)} grad_phi mu_phi(s) ],

i.e. minimise -E_D[Q_theta(s, mu_phi(s))] with respect to phi only.

Targets follow by Polyak averaging after each actor update (every update for DDPG):
theta' <- tau theta + (1 - tau) theta', phi' <- tau phi + (1 - tau) phi'.

Exploration: a_t = clip(mu_phi(s_t) + N_t, low, high), with N_t either Gaussian,
N_t ~ N(0, sigma^2 I), or an Ornstein-Uhlenbeck process (Uhlenbeck & Ornstein 1930),
temporally correlated, stepped by Euler-Maruyama

    x_{t+1} = x_t + theta (mu - x_t) dt + sigma sqrt(dt) eps_t,     eps_t ~ N(0, I),

whose stationary law is N(mu, sigma^2 / (2 theta)) as dt -> 0; it restarts at x = 0 in an
environment whose episode ended. For the first ``learning_starts`` environment steps actions are
uniform in the box and nothing is learned.

The actor works in the unit box: u = tanh(f_phi(s)) in [-1, 1]^d, played as a = c + h u with c and
h the box's centre and half-width. The critic reads u and the buffer stores u, so the noise
scales (sigma here, the smoothing noise of TD3) are fractions of the half-width, whatever the box.

:mod:`~mlatlas.rl.deep.td3` reuses all of this and changes the target, the number of critics and
how often the actor moves.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.optim import polyak_update
from mlatlas.core.run import Run
from mlatlas.nn.layers import mlp
from mlatlas.rl.deep.config import DeepRLConfig
from mlatlas.rl.deep.envs import Spaces, check_env_id, env_spaces
from mlatlas.rl.deep.evaluation import evaluate
from mlatlas.rl.deep.loop import Agent, prepare, train_agent
from mlatlas.rl.deep.replay import Batch, ReplayBuffer

__all__ = ["Config", "GaussianNoise", "Learner", "OrnsteinUhlenbeckNoise", "QEnsemble",
           "ddpg_target", "evaluate", "make_actor", "policy_update_due", "train"]


@dataclass
class Config(DeepRLConfig):
    METHOD: ClassVar[str] = "ddpg"

    env: str = "Pendulum-v1"
    """A gymnasium environment id with a bounded Box action space."""
    steps: int = 50_000
    """Environment steps to train for (summed over the parallel environments; rounded down to
    whole updates, at least one)."""
    num_envs: int = 1
    """Parallel environments; each update steps all of them ``train_freq`` times."""
    lr: float = 1e-3
    """Learning rate of the actor and the critic (Adam)."""
    hidden: int = 256
    """Width of each hidden layer of the actor and the critic."""
    buffer_size: int = 1_000_000
    """Capacity of the replay buffer in transitions (no more than ``steps`` are allocated)."""
    batch_size: int = 256
    """Transitions per minibatch."""
    learning_starts: int = 100
    """Environment steps of uniformly random actions before learning starts."""
    train_freq: int = 1
    """Vector-environment steps per update (each gives num_envs transitions)."""
    gradient_steps: int = 1
    """Gradient steps of the critic per update."""
    tau: float = 0.005
    """Polyak coefficient of the target networks (1 copies, 0 freezes)."""
    noise: Literal["gaussian", "ou"] = "gaussian"
    """Exploration noise: 'gaussian' (independent) or 'ou' (Ornstein-Uhlenbeck, correlated)."""
    noise_std: float = 0.1
    """sigma of the exploration noise, as a fraction of the action box's half-width (for 'ou' the
    process's sigma: its stationary std is about sigma / sqrt(2 theta))."""
    ou_theta: float = 0.15
    """theta, the mean-reversion rate of the Ornstein-Uhlenbeck noise."""
    ou_dt: float = 0.01
    """dt, the time step of the Ornstein-Uhlenbeck noise."""
    # In environment steps, every 500 and 10,000 updates of the Pendulum preset's 4.
    log_every: int = 2_000
    """Write a row of metrics.csv every this many environment steps (rounded up to whole
    updates)."""
    ckpt_every: int = 40_000
    """Write checkpoint.safetensors (replay buffer included) every this many environment steps
    (rounded up to whole updates; and always at the end)."""

    # Started from rl-baselines3-zoo's hyperparams/ddpg.yml. Pendulum-v1: 4 environments, 2
    # gradient steps per vector step, tau 0.01, 64-unit networks and 1000 random steps instead
    # of 10000 solved in fewer gradient steps, every one of them cheaper (measured on seeds 0-3,
    # docs/methods/rl-deep.md). MountainCarContinuous-v0 keeps the zoo's OU noise and has not
    # been measured to solve yet.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "Pendulum-v1": dict(num_envs=4, gradient_steps=2, tau=0.01, gamma=0.98, lr=1e-3,
                            hidden=64, learning_starts=1000, noise="gaussian", noise_std=0.1,
                            steps=20_000),
        "MountainCarContinuous-v0": dict(lr=1e-3, hidden=64, noise="ou", noise_std=0.5,
                                         steps=300_000),
    }

    def check(self) -> None:
        super().check()
        check_replay_fields(self)


def check_replay_fields(cfg: Any) -> None:
    """The checks of the fields DDPG's and TD3's configs both declare."""
    require_at_least(cfg, 1, "buffer_size", "batch_size", "train_freq", "gradient_steps")
    if cfg.learning_starts < 0:
        raise ConfigError(f"--learning-starts must be >= 0, got {cfg.learning_starts}")
    require_unit(cfg, "tau")
    if cfg.noise_std < 0:
        raise ConfigError(f"--noise-std must be >= 0, got {cfg.noise_std}")
    if cfg.ou_theta <= 0 or cfg.ou_dt <= 0:
        raise ConfigError("--ou-theta and --ou-dt must be positive")


# The maths -------------------------------------------------------------------------------------
def ddpg_target(rewards: torch.Tensor, terminated: torch.Tensor, next_q: torch.Tensor,
                gamma: float) -> torch.Tensor:
    """y = r + gamma (1 - terminated) Q'(s', mu'(s')) for (B,) rewards, terminal flags (bool or
    0/1) and target values; a truncated (not terminated) transition keeps its bootstrap."""
    if not rewards.shape == terminated.shape == next_q.shape or rewards.dim() != 1:
        raise ValueError(f"ddpg_target needs (B,) tensors of one shape, got {tuple(rewards.shape)}"
                         f", {tuple(terminated.shape)}, {tuple(next_q.shape)}")
    return rewards + gamma * (1.0 - terminated.to(next_q.dtype)) * next_q


def policy_update_due(critic_updates: int, policy_delay: int) -> bool:
    """Whether the actor and the targets move after critic update number ``critic_updates``
    (1-based): every ``policy_delay``-th one (1 for DDPG, 2 for TD3)."""
    return critic_updates % policy_delay == 0


class GaussianNoise(nn.Module):
    """N_t ~ N(0, sigma^2 I), independent across steps; ``shape`` is (num_envs, act_dim)."""

    def __init__(self, shape: tuple[int, ...], sigma: float):
        super().__init__()
        self.shape, self.sigma = tuple(shape), sigma

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        return self.sigma * torch.randn(self.shape, generator=generator)

    def reset(self, ended: torch.Tensor | None = None) -> None:
        """Nothing to forget: each draw is independent."""


class OrnsteinUhlenbeckNoise(nn.Module):
    """x_{t+1} = x_t + theta (mu - x_t) dt + sigma sqrt(dt) eps_t, one process per row of
    ``shape`` = (num_envs, act_dim); the state x is a buffer, so it is checkpointed."""

    def __init__(self, shape: tuple[int, ...], sigma: float, theta: float = 0.15,
                 dt: float = 1e-2, mu: float = 0.0):
        super().__init__()
        if theta <= 0 or dt <= 0 or sigma < 0:
            raise ValueError(f"OU noise needs theta, dt > 0 and sigma >= 0, got {theta}, {dt}, "
                             f"{sigma}")
        self.sigma, self.theta, self.dt, self.mu = sigma, theta, dt, mu
        self.register_buffer("x", torch.zeros(shape))

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        eps = torch.randn(self.x.shape, generator=generator)
        self.x += self.theta * (self.mu - self.x) * self.dt + self.sigma * math.sqrt(self.dt) * eps
        return self.x.clone()

    def reset(self, ended: torch.Tensor | None = None) -> None:
        """Restart the processes of the environments in the (num_envs,) bool mask, or all."""
        if ended is None:
            self.x.zero_()
        else:
            self.x.masked_fill_(ended.reshape(-1, *([1] * (self.x.dim() - 1))), 0.0)


def make_noise(cfg: Any, act_dim: int) -> GaussianNoise | OrnsteinUhlenbeckNoise:
    shape = (cfg.num_envs, act_dim)
    if cfg.noise == "ou":
        return OrnsteinUhlenbeckNoise(shape, cfg.noise_std, cfg.ou_theta, cfg.ou_dt)
    return GaussianNoise(shape, cfg.noise_std)


# Networks --------------------------------------------------------------------------------------
class Actor(nn.Module):
    """mu_phi(s) = c + h tanh(f_phi(s)): deterministic actions inside the box [low, high]."""

    def __init__(self, spaces: Spaces, hidden: tuple[int, ...]):
        super().__init__()
        assert spaces.low is not None and spaces.high is not None
        self.net = mlp(spaces.obs_dim, hidden, spaces.act_dim, nn.ReLU, orthogonal=False)
        self.register_buffer("center", (spaces.high + spaces.low) / 2)
        self.register_buffer("half_width", (spaces.high - spaces.low) / 2)

    def unit(self, obs: torch.Tensor) -> torch.Tensor:
        """u = tanh(f_phi(s)) in [-1, 1]^d, the action in the unit box."""
        return torch.tanh(self.net(obs))

    def to_env(self, u: torch.Tensor) -> torch.Tensor:
        return self.center + self.half_width * u

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.to_env(self.unit(obs))


class QEnsemble(nn.Module):
    """K critics Q_k(s, u) with ReLU hidden layers, evaluated together: each layer is one batched
    matmul over k (half the kernel launches and autograd nodes of K separate networks).
    Each member starts like ``nn.Linear``'s default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    def __init__(self, n_critics: int, in_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        sizes = (in_dim, *hidden, 1)
        self.layers: list[tuple[nn.Parameter, nn.Parameter]] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
            bound = 1.0 / math.sqrt(fan_in)
            w = nn.Parameter(torch.empty(n_critics, fan_in, fan_out).uniform_(-bound, bound))
            b = nn.Parameter(torch.empty(n_critics, 1, fan_out).uniform_(-bound, bound))
            self.register_parameter(f"w{i}", w)
            self.register_parameter(f"b{i}", b)
            # A plain list: iterating nn.ParameterList costs more than a small layer's matmul.
            self.layers.append((w, b))
        self.n_critics = n_critics

    def forward(self, obs: torch.Tensor, u: torch.Tensor, members: int | None = None
                ) -> torch.Tensor:
        """(K, B) values Q_k(s, u) of (B, obs_dim) states and (B, act_dim) unit actions; only
        the first ``members`` critics when given (TD3's actor reads Q_1 alone)."""
        k = self.n_critics if members is None else members
        x = torch.cat([obs, u], dim=-1).expand(k, -1, -1)
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            x = torch.baddbmm(b[:k], x, w[:k]) if k < self.n_critics else torch.baddbmm(b, x, w)
            if i < last:
                x = torch.relu(x)
        return x.squeeze(-1)


def make_actor(cfg: Any, spaces: Spaces) -> Actor:
    """mu_phi of a DDPG or TD3 config (its ``hidden_sizes``)."""
    return Actor(spaces, cfg.hidden_sizes)


def box_spaces(cfg: Any) -> Spaces:
    """The env's spaces, or a ConfigError when its actions are not a bounded 1-d Box."""
    method = cfg.METHOD
    check_env_id(cfg.env)
    spaces = env_spaces(cfg.env)
    if spaces.discrete:
        raise ConfigError(f"{method} needs continuous (Box) actions; {cfg.env} has discrete ones")
    assert spaces.low is not None and spaces.high is not None
    if not (torch.isfinite(spaces.low).all() and torch.isfinite(spaces.high).all()):
        raise ConfigError(f"{method} needs a bounded action box; {cfg.env}'s is unbounded")
    return spaces


# Learning --------------------------------------------------------------------------------------
class Learner:
    """Actor, critics, their targets and optimizers, and the gradient steps on minibatches.

    DDPG is the case ``n_critics`` = 1, ``policy_delay`` = 1 with :meth:`target` as below; TD3
    subclasses it and changes only the target."""

    def __init__(self, cfg: Any, spaces: Spaces, n_critics: int = 1, policy_delay: int = 1):
        self.cfg, self.policy_delay = cfg, policy_delay
        self.actor = make_actor(cfg, spaces)
        self.critic = QEnsemble(n_critics, spaces.obs_dim + spaces.act_dim, cfg.hidden_sizes)
        self.target_actor = copy.deepcopy(self.actor).requires_grad_(False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_params = list(self.actor.parameters())
        self.actor_optimizer = torch.optim.Adam(self.actor_params, lr=cfg.lr, fused=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr,
                                                 fused=True)
        self.counters = {"critic_updates": torch.zeros((), dtype=torch.long)}

    def objects(self) -> dict[str, Any]:
        """Everything of the learner a checkpoint must hold."""
        return {"model": self.actor, "critic": self.critic, "target_actor": self.target_actor,
                "target_critic": self.target_critic, "optimizer": self.actor_optimizer,
                "critic_optimizer": self.critic_optimizer, "learner": self.counters}

    @torch.no_grad()
    def target(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """y of DDPG, with Q' of the target actor's action."""
        next_q = self.target_critic(batch.next_obs, self.target_actor.unit(batch.next_obs))[0]
        return ddpg_target(batch.rewards, batch.terminated, next_q, self.cfg.gamma)

    def critic_step(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        y = self.target(batch, generator)
        q = self.critic(batch.obs, batch.actions)
        # Each critic regresses on the same y; summing their MSEs trains them independently.
        loss = (q - y).square().mean(-1).sum()
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optimizer.step()
        return loss.detach()

    def actor_step(self, batch: Batch) -> torch.Tensor:
        loss = -self.critic(batch.obs, self.actor.unit(batch.obs), members=1).mean()
        # Gradients for phi only: the critic's weights need none here.
        grads = torch.autograd.grad(loss, self.actor_params)
        for p, g in zip(self.actor_params, grads, strict=True):
            p.grad = g
        self.actor_optimizer.step()
        polyak_update(self.target_critic, self.critic, self.cfg.tau)
        polyak_update(self.target_actor, self.actor, self.cfg.tau)
        return loss.detach()

    def train(self, batches: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One gradient step per minibatch of a (G, B) stack; the mean losses."""
        critic_losses, actor_losses = [], []
        count = self.counters["critic_updates"]
        for g in range(batches.rewards.shape[0]):
            batch = batches[g]
            critic_losses.append(self.critic_step(batch, generator))
            count += 1
            if policy_update_due(int(count), self.policy_delay):
                actor_losses.append(self.actor_step(batch))
        metrics = {"critic_loss": torch.stack(critic_losses).mean()}
        if actor_losses:
            metrics["actor_loss"] = torch.stack(actor_losses).mean()
        return metrics


def train_offpolicy(cfg: Any, run: Run | None, progress: bool | None,
                    learner: type[Learner]) -> Run:
    """The loop DDPG and TD3 share: act with noise, store, learn from replayed minibatches."""
    spaces = box_spaces(cfg)
    run, generator, interaction = prepare(cfg, run)
    agent_learner = learner(cfg, spaces)
    actor = agent_learner.actor
    buffer = ReplayBuffer(min(cfg.buffer_size, cfg.steps), spaces.obs_dim, spaces.act_dim)
    noise = make_noise(cfg, spaces.act_dim)
    act_shape = (cfg.num_envs, spaces.act_dim)

    def update(k: int) -> dict[str, Any]:
        for _ in range(cfg.train_freq):
            with torch.no_grad():
                if interaction.episodes.env_steps < cfg.learning_starts:
                    u = 2.0 * torch.rand(act_shape, generator=generator) - 1.0
                else:
                    u = (actor.unit(interaction.obs) + noise.sample(generator)).clamp(-1.0, 1.0)
                t = interaction.step(actor.to_env(u))
                buffer.add(t.obs, u, t.rewards, t.next_obs, t.terminated)
                noise.reset(t.dones)
        if interaction.episodes.env_steps < cfg.learning_starts:
            return {}
        batches = buffer.sample(cfg.batch_size, generator, cfg.gradient_steps)
        return agent_learner.train(batches, generator)

    objects = {**agent_learner.objects(), "noise": noise, "replay": buffer.state,
               "rng": generator}
    agent = Agent(interaction, update, objects, actor, cfg.num_envs * cfg.train_freq)
    return train_agent(cfg, run, agent, progress)


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    return train_offpolicy(cfg, run, progress, Learner)
