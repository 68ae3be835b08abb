"""CPC: the loss by hand, the InfoNCE bound, shapes, causality, errors, an exact resume, and (slow)
a linear probe of the learned features beating the same architecture at random init."""

import math

import pytest
import torch
from crashes import assert_same_checkpoints, crash_at, drop_wall

from mlatlas.cli import main
from mlatlas.contrastive import cpc
from mlatlas.contrastive.losses import info_nce
from mlatlas.core.config import ConfigError
from mlatlas.core.run import Run
from mlatlas.data import DatasetError
from mlatlas.data.signals import CLASSES, generate_signals

TINY = dict(dataset="digits", prediction_steps=2, hidden=8, z_dim=8, c_dim=8, batch_size=16,
            log_every=2, ckpt_every=4, warmup_steps=2)


def model_for(dataset: str, k: int = 3) -> cpc.CPC:
    kernels, strides = cpc.ENCODERS[dataset]
    channels = {"signals": 1, "mnist": 28, "digits": 8}[dataset]
    return cpc.CPC(channels, kernels, strides, hidden=8, z_dim=6, c_dim=5, prediction_steps=k)


# --- theory ------------------------------------------------------------------------------------

def test_loss_by_hand_on_two_sequences_of_two_steps():
    # B = 2, T = 2, K = 1, scalars: scores s_ij = z_{j,1} W c_{i,0}, W = 2.
    c = torch.tensor([[[1.0], [9.0]], [[-1.0], [9.0]]])
    z = torch.tensor([[[9.0], [0.5]], [[9.0], [-1.5]]])
    w = torch.tensor([[[2.0]]])
    # Row 0: scores (1.0, -3.0), positive 0; row 1: scores (-1.0, 3.0), positive 1.
    expected = (-math.log(math.exp(1) / (math.exp(1) + math.exp(-3)))
                - math.log(math.exp(3) / (math.exp(-1) + math.exp(3)))) / 2
    loss, losses_k, accuracy = cpc.cpc_loss(c, z, w)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert losses_k.tolist() == pytest.approx([expected], rel=1e-5)
    assert accuracy.tolist() == [1.0]


def test_each_step_is_info_nce_over_the_batch_at_each_time():
    gen = torch.Generator().manual_seed(1)
    b, t_len, k_max = 5, 6, 3
    c, z = torch.randn(b, t_len, 4, generator=gen), torch.randn(b, t_len, 3, generator=gen)
    w = torch.randn(k_max, 3, 4, generator=gen)
    loss, losses_k, accuracy = cpc.cpc_loss(c, z, w)
    for k in range(1, k_max + 1):
        per_t = [info_nce(c[:, t] @ w[k - 1].T, z[:, t + k], temperature=1.0, normalize=False)
                 for t in range(t_len - k)]
        assert losses_k[k - 1].item() == pytest.approx(torch.stack(per_t).mean().item(),
                                                       rel=1e-5)
    assert loss.item() == pytest.approx(losses_k.mean().item())
    assert ((accuracy >= 0) & (accuracy <= 1)).all()


def test_the_mutual_information_bound_never_exceeds_log_n_and_nears_it_when_separable():
    gen = torch.Generator().manual_seed(0)
    n = 8
    for _ in range(20):
        c, z = torch.randn(n, 5, 4, generator=gen), torch.randn(n, 5, 4, generator=gen)
        _, losses_k, _ = cpc.cpc_loss(c, z, torch.randn(2, 4, 4, generator=gen))
        assert (cpc.mi_lower_bound(losses_k, n) <= math.log(n)).all()
    # Latents constant in time and orthogonal across sequences, W = 6 I: each positive scores
    # 6 and each negative 0, so L = log(1 + (N - 1) e^-6), just under log N.
    z = torch.eye(n)[:, None].expand(n, 5, n)
    _, losses_k, accuracy = cpc.cpc_loss(z, z, 6 * torch.eye(n).expand(2, n, n))
    bound = cpc.mi_lower_bound(losses_k, n)
    expected = math.log(n) - math.log(1 + (n - 1) * math.exp(-6))
    assert (bound < math.log(n)).all()
    assert bound.tolist() == pytest.approx([expected] * 2, rel=1e-5)
    assert accuracy.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("dataset, length, steps", [("signals", 256, 16), ("mnist", 28, 28),
                                                    ("digits", 8, 8)])
