"""The autoencoder family (KL autoencoder, VQ-VAE, VQGAN): the theory the code rests on (fast),
and, marked slow, that the defaults learn on digits."""

import math

import pytest
import torch
import torch.nn.functional as F

from mlatlas.core.config import BatchConfig, ConfigError
from mlatlas.core.io import load_tensors
from mlatlas.core.run import Run, RunError
from mlatlas.data import DatasetError
from mlatlas.generative.vq import autoencoder, common, vqgan, vqvae
from mlatlas.generative.vq.networks import PatchDiscriminator
from mlatlas.generative.vq.quantizer import (
    VectorQuantizer,
    codebook_loss,
    commitment_loss,
    ema_update,
    nearest_code,
    perplexity,
    restart_codes,
    straight_through,
    usage,
)

TINY = {"width": 8, "batch_size": 32, "log_every": 3, "ckpt_every": 3, "eval_samples": 0}


# --- quantiser theory ----------------------------------------------------------------------------

def test_nearest_code_is_the_argmin_of_the_distances():
    z, codebook = torch.randn(50, 3), torch.randn(7, 3)
    expected = torch.cdist(z, codebook).argmin(1)
    assert torch.equal(nearest_code(z, codebook), expected)


def test_straight_through_passes_the_decoder_gradient_unchanged_to_the_encoder():
    z_e = torch.randn(4, 3, 2, 2, requires_grad=True)
    z_q = torch.randn(4, 3, 2, 2)
    weight = torch.randn(3, 3)

    def decoder(z):
        return torch.tanh(torch.einsum("dc,bchw->bdhw", weight, z)).pow(2).sum()

    st = straight_through(z_e, z_q)
    assert torch.equal(st, z_e + (z_q - z_e))  # the forward value is z_q
    grad_e, = torch.autograd.grad(decoder(st), z_e)
    leaf = z_q.clone().requires_grad_()
    grad_q, = torch.autograd.grad(decoder(leaf), leaf)
    torch.testing.assert_close(grad_e, grad_q)


def test_the_layer_routes_the_decoder_gradient_and_the_commitment_term_to_the_encoder():
    vq = VectorQuantizer(5, 3, beta=0.25)
    z_e = torch.randn(2, 3, 2, 2, requires_grad=True)
    q = vq(z_e)
    e = vq.lookup(q.indices).detach()
    grad, = torch.autograd.grad(q.z_q.sum() + q.loss, z_e)
    # d/dz_e [sum z_q^ST] = 1; d/dz_e [beta mean (z_e - e)^2] = 2 beta (z_e - e) / N
    expected = 1 + 2 * 0.25 * (z_e.detach() - e) / z_e.numel()
    torch.testing.assert_close(grad, expected)


def test_codebook_term_moves_only_codes_and_commitment_term_only_the_encoder():
    codebook = torch.randn(4, 3, requires_grad=True)
    z_e = torch.randn(6, 3, requires_grad=True)
    e = codebook[nearest_code(z_e.detach(), codebook.detach())]
    g_z, g_book = torch.autograd.grad(codebook_loss(z_e, e), (z_e, codebook), allow_unused=True)
    assert g_z is None and g_book.abs().sum() > 0
    g_z, g_book = torch.autograd.grad(commitment_loss(z_e, e), (z_e, codebook),
                                      allow_unused=True)
    assert g_book is None
    torch.testing.assert_close(g_z, 2 * (z_e - e).detach() / z_e.numel())


def test_plain_codebook_loss_gives_the_codebook_its_gradient_and_ema_gives_none():
    z_e = torch.randn(2, 3, 2, 2, requires_grad=True)
    plain, ema = VectorQuantizer(4, 3), VectorQuantizer(4, 3, ema=True)
    plain(z_e).loss.backward()
    assert plain.codebook.grad.abs().sum() > 0
    assert not ema.codebook.requires_grad and ema(z_e).loss.grad_fn is not None


def test_ema_update_against_a_hand_computation():
    decay, eps = 0.9, 1e-5
    cluster_size = torch.tensor([1.0, 1.0])
    embed_sum = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 5.0]])
    indices = torch.tensor([0, 0, 1])
    n, m, e = ema_update(cluster_size, embed_sum, z, indices, decay, eps)
    # N_0 = 0.9 + 0.1 * 2 = 1.1, N_1 = 0.9 + 0.1 * 1 = 1.0
    # m_0 = 0.9 (0, 0) + 0.1 (4, 2) = (0.4, 0.2); m_1 = 0.9 (1, 1) + 0.1 (5, 5) = (1.4, 1.4)
    torch.testing.assert_close(n, torch.tensor([1.1, 1.0]))
    torch.testing.assert_close(m, torch.tensor([[0.4, 0.2], [1.4, 1.4]]))
    total = 2.1
    smooth = [(1.1 + eps) / (total + 2 * eps) * total, (1.0 + eps) / (total + 2 * eps) * total]
    expected = torch.tensor([[0.4 / smooth[0], 0.2 / smooth[0]],
                             [1.4 / smooth[1], 1.4 / smooth[1]]])
    torch.testing.assert_close(e, expected)


