"""The language-model family data-parallel: ``mlatlas train METHOD --nproc 2`` (gloo on the CPU)
ends with the parameters and the logged metrics of the one-process run of the same global batch,
for the supervised and preference losses (their token means divided by the global token count)
and for the sampled rollouts of GRPO, Kimi and PPO-RLHF (drawn with the global batch's random
numbers); bf16 and fp16 train (slow: --compile too); the sampler draws what
``torch.multinomial`` draws."""

import math

import pytest
import torch
from parallel import assert_close_params, params, train_run

from mlatlas.core.run import Run
from mlatlas.llm import sft
from mlatlas.nn.sampling import sample_token

TINY_SFT = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, batch_size=16,
                difficulty="1", eval_n=10, log_every=10, eval_every=40, ckpt_every=40,
                steps=40, lr=3e-3)
COMMON = ("--difficulty", "1", "--eval-n", "10", "--log-every", "2", "--eval-every", "6",
          "--ckpt-every", "100", "--steps", "6")


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    """A barely trained one-layer policy (a few seconds) that every run here starts from."""
    cfg = sft.Config(**TINY_SFT)
    return sft.train(cfg, Run.create("sft", cfg, tmp_path_factory.mktemp("sft")),
                     progress=False).dir


def sft_flags(tiny_sft) -> tuple[str, ...]:
    return (*COMMON, "--init-from", str(tiny_sft), "--batch-size", "16", "--lr", "1e-3")


@pytest.fixture(scope="module")
def sft_one_rank(tiny_sft, tmp_path_factory):
    """Six steps of SFT from the tiny policy in one process, in float32."""
    return train_run(tmp_path_factory.mktemp("ws1"), "sft", *sft_flags(tiny_sft))


def one_and_two_ranks(tmp_path, method, *flags):
    """The run in one process and in two, with the same global batch."""
    return (train_run(tmp_path / "ws1", method, *flags),
            train_run(tmp_path / "ws2", method, *flags, nproc=2))


def assert_moved(start, directory, group: str = "model") -> None:
    begin, end = params(start), params(directory, group)
    assert max(float((begin[k] - end[k]).abs().max()) for k in begin) > 1e-3


def assert_same_metrics(one, two, exact=(), atol=1e-6) -> None:
    """Every logged metric of the two-rank run is the one-process run's (the global batch's),
    to ``atol``; those in ``exact`` (counts, rates of sampled completions) to the bit."""
    rows_1, rows_2 = Run.open(one).metrics, Run.open(two).metrics
    assert [r["step"] for r in rows_1] == [r["step"] for r in rows_2]
    for a, b in zip(rows_1, rows_2, strict=True):
        assert a.keys() == b.keys()
        for name in a.keys() - {"step", "wall_s"}:
            if name in exact:
                assert b[name] == a[name], name
            elif not (isinstance(a[name], float) and math.isnan(a[name])):
                assert b[name] == pytest.approx(a[name], abs=atol), name


def test_sft_two_ranks_equal_one(tiny_sft, sft_one_rank, tmp_path):
    one, two = sft_one_rank, train_run(tmp_path, "sft", *sft_flags(tiny_sft), nproc=2)
    assert_close_params(one, two, 1e-6)
    assert_moved(tiny_sft, two)
    # The logged loss is the token mean of the global batch, not a mean of the ranks' means.
    assert_same_metrics(one, two)


def test_dpo_two_ranks_equal_one(tiny_sft, tmp_path):
    """With RPO's token-mean likelihood term and a pair set rebuilt from the policy at step 5,
    which every rank builds alike."""
    one, two = one_and_two_ranks(tmp_path, "dpo", *COMMON, "--init-from", str(tiny_sft),
                                 "--pair-prompts", "32", "--samples", "4", "--batch-size", "8",
                                 "--max-new-tokens", "8", "--lr", "1e-3", "--rpo-alpha", "0.5",
                                 "--refresh-every", "4")
    assert_close_params(one, two, 1e-6)
    assert_moved(tiny_sft, two)
    assert_same_metrics(one, two, exact=("pairs", "pair_accuracy"))
    for name in ("pairs.jsonl", "pairs_step5.jsonl"):
        assert (one / name).read_text() == (two / name).read_text()


