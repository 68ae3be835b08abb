"""How many torch threads suit mlatlas's small models? Training steps per second, measured.

    python benchmarks/threads.py [--steps 40]

Times DDPM training steps on the 8x8 digits (UNet) and on 2D points (MLP) with 1 and 2 intra-op
threads, first on an idle machine, then while another process keeps one core busy (as when tests
or a second job run beside training). Prints seconds per step and the 2-thread/1-thread ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch

from mlatlas.data import load_dataset
from mlatlas.generative.diffusion import configs, ddpm, loop


def spin(stop) -> None:
    while not stop.is_set():
        pass


def seconds_per_step(dataset: str, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    cfg = configs.DDPMConfig(dataset=dataset)
    data = load_dataset(dataset)
    model = loop.build_model(cfg, data)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    s = ddpm.Schedule.linear()
    x = loop.to_model_space(data.x_train[: cfg.batch_size], data)
    times = []
    for i in range(steps + 5):
        start = time.perf_counter()
        t = torch.randint(0, s.T, (len(x),))
        loss = ddpm.simple_loss(model, x, t, torch.randn_like(x), s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 5:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    print(f"{'data':12s} {'other core':10s} {'1 thread s':>11s} {'2 threads s':>12s} "
          f"{'2/1':>6s}")
    for busy in (False, True):
        stop = mp.Event()
        worker = mp.Process(target=spin, args=(stop,)) if busy else None
        if worker:
            worker.start()
        try:
            for dataset in ("digits", "8gaussians"):
                one = seconds_per_step(dataset, 1, args.steps)
                two = seconds_per_step(dataset, 2, args.steps)
                print(f"{dataset:12s} {'busy' if busy else 'idle':10s} {one:11.4f} {two:12.4f} "
                      f"{two / one:6.2f}")
        finally:
            if worker:
                stop.set()
                worker.join()


if __name__ == "__main__":
    main()
