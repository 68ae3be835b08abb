r"""Flow matching with the linear (rectified) path (Lipman et al., "Flow Matching for Generative
Modeling", ICLR 2023; Liu, Gong & Liu, "Flow Straight and Fast", ICLR 2023).

Data x_0 and noise eps ~ N(0, I) are joined by straight lines

    x_t = (1 - t) x_0 + t eps,    t in [0, 1]

whose velocity is the constant u = dx_t/dt = eps - x_0. The conditional flow-matching loss

    L_CFM = E_{t ~ U(0, 1), x_0, eps} || v_theta(x_t, t) - (eps - x_0) ||^2

has the marginal velocity v(x, t) = E[eps - x_0 | x_t = x] as its minimiser, and the ODE
dx/dt = v(x, t), run from t = 1 (pure noise) to t = 0, carries N(0, I) to the data. Samplers
over a decreasing grid of times t_0 = 1 > ... > t_N = 0 (dt = t_{i+1} - t_i < 0):

    Euler  d = v(x_i, t_i),  x_{i+1} = x_i + d dt
    Heun   x' = x_i + d dt,  d' = v(x', t_{i+1}),  x_{i+1} = x_i + (d + d') / 2 dt
           (the last step, to t = 0, stays Euler's, as in EDM: 2N - 1 evaluations)

Both are the Euler and Heun of ``diffusion/samplers.py``, which take the velocity wrapped as
``samplers.Velocity`` and step the times t_i where a diffusion model steps its noise levels.

In the unified view (``diffusion/edm.py``) this is s(t) = 1 - t, sigma(t) = t / (1 - t): with
x = x_t / (1 - t) the denoiser is D(x; sigma) = x_t - t v(x_t, t), and an Euler step in t equals
an Euler (DDIM) step in sigma exactly. Diffusers' FlowMatchEulerDiscreteScheduler uses the same
convention: its sigma is our t and its model output the velocity eps - x_0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError
from mlatlas.generative.diffusion.configs import DiffusionConfig, Sampler
from mlatlas.generative.diffusion.formulations import Formulation, batch_view
from mlatlas.generative.diffusion.samplers import ODE_SAMPLERS, SAMPLERS, Callback, Velocity


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t eps for a (B,) tensor of times."""
    t = batch_view(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """u = eps - x_0, the velocity of the straight path."""
    return eps - x0


def cfm_loss(net, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
             y: torch.Tensor | None = None) -> torch.Tensor:
    """L_CFM: mean squared error between v_theta(x_t, t) and eps - x_0."""
    return (net(interpolate(x0, eps, t), t, y) - velocity_target(x0, eps)).pow(2).mean()


def times(steps: int) -> torch.Tensor:
    """t from 1 to 0 in ``steps`` equal steps (float64, (steps + 1,))."""
    if steps < 1:
        raise ValueError(f"need at least one step, got {steps}")
    return torch.linspace(1, 0, steps + 1, dtype=torch.float64)


def integrate(velocity, x: torch.Tensor, ts: torch.Tensor, sampler: str = "heun", *,
              progress: bool | None = None, callback: Callback = None) -> torch.Tensor:
    """x at the end of dx/dt = velocity(x, t) from x at ts[0], by ``sampler`` ('euler' or 'heun')
    along the decreasing times ``ts`` in [0, 1]; the callback sees (i, t_i, x_i, x_i - t_i v)."""
    if sampler not in ODE_SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(ODE_SAMPLERS)}, got {sampler!r}")
    return SAMPLERS[sampler](Velocity(velocity), x, ts, progress=progress, callback=callback)


class FlowMatching(Formulation):
    """The linear path x_t = (1 - t) x_0 + t eps with a velocity network v_theta(x_t, t)."""

    samplers = ("euler", "heun")
    time_scale = 1000.0  # t in [0, 1] spread over the step-index range of the embedding

    def loss(self, net, x0, y, generator):
        t = distributed.rand((len(x0),), generator=generator).to(x0.device)
        eps = distributed.randn(x0.shape, generator=generator).to(x0.device)
        return cfm_loss(net, x0, eps, t, y)

    def velocity(self, net):
        def v(x: torch.Tensor, t: float) -> torch.Tensor:
            return net(x, torch.full((len(x),), t, device=x.device, dtype=x.dtype))

        return v

    def denoiser(self, net, clip=False):
        velocity = self.velocity(net)

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            t = sigma / (1 + sigma)
            x_t = x / (1 + sigma)
            x0 = x_t - t * velocity(x_t, t)
            return x0.clamp(-1, 1) if clip else x0

        return denoise

    def display(self, x, level):
        return x

    def guided_velocity(self, net, guide):
        """The velocity of a guided denoiser D~ (classifier guidance): with sigma = t / (1 - t),
        v(x_t, t) = (x_t - D~(x_t / (1 - t); sigma)) / t, which is v itself when D~ = D. At
        t = 1 (sigma infinite) and t = 0 it stays the network's velocity."""
        velocity, guided = self.velocity(net), guide(self.denoiser(net))

        def v(x_t: torch.Tensor, t: float) -> torch.Tensor:
            if not 0 < t < 1:
                return velocity(x_t, t)
            return (x_t - guided(x_t / (1 - t), t / (1 - t))) / t

        return v

    def sample(self, net, shape, sampler, steps, generator, device, *, clip=False,
               progress=None, callback=None, guide=None, **options):
        if options:
            raise ConfigError(f"flow matching's ODE samplers take no {', '.join(options)} "
                              "(--churn and --eta apply to the diffusion samplers)")
        x = torch.randn(shape, generator=generator).to(device)
        velocity = self.velocity(net) if guide is None else self.guided_velocity(net, guide)
        return integrate(velocity, x, times(steps), sampler, progress=progress,
                         callback=callback)


@dataclass
class Config(DiffusionConfig):
    """Flow matching on the straight path, sampled by integrating the learned velocity."""

    METHOD: ClassVar[str] = "flow_matching"

    sampler: Sampler = "heun"
    """Sampler for the samples drawn at the end of training and the default of `mlatlas sample`."""
    sample_steps: int = 18
    """ODE steps (Heun makes 2 x steps - 1 network evaluations)."""

    def formulation(self) -> FlowMatching:
        return FlowMatching()
