"""The unified diffusion framework against closed forms: schedules, conversions, preconditioning,
losses of the optimal model, samplers' convergence orders, DDIM inversion and exact likelihood.

Most checks use Gaussian data x_0 ~ N(mu, s^2 I), whose optimal denoiser is known exactly:
D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and whose probability-flow ODE has the
solution x(sigma) = mu + (x(sigma_0) - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)).
"""

import math

import pytest
import torch

from mlatlas.generative.diffusion import edm, samplers
from mlatlas.generative.diffusion.ddpm import Schedule, ancestral_sample, cosine_betas
from mlatlas.generative.diffusion.formulations import VP, Preconditioned
from mlatlas.generative.diffusion.parameterization import (
    PREDICTIONS,
    convert,
    from_x0_eps,
    to_x0_eps,
)
from mlatlas.generative.flow_matching.flow_matching import FlowMatching

MU, S = 0.7, 0.5


@pytest.fixture(autouse=True, scope="module")
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def gaussian_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_flow(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    return MU + (x - MU) * math.sqrt((S**2 + sigma_to**2) / (S**2 + sigma_from**2))


# --- schedules ---------------------------------------------------------------------------------

def test_cosine_schedule_follows_its_alpha_bar():
    s = Schedule(cosine_betas(1000))
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):  # below the 0.999 cap the product telescopes to f(t+1)/f(0)
        assert s.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert s.betas.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("schedule", [Schedule.linear(), Schedule.cosine()])
def test_vp_sigmas_and_fractional_steps(schedule):
    ab = schedule.alpha_bar
    assert torch.allclose(schedule.sigmas, ((1 - ab) / ab).sqrt())
    # x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps is s (x_0 + sigma eps) with s = 1/sqrt(1 + sigma^2)
    assert torch.allclose(1 / (1 + schedule.sigmas**2), ab)
    t = torch.tensor([0.0, 0.3, 1.0, 17.25, 500.5, 998.9, 999.0])
    back = [schedule.sigma_to_t(sigma) for sigma in schedule.t_to_sigma(t).tolist()]
    assert torch.allclose(torch.tensor(back), t, atol=1e-9)
    assert schedule.sigma_to_t(1e-9) == 0 and schedule.sigma_to_t(1e9) == 999
    steps = torch.arange(1000.0)
    assert torch.allclose(schedule.t_to_sigma(steps), schedule.sigmas, rtol=1e-12)


def test_karras_sigmas_eq5():
    sigmas = edm.karras_sigmas(18)
    assert len(sigmas) == 19 and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(80) and sigmas[-2].item() == pytest.approx(0.002)
    assert (sigmas.diff() < 0).all()
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert sigmas[i].item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="sigma_min"):
        edm.karras_sigmas(5, sigma_min=1, sigma_max=0.5)


def test_edm_preconditioning_identities():
    sigma = torch.logspace(-3, 2, 50)
    c_skip, c_out, c_in, c_noise = edm.edm_preconditioning(sigma, 0.5)
    assert torch.allclose(c_in**2 * (sigma**2 + 0.25), torch.ones(50))  # unit-variance input
    assert torch.allclose(c_out**2, 0.25 * (1 - c_skip))
    assert torch.allclose(edm.edm_loss_weight(sigma, 0.5), 1 / c_out**2)
    assert torch.allclose(c_noise, sigma.log() / 4)


def test_edm_training_target_has_unit_variance():
    """F's effective target (x_0 - c_skip x) / c_out has unit variance at every sigma when the
    data's variance is sigma_data^2, the design goal of the preconditioning."""
    gen = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(200_000, generator=gen)
    for sigma in (0.01, 0.5, 3.0, 80.0):
        c_skip, c_out, _, _ = edm.edm_preconditioning(torch.tensor(sigma))
        x = x0 + sigma * torch.randn(200_000, generator=gen)
        assert ((x0 - c_skip * x) / c_out).var().item() == pytest.approx(1, abs=0.02)


