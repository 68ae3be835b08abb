"""What every deep RL agent shares: environments, normalisation, networks, the training loop,
evaluation and figures.

Environments are gymnasium vector environments (``SyncVectorEnv``) that reset an episode in the
same step it ends and hand its last observation over in ``info["final_obs"]``, so an agent can
tell a true terminal state (v = 0) from a time-limit cut (bootstrap v(s_final)).

Normalisation follows the usual recipe (Engstrom et al. 2020, "Implementation matters"):

    observation   o' = clip((o - mu_o) / sqrt(var_o + eps), -c, c), running mu_o, var_o
    reward        r' = clip(r / sqrt(var_G + eps), -c, c), where G_t = gamma G_{t-1} + r_t is a
                  running discounted return per environment (the reward is scaled, not centred)

Both keep their statistics in module buffers, so they travel in the checkpoint with the networks.

A run's ``step`` is one update of the agent (a rollout and its optimisation for on-policy
methods); ``metrics.csv`` also records ``env_steps`` and ``episode_return``, the mean
undiscounted return of the last ``RETURN_WINDOW`` finished training episodes, which is also what
``target_return`` stops on.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from mlatlas.core.config import (
    BaseConfig,
    ConfigError,
    closest,
    config_from_dict,
    require_at_least,
    require_unit,
)
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import seed_everything

RETURN_WINDOW = 10
LOG_2PI = math.log(2 * math.pi)


# Configs ---------------------------------------------------------------------------------------
@dataclass
class DeepRLConfig(BaseConfig):
    """Fields shared by the deep RL agents; ``steps`` counts environment steps."""

    env: str = "CartPole-v1"
    """A gymnasium environment id (classic control, MuJoCo with the extra, mlatlas/GridWorld-v0)."""
    steps: int = 100_000
    """Environment steps to train for (summed over the parallel environments)."""
    num_envs: int = 8
    """Parallel environments in the vector environment."""
    gamma: float = 0.99
    """Discount factor."""
    lr: float = 3e-4
    """Learning rate."""
    hidden: int = 64
    """Width of each hidden layer of the networks."""
    layers: int = 2
    """Hidden layers of the networks."""
    normalize_obs: bool = False
    """Normalise observations by running statistics (saved with the checkpoint)."""
    normalize_reward: bool = False
    """Scale rewards by the running std of the discounted return (saved with the checkpoint)."""
    target_return: float = math.inf
    """Stop once the mean return of the last 10 training episodes reaches this."""
    eval_episodes: int = 20
    """Episodes of the deterministic policy scored at the end of training."""
    log_every: int = 10
    """Write a row of metrics.csv every this many updates."""
    ckpt_every: int = 100
    """Write checkpoint.safetensors every this many updates (and always at the end)."""

    RESUMABLE: ClassVar[frozenset[str]] = BaseConfig.RESUMABLE | {"eval_episodes",
                                                                   "target_return"}
    # Tuned values per environment, applied by ``create`` under the caller's own choices.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def create(cls, **overrides: Any) -> DeepRLConfig:
        """The config for ``overrides`` with the env's tuned defaults (``PRESETS``) under them."""
        env = overrides.get("env", cls.env)
        return cls(**{**cls.PRESETS.get(env, {}), **overrides})

    def check_data(self) -> None:
        check_env_id(self.env)

    def __post_init__(self) -> None:
        require_at_least(self, 1, "steps", "num_envs", "hidden", "layers", "eval_episodes",
                         "log_every", "ckpt_every")
        require_unit(self, "gamma")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.device != "cpu":
            # Networks of a few thousand weights called once per environment step: transfers
            # to a GPU would cost more than the arithmetic they move.
            raise ConfigError(f"--device {self.device}: the deep RL agents run on the CPU only")

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return (self.hidden,) * self.layers


