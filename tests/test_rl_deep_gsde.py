"""gSDE: the state-dependent Gaussian's closed forms, the exploration matrix and its redraws, the
configs that use it, and PPO, A2C and TRPO learning with it (A2C, TRPO and PPO's Pendulum preset
slow)."""

import math

import pytest
import torch
from torch import nn

from mlatlas.core.config import ConfigError
from mlatlas.core.io import load_tensors
from mlatlas.core.run import CHECKPOINT, Run
from mlatlas.rl.deep import a2c, ppo, trpo
from mlatlas.rl.deep.envs import Spaces
from mlatlas.rl.deep.evaluation import evaluate
from mlatlas.rl.deep.gsde import (
    EPSILON,
    StateDependentPolicy,
    exploration_matrix,
    exploration_noise,
    resample_due,
)

F, D = 5, 2  # features (the last hidden layer) and action dimensions


def tiny_policy(sample_freq: int = -1, seed: int = 0) -> StateDependentPolicy:
    torch.manual_seed(seed)
    policy = StateDependentPolicy(Spaces(3, False, False, D), (7, F), log_std_init=-0.5,
                                  sample_freq=sample_freq).double()
    with torch.no_grad():  # a matrix log sigma with distinct entries, a head far from zero
        policy.log_std.copy_(torch.randn(F, D, dtype=torch.float64) * 0.5 - 0.5)
    nn.init.orthogonal_(policy.net[-1].weight, 1.0)
    return policy


