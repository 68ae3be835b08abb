"""The vision-language model data-parallel: ``mlatlas train vlm --nproc 2`` (gloo on the CPU)
ends with the parameters of the one-process run of the same global batch: each rank encodes
and scores its shard of the step's items, the answer NLL is a token mean over the whole batch
(``llm.common.token_mean``), and the router biases follow the whole batch's expert load."""

from parallel import assert_close_params, train_run

FLAGS = ("--stage", "sft", "--steps", "4", "--batch-size", "8", "--n-train", "32",
         "--eval-n", "6", "--eval-every", "4", "--log-every", "2", "--ckpt-every", "4",
         "--vit-width", "16", "--vit-depth", "1", "--dim", "16", "--n-layers", "2",
         "--n-heads", "2", "--n-experts", "4", "--expert-dim", "8", "--max-new-tokens", "3",
         "--lr", "1e-3")


def test_two_ranks_train_what_one_process_trains(tmp_path):
    one = train_run(tmp_path / "ws1", "vlm", *FLAGS)
    two = train_run(tmp_path / "ws2", "vlm", *FLAGS, nproc=2)
    assert_close_params(one, two, atol=1e-5)
