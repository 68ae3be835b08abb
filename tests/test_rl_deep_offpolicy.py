"""DDPG and TD3: targets, smoothing, Polyak averaging, exploration noise, the replay buffer and the
delayed actor checked by hand; determinism; learning the continuous identity task (fast) and
Pendulum-v1 (slow)."""

import math

import pytest
import torch
from torch import nn

from mlatlas.core.config import ConfigError, config_to_dict
from mlatlas.core.io import load_tensors
from mlatlas.core.optim import polyak_update
from mlatlas.core.run import Run
from mlatlas.rl.deep import ddpg, td3
from mlatlas.rl.deep.ddpg import GaussianNoise, OrnsteinUhlenbeckNoise, QEnsemble, ddpg_target
from mlatlas.rl.deep.envs import Spaces
from mlatlas.rl.deep.evaluation import evaluate
from mlatlas.rl.deep.replay import ReplayBuffer
from mlatlas.rl.deep.td3 import target_policy_smoothing, td3_target
from mlatlas.rl.deep.toy_envs import IDENTITY_CONTINUOUS_ID


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# Targets ---------------------------------------------------------------------------------------
def test_ddpg_target_by_hand_terminal_zeroes_bootstrap_truncation_keeps_it():
    r = torch.tensor([1.0, 1.0, -0.5])
    # The second transition ends in a terminal state; the third was cut by a time limit (it is
    # done but not terminated), so its bootstrap stays.
    terminated = torch.tensor([False, True, False])
    next_q = torch.tensor([2.0, 2.0, 4.0])
    y = ddpg_target(r, terminated, next_q, gamma=0.9)
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 2.0, 1.0, -0.5 + 0.9 * 4.0]))
    # 0/1 floats mean the same as bools.
    assert torch.equal(ddpg_target(r, terminated.float(), next_q, 0.9), y)
    with pytest.raises(ValueError, match="one shape"):
        ddpg_target(r, terminated, next_q[:2], 0.9)


def test_td3_target_uses_the_smaller_critic():
    r = torch.tensor([0.0, 1.0, 2.0])
    terminated = torch.tensor([False, False, True])
    next_q = torch.tensor([[1.0, 5.0, 7.0],    # Q'_1
                           [3.0, 2.0, -1.0]])  # Q'_2
    y = td3_target(r, terminated, next_q, gamma=0.5)
    assert torch.allclose(y, torch.tensor([0.0 + 0.5 * 1.0, 1.0 + 0.5 * 2.0, 2.0]))
    # With a single critic it is DDPG's target.
    assert torch.equal(td3_target(r, terminated, next_q[:1], 0.5),
                       ddpg_target(r, terminated, next_q[0], 0.5))
    with pytest.raises(ValueError, match=r"\(K, B\)"):
        td3_target(r, terminated, next_q[0], 0.5)


def test_target_policy_smoothing_clips_noise_then_actions():
    mu = torch.tensor([[0.9], [-0.9], [0.0], [0.2]])
    eps = torch.tensor([[0.8], [-0.1], [-2.0], [0.1]])
    a = target_policy_smoothing(mu, eps, noise_clip=0.5, low=-1.0, high=1.0)
    # 0.9 + 0.5 -> 1 (box); -0.9 - 0.1; 0 - 0.5 (noise clipped); 0.2 + 0.1.
    assert torch.allclose(a, torch.tensor([[1.0], [-1.0], [-0.5], [0.3]]))
    # Large random noise and a per-dimension box: the perturbation never exceeds c before the box
    # clip, and every action lies in the box.
    mu = torch.rand(1000, 2, generator=gen()) * 2 - 1
    eps = 5.0 * torch.randn(1000, 2, generator=gen(1))
    low, high = torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.25])
    a = target_policy_smoothing(mu, eps, 0.3, low, high)
    assert (a >= low).all() and (a <= high).all()
    inside = ((mu + eps.clamp(-0.3, 0.3) > low) & (mu + eps.clamp(-0.3, 0.3) < high)).all(1)
    assert ((a - mu)[inside].abs() <= 0.3 + 1e-6).all()
    assert ((a - mu)[inside].abs() > 0.29).float().mean() > 0.5  # most noise hit the clip
    with pytest.raises(ValueError, match="one shape"):
        target_policy_smoothing(mu, eps[:, :1], 0.3, -1.0, 1.0)