def test_training_sigma_distributions():
    gen = torch.Generator().manual_seed(0)
    log_sigma = edm.log_normal_sigmas(100_000, gen).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.02)
    u = edm.log_uniform_sigmas(100_000, 0.02, 100, gen)
    assert u.min() >= 0.02 and u.max() <= 100
    assert u.log().mean().item() == pytest.approx((math.log(0.02) + math.log(100)) / 2, abs=0.03)


# --- conversions -------------------------------------------------------------------------------

@pytest.mark.parametrize("source", PREDICTIONS)
@pytest.mark.parametrize("target", PREDICTIONS)
def test_conversions_round_trip(source, target):
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    alpha, sigma = torch.rand(6, 1, generator=gen) + 0.1, torch.rand(6, 1, generator=gen) + 0.1
    d_alpha, d_sigma = -torch.rand(6, 1, generator=gen), torch.rand(6, 1, generator=gen) + 0.1
    x_t = alpha * x0 + sigma * eps
    pred = from_x0_eps(x0, eps, source, alpha, sigma, d_alpha, d_sigma)
    back = convert(convert(pred, source, target, x_t, alpha, sigma, d_alpha, d_sigma),
                   target, source, x_t, alpha, sigma, d_alpha, d_sigma)
    assert torch.allclose(back, pred, atol=1e-10)
    x0_back, eps_back = to_x0_eps(pred, source, x_t, alpha, sigma, d_alpha, d_sigma)
    assert torch.allclose(x0_back, x0, atol=1e-10) and torch.allclose(eps_back, eps, atol=1e-10)


def test_known_special_cases():
    x0, eps = torch.randn(4, 2), torch.randn(4, 2)
    t = 0.3  # flow matching: alpha = 1 - t, sigma = t, their derivatives -1 and 1
    x_t = (1 - t) * x0 + t * eps
    velocity = from_x0_eps(x0, eps, "velocity", 1 - t, t, -1.0, 1.0)
    assert torch.allclose(velocity, eps - x0)
    ab = 0.36  # VP: v = sqrt(ab) eps - sqrt(1 - ab) x_0 and the score is -eps / sqrt(1 - ab)
    assert torch.allclose(from_x0_eps(x0, eps, "v", 0.6, 0.8), 0.6 * eps - 0.8 * x0)
    assert torch.allclose(convert(eps, "eps", "score", x_t, 0.6, 0.8), -eps / 0.8)
    assert ab == pytest.approx(0.6**2)
    with pytest.raises(ValueError, match="unknown prediction"):
        convert(eps, "noise", "x0", x_t, 0.6, 0.8)
    with pytest.raises(ValueError, match="derivatives"):
        to_x0_eps(eps, "velocity", x_t, 0.6, 0.8)


# --- every formulation wraps the optimal network into the optimal denoiser ----------------------

def exact_network(formulation, prediction="eps"):
    """The network whose denoiser is the exact Gaussian D, written in the formulation's own
    inputs: a VP step index, EDM/VE's c_noise, or flow matching's t."""
    def vp_net(x_t, t, y=None):
        sigma = formulation.schedule.t_to_sigma(t)[:, None]
        scale = 1 / (1 + sigma**2).sqrt()
        x0 = gaussian_denoiser(x_t / scale, sigma)
        eps = (x_t / scale - x0) / sigma
        return from_x0_eps(x0, eps, prediction, scale, sigma * scale)

    def preconditioned_net(x_in, c_noise, y=None):
        sigma = (c_noise * 4).exp()[:, None] if formulation.kind == "edm" else \
            (c_noise.exp() * 2)[:, None]
        c_skip, c_out, c_in, _ = formulation.coefficients(sigma)
        x = x_in / c_in
        return (gaussian_denoiser(x, sigma) - c_skip * x) / c_out

    def fm_net(x_t, t, y=None):
        t = t[:, None]
        sigma = t / (1 - t)
        x0 = gaussian_denoiser(x_t / (1 - t), sigma)
        return (x_t - x0) / t  # eps - x_0, since x_t = x_0 + t (eps - x_0)

    if isinstance(formulation, VP):
        return vp_net
    return preconditioned_net if isinstance(formulation, Preconditioned) else fm_net


