"""The training loop every deep RL agent runs: updates counted in environment steps, checkpoints,
the target-return stop, the final evaluation and the return curves.

A method hands :func:`train_agent` an :class:`Agent`: its ``update(k)`` does the k-th update
(for on-policy methods a rollout of ``env_steps_per_update`` transitions and its optimisation;
for DDPG and TD3 ``train_freq`` vector steps and their gradient steps). :func:`mlatlas.core.run.fit`
counts environment steps, the unit of ``--steps``, ``--log-every``, ``--ckpt-every`` and of
``metrics.csv``'s ``step`` column; update k ends at environment step k E (E =
``env_steps_per_update``), and fit, given ``step_size`` E, calls the agent once per update, at
that step. So a run's rows and checkpoints fall on whole updates, ``step`` equals ``env_steps``
on every row, and ``episode_return`` is the mean undiscounted return of the last
``RETURN_WINDOW`` finished training episodes, which is also what ``target_return`` stops on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import seed_everything
from mlatlas.rl.deep.config import DeepRLConfig
from mlatlas.rl.deep.envs import RETURN_WINDOW, Interaction, check_env_id
from mlatlas.rl.deep.evaluation import eval_summary, evaluate_policy


@dataclass
class Agent:
    """What a method hands to :func:`train_agent`.

    ``update(k)`` interacts with the environment and optimises for the k-th time (k = 1, 2, ...),
    returning its metrics; ``objects`` are checkpointed (networks, optimizers, generators, under
    the canonical names ``model``, ``optimizer``, ``rng`` and named extras; the normalisers are
    added); ``policy`` maps normalised observations to deterministic actions for evaluation."""

    interaction: Interaction
    update: Callable[[int], Mapping[str, Any]]
    objects: dict[str, Any]
    policy: Callable[[torch.Tensor], torch.Tensor]
    env_steps_per_update: int


def total_updates(steps: int, env_steps_per_update: int) -> int:
    """Updates in a run of ``steps`` environment steps: the whole ones, at least one."""
    return max(1, steps // env_steps_per_update)


def whole_updates(env_steps: int, env_steps_per_update: int) -> int:
    """``env_steps`` rounded up to a whole number of updates, in environment steps."""
    return env_steps_per_update * math.ceil(env_steps / env_steps_per_update)


def prepare(cfg: DeepRLConfig, run: Run | None) -> tuple[Run, torch.Generator, Interaction]:
    """The run folder, the run's generator and its environments, all from ``cfg.seed``."""
    check_env_id(cfg.env)
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    return run, generator, Interaction(cfg)


def train_agent(cfg: DeepRLConfig, run: Run, agent: Agent, progress: bool | None) -> Run:
    """Run ``agent.update`` for ``cfg.steps`` environment steps with checkpoints, early stop at
    ``cfg.target_return``, then score the deterministic policy and draw the return curves."""
    interaction = agent.interaction
    per_update = agent.env_steps_per_update
    counters: dict[str, torch.Tensor] = interaction.episodes.state()
    objects = {**agent.objects, **interaction.normalizers(), "episodes": counters}
    solved: dict[str, float] = {}
    first = [True]

    def step_fn(step: int) -> Mapping[str, Any]:
        # fit calls once per update, at the environment step that ends it.
        update = step // per_update
        # On the first step of a resumed run fit has restored the counters from the checkpoint;
        # the fresh episodes are seeded by the number of the update that comes next.
        if first and first.pop() and update > 1:
            interaction.episodes.load(counters)
            interaction.reseed(cfg.seed + 7919 * update)
        metrics = {**agent.update(update), **interaction.episodes.metrics()}
        counters.update(interaction.episodes.state())
        # Like the peers' benchmarks, a target counts only over a full window of episodes.
        full = len(interaction.episodes.recent) == RETURN_WINDOW
        if full and metrics.get("episode_return", -math.inf) >= cfg.target_return and not solved:
            solved["env_steps"] = metrics["env_steps"]
        return metrics

    def until(metrics: Mapping[str, float]) -> bool:
        return bool(solved)

    try:
        fit(run, step_fn, total_steps=per_update * total_updates(cfg.steps, per_update),
            objects=objects, log_every=whole_updates(cfg.log_every, per_update),
            ckpt_every=whole_updates(cfg.ckpt_every, per_update), progress=progress,
            until=until, latest=("env_steps", "episode_return"), step_size=per_update)
    except BaseException:
        interaction.close(terminate=True)
        raise
    interaction.close()
    # The counters as last checkpointed or updated (also when fit had nothing left to do).
    interaction.episodes.load(counters)
    evaluation_start = time.perf_counter()
    rows = run.metrics
    summary: dict[str, Any] = {"train/steps": interaction.episodes.env_steps,
                               "train/wall_s": rows[-1]["wall_s"] if rows else 0.0}
    if solved:
        summary.update({"train/solved_env_steps": int(solved["env_steps"]),
                        "train/solved_wall_s": summary["train/wall_s"]})
    seed = cfg.seed + 10_000
    scores = evaluate_policy(cfg.env, agent.policy, interaction.spaces, cfg.eval_episodes,
                             seed=seed, obs_norm=interaction.obs_norm)
    run.write_summary({**summary, **eval_summary(scores, seed)})
    from mlatlas.rl.deep.plots import return_curves

    if rows:
        run.save_figure(return_curves(rows, run.method, cfg.env, cfg.target_return), "returns.png")
    # Benchmarks subtract this to time training alone.
    run.write_summary({"train/final_eval_s": round(time.perf_counter() - evaluation_start, 3)})
    return run
