"""Deep RL environments stepped in-process (``--vector sync``) or in subprocesses (``async``).

    python benchmarks/vector_envs.py [--env CartPole-v1] [--num-envs 4] [--steps 20000]

Trains PPO both ways with the same seed (the same transitions, hence the same parameters) and
prints environment steps per second, read off metrics.csv between its first and last rows, and
the async/sync ratio. Async pays a pipe round trip per step and environment; it helps only when
one environment step costs more than that (physics simulators, not CartPole), and only with
cores to spare for the subprocesses.
"""

from __future__ import annotations

import argparse
import tempfile

from mlatlas.core.run import Run
from mlatlas.rl.deep import ppo


def env_steps_per_second(run: Run) -> float:
    first, last = run.metrics[0], run.metrics[-1]
    return (last["step"] - first["step"]) / (last["wall_s"] - first["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20_000)
    args = parser.parse_args()
    speed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for vector in ("sync", "async"):
            cfg = ppo.Config.create(env=args.env, num_envs=args.num_envs, steps=args.steps,
                                    vector=vector, log_every=args.steps // 10,
                                    eval_episodes=1)
            run = ppo.train(cfg, Run.create(cfg.METHOD, cfg, root=tmp), progress=False)
            speed[vector] = env_steps_per_second(run)
            print(f"{vector:6s} {speed[vector]:9.0f} env steps/s", flush=True)
    print(f"async / sync: {speed['async'] / speed['sync']:.2f}")


if __name__ == "__main__":
    main()