ROLLOUT = ("--max-new-tokens", "8", "--lr", "1e-3", "--init-from")


def test_grpo_two_ranks_sample_and_train_as_one(tiny_sft, tmp_path):
    """Each rank samples its prompts' groups with the global batch's draws: the completions,
    hence the rewards, lengths and every statistic, are the one-process run's, and so are the
    parameters after the token-mean loss's updates."""
    one, two = one_and_two_ranks(tmp_path, "grpo", *COMMON, *ROLLOUT, str(tiny_sft),
                                 "--prompts-per-step", "4", "--group-size", "4",
                                 "--loss-type", "token", "--num-iterations", "2")
    assert_close_params(one, two, 1e-6)
    assert_moved(tiny_sft, two)
    # reward: the mean over all 16 completions of both ranks; correct and sample_length are
    # rates of the same samples.
    assert_same_metrics(one, two, exact=("correct", "sample_length", "zero_std_frac"))


@pytest.mark.slow  # GRPO's rollout sharding, tested by default, is Kimi's too
def test_kimi_two_ranks_equal_one(tiny_sft, tmp_path):
    one, two = one_and_two_ranks(tmp_path, "kimi", *COMMON, *ROLLOUT, str(tiny_sft),
                                 "--prompts", "4", "--group-size", "4", "--length-weight", "0.5")
    assert_close_params(one, two, 1e-6)
    assert_moved(tiny_sft, two)
    assert_same_metrics(one, two, exact=("reward", "length"))


def test_ppo_rlhf_two_ranks_equal_one(tiny_sft, tmp_path):
    """The rollout gathered on every rank: score statistics, GAE, whitening and minibatches are
    the global batch's, with the pre-training term on each rank's shard of its problems."""
    one, two = one_and_two_ranks(tmp_path, "ppo_rlhf", *COMMON, *ROLLOUT, str(tiny_sft),
                                 "--reward", "verifier", "--prompts-per-step", "8",
                                 "--minibatch-size", "4", "--critic-warmup", "1",
                                 "--ptx-coef", "0.1")
    for group in ("model", "critic", "score_stats"):
        assert_close_params(one, two, 1e-6, group=group)
    assert_moved(tiny_sft, two)
    assert_same_metrics(one, two, exact=("correct", "length"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sft_trains_in_half_precision(tiny_sft, sft_one_rank, tmp_path, precision):
    """Two ranks in bf16 or fp16 (loss-scaled, its scale checkpointed) follow the float32 run
    to the rounding of half-precision matrix products."""
    half = train_run(tmp_path, "sft", *sft_flags(tiny_sft), "--precision", precision, nproc=2)
    assert_moved(tiny_sft, half)
    assert_close_params(sft_one_rank, half, 1e-2)
    for a, b in zip(Run.open(sft_one_rank).metrics, Run.open(half).metrics, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-2)
    stored = params(half, "precision")
    assert (set(stored) == {"scale", "growth_tracker"}) == (precision == "fp16")


@pytest.mark.slow
def test_compiled_sft_at_two_ranks_equals_eager_at_one(tiny_sft, sft_one_rank, tmp_path):
    """--compile changes kernels, not the run (slow: 20-35 s of compilation on two CPU
    ranks)."""
    compiled = train_run(tmp_path, "sft", *sft_flags(tiny_sft), "--compile", nproc=2)
    assert_close_params(sft_one_rank, compiled, 1e-5)


def test_sampler_draws_what_torch_multinomial_draws():
    """The exponential race with torch.multinomial's own draw: the same tokens and the same
    generator state after, so one-process rollouts (and BLIP's captions) are as before."""
    for trial in range(50):
        g = torch.Generator().manual_seed(trial)
        logits = 3 * torch.randn(1 + trial % 7, 2 + 13 * trial, generator=g)
        top_p = (1.0, 0.9, 0.3)[trial % 3]
        probs = torch.softmax(logits / 0.8, -1)
        if top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
        ours, theirs = (torch.Generator().manual_seed(trial) for _ in range(2))
        assert torch.equal(sample_token(logits, 0.8, top_p, ours),
                           torch.multinomial(probs, 1, generator=theirs)[:, 0])
        assert torch.equal(ours.get_state(), theirs.get_state())
