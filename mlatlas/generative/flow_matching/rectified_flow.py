r"""Rectified flow and reflow (Liu, Gong & Liu, "Flow Straight and Fast: Learning to Generate
and Transfer Data with Rectified Flow", ICLR 2023), built on ``flow_matching.py``.

Time runs as in flow matching: t = 1 is the noise z ~ N(0, I), t = 0 the data (the paper's time
is 1 - t). Given a coupling (x_0, z), the rectified flow of it is the ODE dZ_t/dt = v(Z_t, t),
Z_1 = z, whose velocity minimises

    L(v) = int_0^1 E || (z - x_0) - v(x_t, t) ||^2 dt,    x_t = (1 - t) x_0 + t z.

1-rectified flow: the independent coupling x_0 ~ data, z ~ N(0, I); L is flow matching's L_CFM
exactly, so the first stage of a run is a flow-matching run step for step.

Reflow: with Phi^1(z) = Z_0 the end of the 1-rectified flow started at z (integrated by Heun or
Euler), the 2-rectified flow minimises the same L on the deterministic pairs

    (x_0_hat, z) = (Phi^1(z), z),    z ~ N(0, I)   (N of them, drawn once),

starting from the 1-rectified flow's weights. It transports N(0, I) to the same distribution
(the marginals of Phi^1 are kept), at no larger transport cost for any convex cost, and its
paths are straighter. The paper measures the straightness of a flow Z by

    S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt   (squared norm over all dimensions),

zero exactly when every path is a straight line travelled at constant speed; then one Euler
step x_0 = z - v(z, 1) is exact. On a simulated path at times t_0 > t_1 > ... > t_N, with v_i the
velocity where the sampler evaluated it, the estimate is the left Riemann sum

    S_hat = sum_i (t_i - t_{i+1}) E || c - v_i ||^2 / (t_0 - t_N),
    c = (Z_{t_0} - Z_{t_N}) / (t_0 - t_N)   (the chord's velocity).

Along Euler's path c is the time-weighted mean of the v_i, so S_hat is their variance. For data
x_0 ~ N(m, s^2) in one dimension the 1-rectified flow is known: Z_t = (1 - t) m + sigma_t z with
sigma_t^2 = (1 - t)^2 s^2 + t^2, and since sigma_t'^2 = 1 + s^2 - s^2 / sigma_t^2 and
int_0^1 s^2 / sigma_t^2 dt = s (arctan(1 / s) + arctan(s)) = pi s / 2,

    S = int_0^1 (1 - s - sigma_t')^2 dt = int_0^1 sigma_t'^2 dt - (1 - s)^2 = (2 - pi / 2) s.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import ConfigError, require_at_least
from mlatlas.core.plots import metric_curves, plt, samples_figure, show_images
from mlatlas.core.run import Run, fit
from mlatlas.data import Dataset, EpochBatches
from mlatlas.eval.samples import score_samples
from mlatlas.generative.diffusion import loop
from mlatlas.generative.diffusion.configs import DiffusionConfig, SampleConfig, Sampler
from mlatlas.generative.diffusion.samplers import ODE_SAMPLERS, function_evaluations
from mlatlas.generative.flow_matching.flow_matching import FlowMatching, cfm_loss, integrate, times

# --- the maths ---------------------------------------------------------------------------------


def reflow_pairs(velocity, z: torch.Tensor, ts: torch.Tensor, sampler: str = "heun",
                 chunk: int = 1000, progress: bool | None = None) -> torch.Tensor:
    """x_0_hat = Phi(z): the end of dx/dt = velocity(x, t) started at z (B, ...) and integrated
    along the decreasing times ``ts`` by ``sampler`` ('euler' or 'heun'), ``chunk`` samples at
    a time. (x_0_hat, z) are the reflow pairs."""
    if sampler not in ODE_SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(ODE_SAMPLERS)}, got {sampler!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return torch.cat([integrate(velocity, part, ts, sampler, progress=progress)
                      for part in z.split(chunk)])


def reflow_loss(net, x0_hat: torch.Tensor, z: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
    """L on coupled pairs: t ~ U(0, 1) per pair and || v(x_t, t) - (z - x_0_hat) ||^2, averaged;
    unlike flow matching's loss, z is the pair's own noise, not a fresh draw."""
    if x0_hat.shape != z.shape:
        raise ValueError(f"x0_hat {tuple(x0_hat.shape)} and z {tuple(z.shape)} must match")
    t = distributed.rand((len(x0_hat),), generator=generator).to(x0_hat.device)
    return cfm_loss(net, x0_hat, z, t)


def path_straightness(ts: torch.Tensor, velocities: torch.Tensor, x_start: torch.Tensor,
                      x_end: torch.Tensor) -> torch.Tensor:
    """S_hat of a simulated path: ``ts`` (N + 1,) decreasing times, ``velocities`` (N, B, ...)
    the velocity v_i at x(t_i) for i < N, ``x_start`` = x(t_0) and ``x_end`` = x(t_N), (B, ...).
    Returns a float64 scalar."""
    ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
    if ts.ndim != 1 or len(ts) < 2 or not bool((ts.diff() < 0).all()):
        raise ValueError("ts must be a strictly decreasing 1-D sequence of at least two times")
    if velocities.shape != (len(ts) - 1, *x_start.shape) or x_end.shape != x_start.shape:
        raise ValueError(f"need velocities of shape {(len(ts) - 1, *x_start.shape)} and x_end "
                         f"like x_start, got {tuple(velocities.shape)}, {tuple(x_end.shape)}")
    span = ts[0] - ts[-1]
    chord = (x_start - x_end).double() / span
    deviation = (chord - velocities.double()).pow(2).flatten(2).sum(-1).mean(-1).cpu()
    return ((ts[:-1] - ts[1:]) * deviation).sum() / span


def straightness(velocity, z: torch.Tensor, ts: torch.Tensor,
                 sampler: str = "heun") -> torch.Tensor:
    """S_hat of the flow dx/dt = velocity(x, t) from z (B, ...) along ``ts`` (integrated by
    'euler' or 'heun'; the velocities are those of each step's first evaluation)."""
    velocities = []

    def record(i: int, t: float, x: torch.Tensor, x0: torch.Tensor) -> None:
        velocities.append((x - x0) / t)  # the sampler reports x0 = x - t v

    x_end = integrate(velocity, z, ts, sampler, callback=record)
    return path_straightness(ts, torch.stack(velocities), z, x_end)


# --- config ------------------------------------------------------------------------------------

@dataclass
class Config(DiffusionConfig):
    """1-rectified flow (flow matching), then one reflow: the 2-rectified flow."""

    METHOD: ClassVar[str] = "rectified_flow"

    steps: int = 3000
    """Optimisation steps of both stages: 1..reflow_after train the 1-rectified flow, the
    rest the 2-rectified flow on the reflow pairs (a resumed run may raise it)."""
    sampler: Sampler = "heun"
    """Sampler for the samples drawn at the end of training and the default of `mlatlas sample`."""
    sample_steps: int = 18
    """ODE steps (Heun makes 2 x steps - 1 network evaluations)."""
    reflow_after: int = 2000
    """Steps of the 1-rectified flow before the reflow (equal to --steps: no reflow)."""
    reflow_pairs: int = 2000
    """Noise samples z turned by the 1-rectified flow into the pairs (Phi(z), z)."""
    reflow_sampler: Literal["euler", "heun"] = "heun"
    """ODE solver that makes the reflow pairs."""
    reflow_ode_steps: int = 32
    """Solver steps that make each pair (Heun makes 2 x steps - 1 network evaluations)."""

    def check(self) -> None:
        require_at_least(self, 1, "reflow_after", "reflow_ode_steps")
        if self.reflow_after > self.steps:
            raise ConfigError(f"--reflow-after {self.reflow_after} exceeds --steps {self.steps}")
        if self.reflow_pairs < self.batch_size:
            raise ConfigError(f"--reflow-pairs {self.reflow_pairs} must be at least "
                              f"--batch-size {self.batch_size}")
        if self.conditional or self.classifier_steps:
            raise ConfigError("rectified_flow takes neither --conditional nor --classifier-steps "
                              "(the reflow pairs would need one coupling per label)")
        super().check()

    def formulation(self) -> FlowMatching:
        return FlowMatching()


# --- training ----------------------------------------------------------------------------------

def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    """Train the 1-rectified flow for ``reflow_after`` steps, make the reflow pairs with its EMA
    weights and fine-tune those weights into the 2-rectified flow for the remaining steps. A run
    resumed from any checkpoint, before or after the reflow, continues exactly."""
    run = run or Run.create(cfg.METHOD, cfg)
    # The same start as loop.train's, drawn in the same order: stage 1 is a flow-matching run.
    s = loop.setup(cfg)
    model, ema, opt, generator, device = s.model, s.ema, s.optimizer, s.generator, s.device
    # Stage 2 state, checkpointed from the start so that every checkpoint has the same layout.
    ema_rf1 = copy.deepcopy(ema).eval()
    shape = (cfg.reflow_pairs, *s.data.sample_shape)
    pairs = {"x0": torch.zeros(shape, device=device), "z": torch.zeros(shape, device=device)}
    pair_batches = EpochBatches(cfg.reflow_pairs, cfg.batch_size, cfg.seed)

    def start_reflow() -> None:
        ema_rf1.load_state_dict(ema.state_dict())
        model.load_state_dict(ema.state_dict())
        opt.state.clear()  # Adam's moments belong to the old objective and the raw weights
        # Every rank makes all the pairs (the same ones): its batches may come from any of them.
        z = torch.randn(shape, generator=generator).to(device)
        pairs["x0"] = reflow_pairs(s.formulation.velocity(ema_rf1), z,
                                   times(cfg.reflow_ode_steps), cfg.reflow_sampler,
                                   progress=progress)
        pairs["z"] = z

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        if step <= cfg.reflow_after:
            index = distributed.shard(s.batches(step)).to(device)
            with s.precision.autocast():
                loss = s.formulation.loss(model, s.x_train[index], None, generator)
            loop.optimise(cfg, model, ema, opt, loss, step, s.precision)
            return {"loss": loss.detach()}
        stage_step = step - cfg.reflow_after
        if stage_step == 1:
            start_reflow()
        elif pairs["z"].device != device:  # restored from a checkpoint, which loads on the CPU
            pairs.update({k: v.to(device) for k, v in pairs.items()})
        index = distributed.shard(pair_batches(stage_step)).to(device)
        with s.precision.autocast():
            loss = reflow_loss(model, pairs["x0"][index], pairs["z"][index], generator)
        loop.optimise(cfg, model, ema, opt, loss, stage_step, s.precision)
        return {"reflow_loss": loss.detach()}

    fit(run, step_fn, total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
        objects={"model": model, "ema": ema, "optimizer": opt, "rng": generator,
                 "ema_rf1": ema_rf1, "pairs": pairs, "precision": s.precision},
        progress=progress)
    if not distributed.is_main():
        return run  # the figures and the evaluation are rank 0's
    names = [k for k in ("loss", "reflow_loss") if any(k in r for r in run.metrics)]
    run.save_figure(metric_curves(run.metrics, names, title=f"{cfg.METHOD} training loss"),
                    "loss.png")
    last = run.last_row()
    run.write_summary({"train/steps": cfg.steps, "train/reflow_after": cfg.reflow_after,
                       "train/loss": last.get("reflow_loss", last.get("loss"))})
    if cfg.eval_samples:
        evaluate(run, n=cfg.eval_samples, progress=progress)
    return run


# --- sampling and evaluation -------------------------------------------------------------------

def sample(run: Run, n: int = 64, seed: int = 0, progress: bool | None = None,
           options: SampleConfig | None = None) -> torch.Tensor:
    """n samples of the run's latest flow (the 2-rectified flow once reflowed), in data space."""
    _check_deterministic(options)
    return loop.sample(run, n, seed, progress, options)


def _check_deterministic(options: SampleConfig | None) -> None:
    if options is not None and options.churn:
        raise ConfigError("rectified_flow samples with the deterministic euler or heun ODE "
                          "solver only (no --churn)")


def load_flows(run: Run) -> tuple[Config, Dataset, dict[str, nn.Module]]:
    """The run's config, data and EMA networks: {'rf1': 1-rectified flow, 'rf2': 2-rectified
    flow} once the reflow has begun, else {'rf1': the flow trained so far}."""
    cfg, data, model = loop.load_model(run)
    if (run.checkpoint_step() or 0) <= cfg.reflow_after:
        return cfg, data, {"rf1": model}
    rf1 = loop.build_model(cfg, data)
    run.load_weights(rf1, "ema_rf1")
    return cfg, data, {"rf1": rf1.to(next(model.parameters()).device).eval(), "rf2": model}


@dataclass
class Draw:
    """Samples of one flow: by the run's sampler (``x``, with the path's straightness and the
    first few samples' frames for figures) and by one Euler step (``x_one``), in data space."""

    x: torch.Tensor
    x_one: torch.Tensor
    straightness: float
    frames: list


def draw_flow(cfg: Config, data: Dataset, model: nn.Module, n: int, seed: int,
              options: SampleConfig, progress: bool | None = None) -> Draw:
    """Both draws start from the same noise (the same seed)."""
    keep = 8 if data.kind == "image" else 200
    velocities, frames, start = [], [], []

    def record(i: int, t: float, x: torch.Tensor, x0: torch.Tensor) -> None:
        if i == 0:
            start.append(x.cpu())
        velocities.append(((x - x0) / t).cpu())  # x0 = x - t v
        frames.append((t, x[:keep].cpu(), x0[:keep].cpu()))

    x, _ = loop.draw(cfg, data, model, n, seed, options, progress, callback=record)
    one = SampleConfig(sampler="euler", steps=1).resolve(cfg, data)
    x_one, _ = loop.draw(cfg, data, model, n, seed, one, progress)
    s = path_straightness(times(options.steps), torch.stack(velocities), start[0], x.cpu())
    return Draw(loop.from_model_space(x.cpu(), data),
                loop.from_model_space(x_one.cpu(), data), float(s), frames)


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None,
             options: SampleConfig | None = None) -> dict:
    """Score n samples (None: the run's ``eval_samples``, all from the noise of ``seed``) of the
    latest flow by the run's sampler (unprefixed keys, as every diffusion run) and by one Euler
    step (``one_step_*``), with its straightness; the 1-rectified flow's numbers carry the
    prefix ``rf1_`` once the run has reflowed. The metrics also go to summary.json as
    ``eval/<name>``. Writes samples.png, trajectory.png, reflow.png (1-RF against 2-RF) and,
    for points, vector_field.png."""
    from mlatlas.generative.diffusion.plots import trajectory_figure, vector_field_figure

    _check_deterministic(options)
    cfg, data, flows = load_flows(run)
    n = loop.eval_count(cfg, n, data)
    options = (options or SampleConfig()).resolve(cfg, data)
    draws = {name: draw_flow(cfg, data, net, n, seed, options, progress)
             for name, net in flows.items()}
    metrics: dict = {"n_samples": n}
    for name, d in draws.items():
        prefix = "" if name == list(draws)[-1] else f"{name}_"
        for label, x in (("", d.x), ("one_step_", d.x_one)):
            for key, value in score_samples(x, data).items():
                if key not in ("n_samples", "note"):
                    metrics[f"{prefix}{label}{key}"] = value
                elif key == "note":
                    metrics["note"] = value
        metrics[f"{prefix}straightness"] = d.straightness
        if data.kind == "points":
            nll = loop.held_out_nll(cfg.formulation(), flows[name], data)
            metrics.update({f"{prefix}{key}": value for key, value in nll.items()})
    metrics.update(sampler=options.sampler, sampler_steps=options.steps,
                   function_evaluations=function_evaluations(options.sampler, options.steps))
    final = draws[list(draws)[-1]]
    title = (f"{cfg.METHOD} ({'2-RF' if len(draws) == 2 else '1-RF'}), {cfg.dataset}, "
             f"{options.describe()}")
    run.save_figure(samples_figure(final.x, title, data.x_test), "samples.png")
    run.save_figure(trajectory_figure(final.frames, data, title=f"{title}: the sampling path"),
                    "trajectory.png")
    if data.kind == "points":
        run.save_figure(vector_field_figure(cfg.formulation(), flows[list(flows)[-1]], data),
                        "vector_field.png")
    run.save_figure(reflow_figure(draws, data, options.describe()), "reflow.png")
    loop.write_eval_summary(run, metrics)
    return metrics


