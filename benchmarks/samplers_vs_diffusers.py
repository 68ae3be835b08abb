"""Sampling overhead per step against diffusers' scheduler loop with the same network.

    python benchmarks/samplers_vs_diffusers.py [--batch 64] [--repeats 5] [--threads 1]
                                               [--steps 28] [--no-unet] [--clock cpu|wall]

Goal: at least 2x less overhead than diffusers. Six pairs, each driving the same network from the
same start along the same noise levels (diffusers' own grid, fed to our sampler), in float32:

    DDPM      samplers.ddpm  + VP denoiser         DDPMScheduler ("leading")
    DDIM      samplers.ddim  + VP denoiser         DDIMScheduler (eta 0, "leading", offset 1)
    Euler     samplers.euler + VP denoiser         EulerDiscreteScheduler ("linspace")
    Heun      samplers.heun  + VP denoiser         HeunDiscreteScheduler ("linspace")
    EDM Euler samplers.euler + EDM denoiser        EDMEulerScheduler
    FM Euler  samplers.euler + Velocity(FM net)    FlowMatchEulerDiscreteScheduler

A "step" is one network evaluation (Heun makes 2N - 1 of them for N steps in both libraries);
diffusers' side is a pipeline's loop (scale_model_input, t broadcast to the batch, the network,
step), with set_timesteps outside the timing as our grid is. Two networks:

* trivial (x * 0.1): the time per step is the sampler's own overhead (plus one multiply, the
  same on both sides); best of 10 x --repeats, since a run takes milliseconds.
* mlatlas's UNet on digits-shaped 8x8 input (the default model of ``mlatlas train``): overhead
  = time per step - the UNet alone on the same input, best of --repeats. The UNet's own spread
  (median - best) is printed: where it exceeds the overhead, that difference is noise.

Runs are interleaved, ours then theirs. The default clock is the process's CPU time, which on a
shared machine leaves out the time spent waiting for a core (--clock wall for elapsed time).
ratio = diffusers' overhead / ours (the goal: >= 2). The diff columns are max |ours - theirs| of
the samples, a check that both loops computed the same thing (float32, x up to sigma_max; with
fractional discrete timesteps, i.e. --steps N where 999 / (N - 1) is no integer, the networks
also see slightly different t: diffusers interpolates sigma linearly, mlatlas log-linearly).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from mlatlas.generative.diffusion import edm, samplers
from mlatlas.generative.diffusion.ddpm import Schedule
from mlatlas.generative.diffusion.formulations import VP, Preconditioned
from mlatlas.generative.diffusion.samplers import Velocity
from mlatlas.generative.flow_matching.flow_matching import FlowMatching
from mlatlas.nn.unet import UNet

try:
    import diffusers
except ImportError as err:  # pragma: no cover
    raise SystemExit("this benchmark needs diffusers: pip install -e '.[dev]'") from err

T = 1000
TRIVIAL_REPEATS = 10  # times --repeats: a run with the trivial network takes milliseconds
VP_ARGS = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
               prediction_type="epsilon")


def trivial(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x * 0.1


def vp_grid(timesteps: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Our sigmas at diffusers' (possibly fractional) timesteps, then 0."""
    sigmas = schedule.t_to_sigma(timesteps.double())
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def peer_loop(scheduler, net, x: torch.Tensor, time_divisor: float = 1.0,
              **step_options) -> torch.Tensor:
    """A diffusers pipeline's denoising loop: scale, broadcast t to the batch, call, step."""
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    batch = len(x)
    for t in scheduler.timesteps:
        out = net(scale(x, t), t.expand(batch) / time_divisor)
        x = scheduler.step(out, t, x, **step_options).prev_sample
    return x


