"""What the alignment methods share: batches, token log-probabilities, rollouts, evaluation.

A batch row is a left-padded prompt followed by a right-padded completion,

    [pad .. pad <bos> x_1 .. x_n | y_1 .. y_m <eos> pad .. pad]

and the policy's log-probability of a completion factorises over its tokens,

    log pi_theta(y | x) = sum_t log pi_theta(y_t | x, y_<t),

which :func:`completion_logprobs` returns per token (0 on padding) from one forward pass.
The methods read the policy, its tokenizer and the frozen reference pi_ref from a previous run
(``--init-from RUN_DIR``, usually an SFT run) or from a transformers Llama folder.

Data-parallel (``--nproc N``, :mod:`mlatlas.core.distributed`): rank r of W takes its shard of
each step's global batch. A loss that is a mean over examples averages over the ranks to the
one-process loss; one that is a mean over the N_tok tokens of the whole batch does not (the
ranks hold different numbers of tokens), so each rank's share is

    L_r = (W / N_tok) sum_{tokens t of rank r} l_t,   N_tok summed over the ranks,

whose mean over ranks is (1 / N_tok) sum_t l_t (:func:`token_mean`). Rollouts are sharded too
(:func:`rollout` with ``sharded``): a rank samples the completions of its rows of the step's
prompts, padded as the whole batch is and with the whole batch's random draws, so it samples
what a one-process run samples for those rows.

What every method of the family shares (docs/architecture.md, "The family contract"):

- the learning rate warms up linearly over ``warmup_steps(cfg)`` = max(1, floor(warmup_ratio *
  steps)) steps, then decays along a cosine to 0 (``core.optim.warmup_cosine_lr``), set each step;
- checkpoint groups: ``model`` (the policy, or the reward model), ``optimizer``,
  ``precision`` (the fp16 loss scale), plus named extras (PPO-RLHF's ``critic``,
  ``critic_optimizer``, ``critic_precision``, ``score_stats``); no ``rng`` group, as
  every step draws from ``step_generator(seed, step)``, a function of the step alone; the
  frozen reference is not saved (it is ``--init-from`` read again);
- summary.json: ``train/`` (steps, parameters, tokenizer), ``eval/`` (the held-out metrics of
  the trained policy, with ``eval/problems`` and ``eval/seed``) and ``baseline/`` (the same
  metrics of the starting policy, for methods that start from one).
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mlatlas.core import distributed
from mlatlas.core.config import (
    BaseConfig,
    BatchConfig,
    ConfigError,
    require_at_least,
    require_unit,
)
from mlatlas.core.io import read_json, write_json
from mlatlas.core.precision import compile_module
from mlatlas.core.run import Run, RunError
from mlatlas.llm.model import (
    LMConfig,
    TinyLM,
    count_parameters,
    generate,
    load_pretrained,
    read_hf_config,
    save_pretrained,
)
from mlatlas.llm.tasks import Problem, Task, get_task, parse_difficulties, problems
from mlatlas.nn.tokenizers import Tokenizer

LM_FILE = "lm.json"
TOKENIZER_FILE = "tokenizer.json"
EVAL_PROBLEMS = 500
"""Held-out test problems that ``mlatlas eval RUN`` scores when no ``--n`` is given."""


@dataclass
class LLMConfig(BatchConfig):
    """Fields every language-model method has; each names its global batch sizes (split over
    the ranks of a data-parallel job) in ``SHARDED``."""

    task: str = "addition"
    """Task: addition, addition_cot or countdown."""
    difficulty: str = "1-3"
    """Difficulty levels trained on: a level, a range '1-3' or a list '1,3' (digits of the
    first operand for addition, numbers minus one for countdown)."""
    init_from: str = ""
    """Run folder (e.g. an SFT run) or transformers Llama folder whose policy starts training
    and is the frozen reference."""
    lr: float = 1e-4
    """Adam learning rate."""
    max_new_tokens: int = 24
    """Longest completion sampled."""
    temperature: float = 1.0
    """Sampling temperature of rollouts."""
    top_p: float = 1.0
    """Nucleus sampling mass of rollouts (1 keeps every token)."""
    eval_every: int = 50
    """Greedy accuracy on held-out problems every this many steps (a multiple of log_every)."""
    eval_n: int = 200
    """Held-out test problems per evaluation."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 turns it off."""
    log_every: int = 10
    ckpt_every: int = 100

    def check(self) -> None:
        super().check()
        # The task is a name in the tasks' registry (like a dataset), checked with the closest
        # names as a hint; --difficulty is read against its levels.
        parse_difficulties(self.difficulty, get_task(self.task))
        require_at_least(self, 1, "max_new_tokens", "eval_every", "eval_n")
        require_unit(self, "top_p", low_open=True)
        if self.temperature < 0 or self.grad_clip < 0:
            raise ConfigError("--temperature and --grad-clip must be >= 0")
        if self.eval_every % self.log_every:
            raise ConfigError(f"--eval-every {self.eval_every} must be a multiple of "
                              f"--log-every {self.log_every}")

    def check_data(self) -> None:
        if self.init_from:
            policy_source(self.init_from)


