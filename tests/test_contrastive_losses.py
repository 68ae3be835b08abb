"""Contrastive losses against closed forms worked by hand, and chunked SigLIP against dense."""

import math

import pytest
import torch
import torch.nn.functional as F

from mlatlas.contrastive.losses import (
    CLIP_LOGIT_SCALE_INIT,
    SIGLIP_BIAS_INIT,
    SIGLIP_T_PRIME_INIT,
    clip_logits,
    clip_loss,
    info_nce,
    nt_xent,
    siglip_loss,
    siglip_loss_chunked,
)

N = 6


def identity() -> torch.Tensor:
    return torch.eye(N, dtype=torch.float64)


def test_info_nce_of_identity_features_and_its_log_n_bound():
    tau = 0.2
    # The positive scores 1/tau, each of the N - 1 negatives 0.
    expected = math.log(1 + (N - 1) * math.exp(-1 / tau))
    assert info_nce(identity(), identity(), tau).item() == pytest.approx(expected, rel=1e-12)
    # log N - L estimates the mutual information and can never exceed log N; perfectly
    # separated pairs at a small temperature reach it.
    assert math.log(N) - info_nce(identity(), identity(), 0.01).item() == pytest.approx(
        math.log(N), abs=1e-6)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    estimate = math.log(64) - info_nce(q, k, 0.1).item()
    assert estimate < math.log(64)
    assert estimate < math.log(64) - info_nce(q, q, 0.1).item()


def test_nt_xent_of_identical_views_and_a_loop_reference():
    tau = 0.5
    # Each of the 2N points: its other view scores 1/tau, the 2N - 2 others 0, itself excluded.
    expected = math.log(1 + (2 * N - 2) * math.exp(-1 / tau))
    assert nt_xent(identity(), identity(), tau).item() == pytest.approx(expected, rel=1e-12)
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    terms = []
    for i in range(10):
        j = (i + 5) % 10
        sims = torch.stack([z[i] @ z[k] / tau for k in range(10) if k != i])
        terms.append(-(z[i] @ z[j] / tau - torch.logsumexp(sims, 0)))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(torch.stack(terms).mean().item(),
                                                         rel=1e-5)


def test_clip_loss_of_identity_features_and_the_scale_clamp():
    scale = math.exp(CLIP_LOGIT_SCALE_INIT)  # 1 / 0.07
    assert scale == pytest.approx(1 / 0.07)
    expected = math.log(1 + (N - 1) * math.exp(-scale))
    loss = clip_loss(identity(), identity(), torch.tensor(CLIP_LOGIT_SCALE_INIT))
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    # s = exp(t) is clamped at 100.
    big = clip_logits(identity(), identity(), torch.tensor(math.log(1000.0)))[0]
    assert big.max().item() == pytest.approx(100.0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    per_image, per_text = clip_logits(x, y, torch.tensor(0.0))
    assert torch.equal(per_text, per_image.T)
    # The loss is symmetric in its two towers.
    assert clip_loss(x, y, torch.tensor(1.0)).item() == pytest.approx(
        clip_loss(y, x, torch.tensor(1.0)).item(), rel=1e-6)


def test_siglip_loss_of_identity_features_at_its_initial_temperature_and_bias():
    t_prime = torch.tensor(SIGLIP_T_PRIME_INIT, dtype=torch.float64)
    b = torch.tensor(SIGLIP_BIAS_INIT, dtype=torch.float64)
    # Positives: t + b = 10 - 10 = 0, -log sigma(0) = log 2; each of the N - 1 negatives per
    # image: -log sigma(-b) = log(1 + e^-10).
    expected = math.log(2) + (N - 1) * math.log1p(math.exp(-10))
    loss = siglip_loss(identity(), identity(), t_prime, b)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def siglip_inputs(n: int, dim: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randn(n, dim, generator=g, dtype=dtype, requires_grad=True)
    t_prime = torch.tensor(1.3, dtype=dtype, requires_grad=True)
    b = torch.tensor(-2.0, dtype=dtype, requires_grad=True)
    return x, y, t_prime, b


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 20])
def test_chunked_siglip_equals_the_dense_loss_and_its_gradients(chunk):
    x, y, t_prime, b = siglip_inputs(13, 5, seed=3)
    dense = siglip_loss(x, y, t_prime, b)
    grads = torch.autograd.grad(dense, (x, y, t_prime, b))
    chunked = siglip_loss_chunked(x, y, t_prime, b, chunk)
    torch.testing.assert_close(chunked, dense)
    for a, c in zip(torch.autograd.grad(chunked, (x, y, t_prime, b)), grads, strict=True):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("trainable", ["features", "image", "text", "scalars"])
def test_chunked_siglip_gradients_when_only_some_inputs_train_and_scaled_upstream(trainable):
    x, y, t_prime, b = siglip_inputs(11, 4, seed=4)
    keep = {"features": (x, y), "image": (x,), "text": (y,), "scalars": (t_prime, b)}[trainable]
    for a in (x, y, t_prime, b):
        a.requires_grad_(any(a is k for k in keep))
    # An upstream factor other than 1 checks that the backward pass scales the stored gradients.
    dense = torch.autograd.grad(2.5 * siglip_loss(x, y, t_prime, b), keep)
    chunked = torch.autograd.grad(2.5 * siglip_loss_chunked(x, y, t_prime, b, 3), keep)
    for a, c in zip(chunked, dense, strict=True):
        torch.testing.assert_close(a, c)


def test_chunked_siglip_passes_gradcheck_and_works_without_gradients():
    x, y, t_prime, b = siglip_inputs(6, 3, seed=5)
    assert torch.autograd.gradcheck(lambda *a: siglip_loss_chunked(*a, 4), (x, y, t_prime, b))
    with torch.no_grad():
        value = siglip_loss_chunked(x, y, t_prime, b, 4)
    assert not value.requires_grad
    torch.testing.assert_close(value, siglip_loss(x, y, t_prime, b).detach())


def test_chunked_siglip_in_float32_at_the_initial_temperature_and_bias():
    x, y, _, _ = siglip_inputs(300, 16, seed=6, dtype=torch.float32)
    t_prime = torch.tensor(SIGLIP_T_PRIME_INIT, requires_grad=True)
    b = torch.tensor(SIGLIP_BIAS_INIT, requires_grad=True)
    inputs = (x, y, t_prime, b)
    dense = siglip_loss(*inputs)
    chunked = siglip_loss_chunked(*inputs, 64)
    torch.testing.assert_close(chunked, dense)
    for a, c in zip(torch.autograd.grad(chunked, inputs), torch.autograd.grad(dense, inputs),
                    strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_chunked_siglip_keeps_no_n_by_n_tensor_for_the_backward_pass():
    n, dim = 64, 8
    inputs = siglip_inputs(n, dim, seed=7)
    saved: list[int] = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        siglip_loss(*inputs)
    assert max(saved) >= n * n  # the dense loss keeps its logits
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        siglip_loss_chunked(*inputs, 16)
    assert max(saved) <= n * dim


def test_bad_shapes_are_value_errors():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        clip_loss(torch.zeros(3, 2), torch.zeros(4, 2), torch.tensor(0.0))
    with pytest.raises(ValueError, match="chunk"):
        siglip_loss_chunked(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor(0.0),
                            torch.tensor(0.0), 0)