def hand_variance(z: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """sigma_hat_k^2 = sum_j z_j^2 sigma_jk^2 + epsilon, term by term."""
    n, d = z.shape[0], log_std.shape[1]
    out = torch.full((n, d), EPSILON, dtype=torch.float64)
    for i in range(n):
        for k in range(d):
            for j in range(log_std.shape[0]):
                out[i, k] += z[i, j] ** 2 * math.exp(2 * log_std[j, k])
    return out


def test_log_prob_is_the_diagonal_gaussian_of_variance_z2_sigma2():
    policy = tiny_policy()
    obs = torch.randn(6, 3, dtype=torch.float64)
    actions = torch.randn(6, D, dtype=torch.float64)
    with torch.no_grad():
        z = policy.features(obs)
        mu = policy.net[-1](z)
        var = hand_variance(z, policy.log_std)
        expected = (-0.5 * (actions - mu) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(-1)
        torch.testing.assert_close(policy.log_prob(policy.distribution(obs), actions), expected)
        # The entropy's closed form: sum_k 1/2 log(2 pi e sigma_hat_k^2).
        entropy = 0.5 * torch.log(2 * math.pi * math.e * var).sum(-1)
        torch.testing.assert_close(policy.entropy(policy.distribution(obs)), entropy)


def test_entropy_is_minus_the_mean_log_prob_of_the_policys_own_actions():
    policy = tiny_policy()
    obs = torch.randn(1, 3, dtype=torch.float64).expand(20_000, 3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Every row explores with its own theta_eps: 20,000 draws of the noise at one state.
        dist, actions = policy.explore(obs, generator, 0)
        estimate = -policy.log_prob(dist, actions).mean()
    assert estimate.item() == pytest.approx(policy.entropy(dist)[0].item(), abs=0.03)


def test_the_noise_over_draws_of_theta_eps_has_the_policys_variance():
    policy = tiny_policy()
    z = policy.features(torch.randn(1, 3, dtype=torch.float64)).detach()
    theta_eps = exploration_matrix(policy.log_std.detach(), 40_000,
                                   torch.Generator().manual_seed(1))
    noise = exploration_noise(z.expand(40_000, F), theta_eps)
    var = hand_variance(z, policy.log_std.detach())[0]
    torch.testing.assert_close(noise.mean(0), torch.zeros(D, dtype=torch.float64),
                               atol=4 * (var.max().sqrt() / 200).item(), rtol=0)
    torch.testing.assert_close(noise.var(0), var, rtol=0.03, atol=0)
    # The components are independent: the off-diagonal covariance vanishes.
    assert torch.corrcoef(noise.T)[0, 1].abs() < 0.02


def test_the_noise_is_z_theta_eps_for_each_environment():
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(3, F, generator=generator, dtype=torch.float64)
    theta_eps = torch.randn(3, F, D, generator=generator, dtype=torch.float64)
    expected = torch.stack([z[b] @ theta_eps[b] for b in range(3)])
    torch.testing.assert_close(exploration_noise(z, theta_eps), expected)


def rollout_noise(policy: StateDependentPolicy, obs: torch.Tensor, steps: range
                  ) -> list[torch.Tensor]:
    """a_t - mu(s) at the same states s for the steps t of a rollout."""
    generator = torch.Generator().manual_seed(3)
    out = []
    with torch.no_grad():
        for t in steps:
            dist, actions = policy.explore(obs, generator, t)
            out.append(actions - dist.chunk(2, -1)[0])
    return out


def test_the_noise_stays_fixed_between_draws_and_changes_at_each_draw():
    obs = torch.randn(4, 3, dtype=torch.float64)  # 4 environments
    noise = rollout_noise(tiny_policy(sample_freq=3), obs, range(7))
    for t in (1, 2, 4, 5):
        torch.testing.assert_close(noise[t], noise[t - 1], rtol=0, atol=0)
    for t in (3, 6):
        assert (noise[t] - noise[t - 1]).abs().min() > 0  # every environment redraws
    # -1: one draw at the start of each rollout (t = 0), none within it.
    once = rollout_noise(tiny_policy(sample_freq=-1), obs, [0, 1, 2, 3, 4, 0])
    assert all(torch.equal(n, once[0]) for n in once[1:5])
    assert (once[5] - once[4]).abs().min() > 0
    # Each environment has its own theta_eps: the same state is perturbed differently.
    same = rollout_noise(tiny_policy(), obs[:1].expand(4, 3), [0])[0]
    assert torch.cdist(same, same)[~torch.eye(4, dtype=torch.bool)].min() > 0
    assert [resample_due(t, 4) for t in range(9)] == [True, False, False, False, True,
                                                      False, False, False, True]


def test_grad_of_log_prob_wrt_log_sigma_matches_finite_differences():
    policy = tiny_policy()
    obs = torch.randn(5, 3, dtype=torch.float64)
    actions = torch.randn(5, D, dtype=torch.float64)

    def objective() -> torch.Tensor:
        return policy.log_prob(policy.distribution(obs), actions).sum()

    (grad,) = torch.autograd.grad(objective(), policy.log_std)
    h, numeric = 1e-6, torch.zeros(F, D, dtype=torch.float64)
    with torch.no_grad():
        for j in range(F):
            for k in range(D):
                policy.log_std[j, k] += h
                up = objective()
                policy.log_std[j, k] -= 2 * h
                down = objective()
                policy.log_std[j, k] += h
                numeric[j, k] = (up - down) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)
    # The features enter the variance detached: the hidden layers learn through mu alone.
    log_sigma_hat = policy.distribution(obs).chunk(2, -1)[1]
    (hidden_grad,) = torch.autograd.grad(log_sigma_hat.sum(), policy.net[0].weight)
    assert not hidden_grad.any()


# Configs and agents ----------------------------------------------------------------------------
def test_sde_configs_and_discrete_actions_are_refused(runs):
    for module in (ppo, a2c, trpo):
        for bad in (0, -2):
            with pytest.raises(ConfigError, match="--sde-sample-freq"):
                module.Config(sde=True, sde_sample_freq=bad)
        cfg = module.Config(env="CartPole-v1", sde=True, steps=64, n_steps=8, num_envs=2)
        with pytest.raises(ConfigError, match=r"^--sde needs continuous \(Box\) actions; "
                                              r"CartPole-v1 has discrete ones$"):
            module.train(cfg, Run.create(module.Config.METHOD, cfg, root=runs), progress=False)
    # rl-zoo explores Pendulum with gSDE in PPO and A2C; so do the presets.
    assert ppo.Config.create(env="Pendulum-v1").sde and a2c.Config.create(env="Pendulum-v1").sde


def short_sde_ppo(**kw) -> ppo.Config:
    # 64 environment steps an update, a row and a checkpoint after each.
    return ppo.Config(**{**dict(env="mlatlas/IdentityContinuous-v0", sde=True, sde_sample_freq=2,
                                steps=128, n_steps=16, num_envs=4, batch_size=32, epochs=2,
                                hidden=16, ckpt_every=64, log_every=64, eval_episodes=2),
                         **kw})


def test_a_gsde_run_is_reproducible_checkpoints_log_sigma_and_resumes(runs):
    a, b = (ppo.train(short_sde_ppo(), Run.create("ppo", short_sde_ppo(), root=runs / name),
                      progress=False) for name in ("a", "b"))
    ta, tb = (load_tensors(r.path(CHECKPOINT)) for r in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # log sigma is the (F, d) matrix; theta_eps is redrawn each rollout and not saved.
    assert ta["model.log_std"].shape == (16, 2)
    assert not any("theta_eps" in k for k in ta)
    ppo.train(short_sde_ppo(steps=192), a, progress=False)
    resumed = Run.open(a.dir)
    assert resumed.metrics[-1]["step"] == 192
    assert not torch.equal(load_tensors(resumed.path(CHECKPOINT))["model.log_std"],
                           ta["model.log_std"])
    assert math.isfinite(evaluate(resumed, 2, seed=1)["return_mean"])


# The budgets of each agent's continuous identity test (tests/test_rl_deep.py,
# tests/test_rl_deep_trpo.py), with the initial log sigma measured to learn within them
# (sigma_hat starts near 1.4 sigma on this task's states).
IDENTITY_SDE = {
    "ppo": dict(steps=4096, n_steps=32, batch_size=64, epochs=4, lr=3e-3, log_std_init=-2.0),
    "a2c": dict(steps=8192, n_steps=8, lr=3e-3, log_std_init=-2.0),
    "trpo": dict(steps=4096, num_envs=8, n_steps=64, hidden=32, max_kl=0.05, log_std_init=-1.0),
}


@pytest.mark.parametrize("name", ["ppo", pytest.param("a2c", marks=pytest.mark.slow),
                                  pytest.param("trpo", marks=pytest.mark.slow)])
def test_agent_with_gsde_learns_the_continuous_identity_task(name, runs):
    module = {"ppo": ppo, "a2c": a2c, "trpo": trpo}[name]
    cfg = module.Config(env="mlatlas/IdentityContinuous-v0", seed=0, eval_episodes=10,
                        sde=True, sde_sample_freq=4, log_every=4096, **IDENTITY_SDE[name])
    run = module.train(cfg, Run.create(name, cfg, root=runs), progress=False)
    # Playing a = 0 earns -10/3 per episode; mu(x) = x earns 0.
    assert run.summary()["eval/return_mean"] > -1.5


@pytest.mark.slow
def test_ppo_preset_with_gsde_solves_pendulum(runs):
    cfg = ppo.Config.create(env="Pendulum-v1", target_return=-200.0)
    run = ppo.train(cfg, Run.create("ppo", cfg, root=runs), progress=False)
    summary = run.summary()
    # Seed 0 reaches the training threshold at 38,912 steps; rl-zoo's 1e5 is SB3's budget.
    assert summary["train/solved_env_steps"] <= 100_000
    assert summary["eval/return_mean"] >= -200.0