# Environments ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spaces:
    """What the networks need to know of an environment's spaces."""

    obs_dim: int
    discrete_obs: bool  # Discrete observations are fed one-hot
    discrete: bool      # Discrete actions (categorical policy) or Box (Gaussian policy)
    act_dim: int        # number of actions if discrete, else the action vector's length
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None


def check_env_id(env_id: str) -> None:
    import mlatlas.rl  # noqa: F401 (registers mlatlas/GridWorld-v0)

    if env_id not in gym.registry:
        raise ConfigError(f"unknown environment {env_id!r}{closest(env_id, gym.registry)}")
    spec = gym.registry[env_id]
    entry = spec.entry_point if isinstance(spec.entry_point, str) else ""
    if entry.startswith("gymnasium.envs.mujoco"):
        try:
            import mujoco  # noqa: F401
        except ImportError:
            raise ConfigError(f"{env_id} needs MuJoCo: pip install 'mlatlas[mujoco]'") from None


def make_envs(env_id: str, num_envs: int, seed: int, **kwargs: Any) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``env_id``, not yet reset (``reset(seed=s)`` seeds copy i with
    s + i)."""
    check_env_id(env_id)
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
                        **kwargs)
    return envs


def env_spaces(env_id: str) -> Spaces:
    """The spaces of ``env_id``, read from one throwaway copy."""
    envs = make_envs(env_id, 1, 0)
    try:
        return spaces_of(envs)
    finally:
        envs.close()


def spaces_of(envs: gym.vector.VectorEnv) -> Spaces:
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    if isinstance(obs_space, gym.spaces.Discrete):
        obs_dim, discrete_obs = int(obs_space.n), True
    elif isinstance(obs_space, gym.spaces.Box):
        obs_dim, discrete_obs = int(np.prod(obs_space.shape)), False
    else:
        raise ConfigError(f"observation space {obs_space} is not supported (Box or Discrete)")
    if isinstance(act_space, gym.spaces.Discrete):
        return Spaces(obs_dim, discrete_obs, True, int(act_space.n))
    if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        return Spaces(obs_dim, discrete_obs, False, act_space.shape[0],
                      torch.as_tensor(act_space.low, dtype=torch.float32),
                      torch.as_tensor(act_space.high, dtype=torch.float32))
    raise ConfigError(f"action space {act_space} is not supported (Discrete or 1-d Box)")


def obs_tensor(obs: np.ndarray, spaces: Spaces) -> torch.Tensor:
    """A batch of raw observations as a float tensor (one-hot for Discrete spaces)."""
    if spaces.discrete_obs:
        return nn.functional.one_hot(torch.as_tensor(obs, dtype=torch.long),
                                     spaces.obs_dim).float()
    return torch.as_tensor(obs, dtype=torch.float32).reshape(len(obs), -1)


def env_actions(actions: torch.Tensor, spaces: Spaces) -> np.ndarray:
    """Actions as the environment takes them; Gaussian actions are clipped to the box."""
    if spaces.discrete:
        return actions.numpy()
    return torch.maximum(torch.minimum(actions, spaces.high), spaces.low).numpy()


# Normalisation ---------------------------------------------------------------------------------
class RunningMeanStd(nn.Module):
    """Mean and variance of everything seen so far, merged batch by batch (Chan et al. 1979)."""

    def __init__(self, shape: tuple[int, ...] = ()):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        # A tiny prior count keeps the first update from dividing by zero.
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        n = x.shape[0]
        batch_mean, batch_var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var.copy_((self.var * self.count + batch_var * n
                        + delta.square() * self.count * n / total) / total)
        self.count.copy_(total)


class ObsNormalizer(RunningMeanStd):
    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8):
        super().__init__((dim,))
        self.clip, self.eps = clip, eps

    def forward(self, obs: torch.Tensor, update: bool = False) -> torch.Tensor:
        if update:
            self.update(obs)
        z = (obs - self.mean.float()) / torch.sqrt(self.var.float() + self.eps)
        return z.clamp(-self.clip, self.clip)


class RewardScaler(RunningMeanStd):
    """r / std(G) with G the running discounted return of each environment."""

    def __init__(self, num_envs: int, gamma: float, clip: float = 10.0, eps: float = 1e-8):
        super().__init__(())
        self.gamma, self.clip, self.eps = gamma, clip, eps
        self.register_buffer("returns", torch.zeros(num_envs, dtype=torch.float64))

    @torch.no_grad()
    def forward(self, rewards: torch.Tensor, dones: torch.Tensor) -> torch.Tensor:
        self.returns.mul_(self.gamma).add_(rewards)
        self.update(self.returns)
        self.returns.masked_fill_(dones, 0.0)
        return (rewards / math.sqrt(self.var.item() + self.eps)).clamp(-self.clip, self.clip)


# Networks --------------------------------------------------------------------------------------
def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: type[nn.Module] = nn.Tanh,
        out_gain: float = 1.0, orthogonal: bool = True) -> nn.Sequential:
    """A multilayer perceptron; orthogonal init with gain sqrt(2) inside and ``out_gain`` on the
    last layer (a small policy head starts near uniform, Andrychowicz et al. 2021)."""
    sizes = (in_dim, *hidden, out_dim)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        linear = nn.Linear(a, b)
        if orthogonal:
            nn.init.orthogonal_(linear.weight, out_gain if i == len(sizes) - 2 else math.sqrt(2))
            nn.init.zeros_(linear.bias)
        layers += [linear, activation()]
    return nn.Sequential(*layers[:-1])


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

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """An action drawn from pi, or the most likely one when ``generator`` is None."""
        dist = self.distribution(obs)
        if generator is not None:
            return self.sample(dist, generator)
        return dist.argmax(-1) if self.discrete else dist.chunk(2, -1)[0]


def value_net(spaces: Spaces, hidden: tuple[int, ...],
              activation: type[nn.Module] = nn.Tanh) -> nn.Module:
    return _Squeeze(mlp(spaces.obs_dim, hidden, 1, activation, out_gain=1.0))


class _Squeeze(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


# Episode bookkeeping ---------------------------------------------------------------------------
class Episodes:
    """Undiscounted returns of finished training episodes and the count of environment steps."""

    def __init__(self, num_envs: int):
        self.running = np.zeros(num_envs)
        self.recent: list[float] = []
        self.env_steps = 0

    def record(self, rewards: np.ndarray, dones: np.ndarray) -> None:
        self.running += rewards
        self.env_steps += len(rewards)
        if dones.any():
            self.recent = (self.recent + self.running[dones].tolist())[-RETURN_WINDOW:]
            self.running[dones] = 0.0

    def metrics(self) -> dict[str, float]:
        out = {"env_steps": float(self.env_steps)}
        if self.recent:
            out["episode_return"] = float(np.mean(self.recent))
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {"env_steps": torch.tensor(self.env_steps),
                "recent": torch.tensor(self.recent, dtype=torch.float64)}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.env_steps = int(state["env_steps"])
        self.recent = state["recent"].tolist()


class Interaction:
    """Steps a vector environment with an agent's actions and keeps everything around it
    consistent: the current (normalised) observation, rewards (scaled), episode statistics, and
    the last observation of each episode that ended, normalised like the others."""

    def __init__(self, cfg: DeepRLConfig):
        self.envs = make_envs(cfg.env, cfg.num_envs, cfg.seed)
        self.spaces = spaces = spaces_of(self.envs)
        self.obs_norm = ObsNormalizer(spaces.obs_dim) if cfg.normalize_obs else None
        self.reward_scaler = (RewardScaler(cfg.num_envs, cfg.gamma)
                              if cfg.normalize_reward else None)
        self.episodes = Episodes(cfg.num_envs)
        self.obs = self._normalize(obs_tensor(self.envs.reset(seed=cfg.seed)[0], spaces),
                                   update=True)

    def _normalize(self, raw: torch.Tensor, update: bool) -> torch.Tensor:
        return raw if self.obs_norm is None else self.obs_norm(raw, update=update)

    def reseed(self, seed: int) -> None:
        """Start fresh episodes (after a resume: gymnasium cannot restore an env's state)."""
        self.obs = self._normalize(obs_tensor(self.envs.reset(seed=seed)[0], self.spaces),
                                   update=False)
        if self.reward_scaler is not None:
            self.reward_scaler.returns.zero_()

    def step(self, actions: torch.Tensor) -> Transition:
        obs, rewards, terminated, truncated, info = self.envs.step(
            env_actions(actions, self.spaces))
        dones = terminated | truncated
        self.episodes.record(rewards, dones)
        # Statistics are updated with the new observations only.
        normalized = self._normalize(obs_tensor(obs, self.spaces), update=True)
        # next_obs is where each transition really led: the final observation at an episode's
        # end, the new obs otherwise.
        next_obs = normalized
        if dones.any():
            ended = np.flatnonzero(dones)
            next_obs = normalized.clone()
            next_obs[ended] = self._normalize(
                obs_tensor(np.stack(info["final_obs"][ended]), self.spaces), update=False)
        dones_t = torch.as_tensor(dones)
        r = torch.as_tensor(rewards, dtype=torch.float32)
        if self.reward_scaler is not None:
            r = self.reward_scaler(r.double(), dones_t).float()
        transition = Transition(self.obs, actions, r, next_obs,
                                torch.as_tensor(terminated), dones_t)
        self.obs = normalized
        return transition

    def normalizers(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        if self.obs_norm is not None:
            out["obs_norm"] = self.obs_norm
        if self.reward_scaler is not None:
            out["reward_scaler"] = self.reward_scaler
        return out

    def close(self) -> None:
        self.envs.close()


@dataclass
class Transition:
    obs: torch.Tensor         # (B, obs_dim) normalised s_t
    actions: torch.Tensor     # (B,) or (B, act_dim)
    rewards: torch.Tensor     # (B,) r_{t+1}, scaled when reward normalisation is on
    next_obs: torch.Tensor    # (B, obs_dim) normalised s_{t+1} (the final obs at an episode end)
    terminated: torch.Tensor  # (B,) bool: s_{t+1} is terminal, its value is 0
    dones: torch.Tensor       # (B,) bool: the episode ended (terminated or truncated)


# Training loop ---------------------------------------------------------------------------------
@dataclass
class Agent:
    """What a method hands to :func:`train_agent`.

    ``update(step)`` interacts with the environment and optimises once, returning its metrics;
    ``objects`` are checkpointed (networks, optimizers, generators; the normalisers are added);
    ``policy`` maps normalised observations to deterministic actions for evaluation."""

    interaction: Interaction
    update: Callable[[int], Mapping[str, Any]]
    objects: dict[str, Any]
    policy: Callable[[torch.Tensor], torch.Tensor]
    env_steps_per_update: int


def train_agent(cfg: DeepRLConfig, run: Run, agent: Agent, progress: bool | None) -> Run:
    """Run ``agent.update`` for ``cfg.steps`` environment steps with checkpoints, early stop at
    ``cfg.target_return``, then score the deterministic policy and draw the return curves."""
    interaction = agent.interaction
    counters: dict[str, torch.Tensor] = interaction.episodes.state()
    objects = {**agent.objects, **interaction.normalizers(), "episodes": counters}
    total = max(1, cfg.steps // agent.env_steps_per_update)
    solved: dict[str, float] = {}
    first = [True]

    def step_fn(step: int) -> Mapping[str, Any]:
        # On the first step of a resumed run fit has restored the counters from the checkpoint.
        if first and first.pop() and step > 1:
            interaction.episodes.load(counters)
            interaction.reseed(cfg.seed + 7919 * step)
        metrics = {**agent.update(step), **interaction.episodes.metrics()}
        counters.update(interaction.episodes.state())
        # Like the peers' benchmarks, a target counts only over a full window of episodes.
        full = len(interaction.episodes.recent) == RETURN_WINDOW
        if full and metrics.get("episode_return", -math.inf) >= cfg.target_return and not solved:
            solved["env_steps"] = metrics["env_steps"]
        return metrics

    def until(metrics: Mapping[str, float]) -> bool:
        return bool(solved)

    try:
        fit(run, step_fn, total_steps=total, objects=objects, log_every=cfg.log_every,
            ckpt_every=cfg.ckpt_every, progress=progress, until=until,
            latest=("env_steps", "episode_return"))
    finally:
        interaction.close()
    evaluation_start = time.perf_counter()
    rows = run.metrics
    summary: dict[str, Any] = {"env_steps": interaction.episodes.env_steps,
                               "wall_s": rows[-1]["wall_s"] if rows else 0.0}
    if solved:
        summary.update(solved_env_steps=int(solved["env_steps"]), solved_wall_s=summary["wall_s"])
    normalizer = interaction.obs_norm
    scores = evaluate_policy(cfg.env, agent.policy, interaction.spaces, cfg.eval_episodes,
                             seed=cfg.seed + 10_000, obs_norm=normalizer)
    summary.update(eval_return_mean=scores["return_mean"], eval_return_std=scores["return_std"])
    run.write_summary(summary)
    from mlatlas.rl.deep.plots import return_curves

    if rows:
        run.save_figure(return_curves(rows, run.method, cfg.env, cfg.target_return), "returns.png")
    # Benchmarks subtract this to time training alone.
    run.write_summary({"final_eval_s": round(time.perf_counter() - evaluation_start, 3)})
    return run


def prepare(cfg: DeepRLConfig, run: Run | None, method: str) -> tuple[Run, torch.Generator,
                                                                      Interaction]:
    """The run folder, the run's generator and its environments, all from ``cfg.seed``."""
    check_env_id(cfg.env)
    run = run or Run.create(method, cfg)
    generator = seed_everything(cfg.seed)
    return run, generator, Interaction(cfg)


# Evaluation ------------------------------------------------------------------------------------
def policy_actions(policy: Callable[[torch.Tensor], torch.Tensor], obs: np.ndarray,
                   spaces: Spaces, obs_norm: ObsNormalizer | None) -> np.ndarray:
    """The environment actions of ``policy`` for a batch of raw observations."""
    x = obs_tensor(obs, spaces)
    return env_actions(policy(x if obs_norm is None else obs_norm(x)), spaces)


@torch.no_grad()
def evaluate_policy(env_id: str, policy: Callable[[torch.Tensor], torch.Tensor], spaces: Spaces,
                    episodes: int, seed: int, obs_norm: ObsNormalizer | None = None
                    ) -> dict[str, float]:
    """Mean and std of the undiscounted return of ``episodes`` episodes, played in parallel, one
    per environment, with the deterministic ``policy``."""
    envs = make_envs(env_id, episodes, seed)
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(episodes)
    finished = np.zeros(episodes, dtype=bool)
    while not finished.all():
        obs, rewards, terminated, truncated, _ = envs.step(
            policy_actions(policy, obs, spaces, obs_norm))
        returns += np.where(finished, 0.0, rewards)
        finished |= terminated | truncated
    envs.close()
    return {"return_mean": float(returns.mean()), "return_std": float(returns.std()),
            "episodes": episodes}


@dataclass
class EvalOptions:
    """Options of ``mlatlas eval`` for deep RL runs."""

    episodes: int = 20
    """Episodes of the deterministic policy to score."""
    video: bool = False
    """Also record one episode as an animation in the run folder."""
    video_format: str = "gif"
    """'gif' (Pillow) or 'mp4' (needs imageio with imageio-ffmpeg)."""

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ConfigError(f"--episodes must be at least 1, got {self.episodes}")
        if self.video_format not in ("gif", "mp4"):
            raise ConfigError(f"--video-format must be gif or mp4, got {self.video_format!r}")


def load_policy(run: Run) -> tuple[DeepRLConfig, Spaces, Policy | nn.Module,
                                   ObsNormalizer | None]:
    """A finished run's config, spaces, actor and observation normaliser."""
    from mlatlas.registry import get_method

    method = get_method(run.method)
    cfg = config_from_dict(method.config_cls, run.config)
    spaces = env_spaces(cfg.env)
    actor = method.module.make_actor(cfg, spaces)
    run.load_weights(actor, "actor")
    actor.eval()
    obs_norm = None
    if cfg.normalize_obs:
        obs_norm = ObsNormalizer(spaces.obs_dim)
        run.load_weights(obs_norm, "obs_norm")
    return cfg, spaces, actor, obs_norm


def deterministic(actor: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The greedy action of a stochastic policy, or the output of a deterministic actor."""
    if isinstance(actor, Policy):
        return actor.act
    return actor


def evaluate(run: Run, n: int | None, seed: int, progress: bool | None = None,
             options: EvalOptions | None = None) -> dict[str, Any]:
    """Score a run's deterministic policy over ``options.episodes`` episodes; with
    ``options.video`` also write ``episode.gif`` (or .mp4)."""
    options = options or EvalOptions()
    cfg, spaces, actor, obs_norm = load_policy(run)
    policy = deterministic(actor)
    scores = evaluate_policy(cfg.env, policy, spaces, options.episodes, seed, obs_norm)
    if options.video:
        path = run.path(f"episode-seed{seed}.{options.video_format}")
        scores["video"] = str(record_video(cfg.env, policy, spaces, path, seed, obs_norm))
    return scores


@torch.no_grad()
def record_video(env_id: str, policy: Callable[[torch.Tensor], torch.Tensor], spaces: Spaces,
                 path: Path, seed: int, obs_norm: ObsNormalizer | None = None,
                 max_frames: int = 1000) -> Path:
    """Play one episode with rgb_array rendering and write it as a GIF or MP4."""
    # pygame (classic control's renderer) needs no display for rgb_array frames; without this
    # SDL prints an error about a missing display on headless machines.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    env = gym.make(env_id, render_mode="rgb_array")
    obs, _ = env.reset(seed=seed)
    try:
        frames = [env.render()]
    except gym.error.DependencyNotInstalled as err:
        raise ConfigError(f"{env_id} cannot render here: {err}") from None
    done = False
    while not done and len(frames) < max_frames:
        action = policy_actions(policy, np.asarray(obs)[None], spaces, obs_norm)[0]
        obs, _, terminated, truncated, _ = env.step(action)
        frames.append(env.render())
        done = terminated or truncated
    fps = env.metadata.get("render_fps", 30)
    env.close()
    from mlatlas.core.io import atomic_path

    with atomic_path(path) as tmp:
        if path.suffix == ".mp4":
            try:
                import imageio.v2 as imageio
            except ImportError:
                raise ConfigError("--video-format mp4 needs imageio and imageio-ffmpeg "
                                  "(pip install imageio imageio-ffmpeg); gif needs nothing"
                                  ) from None
            imageio.mimwrite(tmp, frames, fps=fps, format="FFMPEG")
        else:
            from PIL import Image

            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=int(1000 / fps), loop=0)
    return path


def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """theta' <- tau theta + (1 - tau) theta', parameter by parameter (buffers copied)."""
    with torch.no_grad():
        target_params = list(target.parameters())
        torch._foreach_lerp_(target_params, list(source.parameters()), tau)
        for t, s in zip(target.buffers(), source.buffers(), strict=True):
            t.copy_(s)


def linear_schedule(start: float, progress: float) -> float:
    """``start`` decayed linearly to 0 as training ``progress`` goes from 0 to 1."""
    return start * max(0.0, 1.0 - progress)

