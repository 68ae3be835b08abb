"""Parity with Stable-Baselines3 (a dev extra): GAE, running statistics, Polyak averaging and
the gSDE distribution."""

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


def test_gsde_distribution_matches_sb3_state_dependent_noise():
    """On the same weights and exploration matrices: the actions, log-probabilities, entropies
    and deterministic actions of our gSDE policy and SB3's ActorCriticPolicy(use_sde=True)."""
    import gymnasium as gym
    from stable_baselines3.common.policies import ActorCriticPolicy

    from mlatlas.rl.deep.envs import Spaces
    from mlatlas.rl.deep.gsde import StateDependentPolicy

    torch.manual_seed(0)
    obs_dim, act_dim, hidden, log_std_init = 3, 2, (64, 64), -0.5
    ours = StateDependentPolicy(Spaces(obs_dim, False, False, act_dim), hidden, log_std_init)
    theirs = ActorCriticPolicy(gym.spaces.Box(-10, 10, (obs_dim,)),
                               gym.spaces.Box(-2, 2, (act_dim,)), lambda _: 3e-4,
                               net_arch=dict(pi=list(hidden), vf=list(hidden)), use_sde=True,
                               log_std_init=log_std_init)
    with torch.no_grad():
        # Our net is [Linear, Tanh, Linear, Tanh, Linear]: SB3's policy_net and action_net.
        for i in (0, 2):
            theirs.mlp_extractor.policy_net[i].load_state_dict(ours.net[i].state_dict())
        theirs.action_net.load_state_dict(ours.net[4].state_dict())
        ours.log_std.add_(0.3 * torch.randn_like(ours.log_std))  # distinct entries
        theirs.log_std.copy_(ours.log_std)
    obs = torch.randn(4, obs_dim) * 3  # four environments, each with its own theta_eps
    with torch.no_grad():
        dist, actions = ours.explore(obs, torch.Generator().manual_seed(0), 0)
        theirs.action_dist.exploration_matrices = ours.theta_eps.clone()
        sb3_dist = theirs.get_distribution(obs)
        for a, b in ((actions, sb3_dist.sample()),
                     (ours.log_prob(dist, actions), sb3_dist.log_prob(actions)),
                     (ours.entropy(dist), sb3_dist.entropy()),
                     (ours.act(obs), theirs._predict(obs, deterministic=True))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
