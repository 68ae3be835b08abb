"""Latent diffusion's sampling overhead per step against a Stable Diffusion pipeline's loop.

    python benchmarks/latent_vs_diffusers.py [--batch 4 64] [--steps 50] [--repeats 5]
                                             [--threads 1] [--clock cpu|wall] [--quick]

Goal: at least 2x less overhead per step than diffusers. Both sides drive the same network, a
tiny diffusers UNet2DConditionModel on 4x8x8 latents with cross-attention over a (B, 3, 16)
context, with classifier-free guidance (guidance scale 1 + w = 7.5) and deterministic DDIM
(eta = 0) on the linear 1000-step schedule, in float32, from the same initial noise:

    mlatlas    samplers.ddim on formulations.VP(Schedule.linear(1000), "eps").denoiser of
               guidance.classifier_free(net, context, w), net(x, t, y) = unet(x, t,
               encoder_hidden_states=y).sample, its null_condition the zero context; the noise
               levels are diffusers' own timesteps (sigma_t = sqrt((1 - abar_t) / abar_t))
    diffusers  the loop of StableDiffusionPipeline.__call__ written out (not the pipeline):
               DDIMScheduler.set_timesteps(steps) outside the timing, then per step
               cat([latents] * 2), scale_model_input, the UNet on cat([null, context]),
               uncond + g (cond - uncond), scheduler.step

A step is one network call on the doubled batch 2B. Measured per step, each the median of
--repeats interleaved runs (ours, theirs, the network alone):

    total     the loop's time / steps
    overhead  total - the time per call of the same number of bare network calls on the same
              (2B, 4, 8, 8) input; 'spread' is the bare calls' median - best, the noise floor of
              that difference (the UNet's call costs milliseconds, the loops' own work tens of
              microseconds, so on a shared machine this difference is mostly noise)
    trivial   the same two loops around a network that returns 0.1 x at once (the UNet's
              signature, no work): the whole step is the loop's overhead, resolved to
              microseconds; median of 10 x --repeats runs

ratio = diffusers' overhead / ours (the goal: >= 2). diff = max |ours - theirs| of the final
samples, a check that both loops computed the same thing (the same DDIM maths; they differ by
float32 rounding, and diffusers keeps alphas_cumprod in float32 where mlatlas uses float64).
The default clock is the process's CPU time, which on a shared machine leaves out the time spent
waiting for a core (--clock wall for elapsed time). --quick: batch 4, 10 steps, 3 repeats.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from mlatlas.generative.diffusion import samplers
from mlatlas.generative.diffusion.ddpm import Schedule
from mlatlas.generative.diffusion.formulations import VP
from mlatlas.generative.diffusion.guidance import classifier_free

try:
    import diffusers
except ImportError as err:  # pragma: no cover
    raise SystemExit("this benchmark needs diffusers: pip install -e '.[dev]'") from err

T = 1000
GUIDANCE_SCALE = 7.5  # diffusers' guidance_scale; mlatlas's weight w = GUIDANCE_SCALE - 1
CONTEXT_TOKENS, CONTEXT_DIM = 3, 16
LATENT = (4, 8, 8)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=CONTEXT_DIM, layers_per_block=1, norm_num_groups=8,
                 attention_head_dim=8)
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


class Wrapped:
    """The diffusers UNet as a network of the framework, net(x, t, y) with y the context; the
    null condition is the zero context (any fixed one would do: both sides use the same)."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=y).sample

    def null_condition(self, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(y)


class Trivial:
    """A stand-in for the UNet with its signature and no work: 0.1 x."""

    class Output:
        def __init__(self, sample: torch.Tensor):
            self.sample = sample

    def __call__(self, x: torch.Tensor, t: torch.Tensor,
                 encoder_hidden_states: torch.Tensor) -> Output:
        return self.Output(x * 0.1)


TRIVIAL_REPEATS = 10  # times --repeats: a run with the trivial network takes milliseconds


def scheduler(steps: int):
    ddim = diffusers.DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                   beta_schedule="linear", prediction_type="epsilon",
                                   clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                                   timestep_spacing="leading")
    ddim.set_timesteps(steps)
    return ddim


def ours_loop(vp: VP, net: Wrapped, context: torch.Tensor, sigmas: torch.Tensor,
              z: torch.Tensor) -> torch.Tensor:
    guided = classifier_free(net, context, GUIDANCE_SCALE - 1)
    # x_T ~ N(0, I) in the network's variable is x = x_T sqrt(1 + sigma^2) in the sampler's.
    x = z * math.sqrt(1 + float(sigmas[0]) ** 2)
    return samplers.ddim(vp.denoiser(guided), x, sigmas, progress=False)


