"""Two tiny environments with a known optimum, for checking that an agent learns at all.

``mlatlas/Identity-v0``: the observation is a one-hot state k among ``n``; action a earns
r = 1 if a == k else 0, and the next state is drawn uniformly. The best return over an episode
of 10 steps is 10; a uniform policy earns 10 / n.

``mlatlas/IdentityContinuous-v0``: the observation is x ~ U[-1, 1]^d; action a in [-1, 1]^d
earns r = -||a - x||^2 / d, 0 at best; a policy that ignores x and plays a = 0 earns -1/3 per
step on average (E[x_i^2] = 1/3).

Neither has terminal states: both end each episode by truncation after 10 steps
(``max_episode_steps``), so they also exercise the time-limit bootstrap of advantages.
"""

from __future__ import annotations

import gymnasium
import numpy as np

IDENTITY_ID = "mlatlas/Identity-v0"
IDENTITY_CONTINUOUS_ID = "mlatlas/IdentityContinuous-v0"


class IdentityEnv(gymnasium.Env):
    def __init__(self, n: int = 4):
        self.n = n
        self.observation_space = gymnasium.spaces.Box(0.0, 1.0, (n,), dtype=np.float32)
        self.action_space = gymnasium.spaces.Discrete(n)
        self.state = 0

    def _obs(self) -> np.ndarray:
        return np.eye(self.n, dtype=np.float32)[self.state]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = int(self.np_random.integers(self.n))
        return self._obs(), {}

    def step(self, action):
        reward = float(int(action) == self.state)
        self.state = int(self.np_random.integers(self.n))
        return self._obs(), reward, False, False, {}


class IdentityContinuousEnv(gymnasium.Env):
    def __init__(self, dim: int = 2):
        self.dim = dim
        self.observation_space = gymnasium.spaces.Box(-1.0, 1.0, (dim,), dtype=np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (dim,), dtype=np.float32)
        self.x = np.zeros(dim, dtype=np.float32)

    def _draw(self) -> np.ndarray:
        self.x = self.np_random.uniform(-1.0, 1.0, self.dim).astype(np.float32)
        return self.x.copy()

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._draw(), {}

    def step(self, action):
        reward = -float(np.square(np.asarray(action) - self.x).mean())
        return self._draw(), reward, False, False, {}


def register() -> None:
    """Register both environments with gymnasium (idempotent); episodes last 10 steps."""
    for env_id, cls in ((IDENTITY_ID, "IdentityEnv"),
                        (IDENTITY_CONTINUOUS_ID, "IdentityContinuousEnv")):
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point=f"mlatlas.rl.deep.toy_envs:{cls}",
                               max_episode_steps=10)
