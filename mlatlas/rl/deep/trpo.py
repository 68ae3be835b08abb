"""Trust-region policy optimisation (Schulman et al. 2015) with GAE advantages (Schulman et al.
2016), in the practical form of Achiam's Spinning Up notes.

With the probability ratio rho_t(theta) = pi_theta(a_t | s_t) / pi_theta_old(a_t | s_t) and GAE
advantages A_t = sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_{t+1} + gamma v(s_{t+1}) - v(s_t)
(:func:`mlatlas.rl.returns.gae`, normalised over the rollout), each update solves

    maximise_theta  L(theta) = E_t[ rho_t(theta) A_t ]
    subject to      KL_bar(theta) = E_t[ KL(pi_theta_old(. | s_t) || pi_theta(. | s_t)) ] <= delta

approximately: L linearised and KL_bar expanded to second order around theta_old,

    L(theta) ~ L(theta_old) + g^T (theta - theta_old),         g = grad_theta L(theta_old)
    KL_bar(theta) ~ 1/2 (theta - theta_old)^T F (theta - theta_old),  F = Hessian of KL_bar
                                                                     at theta_old (the Fisher)

whose solution is the natural gradient step of maximal length

    s = F^{-1} g,    theta = theta_old + beta s,    beta = sqrt(2 delta / (s^T F s)).

s comes from conjugate gradient, which needs only products F v; each is one double backward pass,
F v = grad_theta((grad_theta KL_bar)^T v), plus a damping c v that keeps F + c I well
conditioned. The quadratic model can be wrong, so a backtracking line search tries
theta_old + alpha^j beta s for j = 0, 1, ..., J - 1 and keeps the first one with
KL_bar <= delta and L(theta) > L(theta_old); when none passes, theta stays theta_old.

The critic v_phi is fitted separately, after the policy step, by ``n_critic_updates`` epochs of
minibatch Adam on  E_t[(v_phi(s_t) - R_t)^2]  with R_t = A_t + v_old(s_t) (un-normalised A_t).
With ``sde`` a continuous policy explores by gSDE (:mod:`~mlatlas.rl.deep.gsde`); the KL is then
that of the state-dependent Gaussians, and the Fisher includes the gSDE scale matrix log sigma.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.run import Run
from mlatlas.rl.deep.config import DeepRLConfig, check_sde
from mlatlas.rl.deep.evaluation import evaluate
from mlatlas.rl.deep.loop import Agent, prepare, train_agent
from mlatlas.rl.deep.rollout import actor_and_critic, collect, make_actor, standardize

__all__ = ["Config", "conjugate_gradient", "evaluate", "fisher_vector_product", "make_actor",
           "train", "trpo_step"]


@dataclass
class Config(DeepRLConfig):
    METHOD: ClassVar[str] = "trpo"

    lr: float = 1e-3
    """Learning rate of the critic's Adam (the policy moves by the trust-region step)."""
    # In environment steps, every 10 and 100 updates of the CartPole preset's 1024-step
    # rollouts (the docstrings are DeepRLConfig's).
    log_every: int = 10_000
    ckpt_every: int = 100_000
    n_steps: int = 256
    """Rollout length per environment; a rollout has n_steps x num_envs transitions."""
    lam: float = 0.95
    """GAE lambda: 1 gives the discounted return minus v(s), 0 the one-step TD error."""
    log_std_init: float = 0.0
    """Initial log sigma of a Gaussian policy (continuous actions); with --sde, of every entry
    of gSDE's (features x actions) matrix log sigma."""
    sde: bool = False
    """Explore by generalised state-dependent exploration (gSDE; continuous actions): the noise
    z(s) theta_eps of the policy's features and a random matrix held fixed between draws,
    instead of fresh Gaussian noise at every step."""
    sde_sample_freq: int = -1
    """Steps between draws of gSDE's exploration matrix theta_eps; -1 draws it once at the
    start of each rollout."""
    batch_size: int = 128
    """Minibatch size of the critic's regression."""
    n_critic_updates: int = 10
    """Passes of the critic's regression over each rollout."""
    max_kl: float = 0.01
    """delta, the bound on the mean KL(pi_old || pi_new) of one policy step."""
    cg_iters: int = 15
    """Conjugate gradient iterations for the natural gradient direction s = F^-1 g."""
    cg_damping: float = 0.1
    """c, added to the Fisher as F + c I."""
    line_search_shrink: float = 0.5
    """alpha, the factor shrinking the step at each backtrack of the line search."""
    line_search_steps: int = 10
    """J, the steps the line search tries before it keeps the old policy."""

    # After rl-baselines3-zoo's hyperparams/trpo.yml for sb3-contrib's TRPO (its "normalize"
    # is both normalisations here; Pendulum and MountainCarContinuous there use gSDE, which on
    # Pendulum here, with log sigma -1, needed as many steps as plain noise: 64k against 66k,
    # seeds 0-2). Spreading a rollout over 8 environments (fewer sequential steps) and, for
    # CartPole and Pendulum, delta = 0.02 were measured to solve faster in wall-clock; so were
    # Pendulum's critic minibatches of 256 (half the Adam steps), at ~10% more env steps.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "CartPole-v1": dict(num_envs=8, n_steps=128, batch_size=512, cg_damping=1e-3, lam=0.98,
                            gamma=0.99, lr=1e-3, n_critic_updates=20, max_kl=0.02,
                            steps=100_000),
        "Acrobot-v1": dict(num_envs=8, n_steps=256, normalize_obs=True, normalize_reward=True,
                           steps=100_000),
        "Pendulum-v1": dict(num_envs=8, n_steps=256, gamma=0.9, n_critic_updates=15,
                            max_kl=0.02, batch_size=256, steps=100_000),
        # Half the zoo's rollout (its default 2048): 50k steps then make 24 updates, not 12.
        "MountainCarContinuous-v0": dict(num_envs=2, n_steps=1024, normalize_obs=True,
                                         normalize_reward=True, steps=50_000),
    }

    def check(self) -> None:
        super().check()
        check_sde(self)
        require_at_least(self, 1, "n_steps", "batch_size", "n_critic_updates", "cg_iters",
                         "line_search_steps")
        require_unit(self, "lam")
        if self.max_kl <= 0:
            raise ConfigError(f"--max-kl must be positive, got {self.max_kl}")
        if self.cg_damping < 0:
            raise ConfigError(f"--cg-damping must be non-negative, got {self.cg_damping}")
        if not 0.0 < self.line_search_shrink < 1.0:
            raise ConfigError(f"--line-search-shrink must be in (0, 1), "
                              f"got {self.line_search_shrink}")


