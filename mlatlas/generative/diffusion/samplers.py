r"""Samplers on the scale-free variable x = x_0 + sigma eps of the unified view (``edm.py``).

Every sampler has the signature ``sampler(denoiser, x, sigmas, *, generator=None, ...)``:
``denoiser(x, sigma) -> D(x; sigma)`` estimates x_0 (a float ``sigma``; any model becomes one
through ``formulations.Formulation.denoiser``), ``x`` is the start, drawn by the caller at
sigmas[0], and ``sigmas`` is a decreasing float64 sequence ending at 0 (``edm.karras_sigmas``).
With d = (x - D(x; sigma)) / sigma (``to_d``) the probability-flow ODE is dx/dsigma = d.

Euler and Heun (Karras et al. 2022, Algorithms 1 and 2). With churn, each step first raises
the noise level, sigma_hat = (1 + gamma_i) sigma_i with gamma_i = min(S_churn / N, sqrt 2 - 1)
for sigma_i in [S_tmin, S_tmax], by adding fresh noise of variance sigma_hat^2 - sigma_i^2
(times S_noise^2); then

    d_i = (x_hat - D(x_hat; sigma_hat)) / sigma_hat,    dt = sigma_{i+1} - sigma_hat
    x_{i+1} = x_hat + d_i dt
    Heun, if sigma_{i+1} > 0:  d' = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1},
                               x_{i+1} = x_hat + (d_i + d') / 2 dt

The same two integrators serve flow matching, whose ODE dx_t/dt = v(x_t, t) runs on x_t itself
over a grid of times 1 >= t_0 > ... > t_N = 0: wrapped as ``Velocity(v)``, the model gives the
derivative d = v(x, t) directly, and D = x - t v (the straight path's x_0 estimate, for which
(x - D) / t = v) is what callbacks see. The grid is then one of times instead of noise levels;
the steps are the ones above, letter for letter.

DDIM (Song, Meng & Ermon 2021, eq. 12) divided through by sqrt(alpha_bar_{t-1}): with
sigma_up = eta sigma_{i+1} sqrt(sigma_i^2 - sigma_{i+1}^2) / sigma_i and z ~ N(0, I),

    x_{i+1} = D + sqrt(sigma_{i+1}^2 - sigma_up^2) eps_hat + sigma_up z,   eps_hat = d_i.

At eta = 0 this is Euler's step, deterministic, and run on an increasing sequence it inverts
sampling (DDIM inversion). DDPM's ancestral step (Ho et al. 2020, Algorithm 2) in the same
variable is x_{i+1} = D + sigma_{i+1}^2 / sigma_i^2 (x_i - D) + std z, where the posterior
variance std^2 = sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2 is DDIM's at eta = 1, and
the forward variance beta_t gives std^2 = (sigma_i^2 - sigma_{i+1}^2) (1 + sigma_{i+1}^2) /
(1 + sigma_i^2).

Every step is written as above, one tensor operation per symbol. Fusing Euler's step into one
``torch.lerp`` saves about 7 us a step on a batch of 64 8x8 images, under 0.1% of the 8x8 UNet's
7 ms call and inside its run-to-run spread (``benchmarks/samplers_vs_diffusers.py``); it would
change only the last bits of the samples.

Exact likelihood by the probability-flow ODE (Song et al. 2021, Appendix D.2; the instantaneous
change of variables of Chen et al. 2018): integrating from sigma_min up to sigma_max,

    log p(x(sigma_min)) = log N(x(sigma_max); 0, s_T^2 I)
                          + int_{sigma_min}^{sigma_max} div_x d(x(sigma), sigma) dsigma

with the divergence exact (one backward pass per dimension) or Hutchinson's estimate
E_z[z^T (d d / dx) z], z Rademacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from mlatlas.core.progress import progress_bar

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
# Called at each step with (i, sigma_i, x_i, D(x_i; sigma_i)); for trajectory figures.
Callback = Callable[[int, float, torch.Tensor, torch.Tensor], None] | None


class Velocity:
    """An ODE given by its velocity, dx/dt = v(x, t) (flow matching), for Euler and Heun: they
    take d = v(x, t) where a denoiser gives d = (x - D(x; sigma)) / sigma, along a grid of
    times in [0, 1] instead of noise levels. ``velocity(x, t) -> v``, shaped like x."""

    def __init__(self, velocity: Callable[[torch.Tensor, float], torch.Tensor]):
        self.velocity = velocity

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return self.velocity(x, t)


Model = Denoiser | Velocity


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """d = (x - D(x; sigma)) / sigma, the derivative dx/dsigma of the probability-flow ODE."""
    return (x - denoised) / sigma


def derivative(model: Model, x: torch.Tensor,
               sigma: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d, D): dx/dsigma at (x, sigma) and the denoised estimate D it came from; for a
    ``Velocity`` d = v(x, t) and D None (``denoised_of`` makes it when a callback asks)."""
    if isinstance(model, Velocity):
        return model(x, sigma), None
    denoised = model(x, sigma)
    return to_d(x, sigma, denoised), denoised


