"""Deep RL environments stepped in-process (``--vector sync``) or in subprocesses (``async``).

    python benchmarks/vector_envs.py [--envs CartPole-v1,Pendulum-v1] [--num-envs 4]

Steps each vector environment with random actions (no learning, so only the environments'
cost is timed) and prints environment steps per second for both modes and their ratio. The
same seed gives the same transitions either way (tests/test_rl_deep_vector.py). Async pays a
pipe round trip per step and environment: it helps only when one environment step costs more
than that (physics simulators, not classic control) and there are cores for the subprocesses.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mlatlas.rl.deep.envs import make_envs


def env_steps_per_second(env_id: str, num_envs: int, vector: str, steps: int) -> float:
    envs = make_envs(env_id, num_envs, 0, vector)
    try:
        envs.reset(seed=0)
        envs.action_space.seed(0)
        actions = [envs.action_space.sample() for _ in range(steps)]
        start = time.perf_counter()
        for action in actions:
            envs.step(action)
        return steps * num_envs / (time.perf_counter() - start)
    finally:
        envs.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="CartPole-v1,Pendulum-v1")
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000, help="vector steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'env':16s} {'sync steps/s':>13s} {'async steps/s':>14s} {'async/sync':>11s}")
    for env_id in args.envs.split(","):
        # Alternate the modes and keep the medians, so a burst of load hits both alike.
        speed = {"sync": [], "async": []}
        for _ in range(args.repeats):
            for vector in speed:
                speed[vector].append(env_steps_per_second(env_id, args.num_envs, vector,
                                                          args.steps))
        sync, async_ = (float(np.median(speed[v])) for v in ("sync", "async"))
        print(f"{env_id:16s} {sync:13.0f} {async_:14.0f} {async_ / sync:11.2f}", flush=True)


if __name__ == "__main__":
    main()
