"""Kimi k1.5 reinforcement learning (Kimi Team 2025, "Kimi k1.5", section 2.3).

Iteration i starts from pi_i = pi_old. For a prompt x, k completions y_1..y_k are sampled from
pi_old and scored by a rule, r(x, y_j) in {0, 1} (exact match). Online mirror descent maximises
E[r] - tau KL(pi_theta || pi_old), whose optimum pi*(y|x) = pi_old(y|x) exp(r(x, y) / tau) / Z
satisfies r(x, y) - tau log Z = tau log pi*(y|x) / pi_old(y|x) for every y. The surrogate regresses
the policy onto that identity on the samples, with the group mean r_bar = (1/k) sum_j r(x, y_j)
as the empirical stand-in for tau log Z:

    L(theta) = (1/k) sum_j ( r(x, y_j) - r_bar - tau log pi_theta(y_j|x) / pi_old(y_j|x) )^2

(sequence log-probabilities, summed over tokens). At theta = theta_old its gradient is
-2 tau (1/k) sum_j (r_j - r_bar) grad log pi_theta(y_j|x), a policy gradient with the group mean
as baseline; as the log-ratio grows the square pulls it back, a KL to pi_old in place of a clip.
No value network and no reference model: several gradient steps per rollout, pi_old fixed.

Length penalty (against "overthinking"): in a group with shortest and longest completions
min_len, max_len,

    lambda_j = 0.5 - (len_j - min_len) / (max_len - min_len)
    len_reward_j = lambda_j if y_j is correct, min(0, lambda_j) if it is wrong

(0 when max_len = min_len), added to r with weight ``length_weight``: among correct answers the
shorter earn more, and long wrong ones are penalised.

Curriculum: problems are drawn from the easiest difficulty levels first, one more level joining
at regular intervals until every level is in play (``--curriculum-frac`` of the run).

Data-parallel, rank r of W samples the groups of its P / W prompts (a group's r_bar and length
range are computed where it lives); L is a mean over samples, so the ranks' mean is the
one-process loss. The tokens are drawn with the whole batch's random numbers
(``common.rollout``): W ranks sample what one process samples, up to the order of
floating-point sums in the forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.precision import Precision
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import seed_everything
from mlatlas.llm.common import (
    LLMConfig,
    completion_logprobs,
    finish,
    periodic_eval,
    rollout,
    setup,
    start_metrics,
    step_generator,
    step_problems,
    warmup_steps,
)
from mlatlas.llm.tasks import parse_difficulties

__all__ = ["Config", "curriculum_levels", "kimi_loss", "length_penalty", "train"]


@dataclass
class Config(LLMConfig):
    METHOD: ClassVar[str] = "kimi"
    SHARDED: ClassVar[tuple[str, ...]] = ("prompts",)

    steps: int = 100
    """Iterations: each samples a rollout from pi_old and takes --inner-steps gradient steps."""
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    """Fraction of --steps (iterations) over which the learning rate warms up linearly, before
    its cosine decay to 0: max(1, floor(ratio * steps)) iterations."""
    tau: float = 1.0
    """tau: weight of the KL to pi_old; the target log-ratio of a sample is (r - r_bar) / tau."""
    prompts: int = 32
    """Prompts per iteration."""
    group_size: int = 8
    """k: completions sampled per prompt."""
    inner_steps: int = 2
    """Gradient steps on each rollout (pi_old stays the policy that sampled it)."""
    length_weight: float = 0.0
    """Weight of the length reward added to the exact-match reward; 0 turns the penalty off."""
    curriculum: bool = True
    """Draw problems easy-first (difficulty levels join one by one); off: all levels always."""
    curriculum_frac: float = 0.5
    """Fraction of the run after which every difficulty level is in play."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "prompts", "inner_steps")
        require_at_least(self, 2, "group_size")
        require_unit(self, "warmup_ratio")
        if self.tau <= 0:
            raise ConfigError(f"--tau must be positive, got {self.tau}")
        if self.length_weight < 0:
            raise ConfigError(f"--length-weight must be >= 0, got {self.length_weight}")
        if not 0.0 < self.curriculum_frac <= 1.0:
            raise ConfigError(f"--curriculum-frac must be in (0, 1], got {self.curriculum_frac}")


def kimi_loss(logp_seq: torch.Tensor, old_logp_seq: torch.Tensor, rewards: torch.Tensor,
              tau: float) -> torch.Tensor:
    """Mean over prompts of (1/k) sum_j (r_j - r_bar - tau (log pi - log pi_old))^2, where all
    inputs are (P, k): P prompts of k samples, sequence log-probs under pi_theta and pi_old."""
    r_bar = rewards.mean(-1, keepdim=True)
    residual = rewards - r_bar - tau * (logp_seq - old_logp_seq)
    return residual.pow(2).mean()


