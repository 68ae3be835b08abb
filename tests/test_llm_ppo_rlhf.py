"""PPO-RLHF: token rewards, the policy and value clips by hand, the running normaliser against
numpy, token-level GAE, exact resume, clear errors; slow: from an SFT policy and a reward model
trained on its answers, PPO raises held-out greedy accuracy."""

import numpy as np
import pytest
import torch
from crashes import assert_same_checkpoints, drop_wall

from mlatlas.cli import main
from mlatlas.core.config import ConfigError
from mlatlas.core.io import load_tensors
from mlatlas.core.run import Run
from mlatlas.core.stats import RunningMeanStd
from mlatlas.llm import ppo_rlhf, reward_model, sft
from mlatlas.rl.returns import discounted_returns

TINY_SFT = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, batch_size=16,
                difficulty="1", eval_n=16, log_every=2, eval_every=4, ckpt_every=4, lr=3e-3)


def test_token_rewards_put_the_kl_on_every_token_and_the_score_on_the_last():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    rewards = ppo_rlhf.token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, beta=0.1)
    expected = torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-0.1 - 1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_token_gae_with_lambda_one_is_the_return_minus_the_value():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.2, 0.4, 9.0], [0.1, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    advantages = ppo_rlhf.token_advantages(rewards, values, mask, gamma=0.9, lam=1.0)
    returns = discounted_returns(rewards[0, :3], 0.9)
    assert torch.allclose(advantages[0, :3], returns - values[0, :3])
    assert advantages[1, 0].item() == pytest.approx(0.5 - 0.1)
    assert (advantages[mask == 0] == 0).all()


def test_policy_clip_and_value_clip_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, clipped = ppo_rlhf.ppo_policy_loss(logp, old, advantages, torch.ones(1, 3), 0.2)
    # min(rho A, clip(rho) A): 1.2 (clipped), 1.1, min(-0.5, -0.8) = -0.8.
    assert loss.item() == pytest.approx(-(1.2 + 1.1 - 0.8) / 3)
    assert clipped.item() == pytest.approx(2 / 3)
    values, old_values, returns = (torch.tensor([[v]]) for v in (1.0, 0.0, 0.5))
    # max((1 - 0.5)^2, (0 + 0.2 - 0.5)^2) / 2
    assert ppo_rlhf.clipped_value_loss(values, old_values, returns, torch.ones(1, 1),
                                       0.2).item() == pytest.approx(0.125)
    assert ppo_rlhf.clipped_value_loss(torch.tensor([[0.0]]), old_values, returns,
                                       torch.ones(1, 1), 0.2).item() == pytest.approx(0.125)


def test_running_mean_std_matches_numpy_over_a_stream():
    stats = RunningMeanStd(count=0.0)
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=n) for n in (5, 17, 1, 40)]
    for chunk in chunks:
        stats.update(torch.tensor(chunk, dtype=torch.float64))
    everything = np.concatenate(chunks)
    assert stats.mean.item() == pytest.approx(everything.mean())
    assert stats.var.item() == pytest.approx(everything.var())
    huge = torch.tensor([1e6], dtype=torch.float64)
    assert ppo_rlhf.normalise_scores(huge, stats, 5.0).item() == 5.0


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    cfg = sft.Config(**TINY_SFT, steps=40)
    return sft.train(cfg, Run.create("sft", cfg, tmp_path_factory.mktemp("sft")),
                     progress=False)


@pytest.fixture(scope="module")
def tiny_rm(tiny_sft, tmp_path_factory):
    cfg = reward_model.Config(init_from=str(tiny_sft.dir), difficulty="1", steps=4,
                              pair_prompts=24, eval_n=16, batch_size=8, log_every=2,
                              eval_every=2, ckpt_every=4)
    return reward_model.train(cfg, Run.create("reward_model", cfg,
                                              tmp_path_factory.mktemp("rm")), progress=False)


