"""Direct preference optimisation: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023).

On pairs (x, y_w, y_l) of a prompt, a preferred ("chosen") and a dispreferred ("rejected")
completion, the KL-regularised RLHF objective max E[r] - beta KL(pi || pi_ref) has the optimum
pi*(y|x) proportional to pi_ref(y|x) exp(r(x, y) / beta), so the policy defines an implicit reward

    r_theta(x, y) = beta log pi_theta(y|x) / pi_ref(y|x)

and a Bradley-Terry likelihood on the pairs needs no reward model. With the log-ratio margin

    h = [log pi_theta(y_w|x) - log pi_ref(y_w|x)] - [log pi_theta(y_l|x) - log pi_ref(y_l|x)]

(sequence log-probabilities, summed over the completion tokens):

    DPO:  L = -log sigmoid(beta h)                (the Bradley-Terry negative log-likelihood)
    IPO:  L = (h - 1 / (2 beta))^2                (regresses h to a finite target, so the
                                                   margin cannot run off to infinity on pairs
                                                   that are already separated)

At pi_theta = pi_ref, h = 0 and the DPO loss is ln 2. Here the pairs are the policy's own
samples on training problems, chosen correct and rejected wrong (``RUN/pairs.jsonl``, TRL's
prompt/chosen/rejected format), or any such file (``--pairs``); ``--refresh-every N`` rebuilds
them from the current policy every N steps (online / iterative DPO).

Data-parallel, every rank builds the same pair set (the same samples from the same policy with
the generator of (seed, step)) and its reference log-probabilities, then takes its shard of
each step's pairs: the losses are means over pairs, and RPO's likelihood term a mean over the
chosen tokens of the whole batch (``common.token_mean``), so the ranks' mean is the one-process
loss.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.precision import Precision
from mlatlas.core.run import Run, RunError, fit
from mlatlas.core.runtime import seed_everything
from mlatlas.llm.common import (
    LLMConfig,
    Setup,
    completion_logprobs,
    encode_completions,
    encode_prompts,
    finish,
    periodic_eval,
    preference_pairs,
    setup,
    start_metrics,
    step_generator,
    step_problems,
    token_mean,
    warmup_steps,
)
from mlatlas.llm.tasks import read_jsonl, write_jsonl

__all__ = ["Config", "dpo_loss", "train"]

LossType = Literal["sigmoid", "ipo"]
LOSS_TYPES = typing.get_args(LossType)
PAIR_KEYS = ("prompt", "chosen", "rejected")


@dataclass
class Config(LLMConfig):
    METHOD: ClassVar[str] = "dpo"
    SHARDED: ClassVar[tuple[str, ...]] = ("batch_size",)

    steps: int = 200
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    """Fraction of --steps over which the learning rate warms up linearly, before its cosine
    decay to 0: max(1, floor(ratio * steps)) steps."""
    beta: float = 0.1
    """beta: strength of the implicit KL to the reference (TRL's ``beta``)."""
    loss_type: LossType = "sigmoid"
    """'sigmoid' (DPO) or 'ipo' (TRL's ``loss_type`` names)."""
    batch_size: int = 32
    """Preference pairs per step."""
    pairs: str = ""
    """A prompt/chosen/rejected JSONL file to train on instead of the policy's own samples."""
    pair_prompts: int = 2048
    """Training prompts sampled to build pairs (those whose samples are all correct give none)."""
    samples: int = 8
    """Completions sampled per prompt when building pairs."""
    rpo_alpha: float = 0.0
    """Weight of the chosen completions' token-mean negative log-likelihood added to the loss
    (RPO, Pang et al. 2024; TRL's ``rpo_alpha``); 0 is plain DPO / IPO."""
    refresh_every: int = 0
    """Rebuild the pairs from the current policy every this many steps (online DPO); 0 never."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "batch_size", "pair_prompts")
        require_at_least(self, 2, "samples")
        require_unit(self, "warmup_ratio")
        if self.beta <= 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")
        if self.rpo_alpha < 0:
            raise ConfigError(f"--rpo-alpha must be >= 0, got {self.rpo_alpha}")
        if self.refresh_every < 0:
            raise ConfigError(f"--refresh-every must be >= 0, got {self.refresh_every}")
        if self.pairs and self.refresh_every:
            raise ConfigError("--refresh-every rebuilds pairs from the policy: it cannot be "
                              "used with a --pairs file")

    def check_data(self) -> None:
        super().check_data()
        if self.pairs:
            read_jsonl(self.pairs, PAIR_KEYS)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             loss_type: str = "sigmoid"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean DPO or IPO loss over pairs of sequence log-probs (each (B,)), with the implicit
    rewards beta log pi/pi_ref of the chosen and rejected completions (detached, (B,))."""
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    return (losses.mean(), beta * chosen_logratio.detach(), beta * rejected_logratio.detach())


@dataclass
class PairBatch:
    """Pairs encoded for one forward pass: rows 0..B-1 chosen, B..2B-1 rejected."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor


def encode_pairs(s: Setup, rows: list[dict]) -> PairBatch:
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    return PairBatch(*encode_prompts(s.tokenizer, prompts, s.device),
                     *encode_completions(s.tokenizer, completions, s.device))


def pair_token_logps(model, batch: PairBatch) -> torch.Tensor:
    """Per-token log-probs (2B, L) of the chosen then the rejected completions."""
    return completion_logprobs(model, batch.prompt_ids, batch.prompt_mask,
                               batch.completion_ids, batch.completion_mask)


def sequence_logps(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs, each (B,)."""
    return pair_token_logps(model, batch).sum(-1).chunk(2)


@torch.no_grad()
def reference_logps(s: Setup, rows: list[dict], chunk: int = 256
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref of every pair's chosen and rejected completion, computed once per pair set."""
    chosen, rejected = [], []
    for start in range(0, len(rows), chunk):
        c, r = sequence_logps(s.reference, encode_pairs(s, rows[start:start + chunk]))
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def build_pairs(cfg: Config, s: Setup, step: int) -> list[dict]:
    """Pairs from the current policy's samples on prompts drawn with (seed, step)."""
    generator = step_generator(cfg.seed, step, s.device)
    items = step_problems(s.train_items, cfg.pair_prompts, generator)
    rows = preference_pairs(s.policy, s.tokenizer, s.task, items, samples=cfg.samples,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            generator=generator)
    if not rows:
        raise ConfigError(f"every sample of {cfg.pair_prompts} prompts was correct: no "
                          "preference pairs; use harder --difficulty or more --pair-prompts")
    return rows


def pairs_file(run: Run, refresh_step: int):
    return run.path("pairs.jsonl" if refresh_step == 1 else f"pairs_step{refresh_step}.jsonl")


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    seed_everything(cfg.seed)
    s = setup(cfg, run)
    start_metrics(run, cfg, s)
    optimizer = torch.optim.AdamW(s.policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    precision = Precision(cfg.precision, s.device)
    current: dict = {}  # the pair set in use and its reference log-probs

    def pair_set(step: int) -> dict:
        # The pair set of a step is the one built at its refresh step, so a resumed run reads
        # back the file that step wrote (or, at a refresh step, rebuilds the same pairs from the
        # same restored policy and generator).
        every = cfg.refresh_every or cfg.steps
        refresh_step = 1 + (step - 1) // every * every
        if current.get("step") == refresh_step:
            return current
        path = pairs_file(run, refresh_step)
        if cfg.pairs:
            rows = read_jsonl(cfg.pairs, PAIR_KEYS)
        elif step == refresh_step:
            rows = build_pairs(cfg, s, refresh_step)
            if distributed.is_main():
                write_jsonl(path, rows)
        elif path.is_file():
            rows = read_jsonl(path, PAIR_KEYS)
        else:
            raise RunError(f"cannot resume {run.dir} at step {step}: its pairs {path.name} "
                           "are gone")
        current.clear()
        current.update(step=refresh_step, rows=rows, ref=reference_logps(s, rows))
        return current

    def step_fn(step: int) -> dict[str, float]:
        with precision.autocast():
            pairs = pair_set(step)
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, warmup_steps(cfg)))
        generator = step_generator(cfg.seed, step)
        idx = torch.randint(len(pairs["rows"]), (cfg.batch_size,), generator=generator)
        idx = distributed.shard(idx)  # this rank's pairs of the step's batch
        batch = encode_pairs(s, [pairs["rows"][i] for i in idx.tolist()])
        idx = idx.to(s.device)
        ref_chosen, ref_rejected = pairs["ref"][0][idx], pairs["ref"][1][idx]
        with precision.autocast():
            token_logps = pair_token_logps(s.policy, batch)
        chosen, rejected = token_logps.sum(-1).chunk(2)
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type)
        metrics = {"preference_loss": loss.item()}
        if cfg.rpo_alpha:
            # Preference losses can lower log pi(y_w) as long as log pi(y_l) falls faster; the
            # likelihood term keeps the chosen (correct) answers probable.
            nll = -token_mean(token_logps.chunk(2)[0], batch.completion_mask.chunk(2)[0])
            loss = loss + cfg.rpo_alpha * nll
            metrics["nll"] = nll.item()
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer, s.policy.parameters(), cfg.grad_clip)
        margin = chosen_rewards - rejected_rewards
        metrics.update({"loss": loss.item(), "chosen_reward": chosen_rewards.mean().item(),
                   "rejected_reward": rejected_rewards.mean().item(),
                   "reward_margin": margin.mean().item(),
                   "pair_accuracy": (margin > 0).float().mean().item(),
                   "pairs": float(len(pairs["rows"]))})
        metrics.update(periodic_eval(cfg, s, step))
        return metrics

    fit(run, step_fn, total_steps=cfg.steps,
        objects={"model": s.policy, "optimizer": optimizer, "precision": precision},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress,
        latest=("pairs",))
    finish(run, cfg, s)
    return run
