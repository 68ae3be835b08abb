"""Supervised fine-tuning: maximum likelihood of reference completions.

On pairs (x, y) of a prompt and its reference completion (here the task's worked solutions, or
a prompt/completion JSONL file), SFT minimises the token-averaged negative log-likelihood of
the completion only; the prompt conditions but is not predicted:

    L_SFT(theta) = - (1 / sum_i |y_i|) sum_i sum_t log pi_theta(y_{i,t} | x_i, y_{i,<t})

The result is the starting policy and the reference pi_ref of every alignment method here (the
InstructGPT pipeline, Ouyang et al. 2022). Its default length is chosen to stop short of
mastering the task, so that the RL methods have room to improve it.

Data-parallel, rank r of W takes its shard of each step's pairs and the token count in the
denominator is the whole batch's (``common.token_mean``), so the mean over ranks of the ranks'
losses, and of their gradients, is L_SFT of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from mlatlas.core import distributed
from mlatlas.core.config import require_at_least, require_unit
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.llm.common import (
    LLMConfig,
    Setup,
    encode_completions,
    encode_prompts,
    evaluate_policy,
    finish,
    frozen_copy,
    load_policy,
    step_generator,
    step_problems,
    token_logprobs,
    token_mean,
    warmup_steps,
    write_lm_files,
    write_train_summary,
)
from mlatlas.llm.model import LMConfig, TinyLM
from mlatlas.llm.tasks import (
    Problem,
    completion_rows,
    get_task,
    parse_difficulties,
    problems,
    read_jsonl,
    write_jsonl,
)
from mlatlas.nn.tokenizers import Tokenizer

__all__ = ["Config", "sft_loss", "solution_loss", "train"]


@dataclass
class Config(LLMConfig):
    METHOD: ClassVar[str] = "sft"
    SHARDED: ClassVar[tuple[str, ...]] = ("batch_size",)

    steps: int = 600
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    """Fraction of --steps over which the learning rate warms up linearly, before its cosine
    decay to 0: max(1, floor(ratio * steps)) steps."""
    batch_size: int = 64
    """Prompt/completion pairs per step."""
    data: str = ""
    """A prompt/completion JSONL file to train on instead of the task's generated problems."""
    tokenizer: Literal["char", "bpe"] = "char"
    """'char' (one token per character) or 'bpe' (merges learnt on the training texts)."""
    bpe_vocab: int = 64
    """Vocabulary size of the BPE tokenizer."""
    dim: int = 128
    """Model width (ignored with --init-from)."""
    n_layers: int = 4
    """Decoder layers."""
    n_heads: int = 4
    """Attention heads."""
    n_kv_heads: int = 4
    """Key/value heads (grouped-query attention when fewer than --n-heads)."""
    hidden_dim: int = 352
    """SwiGLU hidden width."""
    max_seq_len: int = 128
    """Longest prompt + completion in tokens."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "batch_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                         "hidden_dim", "max_seq_len")
        require_unit(self, "warmup_ratio")

    def check_data(self) -> None:
        super().check_data()
        if self.data:
            read_jsonl(self.data, ("prompt", "completion"))


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the masked targets: logits (B, T, V), targets and mask
    (B, T), where position t of the logits predicts targets[:, t] (data-parallel: this rank's
    share of the global batch's mean, ``token_mean``)."""
    return -token_mean(token_logprobs(logits, targets), mask)


def solution_loss(policy: TinyLM, tokenizer: Tokenizer, items: list[Problem]) -> torch.Tensor:
    """L_SFT on the worked solutions of ``items`` (this rank's rows of the global batch)."""
    device = policy.lm_head.weight.device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p.prompt for p in items], device)
    target_ids, target_mask = encode_completions(tokenizer, [p.solution for p in items], device)
    P = prompt_ids.shape[1]
    logits = policy(torch.cat([prompt_ids, target_ids], 1),
                    torch.cat([prompt_mask, target_mask], 1))[:, P - 1:-1]
    return sft_loss(logits, target_ids, target_mask)


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    task = get_task(cfg.task)
    levels = parse_difficulties(cfg.difficulty, task)
    if cfg.data:
        train_items = [Problem(r["prompt"], r["completion"], "", 0)
                       for r in read_jsonl(cfg.data, ("prompt", "completion"))]
    else:
        train_items = problems(task, "train", 20000, levels, cfg.seed)
        if distributed.is_main() and not run.path("train.jsonl").is_file():
            write_jsonl(run.path("train.jsonl"), completion_rows(train_items))
    test_items = problems(task, "test", cfg.eval_n, levels, 0)
    if cfg.init_from:
        policy, tokenizer = load_policy(cfg.init_from, device)
    else:
        texts = [p.prompt + p.solution for p in train_items] + [task.alphabet]
        tokenizer = (Tokenizer.characters(texts) if cfg.tokenizer == "char"
                     else Tokenizer.bpe(texts, cfg.bpe_vocab))
        policy = TinyLM(LMConfig(vocab_size=tokenizer.vocab_size, dim=cfg.dim,
                                 n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                 n_kv_heads=cfg.n_kv_heads, hidden_dim=cfg.hidden_dim,
                                 max_seq_len=cfg.max_seq_len)).to(device)
    write_lm_files(run, policy, tokenizer)
    write_train_summary(run, cfg, policy, tokenizer)
    reference = frozen_copy(policy) if cfg.init_from else None
    compile_module(policy, cfg.compile)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    precision = Precision(cfg.precision, device)

    def step_fn(step: int) -> dict[str, float]:
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, warmup_steps(cfg)))
        items = step_problems(train_items, cfg.batch_size, step_generator(cfg.seed, step))
        with precision.autocast():
            loss = solution_loss(policy, tokenizer, distributed.shard_list(items))
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer, policy.parameters(), cfg.grad_clip)
        metrics = {"loss": loss.item()}
        if step % cfg.eval_every == 0 and not cfg.data:
            metrics.update(evaluate_policy(policy, tokenizer, task, test_items,
                                           max_new_tokens=cfg.max_new_tokens))
        return metrics

    fit(run, step_fn, total_steps=cfg.steps,
        objects={"model": policy, "optimizer": optimizer, "precision": precision},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    finish(run, cfg, Setup(policy, reference, tokenizer, task, train_items, test_items, device))
    return run
