"""SFT: the loss by hand, a short run that learns, exact resume, the run's policy files, the
command line; slow: the default run reaches a partial held-out accuracy."""

import json
import math

import pytest
import torch
from crashes import assert_same_checkpoints, crash_at, drop_wall

from mlatlas.cli import main
from mlatlas.core.config import ConfigError
from mlatlas.core.io import load_tensors
from mlatlas.core.run import Run
from mlatlas.llm import dpo, grpo, kimi, reward_model, sft
from mlatlas.llm.common import evaluate, load_policy, warmup_steps
from mlatlas.llm.tasks import write_jsonl

TINY = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, batch_size=16,
            difficulty="1", eval_n=20, log_every=2, eval_every=4, ckpt_every=4, lr=3e-3)


def test_sft_loss_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    targets, mask = torch.tensor([[0, 1, 1]]), torch.tensor([[1, 1, 0]])
    expected = -(math.log(0.5) + math.log(0.1)) / 2  # the masked token does not count
    assert sft.sft_loss(logits, targets, mask).item() == pytest.approx(expected, rel=1e-6)


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(runs, monkeypatch):
    cfg = sft.Config(**TINY, steps=8)
    whole = sft.train(cfg, Run.create("sft", cfg, runs), progress=False)
    run = Run.create("sft", cfg, runs)
    crash_at(monkeypatch, sft, 6)
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg, run, progress=False)
    assert run.checkpoint_step() == 4
    monkeypatch.undo()
    sft.train(cfg, Run.open(run.dir), progress=False)
    assert_same_checkpoints(*(r.path("checkpoint.safetensors") for r in (whole, run)))
    assert drop_wall(whole.metrics) == drop_wall(Run.open(run.dir).metrics)


def test_a_short_run_lowers_the_loss_and_leaves_a_loadable_policy(runs):
    cfg = sft.Config(**TINY, steps=60)
    run = sft.train(cfg, Run.create("sft", cfg, runs), progress=False)
    losses = [r["loss"] for r in run.metrics]
    assert losses[-1] < 0.7 * losses[0]
    for name in ("lm.json", "tokenizer.json", "train.jsonl", "curves.png", "hf/config.json",
                 "hf/model.safetensors", "hf/tokenizer.json"):
        assert run.path(name).is_file(), name
    summary = run.summary()
    assert 0.0 <= summary["eval/accuracy"] <= 1.0 and summary["eval/length"] >= 1.0
    model, tokenizer = load_policy(run.dir)
    hf_model, _ = load_policy(run.path("hf"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(hf_model.state_dict()[name], tensor)
    assert evaluate(run, n=20)["accuracy"] == pytest.approx(summary["eval/accuracy"], abs=0.35)
    # The family contract: flat prefixed summary keys, canonical checkpoint groups, and an
    # evaluation that the seed alone decides, recorded under eval/.
    assert summary["train/steps"] == 60 and summary["train/parameters"] > 0
    assert all(k.startswith(("train/", "eval/")) for k in summary)
    groups = {k.split(".")[0] for k in load_tensors(run.path("checkpoint.safetensors"))}
    assert groups == {"model", "optimizer", "rng_torch"}
    first = evaluate(run, n=12, seed=5)
    assert evaluate(run, n=12, seed=5) == first
    summary = run.summary()
    assert summary["eval/problems"] == 12 and summary["eval/seed"] == 5
    assert summary["eval/accuracy"] == first["accuracy"]


def test_trains_on_a_prompt_completion_file_and_continues_from_a_run(runs, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [{"prompt": "1+1=", "completion": "2"},
                                         {"prompt": "2+2=", "completion": "4"}])
    cfg = sft.Config(**TINY, steps=4, data=str(tmp_path / "data.jsonl"))
    first = sft.train(cfg, Run.create("sft", cfg, runs), progress=False)
    again = sft.Config(**TINY, steps=4, init_from=str(first.dir))
    second = sft.train(again, Run.create("sft", again, runs), progress=False)
    assert "eval/kl" in second.summary()  # a continued run has a reference


def test_warmup_ratios_give_the_warmups_of_before():
    """The default warmup_ratio of each method gives, for every step count, the warm-up it had
    when it was written as an integer division: steps // 10 for GRPO, steps // 20 elsewhere."""
    for steps in range(1, 2001):
        assert warmup_steps(grpo.Config(steps=steps)) == max(1, steps // 10)
        for method in (sft, dpo, kimi, reward_model):
            assert warmup_steps(method.Config(steps=steps)) == max(1, steps // 20), method
    assert warmup_steps(sft.Config(steps=100, warmup_ratio=0.0)) == 1  # the full rate at once
    with pytest.raises(ConfigError, match="--warmup-ratio must be in"):
        grpo.Config(warmup_ratio=1.5)


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        sft.Config(tokenizer="word")
    with pytest.raises(ConfigError, match="multiple of --log-every"):
        sft.Config(eval_every=15, log_every=10)
    with pytest.raises(ConfigError, match="neither a language-model run"):
        sft.Config(init_from=str(tmp_path)).check_data()


def test_command_line_train_and_eval(tmp_path, capsys):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["train", "sft", "--steps", "4", "--out", str(tmp_path), "--tokenizer", "bpe",
                 *flags, "--no-progress"]) == 0
    run_dir = next(tmp_path.iterdir())
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--n", "10", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"accuracy", "format", "length"}
    assert main(["train", "sft", "--task", "adition", "--out", str(tmp_path)]) == 2
    assert "did you mean addition" in capsys.readouterr().err


@pytest.mark.slow
def test_default_sft_reaches_partial_held_out_accuracy(sft_run):
    summary = sft_run.summary()
    # Learnt, yet short of mastery: the room the RL methods are measured on.
    assert 0.25 < summary["eval/accuracy"] < 0.8
    assert summary["eval/format"] > 0.95
