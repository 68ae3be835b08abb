"""Peer parity: clip_loss and siglip_loss (dense and chunked) equal open_clip's ClipLoss and
SigLipLoss in value and in the gradients of the features, the temperature and the bias.

open_clip needs torchvision, which installs only beside its own torch build, so this runs in a
separate environment (see benchmarks/contrastive_vs_open_clip.py) and is skipped elsewhere.
open_clip's losses take L2-normalised features (its models normalise them) and the scale
already exponentiated, s = exp(t); ours take raw features and t, so the comparison feeds
open_clip F.normalize(features) and t.exp() under autograd and compares gradients with respect
to the same leaves.
"""

import pytest
import torch
import torch.nn.functional as F

from mlatlas.contrastive.losses import clip_loss, siglip_loss, siglip_loss_chunked

open_clip_loss = pytest.importorskip("open_clip.loss")


def leaves(n: int, dim: int, seed: int, log_scale: float, bias: float):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
    # Texts near their images, so that positives and negatives both matter.
    y = (x.detach() + torch.randn(n, dim, generator=g, dtype=torch.float64)).requires_grad_()
    t = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    return x, y, t, b


def assert_same_loss_and_gradients(ours: torch.Tensor, theirs: torch.Tensor, wrt) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, c in zip(torch.autograd.grad(ours, wrt), torch.autograd.grad(theirs, wrt),
                    strict=True):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


# t = log(1/0.07) and log 20: scales below CLIP's clamp at 100, where the two must agree.
@pytest.mark.parametrize("t_value", [2.659, 3.0])
@pytest.mark.parametrize("n", [1, 7, 32])
def test_clip_loss_equals_open_clip_clip_loss(n, t_value):
    x, y, t, _ = leaves(n, 5, seed=n, log_scale=t_value, bias=0.0)
    theirs = open_clip_loss.ClipLoss()(F.normalize(x, dim=-1), F.normalize(y, dim=-1), t.exp())
    assert_same_loss_and_gradients(clip_loss(x, y, t), theirs, (x, y, t))


# SigLIP's initial t' = log 10, b = -10, and a point where the positives' terms are not tiny.
@pytest.mark.parametrize(("t_value", "b_value"), [(2.303, -10.0), (1.0, -2.0)])
@pytest.mark.parametrize("n", [1, 7, 32])
def test_siglip_losses_equal_open_clip_siglip_loss(n, t_value, b_value):
    x, y, t, b = leaves(n, 5, seed=n, log_scale=t_value, bias=b_value)
    theirs = open_clip_loss.SigLipLoss()
    for ours in (siglip_loss(x, y, t, b), siglip_loss_chunked(x, y, t, b, 3)):
        reference = theirs(F.normalize(x, dim=-1), F.normalize(y, dim=-1), t.exp(), b)
        assert_same_loss_and_gradients(ours, reference, (x, y, t, b))
