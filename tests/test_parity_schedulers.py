r"""Peer parity of the sigma-space samplers: whole sampling loops of mlatlas against diffusers'
schedulers, in float64, from the same start, with the same noise and the same toy network.

The toy networks are the exact predictions for Gaussian data x_0 ~ N(mu, s^2 I),

    VP eps:    eps(x_t, t) = sqrt(1 - a_t) (x_t - sqrt(a_t) mu) / (a_t s^2 + 1 - a_t)
    EDM F:     D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu),  F = (D - c_skip x) / c_out
    velocity:  v(x_t, t) = (x_t - x0_hat) / t,  x0_hat = mu + (1-t) s^2 (x_t - (1-t) mu)
                                                              / ((1-t)^2 s^2 + t^2)

(a_t = alpha_bar at the fractional step t, linear between the table's entries) plus a small
fixed tanh term in (x, t), so that the networks are neither linear in x nor blind to a wrong t.
Each is a plain function of what the network is handed -- (x_t, t) for VP and flow matching,
(c_in x, c_noise) for EDM -- so both libraries call the very same function.

What is made identical, and why. The point is to test the step formulas and the wrapping of a
network into a denoiser with identical coefficients; diffusers keeps its tables in float32.

* DDPM, DDIM: ``scheduler.alphas_cumprod`` (and DDIM's ``final_alpha_cumprod`` when
  ``set_alpha_to_one=False``) are replaced by our float64 ``Schedule.alpha_bar``; our sigma grid
  is ``Schedule.sigmas`` at diffusers' own integer timesteps (DDPM "leading", steps_offset 0;
  DDIM "leading", steps_offset 1, Stable Diffusion's setting), then 0 -- or sigma at t = 0 for
  DDIM with ``set_alpha_to_one=False``, where diffusers ends on alpha_bar_0, not 1.
* Euler and Heun (discrete): diffusers interpolates sigma linearly at fractional timesteps, while
  ``Schedule.sigma_to_t`` interpolates log sigma; with T = 1000 the default "linspace" timesteps
  linspace(0, 999, N) are integers for N in {10, 28, 38} (999 = 27 x 37), where both agree, so
  only those N are used (asserted). ``scheduler.sigmas`` is then overwritten with our float64
  table at those timesteps (interleaved the way HeunDiscreteScheduler keeps it).
* EDM Euler: diffusers' Karras grid equals ``edm.karras_sigmas`` to float32 rounding (asserted);
  ``scheduler.sigmas`` and ``scheduler.timesteps`` (= c_noise = ln(sigma) / 4) are overwritten
  with the float64 values.
* Flow matching: diffusers' sigma is our time t and its model output the velocity eps - x_0; its
  float32 grid is widened exactly to float64 and fed to both, with ``timesteps`` = 1000 sigma,
  which the network wrapper divides by 1000.
* Noise: DDPM's scheduler and our ddpm both draw z with ``torch.randn(x.shape, generator,
  dtype)`` at every step but the last, so equal seeds give equal z (diffusers scales it by the
  x_t-space standard deviation, we by the same times sqrt(1 + sigma_{i+1}^2), our x's scale).
  DDIM with eta > 0 gets diffusers' ``variance_noise`` drawn from a generator seeded like ours;
  the step to sigma = 0 adds none in either.
* Options: DDPM's variance_type "fixed_small" is our variance="posterior" and "fixed_large" our
  "beta"; its clip_sample is our clip=True; DDIM's clip_sample needs use_clipped_model_output=True
  to match ours, which recomputes eps_hat from the clipped x_0 (diffusers' default keeps the
  network's eps).

Differences that remain, found by reading diffusers 0.42:

* EulerDiscrete, EDMEuler and both FlowMatch schedulers round the *sample* to float32 inside
  ``step()`` (their upcast for half-precision pipelines); with float64 coefficients that rounding,
  |x| 2^-24 per step, is the only deviation left there: those loops agree to about 5e-7.
* With ``s_churn > 0``, diffusers' Euler schedulers add the churn noise inside ``step()``, after
  the network was evaluated at the un-churned sample, so D(x; sigma) is used at (x_hat, sigma_hat);
  ours follows EDM's Algorithm 2 and evaluates D(x_hat; sigma_hat). Only S_churn = 0 is compared.

The float64 loops without a float32 rounding inside diffusers (DDPM, DDIM, Heun) agree to about
1e-13; the test below checks that the VP wrapping hands the network diffusers' exact timesteps.
"""

