"""Parity of the VQ layer with vector-quantize-pytorch (Phil Wang's library, 1.x): the same
codebook and inputs give the same codes, indices, quantised outputs, losses, input gradients and
EMA codebook updates. Its extras (rotation trick, k-means init, dead-code expiry, cosine
similarity) are off. diffusers' VQModel and AutoencoderKL are a shape reference for the latents."""

import pytest
import torch

from mlatlas.generative.vq import autoencoder, vqvae
from mlatlas.generative.vq.quantizer import VectorQuantizer

vqp = pytest.importorskip("vector_quantize_pytorch")


def _pair(k: int, d: int) -> tuple[VectorQuantizer, torch.nn.Module]:
    ours = VectorQuantizer(k, d, beta=0.25, ema=True, decay=0.99, eps=1e-5)
    with torch.no_grad():
        ours.codebook.normal_()
        ours.embed_sum.copy_(ours.codebook)
    theirs = vqp.VectorQuantize(dim=d, codebook_size=k, decay=0.99, eps=1e-5,
                                commitment_weight=0.25, kmeans_init=False, rotation_trick=False,
                                threshold_ema_dead_code=0, accept_image_fmap=True)
    with torch.no_grad():
        theirs._codebook.embed.copy_(ours.codebook[None])
        theirs._codebook.embed_avg.copy_(ours.embed_sum[None])
        theirs._codebook.cluster_size.fill_(1.0)
    return ours, theirs


@pytest.mark.parametrize(("k", "d", "size"), [(16, 4, 4), (64, 8, 7)])
def test_ema_training_steps_match_vector_quantize_pytorch(k, d, size):
    torch.manual_seed(0)
    ours, theirs = _pair(k, d)
    ours.train()
    theirs.train()
    for _ in range(3):
        x = torch.randn(8, d, size, size)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        q = ours(x_ours)
        quantize, indices, loss = theirs(x_theirs)
        assert torch.equal(q.indices, indices)
        torch.testing.assert_close(q.z_q, quantize)
        torch.testing.assert_close(q.loss, loss.reshape(()))
        (q.z_q.pow(2).sum() + q.loss).backward()
        (quantize.pow(2).sum() + loss.sum()).backward()
        torch.testing.assert_close(x_ours.grad, x_theirs.grad)
        torch.testing.assert_close(ours.codebook, theirs._codebook.embed[0])
        torch.testing.assert_close(ours.cluster_size, theirs._codebook.cluster_size[0])


def test_eval_mode_codes_match_and_neither_updates():
    torch.manual_seed(1)
    ours, theirs = _pair(32, 6)
    ours.eval()
    theirs.eval()
    x = torch.randn(4, 6, 5, 5)
    q = ours(x)
    quantize, indices, _ = theirs(x)
    assert torch.equal(q.indices, indices)
    torch.testing.assert_close(q.z_q, quantize)
    torch.testing.assert_close(ours.codebook, theirs._codebook.embed[0])


@pytest.mark.slow  # importing diffusers takes ~13 s
def test_latent_shapes_match_diffusers_autoencoders_for_the_same_downsampling():
    diffusers = pytest.importorskip("diffusers")
    # Two down blocks halve once (diffusers' last block does not downsample): f = 2.
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * 2,
              "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (8, 16),
              "norm_num_groups": 8, "in_channels": 1, "out_channels": 1, "latent_channels": 4}
    x = torch.rand(2, 1, 8, 8)
    kl_theirs = diffusers.AutoencoderKL(**blocks)
    kl_ours = autoencoder.Config(width=8, downsample=2, latent_channels=4).build_model((1, 8, 8))
    with torch.no_grad():
        assert kl_theirs.encode(x).latent_dist.mean.shape == kl_ours.encode(x).shape
    vq_theirs = diffusers.VQModel(**blocks, num_vq_embeddings=32, vq_embed_dim=4)
    vq_ours = vqvae.Config(width=8, downsample=2, code_dim=4, codebook_size=32).build_model(
        (1, 8, 8))
    with torch.no_grad():
        assert vq_theirs.encode(x).latents.shape == vq_ours.encode(x).shape
    # Both keep the latents' scaling out of the model: diffusers as config.scaling_factor
    # (0.18215 for Stable Diffusion's), ours as eval/scaling_factor = 1 / latent std.
    assert "scaling_factor" in kl_theirs.config
