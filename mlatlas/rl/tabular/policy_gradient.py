"""REINFORCE: Monte Carlo policy gradient with a tabular softmax policy (Zhao, Chapter 9).

The policy is a softmax over preferences h(s, a, theta) = theta[s, a] (eq. 9.12):

    pi(a|s, theta) = exp(h(s, a, theta)) / sum_b exp(h(s, b, theta)),

so pi(a|s, theta) > 0 everywhere and ln pi is defined. Its score is zero outside row s of theta:

    d ln pi(a|s, theta) / d theta[s', b] = 1[s' = s] (1[b = a] - pi(b|s, theta)).

The metric is the average state value v_bar = sum_s d0(s) v_pi(s) (Section 9.2) with d0 the
distribution of the episodes' first states (uniform here, so every state is covered). Its gradient
(Theorem 9.2) is

    grad v_bar = sum_s rho(s) sum_a grad pi(a|s, theta) q_pi(s, a)
               = E_{S ~ rho, A ~ pi}[grad ln pi(A|S, theta) q_pi(S, A)],
    rho(s) = sum_s' d0(s') [(I - gamma P_pi)^{-1}]_{s' s}                              (eq. 9.19)

which for tabular softmax is d v_bar / d theta[s, b] = rho(s) pi(b|s) (q_pi(s, b) - v_pi(s)).

REINFORCE (Algorithm 9.1, eq. 9.32) replaces q_pi by the Monte Carlo return of an episode,
q_t(s_t, a_t) = sum_{k=t+1}^T gamma^{k-t-1} r_k, and ascends:

    theta <- theta + alpha grad ln pi(a_t|s_t, theta) q_t(s_t, a_t).

Here ``episodes_per_step`` = B episodes of length T, from states drawn from d0, run side by side
and one update uses all of them:

    g_k = (1/B) sum_b sum_t gamma^t grad ln pi(a_t^b|s_t^b) (q_t^b - b(s_t^b)).

The factor gamma^t (``discount_weight``, on by default) makes the estimate unbiased for
grad v_bar (up to the truncation at T): the states then enter with the weights rho of
Theorem 9.2. Algorithm 9.1 leaves it out (``--no-discount-weight``), which weights states by their
undiscounted visits instead; on the book's world that version ended further from optimal in the
seeds measured (docs/methods/rl-tabular-policy_gradient.md).

The baseline b (baseline invariance, Zhao Chapter 10) is by default (``--baseline state``) a
running mean of the returns from each state, an estimate of v_pi(s):

    b_{k+1}(s) = b_k(s) + beta (G_bar_k(s) - b_k(s))   for every state s the batch visited,

G_bar_k(s) the mean return of the batch's visits to s. The batch's update uses b_k, made from
earlier batches only, so E[grad ln pi(A|s) b_k(s)] = b_k(s) sum_a grad pi(a|s) = 0 exactly and g_k
stays unbiased. ``--baseline time`` takes instead the batch's mean return at time t (which
contains each episode's own return, a bias of order 1/B) and ``--baseline none`` none.

The step (``--normalise``, on by default) is the normalised gradient of Mei et al. (2021,
"Leveraging non-uniformity in first-order non-convex optimization", GNPG):

    theta_{k+1} = theta_k + alpha g_k / ||g_k||,

a step of fixed length alpha in the ascent direction; ``--no-normalise`` takes Algorithm 9.1's
theta_{k+1} = theta_k + alpha g_k.

Softmax policy gradients slow down where pi(b|s) -> 0 for an action b that later turns out to be
the best: the gradient carries the factor pi(b|s). On the book's world this can leave a state on
its second-best action for a long time, and exact gradient ascent on v_bar does the same
(``tests/test_rl_policy_gradient.py::test_exact_gradient_ascent_stalls_on_the_book_world``).
Normalising divides that vanishing factor out of the step length: the exact normalised ascent
leaves the same plateau in 75 steps of length 0.3. With sampled gradients the normalised step
needs a quiet estimate, which is what the state baseline and B = 256 episodes give: with them
all 16 seeds measured reach the optimal policy within 194 updates, against 4 of 8 seeds in
1000 updates for the plain step with the time baseline and B = 64
(docs/methods/rl-tabular-policy_gradient.md). The normalised expected step is not exactly
parallel to grad v_bar (the length 1/||g_k|| is random and correlated with g_k); the baseline's
unbiasedness is a statement about g_k.

The episodes never end on the book's world (the target is not absorbing), so returns are
truncated at T; with gamma = 0.9 and T = 50 the neglected tail is at most gamma^(T-t) times the
value of the state reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from mlatlas.core.config import ConfigError, require_at_least
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import seed_everything
from mlatlas.rl.returns import discounted_returns
from mlatlas.rl.tabular.bellman import (
    action_values,
    evaluate_closed_form,
    exact_values,
    optimal_values,
    transition_pi,
)
from mlatlas.rl.tabular.common import (
    GridConfig,
    finish,
    greedy_value_gap,
    make_world,
    policy_score,
)
from mlatlas.rl.tabular.episodes import Episodes, rollout
from mlatlas.rl.tabular.gridworld import GridWorld, TabularModel, parse_start
from mlatlas.rl.tabular.plots import trajectory_figure


def softmax_policy(theta: torch.Tensor) -> torch.Tensor:
    """pi(a|s, theta) = exp(theta[s, a]) / sum_b exp(theta[s, b]) (eq. 9.12), (S, A)."""
    return torch.softmax(theta, dim=1)


def grad_log_softmax(pi_s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Row s of grad_theta ln pi(a|s, theta): e_a - pi(.|s), for rows pi_s = pi(.|s) of shape
    (..., A) and actions of shape (...); every other row of the gradient is zero."""
    return torch.nn.functional.one_hot(a, pi_s.shape[-1]).to(pi_s.dtype) - pi_s