FORMULATIONS = {
    "vp-eps": (VP(Schedule.linear(), "eps"), "eps"),
    "vp-x0": (VP(Schedule.linear(), "x0"), "x0"),
    "vp-v": (VP(Schedule.cosine(), "v"), "v"),
    "edm": (Preconditioned("edm", 0.002, 80), None),
    "ve": (Preconditioned("ve", 0.02, 100), None),
    "flow_matching": (FlowMatching(), None),
}


@pytest.mark.parametrize("name", FORMULATIONS)
def test_denoiser_wraps_the_exact_network_exactly(name):
    formulation, prediction = FORMULATIONS[name]
    denoiser = formulation.denoiser(exact_network(formulation, prediction))
    x = torch.randn(5, 2) * 3
    for sigma in (0.05, 0.7, 4.0):
        assert torch.allclose(denoiser(x, sigma), gaussian_denoiser(x, sigma), atol=1e-9), sigma


def test_edm_loss_of_the_optimal_denoiser_is_one():
    """With data N(0, sigma_data^2), lambda(sigma) E||D* - x_0||^2 = 1 per dimension at every
    sigma, so the loss of the optimal network is 1 whatever sigma training draws."""
    global MU, S
    old, (MU, S) = (MU, S), (0.0, 0.5)
    try:
        formulation = Preconditioned("edm", 0.002, 80)
        net = exact_network(formulation)
        x0 = 0.5 * torch.randn(100_000, 1, generator=torch.Generator().manual_seed(0))
        loss = formulation.loss(net, x0, None, torch.Generator().manual_seed(1))
        assert loss.item() == pytest.approx(1.0, abs=0.02)
    finally:
        MU, S = old


def test_vp_loss_of_the_optimal_network_is_the_posterior_variance():
    """E||eps - E[eps | x_t]||^2 = alpha_bar s^2 / (alpha_bar s^2 + 1 - alpha_bar) per dimension
    for centred data N(0, s^2), averaged over the uniform t of L_simple."""
    global MU
    old, MU = MU, 0.0
    try:
        formulation = VP(Schedule.linear(), "eps")
        x0 = S * torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0))
        loss = formulation.loss(exact_network(formulation), x0, None,
                                torch.Generator().manual_seed(1))
        ab = formulation.schedule.alpha_bar
        expected = (ab * S**2 / (ab * S**2 + 1 - ab)).mean().item()
        assert loss.item() == pytest.approx(expected, rel=0.02)
    finally:
        MU = old


def test_flow_matching_loss_of_the_optimal_velocity():
    """The residual of the optimal velocity is Var(eps - x_0 | x_t) = 1 + s^2 - (t - (1 - t)
    s^2)^2 / ((1 - t)^2 s^2 + t^2) per dimension for data N(0, s^2), averaged over t."""
    global MU
    old, MU = MU, 0.0
    try:
        formulation = FlowMatching()
        x0 = S * torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0))
        loss = formulation.loss(exact_network(formulation), x0, None,
                                torch.Generator().manual_seed(1))
        t = (torch.arange(100_000) + 0.5) / 100_000
        residual = 1 + S**2 - (t - (1 - t) * S**2) ** 2 / ((1 - t) ** 2 * S**2 + t**2)
        assert loss.item() == pytest.approx(residual.mean().item(), rel=0.02)
    finally:
        MU = old


# --- samplers ----------------------------------------------------------------------------------

def ode_error(sampler, n: int) -> float:
    sigmas = edm.karras_sigmas(n, 0.1, 10.0)[:-1]  # stop at sigma_min: no final Euler step
    x = torch.linspace(-30, 30, 41)[:, None]
    out = sampler(gaussian_denoiser, x, sigmas, progress=False)
    return (out - exact_flow(x, 10.0, 0.1)).abs().max().item()