# Polyak averaging ------------------------------------------------------------------------------
def test_polyak_copies_keeps_and_interpolates():
    source, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in target.parameters()]
    polyak_update(target, source, tau=0.0)
    assert all(torch.equal(p, b) for p, b in zip(target.parameters(), before, strict=True))
    polyak_update(target, source, tau=0.3)
    for p, b, s in zip(target.parameters(), before, source.parameters(), strict=True):
        assert torch.allclose(p, 0.3 * s + 0.7 * b)
    polyak_update(target, source, tau=1.0)
    assert all(torch.equal(p, s) for p, s in zip(target.parameters(), source.parameters(),
                                                  strict=True))


# Exploration noise -----------------------------------------------------------------------------
def test_ou_noise_reverts_to_its_mean_with_the_closed_form_variance():
    theta, sigma, dt, mu = 2.0, 0.3, 0.01, 0.5
    noise = OrnsteinUhlenbeckNoise((4000, 1), sigma, theta, dt, mu)
    g = gen()
    # From x_0 = 0 the mean follows E[x_k] = mu (1 - (1 - theta dt)^k).
    for _ in range(50):
        x = noise.sample(g)
    assert x.mean().item() == pytest.approx(mu * (1 - (1 - theta * dt) ** 50), abs=0.01)
    for _ in range(500):  # ten relaxation times 1 / (theta dt)
        x = noise.sample(g)
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.var().item() == pytest.approx(sigma**2 / (2 * theta), rel=0.1)
    # Increments are correlated (x moves slowly), unlike independent Gaussian draws.
    step = noise.sample(g) - x
    assert step.std().item() < 0.2 * x.std().item()


def test_ou_noise_reset_and_checkpoint():
    noise = OrnsteinUhlenbeckNoise((3, 2), sigma=1.0)
    g = gen()
    for _ in range(5):
        noise.sample(g)
    assert (noise.x != 0).all()
    noise.reset(torch.tensor([False, True, False]))
    assert (noise.x[1] == 0).all() and (noise.x[[0, 2]] != 0).all()
    # The state is a buffer: restored into a fresh process it continues identically.
    copy = OrnsteinUhlenbeckNoise((3, 2), sigma=1.0)
    copy.load_state_dict(noise.state_dict())
    assert torch.equal(noise.sample(gen(3)), copy.sample(gen(3)))
    noise.reset()
    assert (noise.x == 0).all()


def test_gaussian_noise_std_and_independence():
    noise = GaussianNoise((20000, 1), sigma=0.3)
    a, b = noise.sample(gen()), noise.sample(gen(1))
    assert a.std().item() == pytest.approx(0.3, rel=0.03)
    assert abs(a.mean().item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([a[:, 0], b[:, 0]]))[0, 1].item()) < 0.03
    assert torch.equal(noise.sample(gen(7)), noise.sample(gen(7)))


# Replay buffer ---------------------------------------------------------------------------------
def rows(start, n, obs_dim=2):
    """n transitions whose entries all encode their index, so a sample says where it came from."""
    i = torch.arange(start, start + n, dtype=torch.float32)
    return (i[:, None].expand(n, obs_dim), -i[:, None], 10 * i, i[:, None].expand(n, obs_dim) + 0.5,
            (i % 2 == 0))