def test_ema_layer_looks_up_before_it_updates_and_then_holds_the_new_codes():
    torch.manual_seed(1)
    vq = VectorQuantizer(3, 2, ema=True, decay=0.5)
    before = vq.codebook.clone()
    z_e = torch.randn(1, 2, 2, 2)
    q = vq(z_e)
    torch.testing.assert_close(q.z_q, before[q.indices].permute(0, 3, 1, 2))
    z = z_e.permute(0, 2, 3, 1).reshape(-1, 2)
    _, _, e = ema_update(torch.ones(3), before, z, q.indices.reshape(-1), 0.5)
    torch.testing.assert_close(vq.codebook, e)
    vq.eval()
    vq(torch.randn(1, 2, 2, 2))
    torch.testing.assert_close(vq.codebook, e)  # eval mode does not update


def test_perplexity_of_uniform_and_one_hot_code_use():
    k = 16
    torch.testing.assert_close(perplexity(torch.full((k,), 5.0)), torch.tensor(float(k)))
    one_hot = torch.zeros(k)
    one_hot[3] = 40
    torch.testing.assert_close(perplexity(one_hot), torch.tensor(1.0))
    assert float(usage(one_hot)) == 1 / k
    two = torch.tensor([1.0, 3.0, 0.0, 0.0])
    p = torch.tensor([0.25, 0.75])
    torch.testing.assert_close(perplexity(two), torch.exp(-(p * p.log()).sum()))


def test_dead_code_restart_replaces_exactly_the_unused_codes():
    vq = VectorQuantizer(6, 2, ema=True, dead_window=3)
    before = vq.codebook.clone()
    vq.unused_steps.copy_(torch.tensor([0, 3, 2, 5, 0, 1]))
    z = torch.randn(20, 2) + 10
    assert vq.restart_dead(z, torch.Generator().manual_seed(0)) == 2
    dead = torch.tensor([False, True, False, True, False, False])
    torch.testing.assert_close(vq.codebook[~dead], before[~dead])
    for row in vq.codebook[dead]:
        assert (row == z).all(1).any()  # each new code is one of the encoder outputs
    assert vq.unused_steps[dead].eq(0).all() and vq.unused_steps[~dead].ne(0).any()
    torch.testing.assert_close(vq.cluster_size[dead], torch.ones(2))
    torch.testing.assert_close(vq.embed_sum[dead], vq.codebook[dead])
    assert VectorQuantizer(6, 2, dead_window=0).restart_dead(z) == 0


def test_unused_clock_counts_steps_without_a_position():
    vq = VectorQuantizer(3, 1)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0], [10.0], [-10.0]]))
    for _ in range(4):
        vq(torch.tensor([[[[0.1, 9.0]]]]))  # codes 0 and 1 used, 2 never
    assert vq.unused_steps.tolist() == [0, 0, 4]
    assert restart_codes(vq.codebook.detach(), torch.tensor([False, False, True]),
                         torch.tensor([[7.0]]))[2].item() == 7.0


# --- KL autoencoder, VQGAN theory ----------------------------------------------------------------