class Pair:
    """One sampler and its diffusers counterpart, set up for one number of steps: ``wrap``
    turns a network into what ``sampler`` integrates (a denoiser or a velocity), ``grid`` is
    the sampler's noise levels (diffusers' own), and the start is z times ``scale_ours`` for
    mlatlas and z times ``scale_theirs`` for diffusers (x = x_t sqrt(1 + sigma^2) for VP)."""

    def __init__(self, name: str, scheduler, steps: int, sampler: Callable, wrap: Callable,
                 grid: torch.Tensor, time_scale: float, scale_ours: float, scale_theirs: float,
                 noisy: bool = False, time_divisor: float = 1.0):
        self.name, self.scheduler, self.steps = name, scheduler, steps
        self.sampler, self.wrap, self.grid, self.time_scale = sampler, wrap, grid, time_scale
        self.scale_ours, self.scale_theirs = scale_ours, scale_theirs
        self.noisy, self.time_divisor = noisy, time_divisor

    def run_ours(self, net, z: torch.Tensor, seed: int) -> torch.Tensor:
        options = {"generator": torch.Generator().manual_seed(seed)} if self.noisy else {}
        return self.sampler(self.wrap(net), z * self.scale_ours, self.grid, progress=False,
                            **options)

    def run_peer(self, net, z: torch.Tensor, seed: int) -> torch.Tensor:
        self.scheduler.set_timesteps(self.steps)  # also resets the scheduler's step index
        options = {"generator": torch.Generator().manual_seed(seed)} if self.noisy else {}
        return peer_loop(self.scheduler, net, z * self.scale_theirs, self.time_divisor,
                         **options)

    def evaluations(self) -> int:
        return len(self.scheduler.timesteps)


def make_pairs(steps: int) -> list[Pair]:
    schedule = Schedule.linear(T)
    vp = VP(schedule, "eps")
    precond = Preconditioned("edm", edm.SIGMA_MIN, edm.SIGMA_MAX)
    flow = FlowMatching()
    pairs = []

    ddpm = diffusers.DDPMScheduler(**VP_ARGS, variance_type="fixed_small", clip_sample=False,
                                   timestep_spacing="leading")
    ddim = diffusers.DDIMScheduler(**VP_ARGS, clip_sample=False, set_alpha_to_one=True,
                                   steps_offset=1, timestep_spacing="leading")
    for name, scheduler, sampler in (("DDPM", ddpm, samplers.ddpm),
                                     ("DDIM", ddim, samplers.ddim)):
        scheduler.set_timesteps(steps)
        grid = vp_grid(scheduler.timesteps, schedule)
        pairs.append(Pair(name, scheduler, steps, sampler, vp.denoiser, grid, vp.time_scale,
                          math.sqrt(1 + grid[0] ** 2), 1.0, noisy=name == "DDPM"))

    for name, cls, sampler in (("Euler", diffusers.EulerDiscreteScheduler, samplers.euler),
                               ("Heun", diffusers.HeunDiscreteScheduler, samplers.heun)):
        scheduler = cls(**VP_ARGS, timestep_spacing="linspace")
        scheduler.set_timesteps(steps)
        # Heun's list holds each later timestep twice (its two evaluations).
        own = scheduler.timesteps if name == "Euler" else scheduler.timesteps[::2]
        grid = vp_grid(own, schedule)
        pairs.append(Pair(name, scheduler, steps, sampler, vp.denoiser, grid, vp.time_scale,
                          float(grid[0]), float(grid[0])))

    scheduler = diffusers.EDMEulerScheduler(sigma_min=edm.SIGMA_MIN, sigma_max=edm.SIGMA_MAX,
                                            sigma_data=edm.SIGMA_DATA, rho=edm.RHO)
    scheduler.set_timesteps(steps)
    pairs.append(Pair("EDM Euler", scheduler, steps, samplers.euler, precond.denoiser,
                      edm.karras_sigmas(steps), precond.time_scale, edm.SIGMA_MAX,
                      edm.SIGMA_MAX))

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)
    scheduler.set_timesteps(steps)
    pairs.append(Pair("FM Euler", scheduler, steps, samplers.euler,
                      lambda net: Velocity(flow.velocity(net)),
                      scheduler.sigmas.double(), flow.time_scale, 1.0, 1.0, time_divisor=T))
    return pairs


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def timed(fn: Callable[[], torch.Tensor], clock: Callable[[], float]) -> tuple[float, torch.Tensor]:
    start = clock()
    out = fn()
    return clock() - start, out


