"""Temporal-difference learning (Zhao, Chapter 7): the targets worked by hand, the fixed points
of the expected updates, the batched loops against the book's single-stream algorithm boxes,
and the book's examples (Figs. 7.2, 7.3, 7.4)."""

import json
import re

import pytest
import torch

from mlatlas.cli import main
from mlatlas.core.config import ConfigError
from mlatlas.core.io import load_tensors
from mlatlas.core.run import CHECKPOINT, Run
from mlatlas.rl.tabular import td
from mlatlas.rl.tabular.bellman import (
    action_values,
    evaluate_closed_form,
    exact_values,
    value_iteration,
)
from mlatlas.rl.tabular.gridworld import (
    GridWorld,
    epsilon_greedy_policy,
    greedy_path,
    greedy_policy,
    parse_policy,
    sample_actions,
    uniform_policy,
)

GAMMA = 0.9
# The path-finding task of Figs. 7.2 and 7.3.
PATH_REWARDS = dict(r_boundary=-10.0, r_forbidden=-10.0, r_target=0.0, r_other=-1.0,
                    terminal_target=True)
# Fig. 7.4(b) (= Fig. 3.4a): optimal state values, rows 1 to 5.
FIG_7_4_B = [5.8, 5.6, 6.2, 6.5, 5.8, 6.5, 7.2, 8.0, 7.2, 6.5, 7.2, 8.0, 10.0, 8.0, 7.2,
             8.0, 10.0, 10.0, 10.0, 8.0, 7.2, 9.0, 10.0, 9.0, 8.1]


def t64(*values):
    return torch.tensor(values, dtype=torch.float64)


def tables_of(run: Run) -> dict[str, torch.Tensor]:
    """The method's tables (q, pi or v) and its other tensor state (counts, behaviour)."""
    tensors = load_tensors(run.path(CHECKPOINT))
    return {k.split(".", 1)[1]: v for k, v in tensors.items()
            if k.split(".", 1)[0] in ("model", "counts", "behaviour")}


# Update rules worked by hand -------------------------------------------------------------------


def test_td_update_eq_7_1_by_hand():
    v = t64(0.0, 2.0, 5.0)
    vbar = td.td_target(t64(1.0), v[[1]], GAMMA)
    assert vbar.item() == pytest.approx(1.0 + 0.9 * 2.0)
    delta = td.td_update(v, (torch.tensor([0]),), vbar, alpha=0.1)
    # delta_t = v_t(s_t) - vbar_t (eq. 7.6); only s_t moves (eq. 7.2).
    assert delta.item() == pytest.approx(-2.8)
    torch.testing.assert_close(v, t64(0.28, 2.0, 5.0))
    # Section 7.1.2: |v_{t+1}(s_t) - vbar_t| = (1 - alpha) |v_t(s_t) - vbar_t|.
    assert abs(v[0].item() - 2.8) == pytest.approx(0.9 * 2.8)


def test_td_update_averages_the_samples_of_one_entry():
    q = torch.zeros(2, 2, dtype=torch.float64)
    index = (torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]))
    delta = td.td_update(q, index, t64(1.0, 3.0, -1.0), alpha=0.5)
    assert delta.tolist() == [-1.0, -3.0, 1.0]
    # (1, 0) moves by alpha times the mean correction (1 + 3) / 2.
    assert q.tolist() == [[0.0, -0.5], [1.0, 0.0]]


