"""PPO-RLHF with the PPO-max choices (Ouyang et al. 2022; Zheng et al. 2023, "Secrets of RLHF in
Large Language Models Part I: PPO").

Each step samples completions y ~ pi_old(. | x) and scores them with the reward model r_phi (or,
with ``--reward verifier``, the task's exact-match rule). PPO-max's choices, each a field:

- reward normalisation and clipping: s = clip((r_phi(x, y) - mu) / sigma, -c, c), with mu and
  sigma running statistics of every score seen (``RunningMeanStd``);
- a token-level KL penalty to the SFT reference, so each token is an action with reward

      r_t = -beta (log pi_old(y_t | .) - log pi_ref(y_t | .)) + 1[t = last] s;

- GAE over the completion's tokens (gamma, lambda), advantages whitened over the batch;
- a critic V_psi(x, y_<t) initialised from the reward model (its head read at every position)
  and trained alone for ``critic_warmup`` steps before the policy moves;
- the clipped surrogate with rho_t = pi_theta / pi_old,

      L^CLIP = -E_t[ min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) ],

  a clipped value loss L^V = E_t[ max((V - R_t)^2, (V_old + clip(V - V_old, -eps_v, eps_v)
  - R_t)^2) ] / 2 with returns R_t = A_t + V_old, global gradient-norm clipping, and an optional
  pre-training term: ``ptx_coef`` times the SFT loss on the task's worked solutions (InstructGPT's
  PPO-ptx), which holds the policy near the supervised data.

Data-parallel, rank r of W samples and scores its shard of the step's prompts, then every rank
gathers the whole rollout, so the score statistics, GAE and the advantage whitening are the
global batch's, and each minibatch (drawn from the whole rollout) is split over the ranks, its
token means divided by the minibatch's global token count (``common.token_mean``). The tokens
are drawn with the whole batch's random numbers (``common.rollout``): W ranks sample what one
process samples, up to the order of floating-point sums in the forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import seed_everything
from mlatlas.core.stats import RunningMeanStd
from mlatlas.llm.common import (
    LLMConfig,
    completion_logprobs,
    finish,
    masked_mean,
    periodic_eval,
    rollout,
    setup,
    start_metrics,
    step_generator,
    step_problems,
    token_mean,
)
from mlatlas.llm.reward_model import RewardModel, load_reward_model
from mlatlas.llm.sft import solution_loss
from mlatlas.rl.returns import gae

__all__ = ["Config", "normalise_scores", "clipped_value_loss", "ppo_policy_loss",
           "token_rewards", "train"]


@dataclass
class Config(LLMConfig):
    METHOD: ClassVar[str] = "ppo_rlhf"
    SHARDED: ClassVar[tuple[str, ...]] = ("prompts_per_step", "minibatch_size")

    steps: int = 60
    lr: float = 5e-5
    reward: Literal["model", "verifier"] = "model"
    """'model' (the reward model of --reward-model) or 'verifier' (the task's exact match)."""
    reward_model: str = ""
    """A reward_model run: the reward, and the critic's starting point."""
    prompts_per_step: int = 256
    """Prompts sampled per step (one completion each)."""
    ppo_epochs: int = 2
    """Passes over each rollout."""
    minibatch_size: int = 64
    """Completions per gradient step."""
    clip_eps: float = 0.2
    """Policy ratio clip epsilon."""
    value_clip: float = 0.2
    """Critic clip eps_v around its old prediction; 0 turns value clipping off."""
    beta: float = 0.05
    """Token-level KL penalty weight to the SFT reference."""
    gamma: float = 1.0
    """Discount over tokens."""
    lam: float = 0.95
    """GAE lambda."""
    reward_clip: float = 5.0
    """Clip of the normalised score, c; 0 turns normalisation and clipping off."""
    critic_lr: float = 5e-5
    """Adam learning rate of the critic."""
    critic_warmup: int = 5
    """Steps that train the critic alone before the policy is updated."""
    ptx_coef: float = 0.0
    """Weight of the pre-training (SFT) loss on worked solutions mixed into the policy loss."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "prompts_per_step", "ppo_epochs", "minibatch_size")
        require_unit(self, "gamma", "lam")
        if min(self.clip_eps, self.value_clip, self.beta, self.reward_clip, self.ptx_coef,
               self.critic_warmup) < 0:
            raise ConfigError("clip ranges, --beta, --reward-clip, --ptx-coef and "
                              "--critic-warmup must be >= 0")

    def check_data(self) -> None:
        super().check_data()
        if self.reward == "model":
            if not self.reward_model:
                raise ConfigError("ppo_rlhf --reward model needs --reward-model RUN_DIR (a "
                                  "reward_model run), or use --reward verifier")
            load_reward_model(self.reward_model)


def normalise_scores(score: torch.Tensor, stats: RunningMeanStd, clip: float) -> torch.Tensor:
    """(score - mu) / (sigma + 1e-8) clipped to [-clip, clip], with the running statistics of
    every score seen (``stats.update`` first)."""
    return ((score - stats.mean) / (stats.var.sqrt() + 1e-8)).clamp(-clip, clip)


def token_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                  mask: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, L) per-token rewards: -beta (log pi - log pi_ref) on every real token, plus the
    sequence score (B,) on its last real token."""
    rewards = -beta * (logp - ref_logp) * mask
    last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))


