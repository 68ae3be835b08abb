"""Actor-critic methods (Zhao, Chapter 10): the update rules by hand, the theorems behind them
(baseline invariance, off-policy importance weights, the deterministic policy gradient) checked
exactly, and each method learning the book's grid world or the regulator."""

import json

import pytest
import torch

from mlatlas.cli import main
from mlatlas.core.run import Run
from mlatlas.rl.tabular import actor_critic as ac
from mlatlas.rl.tabular.bellman import action_values, evaluate_closed_form, transition_pi
from mlatlas.rl.tabular.gridworld import GridWorld, uniform_policy

GAMMA = 0.9


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


# The softmax actor and the tabular critic, by hand -------------------------------------------


def test_grad_log_softmax_by_hand():
    # theta[s] = 0: pi(.|s) = 1/5 each, so grad ln pi(a=right|s) = e_right - 1/5.
    pi_s = ac.softmax_policy(torch.zeros(1, 5, dtype=torch.float64))
    g = ac.grad_log_softmax(pi_s, torch.tensor([1]))
    assert torch.allclose(g, f64([[-0.2, 0.8, -0.2, -0.2, -0.2]]))
    # Two actions with preferences (0, ln 3): pi = (1/4, 3/4); grad ln pi(a_1) = (3/4, -3/4).
    pi_s = ac.softmax_policy(f64([[0.0, float(torch.log(f64(3.0)))]]))
    assert torch.allclose(pi_s, f64([[0.25, 0.75]]))
    assert torch.allclose(ac.grad_log_softmax(pi_s, torch.tensor([0])), f64([[0.75, -0.75]]))


def test_grad_log_softmax_closed_form_equals_autograd():
    theta = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    s, a = torch.tensor([0, 3, 3, 5]), torch.tensor([4, 0, 2, 1])
    for i in range(len(s)):
        (grad,) = torch.autograd.grad(ac.log_softmax_policy(theta, s[i:i + 1], a[i:i + 1]).sum(),
                                      theta)
        expected = torch.zeros_like(grad)
        expected[s[i]] = ac.grad_log_softmax(ac.softmax_policy(theta.detach()[s[i:i + 1]]),
                                             a[i:i + 1])[0]
        assert torch.allclose(grad, expected)


def test_td_error_by_hand():
    r, v_next, v = f64([1.0, 1.0]), f64([2.0, 2.0]), f64([0.5, 0.5])
    delta = ac.td_error(r, v_next, v, GAMMA, terminated=torch.tensor([False, True]))
    # 1 + 0.9 * 2 - 0.5 = 2.3; at a terminal s' its value counts as zero: 1 - 0.5.
    assert torch.allclose(delta, f64([2.3, 0.5]))


