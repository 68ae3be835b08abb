"""GRPO (Shao et al. 2024, DeepSeekMath) and Dr. GRPO (Liu et al. 2025).

For each prompt q the old policy pi_old samples a group of G completions o_1..o_G, scored by
the task's rule-based reward r_i = 1[answer correct] + w_fmt * 1[well formed]. No value
network: the baseline is the group itself, and every token of o_i shares the advantage

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)        (Dr. GRPO: no std division)

With the ratio rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t}),
GRPO maximises the clipped surrogate minus a KL penalty to the frozen reference pi_ref,

    J_{i,t} = min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps, 1 + eps) A_i) - beta KL_{i,t},
    KL_{i,t} = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1,

where KL_{i,t} is Schulman's k3 estimator of KL(pi_theta || pi_ref) on the sampled token:
non-negative, and unbiased because E_{o ~ pi_theta}[pi_ref / pi_theta] = 1. The loss is
-J averaged in one of three ways (``loss_type``):

    grpo     L = -1/G sum_i 1/|o_i| sum_t J_{i,t}          (DeepSeekMath: per sequence)
    token    L = -1/(sum_i |o_i|) sum_i sum_t J_{i,t}     (DAPO; TRL's "bnpo")
    dr_grpo  L = -1/(G L_max) sum_i sum_t J_{i,t}          (Dr. GRPO, L_max = max_new_tokens)

The per-sequence 1/|o_i| of GRPO gives short wrong answers a larger per-token penalty than
long wrong ones (a bias toward long wrong answers), and the std division up-weights groups
that are nearly all right or all wrong; Dr. GRPO removes both. Each batch of P prompts x G
completions takes ``num_iterations`` (mu) gradient steps: pi_old is the policy that sampled,
so on the first one rho = 1, yet its gradient grad rho = grad log pi_theta is not zero.

Data-parallel, rank r of W samples the groups of its P / W prompts (a group never spans two
ranks, so its advantages are computed where it lives). grpo's and dr_grpo's losses are means
over completions; token's divides by the token count of the whole batch
(``common.token_mean``); so the ranks' mean is the one-process loss. The tokens are drawn with
the whole batch's random numbers (``common.rollout``): a run at W ranks samples what one
process samples, up to the order of floating-point sums in the forward passes.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.precision import Precision
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import seed_everything
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
    warmup_steps,
)

__all__ = ["Config", "LOSS_TYPES", "group_advantages", "grpo_loss", "k3_kl", "train"]

LossType = Literal["grpo", "token", "dr_grpo"]
LOSS_TYPES = typing.get_args(LossType)


@dataclass
class Config(LLMConfig):
    METHOD: ClassVar[str] = "grpo"
    SHARDED: ClassVar[tuple[str, ...]] = ("prompts_per_step",)

    steps: int = 100
    lr: float = 5e-5
    warmup_ratio: float = 0.1
    """Fraction of --steps over which the learning rate warms up linearly, before its cosine
    decay to 0: max(1, floor(ratio * steps)) steps."""
    prompts_per_step: int = 64
    """Prompts per step, each sampled group_size times."""
    group_size: int = 8
    """Completions per prompt, G (TRL's num_generations)."""
    beta: float = 0.04
    """Weight of the k3 KL penalty to the reference (DeepSeekMath 0.04; 0 skips pi_ref)."""
    clip_eps: float = 0.2
    """Ratio clip range epsilon (TRL's epsilon)."""
    num_iterations: int = 1
    """Gradient steps mu on each sampled batch (TRL's num_iterations)."""
    loss_type: LossType = "grpo"
    """Averaging of the per-token objective: grpo (per sequence, then over sequences), token
    (over all tokens of the batch) or dr_grpo (sum over tokens / max_new_tokens, no std)."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (GRPO); dr_grpo never does."""
    format_weight: float = 0.1
    """Weight of the format reward added to the exact-match reward."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "prompts_per_step", "num_iterations")
        require_at_least(self, 2, "group_size")
        require_unit(self, "warmup_ratio")
        if self.beta < 0 or self.clip_eps <= 0 or self.format_weight < 0:
            raise ConfigError("--beta and --format-weight must be >= 0 and --clip-eps > 0")


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4
                     ) -> torch.Tensor:
    """A_i = (r_i - mean_group r) / (std_group r + eps) for rewards (P, G) of P groups of G;
    without ``scale`` only the mean is removed (Dr. GRPO). A group of equal rewards gives 0."""
    advantages = rewards - rewards.mean(-1, keepdim=True)
    if scale:
        advantages = advantages / (rewards.std(-1, keepdim=True) + eps)
    return advantages


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 = pi_ref/pi - log(pi_ref/pi) - 1 per token, from log-probabilities of
    tokens sampled from pi: >= 0, 0 where the two agree, mean KL(pi || pi_ref)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, eps: float = 0.2,
              beta: float = 0.04, loss_type: str = "grpo", max_tokens: int | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-J averaged by ``loss_type`` (module docstring) and its stats.

    logp, old_logp, ref_logp and mask are (B, L) per-token values of B completions (ref_logp
    may be None when beta is 0); advantages (B,). ``max_tokens`` is dr_grpo's constant L_max
    (default L). Stats: kl (k3 summed over each completion, mean over completions) and
    clip_frac (fraction of tokens whose clipped branch is active, so get no gradient).
    Data-parallel, the token means are this rank's shares of the global batch's
    (``token_mean``; every rank calls this together).
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    mask = mask.to(logp.dtype)
    A = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = ratio * A, torch.clamp(ratio, 1 - eps, 1 + eps) * A
    objective = torch.minimum(unclipped, clipped)
    stats = {"clip_frac": token_mean((clipped < unclipped).to(logp.dtype), mask).detach()}
    if ref_logp is not None and beta > 0:
        kl = k3_kl(logp, ref_logp)
        objective = objective - beta * kl
        stats["kl"] = (kl * mask).sum(-1).mean().detach()
    if loss_type == "grpo":
        loss = -masked_mean(objective, mask, dim=-1).mean()
    elif loss_type == "token":
        loss = -token_mean(objective, mask)
    else:
        loss = -(objective * mask).sum() / (mask.shape[0] * (max_tokens or mask.shape[1]))
    return loss, stats


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    seed_everything(cfg.seed)
    s = setup(cfg, run)
    policy, reference = s.policy, s.reference if cfg.beta > 0 else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    precision = Precision(cfg.precision, s.device)
    start_metrics(run, cfg, s)
    G = cfg.group_size
    scale = cfg.scale_rewards and cfg.loss_type != "dr_grpo"

    def step_fn(step: int) -> dict[str, float]:
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, warmup_steps(cfg)))
        generator = step_generator(cfg.seed, step, s.device)
        items = step_problems(s.train_items, cfg.prompts_per_step, generator)
        with precision.autocast():  # this rank's groups
            batch = rollout(policy, s.tokenizer, s.task, [p for p in items for _ in range(G)],
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, generator=generator, sharded=True)
        rewards = batch.correct + cfg.format_weight * batch.formatted
        grouped = rewards.view(-1, G)
        advantages = group_advantages(grouped, scale).view(-1)
        args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                batch.completion_mask)
        ref_logp = None
        if reference is not None:
            with torch.no_grad(), precision.autocast():
                ref_logp = completion_logprobs(reference, *args)
        for iteration in range(cfg.num_iterations):
            with precision.autocast():
                logp = completion_logprobs(policy, *args)
            if iteration == 0:
                old_logp = logp.detach()  # the sampling policy: no second forward needed
            loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages,
                                    batch.completion_mask, cfg.clip_eps, cfg.beta,
                                    cfg.loss_type, cfg.max_new_tokens)
            optimizer.zero_grad(set_to_none=True)
            precision.backward(loss)
            grad_norm = precision.step(optimizer, policy.parameters(), cfg.grad_clip)
        metrics = {"loss": loss.item(), "reward": rewards.mean().item(),
                   "correct": batch.correct.mean().item(),
                   "sample_length": batch.lengths.float().mean().item(),
                   "zero_std_frac": (grouped.std(-1) == 0).float().mean().item(),
                   "grad_norm": grad_norm, **{k: v.item() for k, v in stats.items()}}
        if not math.isfinite(grad_norm):  # an fp16 step the loss scaler skipped (overflow)
            del metrics["grad_norm"]
        metrics.update(periodic_eval(cfg, s, step))
        return metrics

    fit(run, step_fn, total_steps=cfg.steps,
        objects={"model": policy, "optimizer": optimizer, "precision": precision},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    finish(run, cfg, s)
    return run
