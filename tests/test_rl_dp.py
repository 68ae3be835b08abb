"""Bellman equation (Zhao ch. 2-3) and dynamic programming (ch. 4) against the book's numbers."""

import json

import pytest
import torch

from mlatlas.cli import main
from mlatlas.core.run import Run
from mlatlas.rl.tabular.bellman import (
    action_values,
    bellman_optimality_backup,
    evaluate_closed_form,
    evaluate_iterative,
    transition_pi,
    value_iteration,
)
from mlatlas.rl.tabular.common import policy_score
from mlatlas.rl.tabular.dp import (
    BellmanConfig,
    policy_iteration,
    policy_iteration_step,
    truncated_policy_iteration,
    value_iteration_step,
)
from mlatlas.rl.tabular.gridworld import GridWorld, deterministic_policy, parse_policy

# Figure 3.4 of the book: optimal state values, rows 1 to 5, to one decimal.
FIG_3_4 = {
    "a (gamma 0.9)": (0.9, -1.0, "5.8 5.6 6.2 6.5 5.8 / 6.5 7.2 8.0 7.2 6.5 / "
                      "7.2 8.0 10.0 8.0 7.2 / 8.0 10.0 10.0 10.0 8.0 / 7.2 9.0 10.0 9.0 8.1"),
    "b (gamma 0.5)": (0.5, -1.0, "0.0 0.0 0.0 0.0 0.0 / 0.0 0.0 0.0 0.0 0.1 / "
                      "0.0 0.0 2.0 0.1 0.1 / 0.0 2.0 2.0 2.0 0.2 / 0.0 1.0 2.0 1.0 0.5"),
    "c (gamma 0)": (0.0, -1.0, "0.0 0.0 0.0 0.0 0.0 / 0.0 0.0 0.0 0.0 0.0 / "
                    "0.0 0.0 1.0 0.0 0.0 / 0.0 1.0 1.0 1.0 0.0 / 0.0 0.0 1.0 0.0 0.0"),
    "d (r_forbidden -10)": (0.9, -10.0, "3.5 3.9 4.3 4.8 5.3 / 3.1 3.5 4.8 5.3 5.9 / "
                            "2.8 2.5 10.0 5.9 6.6 / 2.5 10.0 10.0 10.0 7.3 / "
                            "2.3 9.0 10.0 9.0 8.1"),
}


def golden(text):
    return torch.tensor([float(x) for x in text.replace("/", " ").split()], dtype=torch.float64)


@pytest.mark.parametrize("panel", FIG_3_4)
def test_fig_3_4_optimal_values_by_all_three_solvers(panel):
    gamma, r_forbidden, values = FIG_3_4[panel]
    model = GridWorld.parse("book", r_forbidden=r_forbidden).model
    expected = golden(values)
    for v, _, _ in (value_iteration(model, gamma), policy_iteration(model, gamma),
                    truncated_policy_iteration(model, gamma, 5)):
        assert torch.equal(v.round(decimals=1), expected)


def test_fig_3_4d_avoids_every_forbidden_cell():
    world = GridWorld.parse("book", r_forbidden=-10.0)
    v, pi, _ = value_iteration(world.model, 0.9)
    forbidden = torch.tensor(world.kinds).flatten() == 1
    s = torch.arange(25)[~forbidden]
    entered = forbidden[world.model.next_state[s, pi[s].argmax(1)]]
    assert not entered.any()


def test_bellman_optimality_equation_holds_at_the_solution():
    model = GridWorld.parse("book").model
    v, pi, _ = value_iteration(model, 0.9, tol=1e-13)
    q = action_values(model, v, 0.9)
    torch.testing.assert_close(q.max(1).values, v, atol=1e-11, rtol=0)
    # The greedy policy's exact value is v*, and v* dominates every other policy's value.
    torch.testing.assert_close(evaluate_closed_form(model, pi, 0.9), v, atol=1e-10, rtol=0)
    for seed in range(5):
        other = deterministic_policy(torch.randint(0, 5, (25,),
                                                   generator=torch.Generator().manual_seed(seed)))
        assert (evaluate_closed_form(model, other, 0.9) <= v + 1e-10).all()


def test_theorem_3_6_affine_reward_invariance():
    alpha, beta, gamma = 2.0, 3.0, 0.9
    base = GridWorld.parse("book")
    shifted = GridWorld.parse("book", **{k: alpha * getattr(base, k) + beta for k in
                                         ("r_boundary", "r_forbidden", "r_target", "r_other")})
    v, pi, _ = value_iteration(base.model, gamma, tol=1e-13)
    v2, pi2, _ = value_iteration(shifted.model, gamma, tol=1e-13)
    torch.testing.assert_close(v2, alpha * v + beta / (1 - gamma), atol=1e-9, rtol=0)
    assert torch.equal(pi, pi2)


