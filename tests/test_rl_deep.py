"""Deep RL: the shared maths (GAE, normalisers, policies), the on-policy agents (REINFORCE, A2C,
PPO) and the command line. TRPO and DDPG/TD3 have their own files."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from mlatlas.cli import main
from mlatlas.core.config import ConfigError
from mlatlas.core.io import load_tensors
from mlatlas.core.run import Run
from mlatlas.core.stats import RunningMeanStd
from mlatlas.rl.deep import a2c, ppo, reinforce
from mlatlas.rl.deep.envs import Interaction, Spaces, check_env_id, env_actions
from mlatlas.rl.deep.evaluation import evaluate
from mlatlas.rl.deep.normalize import RewardScaler
from mlatlas.rl.deep.policies import Policy
from mlatlas.rl.deep.rollout import standardize
from mlatlas.rl.returns import discounted_returns, gae

# GAE ------------------------------------------------------------------------------------------


def brute_force_gae(r, v, v_next, terminated, dones, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, summed term by term up to the episode's end."""
    T, B = r.shape
    delta = r + gamma * (~terminated) * v_next - v
    out = torch.zeros(T, B, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            total, weight = 0.0, 1.0
            for k in range(t, T):
                total += weight * delta[k, b]
                if dones[k, b]:
                    break
                weight *= gamma * lam
            out[t, b] = total
    return out


def test_gae_equals_brute_force_sum_with_terminations_and_truncations():
    g = torch.Generator().manual_seed(0)
    T, B = 12, 5
    r = torch.randn(T, B, generator=g, dtype=torch.float64)
    v = torch.randn(T, B, generator=g, dtype=torch.float64)
    v_next = torch.randn(T, B, generator=g, dtype=torch.float64)
    dones = torch.rand(T, B, generator=g) < 0.3
    terminated = dones & (torch.rand(T, B, generator=g) < 0.5)  # the rest are truncations
    assert terminated.any() and (dones & ~terminated).any()
    for gamma, lam in [(0.99, 0.95), (0.9, 1.0), (0.5, 0.0)]:
        expected = brute_force_gae(r, v, v_next, terminated, dones, gamma, lam)
        torch.testing.assert_close(gae(r, v, v_next, terminated, dones, gamma, lam), expected)


def test_gae_at_lambda_one_is_the_return_minus_the_value():
    g = torch.Generator().manual_seed(1)
    T, B, gamma = 9, 3, 0.9
    r = torch.randn(T, B, generator=g, dtype=torch.float64)
    v = torch.randn(T, B, generator=g, dtype=torch.float64)
    dones = torch.rand(T, B, generator=g) < 0.3
    v_last = torch.randn(B, generator=g, dtype=torch.float64)
    # Episodes that terminate; the last row is cut and bootstrapped with v_last.
    v_next = torch.cat([v[1:], v_last[None]])
    advantages = gae(r, v, v_next, dones, dones, gamma, 1.0)
    returns = discounted_returns(r, gamma, dones, bootstrap=v_last)
    torch.testing.assert_close(advantages, returns - v)


def test_gae_bootstraps_a_truncated_episode_but_not_a_terminated_one():
    r = torch.ones(1, 2)
    v = torch.zeros(1, 2)
    v_next = torch.full((1, 2), 10.0)
    dones = torch.tensor([[True, True]])
    terminated = torch.tensor([[True, False]])
    a = gae(r, v, v_next, terminated, dones, gamma=0.5, lam=0.9)
    torch.testing.assert_close(a, torch.tensor([[1.0, 1.0 + 0.5 * 10.0]]))


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        gae(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(3, 2).bool(),
            torch.zeros(3, 2).bool(), 0.9, 0.9)


# Losses ----------------------------------------------------------------------------------------


def test_ppo_loss_matches_hand_computation():
    # Two samples: ratio e^0.5 = 1.6487 (A = +1, clipped to 1.2) and e^-0.5 = 0.6065 (A = -2,
    # clipped to 0.8): min(rho A, clip(rho) A) = 1.2 and -1.6, so L^CLIP = -0.2.
    log_probs = torch.tensor([0.0, -1.0])
    old = torch.tensor([-0.5, -0.5])
    advantages = torch.tensor([1.0, -2.0])
    values, old_values, returns = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]), \
        torch.tensor([2.0, 1.0])
    entropy = torch.tensor([0.3, 0.5])
    loss, parts = ppo.ppo_loss(log_probs, old, advantages, values, old_values, returns,
                               entropy, clip_range=0.2, vf_coef=0.5, ent_coef=0.1)
    assert parts["policy_loss"].item() == pytest.approx(0.2)
    # Unclipped value loss: ((1-2)^2 + (0-1)^2) / 2 / 2 = 0.5.
    assert parts["value_loss"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(0.2 + 0.5 * 0.5 - 0.1 * 0.4)
    assert parts["clip_fraction"].item() == 1.0
    kl = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-0.5) - 1 + 0.5)) / 2
    assert parts["approx_kl"].item() == pytest.approx(kl, rel=1e-5)
    # With value clipping at 0.2 the first value counts as 0.7 (error 1.69 > 1), the second is
    # unchanged: (1.69 + 1) / 2 / 2.
    _, parts = ppo.ppo_loss(log_probs, old, advantages, values, old_values, returns, entropy,
                            clip_range=0.2, clip_range_vf=0.2)
    assert parts["value_loss"].item() == pytest.approx((1.69 + 1.0) / 4)


