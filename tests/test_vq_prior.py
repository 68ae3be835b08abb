"""The Transformer prior over VQ codes (mlatlas.generative.vq.prior): the causal mask, the
conditioning token, greedy decoding, the loss by hand, the uniform model's NLL, bad options;
the slow tests train both stages on digits and check that the prior learns."""

import math

import pytest
import torch

from mlatlas.core.config import ConfigError
from mlatlas.core.run import Run
from mlatlas.generative.vq import prior
from mlatlas.generative.vq.prior import (
    CodePrior,
    SampleOptions,
    code_loss,
    code_nll,
    draw_codes,
    guided_logits,
)

K, L, CLASSES = 7, 5, 3


def tiny(seed: int = 0, classes: int = CLASSES) -> CodePrior:
    torch.manual_seed(seed)
    return CodePrior(K, L, classes, width=16, depth=2, heads=2).eval()


def codes(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(K, (n, L), generator=torch.Generator().manual_seed(seed))


def test_causal_mask_by_gradients():
    """d logits_t / d h_s is zero for s > t and not for s <= t."""
    model = tiny()
    s, c = codes(2), torch.tensor([0, CLASSES])
    h = model.embed(s[:, :-1], c).detach().requires_grad_(True)
    logits = model.logits(h)
    for t in range(L):
        (grad,) = torch.autograd.grad(logits[:, t].square().sum(), h, retain_graph=True)
        per_position = grad.abs().sum(dim=(0, 2))
        assert torch.all(per_position[t + 1:] == 0), (t, per_position)
        assert torch.all(per_position[: t + 1] > 0), (t, per_position)


def test_conditioning_token_changes_every_position():
    model = tiny()
    s = codes(1).expand(CLASSES + 1, L)
    logits = model(s[:, :-1], torch.arange(CLASSES + 1))
    for a in range(CLASSES + 1):
        for b in range(a + 1, CLASSES + 1):
            assert (logits[a] - logits[b]).abs().amax(-1).min() > 1e-4, (a, b)


def test_loss_is_the_cross_entropy_of_each_prefix_by_hand():
    """L = -1/(B L) sum log softmax(logits of the prefix s_<i)[s_i], each prefix fed alone."""
    model = tiny()
    s, c = codes(4), torch.tensor([0, 1, 2, CLASSES])
    by_hand = 0.0
    for b in range(len(s)):
        for i in range(L):
            z = model(s[b:b + 1, :i], c[b:b + 1])[0, -1].detach().double()
            by_hand -= float(z[s[b, i]] - torch.logsumexp(z, 0))
    by_hand /= len(s) * L
    assert float(code_loss(model, s, c).detach()) == pytest.approx(by_hand, rel=1e-5)


def test_embedding_dropout_keeps_the_mean():
    """keep = m / (1 - p), m ~ Bernoulli(1 - p): a share p of zeros, mean 1, seeded."""
    keep = prior.dropout_keep((40, L, 50), 0.3, torch.Generator().manual_seed(0), "cpu")
    assert float((keep == 0).double().mean()) == pytest.approx(0.3, abs=0.01)
    assert float(keep.double().mean()) == pytest.approx(1.0, abs=0.02)
    assert torch.allclose(keep[keep > 0], torch.tensor(1 / 0.7))
    assert torch.equal(keep, prior.dropout_keep((40, L, 50), 0.3,
                                                torch.Generator().manual_seed(0), "cpu"))


def test_uniform_model_scores_log_k():
    model = tiny()
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    s = codes(600)  # more than one evaluation batch
    nll = code_nll(model, s, torch.full((600,), CLASSES))
    assert nll == pytest.approx(math.log(K), rel=1e-6)


def test_temperature_zero_and_top_k_one_are_greedy():
    model = tiny()
    c = torch.arange(CLASSES + 1).repeat(3)
    greedy = draw_codes(model, c, torch.Generator().manual_seed(0), temperature=0.0)
    top1 = draw_codes(model, c, torch.Generator().manual_seed(1), top_k=1)
    assert torch.equal(greedy, top1)
    with torch.no_grad():
        argmax = model(greedy[:, :-1], c).argmax(-1)
    assert torch.equal(argmax, greedy)  # each code is the most likely after its prefix
    sampled = draw_codes(model, c, torch.Generator().manual_seed(0), temperature=2.0)
    assert not torch.equal(sampled, greedy)


def test_guided_logits_by_hand_and_greedy_guided_draws():
    l_c, l_null = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.equal(guided_logits(l_c, l_null, 0.0), l_c)
    assert torch.equal(guided_logits(l_c, l_null, 2.0), torch.tensor([[4.0, -2.0, -3.0]]))
    model = tiny()
    c = torch.arange(CLASSES).repeat(2)
    assert torch.equal(draw_codes(model, c, torch.Generator().manual_seed(0), guidance=0.0),
                       draw_codes(model, c, torch.Generator().manual_seed(0)))
    w = 1.5
    greedy = draw_codes(model, c, torch.Generator().manual_seed(0), temperature=0.0,
                        guidance=w)
    with torch.no_grad():  # each code is the argmax of the guided logits after its prefix
        prefix = greedy[:, :-1]
        expected = guided_logits(model(prefix, c), model(prefix, torch.full_like(c, CLASSES)),
                                 w).argmax(-1)
    assert torch.equal(expected, greedy)


def test_draws_are_seeded_and_batched():
    model = tiny()
    c = torch.full((6,), CLASSES)
    a = draw_codes(model, c, torch.Generator().manual_seed(3))
    b = draw_codes(model, c, torch.Generator().manual_seed(3))
    assert a.shape == (6, L) and a.dtype == torch.long and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < K


def test_too_long_a_prefix_is_refused():
    with pytest.raises(ValueError, match="at most 4"):
        tiny()(codes(1), torch.tensor([0]))


@pytest.mark.parametrize("top_p", [0.0, 1.5, -0.1])
def test_top_p_out_of_range(top_p):
    with pytest.raises(ConfigError, match="--top-p"):
        SampleOptions(top_p=top_p)


def test_other_bad_options():
    with pytest.raises(ConfigError, match="--temperature"):
        SampleOptions(temperature=-1.0)
    with pytest.raises(ConfigError, match="--top-k"):
        SampleOptions(top_k=-1)
    with pytest.raises(ConfigError, match="--label"):
        SampleOptions(label=-2)
    with pytest.raises(ConfigError, match="--guidance"):
        SampleOptions(guidance=-1.0)
    with pytest.raises(ConfigError, match="--label must be below 10"):
        prior.sample_labels(4, SampleOptions(label=10), True, 10)
    with pytest.raises(ConfigError, match="--conditional"):
        prior.sample_labels(4, SampleOptions(label=1), False, 0)
    assert prior.sample_labels(4, SampleOptions(), True, 3).tolist() == [0, 1, 2, 0]


def test_bad_config_values():
    with pytest.raises(ConfigError, match="--heads"):
        prior.Config(width=30, heads=4)
    with pytest.raises(ConfigError, match="--label-dropout"):
        prior.Config(label_dropout=1.5)
    with pytest.raises(ConfigError, match=r"--dropout must be in \[0, 1\)"):
        prior.Config(dropout=1.0)
    with pytest.raises(ConfigError, match="--vq-method"):
        prior.Config(vq_method="vae")
    with pytest.raises(ConfigError, match="holds points"):
        prior.Config(dataset="8gaussians").check_data()


def test_conditional_needs_labels(tmp_path):
    import numpy as np

    np.save(tmp_path / "images.npy", np.zeros((20, 8, 8), dtype=np.float32))
    with pytest.raises(ConfigError, match="--conditional needs class labels"):
        prior.Config(dataset=str(tmp_path / "images.npy"), conditional=True).check_data()


def test_vq_run_that_is_missing_or_not_a_vq_run(tmp_path):
    with pytest.raises(ConfigError, match="--vq-run: .*not a run folder"):
        prior.Config(vq_run=str(tmp_path / "nowhere")).check_data()
    other = Run.create("ddpm", prior.Config(), root=tmp_path)  # any run of another method
    with pytest.raises(ConfigError, match="--vq-run: .* is a ddpm run"):
        prior.Config(vq_run=str(other.dir)).check_data()


# --- both stages, end to end ---------------------------------------------------------------------

TINY = dict(vq_steps=2, steps=4, width=16, depth=1, heads=2, batch_size=32, log_every=2,
            ckpt_every=2, eval_samples=0)


def prior_weights(run: Run) -> dict[str, torch.Tensor]:
    from mlatlas.core.io import load_tensors

    return {k: v for k, v in load_tensors(run.path("checkpoint.safetensors")).items()
            if k.startswith("model.")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny conditional run, both stages trained in one go."""
    cfg = prior.Config(**TINY, conditional=True)
    return prior.train(cfg, Run.create(cfg.METHOD, cfg, root=tmp_path_factory.mktemp("runs")),
                       progress=False)


def test_a_resumed_run_resumes_whichever_stage_was_interrupted(finished, tmp_path):
    """First stage stopped after 1 of 2 steps, prior after 2 of 4: resumed, both end bitwise
    equal to the run trained in one go."""
    cfg = prior.Config(**TINY, conditional=True)
    run = Run.create(cfg.METHOD, cfg, root=tmp_path)
    stage_cfg = prior.first_stage_config(prior.Config(**{**TINY, "vq_steps": 1}))
    stage = Run.create(stage_cfg.METHOD, stage_cfg, root=tmp_path / "stage")
    vqvae = pytest.importorskip("mlatlas.generative.vq.vqvae")
    vqvae.train(stage_cfg, stage, progress=False)
    # The nested folder as an interrupted run leaves it: its config asks for 2 steps.
    stage.dir.rename(run.path(prior.FIRST_STAGE_DIR))
    nested = Run.open(run.path(prior.FIRST_STAGE_DIR))
    nested.config["steps"] = 2
    nested.write_config()
    prior.train(prior.Config(**{**TINY, "steps": 2}, conditional=True), run, progress=False)
    prior.train(cfg, Run.open(run.dir), progress=False)
    for name in ("", prior.FIRST_STAGE_DIR):
        a, b = Run.open(finished.path(name)), Run.open(run.path(name))
        assert a.checkpoint_step() == b.checkpoint_step() == (4 if not name else 2)
        wa, wb = prior_weights(a), prior_weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_evaluate_and_sample_a_finished_run(finished):
    metrics = prior.evaluate(finished, n=8, options=SampleOptions(label=3))
    K = metrics["codebook_size"]
    assert metrics["random_codes_test_nll_per_code"] == pytest.approx(math.log(K))
    assert metrics["test_bits_per_code"] == pytest.approx(metrics["test_nll_per_code"]
                                                          / math.log(2))
    for key in ("frechet_distance", "reconstruction_frechet_distance",
                "random_codes_frechet_distance", "label_accuracy"):
        assert math.isfinite(metrics[key]), key
    summary = finished.summary()
    assert summary["eval/n_samples"] == 8 and "baseline/frechet_distance" in summary
    assert finished.path("samples.png").is_file()
    x = prior.sample(finished, n=5, seed=2)
    assert x.shape == (5, 1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x, prior.sample(finished, n=5, seed=2))
    with pytest.raises(ConfigError, match="--label must be below 10"):
        prior.sample(finished, n=2, options=SampleOptions(label=10))
    with pytest.raises(ConfigError, match="--n must be 0 or at least"):
        prior.evaluate(finished, n=2)


def test_a_finished_vq_run_is_reused_and_checked(finished, tmp_path):
    stage = str(finished.path(prior.FIRST_STAGE_DIR))
    cfg = prior.Config(**TINY, vq_run=stage)
    cfg.check_data()
    run = prior.train(cfg, Run.create(cfg.METHOD, cfg, root=tmp_path), progress=False)
    assert not run.path(prior.FIRST_STAGE_DIR).exists() and run.checkpoint_step() == 4
    with pytest.raises(ConfigError, match="--vq-run: .*trained on 'digits', this run on 'dig"):
        prior.Config(**TINY, vq_run=stage, dataset="digits-binary").check_data()
    with pytest.raises(ConfigError, match="--vq-run: .* is a vq_transformer run"):
        prior.Config(**TINY, vq_run=str(finished.dir)).check_data()


# --- learning (slow) -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_vqvae(tmp_path_factory):
    """The first stage a default prior run trains on digits (vqvae, --vq-steps 1000)."""
    vqvae = pytest.importorskip("mlatlas.generative.vq.vqvae")
    torch.set_num_threads(1)
    cfg = prior.first_stage_config(prior.Config())
    return vqvae.train(cfg, Run.create(cfg.METHOD, cfg, root=tmp_path_factory.mktemp("vq")),
                       progress=False)


@pytest.mark.slow
def test_the_prior_learns_the_codes_of_digits(digits_vqvae, tmp_path):
    """Held-out NLL well below log K, and samples far nearer the test set (Frechet distance)
    than grids of uniformly random codes through the same decoder."""
    cfg = prior.Config(vq_run=str(digits_vqvae.dir))
    summary = prior.train(cfg, Run.create(cfg.METHOD, cfg, root=tmp_path),
                          progress=False).summary()
    assert summary["eval/test_nll_per_code"] < summary["baseline/test_nll_per_code"] - 0.5
    assert summary["eval/frechet_distance"] < 0.5 * summary["baseline/frechet_distance"]


@pytest.mark.slow
def test_class_conditional_samples_show_their_label(digits_vqvae, tmp_path):
    """The shipped classifier reads the label a sample was drawn for far more often than
    chance (1 in 10)."""
    cfg = prior.Config(vq_run=str(digits_vqvae.dir), conditional=True)
    summary = prior.train(cfg, Run.create(cfg.METHOD, cfg, root=tmp_path),
                          progress=False).summary()
    assert summary["eval/label_accuracy"] > 0.5
    assert summary["eval/test_nll_per_code"] < summary["baseline/test_nll_per_code"] - 0.5
