"""DeepRLConfig: the fields every deep RL agent has, and the checks they share.

A method's ``Config`` extends this class directly (never another method's config) and declares
its own fields: the on-policy agents their rollout length, the off-policy ones their replay
buffer. ``steps``, ``log_every`` and ``ckpt_every`` all count environment steps, summed over the
parallel environments, as Stable-Baselines3's and CleanRL's ``total_timesteps`` do; a run ends,
logs and checkpoints only between whole updates, so the three are rounded to whole updates of
the agent (:func:`mlatlas.rl.deep.loop.whole_updates`). Checks that several methods' configs
share are functions here (:func:`check_sde`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from mlatlas.core.config import BaseConfig, ConfigError, require_at_least, require_unit
from mlatlas.rl.deep.envs import check_env_id


@dataclass
class DeepRLConfig(BaseConfig):
    """Fields shared by the deep RL agents; ``steps`` counts environment steps."""

    env: str = "CartPole-v1"
    """A gymnasium environment id (classic control, MuJoCo with the extra, mlatlas/GridWorld-v0)."""
    steps: int = 100_000
    """Environment steps to train for (summed over the parallel environments; rounded down to
    whole updates, at least one)."""
    num_envs: int = 8
    """Parallel environments in the vector environment."""
    vector: Literal["sync", "async"] = "sync"
    """Step the environments in this process (sync) or each in a subprocess (async: for
    environments whose step is expensive; the same transitions). Evaluation steps in-process."""
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
    log_every: int = 5_000
    """Write a row of metrics.csv every this many environment steps (rounded up to whole
    updates)."""
    ckpt_every: int = 50_000
    """Write checkpoint.safetensors every this many environment steps (rounded up to whole
    updates; and always at the end)."""

    RESUMABLE: ClassVar[frozenset[str]] = BaseConfig.RESUMABLE | {"eval_episodes",
                                                                   "target_return", "vector"}
    INFINITE: ClassVar[frozenset[str]] = frozenset({"target_return"})  # inf: never stop early
    SIGNED: ClassVar[frozenset[str]] = frozenset({"sde_sample_freq"})  # -1: once per rollout
    # Tuned values per environment, applied by ``create`` under the caller's own choices.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def create(cls, **overrides: Any) -> DeepRLConfig:
        """The config for ``overrides`` with the env's tuned defaults (``PRESETS``) under them."""
        env = overrides.get("env", cls.env)
        return cls(**{**cls.PRESETS.get(env, {}), **overrides})

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "num_envs", "hidden", "layers", "eval_episodes")
        require_unit(self, "gamma")
        if self.device != "cpu":
            # Networks of a few thousand weights called once per environment step: transfers
            # to a GPU would cost more than the arithmetic they move.
            raise ConfigError(f"--device {self.device}: the deep RL agents run on the CPU only")

    def check_data(self) -> None:
        check_env_id(self.env)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return (self.hidden,) * self.layers


def check_sde(cfg: DeepRLConfig) -> None:
    """The gSDE fields of an actor-critic config (PPO, A2C, TRPO): the exploration matrix is
    redrawn every ``sde_sample_freq`` steps, or with -1 once per rollout."""
    if cfg.sde_sample_freq == 0 or cfg.sde_sample_freq < -1:
        raise ConfigError(f"--sde-sample-freq must be -1 (once per rollout) or positive, "
                          f"got {cfg.sde_sample_freq}")
