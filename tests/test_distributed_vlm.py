"""The vision-language model data-parallel: ``mlatlas train vlm --nproc 2`` (gloo on the CPU)
ends with the parameters of the one-process run of the same global batch: each rank encodes
and scores its shard of the step's items, the answer NLL is a token mean over the whole batch
(``llm.common.token_mean``), and the router biases follow the whole batch's expert load."""

import pytest
from parallel import assert_close_params, train_run

from mlatlas.core.run import Run

FLAGS = ("--stage", "sft", "--steps", "4", "--batch-size", "8", "--n-train", "32",
         "--eval-n", "6", "--eval-every", "4", "--log-every", "2", "--ckpt-every", "4",
         "--vit-width", "16", "--vit-depth", "1", "--dim", "16", "--n-layers", "2",
         "--n-heads", "2", "--n-experts", "4", "--expert-dim", "8", "--max-new-tokens", "3",
         "--lr", "1e-3")


def test_two_ranks_train_what_one_process_trains(tmp_path):
    one = train_run(tmp_path / "ws1", "vlm", *FLAGS)
    two = train_run(tmp_path / "ws2", "vlm", *FLAGS, nproc=2)
    assert_close_params(one, two, atol=1e-5)


def test_the_rl_stage_runs_on_two_ranks_as_in_one_process(tmp_path):
    """Two ranks sample their shards of the step's groups together (decoding until every rank's
    replies are done) and end with one process's logged rewards and parameters. (The tiny
    model's replies all run to --max-new-tokens and earn 0, so this checks the collectives and
    the bookkeeping; that each token is drawn with the global batch's numbers is
    ``nn.sampling``'s, tested with the LLM family.)"""
    start = train_run(tmp_path / "sft", "vlm", *FLAGS)
    rl = ("--stage", "rl", "--init-from", str(start), "--steps", "2", "--log-every", "1",
          "--eval-every", "2", "--ckpt-every", "2", "--prompts-per-step", "4",
          "--group-size", "2", "--eval-n", "6", "--max-new-tokens", "3", "--lr", "1e-3")
    one = train_run(tmp_path / "ws1", "vlm", *rl)
    two = train_run(tmp_path / "ws2", "vlm", *rl, nproc=2)
    rows_1, rows_2 = Run.open(one).metrics, Run.open(two).metrics
    for a, b in zip(rows_1, rows_2, strict=True):
        assert a["reply_length"] == pytest.approx(b["reply_length"], abs=1e-9)
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-9)
    assert_close_params(one, two, atol=1e-5)
