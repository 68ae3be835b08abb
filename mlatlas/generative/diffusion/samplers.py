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
E_z[z^T (d d / dx) z], z Rademacher, its probes drawn once per call so that the integrand stays
one smooth ODE. In u = ln sigma the augmented state y = [x, delta] follows

    dx/du = x - D(x; sigma),    d delta/du = div_x (x - D(x; sigma)),    sigma = e^u,

which spreads the five decades of sigma evenly. ``dopri5`` integrates it with the embedded
Runge-Kutta pair of Dormand & Prince (1980), fifth order with a fourth-order error estimate
e = h sum_i (b_i - b_hat_i) k_i, at Song et al.'s tolerances rtol = atol = 1e-5 by default: a
step of size h is accepted when

    err = max_b RMS_i(e_bi / (atol + rtol max(|y_bi|, |y_new,bi|))) <= 1

(the worst example of the batch, which shares one step size), and the next step is
h min(10, max(0.2, 0.9 err^(-1/5))) (Hairer, Norsett & Wanner, Solving ODEs I, II.4). Seven
stages, the last reused as the next step's first, make six evaluations a step; a cap on the
evaluations turns a tolerance the model cannot meet into an error instead of a hang.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

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


# --- exact likelihood ----------------------------------------------------------------------------

# Dormand & Prince's RK5(4)7M (Hairer, Norsett & Wanner, Solving ODEs I, Table II.5.2; scipy's
# RK45): nodes c, stage weights a, the fifth-order weights b and e = b - b_hat over all seven
# stages, the seventh being f at the new point, which is the next step's first (FSAL).
DOPRI_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
DOPRI_A = ((),
           (1 / 5,),
           (3 / 40, 9 / 40),
           (44 / 45, -56 / 15, 32 / 9),
           (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
           (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
DOPRI_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
DOPRI_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
# The step-size controller of Hairer et al. (II.4) with scipy's constants.
SAFETY, MIN_FACTOR, MAX_FACTOR, ERROR_ORDER = 0.9, 0.2, 10.0, 4
# Song et al. 2021 (Appendix D.2) ran scipy's RK45 at these tolerances.
RTOL = ATOL = 1e-5
# Several times what the 2D models need at 1e-6 (a VP model's kinked t(sigma): 2,822).
MAX_NFE = 20_000

# f(t, y) -> dy/dt for a batch y of shape (B, ...): B systems that share one step size.
ODE = Callable[[float, torch.Tensor], torch.Tensor]


@dataclass
class Solution:
    """y(t1), the function evaluations it took and the steps accepted and rejected."""

    y: torch.Tensor
    nfe: int
    accepted: int
    rejected: int


def worst_row_rms(v: torch.Tensor) -> float:
    """max_b sqrt(mean_i v_bi^2): each row's RMS norm, then the largest, so a step shared by the
    batch is only as large as its hardest example allows (the RMS over the whole batch would let
    one example's error hide among the others')."""
    return float(v.flatten(1).pow(2).mean(1).sqrt().max())


def error_norm(error: torch.Tensor, y: torch.Tensor, y_new: torch.Tensor, rtol: float,
               atol: float) -> float:
    """||e / (atol + rtol max(|y|, |y_new|))||, the local error against the tolerance: a step is
    accepted when this is at most 1."""
    return worst_row_rms(error / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))


def step_factor(err: float, after_rejection: bool) -> float:
    """h_new / h = 0.9 err^(-1/5) within [0.2, 10], and at most 1 right after a rejection (an
    error that has just proved too large should not be risked again). A non-finite error, an
    overflow of too long a step, takes the smallest factor."""
    if not math.isfinite(err):
        return MIN_FACTOR
    factor = MAX_FACTOR if err == 0 else SAFETY * err ** (-1 / (ERROR_ORDER + 1))
    return max(MIN_FACTOR, min(1.0 if after_rejection else MAX_FACTOR, factor))


def initial_step(f: ODE, t0: float, y0: torch.Tensor, f0: torch.Tensor, t1: float,
                 rtol: float, atol: float) -> float:
    """Hairer et al.'s starting step (II.4; scipy's ``select_initial_step``) towards t1, from the
    sizes of y0, f0 and one more evaluation of f: h = min(100 h0, (0.01 / max(d1, d2))^(1/5)),
    and never past t1 (a nearly constant f would otherwise ask for a step beyond the interval)."""
    direction, length = math.copysign(1.0, t1 - t0), abs(t1 - t0)
    scale = atol + rtol * y0.abs()
    d0, d1 = worst_row_rms(y0 / scale), worst_row_rms(f0 / scale)
    h0 = min(length, 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1)
    f1 = f(t0 + direction * h0, y0 + direction * h0 * f0)
    d2 = worst_row_rms((f1 - f0) / scale) / h0
    h1 = (max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15
          else (0.01 / max(d1, d2)) ** (1 / (ERROR_ORDER + 1)))
    return min(100 * h0, h1, length)


def dopri_step(f: ODE, t: float, y: torch.Tensor, h: float,
               k1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Dormand-Prince step of size h from y(t), given k1 = f(t, y):

        k_i = f(t + c_i h, y + h sum_j a_ij k_j),    y_new = y + h sum_i b_i k_i,
        error = h sum_i e_i k_i  with k_7 = f(t + h, y_new)

    Returns (y_new, k_7, error); six new evaluations of f."""
    k = [k1]
    for c, a in zip(DOPRI_C[1:], DOPRI_A[1:], strict=True):
        k.append(f(t + c * h, y + h * sum(a_j * k_j for a_j, k_j in zip(a, k, strict=True))))
    y_new = y + h * sum(b * k_i for b, k_i in zip(DOPRI_B, k, strict=True))
    k.append(f(t + h, y_new))
    error = h * sum(e * k_i for e, k_i in zip(DOPRI_E, k, strict=True))
    return y_new, k[-1], error


def dopri5(f: ODE, t0: float, t1: float, y0: torch.Tensor, *, rtol: float = RTOL,
           atol: float = ATOL, max_nfe: int = MAX_NFE) -> Solution:
    """y(t1) of dy/dt = f(t, y), y(t0) = y0, by adaptive Dormand-Prince 5(4) steps (local
    extrapolation: the fifth-order solution goes on, the embedded fourth-order one measures the
    error). Raises RuntimeError rather than make more than ``max_nfe`` evaluations of f."""
    if t1 == t0:
        raise ValueError("the ODE needs an interval, got t0 = t1")
    direction = 1.0 if t1 > t0 else -1.0
    t, y, k1 = t0, y0, f(t0, y0)
    h, nfe = initial_step(f, t0, y0, k1, t1, rtol, atol), 2
    accepted = rejected = 0
    after_rejection = False
    while direction * (t1 - t) > 0:
        if nfe + 6 > max_nfe:
            raise RuntimeError(
                f"the ODE solver stopped at t = {t:.6g} of [{t0:.6g}, {t1:.6g}] after {nfe} "
                f"function evaluations ({accepted} steps accepted, {rejected} rejected, the last "
                f"of size {h:.3g}): loosen rtol = {rtol:g} and atol = {atol:g} or raise max_nfe "
                f"= {max_nfe}")
        last = h >= abs(t1 - t)
        h = min(h, abs(t1 - t))
        y_new, k7, error = dopri_step(f, t, y, direction * h, k1)
        nfe += 6
        err = error_norm(error, y, y_new, rtol, atol)
        ok = err <= 1  # False for a non-finite error too
        if ok:
            t = t1 if last else t + direction * h
            y, k1 = y_new, k7
            accepted += 1
        else:
            rejected += 1
        h *= step_factor(err, after_rejection)
        after_rejection = not ok
    return Solution(y, nfe, accepted, rejected)


def rademacher(shape: torch.Size, probes: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``probes`` vectors z of shape ``shape`` with entries +-1 at random, (probes, *shape); drawn
    on the CPU so that a seed gives the same probes on any device."""
    return torch.randint(0, 2, (probes, *shape), generator=generator) * 2 - 1


def divergence(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(x), div fn(x)) for a batch x of shape (B, ...): the exact trace of the Jacobian, one
    backward pass per dimension, or, given probes z of shape (P, B, ...), Hutchinson's estimate
    (1/P) sum_p z_p^T (d fn / dx) z_p, one backward pass per probe."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)

        if z is None:
            flat = out.flatten(1)
            div = sum(torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0]
                      .flatten(1)[:, i] for i in range(flat.shape[1]))
        else:
            div = sum((torch.autograd.grad((out * z_p).sum(), x, retain_graph=True)[0] * z_p)
                      .flatten(1).sum(1) for z_p in z.to(x)) / len(z)
    return out.detach(), div.detach()


def likelihood_ode(denoiser: Denoiser, shape: torch.Size, z: torch.Tensor | None = None) -> ODE:
    """The probability-flow ODE and its divergence in u = ln sigma, on the state y = [x, delta]
    flattened to (B, dims + 1):

        dx/du = sigma d = x - D(x; sigma),    d delta/du = div_x (x - D(x; sigma)),

    the divergence exact, or Hutchinson's with the probes z, the same at every evaluation so that
    the integrand stays a smooth function of u."""
    def f(u: float, y: torch.Tensor) -> torch.Tensor:
        sigma = math.exp(u)
        dx, div = divergence(lambda x: x - denoiser(x, sigma), y[:, :-1].reshape(shape), z)
        return torch.cat([dx.flatten(1), div[:, None]], 1)

    return f


def log_normal(x: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; 0, std^2 I) per example, (B,)."""
    dims = x[0].numel()
    return (-0.5 * (x / std).flatten(1).pow(2).sum(1)
            - dims * (math.log(std) + 0.5 * math.log(2 * math.pi)))


class Likelihood(NamedTuple):
    """log p(x0) per example in nats, (B,), and the function evaluations it took (each one a
    denoiser call and its divergence)."""

    log_p: torch.Tensor
    nfe: int


def log_likelihood(denoiser: Denoiser, x0: torch.Tensor, sigma_min: float, sigma_max: float,
                   prior_std: float, *, trace: Literal["exact", "hutchinson"] = "exact",
                   probes: int = 1, generator: torch.Generator | None = None,
                   rtol: float = RTOL, atol: float = ATOL, max_nfe: int = MAX_NFE) -> Likelihood:
    """log p(x0) by the probability-flow ODE from sigma_min up to sigma_max (``dopri5`` at the
    tolerances rtol and atol) and the prior N(0, prior_std^2 I) at the end. Hutchinson's trace
    draws its ``probes`` once, from ``generator``."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
    z = rademacher(x0.shape, probes, generator) if trace == "hutchinson" else None
    y0 = torch.cat([x0.flatten(1), x0.new_zeros(len(x0), 1)], 1)
    solution = dopri5(likelihood_ode(denoiser, x0.shape, z), math.log(sigma_min),
                      math.log(sigma_max), y0, rtol=rtol, atol=atol, max_nfe=max_nfe)
    x, delta = solution.y[:, :-1], solution.y[:, -1]
    return Likelihood(log_normal(x, prior_std) + delta, solution.nfe)
