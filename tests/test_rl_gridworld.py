"""The grid world, its tensor model, policies, batched episodes, returns and the gymnasium env."""

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import mlatlas.rl  # noqa: F401 (registers mlatlas/GridWorld-v0)
from mlatlas.rl.returns import discounted_returns
from mlatlas.rl.tabular.bellman import evaluate_closed_form
from mlatlas.rl.tabular.env import ENV_ID, GridWorldEnv
from mlatlas.rl.tabular.episodes import rollout, scatter_mean_update
from mlatlas.rl.tabular.gridworld import (
    ACTIONS,
    GridError,
    GridWorld,
    epsilon_greedy_policy,
    greedy_policy,
    parse_policy,
    uniform_policy,
)

UP, RIGHT, DOWN, LEFT, STAY = range(5)
BOOK = GridWorld.parse("book")


def test_book_layout_matches_the_issue():
    forbidden = [BOOK.cell(s) for s in range(25) if BOOK.kinds[s // 5][s % 5] == 1]
    target = [BOOK.cell(s) for s in range(25) if BOOK.kinds[s // 5][s % 5] == 2]
    assert forbidden == [(2, 2), (2, 3), (3, 3), (4, 2), (4, 4), (5, 2)]
    assert target == [(4, 3)]
    assert GridWorld.from_cells(5, 5, forbidden=forbidden, target=target) == BOOK


@pytest.mark.parametrize("cell,action,next_cell,reward", [
    ((1, 1), UP, (1, 1), -1.0),      # off the grid: bounce back, r_boundary
    ((1, 1), LEFT, (1, 1), -1.0),
    ((1, 1), RIGHT, (1, 2), 0.0),    # ordinary move
    ((1, 2), DOWN, (2, 2), -1.0),    # into a forbidden cell: the agent enters it
    ((2, 2), STAY, (2, 2), -1.0),    # staying in a forbidden cell
    ((2, 2), LEFT, (2, 1), 0.0),     # leaving it costs nothing
    ((4, 2), RIGHT, (4, 3), 1.0),    # into the target
    ((4, 3), STAY, (4, 3), 1.0),     # staying in the target
    ((4, 3), DOWN, (5, 3), 0.0),     # the target is not absorbing
])
def test_transitions_and_rewards(cell, action, next_cell, reward):
    model = BOOK.model
    s = BOOK.state(*cell)
    assert BOOK.cell(model.next_state[s, action]) == next_cell
    assert model.reward[s, action].item() == reward


def test_rewards_are_configurable_and_p_is_a_distribution():
    world = GridWorld.parse("book", r_boundary=-3, r_forbidden=-10, r_target=5, r_other=-0.5)
    model = world.model
    assert model.reward[world.state(1, 1), UP] == -3
    assert model.reward[world.state(1, 2), DOWN] == -10
    assert model.reward[world.state(4, 2), RIGHT] == 5
    assert model.reward[world.state(1, 1), RIGHT] == -0.5
    P = model.P
    assert P.shape == (25, 5, 25)
    torch.testing.assert_close(P.sum(-1), torch.ones(25, 5, dtype=P.dtype))
    assert torch.equal(P.argmax(-1), model.next_state)


def test_terminal_target_is_absorbing_with_zero_reward():
    world = GridWorld.parse("book", terminal_target=True)
    model, target = world.model, world.state(4, 3)
    assert model.terminal[target] and model.terminal.sum() == 1
    assert (model.next_state[target] == target).all() and (model.reward[target] == 0).all()
    # Entering the target still pays r_target and ends the episode.
    s_next, r, done = model.step(torch.tensor([world.state(4, 2)]), torch.tensor([RIGHT]))
    assert s_next.item() == target and r.item() == 1.0 and done.item()


@pytest.mark.parametrize("grid,message", [
    ("bok", "did you mean book?"),
    ("../.X", "cannot read grid"),
    ("../.", "rows have different lengths"),
])
def test_bad_grids_are_clear_errors(grid, message):
    with pytest.raises(GridError, match=message):
        GridWorld.parse(grid)
    with pytest.raises(GridError, match="outside"):
        GridWorld.from_cells(2, 2, forbidden=[(3, 1)])


def test_policies():
    q = torch.tensor([[0.0, 2.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    assert greedy_policy(q).tolist() == [[0, 1, 0, 0, 0]]  # ties go to the first action
    pi = epsilon_greedy_policy(q, 0.5)
    torch.testing.assert_close(pi, torch.tensor([[0.1, 0.6, 0.1, 0.1, 0.1]], dtype=pi.dtype))
    assert parse_policy("rd/ss", GridWorld.parse("2x2")).argmax(1).tolist() == [1, 2, 4, 4]
    torch.testing.assert_close(parse_policy("uniform", BOOK), uniform_policy(25))
    for bad in ("rd/s", "rx/ss", "rds/ss"):
        with pytest.raises(GridError, match="cannot read policy"):
            parse_policy(bad, GridWorld.parse("2x2"))


def test_discounted_returns_match_a_brute_force_sum():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    dones = torch.rand(7, 4, generator=gen) < 0.3
    bootstrap = torch.randn(4, generator=gen, dtype=torch.float64)
    gamma = 0.8
    got = discounted_returns(rewards, gamma, dones, bootstrap)
    for b in range(4):
        for t in range(7):
            g, k = 0.0, t
            while True:
                g += gamma ** (k - t) * rewards[k, b].item()
                if dones[k, b]:
                    break
                k += 1
                if k == 7:
                    g += gamma ** (k - t) * bootstrap[b].item()
                    break
            assert got[t, b].item() == pytest.approx(g, abs=1e-12)


def test_rollout_returns_estimate_state_values():
    """With a deterministic policy the L-step discounted return is v_pi(s) up to gamma^L."""
    pi = greedy_policy(torch.randn(25, 5, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    episodes = rollout(BOOK.model, pi, torch.arange(25), 300, gen)
    assert episodes.states.shape == (301, 25) and episodes.alive.all()
    returns = discounted_returns(episodes.rewards, 0.9)[0]
    torch.testing.assert_close(returns, evaluate_closed_form(BOOK.model, pi, 0.9), atol=1e-10,
                               rtol=0)


def test_rollout_stops_rewarding_after_the_end_and_fixes_first_actions():
    world = GridWorld.parse("book", terminal_target=True)
    gen = torch.Generator().manual_seed(0)
    pi = uniform_policy(25)
    s0 = torch.full((200,), world.state(4, 2))
    episodes = rollout(world.model, pi, s0, 10, gen, a0=torch.full((200,), RIGHT))
    assert (episodes.actions[0] == RIGHT).all() and (episodes.rewards[0] == 1).all()
    assert not episodes.alive[1:].any() and (episodes.rewards[1:] == 0).all()
    assert (episodes.states[1:] == world.state(4, 3)).all()


def test_scatter_mean_update_averages_collisions():
    q = torch.zeros(3, 2, dtype=torch.float64)
    s, a = torch.tensor([0, 0, 1]), torch.tensor([1, 1, 0])
    scatter_mean_update(q, (s, a), torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64), 0.5)
    assert q.tolist() == [[0.0, 1.0], [2.5, 0.0], [0.0, 0.0]]


def test_gymnasium_env_passes_the_checker_and_matches_the_model():
    env = GridWorldEnv()
    check_env(env, skip_render_check=True)
    model = BOOK.model
    for s in range(25):
        for a in range(5):
            env.reset(options={"start": BOOK.cell(s)})
            s_next, r, terminated, truncated, info = env.step(a)
            assert (s_next, r) == (model.next_state[s, a].item(), model.reward[s, a].item())
            assert not terminated and not truncated and info["cell"] == BOOK.cell(s_next)


def test_registered_env_terminates_truncates_seeds_and_renders():
    env = gymnasium.make(ENV_ID, terminal_target=True, start=(4, 2), render_mode="rgb_array")
    state, _ = env.reset(seed=0)
    assert state == BOOK.state(4, 2)
    _, reward, terminated, _, _ = env.step(RIGHT)
    assert reward == 1.0 and terminated
    image = env.render()
    assert image.shape == (160, 160, 3) and image.dtype == np.uint8
    assert (image[3 * 32 + 16, 2 * 32 + 16] == (20, 60, 200)).all()  # the agent, on the target
    env = gymnasium.make(ENV_ID)
    starts = [env.reset(seed=7)[0] for _ in range(2)]
    assert starts[0] == starts[1]
    steps = 0
    truncated = False
    while not truncated:
        _, _, _, truncated, _ = env.step(STAY)
        steps += 1
    assert steps == 100
    with pytest.raises(ValueError, match="action must be"):
        GridWorldEnv().step(7)


def test_action_names():
    assert ACTIONS == ("up", "right", "down", "left", "stay")
