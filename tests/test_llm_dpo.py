"""DPO and IPO: the losses and implicit rewards by hand, exact resume with refreshed pairs,
TRL-format pair files and their errors; slow: DPO raises held-out accuracy above the SFT start."""

import json
import math

import pytest
import torch
from crashes import assert_same_checkpoints, crash_at, drop_wall

from mlatlas.core.config import ConfigError
from mlatlas.core.run import Run
from mlatlas.llm import dpo, sft
from mlatlas.llm.tasks import write_jsonl

TINY_SFT = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, batch_size=16,
                difficulty="1", eval_n=20, log_every=2, eval_every=4, ckpt_every=4, lr=3e-3,
                steps=30)
TINY = dict(difficulty="1", eval_n=20, log_every=2, eval_every=4, ckpt_every=4, batch_size=8,
            pair_prompts=16, samples=4, max_new_tokens=6)


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    cfg = sft.Config(**TINY_SFT)
    return sft.train(cfg, Run.create("sft", cfg, tmp_path_factory.mktemp("sft")), progress=False)


def test_dpo_loss_is_ln2_with_zero_rewards_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -0.5, -7.2]), torch.tensor([-1.0, -4.0, -2.5])
    loss, chosen, rejected = dpo.dpo_loss(*logps, *logps, beta=0.3)
    assert loss.item() == pytest.approx(math.log(2))
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


def test_dpo_and_ipo_losses_and_implicit_rewards_by_hand():
    # One pair with h = (-1 - -2) - (-3 - -2) = 2, one with h = (-2 - -1) - (-2 - -2) = -1.
    policy_chosen, policy_rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -2.0])
    beta = 0.5
    loss, chosen, rejected = dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen,
                                          ref_rejected, beta, "sigmoid")
    expected = (math.log(1 + math.exp(-beta * 2)) + math.log(1 + math.exp(beta * 1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, -0.5])
    assert rejected.tolist() == pytest.approx([-0.5, 0.0])
    ipo, _, _ = dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta,
                             "ipo")
    # Target margin 1 / (2 beta) = 1: squares (2 - 1)^2 and (-1 - 1)^2.
    assert ipo.item() == pytest.approx((1.0 + 4.0) / 2)


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected():
    chosen = torch.tensor([-2.0], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    loss, _, _ = dpo.dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1)
    loss.backward()
    # d/dh -log sigmoid(beta h) at h = 0 is -beta / 2.
    assert chosen.grad.item() == pytest.approx(-0.05)
    assert rejected.grad.item() == pytest.approx(0.05)


def test_stopped_and_resumed_run_with_refreshed_pairs_equals_an_uninterrupted_one(
        runs, tiny_sft, monkeypatch):
    cfg = dpo.Config(**TINY, steps=8, refresh_every=3, init_from=str(tiny_sft.dir))
    whole = dpo.train(cfg, Run.create("dpo", cfg, runs), progress=False)
    run = Run.create("dpo", cfg, runs)
    crash_at(monkeypatch, dpo, 6)
    with pytest.raises(KeyboardInterrupt):
        dpo.train(cfg, run, progress=False)
    assert run.checkpoint_step() == 4
    monkeypatch.undo()
    # Step 5 resumes with the pairs that step 4 built, read back from their file.
    dpo.train(cfg, Run.open(run.dir), progress=False)
    assert_same_checkpoints(*(r.path("checkpoint.safetensors") for r in (whole, run)))
    assert drop_wall(whole.metrics) == drop_wall(Run.open(run.dir).metrics)
    for name in ("pairs.jsonl", "pairs_step4.jsonl", "pairs_step7.jsonl"):
        assert whole.path(name).read_text() == run.path(name).read_text()
    rows = [json.loads(line) for line in whole.path("pairs.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "chosen", "rejected"}  # TRL's preference format
    assert all(r["chosen"] != r["rejected"] for r in rows)
    first = whole.metrics[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=0.05)  # pi = pi_ref at the start
    assert 0.0 <= whole.summary()["eval/accuracy"] <= 1.0


def test_trains_on_a_pairs_file_with_ipo_and_rpo(runs, tiny_sft, tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                                          {"prompt": "2+5=", "chosen": "7", "rejected": "1"}])
    cfg = dpo.Config(**TINY, steps=4, loss_type="ipo", rpo_alpha=1.0,
                     pairs=str(tmp_path / "pairs.jsonl"), init_from=str(tiny_sft.dir))
    cfg.check_data()
    run = dpo.train(cfg, Run.create("dpo", cfg, runs), progress=False)
    assert {"loss", "preference_loss", "nll", "reward_margin", "pair_accuracy"} <= set(
        run.metrics[0])
    assert run.metrics[0]["pairs"] == 2


def test_bad_loss_type_and_malformed_pairs_are_one_line_errors(tmp_path, tiny_sft):
    with pytest.raises(ConfigError, match="--loss-type must be one of sigmoid, ipo"):
        dpo.Config(loss_type="hinge")
    with pytest.raises(ConfigError, match="loss_type"):
        dpo.dpo_loss(*[torch.zeros(1)] * 4, beta=0.1, loss_type="hinge")
    with pytest.raises(ConfigError, match="--beta"):
        dpo.Config(beta=0.0)
    with pytest.raises(ConfigError, match="cannot be used with a --pairs file"):
        dpo.Config(pairs="x.jsonl", refresh_every=10)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1: needs string field 'rejected'"):
        dpo.Config(pairs=str(bad), init_from=str(tiny_sft.dir)).check_data()
    bad.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": 3}\nnot json\n')
    with pytest.raises(ConfigError, match="needs string field 'rejected'"):
        dpo.Config(pairs=str(bad)).check_data()
    with pytest.raises(ConfigError, match="no such file"):
        dpo.Config(pairs=str(tmp_path / "missing.jsonl")).check_data()


@pytest.mark.slow
def test_dpo_raises_held_out_accuracy_above_the_sft_start(sft_run, runs):
    # The policy's own correct vs wrong samples on 2048 training prompts; the likelihood term
    # on the chosen answers (RPO) keeps DPO from lowering their probability with the rejected.
    cfg = dpo.Config(init_from=str(sft_run.dir), steps=200, beta=0.5, rpo_alpha=1.0,
                     pair_prompts=2048)
    summary = dpo.train(cfg, Run.create("dpo", cfg, runs), progress=False).summary()
    assert summary["eval/accuracy"] >= summary["baseline/accuracy"] + 0.05
    assert summary["eval/format"] > 0.95