import math

import pytest
import torch

from mlatlas.generative.diffusion import edm, samplers
from mlatlas.generative.diffusion.ddpm import Schedule
from mlatlas.generative.diffusion.formulations import VP, Preconditioned
from mlatlas.generative.diffusion.samplers import Velocity
from mlatlas.generative.flow_matching.flow_matching import FlowMatching

diffusers = pytest.importorskip("diffusers")

T, MU, S = 1000, 0.3, 0.5
SHAPE = (16, 1, 4, 4)
TOL = 1e-5
SCHEDULE = Schedule.linear(T)
_g = torch.Generator().manual_seed(1234)
WIGGLE_X = torch.randn(SHAPE[1:], generator=_g, dtype=torch.float64)
WIGGLE_T = torch.randn(SHAPE[1:], generator=_g, dtype=torch.float64)


def _per_example(t, x: torch.Tensor) -> torch.Tensor:
    """t as (B, 1, ..., 1) or (1, ..., 1): ours passes a (B,) tensor, diffusers a 0-d one."""
    return torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _wiggle(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return 0.05 * torch.tanh(WIGGLE_X * x + WIGGLE_T * u)


def _alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at fractional 0-based steps, linear between the float64 table's entries."""
    low = t.floor().clamp(0, T - 2)
    w = t - low
    table = SCHEDULE.alpha_bar
    return (1 - w) * table[low.long()] + w * table[low.long() + 1]


def vp_eps(x_t: torch.Tensor, t) -> torch.Tensor:
    t = _per_example(t, x_t)
    a = _alpha_bar(t)
    return ((1 - a).sqrt() * (x_t - a.sqrt() * MU) / (a * S**2 + 1 - a)
            + _wiggle(x_t, t / T))


def edm_F(x_in: torch.Tensor, c_noise, sigma_data: float = edm.SIGMA_DATA) -> torch.Tensor:
    c_noise = _per_example(c_noise, x_in)
    sigma = (4 * c_noise).exp()
    c_skip, c_out, c_in, _ = edm.edm_preconditioning(sigma, sigma_data)
    x = x_in / c_in
    denoised = MU + S**2 / (S**2 + sigma**2) * (x - MU)
    return (denoised - c_skip * x) / c_out + _wiggle(x_in, c_noise)


def velocity(x_t: torch.Tensor, t) -> torch.Tensor:
    t = _per_example(t, x_t)
    x0_hat = MU + (1 - t) * S**2 * (x_t - (1 - t) * MU) / ((1 - t) ** 2 * S**2 + t**2)
    return (x_t - x0_hat) / t + _wiggle(x_t, t)


def start(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = TOL) -> None:
    assert ours.dtype == theirs.dtype == torch.float64
    assert torch.isfinite(ours).all()
    diff = (ours - theirs).abs().max().item()
    assert diff <= tol, f"max |ours - diffusers| = {diff:.3e} > {tol:.0e}"


def peer_loop(scheduler, model, x: torch.Tensor, **step_options) -> torch.Tensor:
    """diffusers' sampling loop: scale the input (flow matching has nothing to scale), call the
    network, step."""
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(scale(x, t), t)
            x = scheduler.step(out, t, x, **step_options).prev_sample
    return x


def vp_sigmas(timesteps: torch.Tensor, last: float = 0.0) -> torch.Tensor:
    """Our float64 sigmas at diffusers' integer timesteps, then the final level."""
    steps = timesteps.to(torch.float64)
    assert torch.equal(steps, steps.round()), "parity needs integer timesteps"
    return torch.cat([SCHEDULE.sigmas[steps.long()], torch.tensor([last], dtype=torch.float64)])


def vp_kwargs() -> dict:
    return dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon")


# --- DDPM and DDIM -----------------------------------------------------------------------------

@pytest.mark.parametrize(("steps", "variance", "variance_type", "clip"),
                         [(1000, "posterior", "fixed_small", False),
                          (50, "posterior", "fixed_small", False),
                          (50, "beta", "fixed_large", False),
                          (20, "beta", "fixed_large", False),
                          (50, "posterior", "fixed_small", True)])
def test_ddpm_matches_ddpm_scheduler(steps, variance, variance_type, clip):
    scheduler = diffusers.DDPMScheduler(**vp_kwargs(), variance_type=variance_type,
                                        clip_sample=clip, timestep_spacing="leading")
    scheduler.alphas_cumprod = SCHEDULE.alpha_bar
    scheduler.set_timesteps(steps)
    sigmas = vp_sigmas(scheduler.timesteps)
    x_T = start()

    ours = samplers.ddpm(VP(SCHEDULE, "eps").denoiser(vp_eps, clip),
                         x_T * math.sqrt(1 + sigmas[0] ** 2), sigmas, variance=variance,
                         generator=torch.Generator().manual_seed(7), progress=False)
    theirs = peer_loop(scheduler, vp_eps, x_T, generator=torch.Generator().manual_seed(7))
    assert_close(ours, theirs)


def ddim_peer(scheduler, x_T: torch.Tensor, eta: float, seed: int) -> torch.Tensor:
    """DDIM's loop with the variance noise drawn the way our sampler draws it."""
    generator = torch.Generator().manual_seed(seed)
    x = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype) if eta else None
            x = scheduler.step(vp_eps(x, t), t, x, eta=eta, variance_noise=z,
                               use_clipped_model_output=True).prev_sample
    return x


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_ddim_scheduler(steps, eta):
    scheduler = diffusers.DDIMScheduler(**vp_kwargs(), clip_sample=False, set_alpha_to_one=True,
                                        steps_offset=1, timestep_spacing="leading")
    scheduler.alphas_cumprod = SCHEDULE.alpha_bar
    scheduler.set_timesteps(steps)
    sigmas = vp_sigmas(scheduler.timesteps)
    x_T = start(1)

    ours = samplers.ddim(VP(SCHEDULE, "eps").denoiser(vp_eps), x_T * math.sqrt(1 + sigmas[0] ** 2),
                         sigmas, eta=eta, generator=torch.Generator().manual_seed(11),
                         progress=False)
    assert_close(ours, ddim_peer(scheduler, x_T, eta, seed=11))


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_ending_on_alpha_bar_0_matches(clip):
    """set_alpha_to_one=False ends on alpha_bar_0: our x at sigma_0 times sqrt(alpha_bar_0) is
    diffusers' x_0; with clipping both recompute eps from the clipped x_0."""
    scheduler = diffusers.DDIMScheduler(**vp_kwargs(), clip_sample=clip, set_alpha_to_one=False,
                                        steps_offset=1, timestep_spacing="leading")
    scheduler.alphas_cumprod = SCHEDULE.alpha_bar
    scheduler.final_alpha_cumprod = SCHEDULE.alpha_bar[0]
    scheduler.set_timesteps(20)
    sigmas = vp_sigmas(scheduler.timesteps, last=float(SCHEDULE.sigmas[0]))
    x_T = start(2)

    ours = samplers.ddim(VP(SCHEDULE, "eps").denoiser(vp_eps, clip),
                         x_T * math.sqrt(1 + sigmas[0] ** 2), sigmas, progress=False)
    theirs = ddim_peer(scheduler, x_T, 0.0, seed=0)
    assert_close(ours * SCHEDULE.sqrt_alpha_bar[0], theirs)


