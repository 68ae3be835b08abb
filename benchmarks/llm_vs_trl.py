"""GRPO and DPO: mlatlas against TRL's GRPOTrainer and DPOTrainer, from the same exported
weights, in one run.

    python benchmarks/llm_vs_trl.py [--init-from RUN_OR_HF_DIR] [--sft-steps 600] \\
        [--methods grpo,dpo] [--steps N] [--threads 1] [--eval-n 500] [--out DIR] [--json FILE]

Every method setting (``--grpo-steps``, ``--grpo-lr``, ``--group-size``, ``--dpo-beta``, ...)
defaults to mlatlas's own ``grpo.Config`` / ``dpo.Config`` default; ``--steps`` sets both step
counts. The defaults take about 6 minutes on one thread of a 2-core machine.

Start: an SFT policy, either ``--init-from`` (an mlatlas run folder, whose ``hf/`` export TRL
loads, or a transformers Llama folder) or an SFT run trained here (``sft.Config`` with
``--sft-steps``). TRL loads the policy with ``LlamaForCausalLM.from_pretrained`` and the tokenizer
with ``AutoTokenizer.from_pretrained`` from the same folder; mlatlas's ``--init-from`` reads the
same weights.

GRPO, both libraries: the task's training problems (the same 20,000 drawn with ``--seed``),
P prompts x G completions per optimizer step (TRL: ``per_device_train_batch_size = P G``,
``num_generations = G``, one generation per step), the same lr with a cosine decay (not matched:
ours warms up first, over ``grpo.Config.warmup_ratio`` = 0.1 of the steps, TRL's does not),
beta (k3 KL to the reference), clip epsilon, max completion length, temperature, top-p,
reward = exact match + format_weight * format (``task.rewards``), and the same loss averaging
(ours grpo/token/dr_grpo = TRL's grpo/bnpo/dr_grpo) and std scaling. TRL 1.16 defaults changed
to match DeepSeekMath's objective as ours computes it: ``use_bias_correction_kl=False`` (TRL's
default multiplies the KL term by the importance ratio) and ``bf16=False`` (TRL's default bf16
autocast; ours runs float32).

DPO: pairs built once from the SFT policy's own samples on training prompts (chosen correct,
rejected wrong), written as prompt/chosen/rejected JSONL (``OUT/pairs.jsonl``), fed to TRL as a
``datasets.Dataset`` and to mlatlas as ``--pairs``; the same beta, loss (sigmoid), batch size, lr
and schedule (linear warm-up over ``dpo.Config``'s ``warmup_steps``, steps/20, then cosine decay).
Both compute the reference
log-probabilities once (TRL: ``precompute_ref_log_probs=True``, done in its constructor; ours in
its first step).

Seconds per step: every optimizer step is timed inside the training call (TRL: a callback's
``on_step_end`` clock; mlatlas: ``wall_s`` of ``metrics.csv`` logged every step). The mean leaves
out step 1 (lazy set-up in both; our reference pass in DPO) and our last step (which holds our
final held-out evaluation); model loading and TRL's constructor are outside. Accuracy: the final
policies of both, scored by the same ``evaluate_policy`` (greedy, exact match) on the same
``--eval-n`` held-out test problems (TRL's weights are copied into a ``TinyLM``). Both run in
this process with ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mlatlas.core.io import read_json
from mlatlas.core.run import Run
from mlatlas.core.runtime import set_threads
from mlatlas.llm.common import (
    evaluate_policy,
    load_policy,
    policy_source,
    preference_pairs,
    step_generator,
    step_problems,
    warmup_steps,
)
from mlatlas.llm.model import TinyLM
from mlatlas.llm.tasks import (
    Problem,
    get_task,
    parse_difficulties,
    problems,
    read_jsonl,
    write_jsonl,
)

GRPO_LOSS_TYPES = {"grpo": "grpo", "token": "bnpo", "dr_grpo": "dr_grpo"}  # ours -> TRL's


# benchmark flag -> (mlatlas method, its Config field) whose default the flag takes
DEFAULTS_FROM = {
    "max_new_tokens": ("grpo", "max_new_tokens"), "temperature": ("grpo", "temperature"),
    "top_p": ("grpo", "top_p"), "grpo_steps": ("grpo", "steps"), "grpo_lr": ("grpo", "lr"),
    "prompts_per_step": ("grpo", "prompts_per_step"), "group_size": ("grpo", "group_size"),
    "grpo_beta": ("grpo", "beta"), "clip_eps": ("grpo", "clip_eps"),
    "loss_type": ("grpo", "loss_type"), "format_weight": ("grpo", "format_weight"),
    "dpo_steps": ("dpo", "steps"), "dpo_lr": ("dpo", "lr"), "dpo_beta": ("dpo", "beta"),
    "batch_size": ("dpo", "batch_size"), "pair_prompts": ("dpo", "pair_prompts"),
    "samples": ("dpo", "samples"),
}


def fill_defaults(args: argparse.Namespace) -> None:
    import importlib

    for name, (method, field) in DEFAULTS_FROM.items():
        if getattr(args, name) is None:
            config = importlib.import_module(f"mlatlas.llm.{method}").Config
            setattr(args, name, config.__dataclass_fields__[field].default)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init-from", default="", help="SFT run folder or transformers Llama folder "
                   "(default: train an SFT run here)")
    p.add_argument("--sft-steps", type=int, default=600, help="steps of the SFT run trained here")
    p.add_argument("--methods", default="grpo,dpo")
    p.add_argument("--libs", default="ours,trl")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps of every method (overrides --grpo-steps, --dpo-steps)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--task", default="addition")
    p.add_argument("--difficulty", default="1-3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=500, help="held-out test problems scored")
    # Method settings default to mlatlas's own Config defaults (DEFAULTS_FROM).
    for name, kind in (("max-new-tokens", int), ("temperature", float), ("top-p", float),
                       ("grpo-steps", int), ("grpo-lr", float), ("prompts-per-step", int),
                       ("group-size", int), ("grpo-beta", float), ("clip-eps", float),
                       ("loss-type", str), ("format-weight", float), ("dpo-steps", int),
                       ("dpo-lr", float), ("dpo-beta", float), ("batch-size", int),
                       ("pair-prompts", int), ("samples", int)):
        method, field = DEFAULTS_FROM[name.replace("-", "_")]
        p.add_argument(f"--{name}", type=kind, default=None,
                       help=f"default: mlatlas {method}.Config's {field}")
    p.add_argument("--out", default="", help="folder for the runs (default: a temporary one)")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    fill_defaults(args)
    if args.loss_type not in GRPO_LOSS_TYPES:
        p.error(f"--loss-type must be one of {', '.join(GRPO_LOSS_TYPES)}")
    if args.steps is not None:
        args.grpo_steps = args.dpo_steps = args.steps
    if min(args.grpo_steps, args.dpo_steps) < 3:
        p.error("--steps must be at least 3 (steps 1 and the last are left out of s/step)")
    args.methods = [m for m in args.methods.split(",") if m]
    args.libs = [m for m in args.libs.split(",") if m]
    for m in args.methods:
        if m not in ("grpo", "dpo"):
            p.error(f"--methods: unknown method {m!r} (grpo, dpo)")
    for lib in args.libs:
        if lib not in ("ours", "trl"):
            p.error(f"--libs: unknown library {lib!r} (ours, trl)")
    return args


# the starting policy ---------------------------------------------------------------------------

def start_policy(args, out: Path) -> tuple[str, Path]:
    """(our --init-from, the transformers folder TRL loads) of the SFT policy."""
    if args.init_from:
        init = Path(args.init_from)
        hf_dir = init if policy_source(init) == "hf" else init / "hf"
        if not (hf_dir / "config.json").is_file():
            sys.exit(f"{init} has no hf/ export for TRL to load")
        return str(init), hf_dir
    from mlatlas.llm import sft

    cfg = sft.Config(task=args.task, difficulty=args.difficulty, steps=args.sft_steps,
                     seed=args.seed, eval_every=args.sft_steps, log_every=args.sft_steps,
                     ckpt_every=args.sft_steps)
    t0 = time.perf_counter()
    run = sft.train(cfg, Run.create(cfg.METHOD, cfg, root=out), progress=False)
    print(f"SFT: {args.sft_steps} steps in {time.perf_counter() - t0:.0f} s -> {run.dir}")
    return str(run.dir), run.dir / "hf"


def trl_weights_as_tinylm(hf_model, like: TinyLM) -> TinyLM:
    """TRL's trained LlamaForCausalLM as a TinyLM (the same state_dict keys)."""
    state = hf_model.state_dict()
    model = TinyLM(like.cfg)
    model.load_state_dict({k: state[k].detach().float().cpu() for k in model.state_dict()})
    return model.eval()


