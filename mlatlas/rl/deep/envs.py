"""Environments: gymnasium vector environments and the loop around one step of them.

The vector environments (``SyncVectorEnv``, or ``AsyncVectorEnv`` with a subprocess per copy)
reset an episode in the same step it ends and hand its last observation over in
``info["final_obs"]``, so an agent can tell a true terminal state (v = 0) from a time-limit cut
(bootstrap v(s_final)). :class:`Interaction` steps them with an agent's actions and keeps what
surrounds a step consistent: the current observation (normalised,
:mod:`~mlatlas.rl.deep.normalize`), the rewards (scaled), the counts of :class:`Episodes`, and
the final observation of each episode that ended, normalised like the others.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector.async_vector_env import _async_worker
from torch import nn

from mlatlas.core.config import ConfigError, closest
from mlatlas.rl.deep.normalize import ObsNormalizer, RewardScaler

RETURN_WINDOW = 10
"""Finished training episodes whose mean return is ``episode_return`` (and the target's)."""


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
    """ConfigError for an id gymnasium does not know (with the closest ones) or whose extra is
    missing (MuJoCo)."""
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


def make_envs(env_id: str, num_envs: int, seed: int, vector: Literal["sync", "async"] = "sync",
              **kwargs: Any) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``env_id``, not yet reset (``reset(seed=s)`` seeds copy i with
    s + i), stepped in this process (``vector="sync"``) or each in a subprocess of its own
    (``"async"``, gymnasium's AsyncVectorEnv: the same transitions, computed in parallel)."""
    check_env_id(env_id)
    # gym.make of the spec itself, so a worker needs no registry: a partial of module-level
    # functions, which plain pickle carries under every start method (fork, spawn, forkserver).
    factory = functools.partial(gym.make, gym.spec(env_id), **kwargs)
    autoreset = gym.vector.AutoresetMode.SAME_STEP
    if vector == "async":
        return gym.vector.AsyncVectorEnv([factory] * num_envs, autoreset_mode=autoreset,
                                         worker=worker_ignoring_sigint)
    return gym.vector.SyncVectorEnv([factory] * num_envs, autoreset_mode=autoreset)


def worker_ignoring_sigint(*args: Any) -> None:
    """gymnasium's worker loop, deaf to Ctrl-C. A terminal sends it to the workers too; the
    training process alone must act on it (a checkpoint at the next whole update, as with sync
    environments) and then close them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _async_worker(*args)


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


@dataclass
class Transition:
    obs: torch.Tensor         # (B, obs_dim) normalised s_t
    actions: torch.Tensor     # (B,) or (B, act_dim)
    rewards: torch.Tensor     # (B,) r_{t+1}, scaled when reward normalisation is on
    next_obs: torch.Tensor    # (B, obs_dim) normalised s_{t+1} (the final obs at an episode end)
    terminated: torch.Tensor  # (B,) bool: s_{t+1} is terminal, its value is 0
    dones: torch.Tensor       # (B,) bool: the episode ended (terminated or truncated)


class Interaction:
    """Steps a vector environment with an agent's actions and keeps everything around it
    consistent: the current (normalised) observation, rewards (scaled), episode statistics, and
    the last observation of each episode that ended, normalised like the others.

    ``cfg`` is a :class:`~mlatlas.rl.deep.config.DeepRLConfig` (env, num_envs, seed, gamma and
    the two normalisation flags are read)."""

    def __init__(self, cfg: Any):
        self.envs = make_envs(cfg.env, cfg.num_envs, cfg.seed, cfg.vector)
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

    def close(self, terminate: bool = False) -> None:
        """Close the environments; ``terminate`` ends async workers at once instead of waiting
        on them (after an error, when a step may have been left half received)."""
        self.envs.close(terminate=terminate)
