"""GRPO and Dr. GRPO: group advantages, the k3 estimator, the loss by hand for each averaging,
no gradient where clipped, exact resume, the command line; slow: held-out accuracy rises over
the SFT start."""

import json
import math

import pytest
import torch
from crashes import assert_same_checkpoints, crash_at, drop_wall

from mlatlas.cli import main
from mlatlas.core.config import ConfigError
from mlatlas.core.run import Run
from mlatlas.llm import grpo, sft

SFT_TINY = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, batch_size=16,
                difficulty="1", eval_n=10, log_every=2, eval_every=2, ckpt_every=2, steps=2)
TINY = dict(difficulty="1", prompts_per_step=4, group_size=4, max_new_tokens=6, eval_n=10,
            log_every=2, eval_every=4, ckpt_every=4, lr=1e-3)


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    """A barely trained one-layer policy: enough to start GRPO from in a second."""
    cfg = sft.Config(**SFT_TINY)
    return sft.train(cfg, Run.create("sft", cfg, tmp_path_factory.mktemp("sft")), progress=False)


def test_group_advantages_are_centred_and_scaled_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.1],
                            [0.1, 0.1, 0.1, 0.1],   # all equal: no signal
                            [1.1, 1.1, 0.1, 1.1]])
    scaled = grpo.group_advantages(rewards)
    assert torch.allclose(scaled.mean(-1), torch.zeros(3), atol=1e-6)
    assert torch.equal(scaled[1], torch.zeros(4))
    # std(r) / (std(r) + eps): unit up to the eps that guards equal groups
    assert scaled[[0, 2]].std(-1) == pytest.approx([1.0, 1.0], abs=1e-3)
    plain = grpo.group_advantages(rewards, scale=False)
    assert torch.allclose(plain, rewards - rewards.mean(-1, keepdim=True))
    # one right answer in four: (1 - 1/4) / 0.5, 0.5 the unbiased std of [1, 0, 0, 0]
    one_right = grpo.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    assert one_right[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])


def test_k3_is_non_negative_zero_at_agreement_and_estimates_the_kl():
    logp, ref_logp = torch.randn(1000) - 2, torch.randn(1000) - 2
    assert (grpo.k3_kl(logp, ref_logp) >= 0).all()
    assert torch.equal(grpo.k3_kl(logp, logp), torch.zeros(1000))
    # On a categorical: the mean of k3 over samples of p is KL(p || q).
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.1])
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True,
                          generator=torch.Generator().manual_seed(0))
    estimate = grpo.k3_kl(p.log()[x], q.log()[x]).mean().item()
    assert estimate == pytest.approx(exact, rel=0.03)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_loss_at_ratio_one_matches_a_hand_computation(loss_type):
    logp = torch.tensor([[-0.5, -1.0, -3.0], [-0.2, -0.7, -1.5]])
    ref_logp = torch.tensor([[-0.6, -0.9, -9.0], [-0.2, -1.2, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages, beta = torch.tensor([1.0, -0.5]), 0.1
    k3 = [[math.exp(r - p) - (r - p) - 1 for p, r in zip(lp, rp, strict=True)]
          for lp, rp in zip(logp.tolist(), ref_logp.tolist(), strict=True)]
    # At ratio 1 the clip is inactive and J_{i,t} = A_i - beta k3_{i,t}.
    J = [[1.0 - beta * k3[0][0], 1.0 - beta * k3[0][1]],
         [-0.5 - beta * k for k in k3[1]]]
    expected = {"grpo": -(sum(J[0]) / 2 + sum(J[1]) / 3) / 2,
                "token": -(sum(J[0]) + sum(J[1])) / 5,
                "dr_grpo": -(sum(J[0]) + sum(J[1])) / (2 * 4)}[loss_type]
    loss, stats = grpo.grpo_loss(logp, logp, ref_logp, advantages, mask, 0.2, beta, loss_type,
                                 max_tokens=4)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clip_frac"].item() == 0.0
    assert stats["kl"].item() == pytest.approx((sum(k3[0][:2]) + sum(k3[1])) / 2, rel=1e-6)


def test_gradient_is_zero_where_clipped_and_not_at_ratio_one():
    # ratio 1.5 and 0.5 against positive and negative advantages: the clipped branch is the
    # minimum (so the gradient is zero) only where it makes the update more cautious.
    old_logp = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, stats = grpo.grpo_loss(logp, old_logp, None, advantages, torch.ones(4, 1), eps=0.2,
                                 beta=0.0, loss_type="token")
    loss.backward()
    assert logp.grad[0].item() == 0.0 and logp.grad[2].item() == 0.0
    # unclipped tokens: d(-rho A / 4)/d logp = -rho A / 4
    assert logp.grad[1].item() == pytest.approx(1.5 / 4)
    assert logp.grad[3].item() == pytest.approx(-0.5 / 4)
    assert stats["clip_frac"].item() == 0.5
    # mu = 1: rho = 1 everywhere, yet the gradient is the policy gradient -A grad log pi.
    logp = torch.tensor([[-0.3, -1.2]], requires_grad=True)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, torch.tensor([2.0]),
                             torch.ones(1, 2), beta=0.0, loss_type="grpo")
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0]]))