def test_td_targets_of_table_7_2_by_hand():
    r, q_row = t64(-1.0), t64(1, 2, 3, 4, 5)[None]
    assert td.sarsa_target(r, t64(3.0), GAMMA).item() == pytest.approx(-1 + 0.9 * 3)
    assert td.q_learning_target(r, q_row, GAMMA).item() == pytest.approx(-1 + 0.9 * 5)
    # Expected Sarsa under the epsilon-greedy policy of the row (eps 0.1): 0.92 on a = 5.
    pi_row = epsilon_greedy_policy(q_row, 0.1)
    expected = -1 + 0.9 * (0.92 * 5 + 0.02 * (1 + 2 + 3 + 4))
    assert td.expected_sarsa_target(r, q_row, pi_row, GAMMA).item() == pytest.approx(expected)
    # n-step (eq. 7.17), n = 3: r1 + g r2 + g^2 r3 + g^3 q(s3, a3); no bootstrap after the end.
    rewards = t64(-1.0, -1.0, 0.0)[:, None]
    assert td.n_step_target(rewards, t64(5.0), GAMMA, torch.tensor([True])).item() == \
        pytest.approx(-1 - 0.9 + 0.729 * 5)
    assert td.n_step_target(rewards, t64(5.0), GAMMA, torch.tensor([False])).item() == \
        pytest.approx(-1.9)
    # Into a terminal state nothing is bootstrapped.
    done = torch.tensor([True])
    for value in (td.sarsa_target(r, t64(3.0), GAMMA, done),
                  td.q_learning_target(r, q_row, GAMMA, done),
                  td.expected_sarsa_target(r, q_row, pi_row, GAMMA, done)):
        assert value.item() == -1.0


def test_n_step_target_with_n_1_is_the_sarsa_target():
    g = torch.Generator().manual_seed(0)
    r, q_next = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g,
                                                                              dtype=torch.float64)
    done = torch.rand(50, generator=g) < 0.3
    assert torch.equal(td.n_step_target(r[None], q_next, GAMMA, ~done),
                       td.sarsa_target(r, q_next, GAMMA, done))