def test_ppo_run_resumes_exactly(tiny_sft, tiny_rm, runs):
    rm = tiny_rm
    cfg = ppo_rlhf.Config(init_from=str(tiny_sft.dir), reward_model=str(rm.dir), difficulty="1",
                          steps=4, prompts_per_step=8, minibatch_size=4, critic_warmup=1,
                          ptx_coef=0.1, eval_n=8, log_every=1, eval_every=2, ckpt_every=2,
                          max_new_tokens=4)
    whole = ppo_rlhf.train(cfg, Run.create("ppo_rlhf", cfg, runs), progress=False)
    stopped = Run.create("ppo_rlhf", cfg, runs)
    ppo_rlhf.train(ppo_rlhf.Config(**{**vars(cfg), "steps": 2}), stopped, progress=False)
    ppo_rlhf.train(cfg, Run.open(stopped.dir), progress=False)
    assert_same_checkpoints(*(r.path("checkpoint.safetensors") for r in (whole, stopped)))
    assert drop_wall(whole.metrics) == drop_wall(Run.open(stopped.dir).metrics)
    rows = whole.metrics
    assert rows[0]["policy_loss"] == 0.0  # the critic's warm-up step leaves the policy alone
    assert {"reward", "kl", "value_loss", "clip_fraction", "accuracy"} <= set(rows[1])
    assert "eval/kl" in whole.summary()
    groups = {k.split(".")[0] for k in load_tensors(whole.path("checkpoint.safetensors"))}
    assert groups == {"model", "optimizer", "critic", "critic_optimizer", "score_stats",
                      "rng_torch"}


def test_bad_configs_are_clear(tiny_sft, capsys):
    with pytest.raises(ConfigError, match="--reward-model RUN_DIR"):
        ppo_rlhf.Config(init_from=str(tiny_sft.dir)).check_data()
    with pytest.raises(ConfigError, match="--reward must be"):
        ppo_rlhf.Config(reward="human")
    with pytest.raises(ConfigError, match="not a reward_model run"):
        ppo_rlhf.Config(init_from=str(tiny_sft.dir), reward_model=str(tiny_sft.dir)).check_data()
    assert main(["train", "ppo_rlhf", "--init-from", str(tiny_sft.dir), "--no-progress"]) == 2
    assert "needs --reward-model RUN_DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_ppo_with_the_verifier_reward_raises_held_out_accuracy(sft_run, tmp_path):
    """PPO-max's machinery on the exact-match reward. (With the tiny reward model, whose held-out
    pair accuracy is near 0.55, PPO learns to exploit its errors: docs/methods/llm.md.)"""
    cfg = ppo_rlhf.Config(init_from=str(sft_run.dir), reward="verifier")
    summary = ppo_rlhf.train(cfg, Run.create("ppo_rlhf", cfg, tmp_path),
                             progress=False).summary()
    assert summary["eval/sampled_accuracy"] > summary["baseline/sampled_accuracy"] + 0.03
    assert summary["eval/accuracy"] > summary["baseline/accuracy"] - 0.02


def test_accuracy_warning_names_reward_hacking_only_beyond_the_noise():
    from mlatlas.llm.common import accuracy_warning

    # 500 problems at p = 0.45: two standard errors of the difference are 0.063.
    assert accuracy_warning(0.45, 0.40, 500, [0.1, 0.9]) is None
    assert accuracy_warning(None, 0.0, 500) is None
    hacked = accuracy_warning(0.45, 0.08, 500, [0.1, 0.9])
    assert "0.450 to 0.080" in hacked and "reward hacking" in hacked
    assert "reward hacking" not in accuracy_warning(0.45, 0.08, 500, [0.9, 0.1])
    # With a reference: named only once KL has passed the bound, with the numbers.
    drifted = accuracy_warning(0.45, 0.08, 500, [0.1, 0.9], kl=2.5, kl_bound=1.0)
    assert "reward hacking" in drifted and "grew to 2.5 nats per completion, past 1" in drifted
    close = accuracy_warning(0.45, 0.08, 500, [0.1, 0.9], kl=0.2, kl_bound=1.0)
    assert "reward hacking" not in close and "0.2 nats per completion (within 1)" in close


def test_reward_hacking_warning_goes_to_summary_json(tmp_path, monkeypatch, capsys):
    from mlatlas.llm import common

    run = Run.create("ppo_rlhf", ppo_rlhf.Config(steps=1), root=tmp_path)
    run.write_summary({"baseline/accuracy": 0.6})
    for step, reward in ((1, 0.1), (2, 0.9)):
        run.log({"step": step, "reward": reward})
    monkeypatch.setattr(common, "evaluate_policy",
                        lambda *a, **k: {"accuracy": 0.1, "kl": 3.0})
    monkeypatch.setattr(common, "export_hf", lambda *a: None)
    setup = common.Setup(None, None, None, None, [], [None] * 200, "cpu")
    monkeypatch.setattr(run, "save_figure", lambda *a: None)
    common.finish(run, ppo_rlhf.Config(steps=1), setup)
    summary = run.summary()
    assert summary["eval/reward_hacking"] is True
    assert "0.600 to 0.100" in summary["eval/warning"] and "3 nats" in summary["eval/warning"]
    assert "reward hacking" in capsys.readouterr().err