def test_fig_2_4_and_2_5_two_by_two_examples():
    """s1 s2 / s3 s4 with s2 forbidden and s4 the target, gamma = 0.9."""
    model = GridWorld.parse("2x2").model
    v = evaluate_closed_form(model, parse_policy("dd/rs", GridWorld.parse("2x2")), 0.9)
    torch.testing.assert_close(v, torch.tensor([9.0, 10.0, 10.0, 10.0], dtype=v.dtype))
    stochastic = parse_policy("dd/rs", GridWorld.parse("2x2"))
    stochastic[0] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0])  # s1: right or down
    v = evaluate_closed_form(model, stochastic, 0.9)
    torch.testing.assert_close(v, torch.tensor([8.5, 10.0, 10.0, 10.0], dtype=v.dtype))
    # Figure 2.8: the action values of s1, including actions the policy never takes.
    q = action_values(model, v, 0.9)[0]
    expected = [-1 + 0.9 * 8.5, -1 + 0.9 * 10, 0.9 * 10, -1 + 0.9 * 8.5, 0.9 * 8.5]
    torch.testing.assert_close(q, torch.tensor(expected, dtype=q.dtype))
    # And v_pi(s1) = sum_a pi(a|s1) q_pi(s1, a) (eq. 2.13).
    assert (stochastic[0] * q).sum().item() == pytest.approx(8.5)


def test_fig_3_5_no_meaningless_detours():
    world = GridWorld.parse("../.T")
    direct = evaluate_closed_form(world.model, parse_policy("dd/rs", world), 0.9)
    detour = evaluate_closed_form(world.model, parse_policy("dl/rs", world), 0.9)
    assert direct.round(decimals=1).tolist() == [9.0, 10.0, 10.0, 10.0]
    assert detour.round(decimals=1).tolist() == [9.0, 8.1, 10.0, 10.0]


def test_tables_4_2_and_4_3_value_iteration_by_hand():
    model = GridWorld.parse("2x2").model
    gamma = 0.9
    v1, q0 = value_iteration_step(model, torch.zeros(4, dtype=torch.float64), gamma)
    assert q0.tolist() == [[-1, -1, 0, -1, 0], [-1, -1, 1, 0, -1], [0, 1, -1, -1, 0],
                           [-1, -1, -1, 0, 1]]
    assert v1.tolist() == [0, 1, 1, 1]
    v2, q1 = value_iteration_step(model, v1, gamma)
    g = gamma
    expected = [[-1, -1 + g, g, -1, 0], [-1 + g, -1 + g, 1 + g, 0, -1 + g],
                [0, 1 + g, -1 + g, -1 + g, g], [-1 + g, -1 + g, -1 + g, g, 1 + g]]
    torch.testing.assert_close(q1, torch.tensor(expected, dtype=q1.dtype))
    torch.testing.assert_close(v2, torch.tensor([g, 1 + g, 1 + g, 1 + g], dtype=v2.dtype))
    # pi_2 (down, down, right, stay) is already optimal (the book's right sub-figure).
    assert q1.argmax(1).tolist() == [2, 2, 1, 4]


def test_fig_4_3_policy_iteration_in_one_step():
    """Two cells, s2 the target; pi_0 moves left everywhere (Table 4.5)."""
    world = GridWorld.parse(".T")
    model = world.model
    pi0 = parse_policy("ll", world)
    v, pi1 = policy_iteration_step(model, pi0, torch.zeros(2, dtype=torch.float64), 0.9)
    torch.testing.assert_close(v, torch.tensor([-10.0, -9.0], dtype=v.dtype))
    q = action_values(model, v, 0.9)[:, [3, 4, 1]]  # the book's columns: left, stay, right
    torch.testing.assert_close(q, torch.tensor([[-10, -9, -7.1], [-9, -7.1, -9.1]],
                                               dtype=q.dtype))
    assert pi1.argmax(1).tolist() == [1, 4]  # right at s1, stay at s2: optimal
    # The iterative evaluation of eq. 4.4 from zeros: -1, -1.9, -2.71 at s1.
    v_j = torch.zeros(2, dtype=torch.float64)
    for expected in ([-1.0, 0.0], [-1.9, -0.9], [-2.71, -1.71]):
        v_j = evaluate_iterative(model, pi0, 0.9, max_iters=1, v0=v_j)[0]
        torch.testing.assert_close(v_j, torch.tensor(expected, dtype=v_j.dtype))


def test_iterative_evaluation_equals_the_closed_form_on_random_worlds():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        kinds = torch.randint(0, 3, (4, 6), generator=gen).tolist()
        world = GridWorld(tuple(map(tuple, kinds)))
        pi = torch.rand(24, 5, generator=gen, dtype=torch.float64)
        pi /= pi.sum(1, keepdim=True)
        v, iterations = evaluate_iterative(world.model, pi, 0.8, tol=1e-12)
        torch.testing.assert_close(v, evaluate_closed_form(world.model, pi, 0.8), atol=1e-10,
                                   rtol=0)
        assert iterations < 200
        torch.testing.assert_close(transition_pi(world.model, pi).sum(1),
                                   torch.ones(24, dtype=pi.dtype))