def test_expected_sarsa_target_is_the_mean_sarsa_target_box_7_4():
    g = torch.Generator().manual_seed(1)
    q_row = torch.randn(7, 5, generator=g, dtype=torch.float64)
    pi_row = torch.softmax(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
    r = torch.randn(7, generator=g, dtype=torch.float64)
    # sum_a pi(a|s') qbar_sarsa(a) = r + gamma sum_a pi(a|s') q(s', a).
    mean = sum(pi_row[:, a] * td.sarsa_target(r, q_row[:, a], GAMMA) for a in range(5))
    torch.testing.assert_close(td.expected_sarsa_target(r, q_row, pi_row, GAMMA), mean)


def test_step_sizes_meet_robbins_monro_for_exponents_in_half_to_one():
    visits = torch.tensor([0, 1, 4, 100])
    torch.testing.assert_close(td.step_sizes(1.0, visits, 0.5), t64(1.0, 1.0, 0.5, 0.1))
    assert td.step_sizes(0.1, visits, 0.0).tolist() == [0.1] * 4


# Fixed points of the expected updates ----------------------------------------------------------


def expected_over_actions(pi, per_action):
    return (pi * per_action).sum(dim=1)


@pytest.mark.parametrize("policy", ["uniform", "rrrrd/uuurd/ulrrd/urslu/urulu"])
def test_v_pi_is_the_fixed_point_of_the_expected_td0_update_eq_7_4(policy):
    world = GridWorld.parse("book")
    model, pi = world.model, parse_policy(policy, world)
    v_pi = evaluate_closed_form(model, pi, GAMMA)
    # E[vbar_t | s_t = s] = sum_a pi(a|s) [r(s, a) + gamma v(s'(s, a))]
    def expected_target(v):
        return expected_over_actions(pi, td.td_target(model.reward, v[model.next_state], GAMMA))

    torch.testing.assert_close(expected_target(v_pi), v_pi, atol=1e-10, rtol=0)
    # Elsewhere the expected target is a gamma-contraction towards v_pi (Box 7.2, eq. 7.11).
    for seed in range(3):
        v = v_pi + torch.randn(25, generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64)
        lhs = (expected_target(v) - v_pi).abs().max()
        assert 0 < lhs <= GAMMA * (v - v_pi).abs().max() + 1e-12


@pytest.mark.parametrize("rewards", [{}, PATH_REWARDS], ids=["fig_7_4", "fig_7_3"])
def test_q_star_is_the_fixed_point_of_q_learning_eq_7_19(rewards):
    model = GridWorld.parse("book", **rewards).model
    v_star, _, _ = value_iteration(model, GAMMA, tol=1e-13)
    q_star = action_values(model, v_star, GAMMA)
    terminated = model.terminal[model.next_state]
    target = td.q_learning_target(model.reward, q_star[model.next_state], GAMMA, terminated)
    torch.testing.assert_close(target, q_star, atol=1e-10, rtol=0)
    # q_pi of a policy that is not optimal is not (Q-learning solves the optimality equation).
    uniform = uniform_policy(25)
    q_pi = action_values(model, evaluate_closed_form(model, uniform, GAMMA), GAMMA)
    target = td.q_learning_target(model.reward, q_pi[model.next_state], GAMMA, terminated)
    assert (target - q_pi).abs().max() > 0.1


def test_q_pi_is_the_fixed_point_of_sarsa_and_expected_sarsa_eq_7_13():
    model = GridWorld.parse("book", **PATH_REWARDS).model
    pi = epsilon_greedy_policy(torch.randn(25, 5, generator=torch.Generator().manual_seed(0),
                                           dtype=torch.float64), 0.2)
    q_pi = action_values(model, evaluate_closed_form(model, pi, GAMMA), GAMMA)
    s_next, terminated = model.next_state, model.terminal[model.next_state]
    target = td.expected_sarsa_target(model.reward, q_pi[s_next], pi[s_next], GAMMA, terminated)
    torch.testing.assert_close(target, q_pi, atol=1e-10, rtol=0)


def test_fig_7_2_task_optimal_path_has_eleven_steps():
    """From the top-left cell the best path avoids every forbidden cell: 10 moves at -1 and the
    move into the target at 0, v*(s0) = -(1 - 0.9^10) / 0.1."""
    model = GridWorld.parse("book", **PATH_REWARDS).model
    v_star, _, _ = value_iteration(model, GAMMA, tol=1e-13)
    assert v_star[0].item() == pytest.approx(-(1 - 0.9 ** 10) / 0.1)
    q_star = action_values(model, v_star, GAMMA)
    assert len(greedy_path(model, q_star, 0, 25)) - 1 == 11


@pytest.mark.parametrize("rewards", [{}, PATH_REWARDS])
def test_greedy_start_value_is_the_exact_value_of_the_greedy_policy(rewards):
    model = GridWorld.parse("book", **rewards).model
    for seed in range(4):
        q = torch.randn(25, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        exact = exact_values(model, greedy_policy(q), GAMMA)
        values = [td.greedy_start_value(model, q, s, GAMMA) for s in range(25)]
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), exact,
                                   atol=1e-10, rtol=0)


# The batched loops with one stream are the book's algorithms ------------------------------------


def draw(pi, s, generator):
    return int(sample_actions(pi, torch.tensor([s]), generator))


def reference_control(kind, model, episodes, *, s0=0, alpha=0.1, epsilon=0.1, seed=0):
    """Algorithm 7.1 (Sarsa, Expected Sarsa) or 7.2 (Q-learning), one sample at a time."""
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(model.n_states, model.n_actions, dtype=torch.float64)
    pi = uniform_policy(model.n_states)
    for _ in range(episodes):
        s = s0
        a = draw(pi, s, g) if kind == "sarsa" else None
        while True:
            if kind != "sarsa":
                a = draw(pi, s, g)
            s_next, r = int(model.next_state[s, a]), model.reward[s, a]
            end = bool(model.terminal[s_next])
            if kind == "sarsa":
                a_next = draw(pi, s_next, g)
                following = q[s_next, a_next]
            elif kind == "expected_sarsa":
                following = (pi[s_next:s_next + 1] * q[s_next:s_next + 1]).sum(dim=-1)[0]
            else:
                following = q[s_next].max()
            target = r + GAMMA * (0.0 if end else following)
            q[s, a] = q[s, a] - alpha * (q[s, a] - target)
            pi[s] = epsilon_greedy_policy(q[s:s + 1], epsilon)[0]
            if end:
                break
            s = s_next
            if kind == "sarsa":
                a = a_next
    return q, pi