def token_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     gamma: float, lam: float) -> torch.Tensor:
    """GAE over each completion's tokens, (B, L); the sequence ends after its last real token."""
    mask = mask.to(rewards.dtype)
    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1) * next_mask
    end = mask * (1 - next_mask)
    advantages = gae(*(t.T for t in (rewards * mask, values * mask, next_values, end, end)),
                     gamma, lam).T
    return advantages * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L^CLIP averaged over real tokens, fraction of tokens clipped); data-parallel, this
    rank's shares of the global minibatch's token means (``token_mean``)."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * advantages,
                          ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return -token_mean(surrogate, mask), token_mean(clipped, mask)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, value_clip: float) -> torch.Tensor:
    """E_t[max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)] / 2 over real tokens;
    eps_v = 0 is the plain squared error (data-parallel: this rank's share, ``token_mean``)."""
    loss = (values - returns) ** 2
    if value_clip > 0:
        clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * token_mean(loss, mask)


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    cfg.check_data()
    run = run or Run.create(cfg.METHOD, cfg)
    seed_everything(cfg.seed)
    s = setup(cfg, run)
    if cfg.reward == "model":
        reward_model, rm_tokenizer = load_reward_model(cfg.reward_model, s.device)
        if rm_tokenizer.backend.to_str() != s.tokenizer.backend.to_str():
            raise ConfigError(f"{cfg.reward_model} uses another tokenizer than {cfg.init_from}")
        reward_model.eval().requires_grad_(False)
        compile_module(reward_model, cfg.compile)
        critic = RewardModel(reward_model.cfg).to(s.device)
        critic.load_state_dict(reward_model.state_dict())
    else:
        reward_model, critic = None, RewardModel.from_policy(s.policy)
    start_metrics(run, cfg, s)
    policy_optimizer = torch.optim.Adam(s.policy.parameters(), lr=cfg.lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr)
    precision = Precision(cfg.precision, s.device)
    critic_precision = Precision(cfg.precision, s.device)  # its own fp16 loss scale
    # No prior count: the first batch of scores sets the statistics alone.
    score_stats = RunningMeanStd(dtype=torch.float32, count=0.0).to(s.device)
    # The critic is read through values(), not forward(), so that is what --compile compiles.
    values_fn = torch.compile(critic.values) if cfg.compile else critic.values

    def critic_values(ids, mask, P):
        # V(x, y_<t) is read where the logits for y_t are: the position before the token.
        return values_fn(ids, mask)[:, P - 1:-1]

    def sequences(prompt_ids, prompt_mask, completion_ids, completion_mask):
        return (torch.cat([prompt_ids, completion_ids], 1),
                torch.cat([prompt_mask, completion_mask], 1))

    def step_fn(step: int) -> dict[str, float]:
        generator = step_generator(cfg.seed, step)
        items = step_problems(s.train_items, cfg.prompts_per_step, generator)
        with precision.autocast():  # this rank's rows
            batch = rollout(s.policy, s.tokenizer, s.task, items,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, generator=generator, sharded=True)
        P = batch.prompt_ids.shape[1]
        args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
        ids, mask = sequences(*args)
        with torch.no_grad(), precision.autocast():
            scored = (completion_logprobs(s.policy, *args),
                      completion_logprobs(s.reference, *args),
                      critic_values(ids, mask, P) * batch.completion_mask,
                      reward_model(ids, mask) if reward_model is not None else batch.correct,
                      batch.correct, batch.lengths)
        # Every rank holds the whole rollout from here on, as one process does.
        args = tuple(map(distributed.all_gather, args))
        old_logp, ref_logp, old_values, raw_score, correct, lengths = map(distributed.all_gather,
                                                                           scored)
        ids, mask = sequences(*args)
        c_mask = args[3].float()
        with torch.no_grad():
            if cfg.reward_clip > 0:
                score_stats.update(raw_score)
                score = normalise_scores(raw_score, score_stats, cfg.reward_clip)
            else:
                score = raw_score
            rewards = token_rewards(score, old_logp, ref_logp, c_mask, cfg.beta)
            advantages = token_advantages(rewards, old_values, c_mask, cfg.gamma, cfg.lam)
            returns = advantages + old_values
            mean, std = masked_mean(advantages, c_mask), masked_mean(
                (advantages - masked_mean(advantages, c_mask)) ** 2, c_mask).sqrt()
            advantages = (advantages - mean) / (std + 1e-8) * c_mask
        update_policy = step > cfg.critic_warmup
        stats = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
        updates = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(items), generator=generator)
            for minibatch in order.split(cfg.minibatch_size):
                idx = distributed.shard(minibatch)  # this rank's rows of the minibatch
                with precision.autocast():
                    values = critic_values(ids[idx], mask[idx], P)
                    value_loss = clipped_value_loss(values, old_values[idx], returns[idx],
                                                    c_mask[idx], cfg.value_clip)
                critic_optimizer.zero_grad(set_to_none=True)
                critic_precision.backward(value_loss)
                critic_precision.step(critic_optimizer, critic.parameters(), cfg.grad_clip)
                stats["value_loss"] += value_loss.item()
                if update_policy:
                    with precision.autocast():
                        logp = completion_logprobs(s.policy, *(t[idx] for t in args))
                        loss, clip_fraction = ppo_policy_loss(logp, old_logp[idx],
                                                              advantages[idx], c_mask[idx],
                                                              cfg.clip_eps)
                    stats["policy_loss"] += loss.item()
                    stats["clip_fraction"] += clip_fraction.item()
                    if cfg.ptx_coef > 0:
                        solutions = step_problems(s.train_items, len(minibatch), generator)
                        with precision.autocast():
                            loss = loss + cfg.ptx_coef * solution_loss(
                                s.policy, s.tokenizer, distributed.shard_list(solutions))
                    policy_optimizer.zero_grad(set_to_none=True)
                    precision.backward(loss)
                    precision.step(policy_optimizer, s.policy.parameters(), cfg.grad_clip)
                updates += 1
        kl = ((old_logp - ref_logp) * c_mask).sum(-1).mean()
        return {"reward": raw_score.float().mean().item(), "correct": correct.mean().item(),
                "kl": kl.item(), "length": lengths.float().mean().item(),
                **{k: v / updates for k, v in stats.items()},
                **periodic_eval(cfg, s, step)}

    fit(run, step_fn, total_steps=cfg.steps,
        objects={"model": s.policy, "optimizer": policy_optimizer, "precision": precision,
                 "critic": critic, "critic_optimizer": critic_optimizer,
                 "critic_precision": critic_precision, "score_stats": score_stats},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    finish(run, cfg, s)
    return run