def test_bad_loss_type_is_a_config_error():
    with pytest.raises(ConfigError, match="--loss-type must be one of grpo, token, dr_grpo"):
        grpo.Config(loss_type="bnpo")
    with pytest.raises(ConfigError, match="group-size must be at least 2"):
        grpo.Config(group_size=1)
    with pytest.raises(ConfigError, match="loss_type"):
        grpo.grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.zeros(1),
                       torch.ones(1, 1), loss_type="sum")
    with pytest.raises(ConfigError, match="--init-from"):
        grpo.train(grpo.Config(**TINY, steps=2), progress=False)


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(runs, monkeypatch, tiny_sft):
    cfg = grpo.Config(**TINY, steps=8, num_iterations=2, init_from=str(tiny_sft.dir))
    whole = grpo.train(cfg, Run.create("grpo", cfg, runs), progress=False)
    run = Run.create("grpo", cfg, runs)
    crash_at(monkeypatch, grpo, 6)
    with pytest.raises(KeyboardInterrupt):
        grpo.train(cfg, run, progress=False)
    assert run.checkpoint_step() == 4
    monkeypatch.undo()
    grpo.train(cfg, Run.open(run.dir), progress=False)
    assert_same_checkpoints(*(r.path("checkpoint.safetensors") for r in (whole, run)))
    assert drop_wall(whole.metrics) == drop_wall(Run.open(run.dir).metrics)
    row = whole.metrics[-1]
    for name in ("loss", "reward", "correct", "kl", "clip_frac", "zero_std_frac",
                 "sample_length", "accuracy", "length"):
        assert name in row, name
    assert 0.0 <= row["zero_std_frac"] <= 1.0 and row["kl"] >= 0.0
    summary = whole.summary()
    assert {"baseline/accuracy", "eval/accuracy", "eval/kl"} <= set(summary)
    assert all(k.startswith(("train/", "eval/", "baseline/")) for k in summary)
    assert whole.path("hf/model.safetensors").is_file()


def test_command_line_trains_dr_grpo_and_evaluates(tmp_path, capsys, tiny_sft):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["train", "grpo", "--init-from", str(tiny_sft.dir), "--steps", "2",
                 "--loss-type", "dr_grpo", "--beta", "0", "--out", str(tmp_path), *flags,
                 "--no-progress"]) == 0
    run_dir = next(tmp_path.iterdir())
    assert json.loads((run_dir / "config.json").read_text())["config"]["loss_type"] == "dr_grpo"
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--n", "10", "--no-progress"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"accuracy", "length", "kl"}


# Measured from the default SFT run: 0.45 -> 0.495 for both (200 held-out problems); RL with
# an exact-match reward teaches carrying slowly, so the bar is 6 more problems right.
MARGIN = 0.03


def learns(sft_run, runs, **overrides):
    cfg = grpo.Config(init_from=str(sft_run.dir), **overrides)
    summary = grpo.train(cfg, Run.create("grpo", cfg, runs), progress=False).summary()
    return summary["baseline/accuracy"], summary["eval/accuracy"]


@pytest.mark.slow
def test_grpo_raises_held_out_accuracy_over_sft(sft_run, runs):
    start, final = learns(sft_run, runs)
    assert final > start + MARGIN


@pytest.mark.slow
def test_dr_grpo_raises_held_out_accuracy_over_sft(sft_run, runs):
    start, final = learns(sft_run, runs, loss_type="dr_grpo")
    assert final > start + MARGIN