# loading and saving policies ------------------------------------------------------------------

def policy_source(path: str | Path) -> str:
    """'run' or 'hf' for a folder that holds a policy; a ConfigError otherwise."""
    path = Path(path)
    if (path / "config.json").is_file():
        if "model_type" in read_json(path / "config.json"):
            read_hf_config(path)  # refuse what the model does not compute before a run starts
            return "hf"
        if (path / LM_FILE).is_file() and Run.open(path).has_checkpoint():
            if Run.open(path).method == "reward_model":
                raise ConfigError(f"{path} is a reward model, not a policy")
            return "run"
    raise ConfigError(f"{path} is neither a language-model run with a checkpoint nor a "
                      "transformers Llama folder")


def load_policy(path: str | Path, device: torch.device | str = "cpu"
                ) -> tuple[TinyLM, Tokenizer]:
    """The policy and tokenizer of a run (its latest checkpoint) or of a transformers folder."""
    path = Path(path)
    if policy_source(path) == "hf":
        model = load_pretrained(path)
    else:
        model = TinyLM(LMConfig(**read_json(path / LM_FILE)))
        Run.open(path).load_weights(model, "model")
    return model.to(device), Tokenizer.load(path / TOKENIZER_FILE)


def write_lm_files(run: Run, model: TinyLM, tokenizer: Tokenizer) -> None:
    """What makes a run's checkpoint a loadable policy: the model's shape and the tokenizer."""
    if not distributed.is_main():
        return
    write_json(run.path(LM_FILE), vars(model.cfg))
    tokenizer.save(run.path(TOKENIZER_FILE))


def export_hf(run: Run, model: TinyLM, tokenizer: Tokenizer) -> Path:
    """The policy as a transformers folder ``RUN/hf`` (``LlamaForCausalLM.from_pretrained``),
    written by rank 0."""
    if not distributed.is_main():
        return run.path("hf")
    directory = save_pretrained(model, run.path("hf"), bos_id=tokenizer.bos_id,
                                eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    tokenizer.save_pretrained(directory, model.cfg.max_seq_len)
    return directory


def warmup_steps(cfg: BaseConfig) -> int:
    """Steps of linear learning-rate warm-up of a config with ``warmup_ratio``:
    max(1, floor(warmup_ratio * steps)) (one step of warm-up is none: the full rate at step 1)."""
    return max(1, math.floor(cfg.warmup_ratio * cfg.steps))


def frozen_copy(model: TinyLM) -> TinyLM:
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


# batches ------------------------------------------------------------------------------------

def pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool, device=None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (len(rows), longest row), the rows flush right (``left`` padding, for
    prompts that generation continues) or flush left (for completions)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], device=None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``<bos> prompt`` rows: (ids, mask), each (B, P)."""
    return pad(tokenizer.encode_batch(list(prompts), bos=True), tokenizer.pad_id, True, device)


def encode_completions(tokenizer: Tokenizer, completions: Sequence[str], device=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``completion <eos>`` rows: (ids, mask), each (B, L)."""
    rows = [r + [tokenizer.eos_id] for r in tokenizer.encode_batch(list(completions))]
    return pad(rows, tokenizer.pad_id, False, device)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position: (B, T, V), (B, T) -> (B, T)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets[..., None])[..., 0]