def score(model: TinyLM, tokenizer, task, test_items, args) -> float:
    return evaluate_policy(model.eval(), tokenizer, task, test_items,
                           max_new_tokens=args.max_new_tokens)["accuracy"]


def mean_step_s(durations: list[float]) -> float:
    return statistics.fmean(durations) if durations else float("nan")


def our_step_seconds(run: Run) -> list[float]:
    """Durations of steps 2 .. N-1 from metrics.csv's cumulative wall_s (logged every step)."""
    with open(run.path("metrics.csv")) as f:
        wall = [float(r["wall_s"]) for r in csv.DictReader(f)]
    return [b - a for a, b in zip(wall[:-2], wall[1:-1], strict=True)]


def step_clock():
    """A transformers TrainerCallback that records when each optimizer step ends (built here so
    that ``--libs ours`` runs without transformers)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def durations(self) -> list[float]:  # steps 2 .. N
            return [b - a for a, b in zip(self.ends[:-1], self.ends[1:], strict=True)]

    return StepClock()


def trl_common(args, out_dir: Path, steps: int, lr: float, warmup: int) -> dict:
    return dict(output_dir=str(out_dir), max_steps=steps, learning_rate=lr,
                lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=0.0,
                max_grad_norm=1.0, gradient_accumulation_steps=1, seed=args.seed,
                logging_steps=steps, save_strategy="no", report_to=[], use_cpu=True,
                bf16=False, disable_tqdm=True)


# GRPO --------------------------------------------------------------------------------------------

def grpo_ours(args, init: str, out: Path) -> tuple[Run, list[float]]:
    from mlatlas.llm import grpo

    cfg = grpo.Config(init_from=init, task=args.task, difficulty=args.difficulty,
                      seed=args.seed, steps=args.grpo_steps, lr=args.grpo_lr,
                      prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                      beta=args.grpo_beta, clip_eps=args.clip_eps, loss_type=args.loss_type,
                      format_weight=args.format_weight, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, eval_n=args.eval_n,
                      log_every=1, eval_every=args.grpo_steps, ckpt_every=args.grpo_steps)
    run = grpo.train(cfg, Run.create(cfg.METHOD, cfg, root=out), progress=False)
    return run, our_step_seconds(run)


def grpo_trl(args, hf_dir: Path, task, train_items: list[Problem], out: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, solution, answer, difficulty, prompts=None, **_):
        items = [Problem(p, s, a, d) for p, s, a, d in zip(prompts, solution, answer,
                                                            difficulty, strict=True)]
        correct, formatted = task.rewards(items, completions)
        return [c + args.format_weight * f for c, f in zip(correct, formatted, strict=True)]

    config = GRPOConfig(
        **trl_common(args, out / "trl_grpo", args.grpo_steps, args.grpo_lr, 0),
        per_device_train_batch_size=args.prompts_per_step * args.group_size,
        num_generations=args.group_size, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=0, beta=args.grpo_beta, epsilon=args.clip_eps,
        loss_type=GRPO_LOSS_TYPES[args.loss_type],
        scale_rewards="none" if args.loss_type == "dr_grpo" else "group",
        use_bias_correction_kl=False, mask_truncated_completions=False)
    rows = [{"prompt": p.prompt, "solution": p.solution, "answer": p.answer,
             "difficulty": p.difficulty} for p in train_items]
    clock = step_clock()
    # A path, so that TRL loads the frozen reference itself (beta > 0).
    trainer = GRPOTrainer(model=str(hf_dir), reward_funcs=[reward], args=config,
                          train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(hf_dir),
                          callbacks=[clock])
    trainer.train()
    return trainer.model, clock.durations()


# DPO ---------------------------------------------------------------------------------------------

def build_pairs(args, init: str, task, train_items: list[Problem], path: Path) -> int:
    """Prompt/chosen/rejected rows from the SFT policy's samples, as ours builds them."""
    policy, tokenizer = load_policy(init)
    generator = step_generator(args.seed, 1)
    items = step_problems(train_items, args.pair_prompts, generator)
    rows = preference_pairs(policy.eval(), tokenizer, task, items, samples=args.samples,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            generator=generator)
    write_jsonl(path, rows)
    return len(rows)


