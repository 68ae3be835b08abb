"""Scoring a deep RL policy: the undiscounted return of its deterministic actions over fresh
episodes, ``mlatlas eval`` on a finished run, and one episode recorded as a GIF or MP4.

The deterministic policy is the greedy action argmax_a pi(a | s) of a categorical policy, the
mean mu(s) of a Gaussian one, or the actor's output mu_phi(s) (DDPG, TD3). Episode i of an
evaluation with seed s plays environment copy i reset with seed s + i, so the same seed scores
the same episodes and another seed others.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from mlatlas.core.config import ConfigError, check_options
from mlatlas.core.io import atomic_path
from mlatlas.core.run import Run
from mlatlas.rl.deep.envs import Spaces, env_actions, env_spaces, make_envs, obs_tensor
from mlatlas.rl.deep.normalize import ObsNormalizer
from mlatlas.rl.deep.policies import Policy


def policy_actions(policy: Callable[[torch.Tensor], torch.Tensor], obs: np.ndarray,
                   spaces: Spaces, obs_norm: ObsNormalizer | None) -> np.ndarray:
    """The environment actions of ``policy`` for a batch of raw observations."""
    x = obs_tensor(obs, spaces)
    return env_actions(policy(x if obs_norm is None else obs_norm(x)), spaces)


@torch.no_grad()
def evaluate_policy(env_id: str, policy: Callable[[torch.Tensor], torch.Tensor], spaces: Spaces,
                    episodes: int, seed: int, obs_norm: ObsNormalizer | None = None
                    ) -> dict[str, float]:
    """Mean and std of the undiscounted return of ``episodes`` episodes, played in parallel, one
    per environment, with the deterministic ``policy``."""
    envs = make_envs(env_id, episodes, seed)
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(episodes)
    finished = np.zeros(episodes, dtype=bool)
    while not finished.all():
        obs, rewards, terminated, truncated, _ = envs.step(
            policy_actions(policy, obs, spaces, obs_norm))
        returns += np.where(finished, 0.0, rewards)
        finished |= terminated | truncated
    envs.close()
    return {"return_mean": float(returns.mean()), "return_std": float(returns.std()),
            "episodes": episodes}


def eval_summary(scores: dict[str, Any], seed: int) -> dict[str, Any]:
    """The ``eval/`` keys of summary.json for the scores of :func:`evaluate_policy`."""
    return {"eval/return_mean": scores["return_mean"], "eval/return_std": scores["return_std"],
            "eval/episodes": scores["episodes"], "eval/seed": seed}


@dataclass
class EvalOptions:
    """Options of ``mlatlas eval`` for deep RL runs (the episodes are ``--n``)."""

    video: bool = False
    """Also record one episode as an animation in the run folder."""
    video_format: Literal["gif", "mp4"] = "gif"
    """'gif' (Pillow) or 'mp4' (needs imageio with imageio-ffmpeg)."""

    def __post_init__(self) -> None:
        check_options(self)


def load_policy(run: Run) -> tuple[Any, Spaces, Policy | nn.Module, ObsNormalizer | None]:
    """A finished run's config, spaces, actor (checkpoint group ``model``) and observation
    normaliser; ``make_actor`` is that of the module of the config class the run recorded."""
    cfg = run.load_config()
    spaces = env_spaces(cfg.env)
    actor = importlib.import_module(type(cfg).__module__).make_actor(cfg, spaces)
    run.load_weights(actor, "model")
    actor.eval()
    obs_norm = None
    if cfg.normalize_obs:
        obs_norm = ObsNormalizer(spaces.obs_dim)
        run.load_weights(obs_norm, "obs_norm")
    return cfg, spaces, actor, obs_norm


def deterministic(actor: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The greedy action of a stochastic policy, or the output of a deterministic actor."""
    if isinstance(actor, Policy):
        return actor.act
    return actor


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None,
             options: EvalOptions | None = None) -> dict[str, Any]:
    """Score a run's deterministic policy over ``n`` episodes (None: the run's
    ``eval_episodes``) seeded from ``seed``, and record the scores in summary.json under
    ``eval/``; with ``options.video`` also write ``episode-seed{seed}.gif`` (or .mp4)."""
    options = options or EvalOptions()
    cfg, spaces, actor, obs_norm = load_policy(run)
    episodes = cfg.eval_episodes if n is None else n
    if episodes < 1:
        raise ConfigError(f"--n must be at least 1, got {episodes}")
    policy = deterministic(actor)
    scores: dict[str, Any] = evaluate_policy(cfg.env, policy, spaces, episodes, seed, obs_norm)
    run.write_summary(eval_summary(scores, seed), replace="eval/")
    if options.video:
        path = run.path(f"episode-seed{seed}.{options.video_format}")
        scores["video"] = str(record_video(cfg.env, policy, spaces, path, seed, obs_norm))
    return scores


@torch.no_grad()
def record_video(env_id: str, policy: Callable[[torch.Tensor], torch.Tensor], spaces: Spaces,
                 path: Path, seed: int, obs_norm: ObsNormalizer | None = None,
                 max_frames: int = 1000) -> Path:
    """Play one episode with rgb_array rendering and write it as a GIF or MP4."""
    # pygame (classic control's renderer) needs no display for rgb_array frames; without this
    # SDL prints an error about a missing display on headless machines.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    env = gym.make(env_id, render_mode="rgb_array")
    obs, _ = env.reset(seed=seed)
    try:
        frames = [env.render()]
    except gym.error.DependencyNotInstalled as err:
        raise ConfigError(f"{env_id} cannot render here: {err}") from None
    done = False
    while not done and len(frames) < max_frames:
        action = policy_actions(policy, np.asarray(obs)[None], spaces, obs_norm)[0]
        obs, _, terminated, truncated, _ = env.step(action)
        frames.append(env.render())
        done = terminated or truncated
    fps = env.metadata.get("render_fps", 30)
    env.close()
    with atomic_path(path) as tmp:
        if path.suffix == ".mp4":
            try:
                import imageio.v2 as imageio
            except ImportError:
                raise ConfigError("--video-format mp4 needs imageio and imageio-ffmpeg "
                                  "(pip install imageio imageio-ffmpeg); gif needs nothing"
                                  ) from None
            imageio.mimwrite(tmp, frames, fps=fps, format="FFMPEG")
        else:
            from PIL import Image

            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=int(1000 / fps), loop=0)
    return path
