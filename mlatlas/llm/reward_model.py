"""A Bradley-Terry reward model on preference pairs (Ouyang et al. 2022; Bradley and Terry 1952).

The reward model r_phi(x, y) is the language model's trunk with a scalar head on the last real
token (transformers' ``LlamaForSequenceClassification`` names: ``model.*`` and ``score``),
started from the SFT policy. Under the Bradley-Terry model a preferred answer y_w beats y_l with

    P(y_w > y_l | x) = sigma(r_phi(x, y_w) - r_phi(x, y_l)),

so r_phi is fitted by maximum likelihood on pairs (x, y_w, y_l):

    L_RM(phi) = -E[ log sigma(r_phi(x, y_w) - r_phi(x, y_l)) ]

Pairs come from the SFT policy's own samples (a correct answer over a wrong one, the reference
solution when no sample was right) or a prompt/chosen/rejected JSONL file. The per-position
head (``values``) is what PPO-RLHF's critic starts from.

Data-parallel, every rank builds the same pairs (a function of the seed and the policy) and
takes its shard of each step's pairs; L_RM is a mean over pairs, so the mean over ranks is the
loss of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError, require_at_least, require_unit
from mlatlas.core.io import read_json
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, RunError, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.llm.common import (
    EVAL_PROBLEMS,
    LM_FILE,
    LLMConfig,
    encode_completions,
    encode_prompts,
    frozen_copy,
    load_policy,
    preference_pairs,
    rollout,
    step_generator,
    warmup_steps,
    write_eval_summary,
    write_lm_files,
    write_train_summary,
)
from mlatlas.llm.model import LMConfig, TinyLM
from mlatlas.llm.tasks import get_task, parse_difficulties, problems, read_jsonl, write_jsonl
from mlatlas.nn.tokenizers import Tokenizer

__all__ = ["Config", "RewardModel", "bradley_terry_loss", "evaluate", "load_reward_model",
           "train"]


class RewardModel(TinyLM):
    """r_phi: the trunk of a TinyLM and a scalar head ``score`` in place of the LM head."""

    def __init__(self, cfg: LMConfig):
        super().__init__(cfg)
        del self.lm_head
        self.score = nn.Linear(cfg.dim, 1, bias=False)
        nn.init.zeros_(self.score.weight)  # every answer starts at reward 0

    @classmethod
    def from_policy(cls, policy: TinyLM) -> RewardModel:
        model = cls(policy.cfg).to(policy.model.embed_tokens.weight.device)
        model.model.load_state_dict(policy.model.state_dict())
        return model

    def values(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) scalar at every position (the head read everywhere, as a critic), in float32
        under autocast too."""
        return self.score(self.hidden(ids, mask))[..., 0].float()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) r_phi(x, y) read at the last real token of each row."""
        last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
        return self.values(ids, mask).gather(1, last[:, None])[:, 0]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-mean log sigma(r_w - r_l); ln 2 when the rewards are equal."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pair_rewards(model: RewardModel, tokenizer: Tokenizer, rows: list[dict[str, str]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(x, y_w), r(x, y_l)) for prompt/chosen/rejected rows, in one forward pass."""
    device = model.score.weight.device
    prompts = [r["prompt"] for r in rows] * 2
    p_ids, p_mask = encode_prompts(tokenizer, prompts, device)
    c_ids, c_mask = encode_completions(tokenizer, [r["chosen"] for r in rows]
                                       + [r["rejected"] for r in rows], device)
    rewards = model(torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1))
    return rewards[:len(rows)], rewards[len(rows):]


@dataclass
class Config(LLMConfig):
    METHOD: ClassVar[str] = "reward_model"
    SHARDED: ClassVar[tuple[str, ...]] = ("batch_size",)

    steps: int = 300
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    """Fraction of --steps over which the learning rate warms up linearly, before its cosine
    decay to 0: max(1, floor(ratio * steps)) steps."""
    batch_size: int = 32
    """Preference pairs per step."""
    pair_prompts: int = 1500
    """Train prompts sampled to build pairs (prompts whose samples are all right give none)."""
    samples: int = 4
    """Completions sampled per prompt when building pairs."""
    pairs: str = ""
    """A prompt/chosen/rejected JSONL file to train on instead of sampled pairs."""
    eval_every: int = 100

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "batch_size", "pair_prompts")
        require_at_least(self, 2, "samples")
        require_unit(self, "warmup_ratio")

    def check_data(self) -> None:
        super().check_data()
        if not self.init_from:
            raise ConfigError("reward_model starts from a policy's trunk: give --init-from "
                              "RUN_DIR (an sft run)")
        if self.pairs:
            read_jsonl(self.pairs, ("prompt", "chosen", "rejected"))


def load_reward_model(path: str | Path, device="cpu") -> tuple[RewardModel, Tokenizer]:
    path = Path(path)
    run = Run.open(path)
    if run.method != "reward_model" or not run.has_checkpoint():
        raise ConfigError(f"{path} is not a reward_model run with a checkpoint")
    model = RewardModel(LMConfig(**read_json(path / LM_FILE)))
    run.load_weights(model, "model")
    return model.to(device), Tokenizer.load(path / "tokenizer.json")