def test_replay_buffer_wraps_around():
    buf = ReplayBuffer(5, obs_dim=2, act_dim=1)
    buf.add(*rows(0, 3))
    assert len(buf) == 3 and buf.pos == 3
    buf.add(*rows(3, 4))
    # Rows 0 and 1 were overwritten by 5 and 6.
    assert len(buf) == 5 and buf.pos == 2
    assert buf.state["data"][:, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    # More rows than slots keep the newest ones, where writing them one by one puts them.
    buf.add(*rows(10, 12))
    assert buf.pos == (2 + 12) % 5
    assert buf.state["data"][:, 0].tolist() == [18.0, 19.0, 20.0, 21.0, 17.0]
    with pytest.raises(ValueError, match="shapes"):
        buf.add(torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(2), torch.zeros(2, 2),
                torch.zeros(2))


def test_replay_buffer_samples_filled_rows_consistently():
    buf = ReplayBuffer(100, obs_dim=2, act_dim=1)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(4, gen())
    buf.add(*rows(0, 3))
    batch = buf.sample(500, gen())
    i = batch.obs[:, 0]
    assert set(i.tolist()) == {0.0, 1.0, 2.0}
    # Every field of a sampled transition comes from the same row.
    assert torch.equal(batch.actions[:, 0], -i) and torch.equal(batch.rewards, 10 * i)
    assert torch.equal(batch.next_obs[:, 1], i + 0.5)
    assert torch.equal(batch.terminated, (i % 2 == 0).float())
    stack = buf.sample(8, gen(), num_batches=3)
    assert stack.obs.shape == (3, 8, 2) and stack[1].rewards.shape == (8,)
    assert torch.equal(buf.sample(8, gen(5)).obs, buf.sample(8, gen(5)).obs)
    assert not torch.equal(buf.sample(64, gen(5)).obs, buf.sample(64, gen(6)).obs)


def test_replay_buffer_survives_checkpoint(tmp_path):
    buf = ReplayBuffer(6, obs_dim=2, act_dim=1)
    buf.add(*rows(0, 8))
    run = Run.create("ddpg", ddpg.Config(), root=tmp_path)
    run.save_checkpoint({"replay": buf.state}, {"step": 1})
    restored = ReplayBuffer(6, obs_dim=2, act_dim=1)
    run.load_checkpoint({"replay": restored.state})
    assert len(restored) == 6 and restored.pos == buf.pos == 2
    assert torch.equal(restored.sample(32, gen()).obs, buf.sample(32, gen()).obs)
    # Both continue writing at the same slot.
    buf.add(*rows(50, 1))
    restored.add(*rows(50, 1))
    assert torch.equal(restored.state["data"], buf.state["data"])


# Networks and the learner ----------------------------------------------------------------------
SPACES = Spaces(obs_dim=3, discrete_obs=False, discrete=False, act_dim=2,
                low=torch.tensor([-2.0, 0.0]), high=torch.tensor([2.0, 1.0]))


def test_q_ensemble_is_k_independent_mlps():
    q = QEnsemble(3, in_dim=5, hidden=(8, 8))
    obs, u = torch.randn(4, 3), torch.randn(4, 2)
    out = q(obs, u)
    assert out.shape == (3, 4)
    x = torch.cat([obs, u], 1)
    for k in range(3):
        h = torch.relu(x @ q.w0[k] + q.b0[k])
        h = torch.relu(h @ q.w1[k] + q.b1[k])
        assert torch.allclose(out[k], (h @ q.w2[k] + q.b2[k])[:, 0], atol=1e-6)
    assert torch.allclose(q(obs, u, members=1), out[:1])


def test_actor_acts_inside_the_box():
    actor = ddpg.make_actor(ddpg.Config(hidden=16), SPACES)
    with torch.no_grad():
        nn.init.constant_(actor.net[-1].bias, 100.0)  # saturate tanh
        a = actor(torch.randn(10, 3))
    assert torch.allclose(a, SPACES.high.expand(10, 2))
    u = torch.tensor([[-1.0, 0.0]])
    assert torch.allclose(actor.to_env(u), torch.tensor([[-2.0, 0.5]]))


def replay_of(n=64):
    buf = ReplayBuffer(n, SPACES.obs_dim, SPACES.act_dim)
    g = gen(11)
    buf.add(torch.randn(n, 3, generator=g), torch.rand(n, 2, generator=g) * 2 - 1,
            torch.randn(n, generator=g), torch.randn(n, 3, generator=g), torch.zeros(n))
    return buf


def test_learner_targets_are_the_formulas():
    batch = replay_of().sample(32, gen())
    batch.terminated[:8] = 1.0
    not_done = 1.0 - batch.terminated
    # DDPG: Q' of the target actor's own action.
    learner = ddpg.Learner(ddpg.Config(hidden=16, gamma=0.9), SPACES)
    q = learner.target_critic(batch.next_obs, learner.target_actor.unit(batch.next_obs))[0]
    assert torch.allclose(learner.target(batch, gen()), batch.rewards + 0.9 * not_done * q)
    # TD3: the smoothed target action, drawn from the run's generator, and the smaller critic.
    learner = td3.Learner(td3.Config(hidden=16, gamma=0.9, target_noise=0.5,
                                     target_noise_clip=0.3), SPACES)
    y = learner.target(batch, gen(4))
    mu = learner.target_actor.unit(batch.next_obs)
    eps = 0.5 * torch.randn(mu.shape, generator=gen(4))
    q = learner.target_critic(batch.next_obs, (mu + eps.clamp(-0.3, 0.3)).clamp(-1.0, 1.0))
    assert torch.allclose(y, batch.rewards + 0.9 * not_done * torch.minimum(q[0], q[1]))
    assert not torch.allclose(y, batch.rewards + 0.9 * not_done * q[0])
    unsmoothed = learner.target_critic(batch.next_obs, mu).min(0).values
    assert not torch.allclose(y, batch.rewards + 0.9 * not_done * unsmoothed)


@pytest.mark.parametrize("delay", [1, 3])
def test_delayed_actor_moves_every_policy_delay_critic_updates(delay):
    learner = td3.Learner(td3.Config(hidden=16, batch_size=8, policy_delay=delay, tau=0.5),
                          SPACES)
    buf, g = replay_of(), gen()
    watched = {"actor": learner.actor, "target_actor": learner.target_actor,
               "critic": learner.critic, "target_critic": learner.target_critic}
    for step in range(1, 7):
        before = {k: [p.clone() for p in m.parameters()] for k, m in watched.items()}
        metrics = learner.train(buf.sample(8, g, num_batches=1), g)
        moved = {k: any(not torch.equal(p, b) for p, b in zip(m.parameters(), before[k],
                                                                strict=True))
                 for k, m in watched.items()}
        due = step % delay == 0
        assert moved == {"actor": due, "target_actor": due, "critic": True,
                         "target_critic": due}, step
        assert ("actor_loss" in metrics) == due
    assert int(learner.counters["critic_updates"]) == 6


def test_ddpg_learner_updates_actor_every_step_and_counts_across_calls():
    learner = ddpg.Learner(ddpg.Config(hidden=16, batch_size=8), SPACES)
    buf, g = replay_of(), gen()
    metrics = learner.train(buf.sample(8, g, num_batches=4), g)
    assert int(learner.counters["critic_updates"]) == 4 and "actor_loss" in metrics
    assert learner.critic.n_critics == 1


def test_configs_reject_bad_values_and_discrete_actions(runs):
    with pytest.raises(ConfigError, match="--noise"):
        ddpg.Config(noise="pink")
    with pytest.raises(ConfigError, match="--tau"):
        td3.Config(tau=1.5)
    with pytest.raises(ConfigError, match="--policy-delay"):
        td3.Config(policy_delay=0)
    with pytest.raises(ConfigError, match="continuous"):
        td3.train(td3.Config(env="CartPole-v1", steps=10), Run.create("td3", td3.Config(),
                                                                        root=runs))
    assert td3.Config.create(env="Pendulum-v1").num_envs == td3.Config.PRESETS[
        "Pendulum-v1"]["num_envs"]


# Training --------------------------------------------------------------------------------------
def identity_config(module, **kw):
    values = dict(env=IDENTITY_CONTINUOUS_ID, steps=1600, num_envs=4, hidden=32, lr=3e-3,
                  gamma=0.5, batch_size=64, learning_starts=200, tau=0.05, gradient_steps=1,
                  eval_episodes=10, log_every=100, ckpt_every=800)
    return module.Config(**{**values, **kw})


@pytest.mark.parametrize("module", [ddpg, td3])
def test_agents_learn_the_continuous_identity(module, runs):
    cfg = identity_config(module)
    run = module.train(cfg, Run.create(module.__name__.rsplit(".", 1)[1], cfg, root=runs),
                       progress=False)
    summary = run.summary()
    # Playing a = 0 earns -||x||^2 / d = -1/3 a step, -3.33 an episode; the optimum is 0.
    assert summary["eval/return_mean"] > -0.5, summary
    # The checkpointed actor is what `mlatlas eval` loads and scores.
    scores = evaluate(run, 5, seed=5)
    assert scores["return_mean"] > -0.5
    tensors = load_tensors(run.path("checkpoint.safetensors"))
    assert int(tensors["replay.size"]) == cfg.steps


def test_same_seed_same_run(runs):
    def once(seed):
        cfg = identity_config(td3, steps=380, noise="ou", seed=seed)
        run = td3.train(cfg, Run.create("td3", cfg, root=runs), progress=False)
        metrics = [{k: v for k, v in r.items() if k != "wall_s"} for r in run.metrics]
        tensors = load_tensors(run.path("checkpoint.safetensors"))
        return metrics, tensors

    (m0, t0), (m1, t1), (m2, t2) = once(0), once(0), once(1)
    assert m0 == m1
    assert all(torch.equal(t0[k], t1[k]) for k in t0 if not k.startswith("rng_torch"))
    assert m0 != m2 and not torch.equal(t0["model.net.0.weight"], t2["model.net.0.weight"])
    assert not torch.equal(t0["noise.x"], torch.zeros_like(t0["noise.x"]))


def test_resume_continues_with_the_checkpointed_replay(runs):
    cfg = identity_config(td3, steps=200, learning_starts=40)
    run = td3.train(cfg, Run.create("td3", cfg, root=runs), progress=False)
    saved = load_tensors(run.path("checkpoint.safetensors"))
    # Asked for more steps on resume (as `mlatlas train --resume DIR --steps 400` does).
    more = identity_config(td3, steps=400, learning_starts=40)
    run = Run.open(run.dir)
    run.config = config_to_dict(more)
    td3.train(more, run, progress=False)
    resumed = load_tensors(run.path("checkpoint.safetensors"))
    # The buffer kept its 200 slots, all of them now newer rows, and wrapped exactly once.
    assert resumed["replay.data"].shape == saved["replay.data"].shape
    assert int(resumed["replay.size"]) == 200 and int(resumed["replay.pos"]) == 0
    assert not torch.equal(resumed["replay.data"], saved["replay.data"])
    # Critic updates went on counting from the checkpoint: one per update from the one that
    # reached learning_starts (update 10 of 4 environment steps) to the last, 100.
    assert int(resumed["learner.critic_updates"]) == 100 - 10 + 1
    assert run.summary()["train/steps"] == 400


@pytest.mark.slow
@pytest.mark.parametrize("module", [ddpg, td3])
def test_agents_solve_pendulum(module, runs):
    name = module.__name__.rsplit(".", 1)[1]
    cfg = module.Config.create(env="Pendulum-v1", target_return=-200.0)
    run = module.train(cfg, Run.create(name, cfg, root=runs), progress=False)
    summary = run.summary()
    print(name, {k: summary.get(k) for k in ("train/solved_env_steps", "train/solved_wall_s",
                                             "eval/return_mean", "eval/return_std")})
    assert summary["eval/return_mean"] >= -200.0, summary
    assert math.isfinite(summary.get("train/solved_env_steps", math.inf))