# --- figures -----------------------------------------------------------------------------------

NAMES = {"rf1": "1-rectified flow", "rf2": "2-rectified flow (reflow)"}


def reflow_figure(draws: dict[str, Draw], data: Dataset, describe: str):
    """One row per flow: (points only) the sampling paths, then one Euler step's samples and the
    run's sampler's, from the same noise."""
    columns = (["paths"] if data.kind == "points" else []) + ["one Euler step", describe]
    fig, axes = plt.subplots(len(draws), len(columns), squeeze=False,
                             figsize=(4 * len(columns), 4 * len(draws)))
    for row, (name, d) in zip(axes, draws.items(), strict=True):
        panels = [d.x_one, d.x]
        if data.kind == "points":
            ref = data.x_test[:2000].numpy()
            paths = torch.stack([x for _, x, _ in d.frames] + [d.frames[-1][2]]).numpy()
            row[0].scatter(ref[:, 0], ref[:, 1], s=1, c="0.85")
            row[0].plot(paths[:, :100, 0], paths[:, :100, 1], lw=0.5, c="tab:blue", alpha=0.5)
            row[0].scatter(paths[0, :100, 0], paths[0, :100, 1], s=4, c="tab:red", label="z")
            row[0].scatter(paths[-1, :100, 0], paths[-1, :100, 1], s=4, c="k", label="sample")
            row[0].legend(loc="upper right", fontsize=8, markerscale=2)
            for ax, x in zip(row[1:], panels, strict=True):
                ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.75")
                ax.scatter(x[:1000, 0].numpy(), x[:1000, 1].numpy(), s=1, c="tab:blue")
        else:
            for ax, x in zip(row, panels, strict=True):
                show_images(ax, x[:64], 8)
        for ax, column in zip(row, columns, strict=True):
            if data.kind == "points":
                ax.set_aspect("equal")
            ax.set_title(f"{NAMES[name]}: {column}\nstraightness {d.straightness:.3g}"
                         if column == "paths" else f"{NAMES[name]}: {column}", fontsize=9)
    fig.tight_layout()
    return fig