def test_policy_iteration_improves_monotonically_and_truncation_interpolates():
    model = GridWorld.parse("book", r_forbidden=-10.0).model
    pi = deterministic_policy(torch.randint(0, 5, (25,),
                                            generator=torch.Generator().manual_seed(1)))
    previous = evaluate_closed_form(model, pi, 0.9)
    for _ in range(10):
        _, pi = policy_iteration_step(model, pi, previous, 0.9)
        current = evaluate_closed_form(model, pi, 0.9)
        assert (current >= previous - 1e-10).all()
        previous = current
    # More sweeps per evaluation, fewer outer iterations (Figure 4.5): VI > TPI > PI.
    its = [truncated_policy_iteration(model, 0.9, j, tol=1e-8)[2] for j in (1, 5, 50)]
    its.append(policy_iteration(model, 0.9, tol=1e-8)[2])
    assert its == sorted(its, reverse=True) and its[0] > 3 * its[-1]


def test_policy_score():
    world = GridWorld.parse("book")
    _, pi, _ = value_iteration(world.model, 0.9)
    assert policy_score(world, pi, 0.9) == {"greedy_value_gap": 0.0, "policy_optimal": True}
    stay = policy_score(world, parse_policy("sssss/" * 5, world), 0.9)
    assert not stay["policy_optimal"] and stay["greedy_value_gap"] > 1


def test_cli_value_iteration_writes_the_book_values(runs, capsys):
    assert main(["train", "value_iteration", "--out", str(runs), "--no-progress"]) == 0
    (path,) = runs.iterdir()
    rows = (path / "values.csv").read_text().splitlines()
    values = torch.tensor([[float(x) for x in row.split(",")] for row in rows])
    expected = golden(FIG_3_4["a (gamma 0.9)"][2])
    assert torch.equal(values.double().flatten().round(decimals=1), expected)
    policy = (path / "policy.csv").read_text().splitlines()
    assert len(policy) == 5 and policy[3].split(",")[2] == "stay"
    summary = json.loads((path / "summary.json").read_text())
    assert summary["eval/policy_optimal"] and summary["train/iterations"] < 300
    assert (path / "values.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["eval", str(path)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["policy_optimal"] and scores["mean_state_value"] == pytest.approx(7.79936)
    # eval writes its scores to summary.json under eval/.
    summary = json.loads((path / "summary.json").read_text())
    assert summary["eval/mean_state_value"] == scores["mean_state_value"]


def test_cli_bellman_evaluates_a_given_policy(runs):
    assert main(["train", "bellman", "--grid", "2x2", "--policy", "dd/rs", "--out", str(runs),
                 "--no-progress"]) == 0
    (path,) = runs.iterdir()
    assert (path / "values.csv").read_text() == "9.000000,10.000000\n10.000000,10.000000\n"
    summary = Run.open(path).summary()
    assert summary["eval/max_abs_error_vs_closed_form"] < 1e-9
    assert "eval/policy_optimal" not in summary


@pytest.mark.parametrize("argv,message", [
    (["train", "bellman", "--policy", "xx/yy", "--grid", "2x2"], "cannot read policy"),
    (["train", "value_iteration", "--gamma", "1.0"], "--gamma must be in [0, 1)"),
    (["train", "value_iteration", "--grid", "bok"], "did you mean book?"),
    (["sample", "RUN"], None),
])
def test_bad_rl_input_is_one_line(argv, message, runs, capsys):
    if argv[0] == "sample":
        assert main(["train", "value_iteration", "--out", str(runs), "--no-progress"]) == 0
        (path,) = runs.iterdir()
        argv, message = ["sample", str(path)], "value_iteration runs cannot sample"
        capsys.readouterr()
    assert main([*argv, "--out", str(runs)] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_resume_continues_a_converging_solver(runs):
    assert main(["train", "value_iteration", "--steps", "40", "--ckpt-every", "10",
                 "--out", str(runs / "a"), "--no-progress"]) == 0
    (stopped,) = (runs / "a").iterdir()
    assert main(["train", "--resume", str(stopped), "--steps", "300", "--no-progress"]) == 0
    assert main(["train", "value_iteration", "--steps", "300", "--ckpt-every", "10",
                 "--out", str(runs / "b"), "--no-progress"]) == 0
    (straight,) = (runs / "b").iterdir()
    assert (stopped / "values.csv").read_text() == (straight / "values.csv").read_text()
    assert Run.open(stopped).summary()["train/iterations"] == \
        Run.open(straight).summary()["train/iterations"]

    def rows(path):
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in Run.open(path).metrics]

    assert rows(stopped) == rows(straight)


def test_config_checks_the_policy_against_the_grid():
    with pytest.raises(ValueError, match="cannot read policy"):
        BellmanConfig(grid="2x2", policy="rrr/ddd")


def test_blocked_backup_equals_the_textbook_sweep_across_block_edges():
    gen = torch.Generator().manual_seed(0)
    kinds = torch.randint(0, 3, (400, 400), generator=gen)  # 160,000 states > one block
    model = GridWorld(tuple(map(tuple, kinds.tolist()))).model
    v = torch.randn(model.n_states, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(bellman_optimality_backup(model, v, 0.9),
                               value_iteration_step(model, v, 0.9)[0], atol=1e-14, rtol=0)