def test_shapes(dataset, length, steps):
    model = model_for(dataset)
    x = torch.randn(4, model.in_channels, length)
    z = model.encode(x)
    assert z.shape == (4, steps, 6)
    assert model.context(z).shape == (4, steps, 5)
    loss, losses_k, accuracy = model(x)
    assert loss.shape == () and losses_k.shape == accuracy.shape == (3,)
    features = model.features(x, batch_size=3)
    assert features["c"].shape == (4, 5) and features["z"].shape == (4, 6)


@pytest.mark.parametrize("dataset, length", [("signals", 256), ("mnist", 28)])
def test_context_at_t_does_not_depend_on_later_steps(dataset, length):
    model = model_for(dataset)
    per_step = model.samples_per_step
    x = torch.randn(3, model.in_channels, length)
    c = model.context(model.encode(x))
    for t in (0, 5, length // per_step - 2):
        changed = x.clone()
        changed[..., (t + 1) * per_step:] = torch.randn_like(changed[..., (t + 1) * per_step:])
        c2 = model.context(model.encode(changed))
        assert torch.equal(c[:, :t + 1], c2[:, :t + 1])
        # ... while the next context does see the change: the check can fail.
        assert not torch.allclose(c[:, t + 1], c2[:, t + 1])


def test_bad_input_is_a_clear_error():
    c, z, w = torch.randn(4, 5, 3), torch.randn(4, 5, 2), torch.randn(2, 2, 3)
    with pytest.raises(ValueError, match=r"same B and T"):
        cpc.cpc_loss(c, z[:, :4], w)
    with pytest.raises(ValueError, match=r"\(K, 2, 3\)"):
        cpc.cpc_loss(c, z, w.transpose(1, 2))
    with pytest.raises(ValueError, match="at least 2 sequences"):
        cpc.cpc_loss(c[:1], z[:1], w)
    with pytest.raises(ValueError, match="longer than K"):
        cpc.cpc_loss(c, z, torch.randn(5, 2, 3))
    model = model_for("signals")
    with pytest.raises(ValueError, match=r"\(B, 1, L\)"):
        model.encode(torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match="multiple of the encoder's 16"):
        model.encode(torch.randn(2, 1, 100))
    with pytest.raises(ValueError, match="shorter than stride"):
        cpc.CausalConv1d(1, 1, 2, 4)
    with pytest.raises(ValueError, match="n >= 1"):
        generate_signals(0)


@pytest.mark.parametrize("kwargs, match", [
    ({"prediction_steps": 0}, "--prediction-steps must be at least 1"),
    ({"batch_size": 1}, "--batch-size must be at least 2"),
    ({"lr": 0.0}, "--lr"),
    ({"grad_clip": -1.0}, "--grad-clip"),
])
def test_bad_config_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cpc.Config(**kwargs)


def test_dataset_names_are_checked_and_the_command_line_accepts_signals(runs, capsys):
    with pytest.raises(DatasetError, match="did you mean signals"):
        cpc.Config(dataset="signal")
    argv = ["train", "cpc", "--dataset", "signals", "--steps", "2", "--n-train", "32",
            "--n-test", "32", "--batch-size", "16", "--hidden", "8", "--z-dim", "8",
            "--c-dim", "8", "--out", str(runs), "--no-progress"]
    assert main(argv) == 0
    assert main([*argv[:3], "mnistt"]) == 2
    assert "unknown CPC dataset 'mnistt'" in capsys.readouterr().err


def test_more_prediction_steps_than_a_sequence_has_is_a_config_error(runs):
    cfg = cpc.Config(**{**TINY, "prediction_steps": 8}, steps=2)
    with pytest.raises(ConfigError, match="below the 8 steps"):
        cpc.train(cfg, Run.create("cpc", cfg, runs), progress=False)


def test_signals_are_deterministic_balanced_and_labelled():
    a, b = generate_signals(48, length=64, seed=3), generate_signals(48, length=64, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.x.shape == (48, 1, 64) and a.x.dtype == torch.float32
    assert torch.bincount(a.y, minlength=len(CLASSES)).tolist() == [4] * len(CLASSES)
    assert not torch.equal(a.x, generate_signals(48, length=64, seed=4).x)
    # Without noise and distractor a square wave takes exactly two values, +-amplitude.
    clean = generate_signals(24, length=64, seed=0, noise=0.0, distractor=0.0)
    square = clean.x[CLASSES.index("square-short") == clean.y][0, 0]
    assert len(torch.unique(square.abs())) == 1 and len(torch.unique(square)) == 2


# --- resume ------------------------------------------------------------------------------------

def test_stopped_and_resumed_run_equals_an_uninterrupted_one(runs, monkeypatch):
    cfg = cpc.Config(**TINY, steps=8)
    whole = cpc.train(cfg, Run.create("cpc", cfg, runs), progress=False)
    run = Run.create("cpc", cfg, runs)
    crash_at(monkeypatch, cpc, 6)
    with pytest.raises(KeyboardInterrupt):
        cpc.train(cfg, run, progress=False)
    assert run.checkpoint_step() == 4
    monkeypatch.undo()
    cpc.train(cfg, Run.open(run.dir), progress=False)
    assert_same_checkpoints(*(r.path("checkpoint.safetensors") for r in (whole, run)))
    assert drop_wall(whole.metrics) == drop_wall(Run.open(run.dir).metrics)
    assert set(cpc.metric_names(2)) <= set(whole.metrics[-1])
    summary = whole.summary()
    for prefix in ("eval/", "baseline/"):
        for name in ("linear_probe_accuracy", "linear_probe_accuracy_z", "accuracy_k1"):
            assert 0.0 <= summary[prefix + name] <= 1.0
        assert summary[f"{prefix}mi_bound_k2"] <= summary["eval/log_n"] == math.log(16)
    assert summary["train/steps"] == 8 and summary["train/dataset"] == "digits"
    for figure in ("loss.png", "prediction.png"):
        assert whole.path(figure).is_file()
    again = cpc.evaluate(Run.open(whole.dir))
    assert again["linear_probe_accuracy"] == pytest.approx(summary["eval/linear_probe_accuracy"])
    assert again["mi_bound_k1"] == pytest.approx(summary["eval/mi_bound_k1"])
    # n held-out sequences drawn by the seed: the same seed, the same scores; N = min(B, n).
    some = cpc.evaluate(Run.open(whole.dir), n=12, seed=5)
    assert cpc.evaluate(Run.open(whole.dir), n=12, seed=5) == some
    summary = Run.open(whole.dir).summary()
    assert (summary["eval/examples"], summary["eval/seed"]) == (12, 5)
    assert summary["eval/log_n"] == math.log(12)


# --- behaviour ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_linear_probe_of_cpc_features_beats_the_random_encoder(runs):
    """The default config: mnist rows, 600 steps at batch 64 (about 30 s of training). Measured
    (seed 0): probe on mean_t c_t 0.928 against 0.686 at random init; first logged loss 4.154,
    last 2.858; test bound log N - L_1 2.08 nats against 0.00 (log N = 4.16)."""
    cfg = cpc.Config()
    run = cpc.train(cfg, Run.create("cpc", cfg, runs), progress=False)
    s = run.summary()
    numbers = (f"probe {s['eval/linear_probe_accuracy']:.3f} vs random "
               f"{s['baseline/linear_probe_accuracy']:.3f}; loss {run.metrics[0]['loss']:.3f} -> "
               f"{run.metrics[-1]['loss']:.3f}")
    assert s["eval/linear_probe_accuracy"] > s["baseline/linear_probe_accuracy"] + 0.1, numbers
    assert run.metrics[-1]["loss"] < run.metrics[0]["loss"] - 0.3, numbers
    # The bound at k = 1 rises well above the random model's (about 0).
    assert s["eval/mi_bound_k1"] > s["baseline/mi_bound_k1"] + 0.5, numbers
