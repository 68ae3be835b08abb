"""Monte Carlo methods: MC Basic, MC Exploring Starts, MC epsilon-greedy (Zhao, Chapter 5).

An action value is an expected return, q_pi(s, a) = E[G_t | S_t = s, A_t = a] with
G_t = R_{t+1} + gamma R_{t+2} + gamma^2 R_{t+3} + ..., so it can be estimated without a model by
averaging the returns g^(i) of n episodes that start from (s, a) and then follow pi (eq. 5.2):

    q_pi(s, a) ~ (1/n) sum_{i=1..n} g^(i)_pi(s, a).

- MC Basic (Algorithm 5.1) is policy iteration with this estimate in place of the model-based
  evaluation: for every (s, a) collect episodes of length L that start with (s, a) and follow
  pi_k, let q_k(s, a) be their average return, and improve greedily,
  pi_{k+1}(a|s) = 1 for a = a*_k(s) = argmax_a q_k(s, a). An episode of length L returns
  sum_{t<L} gamma^t r_{t+1}; with a deterministic model and policy one episode per pair gives
  exactly the L-step truncated action value q_k = r + gamma P v^(L-1), where
  v^(j+1) = r_pi + gamma P_pi v^(j) from v^(0) = 0 (:func:`truncated_action_values`). States more
  than L steps from the target keep zero values (Figure 5.4).
- MC Exploring Starts (Algorithm 5.2) uses every visit of a pair in an episode (or only the
  first, ``first_visit``) and improves the policy after each episode. Backwards over the episode,
  t = T-1, ..., 0:  g <- gamma g + r_{t+1},  Returns(s_t, a_t) += g,  Num(s_t, a_t) += 1,
  q(s_t, a_t) = Returns(s_t, a_t) / Num(s_t, a_t),  pi(.|s_t) greedy in q. Episodes start from
  random pairs (s_0, a_0), so that every pair can be selected (the exploring-starts condition).
- MC epsilon-greedy (Algorithm 5.3) drops exploring starts and makes the policy soft: the
  improvement step solves eq. 5.5 over the epsilon-greedy policies,
  pi(a|s) = 1 - (|A| - 1) epsilon / |A| for a = a* = argmax_a q(s, a) and epsilon / |A| otherwise.
  Given enough samples it finds the best policy of that set, whose values solve
  v(s) = (1 - epsilon) max_a q(s, a) + epsilon mean_a q(s, a), q = r + gamma P v
  (:func:`epsilon_greedy_optimal_values`, Figure 5.7); the greedy version of that policy is
  optimal only when epsilon is small enough, so epsilon may decay during training (Section 5.5).

Returns/Num is the running mean q <- q + (1/Num) (g - q). Averaged over every episode ever run,
it keeps the returns of early, poor policies for good, and on the book's grid two near-ties
(q*(s, a) 7.2 against 7.1 at (5,1), 5.58 against 5.48 at (1,2)) then stay wrong for hundreds of
thousands of episodes (docs/methods/rl-tabular-monte_carlo.md). The two methods that average over
time therefore take a step size ``alpha``: q(s, a) <- q(s, a) + alpha (mean return of (s, a) in
the batch - q(s, a)), the constant-step form of the same mean estimate (Chapter 6); ``alpha=0``
gives Returns/Num exactly as the algorithm boxes print it.

Many episodes run side by side (:func:`mlatlas.rl.tabular.episodes.rollout`): MC Basic runs all
|S| |A| n episodes of an iteration at once; the other two run ``episodes_per_step`` episodes under
one policy and then update q and pi once for all of them. With Returns/Num that equals processing
the episodes one after the other, except that pi is improved once per batch instead of once per
episode.

Metrics (metrics.csv): ``return`` (mean discounted return of the step's episodes from their
start), ``policy_changes`` (states whose policy changed), ``greedy_value_gap`` (max_s v*(s) -
v_greedy(s) of the greedy policy in the current q, by exact evaluation; every ``log_every``
steps), ``value_error`` (MC Basic: max_s |max_a q_k(s, a) - v*(s)|), ``q_error`` (MC Exploring
Starts: mean |q - q*|), ``visited_pairs`` (fraction of pairs visited so far), ``epsilon``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.optim import linear_interpolate
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import seed_everything
from mlatlas.rl.returns import discounted_returns
from mlatlas.rl.tabular.bellman import action_values, bellman_step, exact_values, optimal_values
from mlatlas.rl.tabular.common import (
    OPTIMAL_TOL,
    GridConfig,
    finish,
    greedy_value_gap,
    make_world,
)
from mlatlas.rl.tabular.episodes import Episodes, rollout, scatter_mean_update, start_states
from mlatlas.rl.tabular.gridworld import (
    STAY,
    GridWorld,
    TabularModel,
    deterministic_policy,
    epsilon_greedy_policy,
    greedy_policy,
    parse_policy,
    parse_start,
)
from mlatlas.rl.tabular.plots import trajectory_figure

# The maths -----------------------------------------------------------------------------------


def initial_visit_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """g = sum_t gamma^t r_{t+1} of each episode: (T, B) rewards -> (B,) returns."""
    discount = gamma ** torch.arange(rewards.shape[0], dtype=rewards.dtype)
    return discount @ rewards


def mc_basic_action_values(model: TabularModel, pi: torch.Tensor, gamma: float,
                           episode_length: int, episodes_per_pair: int,
                           generator: torch.Generator) -> tuple[torch.Tensor, Episodes]:
    """Policy evaluation of Algorithm 5.1: q_k(s, a) = the average return of the episodes that
    start with (s, a) and then follow pi.

    All |S| |A| ``episodes_per_pair`` episodes run at once; episode b starts from the pair
    b mod |S||A|, i.e. s = (b mod |S||A|) // |A|, a = b mod |A|. Returns q (S, A) and the
    episodes.
    """
    n_states, n_actions = model.n_states, model.n_actions
    pairs = torch.arange(n_states * n_actions).repeat(episodes_per_pair)
    episodes = rollout(model, pi, pairs // n_actions, episode_length, generator,
                       a0=pairs % n_actions)
    g = initial_visit_returns(episodes.rewards, gamma)
    return g.view(episodes_per_pair, n_states, n_actions).mean(0), episodes


def truncated_action_values(model: TabularModel, pi: torch.Tensor, gamma: float,
                            length: int) -> torch.Tensor:
    """The expected return of an episode of ``length`` steps that starts with (s, a) and then
    follows pi: q^(L)(s, a) = r(s, a) + gamma v^(L-1)(s'), v^(j+1) = r_pi + gamma P_pi v^(j),
    v^(0) = 0. MC Basic estimates this with episodes of length L; q^(L) -> q_pi as L -> inf.
    """
    v = torch.zeros(model.n_states, dtype=model.reward.dtype)
    for _ in range(length - 1):
        v = bellman_step(model, pi, v, gamma)
    return action_values(model, v, gamma)


def visit_mask(episodes: Episodes, n_states: int, n_actions: int,
               first_visit: bool = False) -> torch.Tensor:
    """(T, B) True at the visits Algorithms 5.2/5.3 count: every step that happened
    (every-visit) or only the first occurrence of each pair in its episode (first-visit)."""
    alive = episodes.alive
    if not first_visit:
        return alive
    length, batch = alive.shape
    pair = episodes.states[:-1] * n_actions + episodes.actions
    # One key per (episode, pair), compacted by unique so memory is O(T B) whatever |S| |A|.
    key = pair + torch.arange(batch)[None, :] * (n_states * n_actions)
    keys, inverse = torch.unique(key.flatten(), return_inverse=True)
    t = torch.arange(length).repeat_interleave(batch)
    first = torch.full((keys.numel(),), length, dtype=torch.int64)
    first.scatter_reduce_(0, inverse, t, reduce="amin")
    return alive & (first[inverse] == t).view(length, batch)


def accumulate_returns(returns: torch.Tensor, num: torch.Tensor, states: torch.Tensor,
                       actions: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> None:
    """Returns(s_t, a_t) += g_t and Num(s_t, a_t) += 1 for every counted visit (in place).

    ``returns`` and ``num`` are (S, A); ``states``, ``actions``, ``g`` and ``mask`` (T, B).
    """
    index = (states * returns.shape[1] + actions)[mask]
    returns.view(-1).index_add_(0, index, g[mask].to(returns.dtype))
    num.view(-1).index_add_(0, index, torch.ones_like(index, dtype=num.dtype))


def average_returns(returns: torch.Tensor, num: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q(s, a) = Returns(s, a) / Num(s, a) where a pair has been visited, else q unchanged."""
    return torch.where(num > 0, returns / num.clamp(min=1), q)


def improve_policy(pi: torch.Tensor, q: torch.Tensor, states: torch.Tensor,
                   epsilon: float = 0.0) -> torch.Tensor:
    """pi(.|s) <- the epsilon-greedy policy in q (eq. 5.5; epsilon 0 is greedy, eq. 5.4) at the
    given states; in place, returns pi."""
    pi[states] = epsilon_greedy_policy(q[states], epsilon)
    return pi


def mc_update(tables: dict[str, torch.Tensor], episodes: Episodes, gamma: float, *,
              first_visit: bool = False, epsilon: float = 0.0,
              alpha: float = 0.0) -> torch.Tensor:
    """Policy evaluation and improvement of Algorithms 5.2/5.3 for a batch of episodes.

    ``tables`` holds q, pi, returns and num, all (S, A), updated in place: Returns/Num gathers
    every counted visit; q is Returns/Num (``alpha`` 0) or moves by ``alpha`` towards the batch's
    mean return of each visited pair; pi becomes epsilon-greedy in q at the visited states.
    Returns g_t, the (T, B) returns (g <- gamma g + r_{t+1} backwards over each episode).
    """
    q, pi = tables["q"], tables["pi"]
    g = discounted_returns(episodes.rewards, gamma)
    mask = visit_mask(episodes, *q.shape, first_visit=first_visit)
    states, actions = episodes.states[:-1], episodes.actions
    accumulate_returns(tables["returns"], tables["num"], states, actions, g, mask)
    if alpha > 0:
        s, a = states[mask], actions[mask]
        scatter_mean_update(q, (s, a), g[mask] - q[s, a], alpha)
    else:
        q.copy_(average_returns(tables["returns"], tables["num"], q))
    improve_policy(pi, q, torch.unique(states[mask]), epsilon)
    return g


def epsilon_greedy_optimal_values(model: TabularModel, gamma: float, epsilon: float, *,
                                  tol: float = 1e-12, max_iters: int = 100_000):
    """The best epsilon-greedy policy (optimal in Pi_epsilon, eq. 5.5) and its values.

    Value iteration on v(s) = max_{pi in Pi_eps} sum_a pi(a|s) q(s, a)
    = (1 - epsilon) max_a q(s, a) + epsilon mean_a q(s, a) with q = r + gamma P v, a gamma
    contraction. Returns (v, pi) with pi epsilon-greedy in the final q.
    """
    v = torch.zeros(model.n_states, dtype=model.reward.dtype)
    for _ in range(max_iters):
        q = action_values(model, v, gamma)
        v_next = (1 - epsilon) * q.max(dim=1).values + epsilon * q.mean(dim=1)
        done = (v_next - v).abs().max().item() < tol
        v = v_next
        if done:
            break
    return v, epsilon_greedy_policy(action_values(model, v, gamma), epsilon)


def epsilon_schedule(k: int, epsilon: float, epsilon_final: float, decay_steps: int) -> float:
    """epsilon at step k (from 1): linear from ``epsilon`` to ``epsilon_final`` over
    ``decay_steps`` steps, constant afterwards; ``decay_steps`` 0 is epsilon_final throughout."""
    if decay_steps == 0:
        return epsilon_final
    return linear_interpolate(epsilon, epsilon_final, k, 1, decay_steps)


# Command-line methods ------------------------------------------------------------------------


def _initial_policy(spec: str, world: GridWorld) -> torch.Tensor:
    if spec == "stay":
        return deterministic_policy(torch.full((world.n_states,), STAY))
    return parse_policy(spec, world)


def _optimal_from_step(run: Run) -> int | None:
    """The first logged step from which greedy_value_gap stayed below the optimality tolerance."""
    since = None
    for row in run.metrics:
        if "greedy_value_gap" in row:
            since = (since or row["step"]) if row["greedy_value_gap"] < OPTIMAL_TOL else None
    return since


def _empty_tables(model: TabularModel, pi0: torch.Tensor) -> dict[str, torch.Tensor]:
    shape = (model.n_states, model.n_actions)
    return {"q": torch.zeros(shape, dtype=torch.float64), "pi": pi0.clone(),
            "returns": torch.zeros(shape, dtype=torch.float64),
            "num": torch.zeros(shape, dtype=torch.float64)}


def _save_trajectories(run: Run, world: GridWorld, pi: torch.Tensor, starts: list[int],
                       length: int, seed: int, title: str) -> None:
    # A generator of its own: drawing the pictures must not move the training's random stream.
    episodes = rollout(world.model, pi, torch.tensor(starts), length,
                       torch.Generator().manual_seed(seed))
    paths = [episodes.states[:, b].tolist() for b in range(len(starts))]
    run.save_figure(trajectory_figure(world, paths, title), "trajectories.png")


def _corners(world: GridWorld) -> list[int]:
    """Bottom-left, top-left and bottom-right cells: the far starts of Figure 5.4."""
    return [world.n_states - world.shape[1], 0, world.n_states - 1]


@dataclass
class MCBasicConfig(GridConfig):
    METHOD: ClassVar[str] = "mc_basic"

    episode_length: int = 100
    """L: steps (rewards) per episode; states farther than L steps from the target get no
    positive return (Figure 5.4)."""
    episodes_per_pair: int = 1
    """Episodes per (s, a) in each policy evaluation; one suffices when the world and the policy
    are deterministic, as here after the first improvement."""
    initial_policy: str = "stay"
    """pi_0: 'stay', 'uniform', or one letter (u r d l s) per cell, rows separated by '/'."""
    steps: int = 100
    """Most policy iterations (the run stops once the policy no longer changes)."""
    log_every: int = 1
    """Write a row of metrics.csv every this many iterations."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many iterations (and always at the end)."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "episode_length", "episodes_per_pair")

    def check_data(self) -> None:
        super().check_data()
        _initial_policy(self.initial_policy, make_world(self))


def train_mc_basic(cfg: MCBasicConfig, run: Run | None = None,
                   progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    world = make_world(cfg)
    model = world.model
    v_star = optimal_values(model, cfg.gamma)
    tables = {"q": torch.zeros(model.n_states, model.n_actions, dtype=torch.float64),
              "pi": _initial_policy(cfg.initial_policy, world)}
    per_step = model.n_states * model.n_actions * cfg.episodes_per_pair

    def step(k: int) -> dict[str, float]:
        q, episodes = mc_basic_action_values(model, tables["pi"], cfg.gamma, cfg.episode_length,
                                             cfg.episodes_per_pair, generator)
        pi_next = greedy_policy(q)
        changes = (pi_next != tables["pi"]).any(dim=1).sum()
        tables["q"], tables["pi"] = q, pi_next
        return {"return": q.mean(), "policy_changes": changes,
                "value_error": (q.max(dim=1).values - v_star).abs().max(),
                "greedy_value_gap": greedy_value_gap(model, q, v_star, cfg.gamma)}

    last = fit(run, step, total_steps=cfg.steps,
               objects={"model": tables, "rng": generator}, log_every=cfg.log_every,
               ckpt_every=cfg.ckpt_every, progress=progress,
               until=lambda m: m["policy_changes"] == 0)
    v = tables["q"].max(dim=1).values
    finish(run, cfg, world, values=v, policy=tables["pi"],
           title=f"MC Basic, episode length {cfg.episode_length}",
           extra={"train/iterations": last, "train/episodes": last * per_step,
                  "train/samples": last * per_step * cfg.episode_length,
                  "eval/max_value_error": (v - v_star).abs().max().item()})
    _save_trajectories(run, world, tables["pi"], _corners(world), min(cfg.episode_length, 30),
                       cfg.seed, "MC Basic: the final greedy policy")
    return run


@dataclass
class MCExploringStartsConfig(GridConfig):
    METHOD: ClassVar[str] = "mc_exploring_starts"

    episode_length: int = 100
    """T: steps per episode."""
    episodes_per_step: int = 125
    """Episodes run under one policy before each evaluation and improvement."""
    alpha: float = 0.5
    """Step size: q(s,a) += alpha (batch mean return of (s,a) - q(s,a)); 0 averages every return
    ever seen, Returns/Num, as Algorithm 5.2 prints it (slow: old policies' returns linger)."""
    first_visit: bool = False
    """Count only the first visit of a pair in an episode (default: every visit, as in
    Algorithm 5.2)."""
    initial_policy: str = "stay"
    """pi_0: 'stay', 'uniform', or one letter (u r d l s) per cell, rows separated by '/'."""
    steps: int = 50
    """Batches of episodes_per_step episodes."""
    log_every: int = 1
    """Write a row of metrics.csv (with the exact greedy_value_gap) every this many batches."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many batches (and always at the end)."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "episode_length", "episodes_per_step")
        require_unit(self, "alpha")

    def check_data(self) -> None:
        super().check_data()
        _initial_policy(self.initial_policy, make_world(self))


def train_mc_exploring_starts(cfg: MCExploringStartsConfig, run: Run | None = None,
                              progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    world = make_world(cfg)
    model = world.model
    v_star = optimal_values(model, cfg.gamma)
    q_star = action_values(model, v_star, cfg.gamma)
    tables = _empty_tables(model, _initial_policy(cfg.initial_policy, world))
    batch = cfg.episodes_per_step

    def step(k: int) -> dict[str, float]:
        # Exploring starts: every pair (s_0, a_0) is drawn with probability 1 / (|S| |A|).
        s0 = torch.randint(model.n_states, (batch,), generator=generator)
        a0 = torch.randint(model.n_actions, (batch,), generator=generator)
        pi_before = tables["pi"].clone()
        episodes = rollout(model, tables["pi"], s0, cfg.episode_length, generator, a0=a0)
        g = mc_update(tables, episodes, cfg.gamma, first_visit=cfg.first_visit, alpha=cfg.alpha)
        metrics = {"return": g[0].mean(),
                   "policy_changes": (tables["pi"] != pi_before).any(dim=1).sum(),
                   "q_error": (tables["q"] - q_star).abs().mean(),
                   "visited_pairs": (tables["num"] > 0).double().mean()}
        if k % cfg.log_every == 0 or k == cfg.steps:
            metrics["greedy_value_gap"] = greedy_value_gap(model, tables["q"], v_star, cfg.gamma)
        return metrics

    last = fit(run, step, total_steps=cfg.steps,
               objects={"model": tables, "rng": generator}, log_every=cfg.log_every,
               ckpt_every=cfg.ckpt_every, progress=progress)
    q, pi = tables["q"], tables["pi"]
    finish(run, cfg, world, values=(pi * q).sum(dim=1), policy=pi, title="MC Exploring Starts",
           extra={"train/episodes": last * batch,
                  "train/samples": last * batch * cfg.episode_length,
                  "train/optimal_from_step": _optimal_from_step(run)})
    _save_trajectories(run, world, pi, _corners(world), min(cfg.episode_length, 30), cfg.seed,
                       "MC Exploring Starts: the final greedy policy")
    return run


@dataclass
class MCEpsilonGreedyConfig(GridConfig):
    METHOD: ClassVar[str] = "mc_epsilon_greedy"

    epsilon: float = 0.5
    """epsilon of the epsilon-greedy policy at the start (1 is the uniform policy)."""
    epsilon_final: float = 0.1
    """epsilon after the decay; equal to --epsilon for a constant epsilon. On the book's grid
    the best epsilon-greedy policy has an optimal greedy version for epsilon <= 0.1."""
    epsilon_decay_steps: int = 50
    """Batches over which epsilon falls linearly from --epsilon to --epsilon-final."""
    episode_length: int = 100
    """T: steps per episode."""
    episodes_per_step: int = 1000
    """Episodes run under one policy before each evaluation and improvement."""
    alpha: float = 0.05
    """Step size: q(s,a) += alpha (batch mean return of (s,a) - q(s,a)); 0 averages every return
    ever seen, Returns/Num, as Algorithm 5.3 prints it (slow: old policies' returns linger)."""
    start: str = "random"
    """Where episodes start: 'random' (a uniformly drawn state) or a cell 'row,col'; the first
    action is drawn from the policy (no exploring starts)."""
    first_visit: bool = False
    """Count only the first visit of a pair in an episode (default: every visit, as in
    Algorithm 5.3)."""
    initial_policy: str = "uniform"
    """pi_0: 'uniform' (as in Figure 5.5), 'stay', or one letter (u r d l s) per cell."""
    steps: int = 200
    """Batches of episodes_per_step episodes."""
    log_every: int = 5
    """Write a row of metrics.csv (with the exact greedy_value_gap) every this many batches."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many batches (and always at the end)."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "episode_length", "episodes_per_step")
        require_unit(self, "epsilon", "epsilon_final", "alpha")
        if self.epsilon_decay_steps < 0:
            raise ConfigError(f"--epsilon-decay-steps must be >= 0, "
                              f"got {self.epsilon_decay_steps}")

    def check_data(self) -> None:
        super().check_data()
        world = make_world(self)
        _initial_policy(self.initial_policy, world)
        parse_start(self.start, world)


def train_mc_epsilon_greedy(cfg: MCEpsilonGreedyConfig, run: Run | None = None,
                            progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    world = make_world(cfg)
    model = world.model
    v_star = optimal_values(model, cfg.gamma)
    tables = _empty_tables(model, _initial_policy(cfg.initial_policy, world))
    start = parse_start(cfg.start, world)
    batch = cfg.episodes_per_step

    def step(k: int) -> dict[str, float]:
        epsilon = epsilon_schedule(k, cfg.epsilon, cfg.epsilon_final, cfg.epsilon_decay_steps)
        s0 = start_states(start, batch, model.n_states, generator)
        greedy_before = tables["q"].argmax(dim=1)
        episodes = rollout(model, tables["pi"], s0, cfg.episode_length, generator)
        g = mc_update(tables, episodes, cfg.gamma, first_visit=cfg.first_visit,
                      epsilon=epsilon, alpha=cfg.alpha)
        metrics = {"return": g[0].mean(), "epsilon": epsilon,
                   "policy_changes": (tables["q"].argmax(dim=1) != greedy_before).sum(),
                   "visited_pairs": (tables["num"] > 0).double().mean()}
        if k % cfg.log_every == 0 or k == cfg.steps:
            metrics["greedy_value_gap"] = greedy_value_gap(model, tables["q"], v_star, cfg.gamma)
        return metrics

    last = fit(run, step, total_steps=cfg.steps,
               objects={"model": tables, "rng": generator}, log_every=cfg.log_every,
               ckpt_every=cfg.ckpt_every, progress=progress)
    q, pi = tables["q"], tables["pi"]
    epsilon = epsilon_schedule(last, cfg.epsilon, cfg.epsilon_final, cfg.epsilon_decay_steps)
    # The soft policy itself: how far from optimal overall, and from the best in Pi_epsilon.
    v_pi = exact_values(model, pi, cfg.gamma)
    v_best_soft, _ = epsilon_greedy_optimal_values(model, cfg.gamma, epsilon)
    finish(run, cfg, world, values=(pi * q).sum(dim=1), policy=pi,
           title=f"MC epsilon-greedy, final epsilon {epsilon:.3g}",
           extra={"train/epsilon": epsilon, "train/episodes": last * batch,
                  "train/samples": last * batch * cfg.episode_length,
                  "train/optimal_from_step": _optimal_from_step(run),
                  "eval/epsilon_policy_value_gap": (v_star - v_pi).max().item(),
                  "eval/epsilon_optimal_gap": max(0.0, (v_best_soft - v_pi).max().item())})
    _save_trajectories(run, world, pi, [0 if start is None else start], 100, cfg.seed,
                       f"MC epsilon-greedy: 100 steps of the final policy (epsilon {epsilon:.3g})")
    return run