def network_alone(net, z: torch.Tensor, calls: int) -> torch.Tensor:
    t = torch.full((len(z),), 500.0)
    for _ in range(calls):
        out = net(z, t)
    return out


def measure(pair: Pair, net, z: torch.Tensor, repeats: int, with_network_alone: bool,
            clock: Callable[[], float]) -> dict:
    """Seconds per evaluation for ours, theirs and (optionally) the network alone, interleaved,
    best of ``repeats`` (and the median of the network alone, for its spread), and
    max |ours - theirs|."""
    evals = pair.evaluations()
    times: dict[str, list[float]] = {"ours": [], "theirs": [], "net": []}
    for _ in range(repeats):
        t_ours, ours = timed(lambda: pair.run_ours(net, z, 0), clock)
        t_theirs, theirs = timed(lambda: pair.run_peer(net, z, 0), clock)
        times["ours"].append(t_ours / evals)
        times["theirs"].append(t_theirs / evals)
        if with_network_alone:
            times["net"].append(timed(lambda: network_alone(net, z, evals), clock)[0] / evals)
    best = {key: min(values, default=0.0) for key, values in times.items()}
    best["net_spread"] = statistics.median(times["net"]) - best["net"] if times["net"] else 0.0
    best["diff"] = (ours - theirs).abs().max().item()
    return best


def ratio(theirs: float, ours: float) -> str:
    return f"{theirs / ours:6.2f}" if ours > 0 and theirs > 0 else f"{'n/a':>6s}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--no-unet", action="store_true",
                        help="time the trivial network only (seconds instead of minutes)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: the process's CPU time, which leaves out waiting for a core "
                        "on a shared machine; wall: elapsed time")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    if min(args.batch, args.repeats, args.threads) < 1 or not 2 <= args.steps <= T:
        raise SystemExit(f"--batch, --repeats and --threads must be positive and --steps in "
                         f"2..{T}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    z = torch.randn(args.batch, 1, 8, 8)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads "
          f"{args.threads}, batch {args.batch}x1x8x8, {args.steps} steps, {args.clock} clock")
    print("microseconds per network evaluation. Trivial net: the whole step (the sampler's "
          f"overhead), best of {TRIVIAL_REPEATS * args.repeats}. UNet: overhead = step - UNet "
          f"alone, best of {args.repeats}; 'spread' is the UNet's median - best, the noise "
          "floor of that difference. ratio = diffusers / mlatlas (goal: >= 2)\n")
    header = (f"{'sampler':9s} | {'trivial: ours':>13s} {'theirs':>7s} {'ratio':>6s} {'diff':>7s}"
              f" | {'UNet alone':>10s} {'spread':>6s} {'ours':>6s} {'theirs':>6s} {'ratio':>6s} "
              f"{'diff':>7s}")
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        for pair in make_pairs(args.steps):
            torch.manual_seed(0)
            unet = UNet(1, base=24, channel_mults=(1, 2), attention=False,
                        time_scale=pair.time_scale).eval()
            light = measure(pair, trivial, z, TRIVIAL_REPEATS * args.repeats, False, clock)
            row = (f"{pair.name:9s} | {light['ours'] * 1e6:13.1f} {light['theirs'] * 1e6:7.1f} "
                   f"{ratio(light['theirs'], light['ours'])} {light['diff']:7.1e} |")
            if not args.no_unet:
                heavy = measure(pair, unet, z, args.repeats, True, clock)
                ours, theirs = (heavy[k] - heavy["net"] for k in ("ours", "theirs"))
                row += (f" {heavy['net'] * 1e6:10.1f} {heavy['net_spread'] * 1e6:6.0f} "
                        f"{ours * 1e6:6.0f} {theirs * 1e6:6.0f} {ratio(theirs, ours)} "
                        f"{heavy['diff']:7.1e}")
            print(row)


if __name__ == "__main__":
    main()