def reinforce_gradient(pi: torch.Tensor, states: torch.Tensor, actions: torch.Tensor,
                       q: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(1/B) sum_b sum_t w_t^b grad ln pi(a_t^b|s_t^b) q_t^b as an (S, A) tensor.

    ``states``, ``actions``, ``q`` and ``weights`` are (T, B); the weights mask finished steps
    and may hold gamma^t. One scatter-add over all samples, no loop over states or episodes.
    """
    coefficient = q if weights is None else q * weights
    terms = grad_log_softmax(pi[states], actions) * coefficient[..., None]
    grad = torch.zeros_like(pi)
    grad.index_add_(0, states.reshape(-1), terms.reshape(-1, pi.shape[1]))
    return grad / states.shape[1]


def reinforce_objective(theta: torch.Tensor, states: torch.Tensor, actions: torch.Tensor,
                        q: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(1/B) sum_b sum_t w_t^b ln pi(a_t^b|s_t^b, theta) q_t^b, whose autograd gradient is
    :func:`reinforce_gradient` (q and the weights are constants)."""
    log_pi = torch.log_softmax(theta, dim=1)[states, actions]
    coefficient = q if weights is None else q * weights
    return (log_pi * coefficient.detach()).sum() / states.shape[1]


def mean_return_baseline(returns: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """b_t: the mean return at time t over the episodes still running, (T, 1)."""
    alive = alive.to(returns.dtype)
    return ((returns * alive).sum(dim=1, keepdim=True)
            / alive.sum(dim=1, keepdim=True).clamp(min=1))


def update_state_baseline(b: torch.Tensor, states: torch.Tensor, returns: torch.Tensor,
                          alive: torch.Tensor, beta: float) -> torch.Tensor:
    """b(s) + beta (G_bar(s) - b(s)) for each state s visited by the (T, B) ``states`` while
    ``alive``, G_bar(s) the mean of their ``returns``; unvisited states keep b(s). (S,)."""
    weight = alive.to(returns.dtype).reshape(-1)
    index = states.reshape(-1)
    total = torch.zeros_like(b).index_add_(0, index, returns.reshape(-1) * weight)
    count = torch.zeros_like(b).index_add_(0, index, weight)
    return torch.where(count > 0, b + beta * (total / count.clamp(min=1) - b), b)


def normalised(grad: torch.Tensor) -> torch.Tensor:
    """g / ||g|| (Frobenius norm over all of theta); a zero gradient stays zero."""
    norm = grad.norm()
    return grad / norm if norm > 0 else grad


def average_value(model: TabularModel, theta: torch.Tensor, gamma: float,
                  d0: torch.Tensor) -> torch.Tensor:
    """v_bar = d0^T v_pi with v_pi = (I - gamma P_pi)^{-1} r_pi; differentiable in theta."""
    return d0 @ evaluate_closed_form(model, softmax_policy(theta), gamma)


def discounted_visits(model: TabularModel, pi: torch.Tensor, gamma: float,
                      d0: torch.Tensor) -> torch.Tensor:
    """rho(s) = sum_s' d0(s') [(I - gamma P_pi)^{-1}]_{s' s} (eq. 9.19)."""
    identity = torch.eye(model.n_states, dtype=pi.dtype)
    return torch.linalg.solve((identity - gamma * transition_pi(model, pi)).T, d0)


def exact_policy_gradient(model: TabularModel, theta: torch.Tensor, gamma: float,
                          d0: torch.Tensor) -> torch.Tensor:
    """grad_theta v_bar by Theorem 9.2: rho(s) pi(b|s) (q_pi(s, b) - v_pi(s)), (S, A)."""
    pi = softmax_policy(theta)
    v = evaluate_closed_form(model, pi, gamma)
    q = action_values(model, v, gamma)
    return discounted_visits(model, pi, gamma, d0)[:, None] * pi * (q - v[:, None])


Baseline = Literal["state", "time", "none"]


@dataclass
class Update:
    """One REINFORCE update: the new theta and state baseline b (None unless the baseline is
    'state'), the episodes it used and their returns G_t (T, B)."""

    theta: torch.Tensor
    b: torch.Tensor | None
    episodes: Episodes
    returns: torch.Tensor


def reinforce_step(theta: torch.Tensor, model: TabularModel, s0: torch.Tensor, length: int,
                   gamma: float, alpha: float, generator: torch.Generator, *,
                   baseline: Baseline = "state", b: torch.Tensor | None = None,
                   beta: float = 0.1, normalise: bool = True,
                   discount_weight: bool = True) -> Update:
    """One update from B = len(s0) episodes of ``length`` steps following pi(theta). With the
    'state' baseline, ``b`` is b_k(s) (None: zeros) and the update returns b_{k+1}."""
    pi = softmax_policy(theta)
    episodes = rollout(model, pi, s0, length, generator)
    states = episodes.states[:-1]
    returns = discounted_returns(episodes.rewards, gamma, dones=None)
    weights = episodes.alive.to(theta.dtype)
    if discount_weight:
        weights = weights * gamma ** torch.arange(length, dtype=theta.dtype)[:, None]
    if baseline == "state":
        b = torch.zeros(model.n_states, dtype=theta.dtype) if b is None else b
        q = returns - b[states]
        b = update_state_baseline(b, states, returns, episodes.alive, beta)
    elif baseline == "time":
        q = returns - mean_return_baseline(returns, episodes.alive)
    elif baseline == "none":
        q = returns
    else:
        raise ValueError(f"baseline must be 'state', 'time' or 'none', got {baseline!r}")
    grad = reinforce_gradient(pi, states, episodes.actions, q, weights)
    step = normalised(grad) if normalise else grad
    return Update(theta + alpha * step, b, episodes, returns)


# Command-line method -------------------------------------------------------------------------


@dataclass
class ReinforceConfig(GridConfig):
    METHOD: ClassVar[str] = "reinforce_tabular"

    alpha: float = 0.3
    """Step size alpha: the length of each step in theta with --normalise, else the learning
    rate of the gradient ascent."""
    episodes_per_step: int = 256
    """B: episodes run side by side for each update of theta."""
    episode_length: int = 50
    """T: steps per episode (returns are truncated there unless the episode ends first)."""
    baseline: Baseline = "state"
    """Subtracted from the returns: 'state' (a running mean of the returns from each state, made
    from earlier batches), 'time' (the batch's mean return at each time t) or 'none'."""
    baseline_rate: float = 0.1
    """beta: the rate of the state baseline's running mean."""
    normalise: bool = True
    """Step along g / ||g|| (normalised gradient ascent, Mei et al. 2021); --no-normalise takes
    the plain step alpha g of Algorithm 9.1."""
    discount_weight: bool = True
    """Weight the t-th term by gamma^t, which makes the estimate unbiased for grad v_bar
    (Theorem 9.2); --no-discount-weight is Algorithm 9.1 as printed."""
    start: str = "random"
    """First state of every episode: 'random' (uniform d0, so every state is covered) or a
    1-based cell 'row,col'."""
    steps: int = 300
    """Updates of theta (each from episodes_per_step episodes)."""
    log_every: int = 10
    """Write a row of metrics.csv every this many updates."""
    ckpt_every: int = 100
    """Write checkpoint.safetensors every this many updates (and always at the end)."""

    def check(self) -> None:
        super().check()
        if self.alpha <= 0:
            raise ConfigError(f"--alpha must be positive, got {self.alpha}")
        if not 0 < self.baseline_rate <= 1:
            raise ConfigError(f"--baseline-rate must be in (0, 1], got {self.baseline_rate}")
        require_at_least(self, 1, "episodes_per_step", "episode_length")

    def check_data(self) -> None:
        super().check_data()
        start_distribution(self, make_world(self))


def start_distribution(cfg: ReinforceConfig, world: GridWorld) -> torch.Tensor:
    """d0 over states: uniform, or all mass on the cell given by ``cfg.start``."""
    start = parse_start(cfg.start, world)
    if start is None:
        return torch.full((world.n_states,), 1.0 / world.n_states, dtype=torch.float64)
    d0 = torch.zeros(world.n_states, dtype=torch.float64)
    d0[start] = 1.0
    return d0


def train_reinforce_tabular(cfg: ReinforceConfig, run: Run | None = None,
                            progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    world = make_world(cfg)
    model = world.model
    d0 = start_distribution(cfg, world)
    v_star = optimal_values(model, cfg.gamma)
    tables = {"theta": torch.zeros(model.n_states, model.n_actions, dtype=torch.float64),
              "baseline": torch.zeros(model.n_states, dtype=torch.float64)}

    def step(k: int) -> dict[str, float]:
        s0 = torch.multinomial(d0, cfg.episodes_per_step, replacement=True, generator=generator)
        update = reinforce_step(
            tables["theta"], model, s0, cfg.episode_length, cfg.gamma, cfg.alpha, generator,
            baseline=cfg.baseline, b=tables["baseline"], beta=cfg.baseline_rate,
            normalise=cfg.normalise, discount_weight=cfg.discount_weight)
        tables["theta"], returns = update.theta, update.returns
        if update.b is not None:
            tables["baseline"] = update.b
        pi = softmax_policy(update.theta)
        # Exact scores of the new policy: a linear solve on 25 states costs less than a rollout.
        v = exact_values(model, pi, cfg.gamma)
        entropy = -(pi * pi.log()).sum(dim=1).mean()
        return {"return": returns[0].mean(), "average_value": d0 @ v,
                "greedy_value_gap": greedy_value_gap(model, pi, v_star, cfg.gamma),
                "entropy": entropy}

    fit(run, step, total_steps=cfg.steps, objects={"model": tables, "rng": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    pi = softmax_policy(tables["theta"])
    v = exact_values(model, pi, cfg.gamma)
    uniform = softmax_policy(torch.zeros_like(tables["theta"]))
    # Episodes of the learned (stochastic) policy from the four corners.
    n_rows, n_cols = world.shape
    corners = torch.tensor([world.state(1, 1), world.state(1, n_cols), world.state(n_rows, 1),
                            world.state(n_rows, n_cols)])
    paths = rollout(model, pi, corners, 2 * (n_rows + n_cols), torch.Generator().manual_seed(0))
    run.save_figure(trajectory_figure(world, paths.states.T.tolist(),
                                      "episodes of the learned policy"), "trajectories.png")
    finish(run, cfg, world, values=v, policy=pi,
           title=f"REINFORCE, {cfg.steps} updates x {cfg.episodes_per_step} episodes: "
           f"pi(a|s) and exact v_pi",
           extra={"eval/average_value": (d0 @ v).item(),
                  "eval/optimal_average_value": (d0 @ v_star).item(),
                  "eval/mean_entropy": -(pi * pi.log()).sum(dim=1).mean().item(),
                  # The same score of the policy training starts from (theta = 0, uniform).
                  "baseline/greedy_value_gap":
                      policy_score(world, uniform, cfg.gamma)["greedy_value_gap"],
                  "train/updates": cfg.steps,
                  "train/episodes": cfg.steps * cfg.episodes_per_step})
    return run
