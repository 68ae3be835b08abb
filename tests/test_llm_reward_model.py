"""The Bradley-Terry reward model: the loss by hand, the head reads the last real token whatever
the padding, exact resume and evaluation of a tiny run; slow: it ranks held-out answers."""

import math

import pytest
import torch
from crashes import assert_same_checkpoints, crash_at, drop_wall

from mlatlas.cli import main
from mlatlas.core.config import ConfigError
from mlatlas.core.run import Run
from mlatlas.llm import reward_model, sft
from mlatlas.llm.model import LMConfig

TINY_SFT = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, batch_size=16,
                difficulty="1", eval_n=16, log_every=2, eval_every=4, ckpt_every=4, lr=3e-3)


def test_bradley_terry_loss_by_hand():
    r_w, r_l = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(2)) / 2
    assert reward_model.bradley_terry_loss(r_w, r_l).item() == pytest.approx(expected)
    assert reward_model.bradley_terry_loss(r_l, r_l).item() == pytest.approx(math.log(2))


def test_the_reward_is_read_at_the_last_real_token_whatever_the_padding():
    model = reward_model.RewardModel(LMConfig(vocab_size=12, dim=16, n_layers=1, n_heads=2,
                                              n_kv_heads=2, hidden_dim=32, max_seq_len=16))
    torch.nn.init.normal_(model.score.weight)
    row = torch.tensor([[1, 5, 6, 7, 2]])
    padded = torch.tensor([[0, 0, 1, 5, 6, 7, 2, 0, 0]])
    mask = (padded != 0).long()
    with torch.no_grad():
        alone = model(row, torch.ones_like(row))
        assert torch.allclose(model(padded, mask), alone, atol=1e-5)
        assert torch.allclose(alone, model.values(row, torch.ones_like(row))[:, -1])
        # a different last token changes the reward: the head does read it
        assert not torch.allclose(model(torch.tensor([[1, 5, 6, 7, 3]]), mask[:, 2:7]), alone)


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    cfg = sft.Config(**TINY_SFT, steps=40)
    return sft.train(cfg, Run.create("sft", cfg, tmp_path_factory.mktemp("sft")),
                     progress=False)


def test_reward_model_resumes_exactly_and_evaluates(tiny_sft, runs, monkeypatch):
    cfg = reward_model.Config(init_from=str(tiny_sft.dir), difficulty="1", steps=4,
                              pair_prompts=24, eval_n=16, batch_size=8, log_every=1,
                              eval_every=2, ckpt_every=2)
    whole = reward_model.train(cfg, Run.create("reward_model", cfg, runs), progress=False)
    assert whole.path("pairs.jsonl").is_file()
    stopped = Run.create("reward_model", cfg, runs)
    # The learning rate follows the whole run's cosine, so a stop is a crash at step 3 (the
    # last checkpoint is step 2), not a shorter run.
    crash_at(monkeypatch, reward_model, 3)
    with pytest.raises(KeyboardInterrupt):
        reward_model.train(cfg, stopped, progress=False)
    assert stopped.checkpoint_step() == 2
    monkeypatch.undo()
    reward_model.train(cfg, Run.open(stopped.dir), progress=False)
    assert_same_checkpoints(*(r.path("checkpoint.safetensors") for r in (whole, stopped)))
    assert drop_wall(whole.metrics) == drop_wall(Run.open(stopped.dir).metrics)
    model, _ = reward_model.load_reward_model(whole.dir)
    assert model.score.weight.abs().sum() > 0
    assert {"train/pairs", "eval/pairs", "eval/pair_accuracy"} <= set(whole.summary())
    metrics = reward_model.evaluate(Run.open(whole.dir), n=16)
    assert 0.0 <= metrics["pair_accuracy"] <= 1.0
    assert reward_model.evaluate(Run.open(whole.dir), n=16) == metrics  # seed 0 both times
    assert whole.summary()["eval/problems"] == 16 and whole.summary()["eval/pairs"] == \
        metrics["pairs"]


def test_bad_input_is_clear(tiny_sft, capsys):
    with pytest.raises(ConfigError, match="--init-from"):
        reward_model.Config().check_data()
    with pytest.raises(ConfigError, match="not a reward_model run"):
        reward_model.load_reward_model(tiny_sft.dir)
    assert main(["train", "reward_model", "--no-progress"]) == 2
    assert "--init-from RUN_DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_reward_model_ranks_held_out_answers_above_chance(sft_run, tmp_path):
    cfg = reward_model.Config(init_from=str(sft_run.dir))
    run = reward_model.train(cfg, Run.create("reward_model", cfg, tmp_path), progress=False)
    # Measured: 0.55 held-out pair accuracy and 0.61 AUC; judging a sum is as hard as doing it.
    assert reward_model.evaluate(run, n=500)["auc_correct"] > 0.55