def test_gaussian_kl_matches_the_closed_form_of_torch_distributions():
    mean, logvar = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()),
        torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(autoencoder.gaussian_kl(mean, logvar), expected)
    assert autoencoder.gaussian_kl(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0


def test_kl_autoencoder_loss_term_is_the_weighted_kl_per_pixel():
    cfg = autoencoder.Config(width=8, kl_weight=0.5)
    model = cfg.build_model((1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    out = model(x, torch.Generator().manual_seed(0))
    mean, logvar = model.posterior(x)
    kl = autoencoder.gaussian_kl(mean, logvar).mean()
    torch.testing.assert_close(out.loss, 0.5 * kl / 64)
    torch.testing.assert_close(model.encode(x), mean)


def test_hinge_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = (0, 0.5, 2), relu(1 + fake) = (0, 1, 2)
    torch.testing.assert_close(vqgan.hinge_discriminator_loss(real, fake),
                               torch.tensor(2.5 / 3 + 1.0))
    torch.testing.assert_close(vqgan.hinge_generator_loss(fake), torch.tensor(1 / 3))


def test_adaptive_weight_against_a_hand_built_two_layer_decoder():
    torch.manual_seed(0)
    w1 = torch.randn(5, 3, requires_grad=True)
    w2 = torch.randn(4, 5, requires_grad=True)  # the last layer
    z, x, c = torch.randn(8, 3), torch.randn(8, 4), torch.randn(4)
    h = torch.tanh(z @ w1.t())
    x_hat = h @ w2.t()
    rec = F.mse_loss(x_hat, x)
    g = -(x_hat @ c).mean()  # a linear critic D(x) = c . x, L_G = -E[D(x_hat)]
    # Gradients at w2 by hand: d rec / d w2 = 2/(N d) (x_hat - x)^T h, d g / d w2 = -1/N c 1^T h
    grad_rec = 2 / x.numel() * (x_hat - x).detach().t() @ h.detach()
    grad_g = -torch.outer(c, h.detach().sum(0)) / len(x)
    expected = grad_rec.norm() / (grad_g.norm() + 1e-4)
    weight = vqgan.adaptive_weight(rec, g, w2)
    torch.testing.assert_close(weight, expected)
    assert not weight.requires_grad
    (rec + weight * g).backward()  # the graphs survive for the backward pass
    assert w1.grad is not None


def test_adaptive_weight_is_clamped():
    w = torch.randn(3, requires_grad=True)
    rec, g = (w * 100).sum(), (w * 0).sum()
    assert vqgan.adaptive_weight(rec, g, w).item() == 1e4


def test_perceptual_loss_is_zero_for_equal_images_and_reaches_only_the_reconstruction():
    net = vqgan.frozen_feature_net("digits", "cpu")
    x = torch.rand(4, 1, 8, 8)
    assert vqgan.perceptual_loss(net, x, x).item() == pytest.approx(0.0, abs=1e-9)
    x_hat = torch.rand(4, 1, 8, 8, requires_grad=True)
    loss = vqgan.perceptual_loss(net, x, x_hat)
    loss.backward()
    assert loss.item() > 0 and x_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


# --- shapes and errors ---------------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "f"), [((1, 8, 8), 2), ((1, 28, 28), 4), ((1, 28, 28), 1)])
def test_shapes_for_digits_and_mnist(shape, f):
    x = torch.rand(2, *shape)
    h, w = shape[1] // f, shape[2] // f
    vq = vqvae.Config(width=8, downsample=f, codebook_size=10, code_dim=3).build_model(shape)
    assert vq.latent_shape == (3, h, w) and vq.codebook_size == 10
    indices = vq.encode_indices(x)
    assert indices.shape == (2, h, w) and indices.dtype == torch.long
    assert vq.encode(x).shape == (2, 3, h, w)
    assert vq.decode_indices(indices).shape == x.shape
    torch.testing.assert_close(vq.decode(vq.encode(x)), vq.decode_indices(indices))
    kl = autoencoder.Config(width=8, downsample=f, latent_channels=2).build_model(shape)
    assert kl.latent_shape == (2, h, w) and kl.encode(x).shape == (2, 2, h, w)
    assert kl.decode(torch.randn(2, 2, h, w)).shape == x.shape
    assert PatchDiscriminator(1, 8, 2)(x).shape == (2, 1, shape[1] // 4, shape[2] // 4)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ConfigError, match="--downsample"):
        vqvae.Config(downsample=3)
    with pytest.raises(ConfigError, match="--downsample"):
        vqvae.Config(downsample=16).check_data()  # 8x8 digits
    with pytest.raises(ConfigError, match="--eval-samples"):
        vqvae.Config(eval_samples=2)
    with pytest.raises(ConfigError, match="--decay"):
        vqvae.Config(decay=1.0)
    with pytest.raises(ConfigError, match="--codebook-size"):
        vqgan.Config(codebook_size=0)
    with pytest.raises(ConfigError, match="--kl-weight"):
        autoencoder.Config(kl_weight=-1.0)
    with pytest.raises(ConfigError, match="--disc-layers"):
        vqgan.Config(disc_layers=4).check_data()
    with pytest.raises(ConfigError, match="--batch-size"):
        vqgan.Config(batch_size=5000).check_data()
    with pytest.raises(ConfigError, match="points"):
        vqvae.Config(dataset="two-moons").check_data()
    with pytest.raises(DatasetError, match="unknown dataset"):
        vqvae.Config(dataset="digitz").check_data()
    model = vqvae.Config(width=8).build_model((1, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model.encode(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="0..63"):
        model.decode_indices(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match=r"\(B, 4, 4\)"):
        model.decode_indices(torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="codebook"):
        nearest_code(torch.randn(3, 2), torch.randn(4, 3))


def test_perceptual_loss_needs_a_shipped_classifier(tmp_path):
    import numpy as np

    path = tmp_path / "faces.npy"
    np.save(path, np.random.default_rng(0).random((40, 8, 8)).astype("float32"))
    with pytest.raises(ConfigError, match="--perceptual-weight"):
        vqgan.Config(dataset=str(path), batch_size=16).check_data()
    vqgan.Config(dataset=str(path), batch_size=16, perceptual_weight=0.0).check_data()


# --- training, resuming, the interface of later stages --------------------------------------------

def _train(module, runs, steps, **overrides):
    cfg = module.Config(steps=steps, **{**TINY, **overrides})
    return module.train(cfg, Run.create(cfg.METHOD, cfg, root=runs), progress=False)


@pytest.mark.parametrize(("module", "extra"), [
    (vqvae, {"dead_window": 2}),
    (vqgan, {"disc_start": 2, "disc_width": 8}),
    (autoencoder, {}),
])
def test_a_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(module, extra, runs):
    full = _train(module, runs / "full", 6, **extra)
    half = _train(module, runs / "half", 3, **extra)
    cfg = module.Config(steps=6, **{**TINY, **extra})
    module.train(cfg, half, progress=False)
    full_t, half_t = (load_tensors(r.path("checkpoint.safetensors")) for r in (full, half))
    assert full_t.keys() == half_t.keys()
    for key in full_t:
        assert torch.equal(full_t[key], half_t[key]), key


def test_trained_run_gives_the_interface_later_stages_use(runs):
    run = _train(vqvae, runs, 3, eval_samples=8)
    model = common.load_autoencoder(Run.open(run.dir))
    assert isinstance(model, common.VQModel) and not model.training
    x = torch.rand(3, 1, 8, 8)
    assert model.decode_indices(model.encode_indices(x)).shape == x.shape
    summary = run.summary()
    assert {"eval/test_mse", "eval/test_psnr", "eval/test_code_usage", "eval/test_perplexity",
            "eval/frechet_distance", "eval/originals_frechet_distance",
            "baseline/test_mse"} <= set(summary)
    for name in ("reconstructions.png", "codebook.png", "loss.png"):
        assert run.path(name).is_file()
    assert vqvae.sample(run, n=5, seed=1).shape == (5, 1, 8, 8)
    with pytest.raises(ConfigError, match="--n"):
        vqvae.sample(run, n=1000)
    with pytest.raises(ConfigError, match="--n"):
        vqvae.evaluate(run, n=2)
    metrics = vqvae.evaluate(run, n=0)
    assert metrics["test_psnr"] == pytest.approx(10 * math.log10(1 / metrics["test_mse"]))
    kl_run = _train(autoencoder, runs, 3)
    images = autoencoder.sample(kl_run, n=4, seed=0)
    assert images.shape == (4, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, autoencoder.sample(kl_run, n=4, seed=0))


def test_load_autoencoder_refuses_a_run_of_another_kind(runs):
    run = Run.create("other", BatchConfig(), root=runs)
    with pytest.raises(RunError, match="not an autoencoder"):
        common.load_autoencoder(run)


# --- behaviour (slow) ----------------------------------------------------------------------------

def _default_run(module, runs, **overrides):
    cfg = module.Config(**overrides)
    run = module.train(cfg, Run.create(cfg.METHOD, cfg, root=runs), progress=False)
    return run.summary()


@pytest.mark.slow
@pytest.mark.parametrize("module", [vqvae, vqgan])
def test_vq_models_reconstruct_digits_far_better_than_the_mean_image(module, runs):
    summary = _default_run(module, runs)
    assert summary["eval/test_mse"] < 0.2 * summary["baseline/test_mse"]
    assert summary["eval/test_code_usage"] > 0.8


@pytest.mark.slow
def test_ema_codebook_uses_at_least_as_many_codes_as_the_codebook_loss(runs):
    # No dead-code restarts, so the codebook update alone decides how many codes live.
    ema = _default_run(vqvae, runs / "ema", dead_window=0)
    plain = _default_run(vqvae, runs / "plain", dead_window=0, codebook="loss")
    assert ema["eval/test_code_usage"] >= plain["eval/test_code_usage"]


@pytest.mark.slow
def test_kl_autoencoder_reconstructs_digits(runs):
    summary = _default_run(autoencoder, runs)
    assert summary["eval/test_mse"] < 0.1 * summary["baseline/test_mse"]