def test_ppo_loss_at_ratio_one_is_the_policy_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g, requires_grad=True)
    actions = torch.tensor([0, 1, 2, 0, 1, 2])
    advantages = torch.randn(6, generator=g)
    logp = torch.log_softmax(logits, -1)[torch.arange(6), actions]
    zeros = torch.zeros(6)
    loss, _ = ppo.ppo_loss(logp, logp.detach(), advantages, zeros, zeros, zeros, zeros, 0.2)
    (grad_ppo,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (grad_pg,) = torch.autograd.grad(-(advantages * logp).mean(), logits)
    torch.testing.assert_close(grad_ppo, grad_pg)


def test_a2c_and_reinforce_losses_match_hand_values():
    log_probs = torch.tensor([-1.0, -2.0], requires_grad=True)
    advantages = torch.tensor([2.0, -1.0])
    loss, parts = a2c.a2c_loss(log_probs, advantages, torch.tensor([1.0, 1.0]),
                               torch.tensor([0.0, 3.0]), torch.tensor([0.5, 0.5]),
                               vf_coef=0.5, ent_coef=0.2)
    # policy: -(2 * -1 + -1 * -2) / 2 = 0; value: (1 + 4) / 2 = 2.5; entropy 0.5.
    assert parts["policy_loss"].item() == 0.0
    assert loss.item() == pytest.approx(0.5 * 2.5 - 0.2 * 0.5)
    assert reinforce.reinforce_loss(log_probs, advantages).item() == 0.0
    (grad,) = torch.autograd.grad(reinforce.reinforce_loss(log_probs, advantages), log_probs)
    torch.testing.assert_close(grad, -advantages / 2)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        a2c.a2c_loss(log_probs[None], advantages, advantages, advantages, advantages)


def test_complete_episodes_keeps_the_steps_of_episodes_that_end_in_the_rollout():
    dones = torch.tensor([[0, 0], [1, 0], [0, 1], [0, 0]], dtype=torch.bool)
    expected = torch.tensor([[1, 1], [1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    assert torch.equal(reinforce.complete_episodes(dones), expected)


def test_standardize():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    z = standardize(x)
    assert z.mean().abs() < 1e-6 and z.std().item() == pytest.approx(1.0, abs=1e-6)
    assert standardize(torch.tensor([5.0])).item() == 0.0


# Normalisation, policies, environments ---------------------------------------------------------


def test_running_mean_std_merges_batches_exactly():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, generator=g) * 4 + 2 for n in (5, 17, 1, 40)]
    rms = RunningMeanStd((3,))
    for b in batches:
        rms.update(b)
    data = torch.cat(batches).double()
    torch.testing.assert_close(rms.mean, data.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rms.var, data.var(0, unbiased=False), atol=1e-3, rtol=1e-3)


def test_reward_scaler_divides_by_the_std_of_the_discounted_return():
    scaler = RewardScaler(num_envs=1, gamma=0.5)
    dones = torch.tensor([False])
    rewards = torch.randn(201, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []
    for r in rewards[:-1]:
        scaler(r, dones)
        seen.append(scaler.returns.item())
    # G_t = r_t + 0.5 G_{t-1}; the scale is the std of every G seen, this one included.
    scaled = scaler(rewards[-1], dones)
    seen.append(scaler.returns.item())
    expected = rewards[-1].item() / math.sqrt(np.var(seen) + 1e-8)
    assert scaled.item() == pytest.approx(expected, rel=1e-3)
    scaler(torch.tensor([1.0], dtype=torch.float64), torch.tensor([True]))
    assert scaler.returns.item() == 0.0


def test_policy_closed_forms_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(5, 3, generator=g)
    gaussian = Policy(gaussian_spaces(), (8,), log_std_init=-0.5)
    categorical = Policy(Spaces(3, False, True, 4), (8,))
    for policy in (gaussian, categorical):
        torch.nn.init.normal_(policy.net[-1].weight, generator=g)  # not a near-uniform start
        if policy is gaussian:
            torch.nn.init.normal_(policy.log_std, std=0.3, generator=g)
        dist = policy.distribution(obs)
        old = dist.detach() + 0.1 * torch.randn(dist.shape, generator=g)
        if policy is gaussian:
            to_torch = lambda d: torch.distributions.Independent(  # noqa: E731
                torch.distributions.Normal(d.chunk(2, -1)[0], d.chunk(2, -1)[1].exp()), 1)
        else:
            old = old.log_softmax(-1)
            to_torch = lambda d: torch.distributions.Categorical(logits=d)  # noqa: E731
        a = policy.sample(dist, torch.Generator().manual_seed(1))
        reference = to_torch(dist)
        torch.testing.assert_close(policy.log_prob(dist, a), reference.log_prob(a))
        torch.testing.assert_close(policy.entropy(dist), reference.entropy())
        torch.testing.assert_close(policy.kl(old, dist),
                                   torch.distributions.kl_divergence(to_torch(old), reference))
        assert torch.equal(a, policy.sample(dist, torch.Generator().manual_seed(1)))
    assert torch.equal(gaussian.act(obs), gaussian.distribution(obs).chunk(2, -1)[0])
    assert torch.equal(categorical.act(obs), categorical.distribution(obs).argmax(-1))
    # Gaussian actions are clipped to the box only when handed to the environment.
    np.testing.assert_array_equal(
        env_actions(torch.tensor([[3.0, -0.5]]), gaussian_spaces()), [[1.0, -0.5]])


def gaussian_spaces():
    return Spaces(3, False, False, 2, -torch.ones(2), torch.ones(2))


class CountingEnv(gym.Env):
    """obs = the step count in the episode; truncated after 3 steps by the registry."""

    observation_space = gym.spaces.Box(0.0, 10.0, (1,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([float(self.t)], dtype=np.float32), 1.0, False, False, {}


def test_interaction_hands_over_the_final_observation_at_a_time_limit():
    if "test/Counting-v0" not in gym.registry:
        gym.register("test/Counting-v0", entry_point=CountingEnv, max_episode_steps=3)
    cfg = ppo.Config(env="test/Counting-v0", num_envs=2)
    interaction = Interaction(cfg)
    seen = [interaction.step(torch.zeros(2, dtype=torch.long)) for _ in range(3)]
    last = seen[-1]
    assert last.dones.all() and not last.terminated.any()
    assert last.next_obs[:, 0].tolist() == [3.0, 3.0]  # the final observation, not the reset
    assert interaction.obs[:, 0].tolist() == [0.0, 0.0]  # the next episode's first
    assert interaction.episodes.recent == [3.0, 3.0]
    assert interaction.episodes.env_steps == 6


def test_unknown_environment_is_a_config_error_with_suggestions():
    with pytest.raises(ConfigError, match="did you mean CartPole-v1"):
        check_env_id("CartPol-v1")


def test_create_puts_the_env_presets_under_the_callers_choices():
    cfg = ppo.Config.create(env="CartPole-v1", lam=0.5)
    assert cfg.n_steps == ppo.Config.PRESETS["CartPole-v1"]["n_steps"] and cfg.lam == 0.5
    assert ppo.Config.create(env="mlatlas/Identity-v0").n_steps == ppo.Config().n_steps


# Agents ----------------------------------------------------------------------------------------

FAST_IDENTITY = {
    "ppo": dict(steps=4096, n_steps=32, batch_size=64, epochs=4, lr=3e-3),
    "a2c": dict(steps=8192, n_steps=8, lr=3e-3),
    "reinforce": dict(steps=8192, n_steps=64, lr=1e-2),
}


@pytest.mark.parametrize("name", ["ppo", "a2c", "reinforce"])
def test_agent_solves_the_identity_task(name, runs):
    module = {"ppo": ppo, "a2c": a2c, "reinforce": reinforce}[name]
    cfg = module.Config(env="mlatlas/Identity-v0", seed=0, eval_episodes=10, log_every=1,
                        **FAST_IDENTITY[name])
    run = module.train(cfg, Run.create(name, cfg, root=runs), progress=False)
    # A uniform policy earns 2.5 of the 10 possible; the deterministic policy must be right on
    # (nearly) every step.
    assert run.summary()["eval/return_mean"] >= 9.5
    returns = [r["episode_return"] for r in run.metrics if "episode_return" in r]
    assert returns[0] < 6.0 < returns[-1]


@pytest.mark.parametrize("name", ["ppo", "a2c"])
def test_agent_learns_the_continuous_identity_task(name, runs):
    module = {"ppo": ppo, "a2c": a2c}[name]
    cfg = module.Config(env="mlatlas/IdentityContinuous-v0", seed=0, eval_episodes=10,
                        **FAST_IDENTITY[name])
    run = module.train(cfg, Run.create(name, cfg, root=runs), progress=False)
    # Playing a = 0 earns -10/3 per episode; mu(x) = x earns 0.
    assert run.summary()["eval/return_mean"] > -1.5


def short_ppo(**kw):
    # 128 environment steps an update: a row every 2 updates, a checkpoint every 4.
    return ppo.Config(**{**dict(env="CartPole-v1", steps=1024, n_steps=32, batch_size=64,
                                epochs=2, num_envs=4, log_every=256, ckpt_every=512,
                                eval_episodes=2), **kw})


def test_same_seed_same_run(runs):
    a = ppo.train(short_ppo(seed=3), Run.create("ppo", short_ppo(), root=runs / "a"),
                  progress=False)
    b = ppo.train(short_ppo(seed=3), Run.create("ppo", short_ppo(), root=runs / "b"),
                  progress=False)
    ta, tb = (load_tensors(r.path("checkpoint.safetensors")) for r in (a, b))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    strip = [{k: v for k, v in row.items() if k != "wall_s"} for row in a.metrics]
    assert strip == [{k: v for k, v in row.items() if k != "wall_s"} for row in b.metrics]


def test_normalisers_are_checkpointed_and_a_resumed_run_continues(runs):
    cfg = short_ppo(normalize_obs=True, normalize_reward=True)
    run = ppo.train(cfg, Run.create("ppo", cfg, root=runs), progress=False)
    tensors = load_tensors(run.path("checkpoint.safetensors"))
    assert tensors["obs_norm.count"].item() > 1000
    assert "reward_scaler.var" in tensors
    steps_before = run.metrics[-1]["env_steps"]
    longer = short_ppo(normalize_obs=True, normalize_reward=True, steps=2048)
    ppo.train(longer, run, progress=False)
    rows = Run.open(run.dir).metrics
    assert rows[-1]["step"] == 2048 and rows[-1]["env_steps"] == 2 * steps_before
    # The step column counts environment steps, like --steps.
    assert all(row["step"] == row["env_steps"] for row in rows)
    resumed = load_tensors(run.path("checkpoint.safetensors"))
    assert resumed["obs_norm.count"].item() > tensors["obs_norm.count"].item()


def test_steps_rows_and_checkpoints_count_environment_steps(runs):
    # 128 environment steps an update: --log-every 200 rounds up to 2 updates, and --steps 1000
    # down to 7; the last update always writes a row (and a checkpoint).
    cfg = short_ppo(log_every=200, ckpt_every=300, steps=1000)
    run = ppo.train(cfg, Run.create("ppo", cfg, root=runs), progress=False)
    rows = run.metrics
    assert [row["step"] for row in rows] == [256, 512, 768, 896]
    assert all(row["step"] == row["env_steps"] and "policy_loss" in row for row in rows)
    assert run.checkpoint_step() == 896 == run.summary()["train/steps"]


def test_checkpoint_groups_and_evaluate_with_n_and_seed(runs):
    cfg = short_ppo(steps=256, eval_episodes=3)
    run = ppo.train(cfg, Run.create("ppo", cfg, root=runs), progress=False)
    groups = {k.split(".")[0] for k in load_tensors(run.path("checkpoint.safetensors"))}
    assert groups == {"model", "critic", "optimizer", "rng", "episodes", "rng_torch"}
    # n = None is the run's eval_episodes; the same seed scores the same episodes.
    assert evaluate(run)["episodes"] == 3
    scores = evaluate(run, 5, seed=1)
    assert scores == evaluate(run, 5, seed=1) and scores["episodes"] == 5
    assert scores["return_mean"] != evaluate(run, 5, seed=2)["return_mean"]
    summary = run.summary()
    assert summary["eval/episodes"] == 5 and summary["eval/seed"] == 2
    assert set(summary) >= {"train/steps", "train/wall_s", "train/final_eval_s",
                            "eval/return_mean", "eval/return_std"}


def test_target_return_stops_the_run_and_records_when(runs):
    cfg = ppo.Config(env="mlatlas/Identity-v0", steps=8192, n_steps=32, batch_size=64, epochs=4,
                     lr=3e-3, target_return=8.0, eval_episodes=2)
    run = ppo.train(cfg, Run.create("ppo", cfg, root=runs), progress=False)
    summary = run.summary()
    assert summary["train/solved_env_steps"] < 8192
    assert summary["train/solved_env_steps"] == run.metrics[-1]["env_steps"]
    assert run.metrics[-1]["episode_return"] >= 8.0


# Command line ----------------------------------------------------------------------------------


def test_cli_trains_evaluates_and_records_a_video(runs, capsys):
    argv = ["train", "ppo", "--env", "mlatlas/Identity-v0", "--steps", "1024", "--n-steps", "32",
            "--eval-episodes", "2", "--out", str(runs), "--no-progress"]
    assert main(argv) == 0
    (run_dir,) = runs.iterdir()
    assert (run_dir / "returns.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert '"episodes": 3' in out and "return_mean" in out
    assert Run.open(run_dir).summary()["eval/episodes"] == 3
    # Every family counts its evaluation items with --n; --episodes is gone.
    assert main(["eval", str(run_dir), "--episodes", "3"]) == 2
    assert "unrecognised argument '--episodes'" in capsys.readouterr().err


def test_cli_records_an_episode_as_a_gif(runs, capsys):
    pytest.importorskip("pygame")
    from PIL import Image

    assert main(["train", "a2c", "--env", "CartPole-v1", "--steps", "400", "--eval-episodes",
                 "1", "--out", str(runs), "--no-progress"]) == 0
    (run_dir,) = runs.iterdir()
    assert main(["eval", str(run_dir), "--n", "1", "--video"]) == 0
    gif = run_dir / "episode-seed0.gif"
    with Image.open(gif) as im:
        assert im.n_frames >= 8 and im.size == (600, 400)


def test_cli_rejects_an_unknown_environment(runs, capsys):
    assert main(["train", "ppo", "--env", "Pendulum-v9", "--out", str(runs)]) == 2
    assert "did you mean Pendulum-v1" in capsys.readouterr().err
    assert not runs.exists() or not any(runs.iterdir())


# Slow: the classic-control thresholds ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppo", "a2c"])
def test_agent_solves_cartpole(name, runs):
    module = {"ppo": ppo, "a2c": a2c}[name]
    cfg = module.Config.create(env="CartPole-v1", target_return=490.0)
    run = module.train(cfg, Run.create(name, cfg, root=runs), progress=False)
    assert run.summary()["eval/return_mean"] >= 475.0


def test_mujoco_tasks_name_the_extra_they_need():
    try:
        import mujoco  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"mlatlas\[mujoco\]"):
            check_env_id("HalfCheetah-v5")
    else:
        check_env_id("HalfCheetah-v5")