def test_euler_is_first_order_and_heun_second_order():
    euler = [ode_error(samplers.euler, n) for n in (16, 32, 64)]
    heun = [ode_error(samplers.heun, n) for n in (16, 32, 64)]
    for coarse, fine in zip(euler, euler[1:], strict=False):
        assert 1.8 < coarse / fine < 2.2
    for coarse, fine in zip(heun, heun[1:], strict=False):
        assert 3.5 < coarse / fine < 4.5
    assert heun[0] < euler[-1]


def test_heun_takes_algorithm_2s_steps_as_written():
    """Two Heun steps by hand in Karras et al.'s notation (the last to sigma = 0 is Euler's)
    equal the sampler bit for bit, and a flow's Velocity steps its times the same way."""
    sigmas = torch.tensor([3.0, 0.8, 0.0])
    x = torch.randn(16, 2) * 3
    want = x
    for i in range(2):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (want - gaussian_denoiser(want, sigma)) / sigma
        dt = sigma_next - sigma
        x_next = want + d * dt
        if sigma_next > 0:
            d_prime = (x_next - gaussian_denoiser(x_next, sigma_next)) / sigma_next
            x_next = want + (d + d_prime) / 2 * dt
        want = x_next
    assert torch.equal(samplers.heun(gaussian_denoiser, x, sigmas, progress=False), want)

    def v(x, t):
        return torch.sin(3 * x) + t

    ts, x_t = torch.tensor([1.0, 0.6, 0.25, 0.0]), torch.randn(16, 2)
    euler, heun = x_t, x_t
    for i in range(3):
        t, t_next = float(ts[i]), float(ts[i + 1])
        dt = t_next - t
        euler = euler + v(euler, t) * dt
        d = v(heun, t)
        x_next = heun + d * dt
        heun = heun + (d + v(x_next, t_next)) / 2 * dt if t_next > 0 else x_next
    assert torch.equal(samplers.euler(samplers.Velocity(v), x_t, ts, progress=False), euler)
    assert torch.equal(samplers.heun(samplers.Velocity(v), x_t, ts, progress=False), heun)


def test_a_velocity_takes_only_the_ode_samplers():
    flow, x, ts = samplers.Velocity(lambda x, t: x), torch.randn(4, 2), torch.tensor([1.0, 0.0])
    for sampler in (samplers.ddim, samplers.ddpm):
        with pytest.raises(ValueError, match="needs a denoiser"):
            sampler(flow, x, ts)
    with pytest.raises(ValueError, match="churn"):
        samplers.heun(flow, x, ts, S_churn=1.0)
    with pytest.raises(ValueError, match=r"times must lie in \[0, 1\]"):
        samplers.euler(flow, x, torch.tensor([2.0, 0.0]))
    seen = []
    samplers.euler(flow, x, ts, callback=lambda i, t, x_i, x0: seen.append((t, x0)))
    assert seen[0][0] == 1.0 and torch.equal(seen[0][1], x - 1.0 * x)  # D = x - t v


def test_ddim_eta0_is_euler_and_deterministic():
    sigmas = edm.karras_sigmas(20, 0.01, 20.0)
    x = torch.randn(64, 2) * 20
    a = samplers.ddim(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(0),
                      progress=False)
    b = samplers.ddim(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1),
                      progress=False)
    c = samplers.euler(gaussian_denoiser, x, sigmas, progress=False)
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-12)


def test_ddim_inversion_returns_to_the_starting_noise():
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 10
    errors = []  # relative to the noise's scale; first order: 4x the steps, 1/4 the error
    for n in (50, 200, 800):
        sigmas = edm.karras_sigmas(n, 0.05, 10.0)[:-1]
        data = samplers.ddim(gaussian_denoiser, x_T, sigmas, progress=False)
        back = samplers.ddim(gaussian_denoiser, data, sigmas.flip(0), progress=False)
        errors.append(((back - x_T).abs().max() / x_T.abs().max()).item())
    assert errors[-1] < 0.005
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 3.5 < coarse / fine < 4.5
    with pytest.raises(ValueError, match="eta = 0"):
        samplers.ddim(gaussian_denoiser, x_T, sigmas.flip(0), eta=0.5)


