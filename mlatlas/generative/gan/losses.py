r"""The adversarial objectives of GAN, WGAN and WGAN-GP as pure functions, and the theory they
rest on.

GAN (Goodfellow et al. 2014). The minimax game over a generator G and a discriminator D,

    min_G max_D V(D, G) = E_{x ~ p_data}[log D(x)] + E_{z ~ p_z}[log(1 - D(G(z)))].

For a fixed G the integrand p_data log D + p_g log(1 - D) is maximised pointwise by

    D*(x) = p_data(x) / (p_data(x) + p_g(x)),

and at D* the game's value is V(D*, G) = 2 JSD(p_data || p_g) - log 4, so the generator
minimises a Jensen-Shannon divergence, which is 0 only at p_g = p_data. With D = sigmoid(l) for
logits l, log D = -softplus(-l) and log(1 - D) = -softplus(l), so the discriminator's loss (the
negated objective, a binary cross-entropy with labels 1 for real and 0 for fake) is

    L_D = E[softplus(-l(x))] + E[softplus(l(G(z)))],

and the generator's loss is the minimax one, L_G = E[log(1 - D(G(z)))] = -E[softplus(l(G(z)))],
which saturates (its gradient vanishes) when D rejects the fakes confidently, or the
non-saturating one, L_G = -E[log D(G(z))] = E[softplus(-l(G(z)))], with the same fixed point and
strong gradients early in training.

WGAN (Arjovsky et al. 2017). The Kantorovich-Rubinstein duality writes the Wasserstein-1 distance
as a supremum over 1-Lipschitz critics f,

    W1(p_data, p_g) = sup_{||f||_L <= 1} E_{p_data}[f(x)] - E_{p_g}[f(x)],

so the critic maximises E f(x) - E f(G(z)) (its loss L_f = E f(G(z)) - E f(x)) and the
generator minimises -E f(G(z)). WGAN keeps f Lipschitz (with some constant K) by clipping every
weight to [-c, c] after each critic step; WGAN-GP (Gulrajani et al. 2017) instead adds

    lambda E_{x_hat}[(||grad_x f(x_hat)||_2 - 1)^2],   x_hat = eps x + (1 - eps) G(z),
    eps ~ U[0, 1] per example,

since an optimal critic has gradient norm 1 on the straight lines between coupled points.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LOG4 = math.log(4.0)


# --- GAN -----------------------------------------------------------------------------------------

def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = E[softplus(-l(x))] + E[softplus(l(G(z)))]: binary cross-entropy, real = 1."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def generator_loss(logits_fake: torch.Tensor, kind: str = "non-saturating") -> torch.Tensor:
    """The generator's loss on the discriminator's logits of its samples: ``minimax``
    E[log(1 - D)] = -E[softplus(l)], or ``non-saturating`` -E[log D] = E[softplus(-l)]."""
    if kind == "minimax":
        return -F.softplus(logits_fake).mean()
    if kind == "non-saturating":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown generator loss {kind!r}; use minimax or non-saturating")


def optimal_discriminator(p_data: torch.Tensor, p_g: torch.Tensor) -> torch.Tensor:
    """D*(x) = p_data(x) / (p_data(x) + p_g(x)), for densities evaluated at the same points."""
    return p_data / (p_data + p_g)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor, dx: float) -> torch.Tensor:
    """JSD(p || q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, for densities on a grid
    of spacing ``dx`` (a Riemann sum; 0 log 0 = 0)."""
    m = (p + q) / 2
    def kl(a):
        return torch.where(a > 0, a * torch.log(a / m), torch.zeros_like(a)).sum() * dx
    return (kl(p) + kl(q)) / 2


def game_value(p_data: torch.Tensor, p_g: torch.Tensor, d: torch.Tensor,
               dx: float) -> torch.Tensor:
    """V(D, G) = int p_data log D + p_g log(1 - D) dx on a grid of spacing ``dx`` (0 log 0 =
    0 where a density vanishes; D is kept one float epsilon inside (0, 1), since D* rounds to 1
    where p_g is below p_data's rounding error)."""
    eps = torch.finfo(d.dtype).eps
    d = d.clamp(eps, 1 - eps)
    return (torch.xlogy(p_data, d) + torch.xlogy(p_g, 1 - d)).sum() * dx


# --- WGAN ----------------------------------------------------------------------------------------

def critic_loss(f_real: torch.Tensor, f_fake: torch.Tensor) -> torch.Tensor:
    """L_f = E f(G(z)) - E f(x): minimising it maximises the dual estimate of W1."""
    return f_fake.mean() - f_real.mean()


def wasserstein_estimate(f_real: torch.Tensor, f_fake: torch.Tensor) -> torch.Tensor:
    """E f(x) - E f(G(z)): W1 when f is the optimal 1-Lipschitz critic (K W1 for a K-Lipschitz
    one)."""
    return f_real.mean() - f_fake.mean()


def wasserstein_generator_loss(f_fake: torch.Tensor) -> torch.Tensor:
    """L_G = -E f(G(z))."""
    return -f_fake.mean()


def interpolates(real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_hat = eps x + (1 - eps) G(z), ``eps`` (B,) broadcast over the other dimensions."""
    eps = eps.reshape(-1, *([1] * (real.dim() - 1)))
    return eps * real + (1 - eps) * fake


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], x_hat: torch.Tensor,
                     lam: float = 10.0, one_sided: bool = False) -> torch.Tensor:
    """lambda E[(||grad f(x_hat)||_2 - 1)^2], differentiable in the critic's parameters (the
    gradient is taken with ``create_graph``). ``one_sided`` penalises only norms above 1,
    lambda E[max(0, ||grad f|| - 1)^2] (the variant of Gulrajani et al.'s appendix and Petzka et
    al. 2018): no barrier at ||grad f|| = 0, which in one dimension keeps a critic that starts
    with the wrong slope from being trapped."""
    x_hat = x_hat.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    excess = grad.flatten(1).norm(dim=1) - 1
    if one_sided:
        excess = excess.clamp(min=0)
    return lam * (excess ** 2).mean()


@torch.no_grad()
def clip_weights(module: nn.Module, c: float) -> None:
    """Clip every parameter of the critic to [-c, c] in place (WGAN's Lipschitz constraint)."""
    for p in module.parameters():
        p.clamp_(-c, c)


def critic_iterations(generator_step: int, n_critic: int = 5, burst: int = 100,
                      warmup: int = 25, every: int = 500) -> int:
    """Critic steps before generator step k (1-based) in WGAN's schedule: ``burst`` for the first
    ``warmup`` generator steps and every ``every``-th, else ``n_critic`` (Arjovsky et al.'s
    Algorithm 1 and reference code; burst = 0 turns the bursts off)."""
    if burst and (generator_step <= warmup or generator_step % every == 0):
        return burst
    return n_critic