def dpo_ours(args, init: str, pairs: Path, out: Path) -> tuple[Run, list[float]]:
    from mlatlas.llm import dpo

    cfg = dpo.Config(init_from=init, task=args.task, difficulty=args.difficulty,
                     seed=args.seed, steps=args.dpo_steps, lr=args.dpo_lr, beta=args.dpo_beta,
                     loss_type="sigmoid", batch_size=args.batch_size, pairs=str(pairs),
                     max_new_tokens=args.max_new_tokens, eval_n=args.eval_n, log_every=1,
                     eval_every=args.dpo_steps, ckpt_every=args.dpo_steps)
    run = dpo.train(cfg, Run.create(cfg.METHOD, cfg, root=out), progress=False)
    return run, our_step_seconds(run)


def dpo_trl(args, hf_dir: Path, pairs: list[dict], out: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from mlatlas.llm import dpo

    warmup = warmup_steps(dpo.Config(steps=args.dpo_steps))  # ours, as dpo.train sets it
    config = DPOConfig(**trl_common(args, out / "trl_dpo", args.dpo_steps, args.dpo_lr, warmup),
                       per_device_train_batch_size=args.batch_size, beta=args.dpo_beta,
                       loss_type=["sigmoid"], precompute_ref_log_probs=True)
    clock = step_clock()
    trainer = DPOTrainer(model=str(hf_dir), args=config, train_dataset=Dataset.from_list(pairs),
                         processing_class=AutoTokenizer.from_pretrained(hf_dir),
                         callbacks=[clock])
    trainer.train()
    return trainer.model, clock.durations()


# the run -----------------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="llm_vs_trl-"))
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(args.task)
    levels = parse_difficulties(args.difficulty, task)
    init, hf_dir = start_policy(args, out)
    start_model, tokenizer = load_policy(init)
    test_items = problems(task, "test", args.eval_n, levels, 0)
    train_items = problems(task, "train", 20000, levels, args.seed)
    start_accuracy = score(start_model, tokenizer, task, test_items, args)
    print(f"start policy {init}: held-out accuracy {start_accuracy:.3f} on {args.eval_n} "
          f"problems; torch threads {threads}")
    results = []
    for method in args.methods:
        row = {"method": method, "start_accuracy": start_accuracy,
               "steps": args.grpo_steps if method == "grpo" else args.dpo_steps}
        if method == "dpo":
            pairs_path = out / "pairs.jsonl"
            row["pairs"] = build_pairs(args, init, task, train_items, pairs_path)
            pairs = read_jsonl(pairs_path, ("prompt", "chosen", "rejected"))
        if "trl" in args.libs:
            t0 = time.perf_counter()
            if method == "grpo":
                model, durations = grpo_trl(args, hf_dir, task, train_items, out)
            else:
                model, durations = dpo_trl(args, hf_dir, pairs, out)
            row["trl_s_per_step"] = mean_step_s(durations)
            row["trl_total_s"] = time.perf_counter() - t0
            row["trl_accuracy"] = score(trl_weights_as_tinylm(model, start_model), tokenizer,
                                        task, test_items, args)
            print(f"{method} TRL: {row['trl_s_per_step']:.3f} s/step, accuracy "
                  f"{row['trl_accuracy']:.3f}, torch threads {torch.get_num_threads()}")
        if "ours" in args.libs:
            if method == "grpo":
                run, durations = grpo_ours(args, init, out)
            else:
                run, durations = dpo_ours(args, init, pairs_path, out)
            row["ours_s_per_step"] = mean_step_s(durations)
            row["ours_accuracy"] = score(load_policy(run.dir)[0], tokenizer, task, test_items,
                                         args)
            row["ours_summary_final_accuracy"] = read_json(run.path("summary.json")).get(
                "eval/accuracy")
            row["ours_run"] = str(run.dir)
            print(f"{method} ours: {row['ours_s_per_step']:.3f} s/step, accuracy "
                  f"{row['ours_accuracy']:.3f} ({run.dir})")
        results.append(row)
    report(args, results, threads)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv, "results": results}, indent=2))


def report(args, results: list[dict], threads: int) -> None:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    print("\n| method | steps | TRL s/step | ours s/step | ratio | start acc | TRL acc "
          "| ours acc |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        peer, ours = r.get("trl_s_per_step"), r.get("ours_s_per_step")
        ratio = peer / ours if peer and ours else None
        print(f"| {r['method']} | {r['steps']} | {f(peer, '.3f')} | {f(ours, '.3f')} | "
              f"{f(ratio, '.1f')}x | {r['start_accuracy']:.3f} | "
              f"{f(r.get('trl_accuracy'), '.3f')} | {f(r.get('ours_accuracy'), '.3f')} |")
    print(f"\naccuracy: greedy exact match on {args.eval_n} held-out problems; s/step: mean over "
          f"steps 2..N (ours 2..N-1); torch threads {threads}")
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))


if __name__ == "__main__":
    main()
