"""TRPO: conjugate gradient, Fisher-vector products, the trust-region step and the agent."""

import math

import pytest
import torch
from torch import nn

from mlatlas.core.config import ConfigError
from mlatlas.core.io import load_tensors
from mlatlas.core.run import CHECKPOINT, Run
from mlatlas.rl.deep import trpo
from mlatlas.rl.deep.envs import Spaces
from mlatlas.rl.deep.evaluation import evaluate
from mlatlas.rl.deep.policies import Policy


def random_spd(n: int, generator: torch.Generator) -> torch.Tensor:
    """Q diag(lambda) Q^T with eigenvalues spread over [0.5, 20]."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(0.5, 20.0, n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


def tiny_policy(discrete: bool, obs_dim: int = 3, act_dim: int = 3, hidden: tuple = (5,),
                seed: int = 0) -> Policy:
    torch.manual_seed(seed)
    spaces = Spaces(obs_dim, False, discrete, act_dim)
    policy = Policy(spaces, hidden, log_std_init=-0.3)
    # A policy head of gain 1 instead of 0.01, so the policy is far from uniform and its Fisher
    # has no structure that a wrong product could happen to match.
    nn.init.orthogonal_(policy.net[-1].weight, 1.0)
    return policy


def kl_to_current(policy: Policy, obs: torch.Tensor):
    """pi_old := pi_theta now (detached) and the function theta -> mean KL(pi_old || pi_theta)."""
    with torch.no_grad():
        pi_old = policy.distribution(obs)
    return pi_old, lambda: policy.kl(pi_old, policy.distribution(obs)).mean()


# Conjugate gradient ----------------------------------------------------------------------------
def test_conjugate_gradient_solves_a_random_spd_system():
    g = torch.Generator().manual_seed(0)
    A = random_spd(20, g)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    products = []

    def Avp(v):
        products.append(v)
        return A @ v

    # n iterations are exact in exact arithmetic; in float64 they leave a rounding-size residual.
    x = trpo.conjugate_gradient(Avp, b, iters=20, residual_tol=1e-20)
    assert torch.linalg.norm(A @ x - b) < 1e-6
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-6, rtol=0)
    assert 1 <= len(products) <= 20
    # Few iterations are not enough for a spread spectrum: the check above can fail.
    assert torch.linalg.norm(A @ trpo.conjugate_gradient(Avp, b, iters=3) - b) > 1e-3


def test_conjugate_gradient_stops_at_the_residual_tolerance_and_checks_its_input():
    A = torch.diag(torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
    calls = []
    b = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    # A multiple of the identity: one step is exact, the next is skipped.
    x = trpo.conjugate_gradient(lambda v: calls.append(v) or A @ v, b, iters=10)
    assert len(calls) == 1
    torch.testing.assert_close(x, b / 2)
    with pytest.raises(ValueError, match="vector"):
        trpo.conjugate_gradient(lambda v: v, torch.ones(2, 2))


# Fisher-vector products ------------------------------------------------------------------------
class _MeanKL(nn.Module):
    """theta -> mean KL(pi_old || pi_theta) as a module, so functional_call can vary theta."""

    def __init__(self, policy: Policy, pi_old, obs: torch.Tensor):
        super().__init__()
        self.policy, self.pi_old, self.obs = policy, pi_old, obs

    def forward(self) -> torch.Tensor:
        return self.policy.kl(self.pi_old, self.policy.distribution(self.obs)).mean()


@pytest.mark.parametrize("discrete", [True, False])
def test_fisher_vector_product_is_the_kl_hessian_times_v(discrete):
    policy = tiny_policy(discrete).double()
    obs = torch.randn(16, 3, dtype=torch.float64)
    pi_old, kl_fn = kl_to_current(policy, obs)
    names = [n for n, _ in policy.named_parameters()]
    params = list(policy.parameters())
    sizes = [p.numel() for p in params]
    theta0 = trpo.flat_params(params)
    module = _MeanKL(policy, pi_old, obs)

    def mean_kl(theta):
        chunks = torch.split(theta, sizes)
        return torch.func.functional_call(
            module, {f"policy.{n}": c.view_as(p)
                     for n, c, p in zip(names, chunks, params, strict=True)}, ())

    H = torch.autograd.functional.hessian(mean_kl, theta0)
    v = torch.randn(len(theta0), dtype=torch.float64)
    damping = 0.1
    Fv = trpo.fisher_vector_product(kl_fn, params, v, damping)
    torch.testing.assert_close(Fv, H @ v + damping * v, atol=1e-10, rtol=1e-8)
    # The Hessian of a KL at its minimum is a non-trivial positive semi-definite matrix.
    assert torch.linalg.norm(H @ v) > 1e-3
    assert torch.linalg.eigvalsh((H + H.T) / 2).min() > -1e-10
    with pytest.raises(ValueError, match="shape"):
        trpo.fisher_vector_product(kl_fn, params, v[:-1], damping)


# The trust-region step -------------------------------------------------------------------------
def test_trpo_step_on_a_quadratic_kl_is_the_natural_gradient_scaled_to_the_bound():
    # KL_bar = 1/2 d^T M d and L = g^T theta: F = M, and the full step has KL exactly delta.
    g = torch.Generator().manual_seed(1)
    M = random_spd(6, g)
    grad = torch.randn(6, generator=g, dtype=torch.float64)
    theta0 = torch.randn(6, generator=g, dtype=torch.float64)
    theta = nn.Parameter(theta0.clone())
    delta = 0.02

    def kl_fn():
        d = theta - theta0
        return 0.5 * d @ M @ d

    info = trpo.trpo_step([theta], lambda: grad @ theta, kl_fn, delta, damping=0.0, cg_iters=6)
    s = torch.linalg.solve(M, grad)
    step = math.sqrt(2 * delta / float(s @ M @ s)) * s
    assert info["accepted"] == 1.0
    expected = theta0 + info["step_fraction"] * step
    torch.testing.assert_close(theta.detach(), expected, atol=1e-9, rtol=0)
    assert info["kl"] <= delta
    assert info["step_fraction"] in (1.0, 0.5)  # the full step sits on the bound, up to rounding
    torch.testing.assert_close(info["expected_improvement"], float(grad @ step))


@pytest.mark.parametrize("discrete", [True, False])
def test_trpo_step_never_exceeds_the_kl_bound(discrete):
    beyond_bound = 0
    accepted = 0
    for seed, delta in [(0, 0.01), (1, 0.05), (2, 0.3), (3, 1.0), (4, 2.0), (5, 0.1)]:
        policy = tiny_policy(discrete, obs_dim=4, hidden=(16,), seed=seed)
        obs = torch.randn(256, 4)
        pi_old, kl_fn = kl_to_current(policy, obs)
        actions = policy.sample(pi_old, torch.Generator().manual_seed(seed))
        log_prob_old = policy.log_prob(pi_old, actions)
        A = torch.randn(256)

        def surrogate(policy=policy, obs=obs, actions=actions, lp=log_prob_old, A=A):
            log_prob = policy.log_prob(policy.distribution(obs), actions)
            return ((log_prob - lp).exp() * A).mean()

        def recording_kl(kl_fn=kl_fn, delta=delta):
            nonlocal beyond_bound
            kl = kl_fn()
            if not torch.is_grad_enabled():  # a candidate of the line search
                beyond_bound += float(kl) > delta
            return kl

        params = list(policy.parameters())
        with torch.no_grad():
            theta0, surrogate0 = trpo.flat_params(params), float(surrogate())
        info = trpo.trpo_step(params, surrogate, recording_kl, delta, damping=0.01)
        with torch.no_grad():
            kl_after, surrogate_after = float(kl_fn()), float(surrogate())
        assert kl_after <= delta + 1e-6
        if info["accepted"]:
            accepted += 1
            assert surrogate_after > surrogate0
            assert info["kl"] == pytest.approx(kl_after, rel=1e-4, abs=1e-7)
            assert info["surrogate_improvement"] == pytest.approx(surrogate_after - surrogate0,
                                                                  rel=1e-4, abs=1e-7)
        else:
            assert torch.equal(trpo.flat_params(params), theta0)
    assert accepted >= 4
    # The line search did meet candidates beyond the bound, and turned them down.
    assert beyond_bound >= 1


def test_a_failed_line_search_leaves_the_parameters_unchanged():
    theta0 = torch.randn(5, dtype=torch.float64)
    theta = nn.Parameter(theta0.clone())
    c = torch.ones(5, dtype=torch.float64)

    # The gradient at theta_old points along c, but the surrogate falls off so steeply that no
    # step of the line search improves it.
    def surrogate():
        d = theta - theta0
        return c @ d - 1e6 * d @ d

    info = trpo.trpo_step([theta], surrogate, lambda: 0.5 * (theta - theta0).square().sum(),
                          max_kl=0.01, damping=0.0, max_backtracks=10)
    assert info["accepted"] == 0.0 and info["backtracks"] == 10.0 and info["kl"] == 0.0
    assert torch.equal(theta.detach(), theta0)
    with pytest.raises(ValueError, match="max_kl"):
        trpo.trpo_step([theta], surrogate, lambda: theta.sum(), max_kl=0.0)


# The agent -------------------------------------------------------------------------------------
def test_bad_configs():
    for bad in (dict(max_kl=0.0), dict(cg_damping=-1.0), dict(line_search_shrink=1.0),
                dict(lam=1.5), dict(n_critic_updates=0), dict(cg_iters=0)):
        with pytest.raises(ConfigError):
            trpo.Config(**bad)
    assert trpo.Config.create(env="CartPole-v1").cg_damping == 1e-3


def _short(runs, seed: int) -> Run:
    cfg = trpo.Config(env="CartPole-v1", seed=seed, steps=512, num_envs=2, n_steps=128,
                      batch_size=64, n_critic_updates=2, eval_episodes=2, log_every=256)
    return trpo.train(cfg, Run.create("trpo", cfg, root=runs), progress=False)


def test_same_seed_gives_the_same_run(runs):
    a, b, c = _short(runs, 0), _short(runs, 0), _short(runs, 1)
    ta, tb, tc = (load_tensors(r.path(CHECKPOINT)) for r in (a, b, c))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta if k.startswith("model."))

    def strip(run):
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in run.metrics]

    assert len(strip(a)) == 2 and strip(a) == strip(b)
    assert a.summary()["eval/return_mean"] == b.summary()["eval/return_mean"]


def test_solves_the_identity_task(runs):
    cfg = trpo.Config(env="mlatlas/Identity-v0", steps=2048, num_envs=8, n_steps=64, hidden=32,
                      max_kl=0.05, log_every=2048)
    run = trpo.train(cfg, Run.create("trpo", cfg, root=runs), progress=False)
    assert run.summary()["eval/return_mean"] >= 9.5  # optimum 10, uniform policy 2.5
    # The checkpointed actor is what the shared evaluation loads.
    assert evaluate(run, None, seed=3)["return_mean"] >= 9.5


def test_beats_the_zero_action_on_the_continuous_identity_task(runs):
    cfg = trpo.Config(env="mlatlas/IdentityContinuous-v0", steps=4096, num_envs=8, n_steps=64,
                      hidden=32, max_kl=0.05, log_every=4096)
    run = trpo.train(cfg, Run.create("trpo", cfg, root=runs), progress=False)
    # a = 0 earns -10/3 per episode; the best policy 0.
    assert run.summary()["eval/return_mean"] > -1.0


@pytest.mark.slow
def test_solves_cartpole(runs):
    # Stopping once the last 10 training episodes average 475 can leave the greedy policy short
    # of it (441.6 measured with seed 0); all 10 at 500 leaves it at 500 (seeds 0, 1, 2).
    cfg = trpo.Config.create(env="CartPole-v1", target_return=500.0)
    run = trpo.train(cfg, Run.create("trpo", cfg, root=runs), progress=False)
    summary = run.summary()
    assert "train/solved_env_steps" in summary
    assert summary["eval/return_mean"] >= 475.0