# The maths -------------------------------------------------------------------------------------
def conjugate_gradient(Avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       iters: int = 10, residual_tol: float = 1e-10) -> torch.Tensor:
    """x with A x = b for a symmetric positive definite A known only through ``Avp(v) = A v``.

    ``b`` is a vector (n,); stops after ``iters`` iterations or once the squared residual
    ||b - A x||^2 is at most ``residual_tol``. Exact after n iterations in exact arithmetic.
    """
    if b.dim() != 1:
        raise ValueError(f"conjugate_gradient needs a vector b, got shape {tuple(b.shape)}")
    if iters < 0:
        raise ValueError(f"iters must be non-negative, got {iters}")
    x = torch.zeros_like(b)
    r = b.clone()  # residual b - A x at x = 0
    p = r.clone()
    rr = r @ r
    for _ in range(iters):
        if rr <= residual_tol:
            break
        Ap = Avp(p)
        alpha = rr / (p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_next = r @ r
        p = r + (rr_next / rr) * p
        rr = rr_next
    return x


def _flat(tensors: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]
          ) -> torch.Tensor:
    # A parameter the function does not touch has gradient None: it contributes zeros.
    return torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1)
                      for t, p in zip(tensors, params, strict=True)])


def flat_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """theta: the parameters concatenated into one detached vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in params])


@torch.no_grad()
def set_flat_params(params: Sequence[torch.Tensor], theta: torch.Tensor) -> None:
    """Copy the vector ``theta`` into ``params`` in place (their storage stays their own)."""
    sizes = [p.numel() for p in params]
    if theta.numel() != sum(sizes):
        raise ValueError(f"theta has {theta.numel()} entries, the parameters {sum(sizes)}")
    for p, chunk in zip(params, torch.split(theta, sizes), strict=True):
        p.copy_(chunk.view_as(p))


def fisher_operator(kl: torch.Tensor, params: Sequence[torch.Tensor], damping: float
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> F v + c v, with F the Hessian of the scalar ``kl`` (the mean KL, built with a graph)
    with respect to ``params``. The gradient of ``kl`` is taken once and reused by every
    product, which then costs one backward pass."""
    params = list(params)
    grad_kl = _flat(torch.autograd.grad(kl, params, create_graph=True, allow_unused=True),
                    params)

    def Fv(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(grad_kl @ v, params, retain_graph=True, allow_unused=True)
        return _flat(hv, params) + damping * v

    return Fv


def fisher_vector_product(kl_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                          v: torch.Tensor, damping: float) -> torch.Tensor:
    """(F + c I) v, with F = Hessian of ``kl_fn()`` (the mean KL(pi_old || pi_theta), evaluated at
    the current parameters) with respect to ``params``, by double backprop; ``v`` is flat (n,)."""
    params = list(params)
    n = sum(p.numel() for p in params)
    if v.shape != (n,):
        raise ValueError(f"v must have shape ({n},) like the flattened parameters, "
                         f"got {tuple(v.shape)}")
    return fisher_operator(kl_fn(), params, damping)(v)


def trpo_step(params: Sequence[torch.Tensor], surrogate_fn: Callable[[], torch.Tensor],
              kl_fn: Callable[[], torch.Tensor], max_kl: float, damping: float = 0.1,
              cg_iters: int = 10, shrink: float = 0.5, max_backtracks: int = 10
              ) -> dict[str, float]:
    """One trust-region policy step, in place on ``params``.

    ``surrogate_fn()`` is L(theta) and ``kl_fn()`` is KL_bar(theta) = mean KL(pi_old || pi_theta),
    both evaluated at the parameters' current values (theta_old on entry). The step is the
    natural gradient s = (F + c I)^-1 g from ``cg_iters`` of conjugate gradient, scaled to
    beta = sqrt(2 delta / s^T (F + c I) s), and shrunk by ``shrink`` until KL_bar <= ``max_kl``
    and L improves, at most ``max_backtracks`` tries; otherwise theta_old is restored.

    Returns floats: ``accepted`` (1 or 0), ``kl`` and ``surrogate_improvement`` of the step kept
    (0 when rejected), ``step_fraction`` alpha^j of the full step kept (0 when rejected),
    ``backtracks`` j (the tries that failed) and ``expected_improvement`` g^T beta s of the full
    step under the linear model.
    """
    if max_kl <= 0:
        raise ValueError(f"max_kl must be positive, got {max_kl}")
    if not 0.0 < shrink < 1.0:
        raise ValueError(f"shrink must be in (0, 1), got {shrink}")
    if max_backtracks < 1:
        raise ValueError(f"max_backtracks must be at least 1, got {max_backtracks}")
    params = [p for p in params if p.requires_grad]
    surrogate_old = surrogate_fn()
    g = _flat(torch.autograd.grad(surrogate_old, params, allow_unused=True), params)
    surrogate_old = surrogate_old.detach()
    Fv = fisher_operator(kl_fn(), params, damping)
    s = conjugate_gradient(Fv, g, cg_iters)
    sFs = float(s @ Fv(s))
    del Fv  # frees the KL's double-backward graph before the line search
    result = {"accepted": 0.0, "kl": 0.0, "surrogate_improvement": 0.0, "step_fraction": 0.0,
              "backtracks": 0.0, "expected_improvement": 0.0}
    # A zero gradient (all advantages equal) or a broken curvature leaves nothing to step along.
    if not (sFs > 0.0 and math.isfinite(sFs)):
        return result
    beta = math.sqrt(2.0 * max_kl / sFs)
    full_step = beta * s
    result["expected_improvement"] = float(g @ full_step)
    theta_old = flat_params(params)
    with torch.no_grad():
        for j in range(max_backtracks):
            fraction = shrink ** j
            set_flat_params(params, theta_old + fraction * full_step)
            kl, surrogate = float(kl_fn()), surrogate_fn()
            improvement = float(surrogate - surrogate_old)
            if kl <= max_kl and improvement > 0.0:
                result.update(accepted=1.0, kl=kl, surrogate_improvement=improvement,
                              step_fraction=fraction, backtracks=float(j))
                return result
        set_flat_params(params, theta_old)
    result["backtracks"] = float(max_backtracks)
    return result


def fit_critic(critic: nn.Module, optimizer: torch.optim.Optimizer, obs: torch.Tensor,
               returns: torch.Tensor, epochs: int, batch_size: int,
               generator: torch.Generator) -> float:
    """``epochs`` passes of shuffled minibatch regression of v(s_t) on R_t; the mean loss."""
    n = len(obs)
    minibatch = min(batch_size, n)
    total, count = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - minibatch + 1, minibatch):
            idx = order[start:start + minibatch]
            loss = nn.functional.mse_loss(critic(obs[idx]), returns[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            count += 1
    return total / count


# The agent -------------------------------------------------------------------------------------
def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run, generator, interaction = prepare(cfg, run)
    actor, critic = actor_and_critic(cfg, interaction.spaces)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=cfg.lr, eps=1e-5, fused=True)
    params = list(actor.parameters())

    def update(k: int) -> dict[str, Any]:
        rollout = collect(interaction, actor, critic, cfg.n_steps, generator)
        advantages, returns = rollout.advantages(cfg.gamma, cfg.lam)
        obs, actions = rollout.obs.flatten(0, 1), rollout.actions.flatten(0, 1)
        A = standardize(advantages.flatten(0, 1))
        with torch.no_grad():
            pi_old = actor.distribution(obs)
            log_prob_old = actor.log_prob(pi_old, actions)

        def surrogate() -> torch.Tensor:
            log_prob = actor.log_prob(actor.distribution(obs), actions)
            return ((log_prob - log_prob_old).exp() * A).mean()

        def mean_kl() -> torch.Tensor:
            return actor.kl(pi_old, actor.distribution(obs)).mean()

        metrics = trpo_step(params, surrogate, mean_kl, cfg.max_kl, cfg.cg_damping,
                            cfg.cg_iters, cfg.line_search_shrink, cfg.line_search_steps)
        metrics["value_loss"] = fit_critic(critic, critic_optimizer, obs, returns.flatten(0, 1),
                                           cfg.n_critic_updates, cfg.batch_size, generator)
        metrics["entropy"] = float(actor.entropy(pi_old).mean())
        return metrics

    # The policy moves by the trust-region step; the only optimizer is the critic's.
    agent = Agent(interaction, update, {"model": actor, "critic": critic,
                                        "critic_optimizer": critic_optimizer,
                                        "rng": generator},
                  actor.act, cfg.n_steps * cfg.num_envs)
    return train_agent(cfg, run, agent, progress)