def _pairs(cfg, policy, tokenizer, task, split: str, n: int, seed: int) -> list[dict]:
    items = problems(task, split, n, parse_difficulties(cfg.difficulty, task), seed)
    return preference_pairs(policy, tokenizer, task, items, samples=cfg.samples,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def pair_accuracy(model: RewardModel, tokenizer: Tokenizer, rows: list[dict]) -> float:
    r_w, r_l = pair_rewards(model, tokenizer, rows)
    return (r_w > r_l).float().mean().item()


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    cfg.check_data()
    run = run or Run.create(cfg.METHOD, cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    policy, tokenizer = load_policy(cfg.init_from, device)
    task = get_task(cfg.task)
    if cfg.pairs:
        train_rows = read_jsonl(cfg.pairs, ("prompt", "chosen", "rejected"))
    elif distributed.broadcast_object(run.path("pairs.jsonl").is_file()):
        # a resumed run trains on the very same pairs
        train_rows = read_jsonl(run.path("pairs.jsonl"), ("prompt", "chosen", "rejected"))
    else:
        train_rows = _pairs(cfg, policy.eval(), tokenizer, task, "train", cfg.pair_prompts,
                            cfg.seed)
        if distributed.is_main():
            write_jsonl(run.path("pairs.jsonl"), train_rows)
    test_rows = _pairs(cfg, policy.eval(), tokenizer, task, "test", cfg.eval_n, 0)
    if not train_rows or not test_rows:
        raise ConfigError("the policy answered every sampled prompt correctly: no wrong answer "
                          "to prefer against (use harder --difficulty or --pairs FILE)")
    model = RewardModel.from_policy(policy)
    write_lm_files(run, model, tokenizer)
    write_train_summary(run, cfg, model, tokenizer)
    compile_module(model, cfg.compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    precision = Precision(cfg.precision, device)

    def step_fn(step: int) -> dict[str, float]:
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, warmup_steps(cfg)))
        idx = torch.randint(len(train_rows), (cfg.batch_size,),
                            generator=step_generator(cfg.seed, step))
        rows = [train_rows[i] for i in distributed.shard(idx).tolist()]
        with precision.autocast():
            r_w, r_l = pair_rewards(model, tokenizer, rows)
            loss = bradley_terry_loss(r_w, r_l)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer, model.parameters(), cfg.grad_clip)
        metrics = {"loss": loss.item(), "pair_accuracy": (r_w > r_l).float().mean().item(),
                   "margin": (r_w - r_l).mean().item()}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics["test_pair_accuracy"] = pair_accuracy(model.eval(), tokenizer, test_rows)
            model.train()
        return metrics

    fit(run, step_fn, total_steps=cfg.steps,
        objects={"model": model, "optimizer": optimizer, "precision": precision},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    from mlatlas.llm.plots import curves_figure

    run.save_figure(curves_figure(run.metrics, run.method), "curves.png")
    run.write_summary({"train/pairs": len(train_rows)})
    write_eval_summary(run, "eval", {"pair_accuracy": pair_accuracy(model.eval(), tokenizer,
                                                                    test_rows),
                                     "pairs": float(len(test_rows))}, cfg.eval_n, 0)
    return run


@torch.no_grad()
def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None
             ) -> dict[str, float]:
    """Held-out pair accuracy on the pairs of ``n`` test prompts (None: ``EVAL_PROBLEMS`` =
    500), and how well r ranks correct over wrong answers sampled for those prompts (the AUC:
    P(r(correct) > r(wrong))). ``seed`` draws the prompts and the sampled answers; the metrics
    also go to summary.json under ``eval/``."""
    if run.method != "reward_model":
        raise RunError(f"{run.dir} is a {run.method} run, not a reward model")
    cfg = run.load_config(Config)
    n = EVAL_PROBLEMS if n is None else n
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    model, tokenizer = load_reward_model(run.dir)
    policy = frozen_copy(load_policy(cfg.init_from)[0])
    task = get_task(cfg.task)
    rows = _pairs(cfg, policy, tokenizer, task, "test", n, seed)
    items = problems(task, "test", n, parse_difficulties(cfg.difficulty, task), seed)
    batch = rollout(policy, tokenizer, task, items, max_new_tokens=cfg.max_new_tokens,
                    temperature=1.0, generator=torch.Generator().manual_seed(seed))
    rewards = model.eval()(torch.cat([batch.prompt_ids, batch.completion_ids], 1),
                           torch.cat([batch.prompt_mask, batch.completion_mask], 1))
    right, wrong = rewards[batch.correct > 0], rewards[batch.correct == 0]
    metrics = {"pair_accuracy": pair_accuracy(model, tokenizer, rows) if rows else float("nan"),
               "pairs": float(len(rows))}
    if len(right) and len(wrong):
        metrics["auc_correct"] = (right[:, None] > wrong[None, :]).float().mean().item()
    write_eval_summary(run, "eval", metrics, n, seed)
    return metrics