TRAIN = {"sarsa": (td.SarsaConfig, td.train_sarsa),
         "expected_sarsa": (td.ExpectedSarsaConfig, td.train_expected_sarsa),
         "q_learning": (td.QLearningConfig, td.train_q_learning),
         "n_step_sarsa": (td.NStepSarsaConfig, td.train_n_step_sarsa)}


def train(name, runs, **fields):
    config_cls, train_fn = TRAIN[name]
    cfg = config_cls(**fields)
    return train_fn(cfg, Run.create(name, cfg, root=runs), progress=False)


@pytest.mark.parametrize("name", ["sarsa", "expected_sarsa", "q_learning"])
def test_one_stream_is_algorithm_7_1_or_7_2_exactly(name, runs):
    run = train(name, runs, steps=3)
    q, pi = reference_control(name, GridWorld.parse("book", **PATH_REWARDS).model, 3)
    tables = tables_of(run)
    assert torch.equal(tables["q"], q) and torch.equal(tables["pi"], pi)


def reference_n_step_sarsa(model, episodes, n, *, alpha=0.1, epsilon=0.1, seed=0):
    """n-step Sarsa (eq. 7.17) in Algorithm 7.1's loop, one sample at a time: (s_t, a_t) is
    updated once r_{t+1..t+n} and (s_{t+n}, a_{t+n}) are known, or the episode has ended."""
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(model.n_states, model.n_actions, dtype=torch.float64)
    pi = uniform_policy(model.n_states)
    for _ in range(episodes):
        states, actions, rewards, end, t = [0], [draw(pi, 0, g)], [], None, 0
        while True:
            if end is None:
                s, a = states[t], actions[t]
                states.append(int(model.next_state[s, a]))
                rewards.append(model.reward[s, a].item())
                actions.append(draw(pi, states[-1], g))
                if model.terminal[states[-1]]:
                    end = t + 1
            u = t - n + 1
            if u >= 0:
                last = u + n if end is None else min(u + n, end)
                g_u = sum(GAMMA ** (i - u) * rewards[i] for i in range(u, last))
                if end is None or u + n < end:
                    g_u += GAMMA ** n * q[states[u + n], actions[u + n]].item()
                s, a = states[u], actions[u]
                q[s, a] = q[s, a] - alpha * (q[s, a] - g_u)
                pi[s] = epsilon_greedy_policy(q[s:s + 1], epsilon)[0]
                if end is not None and u == end - 1:
                    break
            t += 1
    return q, pi


def test_one_stream_n_step_sarsa_is_eq_7_17_in_algorithm_7_1(runs):
    run = train("n_step_sarsa", runs, steps=3, n=4)
    q, pi = reference_n_step_sarsa(GridWorld.parse("book", **PATH_REWARDS).model, 3, 4)
    tables = tables_of(run)
    torch.testing.assert_close(tables["q"], q, atol=1e-12, rtol=0)
    assert torch.equal(tables["pi"].argmax(1), pi.argmax(1))


def test_n_step_sarsa_with_n_1_is_sarsa(runs):
    # Episodes cut at 60 steps exercise the truncation path too.
    fields = dict(steps=4, num_envs=3, log_every=1, max_episode_length=60)
    one_step = train("n_step_sarsa", runs, n=1, **fields)
    sarsa = train("sarsa", runs, **fields)
    assert all(torch.equal(a, b) for a, b in zip(tables_of(one_step).values(),
                                                 tables_of(sarsa).values(), strict=True))
    def rows(run):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in run.metrics]

    assert rows(one_step) == rows(sarsa)


