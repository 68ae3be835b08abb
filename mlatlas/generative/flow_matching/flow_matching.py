r"""Flow matching with the linear (rectified) path (Lipman et al., "Flow Matching for Generative
Modeling", ICLR 2023; Liu, Gong & Liu, "Flow Straight and Fast", ICLR 2023).

Data x_0 and noise eps ~ N(0, I) are joined by straight lines

    x_t = (1 - t) x_0 + t eps,    t in [0, 1]

whose velocity is the constant u = dx_t/dt = eps - x_0. The conditional flow-matching loss

    L_CFM = E_{t ~ U(0, 1), x_0, eps} || v_theta(x_t, t) - (eps - x_0) ||^2

has the marginal velocity v(x, t) = E[eps - x_0 | x_t = x] as its minimiser, and the ODE
dx/dt = v(x, t), run from t = 1 (pure noise) to t = 0, carries N(0, I) to the data. Samplers
over a decreasing grid of times t_0 = 1 > ... > t_N = 0 (h = t_{i+1} - t_i < 0):

    Euler  x_{i+1} = x_i + h v(x_i, t_i)
    Heun   x' = x_i + h v(x_i, t_i),  x_{i+1} = x_i + h (v(x_i, t_i) + v(x', t_{i+1})) / 2
           (the last step, to t = 0, stays Euler's, as in EDM: 2N - 1 evaluations)

In the unified view (``diffusion/edm.py``) this is s(t) = 1 - t, sigma(t) = t / (1 - t): with
x = x_t / (1 - t) the denoiser is D(x; sigma) = x_t - t v(x_t, t), and an Euler step in t equals
an Euler (DDIM) step in sigma exactly. Diffusers' FlowMatchEulerDiscreteScheduler uses the same
convention: its sigma is our t and its model output the velocity eps - x_0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mlatlas.core.config import ConfigError
from mlatlas.core.progress import progress_bar
from mlatlas.generative.diffusion.framework import (
    DiffusionConfig,
    Formulation,
    Sampler,
    batch_view,
)
from mlatlas.generative.diffusion.samplers import Callback


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


def _check_times(ts: torch.Tensor) -> list[float]:
    values = [float(t) for t in ts]
    if len(values) < 2 or any(not 0 <= t <= 1 for t in values):
        raise ValueError("times must hold at least two values in [0, 1]")
    return values


@torch.no_grad()
def _integrate(velocity, x: torch.Tensor, ts: torch.Tensor, second_order: bool,
               progress: bool | None, callback: Callback) -> torch.Tensor:
    values = _check_times(ts)
    for i in progress_bar(range(len(values) - 1), desc="sampling", leave=False,
                          progress=progress):
        t, t_next = values[i], values[i + 1]
        v = velocity(x, t)
        if callback is not None:
            callback(i, t, x, x - t * v)
        x_next = torch.add(x, v, alpha=t_next - t)
        if second_order and t_next > 0:
            x_next = torch.add(x, v + velocity(x_next, t_next), alpha=(t_next - t) / 2)
        x = x_next
    return x


def fm_euler(velocity, x: torch.Tensor, ts: torch.Tensor, *,
             generator: torch.Generator | None = None, progress: bool | None = None,
             callback: Callback = None) -> torch.Tensor:
    """Euler steps of dx/dt = v(x, t) along the times ``ts`` (one evaluation per step)."""
    return _integrate(velocity, x, ts, False, progress, callback)


def fm_heun(velocity, x: torch.Tensor, ts: torch.Tensor, *,
            generator: torch.Generator | None = None, progress: bool | None = None,
            callback: Callback = None) -> torch.Tensor:
    """Heun steps of dx/dt = v(x, t); the step to t = 0 is Euler's."""
    return _integrate(velocity, x, ts, True, progress, callback)


FM_SAMPLERS = {"euler": fm_euler, "heun": fm_heun}


class FlowMatching(Formulation):
    """The linear path x_t = (1 - t) x_0 + t eps with a velocity network v_theta(x_t, t)."""

    samplers = ("euler", "heun")
    time_scale = 1000.0  # t in [0, 1] spread over the step-index range of the embedding

    def loss(self, net, x0, y, generator):
        t = torch.rand(len(x0), generator=generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
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
        return FM_SAMPLERS[sampler](velocity, x, times(steps), progress=progress,
                                    callback=callback, **options)


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
