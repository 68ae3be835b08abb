"""Parity with Stable-Baselines3 (a dev extra): GAE, running statistics and Polyak averaging."""

import numpy as np
import pytest
import torch

from mlatlas.core.optim import polyak_update
from mlatlas.core.stats import RunningMeanStd
from mlatlas.rl.returns import gae

sb3 = pytest.importorskip("stable_baselines3")


def test_gae_matches_sb3_rollout_buffer_with_time_limit_bootstrap():
    import gymnasium as gym
    from stable_baselines3.common.buffers import RolloutBuffer

    rng = np.random.default_rng(0)
    T, B, gamma, lam = 16, 4, 0.97, 0.9
    rewards = rng.normal(size=(T, B)).astype(np.float32)
    values = rng.normal(size=(T, B)).astype(np.float32)
    final_values = rng.normal(size=(T, B)).astype(np.float32)  # v(final obs) at episode ends
    last_values = rng.normal(size=B).astype(np.float32)
    dones = rng.random((T, B)) < 0.25
    terminated = dones & (rng.random((T, B)) < 0.5)
    truncated = dones & ~terminated
    buffer = RolloutBuffer(T, gym.spaces.Box(-1, 1, (1,)), gym.spaces.Discrete(2), "cpu",
                           gae_lambda=lam, gamma=gamma, n_envs=B)
    # SB3 folds the time-limit bootstrap into the reward (r + gamma v(s_final)) and then cuts
    # the episode as if it had terminated.
    sb3_rewards = rewards + gamma * final_values * truncated
    episode_starts = np.vstack([np.zeros((1, B), bool), dones[:-1]])
    for t in range(T):
        buffer.add(np.zeros((B, 1), np.float32), np.zeros((B, 1)), sb3_rewards[t],
                   episode_starts[t], torch.as_tensor(values[t]), torch.zeros(B))
    buffer.compute_returns_and_advantage(torch.as_tensor(last_values), dones[-1])

    next_values = np.vstack([values[1:], last_values[None]])
    next_values = np.where(dones, final_values, next_values)
    ours = gae(*(torch.as_tensor(x) for x in (rewards, values, next_values, terminated, dones)),
               gamma, lam)
    np.testing.assert_allclose(ours.numpy(), buffer.advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose((ours + torch.as_tensor(values)).numpy(), buffer.returns,
                               rtol=1e-5, atol=1e-5)


def test_running_mean_std_matches_sb3():
    from stable_baselines3.common.running_mean_std import RunningMeanStd as SB3RunningMeanStd

    rng = np.random.default_rng(1)
    theirs, ours = SB3RunningMeanStd(shape=(3,)), RunningMeanStd((3,))
    for n in (1, 7, 30, 2):
        x = rng.normal(2.0, 3.0, size=(n, 3))
        theirs.update(x)
        ours.update(torch.as_tensor(x))
    np.testing.assert_allclose(ours.mean.numpy(), theirs.mean, rtol=1e-12)
    np.testing.assert_allclose(ours.var.numpy(), theirs.var, rtol=1e-12)
    assert ours.count.item() == pytest.approx(theirs.count)


def test_polyak_update_matches_sb3():
    from stable_baselines3.common.utils import polyak_update as sb3_polyak_update

    torch.manual_seed(0)
    source, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    theirs = torch.nn.Linear(4, 3)
    theirs.load_state_dict(target.state_dict())
    polyak_update(target, source, 0.05)
    sb3_polyak_update(source.parameters(), theirs.parameters(), 0.05)
    for a, b in zip(target.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b)