def test_one_stream_off_policy_q_learning_is_algorithm_7_3(runs):
    cfg = td.QLearningOffPolicyConfig(steps=3, segment_length=400)
    run = td.train_q_learning_off_policy(cfg, Run.create("x", cfg, root=runs), progress=False)
    model = GridWorld.parse("book").model
    g = torch.Generator().manual_seed(0)
    q, pi_b, s = torch.zeros(25, 5, dtype=torch.float64), uniform_policy(25), 0
    for _ in range(1200):
        a = draw(pi_b, s, g)
        s_next = int(model.next_state[s, a])
        q[s, a] = q[s, a] - 0.1 * (q[s, a] - (model.reward[s, a] + GAMMA * q[s_next].max()))
        s = s_next
    assert torch.equal(tables_of(run)["q"], q)


# Behaviour: the methods learn ------------------------------------------------------------------


def test_td0_converges_to_v_pi_of_the_uniform_policy(runs):
    """Theorem 7.1 with alpha_t(s) = n_t(s)^-0.6: the error to the exact v_pi keeps falling."""
    cfg = td.TD0Config(steps=20, log_every=5)
    run = td.train_td0(cfg, Run.create("td0", cfg, root=runs), progress=False)
    errors = [row["value_error_max"] for row in run.metrics]
    summary = run.summary()
    # Measured (seed 0): 0.57 after 5 steps, 0.054 after 20; v_pi lies in [-4.5, -2.9].
    assert errors[0] > 0.3 and summary["eval/value_error_max"] < 0.1
    assert summary["eval/value_error_rms"] < 0.05 and summary["train/transitions"] == 20 * 250 * 100


def test_td0_evaluates_a_deterministic_policy_fig_2_4(runs):
    """The 2x2 world, policy 'dd/rs': v_pi = (9, 10, 10, 10) (Fig. 2.4); every state is a start,
    and with neither the policy nor the model random a constant alpha converges (to 3e-9)."""
    cfg = td.TD0Config(grid="2x2", policy="dd/rs", num_envs=8, episode_length=20, steps=40,
                       alpha_exponent=0.0, alpha=0.5)
    run = td.train_td0(cfg, Run.create("td0", cfg, root=runs), progress=False)
    values = [float(x) for line in run.path("values.csv").read_text().split() for x in
              line.split(",")]
    assert values == pytest.approx([9.0, 10.0, 10.0, 10.0], abs=1e-6)


@pytest.mark.parametrize("name", ["sarsa", "expected_sarsa", "n_step_sarsa", "q_learning"])
def test_control_finds_the_optimal_path_of_fig_7_2(name, runs):
    """The task of Figs. 7.2/7.3 with 10 streams side by side and epsilon decaying by 0.98 per
    episode (Section 7.2.2's remedy). The criterion is the path from the start cell: the greedy
    policy's exact v(s0) equals v*(s0) (11 steps around the forbidden cells); states off that
    path need not be optimal, as the book notes. Measured over seeds 0-2: the path stays optimal
    from episode 58-122 (Sarsa), 55-70 (Expected Sarsa), 23-48 (3-step Sarsa), 63-76 (Q-learning)
    of 150; 18-23 of the 25 states end optimal."""
    run = train(name, runs, num_envs=10, steps=150, epsilon_decay=0.98)
    summary = run.summary()
    assert summary["eval/start_state_optimal"] and summary["eval/path_length"] == 11
    assert summary["eval/start_value"] == pytest.approx(-(1 - 0.9 ** 10) / 0.1)
    assert summary["eval/states_optimal"] >= 15
    # The book's right-hand panels: episodes get shorter and total rewards larger.
    first, last = run.metrics[0], run.metrics[-1]
    assert last["episode_length"] < 15 < first["episode_length"]
    assert last["return"] > -15 > first["return"]