def peer_loop(ddim, unet, context: torch.Tensor, null: torch.Tensor,
              z: torch.Tensor) -> torch.Tensor:
    """StableDiffusionPipeline.__call__'s denoising loop (the prompt embeddings concatenated
    once, before the loop, as the pipeline does)."""
    ddim.set_timesteps(len(ddim.timesteps))  # resets the step index; the pipeline does it too
    embeddings = torch.cat([null, context])
    latents = z * ddim.init_noise_sigma
    for t in ddim.timesteps:
        model_input = ddim.scale_model_input(torch.cat([latents] * 2), t)
        noise = unet(model_input, t, encoder_hidden_states=embeddings).sample
        uncond, cond = noise.chunk(2)
        noise = uncond + GUIDANCE_SCALE * (cond - uncond)
        latents = ddim.step(noise, t, latents).prev_sample
    return latents


def network_alone(unet, z: torch.Tensor, context: torch.Tensor, calls: int) -> torch.Tensor:
    x, y = torch.cat([z, z]), torch.cat([context, torch.zeros_like(context)])
    t = torch.full((len(x),), 500.0)
    for _ in range(calls):
        out = unet(x, t, encoder_hidden_states=y).sample
    return out


def timed(fn: Callable[[], torch.Tensor], clock: Callable[[], float]) -> tuple[float, torch.Tensor]:
    start = clock()
    out = fn()
    return clock() - start, out


def measure(batch: int, steps: int, repeats: int, clock: Callable[[], float],
            unet=None) -> dict:
    """Seconds per step of both loops and of the network alone (medians), max |ours - theirs|
    and max |theirs|; ``unet`` None: the tiny UNet2DConditionModel."""
    if unet is None:
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(batch, *LATENT, generator=gen)
    context = torch.randn(batch, CONTEXT_TOKENS, CONTEXT_DIM, generator=gen)
    ddim = scheduler(steps)
    schedule = Schedule.linear(T)
    vp = VP(schedule, "eps")
    sigmas = torch.cat([schedule.t_to_sigma(ddim.timesteps.double()),
                        torch.zeros(1, dtype=torch.float64)])
    net = Wrapped(unet)
    times: dict[str, list[float]] = {"ours": [], "theirs": [], "net": []}
    with torch.no_grad():
        network_alone(unet, z, context, 2)  # warm-up
        for _ in range(repeats):
            t_ours, ours = timed(lambda: ours_loop(vp, net, context, sigmas, z), clock)
            t_theirs, theirs = timed(
                lambda: peer_loop(ddim, unet, context, torch.zeros_like(context), z), clock)
            t_net = timed(lambda: network_alone(unet, z, context, steps), clock)[0]
            for key, value in (("ours", t_ours), ("theirs", t_theirs), ("net", t_net)):
                times[key].append(value / steps)
    result = {key: statistics.median(values) for key, values in times.items()}
    result["spread"] = result["net"] - min(times["net"])
    result["diff"] = (ours - theirs).abs().max().item()
    result["scale"] = theirs.abs().max().item()
    return result


def ratio(theirs: float, ours: float) -> str:
    return f"{theirs / ours:6.2f}" if ours > 0 and theirs > 0 else f"{'n/a':>6s}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 64])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: the process's CPU time, which leaves out waiting for a core "
                        "on a shared machine; wall: elapsed time")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: batch 4, 10 steps, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps, args.repeats = [4], 10, 3
    if min(*args.batch, args.repeats, args.threads) < 1 or not 2 <= args.steps <= T:
        raise SystemExit(f"--batch, --repeats and --threads must be positive and --steps in "
                         f"2..{T}")
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads "
          f"{args.threads}, latents {'x'.join(map(str, LATENT))}, context "
          f"{CONTEXT_TOKENS}x{CONTEXT_DIM}, DDIM {args.steps} steps, guidance scale "
          f"{GUIDANCE_SCALE}, {args.clock} clock")
    print(f"microseconds per step (one network call on 2B rows), median of {args.repeats}; "
          "overhead = total - network alone; ratio = diffusers / mlatlas overhead (goal: >= 2)\n")
    header = (f"{'batch':>5s} | {'net alone':>9s} {'spread':>6s} | {'total: ours':>11s} "
              f"{'theirs':>7s} | {'overhead: ours':>14s} {'theirs':>7s} {'ratio':>6s} | "
              f"{'diff':>7s} {'|x|max':>6s} | {'trivial: ours':>13s} {'theirs':>7s} "
              f"{'ratio':>6s}")
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        r = measure(batch, args.steps, args.repeats, clock)
        ours, theirs = r["ours"] - r["net"], r["theirs"] - r["net"]
        light = measure(batch, args.steps, TRIVIAL_REPEATS * args.repeats, clock, Trivial())
        print(f"{batch:5d} | {r['net'] * 1e6:9.0f} {r['spread'] * 1e6:6.0f} | "
              f"{r['ours'] * 1e6:11.0f} {r['theirs'] * 1e6:7.0f} | {ours * 1e6:14.0f} "
              f"{theirs * 1e6:7.0f} {ratio(theirs, ours)} | {r['diff']:7.1e} "
              f"{r['scale']:6.2f} | {light['ours'] * 1e6:13.1f} {light['theirs'] * 1e6:7.1f} "
              f"{ratio(light['theirs'], light['ours'])}")


if __name__ == "__main__":
    main()
