"""Peer parity: the DDPM schedule, forward noising and ancestral step equal diffusers'."""

import pytest
import torch

from mlatlas.generative.diffusion.ddpm import Schedule, ancestral_sample, p_sample_step, q_sample

diffusers = pytest.importorskip("diffusers")


def peer(clip: bool = True):
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                   beta_schedule="linear", variance_type="fixed_small",
                                   prediction_type="epsilon", clip_sample=clip)


def test_schedule_matches():
    ours, theirs = Schedule.linear(), peer()
    assert torch.allclose(ours.betas.float(), theirs.betas, rtol=1e-6, atol=0)
    assert torch.allclose(ours.alpha_bar.float(), theirs.alphas_cumprod, rtol=1e-5, atol=0)


def test_float64_schedule_is_the_more_exact():
    """diffusers keeps alphas_cumprod in float32; near t = 1 that rounding dominates
    1 - alpha_bar_t, which is why the step comparisons below allow 1e-3."""
    exact = Schedule.linear().alpha_bar  # float64 cumprod
    theirs = peer().alphas_cumprod.double()
    assert (exact.float().double() - exact).abs().max() <= (theirs - exact).abs().max()


def test_add_noise_matches():
    x0, eps = torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8)
    t = torch.randint(0, 1000, (16,))
    assert torch.allclose(q_sample(x0, t, eps, Schedule.linear()), peer().add_noise(x0, eps, t),
                          atol=1e-5)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("t", [999, 500, 10, 1, 0])
def test_ancestral_step_matches(t, clip):
    s, scheduler = Schedule.linear(), peer(clip)
    scheduler.set_timesteps(1000)
    xt, eps = torch.randn(8, 2) * 2, torch.randn(8, 2)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(t))
    ours = p_sample_step(lambda x, _: eps, xt, t, s, z, "posterior", clip)
    theirs = scheduler.step(eps, t, xt, generator=torch.Generator().manual_seed(t)).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-3, rtol=1e-4)


def test_full_sampling_loop_matches():
    s, scheduler = Schedule.linear(), peer(clip=False)

    def model(x, t):  # the exact eps_theta for data N(0, 0.5^2)
        ab = s.alpha_bar[t.long()].float()[:, None]
        return (1 - ab).sqrt() * x / (ab * 0.25 + 1 - ab)

    scheduler.set_timesteps(1000)
    ours = ancestral_sample(model, (64, 2), s, torch.Generator().manual_seed(3), progress=False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 2, generator=gen)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.repeat(64).float()), t, x, generator=gen).prev_sample
    assert torch.allclose(ours, x, atol=1e-3)
    assert 0.4 < x.std() < 0.6
