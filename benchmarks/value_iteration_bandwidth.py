"""Value-iteration sweeps on large grids, against the machine's memory bandwidth.

    python benchmarks/value_iteration_bandwidth.py [--sizes 100 300 1000] [--threads 1]

A sweep v <- max_a [r(s, a) + gamma v(s'(s, a))] must read the model's tables (next_state, int64,
and reward, float64: 16 bytes per state-action pair), read v and write the new v (16 bytes per
state); that is the traffic counted. The machine's limit is measured in the same run as the
read+write bandwidth of a large tensor copy. The goal is a sweep within 3x of that limit.
Also timed: the textbook one-line sweep (``value_iteration_step``, which materialises q) and a
full solve to tol 1e-6 on the largest grid.
"""

from __future__ import annotations

import argparse
import time

import torch

from mlatlas.rl.tabular.bellman import bellman_optimality_backup, value_iteration
from mlatlas.rl.tabular.dp import value_iteration_step
from mlatlas.rl.tabular.gridworld import GridWorld


def seconds(fn, repeats: int) -> float:
    """Best of ``repeats`` timings: the least disturbed by other work on the machine."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    src = torch.ones(megabytes * 2**20 // 8, dtype=torch.float64)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 8 / seconds(lambda: dst.copy_(src), repeats)


def random_world(n: int, seed: int = 0) -> GridWorld:
    """An n x n grid with about 10% forbidden cells and the target in the middle."""
    gen = torch.Generator().manual_seed(seed)
    kinds = (torch.rand(n, n, generator=gen) < 0.1).long()
    kinds[n // 2, n // 2] = 2
    return GridWorld(tuple(map(tuple, kinds.tolist())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    limit = copy_bandwidth()
    print(f"threads {args.threads}; copy bandwidth (read + write) {limit / 1e9:.1f} GB/s\n")
    print(f"{'grid':>11} {'states':>9} {'sweep ms':>9} {'GB/s':>6} {'limit/achieved':>15} "
          f"{'textbook ms':>12}")
    for n in args.sizes:
        world = random_world(n)
        model = world.model
        model.by_action  # noqa: B018 (build the cached layout outside the timing)
        v = torch.randn(model.n_states, dtype=torch.float64)
        out = torch.empty_like(v)
        t = seconds(lambda: bellman_optimality_backup(model, v, 0.9, out=out), args.repeats)  # noqa: B023
        t_naive = seconds(lambda: value_iteration_step(model, v, 0.9), 3)  # noqa: B023
        traffic = model.n_states * (model.n_actions * 16 + 16)
        achieved = traffic / t
        print(f"{n:>5}x{n:<5} {model.n_states:>9} {t * 1e3:>9.2f} {achieved / 1e9:>6.1f} "
              f"{limit / achieved:>15.2f} {t_naive * 1e3:>12.2f}")
    t0 = time.perf_counter()
    _, _, sweeps = value_iteration(model, 0.9, tol=1e-6)
    print(f"\nfull solve of the {n}x{n} grid to tol 1e-6: {sweeps} sweeps in "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