def test_off_policy_q_learning_from_uniform_behaviour_fig_7_4(runs):
    """Fig. 7.4 with 10 behaviour episodes side by side (10 x 5,000 steps): the greedy target
    policy is optimal at every state and the RMS state-value error falls every segment."""
    cfg = td.QLearningOffPolicyConfig(num_envs=10, steps=5)
    run = td.train_q_learning_off_policy(cfg, Run.create("x", cfg, root=runs), progress=False)
    errors = [row["value_error_rms"] for row in run.metrics]
    assert all(b < 0.6 * a for a, b in zip(errors, errors[1:], strict=False))
    summary = run.summary()
    # Measured (seeds 0, 1): RMS error 3.8-4.6 after 10,000 steps, 0.18-0.28 after 50,000.
    assert summary["eval/policy_optimal"] and summary["eval/value_error_rms"] < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("q0,first,steps_to_0_1", [(0.0, (6, 9), 60), (10.0, (1.5, 3), 12),
                                                   (100.0, (80, 95), 95)])
def test_book_single_episode_of_100000_steps_fig_7_4_f_g_h(q0, first, steps_to_0_1, runs):
    """The book's run exactly: one episode of 100,000 steps of the uniform policy, alpha 0.1,
    q_0 = 0, 10, 100 (Fig. 7.4 f, g, h). The learned greedy policy is optimal and the RMS error
    of max_a q(s, a) against v* ends near zero. Measured (seed 0), RMS error after the first
    1,000 steps and the thousands of steps until it is below 0.1: q_0 = 0: 7.7, 53; q_0 = 10:
    2.3, 10 (the book: "within approximately 10,000 steps"); q_0 = 100: 87.9, 88."""
    cfg = td.QLearningOffPolicyConfig(q0=q0)
    run = td.train_q_learning_off_policy(cfg, Run.create("x", cfg, root=runs), progress=False)
    errors = [row["value_error_rms"] for row in run.metrics]
    assert first[0] < errors[0] < first[1]
    below = next(i + 1 for i, e in enumerate(errors) if e < 0.1)
    assert below <= steps_to_0_1  # thousands of steps
    summary = run.summary()
    assert summary["eval/policy_optimal"] and summary["eval/value_error_rms"] < 0.05
    if q0 == 0.0:
        values = [float(x) for line in run.path("values.csv").read_text().split()
                  for x in line.split(",")]
        assert [round(v, 1) for v in values] == FIG_7_4_B


@pytest.mark.slow
def test_less_exploratory_behaviour_learns_slower_fig_7_5(runs):
    """Fig. 7.5: behaviour policies epsilon-greedy around an optimal policy, epsilon 0.5 and 0.1,
    one episode of 100,000 steps. Measured (seed 0) final RMS error: 0.003 for the uniform
    policy (epsilon 1), 0.31 for epsilon 0.5, 4.3 for epsilon 0.1 (whose greedy policy is still
    not optimal)."""
    errors = {}
    for epsilon in (0.5, 0.1):
        cfg = td.QLearningOffPolicyConfig(behavior_policy="drddd/ddddd/rrddd/rrsll/urull",
                                          behavior_epsilon=epsilon)
        run = td.train_q_learning_off_policy(cfg, Run.create("x", cfg, root=runs),
                                             progress=False)
        errors[epsilon] = run.summary()["eval/value_error_rms"]
    assert 0.05 < errors[0.5] < 1.0 and errors[0.1] > 2.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sarsa", "expected_sarsa", "n_step_sarsa", "q_learning"])
