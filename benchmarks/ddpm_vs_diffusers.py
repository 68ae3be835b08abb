"""DDPM against diffusers' DDPMScheduler: numeric parity and speed, measured in one run.

    python benchmarks/ddpm_vs_diffusers.py [--batch 64] [--repeats 3] [--threads 1]

Both samplers drive the same network (mlatlas's UNet for 8x8 images, and a small MLP for 2D
points) through all 1,000 ancestral steps from the same noise, so the timing compares the
samplers' own overhead and the printed difference (max |ours - theirs| / max |theirs|) checks
that the trajectories agree. Ratios are
diffusers' time over mlatlas's (above 1: mlatlas is faster).
"""

from __future__ import annotations

import argparse
import time

import torch

from mlatlas.generative.diffusion.ddpm import Schedule, ancestral_sample, q_sample
from mlatlas.nn.unet import TimeMLP, UNet

try:
    from diffusers import DDPMScheduler
except ImportError as err:  # pragma: no cover
    raise SystemExit("this benchmark needs diffusers: pip install -e '.[dev]'") from err


def peer_sample(model, shape, scheduler, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(x, t.repeat(shape[0]).float())
            x = scheduler.step(eps, t, x, generator=gen).prev_sample
    return x


def best_of_interleaved(ours, peer, repeats):
    """Alternate the two so that drift in machine load hits both alike; keep each one's best."""
    times: dict = {ours: [], peer: []}
    outs = {}
    for _ in range(repeats):
        for fn in (ours, peer):
            start = time.perf_counter()
            outs[fn] = fn()
            times[fn].append(time.perf_counter() - start)
    return min(times[ours]), outs[ours], min(times[peer]), outs[peer]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    s = Schedule.linear()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                              variance_type="fixed_small", clip_sample=True)
    scheduler.set_timesteps(1000)
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, "
          f"best of {args.repeats}")
    print(f"max |alpha_bar - diffusers alphas_cumprod|: "
          f"{(s.alpha_bar.float() - scheduler.alphas_cumprod).abs().max():.2e}")

    x0, eps = torch.randn(args.batch, 1, 8, 8), torch.randn(args.batch, 1, 8, 8)
    t = torch.randint(0, 1000, (args.batch,))
    ours_t, ours, peer_t, peer = best_of_interleaved(
        lambda: [q_sample(x0, t, eps, s) for _ in range(1000)][-1],
        lambda: [scheduler.add_noise(x0, eps, t) for _ in range(1000)][-1], args.repeats)
    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    rows = [("q_sample x1000", ours_t, peer_t, rel(ours, peer))]

    cases = [("sample 2D MLP", TimeMLP(2).eval(), (args.batch, 2), False),
             ("sample 8x8 UNet", UNet(1, 32, (1, 2), attention=False).eval(),
              (args.batch, 1, 8, 8), True)]
    for name, model, shape, clip in cases:
        scheduler.config.clip_sample = clip
        ours_t, ours, peer_t, peer = best_of_interleaved(
            lambda m=model, sh=shape, c=clip: ancestral_sample(
                m, sh, s, torch.Generator().manual_seed(0), clip=c, progress=False),
            lambda m=model, sh=shape: peer_sample(m, sh, scheduler, 0), args.repeats)
        rows.append((name, ours_t, peer_t, rel(ours, peer)))

    print(f"\n{'operation':18s} {'mlatlas s':>10s} {'diffusers s':>12s} {'ratio':>7s} "
          f"{'max rel diff':>12s}")
    for name, ours_t, peer_t, diff in rows:
        print(f"{name:18s} {ours_t:10.3f} {peer_t:12.3f} {peer_t / ours_t:7.2f} {diff:12.2e}")


if __name__ == "__main__":
    main()