def test_ddim_eta1_is_ddpm_with_the_posterior_variance():
    s = Schedule.linear()
    sigmas = VP(s).sigmas(1000, "ddpm")
    x = torch.randn(32, 2) * float(sigmas[0])
    ddim = samplers.ddim(gaussian_denoiser, x, sigmas, eta=1.0,
                         generator=torch.Generator().manual_seed(3), progress=False)
    ddpm = samplers.ddpm(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3),
                         progress=False)
    assert torch.allclose(ddim, ddpm, atol=1e-10)
    # One step's noise: std = sqrt(beta_tilde_t / alpha_bar_{t-1}) in x = x_t / s_{t-1}.
    i = 500
    pair = torch.tensor([s.sigmas[i], s.sigmas[i - 1], 0.0])
    zeros = torch.zeros(200_000, 1)
    noisy = samplers.ddim(lambda x, sigma: torch.zeros_like(x), zeros, pair[:2], eta=1.0,
                          generator=torch.Generator().manual_seed(0), progress=False)
    expected = (s.beta_tilde[i] / s.alpha_bar_prev[i]).sqrt().item()
    assert noisy.std().item() == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_sigma_space_ddpm_equals_the_papers_algorithm(variance):
    """samplers.ddpm through the VP wrapper takes exactly the steps of Ho et al.'s Algorithm 2
    (ddpm.ancestral_sample, written on x_t) from the same noise."""
    s = Schedule.linear(T=100, beta_1=1e-3, beta_T=0.1)
    formulation = VP(s, "eps")
    net = exact_network(formulation)
    gen = torch.Generator().manual_seed(0)
    paper = ancestral_sample(lambda x, t: net(x, t), (16, 2), s, gen, variance, progress=False)
    ours = formulation.sample(net, (16, 2), "ddpm", s.T, torch.Generator().manual_seed(0),
                              torch.device("cpu"), variance=variance)
    assert torch.allclose(ours, paper, atol=1e-9)


def test_heun_costs_2n_minus_1_evaluations_and_churn_adds_noise():
    calls = []

    def counting(x, sigma):
        calls.append(sigma)
        return gaussian_denoiser(x, sigma)

    sigmas = edm.karras_sigmas(18)
    x = torch.randn(8, 2) * 80
    deterministic = samplers.heun(counting, x, sigmas, progress=False)
    assert len(calls) == samplers.function_evaluations("heun", 18) == 35
    churned = [samplers.heun(gaussian_denoiser, x, sigmas, S_churn=40, progress=False,
                             generator=torch.Generator().manual_seed(k)) for k in (0, 1)]
    assert not torch.allclose(churned[0], churned[1])
    # Churn re-noises, yet still samples the data: the spread of 4,000 samples matches s (at
    # 64 steps; 18 steps at the maximal churn overshoot it by 12%).
    x = torch.randn(4000, 1, generator=torch.Generator().manual_seed(2)) * 80
    out = samplers.heun(gaussian_denoiser, x, edm.karras_sigmas(64), S_churn=20, progress=False,
                        generator=torch.Generator().manual_seed(3))
    assert out.std().item() == pytest.approx(S, rel=0.04)
    assert out.mean().item() == pytest.approx(MU, abs=0.03)
    assert torch.isfinite(deterministic).all()


def test_flow_matching_euler_equals_ddim_in_sigma():
    """An Euler step in t on x_t = (1 - t) x_0 + t eps is an Euler step in sigma = t / (1 - t) on
    x = x_t / (1 - t), for any velocity field."""
    formulation = FlowMatching()
    net = exact_network(formulation)
    ts = torch.tensor([0.95, 0.7, 0.4, 0.1])
    x_t = torch.randn(16, 2)
    ours = samplers.euler(samplers.Velocity(formulation.velocity(net)), x_t, ts, progress=False)
    sigmas = ts / (1 - ts)
    via_sigma = samplers.euler(formulation.denoiser(net), x_t / (1 - ts[0]), sigmas,
                               progress=False) * (1 - ts[-1])
    assert torch.allclose(ours, via_sigma, atol=1e-10)