def test_book_settings_of_figs_7_2_and_7_3(name, runs):
    """The defaults are the book's run: one stream, 500 episodes, alpha = epsilon = 0.1. With a
    constant epsilon the Sarsa family's greedy path still switches late in the run (Sarsa learns
    the values of its noisy epsilon-greedy policy, and the path through one forbidden cell is
    close in value under it); at seed 0 all four end on an optimal path."""
    run = train(name, runs)
    summary = run.summary()
    assert summary["eval/start_state_optimal"] and summary["eval/path_length"] == 11
    # Fig. 7.2's right-hand panels: the last 50 episodes are short (measured means 12.0-17.1
    # steps; the optimal path has 11), less than half the first 5 (36.6-85.2).
    lengths = [row["episode_length"] for row in run.metrics]
    late = sum(lengths[-10:]) / 10
    assert late < 20 and late < lengths[0] / 2


# Command line, resume, config checks ------------------------------------------------------------

CUT = ["--max-episode-length", "40"]
SMOKE = {"td0": ["--steps", "2", "--num-envs", "10", "--episode-length", "20"],
         "sarsa": ["--steps", "3", *CUT], "expected_sarsa": ["--steps", "3", *CUT],
         "n_step_sarsa": ["--steps", "3", "--n", "2", *CUT], "q_learning": ["--steps", "3", *CUT],
         "q_learning_off_policy": ["--steps", "2", "--segment-length", "100"]}


@pytest.mark.parametrize("name", SMOKE)
def test_cli_trains_and_writes_the_run_files(name, runs):
    assert main(["train", name, *SMOKE[name], "--out", str(runs), "--no-progress"]) == 0
    (path,) = runs.iterdir()
    for file in ("values.csv", "policy.csv", "values.png", "summary.json", "metrics.csv"):
        assert (path / file).stat().st_size > 0, file
    assert len((path / "values.csv").read_text().splitlines()) == 5
    summary = json.loads((path / "summary.json").read_text())
    assert ("eval/greedy_value_gap" in summary) == (name != "td0")
    if name != "td0":
        assert (path / "trajectories.png").is_file()


RESUME = {"n_step_sarsa": ["--num-envs", "2", "--n", "3", "--log-every", "1",
                           "--ckpt-every", "2", *CUT],
          "q_learning_off_policy": ["--num-envs", "3", "--segment-length", "50",
                                    "--ckpt-every", "2"]}


@pytest.mark.parametrize("name", RESUME)
def test_resumed_run_equals_an_uninterrupted_one(name, runs):
    flags = [*RESUME[name], "--no-progress"]
    assert main(["train", name, "--steps", "3", *flags, "--out", str(runs / "a")]) == 0
    (stopped,) = (runs / "a").iterdir()
    assert main(["train", "--resume", str(stopped), "--steps", "6", "--no-progress"]) == 0
    assert main(["train", name, "--steps", "6", *flags, "--out", str(runs / "b")]) == 0
    (straight,) = (runs / "b").iterdir()
    resumed, uninterrupted = tables_of(Run.open(stopped)), tables_of(Run.open(straight))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert (stopped / "values.csv").read_text() == (straight / "values.csv").read_text()


@pytest.mark.parametrize("config,fields,message", [
    (td.SarsaConfig, {"epsilon": 1.5}, "--epsilon must be in [0, 1]"),
    (td.QLearningConfig, {"alpha": 0.0}, "--alpha must be in (0, 1]"),
    (td.SarsaConfig, {"start_row": 4, "start_col": 3}, "is the target"),
    (td.SarsaConfig, {"start_row": 6}, "outside the 5x5 grid"),
    (td.NStepSarsaConfig, {"n": 0}, "--n must be at least 1"),
    (td.TD0Config, {"policy": "up"}, "cannot read policy"),
    (td.TD0Config, {"alpha_exponent": -1.0}, "--alpha-exponent must be >= 0"),
    (td.QLearningOffPolicyConfig, {"behavior_epsilon": 2.0}, "--behavior-epsilon"),
])
def test_configs_reject_bad_values(config, fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config(**fields)
