"""Deep RL time-to-threshold: mlatlas against Stable-Baselines3 and CleanRL, measured in one run.

    python benchmarks/rl_vs_sb3.py --algos ppo,a2c --envs CartPole-v1 --seeds 3 \\
        [--libs ours,sb3,cleanrl] [--cleanrl-dir DIR] [--cleanrl-python PATH] \\
        [--max-wall 600] [--cap-mult 1] [--threads 1] [--json FILE]

What it measures, per (algorithm, environment, library, seed): the environment steps and the
wall-clock seconds until the mean undiscounted return of the last 10 finished *training* episodes
reaches the threshold (CartPole-v1 475, Acrobot-v1 -100, Pendulum-v1 -200,
MountainCarContinuous-v0 90). The criterion is the same for every library:

- mlatlas: ``<algo>.Config.create(env, seed, steps=CAP, target_return=THRESHOLD)`` and
  ``train``; the time is this script's ``perf_counter`` around ``Config.create`` + ``train``
  less the final evaluation and figure that ``train`` does after reaching the threshold
  (``train/final_eval_s`` in its summary, printed), so like the peers' it ends at the threshold
  and includes the setup; the run summary's ``train/solved_env_steps`` /
  ``train/solved_wall_s`` are printed beside it.
- Stable-Baselines3 (and sb3-contrib for TRPO), with rl-baselines3-zoo's tuned hyperparameters
  (``ZOO`` below): a callback reads ``info["episode"]["r"]`` from SB3's ``Monitor`` (the raw
  return, before any ``VecNormalize`` scaling) and stops ``learn`` at the threshold; the clock
  starts just before the environments and the model are built.
- CleanRL's ``ppo.py`` (discrete actions) or ``ppo_continuous_action.py`` (continuous), with its
  own defaults, run as a subprocess; its stdout is read line by line for the
  ``global_step=..., episodic_return=...`` prints and the process is stopped at the threshold.
  The clock starts before the process is launched, so it includes CleanRL's interpreter start
  and imports; that start-up cost is measured separately (bare interpreter + CleanRL's imports)
  and printed, so a reader can subtract it.

Both in-process clocks (mlatlas and SB3) include torch's one-time import of ``torch._dynamo``,
which the first ``torch.optim`` optimizer triggers (about 2 s on a 2-core machine, torch 2.13).

Every run is capped in environment steps (rl-zoo's ``n_timesteps`` times ``--cap-mult``, for
mlatlas and SB3 alike; CleanRL keeps its own ``total_timesteps`` default, to which its learning
rate annealing is tuned, unless ``--cleanrl-steps`` is given) and in wall-clock (``--max-wall``).
A run that hits a cap counts as not solved and is listed, never dropped. Each run is a fresh
subprocess with the same number of torch threads (``--threads``, default 1; OMP/MKL threads too,
which is how CleanRL's torch gets it), and the seeds are the outer loop with the libraries
inside, so a drift in the machine's load hits every library alike. REINFORCE has no rl-zoo
entry, so it runs for mlatlas alone with its own step budget.

The tables give, per library, solved k/n, env steps, wall-clock and CPU seconds (user + system
of the run's process, up to the threshold; less sensitive than wall-clock to other load on a
shared machine, whose load average is printed) as mean +- sample std over the solved runs, and
the ratio of mlatlas's mean wall-clock to SB3's (the goal is <= 0.5).

Peers are optional: a library that is not installed, or a CleanRL checkout that is not given,
prints a one-line skip and the rest still runs. CleanRL is fetched for the comparison and never
committed: clone https://github.com/vwxyzjn/cleanrl and pass ``--cleanrl-dir`` (the folder
holding ``ppo.py``) and ``--cleanrl-python`` (an interpreter with what CleanRL needs: its
``ppo.py`` reads gymnasium 0.29's ``info["final_info"]``, so it needs gymnasium 0.29.x with
numpy < 2, tyro and tensorboard; under gymnasium 1.x it prints no returns at all).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import re
import resource
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THRESHOLDS = {"CartPole-v1": 475.0, "Acrobot-v1": -100.0, "Pendulum-v1": -200.0,
              "MountainCarContinuous-v0": 90.0}
WINDOW = 10
ALGOS = ("ppo", "a2c", "trpo", "ddpg", "td3", "reinforce")
LIBS = ("ours", "sb3", "cleanrl")
CONTINUOUS = {"Pendulum-v1", "MountainCarContinuous-v0"}


@dataclass(frozen=True)
class Linear:
    """rl-zoo's ``lin_X``: X scaled by SB3's progress_remaining (1 at the start, 0 at the end)."""

    start: float

    def __call__(self, progress_remaining: float) -> float:
        return progress_remaining * self.start

    def __repr__(self) -> str:
        return f"lin_{self.start:g}"


# rl-baselines3-zoo's tuned hyperparameters, read from github.com/DLR-RM/rl-baselines3-zoo at
# commit 22e3ff2450fd92033f7f032915e1f64894a09584 (2026-04-23): hyperparams/ppo.yml, a2c.yml,
# trpo.yml (sb3-contrib's TRPO), ddpg.yml and td3.yml. The zoo's own conventions, applied in
# ``sb3_model``: ``normalize: true`` wraps the vector env in VecNormalize (obs and reward) with
# the algorithm's gamma; ``noise_type``/``noise_std`` become Normal or Ornstein-Uhlenbeck action
# noise with sigma = noise_std per action dimension; n_envs defaults to 1; ``policy`` is
# MlpPolicy everywhere here. Keys not listed take SB3's defaults.
DDPG_TD3: dict[str, dict[str, Any]] = {
    "Pendulum-v1": dict(n_timesteps=20_000, gamma=0.98, buffer_size=200_000,
                        learning_starts=10_000, noise_type="normal", noise_std=0.1,
                        gradient_steps=1, train_freq=1, learning_rate=1e-3,
                        policy_kwargs=dict(net_arch=[400, 300])),
    "MountainCarContinuous-v0": dict(n_timesteps=300_000, noise_type="ornstein-uhlenbeck",
                                     noise_std=0.5, gradient_steps=1, train_freq=1,
                                     learning_rate=1e-3, batch_size=256,
                                     policy_kwargs=dict(net_arch=[400, 300])),
}
ZOO: dict[str, dict[str, dict[str, Any]]] = {
    "ppo": {
        "CartPole-v1": dict(n_envs=8, n_timesteps=100_000, n_steps=32, batch_size=256,
                            gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
                            learning_rate=Linear(1e-3), clip_range=Linear(0.2)),
        "Acrobot-v1": dict(normalize=True, n_envs=16, n_timesteps=1_000_000, n_steps=256,
                           gae_lambda=0.94, gamma=0.99, n_epochs=4, ent_coef=0.0),
        "Pendulum-v1": dict(n_envs=4, n_timesteps=100_000, n_steps=1024, gae_lambda=0.95,
                            gamma=0.9, n_epochs=10, ent_coef=0.0, learning_rate=1e-3,
                            clip_range=0.2, use_sde=True, sde_sample_freq=4),
        "MountainCarContinuous-v0": dict(
            normalize=True, n_envs=1, n_timesteps=20_000, batch_size=256, n_steps=8,
            gamma=0.9999, learning_rate=7.77e-05, ent_coef=0.00429, clip_range=0.1, n_epochs=10,
            gae_lambda=0.9, max_grad_norm=5, vf_coef=0.19, use_sde=True,
            policy_kwargs=dict(log_std_init=-3.29, ortho_init=False)),
    },
    "a2c": {
        "CartPole-v1": dict(n_envs=8, n_timesteps=500_000, ent_coef=0.0),
        "Acrobot-v1": dict(normalize=True, n_envs=16, n_timesteps=500_000, ent_coef=0.0),
        "Pendulum-v1": dict(normalize=True, n_envs=8, n_timesteps=1_000_000, ent_coef=0.0,
                            max_grad_norm=0.5, n_steps=8, gae_lambda=0.9, vf_coef=0.4,
                            gamma=0.9, use_rms_prop=True, normalize_advantage=False,
                            learning_rate=Linear(7e-4), use_sde=True,
                            policy_kwargs=dict(log_std_init=-2, ortho_init=False)),
        "MountainCarContinuous-v0": dict(normalize=True, n_envs=4, n_steps=100,
                                         n_timesteps=100_000, ent_coef=0.0, use_sde=True,
                                         sde_sample_freq=16,
                                         policy_kwargs=dict(log_std_init=0.0, ortho_init=False)),
    },
    "trpo": {
        "CartPole-v1": dict(n_envs=2, n_timesteps=100_000, n_steps=512, batch_size=512,
                            cg_damping=1e-3, gae_lambda=0.98, gamma=0.99, learning_rate=1e-3,
                            n_critic_updates=20),
        "Acrobot-v1": dict(normalize=True, n_envs=2, n_timesteps=100_000, n_steps=1024),
        "Pendulum-v1": dict(n_envs=2, n_timesteps=100_000, n_steps=1024, gamma=0.9,
                            n_critic_updates=15, use_sde=True, sde_sample_freq=4),
        "MountainCarContinuous-v0": dict(normalize=True, n_envs=2, n_timesteps=50_000,
                                         use_sde=True, sde_sample_freq=4),
    },
    # ddpg.yml and td3.yml tune these two environments identically.
    "ddpg": DDPG_TD3,
    "td3": DDPG_TD3,
}

# CleanRL's single-file PPO scripts and the total_timesteps each defaults to.
CLEANRL_SCRIPTS = {False: ("ppo.py", 500_000), True: ("ppo_continuous_action.py", 1_000_000)}
CLEANRL_LINE = re.compile(r"global_step=(\d+), episodic_return=\[?\s*([-+0-9.eE]+)")
CLEANRL_IMPORTS = ("import gymnasium, numpy, torch, tyro; "
                   "from torch.utils.tensorboard import SummaryWriter")


# Stopping rule shared by the peers' readers -----------------------------------------------------
class Window:
    """The last ``WINDOW`` episode returns and the first moment their mean reaches ``target``."""

    def __init__(self, target: float):
        self.target = target
        self.returns: list[float] = []

    def add(self, episode_return: float) -> bool:
        self.returns = (self.returns + [float(episode_return)])[-WINDOW:]
        return len(self.returns) == WINDOW and statistics.fmean(self.returns) >= self.target

    @property
    def mean(self) -> float:
        return statistics.fmean(self.returns) if self.returns else math.nan


def cap_steps(algo: str, env: str, mult: float) -> int:
    return int(ZOO[algo][env]["n_timesteps"] * mult)


# Workers: one run each, in a fresh interpreter ------------------------------------------------
def worker_ours(job: dict[str, Any]) -> dict[str, Any]:
    from mlatlas.core.run import Run

    try:
        module = importlib.import_module(f"mlatlas.rl.deep.{job['algo']}")
    except ImportError as err:
        return {"skip": f"mlatlas.rl.deep.{job['algo']} is not importable ({err})"}
    overrides: dict[str, Any] = dict(env=job["env"], seed=job["seed"],
                                     target_return=job["target"])
    if job["cap"] is not None:
        overrides["steps"] = job["cap"]
    if job.get("ours_eval_episodes"):
        overrides["eval_episodes"] = job["ours_eval_episodes"]
    with tempfile.TemporaryDirectory(prefix="rlbench-") as root:
        start, cpu = time.perf_counter(), time.process_time()
        cfg = module.Config.create(**overrides)
        run = module.train(cfg, run=Run.create(job["algo"], cfg, root=root), progress=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        summary = run.summary()
    # The peers stop their clocks at the threshold; train goes on to score the policy and draw
    # its figure, which is not part of reaching the threshold.
    wall -= summary.get("train/final_eval_s", 0.0)
    cpu -= summary.get("train/final_eval_s", 0.0)
    solved = "train/solved_env_steps" in summary
    return {"solved": solved, "wall_s": wall, "cpu_s": cpu,
            "env_steps": summary.get("train/solved_env_steps", summary.get("train/steps")),
            "summary_wall_s": summary.get("train/solved_wall_s", summary.get("train/wall_s")),
            "final_eval_s": summary.get("train/final_eval_s"),
            "note": "" if solved else f"cap: {summary.get('train/steps')} env steps"}


def sb3_model(algo: str, env: str, seed: int):
    """The vector env and model exactly as rl-zoo builds them from ``ZOO[algo][env]``."""
    import numpy as np
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise
    from stable_baselines3.common.vec_env import VecNormalize

    if algo == "trpo":
        from sb3_contrib import TRPO as cls
    else:
        import stable_baselines3

        cls = getattr(stable_baselines3, algo.upper())
    hp = dict(ZOO[algo][env])
    hp.pop("n_timesteps")
    n_envs = hp.pop("n_envs", 1)
    normalize = hp.pop("normalize", False)
    noise_type, noise_std = hp.pop("noise_type", None), hp.pop("noise_std", None)
    venv = make_vec_env(env, n_envs=n_envs, seed=seed)
    if normalize:
        venv = VecNormalize(venv, gamma=hp.get("gamma", 0.99))
    if noise_type is not None:
        n_actions = venv.action_space.shape[0]
        noise_cls = (NormalActionNoise if noise_type == "normal"
                     else OrnsteinUhlenbeckActionNoise)
        hp["action_noise"] = noise_cls(mean=np.zeros(n_actions),
                                       sigma=noise_std * np.ones(n_actions))
    return cls("MlpPolicy", venv, seed=seed, device="cpu", verbose=0, **hp)


def worker_sb3(job: dict[str, Any]) -> dict[str, Any]:
    for name in ("stable_baselines3",) + (("sb3_contrib",) if job["algo"] == "trpo" else ()):
        if importlib.util.find_spec(name) is None:
            return {"skip": f"{name} is not installed (pip install stable-baselines3 sb3-contrib)"}
    if job["env"] not in ZOO.get(job["algo"], {}):
        return {"skip": f"rl-zoo has no {job['algo']} hyperparameters for {job['env']}"}
    from stable_baselines3.common.callbacks import BaseCallback

    window = Window(job["target"])
    result: dict[str, Any] = {"solved": False, "note": ""}

    class StopAtThreshold(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info and window.add(info["episode"]["r"]):
                    result.update(solved=True, env_steps=self.num_timesteps,
                                  wall_s=time.perf_counter() - start,
                                  cpu_s=time.process_time() - cpu)
                    return False
            if time.perf_counter() - start > job["max_wall"]:
                result["note"] = f"wall cap at {self.num_timesteps} env steps"
                return False
            return True

    start, cpu = time.perf_counter(), time.process_time()
    model = sb3_model(job["algo"], job["env"], job["seed"])
    model.learn(total_timesteps=job["cap"], callback=StopAtThreshold())
    if not result["solved"]:
        result.update(env_steps=model.num_timesteps, wall_s=time.perf_counter() - start,
                      cpu_s=time.process_time() - cpu)
        result["note"] = result["note"] or (f"step cap ({job['cap']}); last-10 mean "
                                            f"{window.mean:.1f}")
    return result


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(job["threads"])
    return {"ours": worker_ours, "sb3": worker_sb3}[job["lib"]](job)


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MLATLAS_THREADS"):
        env[name] = str(threads)
    return env


def spawn_worker(job: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one (lib, algo, env, seed) in a fresh interpreter; the worker prints one JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads),
                              timeout=job["max_wall"] + 120)
    except subprocess.TimeoutExpired:
        return {"solved": False, "wall_s": job["max_wall"], "env_steps": None,
                "note": "wall cap (process killed)"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"solved": False, "wall_s": None, "env_steps": None,
                "note": f"failed (rc {done.returncode}): {tail[0][:200]}"}
    return json.loads(lines[-1])


# CleanRL ----------------------------------------------------------------------------------------
def cleanrl_startup(python: str, threads: int, repeats: int = 3) -> float:
    """Median seconds for CleanRL's interpreter to start and import what its script imports."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([python, "-c", CLEANRL_IMPORTS], check=True, env=child_env(threads))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_cleanrl(job: dict[str, Any], script: Path, total: int, python: str,
                threads: int) -> dict[str, Any]:
    window = Window(job["target"])
    cmd = [python, "-u", str(script), "--seed", str(job["seed"]), "--env-id", job["env"],
           "--total-timesteps", str(total), "--no-cuda"]
    last_step, result = 0, None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = before.ru_utime + before.ru_stime
    with tempfile.TemporaryDirectory(prefix="rlbench-cleanrl-") as cwd, \
            open(Path(cwd) / "stderr.txt", "w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=child_env(threads))
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        try:
            while result is None:
                left = job["max_wall"] - (time.perf_counter() - start)
                if left <= 0 or not selector.select(timeout=left):
                    result = {"solved": False, "env_steps": last_step,
                              "wall_s": time.perf_counter() - start,
                              "note": f"wall cap at {last_step} env steps"}
                    break
                line = proc.stdout.readline()
                if not line:  # the script ended: its total_timesteps ran out, or it failed
                    proc.wait()
                    err.seek(0)
                    tail = err.read().strip().splitlines()[-1:] or [""]
                    note = (f"step cap ({total}); last-10 mean {window.mean:.1f}"
                            if proc.returncode == 0 else f"failed (rc {proc.returncode}): "
                            f"{tail[0][:200]}")
                    result = {"solved": False, "env_steps": last_step,
                              "wall_s": time.perf_counter() - start, "note": note}
                    break
                match = CLEANRL_LINE.search(line)
                if match:
                    last_step = int(match.group(1))
                    if window.add(float(match.group(2))):
                        result = {"solved": True, "env_steps": last_step,
                                  "wall_s": time.perf_counter() - start, "note": ""}
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            selector.close()
    # The process has been waited for, so its CPU time is in RUSAGE_CHILDREN (runs are serial).
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_s"] = used.ru_utime + used.ru_stime - cpu_before
    return result


# Reporting --------------------------------------------------------------------------------------
def mean_std(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.fmean(values), fmt)} +- {format(sd, fmt)}"