def length_penalty(lengths: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Length rewards (P, k) of groups of completion lengths and 0/1 correctness, each (P, k):
    lambda = 0.5 - (len - min_len) / (max_len - min_len) per group, kept for correct
    completions, min(0, lambda) for wrong ones, 0 in groups whose lengths are all equal."""
    lengths = lengths.float()
    min_len = lengths.min(-1, keepdim=True).values
    max_len = lengths.max(-1, keepdim=True).values
    spread = max_len - min_len
    lam = torch.where(spread > 0, 0.5 - (lengths - min_len) / spread.clamp(min=1e-12),
                      torch.zeros_like(lengths))
    return torch.where(correct > 0, lam, lam.clamp(max=0.0))


def curriculum_levels(step: int, steps: int, levels: Sequence[int], frac: float = 0.5
                      ) -> list[int]:
    """The difficulty levels in play at ``step`` of ``steps``: the easiest alone at first, one
    more joining every frac * steps / len(levels) steps, all of them from step frac * steps."""
    levels = sorted(levels)
    stage = frac * steps / len(levels)
    joined = 1 + math.floor((step - 1) / stage) if stage > 0 else len(levels)
    return levels[:max(1, min(len(levels), joined))]


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    seed_everything(cfg.seed)
    s = setup(cfg, run)
    start_metrics(run, cfg, s)
    levels = parse_difficulties(cfg.difficulty, s.task)
    by_level = {d: [p for p in s.train_items if p.difficulty == d] for d in levels}
    optimizer = torch.optim.AdamW(s.policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    precision = Precision(cfg.precision, s.device)
    k = cfg.group_size

    def step_fn(step: int) -> dict[str, float]:
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, warmup_steps(cfg)))
        in_play = (curriculum_levels(step, cfg.steps, levels, cfg.curriculum_frac)
                   if cfg.curriculum else levels)
        pool = [p for d in in_play for p in by_level[d]]
        generator = step_generator(cfg.seed, step, s.device)
        items = step_problems(pool, cfg.prompts, generator)
        with precision.autocast():  # this rank's groups
            batch = rollout(s.policy, s.tokenizer, s.task, [p for p in items for _ in range(k)],
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, generator=generator, sharded=True)
        args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                batch.completion_mask)
        correct = batch.correct.view(-1, k)
        lengths = batch.lengths.view(-1, k)
        len_reward = length_penalty(lengths, correct)
        rewards = correct + cfg.length_weight * len_reward
        with torch.no_grad(), precision.autocast():
            old_logp_seq = completion_logprobs(s.policy, *args).sum(-1).view(-1, k)
            kl = (old_logp_seq - completion_logprobs(s.reference, *args).sum(-1).view(-1, k))
        losses = []
        for _ in range(cfg.inner_steps):
            with precision.autocast():
                logp_seq = completion_logprobs(s.policy, *args).sum(-1).view(-1, k)
            loss = kimi_loss(logp_seq, old_logp_seq, rewards, cfg.tau)
            optimizer.zero_grad(set_to_none=True)
            precision.backward(loss)
            precision.step(optimizer, s.policy.parameters(), cfg.grad_clip)
            losses.append(loss.item())
        with torch.no_grad():
            log_ratio = (logp_seq.detach() - old_logp_seq).abs().mean()
        metrics = {"loss": sum(losses) / len(losses), "reward": correct.mean().item(),
                   "len_reward": len_reward.mean().item(),
                   "length": lengths.float().mean().item(),
                   "kl": kl.mean().item(), "log_ratio": log_ratio.item(),
                   "max_level": float(max(in_play))}
        # Over the correct samples of every rank (the ranks hold different numbers of them).
        n_correct = distributed.all_reduce_sum(correct.sum())
        if n_correct > 0:
            total = distributed.all_reduce_sum((lengths * correct).sum())
            metrics["length_correct"] = (total / n_correct).item()
        metrics.update({f"eval_{n}" if n in ("length", "length_correct") else n: v
                        for n, v in periodic_eval(cfg, s, step).items()})
        return metrics

    fit(run, step_fn, total_steps=cfg.steps,
        objects={"model": s.policy, "optimizer": optimizer, "precision": precision},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress,
        latest=("max_level",))
    finish(run, cfg, s)
    return run