def denoised_of(x: torch.Tensor, sigma: float, d: torch.Tensor) -> torch.Tensor:
    """D = x - sigma d, the x_0 estimate that d = (x - D) / sigma implies (for a flow: x - t v,
    the straight path's)."""
    return x - sigma * d


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the CPU so that a seed gives the same samples on any device.
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _check_sigmas(sigmas: torch.Tensor, model: Model | None = None) -> list[float]:
    values = [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError("sigmas needs at least two levels (a start and an end)")
    if any(s < 0 or math.isnan(s) for s in values):
        raise ValueError("sigmas must be non-negative numbers")
    if isinstance(model, Velocity) and max(values) > 1:
        raise ValueError("a velocity's times must lie in [0, 1]")
    return values


def _denoiser_only(model: Model, name: str) -> None:
    if isinstance(model, Velocity):
        raise ValueError(f"{name} steps x = x_0 + sigma eps and needs a denoiser; a flow's "
                         "velocity takes euler or heun")


def _steps(n: int, progress: bool | None):
    return progress_bar(range(n), desc="sampling", leave=False, progress=progress)


@torch.no_grad()
def _karras(model: Model, x: torch.Tensor, sigmas: torch.Tensor, second_order: bool,
            generator: torch.Generator | None, S_churn: float, S_tmin: float, S_tmax: float,
            S_noise: float, progress: bool | None, callback: Callback) -> torch.Tensor:
    values = _check_sigmas(sigmas, model)
    if S_churn and isinstance(model, Velocity):
        raise ValueError("churn adds noise to x = x_0 + sigma eps; a flow's x_t takes none")
    n = len(values) - 1
    for i in _steps(n, progress):
        sigma, sigma_next = values[i], values[i + 1]
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= sigma <= S_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * _noise(x, generator)
        d, denoised = derivative(model, x, sigma_hat)
        if callback is not None:
            callback(i, sigma_hat, x, denoised_of(x, sigma_hat, d) if denoised is None
                     else denoised)
        dt = sigma_next - sigma_hat
        x_next = x + d * dt
        if second_order and sigma_next > 0:
            d_prime, _ = derivative(model, x_next, sigma_next)
            x_next = x + (d + d_prime) / 2 * dt
        x = x_next
    return x


def euler(denoiser: Model, x: torch.Tensor, sigmas: torch.Tensor, *,
          generator: torch.Generator | None = None, S_churn: float = 0.0, S_tmin: float = 0.0,
          S_tmax: float = math.inf, S_noise: float = 1.0, progress: bool | None = None,
          callback: Callback = None) -> torch.Tensor:
    """Euler steps of the probability-flow ODE (with churn: EDM Algorithm 2, first order), or of
    a ``Velocity``'s ODE along its times. One network evaluation per step."""
    return _karras(denoiser, x, sigmas, False, generator, S_churn, S_tmin, S_tmax, S_noise,
                   progress, callback)


def heun(denoiser: Model, x: torch.Tensor, sigmas: torch.Tensor, *,
         generator: torch.Generator | None = None, S_churn: float = 0.0, S_tmin: float = 0.0,
         S_tmax: float = math.inf, S_noise: float = 1.0, progress: bool | None = None,
         callback: Callback = None) -> torch.Tensor:
    """Heun's second-order steps: EDM Algorithm 1 (deterministic) or, with S_churn > 0,
    Algorithm 2; or of a ``Velocity``'s ODE along its times. 2N - 1 network evaluations for N
    steps ending at 0 (the last step is Euler's)."""
    return _karras(denoiser, x, sigmas, True, generator, S_churn, S_tmin, S_tmax, S_noise,
                   progress, callback)


@torch.no_grad()
def ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 0.0,
         generator: torch.Generator | None = None, progress: bool | None = None,
         callback: Callback = None) -> torch.Tensor:
    """DDIM with stochasticity eta (0: deterministic, 1: DDPM's posterior variance). The
    sequence may also increase (eta = 0 only), which runs the ODE back towards noise."""
    _denoiser_only(denoiser, "ddim")
    values = _check_sigmas(sigmas)
    if values[0] == 0:
        raise ValueError("DDIM cannot start at sigma = 0: the noise estimate divides by sigma")
    if eta and any(b > a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError("DDIM inversion (increasing sigmas) is deterministic: use eta = 0")
    for i in _steps(len(values) - 1, progress):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoiser(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        eps_hat = to_d(x, sigma, denoised)
        sigma_up = eta * sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma
        x = denoised + math.sqrt(sigma_next**2 - sigma_up**2) * eps_hat
        if sigma_up > 0:
            x = x + sigma_up * _noise(x, generator)
    return x


@torch.no_grad()
def ddpm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
         variance: Literal["posterior", "beta"] = "posterior",
         generator: torch.Generator | None = None, progress: bool | None = None,
         callback: Callback = None) -> torch.Tensor:
    """DDPM's ancestral sampler on a VP model's sigmas (the posterior mean, then noise of the
    posterior variance beta_tilde_t or of the forward variance beta_t)."""
    _denoiser_only(denoiser, "ddpm")
    values = _check_sigmas(sigmas)
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    for i in _steps(len(values) - 1, progress):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoiser(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        x = denoised + (sigma_next / sigma) ** 2 * (x - denoised)
        if sigma_next > 0:
            gap = sigma**2 - sigma_next**2
            std2 = (sigma_next**2 * gap / sigma**2 if variance == "posterior"
                    else gap * (1 + sigma_next**2) / (1 + sigma**2))
            x = x + math.sqrt(std2) * _noise(x, generator)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm, "ddim": ddim, "euler": euler, "heun": heun}
# The samplers that integrate a ``Velocity`` (flow matching) as well as a denoiser.
ODE_SAMPLERS: tuple[str, ...] = ("euler", "heun")


def function_evaluations(sampler: str, steps: int) -> int:
    """Network evaluations of ``steps`` steps ending at sigma = 0 (Heun's last step is Euler's)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def divergence(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               trace: Literal["exact", "hutchinson"] = "exact", probes: int = 1,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(x), div fn(x)) for a batch x of shape (B, ...): the exact trace of the Jacobian,
    one backward pass per dimension, or Hutchinson's estimate with ``probes`` Rademacher
    vectors."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        flat_out, dims = out.flatten(1), x[0].numel()
        div = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        if trace == "exact":
            for d in range(dims):
                grad = torch.autograd.grad(flat_out[:, d].sum(), x, retain_graph=True)[0]
                div = div + grad.flatten(1)[:, d]
        elif trace == "hutchinson":
            for _ in range(probes):
                z = torch.randint(0, 2, x.shape, generator=generator).to(x) * 2 - 1
                grad = torch.autograd.grad((out * z).sum(), x, retain_graph=True)[0]
                div = div + (grad * z).flatten(1).sum(1) / probes
        else:
            raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
    return out.detach(), div.detach()


def log_likelihood(denoiser: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor, prior_std: float,
                   *, trace: Literal["exact", "hutchinson"] = "exact", probes: int = 1,
                   generator: torch.Generator | None = None,
                   progress: bool | None = None) -> torch.Tensor:
    """log p(x0) in nats per example, by Heun steps of the probability-flow ODE along the
    increasing ``sigmas`` (from a small sigma_min to sigma_max) and the prior
    N(0, prior_std^2 I) at the end; shape (B,)."""
    values = _check_sigmas(sigmas)
    if any(b <= a for a, b in zip(values, values[1:], strict=False)) or values[0] <= 0:
        raise ValueError("likelihood sigmas must increase from a positive sigma_min")

    def drift(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: to_d(x, sigma, denoiser(x, sigma))

    x, delta = x0, torch.zeros(len(x0), dtype=x0.dtype, device=x0.device)
    for i in _steps(len(values) - 1, progress):
        sigma, sigma_next = values[i], values[i + 1]
        dt = sigma_next - sigma
        d, div = divergence(drift(sigma), x, trace, probes, generator)
        x_next = x + d * dt
        d_prime, div_prime = divergence(drift(sigma_next), x_next, trace, probes, generator)
        x = x + (d + d_prime) / 2 * dt
        delta = delta + (div + div_prime) / 2 * dt
    dims = x0[0].numel()
    prior = (-0.5 * (x / prior_std).flatten(1).pow(2).sum(1)
             - dims * (math.log(prior_std) + 0.5 * math.log(2 * math.pi)))
    return prior + delta