def table(algo: str, env: str, results: dict[str, list[dict[str, Any]]], threads: int) -> str:
    lines = [f"### {algo.upper()} on {env} (threshold {THRESHOLDS[env]:g}, "
             f"{threads} torch thread{'s' if threads != 1 else ''})", "",
             "| library | solved | env steps | wall-clock (s) | CPU (s) | notes |",
             "|---|---|---|---|---|---|"]
    walls: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    for lib, runs in results.items():
        ok = [r for r in runs if r.get("solved")]
        walls[lib] = [r["wall_s"] for r in ok]
        cpus[lib] = [r["cpu_s"] for r in ok]
        notes = "; ".join(sorted({r["note"] for r in runs if r.get("note")}))
        if lib == "ours" and ok:
            extra = ("summary train/solved_wall_s "
                     + mean_std([r["summary_wall_s"] for r in ok], ".2f"))
            if all(r.get("final_eval_s") is not None for r in ok):
                extra += ("; of the wall-clock, final evaluation + figure "
                          + mean_std([r["final_eval_s"] for r in ok], ".2f"))
            notes = extra + (f"; {notes}" if notes else "")
        lines.append(f"| {lib} | {len(ok)}/{len(runs)} | "
                     f"{mean_std([float(r['env_steps']) for r in ok], ',.0f')} | "
                     f"{mean_std(walls[lib], '.2f')} | {mean_std(cpus[lib], '.2f')} | {notes} |")
    if walls.get("ours") and walls.get("sb3"):
        ratio = statistics.fmean(walls["ours"]) / statistics.fmean(walls["sb3"])
        cpu_ratio = statistics.fmean(cpus["ours"]) / statistics.fmean(cpus["sb3"])
        full = all(r.get("solved") for lib in ("ours", "sb3") for r in results[lib])
        lines += ["", f"ours / SB3 wall-clock: {ratio:.2f} (goal <= 0.5); CPU time: "
                  f"{cpu_ratio:.2f}"
                  + ("" if full else " -- over solved runs only; not every run solved")]
    return "\n".join(lines)