# --- Euler and Heun on the VP table ------------------------------------------------------------

def discrete_peer(cls, steps: int):
    scheduler = cls(**vp_kwargs(), timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("steps", [10, 28, 38])
def test_euler_matches_euler_discrete_scheduler(steps):
    scheduler = discrete_peer(diffusers.EulerDiscreteScheduler, steps)
    sigmas = vp_sigmas(scheduler.timesteps)
    # Their float32 alphas_cumprod puts 1 - alpha_bar_0 = 1e-4 off by 1e-4 relative; the rest of
    # the grid agrees to 1e-6.
    assert torch.allclose(scheduler.sigmas.double(), sigmas, rtol=1e-4, atol=0)
    scheduler.sigmas = sigmas
    x = start(3) * sigmas[0]

    ours = samplers.euler(VP(SCHEDULE, "eps").denoiser(vp_eps), x, sigmas, progress=False)
    assert_close(ours, peer_loop(scheduler, vp_eps, x))


@pytest.mark.parametrize("steps", [10, 28, 38])
def test_heun_matches_heun_discrete_scheduler(steps):
    scheduler = discrete_peer(diffusers.HeunDiscreteScheduler, steps)
    own = scheduler.timesteps[::2]  # t_0, then each later t twice (Heun's two evaluations)
    sigmas = vp_sigmas(own)
    scheduler.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    x = start(4) * sigmas[0]

    ours = samplers.heun(VP(SCHEDULE, "eps").denoiser(vp_eps), x, sigmas, progress=False)
    theirs = peer_loop(scheduler, vp_eps, x)
    assert len(scheduler.timesteps) == samplers.function_evaluations("heun", steps)
    assert_close(ours, theirs)


def test_a_wrong_timestep_shows():
    """The toy network depends on t enough that handing it the neighbouring step (as a wrong
    sigma-to-t conversion would) moves the result far beyond the tolerance."""
    scheduler = discrete_peer(diffusers.EulerDiscreteScheduler, 10)
    sigmas = vp_sigmas(scheduler.timesteps)
    scheduler.sigmas = sigmas
    x = start(3) * sigmas[0]

    def shifted(x_t, t):
        return vp_eps(x_t, _per_example(t, x_t) + 1)

    ours = samplers.euler(VP(SCHEDULE, "eps").denoiser(shifted), x, sigmas, progress=False)
    assert (ours - peer_loop(scheduler, vp_eps, x)).abs().max() > 100 * TOL


def test_vp_denoiser_hands_the_network_diffusers_timestep():
    """At the table's sigmas the VP wrapping should hand the network exactly diffusers' integer
    timestep (the loops above agree to ~1e-9 instead of ~1e-15 because of this)."""
    seen = []

    def record(x_t, t):
        seen.append(t[0].item())
        return torch.zeros_like(x_t)

    denoise, x = VP(SCHEDULE, "eps").denoiser(record), start()
    for k in range(T):
        denoise(x, float(SCHEDULE.sigmas[k]))
    assert max(abs(t - k) for k, t in enumerate(seen)) <= 1e-9


# --- EDM ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [5, 18, 40])
def test_edm_euler_matches_edm_euler_scheduler(steps):
    scheduler = diffusers.EDMEulerScheduler(sigma_min=edm.SIGMA_MIN, sigma_max=edm.SIGMA_MAX,
                                            sigma_data=edm.SIGMA_DATA, rho=edm.RHO)
    scheduler.set_timesteps(steps)
    sigmas = edm.karras_sigmas(steps)
    assert torch.allclose(scheduler.sigmas.double(), sigmas, rtol=1e-6, atol=0)
    scheduler.sigmas = sigmas
    scheduler.timesteps = scheduler.precondition_noise(sigmas[:-1])
    x = start(5) * sigmas[0]

    formulation = Preconditioned("edm", edm.SIGMA_MIN, edm.SIGMA_MAX)
    ours = samplers.euler(formulation.denoiser(edm_F), x, sigmas, progress=False)
    assert_close(ours, peer_loop(scheduler, edm_F, x))


# --- flow matching -----------------------------------------------------------------------------

def fm_grid(scheduler) -> torch.Tensor:
    """diffusers' own float32 times widened exactly to float64; its timesteps follow them."""
    ts = scheduler.sigmas.double()
    scheduler.sigmas = ts
    scheduler.timesteps = ts[:-1] * scheduler.config.num_train_timesteps
    return ts.unique_consecutive()  # Heun's list holds each inner time twice


def peer_velocity(x_t, timestep):
    return velocity(x_t, torch.as_tensor(timestep, dtype=x_t.dtype) / T)


@pytest.mark.parametrize("steps", [10, 50])
def test_fm_euler_matches_flow_match_euler_scheduler(steps):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)
    scheduler.set_timesteps(steps)
    ts = fm_grid(scheduler)
    x = start(6)

    ours = samplers.euler(Velocity(FlowMatching().velocity(velocity)), x, ts, progress=False)
    assert_close(ours, peer_loop(scheduler, peer_velocity, x))


@pytest.mark.parametrize("steps", [10, 25])
def test_fm_heun_matches_flow_match_heun_scheduler(steps):
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=T)
    scheduler.set_timesteps(steps)
    ts = fm_grid(scheduler)
    assert len(ts) == steps + 1 and math.isclose(float(ts[0]), 1.0)
    x = start(7)

    ours = samplers.heun(Velocity(FlowMatching().velocity(velocity)), x, ts, progress=False)
    assert_close(ours, peer_loop(scheduler, peer_velocity, x))
