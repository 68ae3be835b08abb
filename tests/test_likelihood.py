"""The adaptive integrator behind the probability-flow likelihood (``samplers.dopri5``): the
Dormand-Prince tableau's order conditions and stability polynomial, a batch of linear ODEs solved
to the tolerance in either direction, evaluations that grow as the tolerance shrinks, the cap on
evaluations, and the exact log-density of a correlated Gaussian by the exact and the Hutchinson
trace (its probes fixed for the whole solve)."""

import math

import pytest
import torch

from mlatlas.generative.diffusion import samplers
from mlatlas.generative.diffusion.samplers import DOPRI_A, DOPRI_B, DOPRI_C, DOPRI_E

F64 = torch.float64


def test_tableau_order_conditions():
    """Row sums of a are the nodes; b meets the order-5 quadrature conditions sum b c^(k-1) = 1/k
    (k <= 5) and the tree conditions of orders 3 and 4; b_hat = b - e (seven stages, c_7 = 1)
    meets them to order 4 only, so e measures the fourth-order error."""
    for c, row in zip(DOPRI_C, DOPRI_A, strict=True):
        assert sum(row) == pytest.approx(c, abs=1e-14)
    c7, b7 = (*DOPRI_C, 1.0), (*DOPRI_B, 0.0)
    b_hat = [b - e for b, e in zip(b7, DOPRI_E, strict=True)]
    for k in range(1, 6):
        assert sum(b * c ** (k - 1) for b, c in zip(b7, c7, strict=True)) == pytest.approx(1 / k)
    for k in range(1, 5):
        assert sum(b * c ** (k - 1) for b, c in zip(b_hat, c7, strict=True)) == pytest.approx(1 / k)
    assert abs(sum(b * c**4 for b, c in zip(b_hat, c7, strict=True)) - 1 / 5) > 1e-4

    def tree(weights, inner):  # sum_i w_i sum_j a_ij inner(c_j)
        return sum(w * sum(a * inner(DOPRI_C[j]) for j, a in enumerate(row))
                   for w, row in zip(weights, DOPRI_A, strict=False))

    assert tree(DOPRI_B, lambda c: c) == pytest.approx(1 / 6)
    assert tree(DOPRI_B, lambda c: c**2) == pytest.approx(1 / 12)
    assert tree([b * c for b, c in zip(DOPRI_B, DOPRI_C, strict=True)],
                lambda c: c) == pytest.approx(1 / 8)


def test_step_on_exponential_growth():
    """On y' = y one step is the stability polynomial sum_{k<=5} h^k / k! + h^6 / 600
    (Hairer et al. II.5), and the error estimate falls as h^5 (measured ratio 31.4 per halving)."""
    y = torch.ones(1, 1, dtype=F64)
    errors = []
    for h in (0.1, 0.05):
        y_new, k7, error = samplers.dopri_step(lambda t, v: v, 0.0, y, h, y)
        polynomial = sum(h**k / math.factorial(k) for k in range(6)) + h**6 / 600
        assert y_new.item() == pytest.approx(polynomial, abs=1e-15)
        assert torch.equal(k7, y_new)  # f at the new point: the next step's first stage
        errors.append(error.abs().item())
    assert errors[0] / errors[1] == pytest.approx(32, rel=0.05)


def test_linear_odes_to_their_tolerance_in_both_directions():
    """dy/dt = lambda y for lambda = -2, -0.5, 1 in one batch, from 0 to 2 and back: the global
    error stays within 10 (atol + rtol |y|) (measured at most 0.21 forward and 5.2 backward,
    where the errors grow), and the evaluations grow as the tolerance shrinks, about as
    tol^(-1/5) for a fifth-order method (measured 44, 86, 188, 440 at 1e-4 ... 1e-10)."""
    lam = torch.tensor([[-2.0], [-0.5], [1.0]], dtype=F64)
    end = torch.exp(2 * lam)

    def f(t, y):
        return lam * y

    nfe = []
    for tol in (1e-4, 1e-6, 1e-8, 1e-10):
        forward = samplers.dopri5(f, 0.0, 2.0, torch.ones(3, 1, dtype=F64), rtol=tol, atol=tol)
        backward = samplers.dopri5(f, 2.0, 0.0, end, rtol=tol, atol=tol)
        assert ((forward.y - end).abs() <= 10 * (tol + tol * end)).all()
        assert ((backward.y - 1).abs() <= 10 * (2 * tol)).all()
        assert forward.rejected == 0 and forward.nfe == 2 + 6 * forward.accepted
        nfe.append(forward.nfe)
    assert nfe == sorted(nfe) and nfe[-1] > 5 * nfe[0], nfe
    with pytest.raises(ValueError, match="interval"):
        samplers.dopri5(f, 1.0, 1.0, end)


def test_evaluation_cap_raises_a_clear_error():
    """Too few evaluations for the tolerance, or a NaN that makes every step fail, end in a
    RuntimeError that says where the solver stopped, not in a hang."""
    y0 = torch.ones(2, 1, dtype=F64)
    with pytest.raises(RuntimeError, match=r"after \d+ function evaluations.*max_nfe = 30"):
        samplers.dopri5(lambda t, y: math.cos(50 * t) * y, 0.0, 10.0, y0, max_nfe=30)
    with pytest.raises(RuntimeError, match="loosen rtol"):
        samplers.dopri5(lambda t, y: y * math.nan, 0.0, 1.0, y0, max_nfe=200)


def test_correlated_gaussian_log_density():
    """Data N(0, C) with C correlated: D(x; sigma) = C (C + sigma^2 I)^{-1} x, and the marginal at
    sigma_min is N(0, C + sigma_min^2 I). With sigma_max = 1000 the isotropic prior is off by
    under 1e-6 nats. The exact trace meets 1e-3 nats (measured 3.5e-4 in 176 evaluations).
    Hutchinson's estimate, one probe per example fixed for the solve, averages to it over 400
    copies of a point (measured: off by 0.006, spread 1.22), and with fixed probes the integrand
    stays a smooth ODE: the solver takes the same 176 evaluations as with the exact trace."""
    C = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)
    sigma_min, sigma_max = 1e-3, 1000.0
    eye = torch.eye(2, dtype=F64)

    def denoiser(x, sigma):
        return x @ torch.linalg.solve(C + sigma**2 * eye, C)  # C (C + sigma^2 I)^{-1}, symmetric

    prior_std = math.sqrt(sigma_max**2 + C.trace().item() / 2)
    x0 = torch.tensor([[0.7, 0.7], [1.5, -0.2], [-1.0, 1.0]], dtype=F64)
    exact = torch.distributions.MultivariateNormal(
        torch.zeros(2, dtype=F64), C + sigma_min**2 * eye).log_prob(x0)
    ours = samplers.log_likelihood(denoiser, x0, sigma_min, sigma_max, prior_std)
    assert (ours.log_p - exact).abs().max() < 1e-3, ours.log_p - exact
    copies = x0[:1].expand(400, 2)
    hutchinson = samplers.log_likelihood(denoiser, copies, sigma_min, sigma_max, prior_std,
                                         trace="hutchinson",
                                         generator=torch.Generator().manual_seed(0))
    spread = hutchinson.log_p.std().item()
    assert spread > 0.1  # the probes matter: C mixes the coordinates
    assert abs(hutchinson.log_p.mean().item() - exact[0].item()) < 4 * spread / 20
    assert hutchinson.nfe <= 1.5 * ours.nfe, (hutchinson.nfe, ours.nfe)