def run_line(job: dict[str, Any], out: dict[str, Any]) -> str:
    steps, wall, cpu = out.get("env_steps"), out.get("wall_s"), out.get("cpu_s")
    return (f"  {job['lib']:7s} {job['algo']} {job['env']} seed {job['seed']}: "
            f"{'solved' if out['solved'] else 'NOT solved'} "
            f"env_steps={steps if steps is not None else '-'} "
            f"wall_s={f'{wall:.2f}' if wall is not None else '-'}"
            + (f" cpu_s={cpu:.2f}" if cpu is not None else "")
            + (f" summary_wall_s={out['summary_wall_s']:.2f}"
               if out.get("summary_wall_s") is not None else "")
            + (f" final_eval_s={out['final_eval_s']:.2f}"
               if out.get("final_eval_s") is not None else "")
            + (f" ({out['note']})" if out.get("note") else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", default="ppo")
    parser.add_argument("--envs", default="CartPole-v1")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed0", type=int, default=0, help="first seed; seeds are consecutive")
    parser.add_argument("--libs", default="ours,sb3,cleanrl")
    parser.add_argument("--cleanrl-dir", type=Path, default=None,
                        help="folder holding CleanRL's ppo.py (fetched, never committed)")
    parser.add_argument("--cleanrl-python", default=sys.executable,
                        help="interpreter for CleanRL (gymnasium 0.29, tyro, tensorboard)")
    parser.add_argument("--cleanrl-steps", type=int, default=None,
                        help="CleanRL total_timesteps (default: its own default)")
    parser.add_argument("--max-wall", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--cap-mult", type=float, default=1.0,
                        help="env-step cap = rl-zoo n_timesteps x this (ours and SB3)")
    parser.add_argument("--ours-eval-episodes", type=int, default=None,
                        help="override mlatlas's end-of-training evaluation episodes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write every run here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    libs = [lib.strip() for lib in args.libs.split(",") if lib.strip()]
    for name, given, known in (("algo", algos, ALGOS), ("env", envs, THRESHOLDS),
                               ("lib", libs, LIBS)):
        bad = [g for g in given if g not in known]
        if bad:
            parser.error(f"unknown {name} {bad[0]!r}; choose from {', '.join(known)}")
    seeds = list(range(args.seed0, args.seed0 + args.seeds))
    print(f"# torch threads per run: {args.threads} (OMP/MKL threads too); seeds {seeds}; "
          f"wall cap {args.max_wall:g} s; step cap rl-zoo n_timesteps x {args.cap_mult:g}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    cleanrl_ok = "cleanrl" in libs and args.cleanrl_dir is not None
    if "cleanrl" in libs and not cleanrl_ok:
        print("skip cleanrl: no --cleanrl-dir given (clone github.com/vwxyzjn/cleanrl; "
              "pass its cleanrl/ folder)")
    if cleanrl_ok:
        startup = cleanrl_startup(args.cleanrl_python, args.threads)
        print(f"# CleanRL start-up (interpreter + its imports, median of 3): {startup:.2f} s, "
              "included in its wall-clock below")

    everything: list[dict[str, Any]] = []
    for algo in algos:
        for env in envs:
            tuned = env in ZOO.get(algo, {})
            if not tuned:
                print(f"# {algo} on {env}: no rl-zoo hyperparameters, so no SB3 run; mlatlas "
                      "runs with its own step budget")
            target = THRESHOLDS[env]
            cap = cap_steps(algo, env, args.cap_mult) if tuned else None
            scripts: dict[str, tuple[Path, int]] = {}
            active = []
            for lib in libs:
                if lib == "cleanrl":
                    if not cleanrl_ok:
                        continue
                    if algo != "ppo":
                        print(f"skip cleanrl {algo}: only CleanRL's PPO is compared")
                        continue
                    name, default_total = CLEANRL_SCRIPTS[env in CONTINUOUS]
                    if not (args.cleanrl_dir / name).exists():
                        print(f"skip cleanrl: {args.cleanrl_dir / name} not found")
                        continue
                    scripts[lib] = (args.cleanrl_dir / name, args.cleanrl_steps or default_total)
                active.append(lib)
            results: dict[str, list[dict[str, Any]]] = {}
            # Seeds outermost, libraries inside: a drift in the machine's load hits all alike.
            for seed in seeds:
                for lib in list(active):
                    job = dict(lib=lib, algo=algo, env=env, seed=seed, cap=cap, target=target,
                               max_wall=args.max_wall, threads=args.threads,
                               ours_eval_episodes=args.ours_eval_episodes)
                    if lib == "cleanrl":
                        out = run_cleanrl(job, *scripts[lib], args.cleanrl_python, args.threads)
                    else:
                        out = spawn_worker(job, args.threads)
                    if "skip" in out:
                        print(f"skip {lib} {algo} {env}: {out['skip']}")
                        active.remove(lib)
                        continue
                    results.setdefault(lib, []).append(out)
                    everything.append({**job, **out})
                    print(run_line(job, out), flush=True)
            if results:
                print()
                print(table(algo, env, results, args.threads))
                print(flush=True)
    print(f"# load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