def completion_logprobs(model: TinyLM, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completion_ids: torch.Tensor, completion_mask: torch.Tensor
                        ) -> torch.Tensor:
    """log pi(y_t | x, y_<t) for each completion token: (B, L), 0 where the mask is 0."""
    P = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits = model(ids, mask)[:, P - 1:-1]
    return token_logprobs(logits, completion_ids) * completion_mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the masked tokens of a data-parallel job's global batch, as this
    rank's share: (W / N_tok) times the sum over this rank's tokens, N_tok the tokens of all
    ranks, so that the ranks' mean is the global mean (every rank calls it together). In one
    process: :func:`masked_mean`."""
    mask = mask.to(x.dtype)
    count = distributed.all_reduce_sum(mask.sum().detach())
    return (x * mask).sum() / count.clamp(min=1) * distributed.world_size()


# rollouts -------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """Completions sampled for prompts, with their rewards. Tensors are (B, P) or (B, L)."""

    problems: list[Problem]
    texts: list[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    correct: torch.Tensor
    """(B,) exact-match reward."""
    formatted: torch.Tensor
    """(B,) format reward."""

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


def rollout(model: TinyLM, tokenizer: Tokenizer, task: Task, items: Sequence[Problem], *,
            max_new_tokens: int, temperature: float, top_p: float = 1.0,
            generator: torch.Generator | None = None, sharded: bool = False) -> Rollout:
    """Sample one completion per problem (repeat problems in ``items`` for groups).

    ``sharded``: ``items`` is a data-parallel job's global batch and this rank samples its rows
    of it (every rank calls this together): the prompts are padded to the whole batch's width
    and the draws are the whole batch's (``generate``), so each row's completion is the one a
    one-process run samples, and every rank's tensors have the same width."""
    device = model.lm_head.weight.device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p.prompt for p in items], device)
    if sharded:
        items = distributed.shard_list(items)
        prompt_ids, prompt_mask = distributed.shard(prompt_ids), distributed.shard(prompt_mask)
    was_training = model.training
    model.eval()
    completion_ids, completion_mask = generate(
        model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=temperature,
        top_p=top_p, generator=generator, sharded=sharded)
    model.train(was_training)
    texts = tokenizer.decode_batch(completion_ids.tolist())
    correct, formatted = task.rewards(items, texts)
    return Rollout(list(items), texts, prompt_ids, prompt_mask, completion_ids, completion_mask,
                   torch.tensor(correct, device=device), torch.tensor(formatted, device=device))