def test_samplers_reject_bad_sigmas():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="at least two"):
        samplers.heun(gaussian_denoiser, x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        samplers.euler(gaussian_denoiser, x, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="sigma = 0"):
        samplers.ddim(gaussian_denoiser, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="variance"):
        samplers.ddpm(gaussian_denoiser, x, torch.tensor([1.0, 0.0]), variance="big")


# --- likelihood --------------------------------------------------------------------------------

def test_exact_likelihood_of_gaussian_data():
    """Centred data N(0, s^2 I): at sigma_max the ODE's marginal is exactly the prior
    N(0, (s^2 + sigma_max^2) I), and at sigma_min it is N(0, (s^2 + sigma_min^2) I). The adaptive
    integrator meets 1e-3 nats at its default tolerances (measured 2.9e-4 in 134 evaluations;
    the fixed 64 Heun steps it replaced, 126 evaluations, were 0.073 off), and its error and
    evaluations trade off with the tolerance (measured 0.18, 3.3e-3, 2.9e-4, 1.2e-5 nats in 68,
    98, 134, 194 evaluations at 1e-3 ... 1e-6)."""
    sigma_min, sigma_max = 1e-3, 50.0

    def denoiser(x, sigma):
        return S**2 / (S**2 + sigma**2) * x

    x0 = torch.tensor([[0.7, 0.7], [1.5, -0.2], [-1.0, 2.0]])
    prior_std = math.sqrt(S**2 + sigma_max**2)
    var = S**2 + sigma_min**2
    exact = -x0.pow(2).sum(1) / (2 * var) - math.log(2 * math.pi * var)
    ours = samplers.log_likelihood(denoiser, x0, sigma_min, sigma_max, prior_std)
    assert (ours.log_p - exact).abs().max() < 1e-3
    runs = [samplers.log_likelihood(denoiser, x0, sigma_min, sigma_max, prior_std, rtol=tol,
                                    atol=tol) for tol in (1e-3, 1e-4, 1e-5, 1e-6)]
    errors = [(run.log_p - exact).abs().max().item() for run in runs]
    nfe = [run.nfe for run in runs]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 3e-5, errors
    assert nfe == sorted(nfe) and len(set(nfe)) == 4, nfe
    # Hutchinson's z^T J z is exact for Rademacher z when J is a multiple of I, as here; the
    # test then checks the estimator's plumbing (a mixing Jacobian: tests/test_likelihood.py).
    hutchinson = samplers.log_likelihood(denoiser, x0, sigma_min, sigma_max, prior_std,
                                         trace="hutchinson",
                                         generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hutchinson.log_p, ours.log_p, atol=1e-10)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        samplers.log_likelihood(denoiser, x0, sigma_max, sigma_min, prior_std=1.0)
    with pytest.raises(ValueError, match="trace"):
        samplers.log_likelihood(denoiser, x0, sigma_min, sigma_max, 1.0, trace="approximate")


def test_divergence_exact_and_hutchinson():
    A = torch.tensor([[1.0, 2.0, 0.0], [-3.0, 0.5, 1.0], [0.0, 4.0, -2.0]])
    x = torch.randn(4, 3)
    out, div = samplers.divergence(lambda v: torch.tanh(v @ A.T), x)
    jac = torch.func.vmap(torch.func.jacrev(lambda v: torch.tanh(v @ A.T)))(x)
    assert torch.allclose(div, jac.diagonal(dim1=1, dim2=2).sum(1))
    z = samplers.rademacher(x.shape, 4000, torch.Generator().manual_seed(0))
    assert z.shape == (4000, 4, 3) and set(z.unique().tolist()) == {-1, 1}
    _, estimate = samplers.divergence(lambda v: torch.tanh(v @ A.T), x, z)
    assert torch.allclose(estimate, div, atol=0.25)