def test_actor_update_by_hand_averages_samples_that_share_a_state():
    theta = torch.zeros(3, 5, dtype=torch.float64)
    s, a = torch.tensor([0, 2, 2]), torch.tensor([1, 4, 0])
    ac.actor_update(theta, s, a, weight=f64([2.0, 1.0, 3.0]), alpha_theta=0.5)
    e = torch.eye(5, dtype=torch.float64)
    assert torch.allclose(theta[0], 0.5 * 2.0 * (e[1] - 0.2))
    assert torch.equal(theta[1], torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(theta[2], 0.5 * (1.0 * (e[4] - 0.2) + 3.0 * (e[0] - 0.2)) / 2)


def test_critic_update_by_hand():
    v = f64([1.0, 2.0, 3.0])
    ac.critic_update(v, (torch.tensor([0, 0, 2]),), f64([1.0, 3.0, -1.0]), alpha_w=0.1)
    assert torch.allclose(v, f64([1.2, 2.0, 2.9]))
    q = torch.zeros(2, 5, dtype=torch.float64)
    ac.critic_update(q, (torch.tensor([1]), torch.tensor([3])), f64([2.0]), alpha_w=0.5)
    assert q[1, 3] == 1.0 and q.abs().sum() == 1.0


def test_importance_sampling_figure_10_2():
    """Section 10.3.1 / Fig. 10.2: X in {+1, -1}, p0 = (0.5, 0.5), samples from p1 = (0.8, 0.2).
    The plain average tends to E_p1[X] = 0.6, the importance-weighted one to E_p0[X] = 0."""
    x_values, p0, p1 = f64([1.0, -1.0]), f64([0.5, 0.5]), f64([0.8, 0.2])
    # Exactly (eq. 10.9): sum_x p1(x) p0(x)/p1(x) x = E_p0[X].
    assert torch.isclose((p1 * ac.importance_weight(p0, p1) * x_values).sum(), f64(0.0))
    idx = torch.multinomial(p1, 200_000, replacement=True,
                            generator=torch.Generator().manual_seed(0))
    x = x_values[idx]
    assert abs(x.mean().item() - 0.6) < 0.01
    assert abs((ac.importance_weight(p0[idx], p1[idx]) * x).mean().item()) < 0.01
    # The book's warning: p1(+1) = 1 gives the weighted average 0.5 whatever n is.
    assert ac.importance_weight(p0[0], f64(1.0)) * x_values[0] == 0.5


# Theory: the expected updates are the policy gradient ----------------------------------------


def _exact_terms(model, theta, gamma):
    """pi, v_pi, q_pi and the discounted state weights rho = d0^T (I - gamma P_pi)^-1 with d0
    uniform, for which J(theta) = d0^T v_pi has grad J = sum_s rho(s) sum_a grad pi q_pi
    (Theorem 9.2)."""
    pi = ac.softmax_policy(theta)
    v = evaluate_closed_form(model, pi, gamma)
    q = action_values(model, v, gamma)
    n = model.n_states
    d0 = torch.full((n,), 1.0 / n, dtype=torch.float64)
    identity = torch.eye(n, dtype=torch.float64)
    rho = torch.linalg.solve((identity - gamma * transition_pi(model, pi)).T, d0)
    return pi, v, q, rho


def _all_pairs(model):
    s = torch.arange(model.n_states).repeat_interleave(model.n_actions)
    a = torch.arange(model.n_actions).repeat(model.n_states)
    return s, a


def _expected_update(model, pi, rho, s, a, weight, probability):
    """sum over every (s, a) of rho(s) probability(a|s) weight(s, a) grad ln pi(a|s), (S, A)."""
    g = (rho[s] * probability[s, a] * weight)[:, None] * ac.grad_log_softmax(pi[s], a)
    return torch.zeros_like(pi).index_add_(0, s, g)


def test_expected_a2c_and_qac_updates_are_the_exact_policy_gradient_2x2():
    """Eqs. 10.1 and 10.7 on the book's 2x2 world: with the exact critic, the expected QAC step
    (weight q_pi) and the expected A2C step (weight delta = r + gamma v(s') - v(s)) both equal
    grad J(theta), computed here by autograd through v_pi = (I - gamma P_pi)^-1 r_pi."""
    model = GridWorld.parse("2x2").model
    theta = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theta_ = theta.clone().requires_grad_(True)
    pi_, v_, _, _ = _exact_terms(model, theta_, GAMMA)
    d0 = torch.full((4,), 0.25, dtype=torch.float64)
    (grad_j,) = torch.autograd.grad(d0 @ v_, theta_)

    pi, v, q, rho = _exact_terms(model, theta, GAMMA)
    s, a = _all_pairs(model)
    s_next, r, terminated = model.step(s, a)
    delta = ac.td_error(r, v[s_next], v[s], GAMMA, terminated)
    a2c = _expected_update(model, pi, rho, s, a, delta, pi)
    qac = _expected_update(model, pi, rho, s, a, q[s, a], pi)
    assert torch.allclose(a2c, grad_j, atol=1e-12)
    assert torch.allclose(qac, grad_j, atol=1e-12)
    assert grad_j.abs().max() > 0.05  # not a trivially zero gradient


def test_sampled_a2c_updates_average_to_the_policy_gradient():
    """The stochastic update (10.8) is unbiased: actor_update on many samples S ~ rho (normalised),
    A ~ pi, with the TD error of the exact critic, moves theta along grad J / sum(rho)."""
    model = GridWorld.parse("2x2").model
    theta = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pi, v, _, rho = _exact_terms(model, theta, GAMMA)
    s_all, a_all = _all_pairs(model)
    exact = _expected_update(model, pi, rho, s_all, a_all,
                             ac.td_error(*_step_values(model, v, s_all, a_all)), pi)
    generator = torch.Generator().manual_seed(2)
    n = 400_000
    s = torch.multinomial(rho, n, replacement=True, generator=generator)
    a = torch.multinomial(pi[s], 1, generator=generator).squeeze(1)
    # Summing (not averaging per state) keeps each state's share of the samples, i.e. rho(s).
    g = ac.td_error(*_step_values(model, v, s, a))[:, None] * ac.grad_log_softmax(pi[s], a)
    sampled = torch.zeros_like(pi).index_add_(0, s, g) / n
    assert torch.allclose(sampled, exact / rho.sum(), atol=3e-3)


def _step_values(model, v, s, a):
    s_next, r, terminated = model.step(s, a)
    return r, v[s_next], v[s], GAMMA, terminated


def test_baseline_invariance_eq_10_3():
    """E_{A~pi}[grad ln pi(A|s) b(s)] = 0 for any baseline b(s)."""
    theta = torch.randn(6, 5, dtype=torch.float64)
    pi = ac.softmax_policy(theta)
    b = torch.randn(6, dtype=torch.float64)
    s, a = torch.arange(6).repeat_interleave(5), torch.arange(5).repeat(6)
    terms = (pi[s, a] * b[s])[:, None] * ac.grad_log_softmax(pi[s], a)
    assert torch.allclose(torch.zeros(6, 5, dtype=torch.float64).index_add_(0, s, terms),
                          torch.zeros(6, 5, dtype=torch.float64), atol=1e-14)


def test_optimal_baseline_eq_10_5_minimises_the_variance():
    """Box 10.1: tr var(X) with X = grad ln pi(A|s) (q(s, A) - b) is smallest at b*(s); the
    state value v(s) = E_A[q(s, A)] is a different, sub-optimal baseline."""
    pi_s = ac.softmax_policy(f64([[2.0, 0.0, -1.0, 0.5, 1.0]]))
    q_s = f64([[3.0, -1.0, 0.0, 2.0, 5.0]])
    a = torch.arange(5)
    grads = ac.grad_log_softmax(pi_s.expand(5, 5), a)

    def trace_var(b):
        x = grads * (q_s[0] - b)[:, None]
        mean = (pi_s[0][:, None] * x).sum(0)
        return (pi_s[0] * (x ** 2).sum(1)).sum() - mean @ mean

    b_star = ac.optimal_baseline(pi_s, q_s)[0]
    v = (pi_s * q_s).sum()
    for b in (b_star - 0.1, b_star + 0.1, v, f64(0.0)):
        assert trace_var(b_star) < trace_var(b)
    b = b_star.clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(trace_var(b), b)
    assert abs(slope.item()) < 1e-12


def test_importance_weights_make_the_off_policy_update_the_on_policy_one():
    """Theorem 10.1 / Algorithm 10.3: for any behaviour beta > 0,
    E_{A~beta}[pi/beta delta grad ln pi] = E_{A~pi}[delta grad ln pi] at every state, and the
    weighted critic step E_{A~beta}[pi/beta delta] vanishes at v = v_pi (its fixed point), while
    the unweighted one would vanish at v_beta instead."""
    model = GridWorld.parse("book").model
    generator = torch.Generator().manual_seed(3)
    theta = torch.randn(25, 5, dtype=torch.float64, generator=generator)
    pi = ac.softmax_policy(theta)
    s, a = _all_pairs(model)
    ones = torch.ones(25, dtype=torch.float64)
    for beta in (uniform_policy(25),
                 torch.softmax(torch.randn(25, 5, dtype=torch.float64, generator=generator), 1)):
        v_pi = evaluate_closed_form(model, pi, GAMMA)
        delta = ac.td_error(*_step_values(model, v_pi, s, a))
        rho = ac.importance_weight(pi[s, a], beta[s, a])
        off = _expected_update(model, pi, ones, s, a, rho * delta, beta)
        on = _expected_update(model, pi, ones, s, a, delta, pi)
        assert torch.allclose(off, on, atol=1e-12) and on.abs().max() > 0.01

        def critic_drift(v, weight, policy):
            step = policy[s, a] * weight * ac.td_error(*_step_values(model, v, s, a))
            return torch.zeros(25, dtype=torch.float64).index_add_(0, s, step)

        assert critic_drift(v_pi, rho, beta).abs().max() < 1e-12
        v_beta = evaluate_closed_form(model, beta, GAMMA)
        assert critic_drift(v_beta, rho, beta).abs().max() > 0.1
        assert critic_drift(v_beta, torch.ones_like(rho), beta).abs().max() < 1e-12


def test_exact_policy_gradient_plateau_in_the_continuing_world():
    """Why the grid methods default to a terminal target: exact gradient ascent on J(theta)
    (the expected A2C step with the exact critic, no sampling) on the continuing book world
    commits at (1,3) to 'right' while the forbidden cells below are still bad, and then stays:
    'down' is better by 0.37 but pi(down|(1,3)) is so small that its gradient, pi (q - v), loses
    to the one that removes the remaining bad actions."""
    world = GridWorld.parse("book")
    model = world.model
    theta = torch.zeros(25, 5, dtype=torch.float64)
    s, a = _all_pairs(model)
    for _ in range(300):
        pi, v, q, rho = _exact_terms(model, theta, GAMMA)
        delta = ac.td_error(*_step_values(model, v, s, a))
        theta += 25 * _expected_update(model, pi, rho, s, a, delta, pi)
    pi, v, q, _ = _exact_terms(model, theta, GAMMA)
    s13, down, right = world.state(1, 3), 2, 1
    assert q[s13, down] - v[s13] > 0.35 and pi[s13, down] < 1e-3 and pi[s13, right] > 0.99
    from mlatlas.rl.tabular.common import policy_score

    assert policy_score(world, pi, GAMMA)["greedy_value_gap"] == pytest.approx(0.368, abs=1e-3)


# Theory: the deterministic policy gradient on the regulator ----------------------------------


def test_lqr_optimum_solves_the_scalar_riccati_equation():
    """1-D: p = 1 + gamma p - gamma^2 p^2 / (c + gamma p), i.e. gamma p^2 + (c(1 - gamma) -
    gamma) p - c = 0, and mu*(s) = -gamma p / (c + gamma p) s. gamma = 0.9, c = 1: p = 1.5884,
    K = 0.5884."""
    for gamma, c in ((0.9, 1.0), (0.5, 0.1), (0.99, 3.0)):
        theta_star, p_star = ac.lqr_optimal(1, gamma, c)
        b = c * (1 - gamma) - gamma
        p = (-b + (b * b + 4 * gamma * c) ** 0.5) / (2 * gamma)
        assert p_star.item() == pytest.approx(p, rel=1e-10)
        assert theta_star.item() == pytest.approx(-gamma * p / (c + gamma * p), rel=1e-10)
    theta_star, p_star = ac.lqr_optimal(1, 0.9, 1.0)
    assert (round(p_star.item(), 4), round(theta_star.item(), 4)) == (1.5884, -0.5884)


def test_lqr_optimum_is_greedy_for_its_own_q_and_maximises_j():
    theta_star, _ = ac.lqr_optimal(2, GAMMA, 1.0)
    W = ac.lqr_q_matrix(theta_star, GAMMA, 1.0)  # noqa: N806
    s = torch.randn(100, 2, dtype=torch.float64)
    # grad_a q_mu*(s, a) = 0 at a = mu*(s): no action does better than the policy itself.
    grad = ac.grad_a_quadratic_q(W, s, ac.linear_policy(theta_star, s))
    assert grad.abs().max() < 1e-10
    assert ac.lqr_policy_gradient(theta_star, GAMMA, 1.0).abs().max() < 1e-10
    j_star = ac.lqr_objective(theta_star, GAMMA, 1.0)
    for _ in range(20):
        theta = theta_star + 0.05 * torch.randn(2, 2, dtype=torch.float64)
        assert ac.lqr_objective(theta, GAMMA, 1.0) < j_star


def test_deterministic_policy_gradient_matches_finite_differences():
    """Theorem 10.3: E_{S~rho_mu}[grad_theta mu(S) grad_a q_mu(S, a)|a=mu(S)] is grad J(theta)
    for J(theta) = E_{s0~U[-1,1]^2}[v_mu(s0)]; checked by central differences of the closed-form
    J (and by autograd) at a non-symmetric stable gain."""
    theta = f64([[-0.3, 0.1], [0.05, -0.2]])
    grad = ac.lqr_policy_gradient(theta, GAMMA, 1.0)
    eps = 1e-6
    fd = torch.zeros(2, 2, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            e = torch.zeros(2, 2, dtype=torch.float64)
            e[i, j] = eps
            fd[i, j] = (ac.lqr_objective(theta + e, GAMMA, 1.0)
                        - ac.lqr_objective(theta - e, GAMMA, 1.0)) / (2 * eps)
    assert torch.allclose(grad, fd, atol=1e-7)
    theta_ = theta.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(ac.lqr_objective(theta_, GAMMA, 1.0), theta_)
    assert torch.allclose(grad, auto, atol=1e-12)


def test_dpg_actor_step_with_the_exact_critic_samples_the_policy_gradient():
    """With the exact critic W_mu, the actor's direction grad_a q(s, a, W) s^T averaged over
    trajectories from s0 ~ U[-1, 1]^2, weighting step k by gamma^k (the discounted state
    distribution rho_mu of Theorem 10.3), is grad J."""
    theta = f64([[-0.3, 0.1], [0.05, -0.2]])
    W = ac.lqr_q_matrix(theta, GAMMA, 1.0)  # noqa: N806
    generator = torch.Generator().manual_seed(0)
    s = 2 * torch.rand(20_000, 2, dtype=torch.float64, generator=generator) - 1
    total = torch.zeros(2, 2, dtype=torch.float64)
    for k in range(120):
        grad_a_q = ac.grad_a_quadratic_q(W, s, ac.linear_policy(theta, s))
        total += GAMMA ** k * grad_a_q.T @ s / s.shape[0]
        s = s + ac.linear_policy(theta, s)
    assert torch.allclose(total, ac.lqr_policy_gradient(theta, GAMMA, 1.0), rtol=0.03)


def test_exact_q_is_the_critic_fixed_point():
    """q_mu is exactly quadratic: its TD error (target action mu(s'), Algorithm 10.4) is zero
    for any (s, a), whichever behaviour chose a."""
    theta = f64([[-0.3, 0.1], [0.05, -0.2]])
    W = ac.lqr_q_matrix(theta, GAMMA, 2.0)  # noqa: N806
    s, a = torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    s_next, r = ac.lqr_step(s, a, 2.0)
    delta = ac.td_error(r, ac.quadratic_q(W, s_next, ac.linear_policy(theta, s_next)),
                        ac.quadratic_q(W, s, a), GAMMA)
    assert delta.abs().max() < 1e-10


def test_dpg_updates_by_hand():
    W = f64([[1.0, 0.0], [0.0, 2.0]])  # noqa: N806
    s, a = f64([[1.0]]), f64([[3.0]])
    assert ac.quadratic_q(W, s, a).item() == 19.0  # 1 + 2 * 9
    assert ac.grad_a_quadratic_q(W, s, a).item() == 12.0  # 2 * 2 * 3
    theta = f64([[0.5]])
    ac.dpg_actor_update(theta, f64([[2.0], [1.0]]), f64([[3.0], [-2.0]]), alpha_theta=0.1)
    assert theta.item() == pytest.approx(0.5 + 0.1 * (3 * 2 - 2 * 1) / 2)
    W = torch.zeros(2, 2, dtype=torch.float64)  # noqa: N806
    ac.dpg_critic_update(W, f64([[1.0]]), f64([[2.0]]), f64([1.0]), alpha_w=0.5)
    assert torch.equal(W, f64([[0.5, 1.0], [1.0, 2.0]]))
    s_next, r = ac.lqr_step(f64([[1.0, -1.0]]), f64([[0.5, 0.5]]), 2.0)
    assert torch.equal(s_next, f64([[1.5, -0.5]])) and r.item() == -(2 + 2 * 0.5)


# Behaviour -----------------------------------------------------------------------------------


@pytest.fixture
def no_figures(runs, monkeypatch):
    """Behaviour tests check numbers: skip drawing (the smoke tests check the figures)."""
    monkeypatch.chdir(runs.parent)
    monkeypatch.setattr(Run, "save_figure", lambda self, fig, name: None)
    monkeypatch.setattr("mlatlas.rl.tabular.common.grid_figure", lambda *args, **kwargs: None)
    for name in ("_trajectories", "_lqr_figure"):
        monkeypatch.setattr(ac, name, lambda *args, **kwargs: None)


def _train(name, cfg):
    train = {"qac_tabular": ac.train_qac_tabular, "a2c_tabular": ac.train_a2c_tabular,
             "off_policy_ac_tabular": ac.train_off_policy_ac_tabular,
             "deterministic_ac": ac.train_deterministic_ac}[name]
    return train(cfg, progress=False)


@pytest.mark.parametrize("name,cls", [("a2c_tabular", ac.A2CConfig),
                                      ("off_policy_ac_tabular", ac.OffPolicyACConfig),
                                      ("qac_tabular", ac.QACConfig)])
def test_grid_methods_reach_the_optimal_policy(name, cls, no_figures):
    """Default settings (episodic book world, target terminal) learn an optimal greedy policy."""
    cfg = cls(log_every=500)
    summary = _train(name, cfg).summary()
    assert summary["eval/policy_optimal"], summary
    assert summary["eval/mean_value_optimal"] - summary["eval/mean_value_pi"] < 0.02


def test_continuing_world_stalls_at_a_measured_gap(no_figures):
    """With a non-terminal target the softmax actor stalls: off-policy actor-critic (whose uniform
    behaviour gives an exact critic) leaves the top row avoiding the shortcut through the
    forbidden cells (gap 0.368, measured on seeds 0-3); the plateau test above shows why."""
    summary = _train("off_policy_ac_tabular",
                     ac.OffPolicyACConfig(terminal_target=False, log_every=500)).summary()
    assert summary["eval/greedy_value_gap"] < 0.37
    assert summary["eval/critic_value_error"] < 0.05
    assert summary["eval/mean_value_optimal"] - summary["eval/mean_value_pi"] < 0.04


def test_deterministic_ac_learns_the_optimal_gain(no_figures):
    summary = _train("deterministic_ac", ac.DeterministicACConfig(log_every=500)).summary()
    assert summary["eval/theta_error"] < 0.02, summary
    assert summary["eval/objective_gap"] < 1e-3
    assert summary["eval/critic_error"] < 0.1


# Command line and resume ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qac_tabular", "a2c_tabular", "off_policy_ac_tabular"])
def test_cli_smoke_grid(name, runs):
    assert main(["train", name, "--steps", "60", "--log-every", "20", "--out", str(runs),
                 "--no-progress"]) == 0
    (path,) = runs.iterdir()
    for file in ("values.csv", "policy.csv", "values.png", "trajectories.png", "summary.json"):
        assert (path / file).is_file(), file
    summary = json.loads((path / "summary.json").read_text())
    assert {"eval/greedy_value_gap", "eval/policy_optimal",
            "eval/critic_value_error"} <= set(summary)
    assert "value_error" in Run.open(path).metrics[-1]


def test_cli_smoke_deterministic_ac(runs):
    assert main(["train", "deterministic_ac", "--steps", "60", "--log-every", "20", "--dim", "1",
                 "--out", str(runs), "--no-progress"]) == 0
    (path,) = runs.iterdir()
    assert (path / "policy.png").is_file()
    summary = json.loads((path / "summary.json").read_text())
    assert {"eval/objective_gap", "eval/theta_error", "train/theta"} <= set(summary)
    assert ac.evaluate_deterministic_ac(Run.open(path), 0, 0)["theta_error"] == \
        pytest.approx(summary["eval/theta_error"])


@pytest.mark.parametrize("name,cls", [("off_policy_ac_tabular", ac.OffPolicyACConfig),
                                      ("deterministic_ac", ac.DeterministicACConfig)])
def test_resume_equals_an_uninterrupted_run(name, cls, runs, no_figures):
    full = _run(name, cls(steps=90, log_every=10, ckpt_every=30), runs / "full")
    part = _run(name, cls(steps=40, log_every=10, ckpt_every=30), runs / "part")
    resumed = Run.open(part.dir)
    resumed.config["steps"] = 90
    _train_into(name, cls(steps=90, log_every=10, ckpt_every=30), resumed)
    for key, value in _tables(full).items():
        assert torch.equal(value, _tables(resumed)[key]), key
    def rows(run):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in run.metrics]

    assert rows(full) == rows(resumed)


def _run(name, cfg, root):
    run = Run.create(name, cfg, root=root)
    return _train_into(name, cfg, run)


def _train_into(name, cfg, run):
    train = {"off_policy_ac_tabular": ac.train_off_policy_ac_tabular,
             "deterministic_ac": ac.train_deterministic_ac}[name]
    return train(cfg, run, progress=False)


def _tables(run):
    from mlatlas.core.io import load_tensors

    return load_tensors(run.path("checkpoint.safetensors"))


def test_configs_reject_bad_values():
    from mlatlas.core.config import ConfigError

    with pytest.raises(ConfigError, match="--alpha-theta must be positive"):
        ac.A2CConfig(alpha_theta=0)
    with pytest.raises(ConfigError, match="--num-envs must be at least 1"):
        ac.QACConfig(num_envs=0)
    with pytest.raises(ConfigError, match="--sigma must be non-negative"):
        ac.DeterministicACConfig(sigma=-1)
    with pytest.raises(ConfigError, match="--gamma"):
        ac.DeterministicACConfig(gamma=1.0)