@torch.no_grad()
def evaluate_policy(model: TinyLM, tokenizer: Tokenizer, task: Task, items: Sequence[Problem],
                    reference: TinyLM | None = None, *, max_new_tokens: int = 24,
                    batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Greedy accuracy, format rate and mean completion length (tokens, with <eos>) on
    ``items``, and ``sampled_accuracy``: the accuracy of one completion sampled at temperature 1
    per problem (pass@1 of the sampling policy, which RL sharpens even where the greedy answer
    is already right or hopeless). With a reference also KL(pi || pi_ref) per completion,
    estimated on those samples as the mean of sum_t log pi(y_t|.) - log pi_ref(y_t|.)."""
    greedy, sampled = [], []
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        greedy.append(rollout(model, tokenizer, task, chunk, max_new_tokens=max_new_tokens,
                              temperature=0.0))
        sampled.append(rollout(model, tokenizer, task, chunk, max_new_tokens=max_new_tokens,
                               temperature=1.0, generator=generator))
    correct = torch.cat([r.correct for r in greedy])
    lengths = torch.cat([r.lengths for r in greedy]).float()
    metrics = {"accuracy": correct.mean().item(),
               "sampled_accuracy": torch.cat([r.correct for r in sampled]).mean().item(),
               "format": torch.cat([r.formatted for r in greedy]).mean().item(),
               "length": lengths.mean().item()}
    if correct.any():  # absent rather than NaN, which would stop a run
        metrics["length_correct"] = lengths[correct > 0].mean().item()
    if reference is not None:
        kl = [sequence_kl(model, reference, r) for r in sampled]
        metrics["kl"] = torch.cat(kl).mean().item()
    return metrics


def sequence_kl(model: TinyLM, reference: TinyLM, batch: Rollout) -> torch.Tensor:
    """(B,) sum over completion tokens of log pi - log pi_ref (a Monte-Carlo KL estimate)."""
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    return (completion_logprobs(model, *args) - completion_logprobs(reference, *args)).sum(-1)


# preference pairs -------------------------------------------------------------------------------

@torch.no_grad()
def preference_pairs(model: TinyLM, tokenizer: Tokenizer, task: Task,
                     items: Sequence[Problem], *, samples: int, max_new_tokens: int,
                     temperature: float = 1.0, generator: torch.Generator | None = None
                     ) -> list[dict[str, str]]:
    """Prompt/chosen/rejected rows (TRL's preference format) from the policy's own samples.

    Each prompt gets ``samples`` completions; chosen is a correct one (the reference solution
    when none is), rejected a wrong one; prompts whose samples are all correct give no pair.
    """
    repeated = [p for p in items for _ in range(samples)]
    batch = rollout(model, tokenizer, task, repeated, max_new_tokens=max_new_tokens,
                    temperature=temperature, generator=generator)
    rows = []
    for i, problem in enumerate(items):
        group = range(i * samples, (i + 1) * samples)
        right = [batch.texts[j] for j in group if batch.correct[j] > 0]
        wrong = [batch.texts[j] for j in group if batch.correct[j] == 0]
        if wrong:
            rows.append({"prompt": problem.prompt, "chosen": right[0] if right else
                         problem.solution, "rejected": wrong[0]})
    return rows


# a method's setup -------------------------------------------------------------------------------

@dataclass
class Setup:
    """What a fine-tuning method starts from."""

    policy: TinyLM
    reference: TinyLM | None
    tokenizer: Tokenizer
    task: Task
    train_items: list[Problem]
    test_items: list[Problem]
    device: torch.device


def setup(cfg: LLMConfig, run: Run, train_n: int = 20000) -> Setup:
    """Load ``cfg.init_from`` as the policy and frozen reference (both compiled with
    ``--compile``), draw the problems and write the run's policy files."""
    from mlatlas.core.runtime import resolve_device

    if not cfg.init_from:
        raise ConfigError(f"{run.method} starts from a policy: give --init-from RUN_DIR "
                          "(an sft run) or a transformers Llama folder")
    device = resolve_device(cfg.device)
    policy, tokenizer = load_policy(cfg.init_from, device)
    task = get_task(cfg.task)
    levels = parse_difficulties(cfg.difficulty, task)
    write_lm_files(run, policy, tokenizer)
    write_train_summary(run, cfg, policy, tokenizer)
    reference = compile_module(frozen_copy(policy), cfg.compile)
    return Setup(compile_module(policy.train(), cfg.compile), reference, tokenizer, task,
                 problems(task, "train", train_n, levels, cfg.seed),
                 problems(task, "test", cfg.eval_n, levels, 0), device)


def write_train_summary(run: Run, cfg: BaseConfig, model: TinyLM, tokenizer: Tokenizer
                        ) -> None:
    """``train/steps``, ``train/parameters`` and ``train/tokenizer`` into summary.json."""
    run.write_summary({"train/steps": cfg.steps, "train/parameters": count_parameters(model),
                       "train/tokenizer": tokenizer.describe()})


def write_eval_summary(run: Run, prefix: str, metrics: dict[str, float], problems: int,
                       seed: int) -> None:
    """Held-out metrics as flat ``eval/<name>`` (the trained policy) or ``baseline/<name>``
    (the starting policy) keys of summary.json, with the number of problems and their seed.
    The keys of an earlier evaluation under that prefix go (``length_correct`` when no answer
    is right this time), so none stays beside numbers it was not measured with."""
    run.write_evaluation({**metrics, "problems": problems, "seed": seed}, prefix)


def finish(run: Run, cfg: LLMConfig, s: Setup) -> dict[str, Any]:
    """Final held-out metrics into summary.json (``eval/``), curves.png and the transformers
    export."""
    from mlatlas.llm.plots import curves_figure

    metrics = evaluate_policy(s.policy, s.tokenizer, s.task, s.test_items, s.reference,
                              max_new_tokens=cfg.max_new_tokens)
    write_eval_summary(run, "eval", metrics, len(s.test_items), 0)
    rewards = [row["reward"] for row in run.metrics if "reward" in row]
    warning = accuracy_warning(run.summary().get("baseline/accuracy"), metrics["accuracy"],
                               len(s.test_items), rewards, metrics.get("kl"))
    if warning:
        # With the evaluation it is about: a later `mlatlas eval` replaces both.
        run.write_summary({"eval/warning": warning,
                           "eval/reward_hacking": "reward hacking" in warning})
        if distributed.is_main():
            print(f"warning: {run.method}: {warning}", file=sys.stderr)
    run.save_figure(curves_figure(run.metrics, run.method), "curves.png")
    export_hf(run, s.policy, s.tokenizer)
    return metrics


# KL(pi || pi_ref) per held-out completion past which a fall in accuracy while the reward rises
# is reward hacking rather than noise: at 1 nat the trained policy makes its completions e times
# likelier than the reference did, far from where the KL penalty is meant to keep it.
HACKING_KL = 1.0


def accuracy_warning(baseline: float | None, accuracy: float, n: int,
                     rewards: Sequence[float] = (), kl: float | None = None,
                     kl_bound: float = HACKING_KL) -> str | None:
    """What to tell the user when held-out greedy accuracy fell below the start's by more than
    two standard errors of the difference of two accuracies on ``n`` problems,
    2 sqrt(2 p (1 - p) / n); None otherwise. If the logged training ``rewards`` rose meanwhile
    and the held-out ``kl`` to the reference (when there is one) passed ``kl_bound``, the policy
    has learnt to please its reward rather than to solve the task: reward hacking."""
    if baseline is None:
        return None
    p = min(max(baseline, 1 / n), 1 - 1 / n)
    if accuracy >= baseline - 2 * math.sqrt(2 * p * (1 - p) / n):
        return None
    text = f"held-out accuracy fell from {baseline:.3f} to {accuracy:.3f}"
    if len(rewards) >= 2 and rewards[-1] > rewards[0]:
        text += f" while the training reward rose ({rewards[0]:.3g} -> {rewards[-1]:.3g})"
        if kl is None or kl > kl_bound:
            drift = ("" if kl is None else
                     f" and KL to the reference grew to {kl:.3g} nats per completion, past "
                     f"{kl_bound:g}")
            return (f"{text}{drift}: the policy is exploiting its reward (reward hacking); "
                    "try a larger --beta, fewer --steps or a reward model with a higher "
                    "held-out AUC")
        return (f"{text}, with KL to the reference {kl:.3g} nats per completion (within "
                f"{kl_bound:g}); try a smaller --lr or fewer --steps")
    return f"{text}; try a smaller --lr or fewer --steps"


def start_metrics(run: Run, cfg: LLMConfig, s: Setup) -> None:
    """Held-out metrics of the starting policy, once, into summary.json (``baseline/``)."""
    if "baseline/accuracy" not in run.summary():
        metrics = evaluate_policy(s.policy, s.tokenizer, s.task, s.test_items,
                                  max_new_tokens=cfg.max_new_tokens)
        write_eval_summary(run, "baseline", metrics, len(s.test_items), 0)


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None
             ) -> dict[str, float]:
    """``mlatlas eval RUN``: held-out greedy accuracy, format rate, mean length, the sampled
    accuracy and (for runs that started from another policy) KL to that reference, on ``n``
    test problems (None: ``EVAL_PROBLEMS`` = 500). ``seed`` draws the problems and the sampled
    completions; the metrics also go to summary.json under ``eval/``."""
    if not (run.dir / LM_FILE).is_file():
        raise RunError(f"{run.dir} holds no language model")
    cfg = run.load_config()
    model, tokenizer = load_policy(run.dir)
    reference = None
    if cfg.init_from:
        try:
            reference = frozen_copy(load_policy(cfg.init_from)[0])
        except ConfigError:
            reference = None  # the reference run was moved or deleted: report the rest
    task = get_task(cfg.task)
    n = EVAL_PROBLEMS if n is None else n
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    items = problems(task, "test", n, parse_difficulties(cfg.difficulty, task), seed)
    metrics = evaluate_policy(model.eval(), tokenizer, task, items, reference,
                              max_new_tokens=cfg.max_new_tokens, seed=seed)
    write_eval_summary(run, "eval", metrics, n, seed)
    return metrics


def step_generator(seed: int, step: int, device=None) -> torch.Generator:
    """A generator seeded by (seed, step) alone, so a resumed run draws what the first did."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def step_problems(items: Sequence[Problem], size: int, generator: torch.Generator
                  ) -> list[Problem]:
    """``size`` problems drawn with replacement."""
    idx = torch.randint(len(items), (size,), generator=generator, device=generator.device)
    return [items[i] for i in idx.tolist()]


def periodic_eval(cfg: LLMConfig, s: Setup, step: int) -> dict[str, float]:
    """Held-out greedy metrics on the steps that are multiples of ``cfg.eval_every`` (and the
    last), else nothing; a method adds them to its step's metrics."""
    if step % cfg.eval_every and step != cfg.steps:
        return {}
    return evaluate_policy(s.policy, s.tokenizer, s.task, s.test_items,
                           max_new_tokens=cfg.max_new_tokens)
