r"""Samplers on the scale-free variable x = x_0 + sigma eps of the unified view (``edm.py``).

Every sampler has the signature ``sampler(denoiser, x, sigmas, *, generator=None, ...)``:
``denoiser(x, sigma) -> D(x; sigma)`` estimates x_0 (a float ``sigma``; any model becomes one
through ``framework.Formulation.denoiser``), ``x`` is the start, drawn by the caller at
sigmas[0], and ``sigmas`` is a decreasing float64 sequence ending at 0 (``edm.karras_sigmas``).
With eps_hat = (x - D(x; sigma)) / sigma the probability-flow ODE is dx/dsigma = eps_hat.

Euler and Heun (Karras et al. 2022, Algorithms 1 and 2). With churn, each step first raises
the noise level, sigma_hat = (1 + gamma_i) sigma_i with gamma_i = min(S_churn / N, sqrt 2 - 1)
for sigma_i in [S_tmin, S_tmax], by adding fresh noise of variance sigma_hat^2 - sigma_i^2
(times S_noise^2); then

    d_i = (x_hat - D(x_hat; sigma_hat)) / sigma_hat
    x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d_i
    Heun, if sigma_{i+1} > 0:  d' = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1},
                               x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (d_i + d') / 2

DDIM (Song, Meng & Ermon 2021, eq. 12) divided through by sqrt(alpha_bar_{t-1}): with
sigma_up = eta sigma_{i+1} sqrt(sigma_i^2 - sigma_{i+1}^2) / sigma_i and z ~ N(0, I),

    x_{i+1} = D + sqrt(sigma_{i+1}^2 - sigma_up^2) eps_hat + sigma_up z.

At eta = 0 this is Euler's step, deterministic, and run on an increasing sequence it inverts
sampling (DDIM inversion). DDPM's ancestral step (Ho et al. 2020, Algorithm 2) in the same
variable is x_{i+1} = D + sigma_{i+1}^2 / sigma_i^2 (x_i - D) + std z, where the posterior
variance std^2 = sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2 is DDIM's at eta = 1, and
the forward variance beta_t gives std^2 = (sigma_i^2 - sigma_{i+1}^2) (1 + sigma_{i+1}^2) /
(1 + sigma_i^2).

Exact likelihood by the probability-flow ODE (Song et al. 2021, Appendix D.2; the instantaneous
change of variables of Chen et al. 2018): integrating from sigma_min up to sigma_max,

    log p(x(sigma_min)) = log N(x(sigma_max); 0, s_T^2 I)
                          + int_{sigma_min}^{sigma_max} div_x eps_hat(x(sigma), sigma) dsigma

with the divergence exact (one backward pass per dimension) or Hutchinson's estimate
E_z[z^T (d eps_hat / dx) z], z Rademacher.
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


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the CPU so that a seed gives the same samples on any device.
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _check_sigmas(sigmas: torch.Tensor) -> list[float]:
    values = [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError("sigmas needs at least two levels (a start and an end)")
    if any(s < 0 or math.isnan(s) for s in values):
        raise ValueError("sigmas must be non-negative numbers")
    return values


def _steps(n: int, progress: bool | None):
    return progress_bar(range(n), desc="sampling", leave=False, progress=progress)


@torch.no_grad()
def _karras(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, second_order: bool,
            generator: torch.Generator | None, S_churn: float, S_tmin: float, S_tmax: float,
            S_noise: float, progress: bool | None, callback: Callback) -> torch.Tensor:
    values = _check_sigmas(sigmas)
    n = len(values) - 1
    for i in _steps(n, progress):
        sigma, sigma_next = values[i], values[i + 1]
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= sigma <= S_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * _noise(x, generator)
        denoised = denoiser(x, sigma_hat)
        if callback is not None:
            callback(i, sigma_hat, x, denoised)
        # x + (sigma_next - sigma_hat) d with d = (x - D) / sigma_hat, as one op
        x_next = torch.lerp(denoised, x, sigma_next / sigma_hat)
        if second_order and sigma_next > 0:
            # x + h (d + d') / 2 with h = sigma_next - sigma_hat, d's half folded into one lerp
            h = sigma_next - sigma_hat
            x_next = torch.lerp(denoised, x, 1 + h / (2 * sigma_hat)).add_(
                x_next - denoiser(x_next, sigma_next), alpha=h / (2 * sigma_next))
        x = x_next
    return x


def euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
          generator: torch.Generator | None = None, S_churn: float = 0.0, S_tmin: float = 0.0,
          S_tmax: float = math.inf, S_noise: float = 1.0, progress: bool | None = None,
          callback: Callback = None) -> torch.Tensor:
    """Euler steps of the probability-flow ODE (with churn: EDM Algorithm 2, first order).
    One network evaluation per step."""
    return _karras(denoiser, x, sigmas, False, generator, S_churn, S_tmin, S_tmax, S_noise,
                   progress, callback)


def heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
         generator: torch.Generator | None = None, S_churn: float = 0.0, S_tmin: float = 0.0,
         S_tmax: float = math.inf, S_noise: float = 1.0, progress: bool | None = None,
         callback: Callback = None) -> torch.Tensor:
    """Heun's second-order steps: EDM Algorithm 1 (deterministic) or, with S_churn > 0,
    Algorithm 2. 2N - 1 network evaluations for N steps ending at sigma = 0."""
    return _karras(denoiser, x, sigmas, True, generator, S_churn, S_tmin, S_tmax, S_noise,
                   progress, callback)


@torch.no_grad()
def ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 0.0,
         generator: torch.Generator | None = None, progress: bool | None = None,
         callback: Callback = None) -> torch.Tensor:
    """DDIM with stochasticity eta (0: deterministic, 1: DDPM's posterior variance). The
    sequence may also increase (eta = 0 only), which runs the ODE back towards noise."""
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
        sigma_up = eta * sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma
        # D + sqrt(sigma_next^2 - sigma_up^2) eps_hat with eps_hat = (x - D) / sigma, as one op
        x = torch.lerp(denoised, x, math.sqrt(sigma_next**2 - sigma_up**2) / sigma)
        if sigma_up > 0:
            x = torch.add(x, _noise(x, generator), alpha=sigma_up)
    return x


@torch.no_grad()
def ddpm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
         variance: Literal["posterior", "beta"] = "posterior",
         generator: torch.Generator | None = None, progress: bool | None = None,
         callback: Callback = None) -> torch.Tensor:
    """DDPM's ancestral sampler on a VP model's sigmas (the posterior mean, then noise of the
    posterior variance beta_tilde_t or of the forward variance beta_t)."""
    values = _check_sigmas(sigmas)
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    for i in _steps(len(values) - 1, progress):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoiser(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        x = torch.lerp(denoised, x, (sigma_next / sigma) ** 2)
        if sigma_next > 0:
            gap = sigma**2 - sigma_next**2
            var = (sigma_next**2 * gap / sigma**2 if variance == "posterior"
                   else gap * (1 + sigma_next**2) / (1 + sigma**2))
            x = torch.add(x, _noise(x, generator), alpha=math.sqrt(var))
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm, "ddim": ddim, "euler": euler, "heun": heun}


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
        return lambda x: (x - denoiser(x, sigma)) / sigma

    x, delta = x0, torch.zeros(len(x0), dtype=x0.dtype, device=x0.device)
    for i in _steps(len(values) - 1, progress):
        sigma, sigma_next = values[i], values[i + 1]
        h = sigma_next - sigma
        d, div = divergence(drift(sigma), x, trace, probes, generator)
        x_euler = x + h * d
        d_next, div_next = divergence(drift(sigma_next), x_euler, trace, probes, generator)
        x = x + h * (d + d_next) / 2
        delta = delta + h * (div + div_next) / 2
    dims = x0[0].numel()
    prior = (-0.5 * (x / prior_std).flatten(1).pow(2).sum(1)
             - dims * (math.log(prior_std) + 0.5 * math.log(2 * math.pi)))
    return prior + delta
