"""Parity with TRL (a dev extra): the DPO/IPO and GRPO losses that TRL's trainers compute on
our exported weights equal ours, and our tokenizer and export load in transformers as TRL
reads them.

TRL keeps its losses inside ``DPOTrainer.compute_loss`` and ``GRPOTrainer._compute_loss``, so
each test builds the trainer on the same transformers folder our TinyLM was exported to and
feeds both sides the same batch: the values compared include TRL's tokenisation and its own
log-probabilities, not only the formula. TRL's configs default to bf16 autocast, which its
trainers apply to the reference model too; the tests turn it off to compare float32 with
float32.
"""

import copy

import pytest
import torch

from mlatlas.llm.common import (
    completion_logprobs,
    encode_completions,
    encode_prompts,
    masked_mean,
)
from mlatlas.llm.model import LMConfig, TinyLM, save_pretrained
from mlatlas.llm.tasks import get_task, problems
from mlatlas.nn.tokenizers import Tokenizer

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny policy and a different random reference, both exported for transformers,
    with a character tokenizer and addition problems."""
    task = get_task("addition")
    items = problems(task, "train", 8, [1, 2], 0)
    tokenizer = Tokenizer.characters([p.prompt + p.solution for p in items] + [task.alphabet])
    root = tmp_path_factory.mktemp("trl")
    models, folders = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = TinyLM(LMConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4,
                                n_kv_heads=2, hidden_dim=64, max_seq_len=64)).eval()
        folder = save_pretrained(model, root / f"model{seed}", bos_id=tokenizer.bos_id,
                                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        tokenizer.save_pretrained(folder, 64)
        models.append(model)
        folders.append(folder)
    return {"policy": models[0], "reference": models[1], "policy_dir": folders[0],
            "reference_dir": folders[1], "tokenizer": tokenizer, "items": items}


def hf_model(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder)


def test_tokenizer_round_trip_through_auto_tokenizer(exported):
    tokenizer, items = exported["tokenizer"], exported["items"]
    hf = transformers.AutoTokenizer.from_pretrained(exported["policy_dir"])
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    for p in items:
        # TRL's GRPOTrainer and DPOTrainer call tokenizer(prompt): the <bos> must come with it.
        assert hf(p.prompt)["input_ids"] == tokenizer.encode(p.prompt, bos=True)
        ids = tokenizer.encode(p.solution) + [tokenizer.eos_id]
        assert hf.decode(ids, skip_special_tokens=True) == p.solution


def pair_rows(items):
    # Rejected answers of other lengths than the chosen, so that IPO's length normalisation and
    # the right padding both matter.
    return [{"prompt": p.prompt, "chosen": p.solution,
             "rejected": str(int(p.answer) * 7 + i)} for i, p in enumerate(items)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_matches_trl_dpo_trainer(exported, tmp_path, loss_type):
    from mlatlas.llm.dpo import dpo_loss

    rows, beta = pair_rows(exported["items"]), 0.3
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=[loss_type],
                         per_device_train_batch_size=len(rows), report_to=[], use_cpu=True,
                         save_strategy="no", precompute_ref_log_probs=False, bf16=False)
    trainer = trl.DPOTrainer(
        model=hf_model(exported["policy_dir"]), ref_model=hf_model(exported["reference_dir"]),
        args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(exported["policy_dir"]))
    # The collator on the rows in order (the dataloader would shuffle them).
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)

    tokenizer = exported["tokenizer"]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [r["prompt"] for r in rows] * 2)
    completion_ids, completion_mask = encode_completions(
        tokenizer, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    # TRL tokenised the same completions (with <eos>): rows are [chosen..., rejected...].
    assert batch["input_ids"][batch["completion_mask"].bool()].tolist() \
        == completion_ids[completion_mask.bool()].tolist()
    with torch.no_grad():
        args = (prompt_ids, prompt_mask, completion_ids, completion_mask)
        logps = completion_logprobs(exported["policy"], *args).sum(-1)
        ref_logps = completion_logprobs(exported["reference"], *args).sum(-1)
    if loss_type == "ipo":
        # TRL's IPO averages the log-ratios over each completion's tokens (its comment: as the
        # IPO authors confirmed); ours takes sequence sums, so feed ours the per-token means.
        lengths = completion_mask.sum(-1)
        logps, ref_logps = logps / lengths, ref_logps / lengths
    ours, _, _ = dpo_loss(*logps.chunk(2), *ref_logps.chunk(2), beta, loss_type)
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert abs(ours.item() - 0.6931) > 1e-2  # policy != reference: not the trivial ln 2


# our loss_type name -> TRL's
GRPO_LOSS_TYPES = {"grpo": "grpo", "token": "bnpo", "dr_grpo": "dr_grpo"}


@pytest.mark.parametrize("loss_type", list(GRPO_LOSS_TYPES))
def test_grpo_loss_and_gradient_match_trl_grpo_trainer(exported, tmp_path, loss_type):
    from mlatlas.llm.grpo import grpo_loss

    tokenizer, items = exported["tokenizer"], exported["items"][:4]
    beta, eps, max_tokens = 0.04, 0.2, 9
    args = trl.GRPOConfig(output_dir=str(tmp_path), beta=beta, epsilon=eps,
                          loss_type=GRPO_LOSS_TYPES[loss_type], num_generations=4,
                          per_device_train_batch_size=4, max_completion_length=max_tokens,
                          report_to=[], use_cpu=True, save_strategy="no", bf16=False,
                          # TRL 1.16 multiplies the k3 term by the ratio by default (an
                          # importance weight for samples of pi_old); DeepSeekMath's J does not.
                          use_bias_correction_kl=False)
    hf = hf_model(exported["policy_dir"])
    trainer = trl.GRPOTrainer(
        model=hf, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args, train_dataset=datasets.Dataset.from_list([{"prompt": p.prompt}
                                                              for p in items]),
        processing_class=transformers.AutoTokenizer.from_pretrained(exported["policy_dir"]))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we skip

    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p.prompt for p in items])
    completion_ids, completion_mask = encode_completions(
        tokenizer, [items[0].solution, "1", items[2].solution + "0", "12345"])
    advantages = torch.tensor([1.2, -0.4, 0.3, -1.1])
    policy = copy.deepcopy(exported["policy"])  # its gradients stay in this test
    batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    logp = completion_logprobs(policy, *batch)
    with torch.no_grad():
        ref_logp = completion_logprobs(exported["reference"], *batch)
    # An old policy off by up to +-0.4 in log-probability, so that some ratios leave
    # [1 - eps, 1 + eps] and the clip matters.
    old_logp = logp.detach() + 0.4 * (2 * torch.rand(logp.shape) - 1)
    ours, _ = grpo_loss(logp, old_logp, ref_logp, advantages, completion_mask, eps, beta,
                        loss_type, max_tokens)
    ours.backward()

    theirs = trainer._compute_loss(hf, {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": advantages,
        "old_per_token_logps": old_logp, "ref_per_token_logps": ref_logp})
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-6
    ratio = torch.exp(logp.detach() - old_logp)
    assert masked_mean(((ratio - 1).abs() > eps).float(), completion_mask) > 0
    grads = dict(hf.named_parameters())
    for name, p in policy.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, rtol=1e-4, atol=1e-7), name


def test_group_advantages_match_trl_normalisation():
    from trl.trainer.utils import nanstd

    from mlatlas.llm.grpo import group_advantages

    rewards = torch.tensor([[1.1, 0.1, 0.0, 1.1], [0.1, 0.1, 0.1, 0.1], [1.0, 0.0, 0.0, 0.0]])
    mean = torch.nanmean(rewards, dim=1, keepdim=True)
    # GRPOTrainer's formula (scale_rewards="group"): (r - mean) / (nanstd + 1e-4), Bessel-corrected.
    theirs = (rewards - mean) / (nanstd(rewards, dim=1, keepdim=True) + 1e-4)
    assert torch.allclose(group_advantages(rewards), theirs, atol=1e-6)
    assert torch.allclose(group_advantages(rewards, scale=False), rewards - mean)
